"""Headless Chromium driven over the Chrome DevTools protocol, enough to screenshot a web UI.

`chromium --screenshot` only loads a page: it cannot set local storage before the page's
scripts read it, click a tab or type into a filter box, and it cannot wait for a page's data
to arrive. This drives one tab over the browser's DevTools websocket instead (the `websockets`
package that MLflow's server already brings in). Chromium runs in a session of its own with a
watchdog (the tests' Guarded process), on a throw-away profile, and is stopped on exit.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
         "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0"]


def chromium() -> str:
    """The browser binary: Debian's `chromium` (`apt-get install chromium`) or a Chrome."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    raise SystemExit("error: no chromium on PATH; install it with `apt-get install chromium`")


class Tab:
    """One page of the browser, attached through the browser's websocket (flat sessions)."""

    def __init__(self, socket: Any, session: str) -> None:
        self._socket, self._session, self._ids = socket, session, itertools.count(1)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one command and return its result, skipping the events that arrive meanwhile."""
        return _call(self._socket, self._ids, method, params, self._session)

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                           awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:80]}...: {result['exceptionDetails']}")
        return result["result"].get("value")

    def resize(self, width: int, height: int) -> None:
        """The page's viewport, in CSS pixels at scale 1."""
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height,
                  deviceScaleFactor=1, mobile=False)

    def goto(self, url: str) -> None:
        """Load `url` afresh, by way of a blank page: a new hash alone would not reload the
        page, and the UI reads local storage when it loads."""
        self.call("Page.navigate", url="about:blank")
        self.call("Page.navigate", url=url)
        time.sleep(1)  # the old document may still answer readyState for a moment
        self.wait_for("document.readyState === 'complete'", seconds=60)

    def wait_for(self, expression: str, seconds: float = 60) -> None:
        """Poll a JavaScript condition until it holds; RuntimeError naming it when it does not."""
        deadline = time.monotonic() + seconds
        while not self.evaluate(f"Boolean({expression})"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"page never met {expression!r} within {seconds:g} s")
            time.sleep(0.5)

    def type_text(self, text: str) -> None:
        """Type into the focused element, as keystrokes would (React sees the input events)."""
        self.call("Input.insertText", text=text)

    def screenshot(self, out: Path) -> Path:
        """The viewport as a PNG at `out`."""
        data = self.call("Page.captureScreenshot", format="png")["data"]
        out.write_bytes(base64.b64decode(data))
        return out


def _call(socket: Any, ids: Iterator[int], method: str, params: dict[str, Any],
          session: str | None = None) -> dict[str, Any]:
    message_id = next(ids)
    message: dict[str, Any] = {"id": message_id, "method": method, "params": params}
    if session:
        message["sessionId"] = session
    socket.send(json.dumps(message))
    while True:
        reply = json.loads(socket.recv(timeout=120))
        if reply.get("id") == message_id:
            if "error" in reply:
                raise RuntimeError(f"{method}: {reply['error']}")
            return dict(reply.get("result", {}))


@contextlib.contextmanager
def browser_tab(width: int = 1500, height: int = 950) -> Iterator[Tab]:
    """A headless Chromium with one blank tab of width x height; stopped and its profile
    removed on exit."""
    from servers import Guarded, stop_group  # the tests' process helpers (bench adds the path)
    from websockets.sync.client import connect

    with tempfile.TemporaryDirectory(prefix="supsup-chromium-") as profile:
        with (Path(profile) / "chromium.log").open("wb") as log:
            proc = Guarded([chromium(), *FLAGS, f"--user-data-dir={profile}",
                            f"--window-size={width},{height}", "about:blank"],
                           stdout=log, stderr=subprocess.STDOUT)
        try:
            port_file, deadline = Path(profile) / "DevToolsActivePort", time.monotonic() + 60
            while not port_file.is_file() or len(port_file.read_text().split()) < 2:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("chromium did not open its DevTools port; see "
                                       f"{Path(profile) / 'chromium.log'}")
                time.sleep(0.2)
            port, path = port_file.read_text().split()[:2]
            with connect(f"ws://127.0.0.1:{port}{path}", max_size=None) as socket:
                ids = itertools.count(1_000_000)
                target = _call(socket, ids, "Target.createTarget", {"url": "about:blank"})
                session = _call(socket, ids, "Target.attachToTarget",
                                {"targetId": target["targetId"], "flatten": True})["sessionId"]
                tab = Tab(socket, session)
                tab.call("Page.enable")
                tab.resize(width, height)
                yield tab
        finally:
            stop_group(proc)
