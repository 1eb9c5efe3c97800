"""`fer-tune`: thin commands over the package. User mistakes -> one clear message on stderr, exit 2."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
from typing import NoReturn

from .. import __version__
from ..common import EMOTIONS, SQLITE_FULL, FerTuneError
from . import cluster, demo, final, pbt, predict, report, slurm, status, study, tools, train
from .common import add_read_options, examples, load_data, parser_with


# ---------------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------------
def cmd_data_check(args: argparse.Namespace) -> int:
    data = load_data(args, args.protocol or "paper")
    counts = data.counts()
    if args.json:
        print(
            json.dumps(
                {
                    "format": data.format,
                    "protocol": data.protocol,
                    "protocol_note": data.protocol_note,
                    "source": data.source,
                    "fingerprint": data.fingerprint,
                    "skipped": len(data.skipped),
                    "splits": counts,
                },
                indent=2,
            )
        )
        return 0
    print(f"source:   {data.source} ({data.format})")
    print(f"protocol: {data.protocol}: {data.protocol_note}")
    print(f"fingerprint: {data.fingerprint}")
    width = max(len(e) for e in EMOTIONS)
    print(f"{'split':<6} {'total':>7}  " + "  ".join(f"{e:>{width}}" for e in EMOTIONS))
    for split, c in counts.items():
        print(f"{split:<6} {c['total']:>7,}  " + "  ".join(f"{c['per_class'][e]:>{width},}" for e in EMOTIONS))
    return 0


def cmd_data_synth(args: argparse.Namespace) -> int:
    from ..formats import write_csv
    from ..synthetic import generate_dataset_arrays

    if args.n < 1:
        raise FerTuneError("--n must be >= 1")
    images, labels, usage = generate_dataset_arrays(args.n, args.seed)
    write_csv(args.out, images, labels, usage)
    print(f"wrote {args.n:,} synthetic faces (seed {args.seed}) to {args.out}")
    return 0


def cmd_data_convert(args: argparse.Namespace) -> int:
    from ..data import origins_as_usage
    from ..formats import write_csv

    if str(args.out).endswith((".csv", ".csv.gz")) is False:
        raise FerTuneError(f"output {args.out} must end in .csv or .csv.gz")
    data = load_data(args, args.protocol or "paper")
    write_csv(args.out, data.images, data.labels, origins_as_usage(data))
    print(f"wrote {len(data.labels):,} rows to {args.out} (Usage from protocol {data.protocol}: {data.protocol_note})")
    return 0


# ---------------------------------------------------------------------------------------------------------
# parser
# ---------------------------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """argparse with its errors in one line, as fer-tune's own: `fer-tune: error: MESSAGE (see fer-tune CMD
    --help)`, exit 2 (its subcommands' parsers are of this class too)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"fer-tune: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fer-tune",
        description="Hyperparameter studies for facial-emotion recognition (FER2013) with Ray Tune and Optuna.",
        epilog=examples("""
            fer-tune data check PATH/TO/fer2013
            fer-tune train --set width=0.25 --set epochs=5 --out results/first-run
            fer-tune sweep search_spaces/smoke.yaml
            fer-tune status results/smoke
            fer-tune <command> --help
        """),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"fer-tune {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    data = parser_with(
        sub,
        "data",
        "check, convert or synthesize datasets",
        """
        fer-tune data check fer2013.csv --protocol standard
        fer-tune data synth synthetic.csv --n 10000
    """,
    )
    dsub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    data.set_defaults(func=lambda a: (data.print_help(), 2)[1])

    check = parser_with(
        dsub,
        "check",
        "validate a dataset and print per-split, per-class counts",
        """
        fer-tune data check PATH/TO/fer2013
        fer-tune data check fer2013.csv.gz --protocol standard --json
        fer-tune data check synthetic:20000
    """,
    )
    check.add_argument("data", metavar="PATH", help="fer2013.csv(.gz), a Kaggle folder, or synthetic[:N[:SEED]]")
    check.add_argument(
        "--protocol",
        choices=("paper", "standard"),
        default="paper",
        help="split protocol: paper (val = PrivateTest, test = PublicTest) or standard",
    )
    check.add_argument("--json", action="store_true", help="print JSON")
    add_read_options(check)
    check.set_defaults(func=cmd_data_check)

    synth = parser_with(
        dsub,
        "synth",
        "write the synthetic faces in the challenge CSV format",
        """
        fer-tune data synth synthetic.csv --n 10000 --seed 1
    """,
    )
    synth.add_argument("out", metavar="OUT.csv", help="the CSV to write")
    synth.add_argument("--n", type=int, default=10000, help="number of faces (default 10000)")
    synth.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    synth.set_defaults(func=cmd_data_synth)

    convert = parser_with(
        dsub,
        "convert",
        "convert a dataset (e.g. Kaggle folders) to the challenge CSV",
        """
        fer-tune data convert PATH/TO/fer2013 fer2013.csv
    """,
    )
    convert.add_argument("data", metavar="PATH", help="fer2013.csv(.gz), a Kaggle folder, or synthetic[:N[:SEED]]")
    convert.add_argument("out", metavar="OUT.csv", help="the CSV to write (.csv or .csv.gz)")
    convert.add_argument(
        "--protocol",
        choices=("paper", "standard"),
        default="paper",
        help="names images without a challenge prefix by this protocol's splits",
    )
    add_read_options(convert)
    convert.set_defaults(func=cmd_data_convert)

    for commands in (train, study, status, report, cluster, slurm, final, pbt, predict, demo, tools):
        commands.register(sub)
    return parser


class _Stderr(logging.StreamHandler):
    """A handler that writes to whatever sys.stderr is when a record comes (a test may have replaced it)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _configure_logging() -> None:
    """fer-tune's progress and warnings on stderr, as plain lines (results go to stdout); --quiet silences Tune's
    tables, not these few lines. Set once per process: the `fer_tune` logger gets one handler."""
    logger = logging.getLogger("fer_tune")
    if not any(isinstance(h, _Stderr) for h in logger.handlers):
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def disk_full(exc: BaseException) -> str | None:
    """What to say when `exc` (or an error it led to) is a full disk: the file and the filesystem's free space
    where known, and what to do; None for any other error."""
    import errno
    import shutil

    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            break
        if SQLITE_FULL in str(cause):  # optuna.db on the full disk
            break
        cause = cause.__cause__ or cause.__context__
    else:
        return None
    name = getattr(cause, "filename", None)
    where = ""
    if name:
        try:
            free = shutil.disk_usage(os.path.dirname(os.path.abspath(name))).free
            where = f" writing {name} ({free / 2**20:.1f} MiB free on its filesystem)"
        except OSError:
            where = f" writing {name}"
    else:  # sqlite's and some libraries' errors name no file: the filesystem of the study being written
        from ..tune.study.record import working_on

        sdir = working_on()
        try:
            if sdir is not None:
                where = f" (the study {sdir}: {shutil.disk_usage(sdir).free / 2**20:.1f} MiB free on its filesystem)"
        except OSError:
            pass
    return (
        f"no space left on device{where}: the command stopped; free some space (or a quota) on the results' or "
        "the Ray storage's filesystem, then continue it: fer-tune resume STUDY (or the same final/pbt command)"
    )


def damaged_database(exc: BaseException) -> str | None:
    """What to say when `exc` (or an error it led to) is sqlite finding the study's Optuna database damaged while a
    command read or wrote it; None for any other error."""
    import sqlite3

    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, sqlite3.DatabaseError) and any(
            words in str(cause) for words in ("malformed", "not a database")
        ):
            from ..tune.study.record import working_on

            sdir = working_on()
            study = f"fer-tune repair {sdir}" if sdir else "fer-tune repair STUDY"
            return (
                f"the study's Optuna database is damaged ({cause}); rebuild it from the trials' own results with: "
                f"{study}"
            )
        cause = cause.__cause__ or cause.__context__
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # said for the command they were given to, not for fer-tune as a whole
        words = ["fer-tune", getattr(args, "command", None)]
        words.append(getattr(args, f"{words[1]}_command", None) if words[1] else None)
        prog = " ".join(w for w in words if w)
        print(f"fer-tune: error: unrecognized arguments: {' '.join(extra)} (see {prog} --help)", file=sys.stderr)
        return 2
    from ..tune.runtime import lock

    lock.COMMAND = shlex.join(["fer-tune", *(sys.argv[1:] if argv is None else argv)])
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    _configure_logging()
    try:
        return int(args.func(args) or 0)
    except FerTuneError as exc:
        if args.debug:
            raise
        print(f"fer-tune: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `fer-tune status | head`: the reader has gone; no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        from ..tune.runtime.signals import exit_code

        print("fer-tune: interrupted", file=sys.stderr)
        return exit_code()
    except Exception as exc:
        full, damaged = disk_full(exc), damaged_database(exc)
        if (full is None and damaged is None) or args.debug:
            raise
        print(f"fer-tune: error: {full or damaged}", file=sys.stderr)
        return 130 if full else 2
