"""What the commands share: the parser helpers, the data options and the data loader, the Ray options."""

from __future__ import annotations

import argparse
import logging
import textwrap
from collections.abc import Callable
from typing import Any

log = logging.getLogger("fer_tune.cli")


def examples(text: str) -> str:
    return "examples:\n" + textwrap.indent(textwrap.dedent(text).strip(), "  ")


def parser_with(
    sub: Any, name: str, help: str, example_text: str, details: str = "", **kw: Any
) -> argparse.ArgumentParser:
    """A subcommand whose --help shows `help`, `details` (a paragraph, wrapped) and the examples."""
    import textwrap

    p = sub.add_parser(
        name,
        help=help,
        description=help + ("\n\n" + textwrap.fill(details, 100) if details else ""),
        epilog=examples(example_text),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        **kw,
    )
    # after the command too (fer-tune status STUDY --debug); SUPPRESS: not given here, `fer-tune --debug ...` stands
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks for errors")
    return p


def add_data_options(
    p: argparse.ArgumentParser,
    *,
    data: bool = True,
    protocol: bool = True,
    default: str = "synthetic",
    default_protocol: str = "the config's, paper",
) -> None:
    """--data (and --protocol) with the options of how a dataset is read; `default`, `default_protocol`: what they
    default to, as --help says it."""
    if data:
        p.add_argument(
            "--data",
            default=None,
            metavar="PATH",
            help=f"fer2013.csv(.gz), a Kaggle folder (train/, test/), or synthetic[:N[:SEED]] (default: {default})",
        )
    if protocol:
        p.add_argument(
            "--protocol",
            choices=("paper", "standard"),
            default=None,
            help=f"split protocol (default: {default_protocol})",
        )
    add_read_options(p)


def add_read_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-dir", default=None, help="where parsed datasets are cached (default ~/.cache/fer-tune)")
    p.add_argument("--resize", action="store_true", help="resize images that are not 48x48 instead of refusing them")
    p.add_argument("--skip-bad-rows", action="store_true", help="drop bad rows/files and report them")


def add_ray_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--address",
        default=None,
        help="join a running Ray cluster (auto, ray://HOST:10001); default: start a local Ray",
    )
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs the local Ray may use (default: all)")
    add_output_options(p)


def add_output_options(p: argparse.ArgumentParser) -> None:
    """How much a run says: a line per trial event (default), --quiet, or Tune's own tables (--verbose)."""
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--quiet", action="store_true", help="no per-trial progress lines (only the start, the end and what goes wrong)"
    )
    g.add_argument("--verbose", action="store_true", help="Tune's own progress tables in place of fer-tune's lines")


def output_mode(args: argparse.Namespace) -> str:
    """--quiet / --verbose / neither as fer_tune.tune.runtime.session.OUTPUTS names it."""
    return "quiet" if args.quiet else "tables" if args.verbose else "progress"


def load_data(args: argparse.Namespace, protocol: str, source: str | None = None) -> Any:
    """The dataset `source` (default --data) with this command's read options; skipped rows reported on stderr."""
    from ..data import load

    data = load(
        args.data if source is None else source,
        protocol,
        cache_dir=args.cache_dir,
        resize=args.resize,
        skip_bad_rows=args.skip_bad_rows,
    )
    if data.skipped:
        log.warning("skipped %d bad rows/files:", len(data.skipped))
        for line in data.skipped[:20]:
            log.warning("  %s", line)
        if len(data.skipped) > 20:
            log.warning("  ... and %d more", len(data.skipped) - 20)
    return data


def loader(args: argparse.Namespace) -> Callable[[str, str], Any]:
    """(source, protocol) -> FerData with this command's read options (what the study layer calls)."""
    return lambda source, protocol: load_data(args, protocol, source)


def run_options(args: argparse.Namespace) -> Any:
    """How this command runs a stage (fer_tune.tune.runtime.stage.RunOptions), from its options."""
    from ..tune.runtime.stage import RunOptions

    return RunOptions(
        loader=loader(args),
        address=getattr(args, "address", None),
        output=output_mode(args),
        num_cpus=getattr(args, "num_cpus", None),
        force=getattr(args, "force", False),
        mlflow=getattr(args, "mlflow", None),
    )


def add_force_option(p: argparse.ArgumentParser) -> None:
    """--force of a stage after the study (final, pbt): run although its inputs changed or a lock says otherwise."""
    p.add_argument(
        "--force",
        action="store_true",
        help="run although the study's data or space changed, or although "
        "its directory's lock was recorded by a command on another machine (check it has ended)",
    )


def add_mlflow_option(p: argparse.ArgumentParser, default: str) -> None:
    """--mlflow URI (fer_tune.tune.mlflow.tracking); `default`: what it is when not given, as --help says it."""
    p.add_argument(
        "--mlflow",
        default=None,
        metavar="URI",
        help="track the trials in MLflow (a run per trial, the final stage's run with the model files, in an "
        "experiment named after the study): a directory or file:///PATH (an MLflow file store), "
        "http(s)://HOST:PORT (a tracking server; checked before anything starts), or env:VAR naming an "
        "environment variable that holds one, e.g. with credentials (never written nor printed); off: no "
        f"tracking. Recorded in study.json (default: {default})",
    )
