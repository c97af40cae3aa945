"""supsup: train one supermask per task on a Ray cluster, keep them in a mask registry
versioned in MLflow, and find which task a batch is from.

\b
Start here:
  supsup run configs/quickstart.yaml     train, register and evaluate the default experiment
  supsup COMMAND --help                  what a command takes, with examples

Every failure is one `error:` line saying what to do next (--debug: the traceback). The whole
log of a command, MLflow's and Ray's lines included, is in its run folder's supsup.log. The
options below may also follow the command (`supsup run CONFIG -q`). Tab completion in bash:
eval "$(_SUPSUP_COMPLETE=bash_source supsup)" (zsh_source, fish_source for those shells).
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import sys
from typing import Any

import click

from pipeline import commands, evaluation_commands, promotion_commands, registry_commands
from pipeline.summaries import Format

log = logging.getLogger("supsup")

_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _version() -> str:
    """The installed distribution's version (the project's pyproject.toml)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("supsup-pipeline")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def _config_options(fn: Any) -> Any:
    """CONFIG plus the --set and --address options every job command takes."""
    fn = click.option("--address", metavar="ADDRESS",
                      help="Join the Ray cluster at ADDRESS (host:port or ray://host:port) "
                           "instead of the config's cluster.address, RAY_ADDRESS or a local "
                           "one.")(fn)
    fn = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                      help="Override one config value by its dotted path, e.g. --set "
                           "train.lr=0.01 (repeatable; checked like the file).")(fn)
    return click.argument("config", type=click.Path(dir_okay=False))(fn)


def _format_option(fn: Any) -> Any:
    """--format table|json: a summary bounded in lines, or the whole data as one JSON document
    on stdout (every task id; log lines stay on stderr)."""
    return click.option("--format", "fmt", type=click.Choice(["table", "json"]),
                        default="table", show_default=True,
                        help="table: a summary for people (task ranges, counts, the worst "
                             "tasks); json: everything, for programs.")(fn)


class _InOrder(click.Group):
    """Lists commands in the order they are defined (the order a newcomer needs them)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)


@click.group(cls=_InOrder, help=__doc__, context_settings=_SETTINGS)
@click.version_option(_version(), "-V", "--version", prog_name="supsup",
                      message="%(prog)s %(version)s")
@click.option("-q", "--quiet", is_flag=True,
              help="Print results and errors only: no progress bars, no INFO lines.")
@click.option("-v", "--verbose", is_flag=True,
              help="DEBUG lines, and MLflow's, Ray's and Python's warnings, on the terminal too.")
@click.option("--debug", is_flag=True,
              help="Show the full traceback of a failure instead of one error line.")
def cli(quiet: bool, verbose: bool, debug: bool) -> None:
    """(The options are read by `main`, which sets up the terminal before a command runs.)"""


@cli.command(short_help="Train, register and evaluate end to end.", epilog="""\b
Examples:
  supsup run configs/quickstart.yaml
  supsup run configs/quickstart.yaml --set tasks.num_tasks=20 --set train.steps=300
  supsup -q run configs/permuted_mnist_2500.yaml""")
@_config_options
def run(config: str, overrides: tuple[str, ...], address: str | None) -> int:
    """Train, register and evaluate CONFIG end to end: one MLflow parent run with train,
    register and evaluate child runs; prints accuracy and task-inference accuracy."""
    return commands.run(config, overrides, address)


@cli.command(short_help="Train every task's mask into the registry; register the bank.",
             epilog="""\b
Examples:
  supsup train configs/quickstart.yaml
  supsup train configs/permuted_mnist_2500.yaml --set train.group_size=50
  supsup train configs/cluster/cluster.yaml --address 10.0.0.1:6379

Rerunning the same command resumes: stored tasks are kept and not trained again.""")
@_config_options
def train(config: str, overrides: tuple[str, ...], address: str | None) -> int:
    """Train every task's mask of CONFIG into the mask registry, then register the bank as a
    new MLflow model version (when its content is new)."""
    return commands.train(config, overrides, address)


@cli.command(short_help="Task inference on a bank or a model version; accuracy report.",
             epilog="""\b
Examples:
  supsup evaluate configs/quickstart.yaml
  supsup evaluate models:/quickstart@champion --tracking-uri sqlite:///runs/mlflow.db
  supsup evaluate models:/quickstart/3 --config configs/quickstart.yaml
  supsup evaluate models:/quickstart/3 --promote-if 'accuracy_gn>=0.9'""")
@click.argument("target")
@click.option("--promote-if", "promote_if", metavar="RULE",
              help="When TARGET is a model version: move the promotion alias (--alias, default "
                   "the config's tracking.alias) to it if the evaluation meets RULE, METRIC OP "
                   "NUMBER with OP one of >= > <= < ==, e.g. 'accuracy_gn>=0.9'; exit status "
                   "1 when the evaluation does not meet it.")
@click.option("--alias", metavar="ALIAS", help="The alias --promote-if moves.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="Config for the data when TARGET is a model URI (default: the config logged "
                   "with the model's run).")
@click.option("--tracking-uri", metavar="URI",
              help="MLflow tracking URI holding the model (default: the config's, else "
                   "MLFLOW_TRACKING_URI).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override one config value, e.g. --set evaluate.group_size=50 (repeatable).")
@click.option("--address", metavar="ADDRESS", help="Join the Ray cluster at ADDRESS.")
@_format_option
def evaluate(target: str, promote_if: str | None, alias: str | None, config_path: str | None,
             tracking_uri: str | None, overrides: tuple[str, ...], address: str | None,
             fmt: Format) -> int:
    """Run task inference on a bank and report accuracy. TARGET is a CONFIG (its bank in the
    mask registry, as stored now) or a model URI models:/NAME@ALIAS or models:/NAME/VERSION
    (exactly the masks that version registered)."""
    return evaluation_commands.evaluate(target, config_path, overrides, tracking_uri, address,
                                        promote_if=promote_if, alias=alias, fmt=fmt)


@cli.command(short_help="Move the promotion alias (champion) to a model version.", epilog="""\b
Examples:
  supsup promote models:/quickstart/2 --tracking-uri sqlite:///runs/quickstart/mlflow.db
  supsup promote models:/quickstart@latest --alias staging --config configs/quickstart.yaml

The version's bank is loaded and checked first; a version that cannot load is refused.""")
@click.argument("model_uri")
@click.option("--alias", metavar="ALIAS",
              help="The alias to move (default: the config's tracking.alias, else champion).")
@click.option("--tracking-uri", metavar="URI",
              help="MLflow tracking URI (default: --config's, else MLFLOW_TRACKING_URI).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="Read the tracking URI and the alias from this config.")
def promote(model_uri: str, alias: str | None, tracking_uri: str | None,
            config_path: str | None) -> int:
    """Point the promotion alias at MODEL_URI's version, recording on the version which
    evaluation of it (the newest) backs the promotion."""
    return promotion_commands.promote(model_uri, alias, tracking_uri, config_path)


@cli.command(short_help="What a registered model holds, and its lineage.", epilog="""\b
Examples:
  supsup lookup models:/quickstart@champion --tracking-uri sqlite:///runs/mlflow.db
  supsup lookup models:/quickstart/2 --task 7 --config configs/quickstart.yaml""")
@click.argument("model_uri")
@click.option("--task", type=int, metavar="ID",
              help="Show this task's stored record (densities, training metadata) instead.")
@click.option("--tracking-uri", metavar="URI",
              help="MLflow tracking URI (default: --config's, else MLFLOW_TRACKING_URI).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="Read the tracking URI from this config.")
@_format_option
def lookup(model_uri: str, task: int | None, tracking_uri: str | None,
           config_path: str | None, fmt: Format) -> int:
    """What the registered model MODEL_URI holds: bank, snapshot, tasks, where its masks
    live, and its lineage (the runs that trained, registered and evaluated it)."""
    return commands.lookup(model_uri, task, tracking_uri, config_path, fmt)


@cli.command(short_help="Serve a model version over HTTP on Ray Serve, batching requests.",
             epilog="""\b
Examples:
  supsup serve models:/quickstart@champion --tracking-uri sqlite:///runs/mlflow.db
  supsup serve models:/quickstart/3 --config configs/quickstart.yaml --set serve.port=8080
  supsup serve models:/big/1 --tracking-uri http://mlflow:5000 --address 10.0.0.1:6379

POST /invocations {"inputs": [[...784 pixels...]], "params": {"input_scale": "0-255"}}
answers task_id, class and confidence per row; GET /health names the version and snapshot.""")
@click.argument("model_uri")
@click.option("--tracking-uri", metavar="URI",
              help="MLflow tracking URI holding the model (default: --config's, else "
                   "MLFLOW_TRACKING_URI).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="Config whose serve and cluster sections apply (default: their defaults).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override one config value, e.g. --set serve.max_batch_size=64 "
                   "(repeatable).")
@click.option("--address", metavar="ADDRESS", help="Join the Ray cluster at ADDRESS.")
def serve(model_uri: str, tracking_uri: str | None, config_path: str | None,
          overrides: tuple[str, ...], address: str | None) -> int:
    """Serve the registered model MODEL_URI (models:/NAME@ALIAS or models:/NAME/VERSION) on
    Ray Serve until Ctrl-C: its masks are checked against the version's snapshot first, each
    row's task is inferred on its own, and concurrent requests share passes over the bank."""
    from pipeline.serve.command import cmd_serve

    return cmd_serve(model_uri, tracking_uri, config_path, overrides, address)


@cli.command(short_help="Hyper-parameter search with Ray Tune; writes the best config.",
             epilog="""\b
Examples:
  supsup sweep configs/sweep_density.yaml
  supsup sweep configs/sweep_density.yaml --set sweep.num_samples=4

The config's `sweep` section names the space; the best trial's config is written to
RUN_FOLDER/sweep/best.yaml, ready for `supsup train`.""")
@_config_options
def sweep(config: str, overrides: tuple[str, ...], address: str | None) -> int:
    """Search the hyper-parameters of CONFIG's `sweep` space with Ray Tune (ASHA or FIFO),
    one MLflow child run per trial; writes a results table, plots and the best config."""
    from pipeline.jobs.sweep import cmd_sweep

    return cmd_sweep(config, overrides, address)


@cli.command(short_help="The paper's experiments at reduced scale: docs/RESULTS.md.",
             epilog="""\b
Examples:
  supsup results --run                   every experiment at reduced scale (8 minutes on 2 CPUs)
  supsup results --run --only hopfield   one entry
  supsup results                         rebuild docs/RESULTS.md from earlier runs""")
@click.option("--run", "run_first", is_flag=True,
              help="Run every listed experiment first (each as its own supsup process).")
@click.option("--only", metavar="TEXT",
              help="Run only entries whose config path or label contains TEXT.")
@click.option("--out", default="runs/results", show_default=True,
              type=click.Path(file_okay=False), help="Output folder of the runs.")
@click.option("--doc", default="docs/RESULTS.md", show_default=True,
              type=click.Path(dir_okay=False), help="The Markdown file to write.")
def results(run_first: bool, only: str | None, out: str, doc: str) -> int:
    """Run the paper's experiments at reduced scale and write their table (docs/RESULTS.md)
    with date, commit, packages and machine."""
    from pipeline.results import cmd_results

    return cmd_results(run_first, only, out, doc)


@cli.group(cls=_InOrder, context_settings=_SETTINGS,
           short_help="The mask registry: ls, verify, export, import.")
def registry() -> None:
    """The mask registry: list banks, verify their files, export one as a bank file, import a
    bank file."""


_ROOT = click.option("--root", default="runs/registry", show_default=True, metavar="PATH",
                     help="The mask registry: a folder, or s3://bucket/prefix.")


@registry.command("ls", short_help="List the banks and their tasks.", epilog="""\b
Examples:
  supsup registry ls
  supsup registry ls quickstart --root s3://masks/registry""")
@click.argument("bank", required=False)
@_ROOT
@_format_option
def registry_ls(bank: str | None, root: str, fmt: Format) -> int:
    """List the banks under --root (or only BANK): tasks (as ranges), network, seed and mask
    rule."""
    return registry_commands.registry_ls(root, bank, fmt)


@registry.command("verify", short_help="Check every file of a bank.", epilog="""\b
Example:
  supsup registry verify quickstart

Exit status 0 when every file checks out, 1 otherwise.""")
@click.argument("bank")
@_ROOT
@_format_option
def registry_verify(bank: str, root: str, fmt: Format) -> int:
    """Check every file of BANK against its manifest and checksums; the first problems of
    each kind are named (--format json: all of them)."""
    return registry_commands.registry_verify(root, bank, fmt)


@registry.command("export", short_help="Write a bank into one bank file.", epilog="""\b
Example:
  supsup registry export quickstart --dest quickstart.parquet""")
@click.argument("bank")
@click.option("--dest", required=True, type=click.Path(dir_okay=False), metavar="FILE",
              help="Where to write the bank file (.parquet).")
@_ROOT
def registry_export(bank: str, dest: str, root: str) -> int:
    """Write all of BANK, verified, into one bank file that `evaluate` and models can read."""
    return registry_commands.registry_export(root, bank, dest)


@registry.command("import", short_help="Read a bank file into the registry.", epilog="""\b
Examples:
  supsup registry import quickstart.parquet
  supsup registry import quickstart.parquet --root /mnt/shared/registry --bank quickstart-copy

Every row is verified; tasks already stored with identical masks are kept, different masks
under the same task id are refused. Importing again is a no-op.""")
@click.argument("file", metavar="FILE")
@click.option("--bank", metavar="NAME", help="Import under this bank name (default: the "
                                             "exported bank's name).")
@_ROOT
@_format_option
def registry_import(file: str, bank: str | None, root: str, fmt: Format) -> int:
    """Read the bank file FILE (from `supsup registry export`, or a model version's bank file)
    into the mask registry at --root."""
    return registry_commands.registry_import(root, file, bank, fmt)


# Click's name for it: `eval "$(_SUPSUP_COMPLETE=bash_source supsup)"` installs completion.
COMPLETE_VAR = "_SUPSUP_COMPLETE"


def main(argv: list[str] | None = None) -> int:
    """The `supsup` command: exit status 0 on success, 1 for a failed check, 2 for an error."""
    from pipeline.console import Console, error_line, to_log_file_only

    instruction = os.environ.get(COMPLETE_VAR)
    if instruction:  # the shell asks for its completion script, or for completions
        from click.shell_completion import shell_complete

        return shell_complete(cli, {}, "supsup", COMPLETE_VAR, instruction)
    args = _global_flags_first(sys.argv[1:] if argv is None else list(argv))
    try:
        ctx = cli.make_context("supsup", args)
    except click.exceptions.Exit as done:  # --help, --version
        return int(done.exit_code)
    except click.ClickException as err:
        return _usage_error(err)
    quiet, verbose, debug = (bool(ctx.params[k]) for k in ("quiet", "verbose", "debug"))
    # MLflow's HTTP retries back off for minutes by default; a dead server should fail in
    # seconds (users may still set these themselves).
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    previous = signal.signal(signal.SIGTERM, _terminate)
    with Console(quiet=quiet, verbose=verbose):
        try:
            with ctx:
                return int(cli.invoke(ctx) or 0)
        except click.exceptions.Exit as done:  # a sub-command's --help
            return int(done.exit_code)
        except click.ClickException as err:
            return _usage_error(err)
        except BrokenPipeError:  # `supsup ... | head`: the reader left; say nothing more
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return 141
        except (KeyboardInterrupt, click.exceptions.Abort):
            if debug:
                raise
            log.debug("interrupted", exc_info=True)
            print("error: interrupted; tasks already stored are kept, rerun the same command "
                  "to resume", file=sys.stderr)
            return 130
        except Exception as err:  # noqa: BLE001  (the one boundary: every failure is one line)
            if debug:
                raise
            to_log_file_only("the command failed")  # the traceback, in the log file
            print(f"error: {error_line(describe_error(err))}", file=sys.stderr)
            return 2
        finally:
            signal.signal(signal.SIGTERM, previous)


_GLOBAL_FLAGS = frozenset({"-q", "--quiet", "-v", "--verbose", "--debug"})


def _global_flags_first(args: list[str]) -> list[str]:
    """`supsup run CONFIG -v` means `supsup -v run CONFIG`: the global flags are taken wherever
    they are typed (before a `--`, after which everything is an argument)."""
    end = args.index("--") if "--" in args else len(args)
    head, tail = args[:end], args[end:]
    return ([a for a in head if a in _GLOBAL_FLAGS] + [a for a in head if a not in _GLOBAL_FLAGS]
            + tail)


def _usage_error(err: click.ClickException) -> int:
    """A usage mistake as one error line, naming the command whose --help explains it; a
    command typed without its arguments prints its help."""
    ctx = getattr(err, "ctx", None)
    if isinstance(err, getattr(click.exceptions, "NoArgsIsHelpError", ())) and ctx is not None:
        click.echo(ctx.get_help())
        return 2
    where = ctx.command_path if ctx is not None else "supsup"
    print(f"error: {err.format_message()} (see `{where} --help`)", file=sys.stderr)
    return 2


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
