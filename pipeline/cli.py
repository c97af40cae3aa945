"""`supsup` command line: train, evaluate, run (both), lookup, registry.

The only place that configures logging handlers and draws progress bars.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("supsup")


class _Bar:
    """A tqdm bar over tasks showing tasks per hour and time left."""

    def __init__(self, desc: str) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=0, desc=desc, unit="task", dynamic_ncols=True, file=sys.stderr,
                        mininterval=0.5, disable=None)
        self.start = time.perf_counter()
        self.first: int | None = None

    def __call__(self, done: int, total: int) -> None:
        if self.first is None:
            self.first = done
        self.bar.total = total
        self.bar.n = done
        elapsed = time.perf_counter() - self.start
        new = done - self.first
        if new > 0 and elapsed > 0:
            rate = 3600 * new / elapsed
            self.bar.set_postfix_str(f"{rate:,.0f} tasks/h")
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))


def _load(args: argparse.Namespace) -> Any:
    from pipeline.config import load_config

    return load_config(args.config, args.set or [])


def _tracker(config: Any) -> Any:
    """The experiment's Tracker, made only once the whole config and its targets check out
    (nothing is written before); runs that a killed earlier command left RUNNING are closed."""
    from pipeline.preflight import check_before_side_effects
    from pipeline.tracking import Tracker

    check_before_side_effects(config)
    tracker = Tracker(config.tracking_uri, config.experiment_name)  # checks the server answers
    config.run_dir.mkdir(parents=True, exist_ok=True)
    tracker.close_abandoned_runs()
    return tracker


def do_train(config: Any, address: str | None, tracker: Any) -> Any:
    """Train into the registry, log to MLflow, publish and register the bank.

    Returns the TrainSummary, with `publication` (the bank's BankSource and model version)."""
    from pipeline.experiment import tracked_run
    from pipeline.jobs.train import run_training
    from pipeline.publish import publish_bank
    from pipeline.report import plot_training

    with tracked_run(tracker, "train", {"job": "train", "bank": config.bank}, config) as run_id:
        bar = _Bar(f"train {config.bank}")

        def on_task(r: dict[str, Any]) -> None:
            tracker.log_task_metrics(r["task_id"], {
                k: float(r[k]) for k in ("train_accuracy", "train_loss", "density", "seconds")})

        try:
            summary = run_training(config, progress=bar, on_task=on_task, address=address)
        finally:
            bar.close()
        summary.run_id = run_id
        if summary.trained:
            accs = [m["train_accuracy"] for m in summary.trained.values()]
            tracker.log_metrics({
                "tasks_trained": len(summary.trained), "tasks_skipped": len(summary.skipped),
                "train_accuracy_mean": sum(accs) / len(accs),
                "tasks_per_hour": summary.tasks_per_hour, "train_seconds": summary.seconds,
            })
            tracker.log_table([{"task_id": t, **m} for t, m in sorted(summary.trained.items())],
                              "tasks.json")
            path = plot_training(summary.trained, config.run_dir / "training.png")
            if path:
                tracker.log_artifact(path)
        started = time.perf_counter()
        summary.publication = publish_bank(config, tracker, run_id)
        publish_seconds = time.perf_counter() - started
        if summary.trained:
            tracker.log_metrics({"publish_seconds": publish_seconds})
            # Only a run that trained writes the summary: a rerun that found everything stored
            # keeps the numbers of the run that did the work.
            _write_json(config.run_dir / "train_summary.json", {
                "bank": config.bank, "tasks_trained": len(summary.trained),
                "tasks_skipped": len(summary.skipped), "seconds": summary.seconds,
                "tasks_per_hour": summary.tasks_per_hour, "publish_seconds": publish_seconds,
                "run_id": run_id,
                "tasks": {str(t): m for t, m in sorted(summary.trained.items())},
            })
    reg = summary.publication.registration
    if reg is not None:
        summary.model_version = reg.version
        how = "registered as" if reg.created else "already registered as"
        log.info("%s: %s %s (@%s)", summary.publication.source.describe(), how, reg.uri,
                 config.tracking.alias)
    log.info("trained %d new tasks (%d already stored) in %.1f s: %.0f tasks/h",
             len(summary.trained), len(summary.skipped), summary.seconds, summary.tasks_per_hour)
    return summary


def do_evaluate(config: Any, source: Any, address: str | None, tracker: Any,
                tags: dict[str, str] | None = None,
                model: tuple[str, int] | None = None) -> Any:
    """Evaluate exactly `source` (a BankSource) on the config's tasks; log it to MLflow, and
    onto `model` (name, version) when the source is a registered version."""
    from pipeline.experiment import data_identity
    from pipeline.jobs.evaluate import run_evaluation
    from pipeline.report import write_report

    with tracker.run("evaluate", tags={"job": "evaluate", "bank": source.bank,
                                       "snapshot": source.snapshot_sha256,
                                       **(tags or {})}) as run_id:
        tracker.log_params({f"evaluate.{k}": str(v)
                            for k, v in config.evaluate.model_dump().items()})
        dataset, digest, data_source, profile = data_identity(config)
        tracker.log_dataset(dataset, digest, data_source, profile, context="evaluation")
        bar = _Bar(f"evaluate {source.bank}")
        try:
            report = run_evaluation(config, source, progress=bar, address=address)
        finally:
            bar.close()
        for r in report.tasks:
            tracker.log_task_metrics(r["task_id"], {
                k: r[k] for k in ("accuracy_gg", "accuracy_gn", "task_inference_accuracy")
                if r.get(k) is not None})
        tracker.log_metrics({k: float(v) for k, v in report.summary.items()})
        tracker.log_table([{k: v for k, v in r.items() if k != "inferred"} for r in report.tasks],
                          "tasks.json")
        for c in report.curve:
            tracker.log_metrics({"curve_accuracy_gn": c["accuracy_gn"],
                                 "curve_task_inference_accuracy": c["task_inference_accuracy"]},
                                step=int(c["tasks_learned"]))
        if model is not None:
            from pipeline.tracking import record_evaluation

            record_evaluation(tracker, *model, run_id, report.summary)
        report.run_id, report.model_version = run_id, (model[1] if model else None)
        out_dir = config.run_dir / "evaluation"
        files = write_report(report, out_dir, f"{config.name}: evaluation")
        for path in files.values():
            tracker.log_artifact(path, "evaluation")
    return report, files


def _print_eval(report: Any, files: dict[str, Path]) -> None:
    s = report.summary
    print(f"GG accuracy {100 * s['accuracy_gg']:.2f}%", end="")
    if "accuracy_gn" in s:
        print(f" | GN accuracy {100 * s['accuracy_gn']:.2f}% | task inference "
              f"{100 * s['task_inference_accuracy']:.2f}%", end="")
    print(f" over {int(s['tasks'])} tasks")
    print(f"report: {files['markdown']}")


def do_baseline(config: Any, tracker: Any) -> dict[str, Any]:
    """Train and evaluate a baseline (config.model) on the config's tasks; log it to MLflow."""
    from pipeline.experiment import tracked_run
    from pipeline.jobs.baseline import run_baseline

    tags = {"job": "baseline", "model": config.model}
    with tracked_run(tracker, f"baseline-{config.model}", tags, config):
        bar = _Bar(f"{config.model} {config.name}")
        try:
            report = run_baseline(config, progress=bar)
        finally:
            bar.close()
        for t, acc in report.get("accuracy", {}).items():
            tracker.log_task_metrics(int(t), {"accuracy_gg": float(acc)})
        tracker.log_metrics({"accuracy_gg": report["mean_accuracy"],
                             "bytes_per_task": report["bytes_per_task"],
                             "seconds": report["seconds"]})
        tracker.log_artifact(report["path"], "baseline")
    print(f"{config.model}: accuracy (task given) {100 * report['mean_accuracy']:.2f}% over "
          f"{len(report.get('accuracy', {}))} tasks, {report['bytes_per_task']:,} bytes per task")
    print(f"report: {report['path']}")
    return report


def do_scenario(config: Any, address: str | None, tracker: Any) -> dict[str, Any]:
    """Training without task identity ("nns") or the Hopfield reservoir ("hopfield")."""
    if config.scenario == "nns":
        from pipeline.jobs.discovery import run_discovery as job
    else:
        from pipeline.jobs.reservoir import run_reservoir as job
    bar = _Bar(f"{config.scenario} {config.name}")
    try:
        summary = job(config, progress=bar, tracker=tracker, address=address)
    finally:
        bar.close()
    shown = {k: v for k, v in summary.items() if isinstance(v, (int, float, str))}
    print(json.dumps(shown, indent=1))
    for name, path in (summary.get("files") or {}).items():
        print(f"{name}: {path}")
    return summary


def _special(config: Any, address: str | None, tracker: Any) -> bool:
    """Run a baseline or a scenario job when the config asks for one; True if it did."""
    if config.model != "supsup":
        do_baseline(config, tracker)
        return True
    if config.scenario != "gg_gn":
        do_scenario(config, address, tracker)
        return True
    return False


def cmd_train(args: argparse.Namespace) -> int:
    config = _load(args)
    if _special(config, args.address, _tracker(config)):
        return 0
    summary = do_train(config, args.address, _tracker(config))
    _where(config, summary.model_version)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    config = _load(args)
    tracker = _tracker(config)
    if _special(config, args.address, tracker):  # these jobs train and evaluate in one go
        return 0
    # One parent run; the train and evaluate runs open inside it and become its children.
    with tracker.run("run", tags={"job": "run", "bank": config.bank}) as parent_id:
        summary = do_train(config, args.address, tracker)
        report, files = do_evaluate(config, summary.publication.source, args.address, tracker,
                                    {"train_run_id": summary.run_id or ""},
                                    model=(config.model_name, summary.model_version)
                                    if summary.model_version else None)
        tracker.log_metrics({k: float(v) for k, v in report.summary.items()}, run_id=parent_id)
        tracker.set_tags({"model_version": summary.model_version or "",
                          "snapshot": summary.publication.source.snapshot_sha256},
                         run_id=parent_id)
    _print_eval(report, files)
    _where(config, summary.model_version)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from pipeline.config import parse_config

    target = args.target
    if target.startswith("models:/"):
        from pipeline.tracking import model_source, run_config_text

        uri = _tracking_uri(args)
        with tempfile.TemporaryDirectory(prefix="supsup-evaluate-") as tmp:
            info, source = model_source(target, uri, tmp)
            if args.config:
                config = _load(args)
            else:
                import yaml

                config = parse_config(yaml.safe_load(run_config_text(info["run_id"], uri)),
                                      f"{target} (config.yaml of run {info['run_id']})",
                                      args.set)
            tags = {"model_uri": target, "model_version": str(info["version"])}
            report, files = do_evaluate(config, source, args.address, _tracker(config), tags,
                                        model=(info["name"], int(info["version"])))
    else:
        from pipeline.registry import MaskRegistry

        args.config = target
        config = _load(args)
        source = MaskRegistry(config.registry.root).source(config.bank)
        report, files = do_evaluate(config, source, args.address, _tracker(config))
    _print_eval(report, files)
    return 0


def _tracking_uri(args: argparse.Namespace) -> str:
    import os

    if args.tracking_uri:
        return args.tracking_uri
    if getattr(args, "config", None):
        return _load(args).tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    raise SystemExit("error: pass --tracking-uri URI (or --config CONFIG, or set "
                     "MLFLOW_TRACKING_URI) so the model registry can be found")


def cmd_lookup(args: argparse.Namespace) -> int:
    from pipeline.tracking import lookup

    info = lookup(args.model_uri, _tracking_uri(args))
    if args.task is not None:
        from pipeline.registry import MaskRegistry

        registry = MaskRegistry(info["registry_root"])
        record = registry.read_task(info["bank"], args.task)
        info = {"model": args.model_uri, "version": info["version"], "task_id": args.task,
                "densities": record.densities, "metadata": record.metadata}
    print(json.dumps(info, indent=1, default=str))
    return 0


def cmd_registry(args: argparse.Namespace) -> int:
    from pipeline.registry import MaskRegistry

    registry = MaskRegistry(args.root)
    if args.action == "ls":
        banks = [args.bank] if args.bank else registry.banks()
        if not banks:
            print(f"no banks under {args.root}")
        for b in banks:
            m = registry.manifest(b)
            ids = registry.tasks(b)
            span = f"{ids[0]}..{ids[-1]}" if ids else "-"
            print(f"{b}: {len(ids)} tasks ({span}), network {m['network']['name']} "
                  f"seed {m['network']['seed']}, rule {m['mask'].get('rule')}")
        return 0
    if not args.bank:
        raise SystemExit(f"error: `supsup registry {args.action}` needs a BANK")
    if args.action == "verify":
        report = registry.verify(args.bank)
        if report.manifest_problem:
            print(f"{args.bank}: manifest: {report.manifest_problem}")
        print(f"{args.bank}: {len(report.ok)} tasks ok, {len(report.problems)} with problems, "
              f"{len(report.foreign)} files that are not the bank's")
        for t, msg in sorted(report.problems.items()):
            print(f"  task {t}: {msg}")
        for name in report.foreign:
            print(f"  not a file of this bank: {name} (move it out of the bank folder)")
        for name in report.temporary:
            print(f"  temporary file of an unfinished write: {name} (safe to delete when no job "
                  "writes to this bank)")
        if report.reservoir_problem:
            print(f"  reservoir: {report.reservoir_problem}")
        return 0 if report.all_ok else 1
    if args.action == "export":
        from pipeline.registry import export_bank

        if not args.dest:
            raise SystemExit("error: `supsup registry export BANK --dest FILE.parquet`")
        source = export_bank(registry, args.bank, Path(args.dest))
        print(f"exported {source.describe()} to {args.dest}")
        return 0
    raise SystemExit(f"error: unknown registry action {args.action!r}")


def _where(config: Any, version: int | None) -> None:
    print(f"run folder: {config.run_dir}")
    print(f"mask registry: {config.registry.root} (bank {config.bank})")
    print(f"MLflow: {config.tracking_uri} (experiment {config.experiment_name}); "
          f"browse with `mlflow ui --backend-store-uri {config.tracking_uri}`")
    if version is not None:
        print(f"model: models:/{config.model_name}@{config.tracking.alias} (version {version}); "
              f"`supsup lookup models:/{config.model_name}@{config.tracking.alias} "
              f"--tracking-uri {config.tracking_uri}`")


def _version() -> str:
    """The installed distribution's version (the project's pyproject.toml)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("supsup-pipeline")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="supsup", description=__doc__)
    p.add_argument("--version", action="version", version=f"supsup {_version()}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--debug", action="store_true",
                   help="show the full traceback of a failure instead of one error line")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.lr=0.01 (repeatable)")
        sp.add_argument("--address", help="join the Ray cluster at ADDRESS instead of a local one")

    t = sub.add_parser("train", help="train every task's mask into the registry; register it")
    t.add_argument("config")
    common(t)
    t.set_defaults(fn=cmd_train)
    r = sub.add_parser("run", help="train, register and evaluate end to end")
    r.add_argument("config")
    common(r)
    r.set_defaults(fn=cmd_run)
    e = sub.add_parser("evaluate", help="task inference on a bank: CONFIG or models:/NAME@ALIAS")
    e.add_argument("target")
    e.add_argument("--config", help="config for the data when TARGET is a model URI")
    e.add_argument("--tracking-uri")
    common(e)
    e.set_defaults(fn=cmd_evaluate)
    lk = sub.add_parser("lookup", help="what a registered model holds")
    lk.add_argument("model_uri")
    lk.add_argument("--task", type=int)
    lk.add_argument("--tracking-uri")
    lk.add_argument("--config")
    lk.set_defaults(fn=cmd_lookup, set=None)
    from pipeline.jobs.sweep import add_sweep_parser
    from pipeline.results import add_results_parser

    add_sweep_parser(sub)
    add_results_parser(sub)
    g = sub.add_parser("registry", help="inspect the mask registry: ls, verify, export")
    g.add_argument("action", choices=["ls", "verify", "export"])
    g.add_argument("bank", nargs="?")
    g.add_argument("--root", default="runs/registry")
    g.add_argument("--dest")
    g.set_defaults(fn=cmd_registry)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("mlflow", "alembic", "urllib3", "ray", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # MLflow's HTTP retries back off for minutes by default; a dead server should fail in
    # seconds (users may still set these themselves).
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return int(args.fn(args) or 0)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("error: interrupted; tasks already stored are kept, rerun the same command to "
              "resume", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001  (the one boundary: every failure is one line)
        if args.debug:
            raise
        print(f"error: {describe_error(err)}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)


def _terminate(signum: int, frame: Any) -> None:
    """SIGTERM ends a command like Ctrl-C: runs are marked KILLED and Ray is shut down."""
    raise KeyboardInterrupt(f"signal {signum}")


def describe_error(err: BaseException) -> str:
    """One line for a failure: what, where, and what to do next (the traceback: --debug)."""
    if isinstance(err, KeyError) and err.args:
        return str(err.args[0])
    if isinstance(err, MemoryError):
        return ("out of memory; lower tasks.num_tasks, train.group_size or evaluate.group_size, "
                "or run on a machine with more memory")
    if isinstance(err, OSError) and not isinstance(err, (FileNotFoundError, FileExistsError)):
        where = f" ({err.filename})" if err.filename else ""
        if err.errno == errno.ENOSPC:
            return (f"no space left on the device{where}: free space there, or point "
                    "output_dir / registry.root at a disk with room; stored tasks are kept")
        if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return (f"not allowed to write{where}: {err.strerror}; choose a writable "
                    "output_dir / registry.root")
        return f"{err.strerror or err}{where}"
    if isinstance(err, (ValueError, FileNotFoundError, FileExistsError, RuntimeError,
                        FloatingPointError)):
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        return "; ".join(lines) or type(err).__name__  # several config errors: one line
    module = type(err).__module__.split(".")[0]
    if module in ("mlflow", "ray"):
        text = getattr(err, "message", None) or str(err)
        return f"{module}: {text.strip().splitlines()[0]} (rerun with --debug for the traceback)"
    return f"{type(err).__name__}: {err} (rerun with --debug for the traceback)"


if __name__ == "__main__":
    raise SystemExit(main())
