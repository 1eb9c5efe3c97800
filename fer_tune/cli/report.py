"""`fer-tune report`: a study's results as one offline HTML file (fer_tune.report)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import log, parser_with


def cmd_report(args: argparse.Namespace) -> int:
    from ..report import write_report

    path = write_report(args.study, args.out)
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
    p.add_argument("--out", default=None, metavar="FILE", help="where to write it (default: STUDY/report.html)")
    p.set_defaults(func=cmd_report)
