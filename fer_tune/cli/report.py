"""`fer-tune report`: a study's results as one offline HTML file (fer_tune.report)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import log, parser_with


def cmd_report(args: argparse.Namespace) -> int:
    from ..common import FerTuneError
    from ..report import write_report

    out = Path(args.out).expanduser() if args.out else None
    if out is not None and out.is_dir():  # as cp takes one: the file goes in it
        out = out / "report.html"
    if out is not None:  # its folders are made as needed, but not through a file
        found = next((d for d in (out.parent, *out.parent.parents) if d.exists()), None)
        if found is not None and not found.is_dir():
            raise FerTuneError(f"--out {args.out}: {found} is a file, not a directory")
    try:
        path = write_report(args.study, out)
    except OSError as exc:
        if out is None or exc.filename is None or Path(exc.filename).parent != out.parent:
            raise
        raise FerTuneError(f"--out {args.out}: the report cannot be written there ({exc.strerror})") from None
    print(f"report: {path.resolve()}")
    return 0


def refresh_report(study_dir: str | Path) -> None:
    """After sweep / resume / extend / final: rewrite results/NAME/report.html and say where it is. A report that
    cannot be written is a warning, not the command's failure (its results are safe on disk)."""
    from ..common import FerTuneError
    from ..report import write_report

    if not (Path(study_dir) / "study.json").is_file():
        return
    try:
        path = write_report(study_dir)
    except (FerTuneError, OSError, ValueError, KeyError) as exc:
        log.warning("fer-tune: warning: the report was not written: %s; try fer-tune report %s", exc, study_dir)
        return
    print(f"report: {path.resolve()}", flush=True)  # where the result is: stdout


def register(sub: argparse._SubParsersAction) -> None:
    p = parser_with(
        sub,
        "report",
        "write a study's results as one HTML file (plotly; opens offline)",
        """
        fer-tune report results/smoke
        fer-tune report results/joint --out ~/joint.html
    """,
    )
    p.add_argument("study", help="the study directory (results/NAME)")
    p.add_argument(
        "--out",
        default=None,
        metavar="FILE|DIR",
        help="where to write it: a file, or a directory to write report.html in (default: STUDY/report.html)",
    )
    p.set_defaults(func=cmd_report)
