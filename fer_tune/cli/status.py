"""`fer-tune status`: a study's trials, the best marked, and the decision summary the report opens with."""

from __future__ import annotations

import argparse
import json

from .common import parser_with
from .pbt import print_pbt

WIDTH = 100  # columns the table and the summary keep to without --wide
TOP = 20  # trials the table shows without --all: the best by the metric, and those running
MARKS = (("*", "best (fer-tune final takes it)"), ("=", "tie (inside the best's 95 % interval)"), ("x", "collapsed"))


def cmd_status(args: argparse.Namespace) -> int:
    from ..report.decision import decide
    from ..report.decision_words import wrapped
    from ..report.final import load_final
    from ..tune.runtime.lock import running_line
    from ..tune.study.outputs import status_summary, study_results
    from ..tune.study.record import read_study

    record = read_study(args.study)
    scanned = study_results(args.study, record)
    s = status_summary(args.study, record, scanned)
    facts = decide(args.study, record, s, scanned[0], load_final(args.study))
    if args.json:
        from ..tune.pbt.read import stage

        pbt = stage(args.study)  # the PBT stage, when the study has one
        if pbt is not None:
            s["pbt"] = {k: pbt[k] for k in ("record", "members", "clones", "metrics", "replay", "running")}
        s["decision"] = facts
        from ..tune.slurm.job import study_job

        s["slurm_job"] = study_job(record)  # the SLURM job of the last session, while squeue knows it
        print(json.dumps(s, indent=2, default=str))
        return 0
    print(f"study {s['name']} ({s['directory']}):")
    print(
        f"  {s['finished']}/{s['num_samples']} trials finished "
        f"({', '.join(f'{n} {k}' for k, n in sorted(s['states'].items())) or 'none yet'}); "
        f"{s['epochs_trained']} epochs trained, {s['device_hours']:.3f} device-hours"
    )
    for what, info in s["running"].items():
        print(running_line(what, info))
    from ..tune.slurm.job import study_job_line

    if job := study_job_line(record):  # a study run by `fer-tune slurm`: its job's state in SLURM's queue
        print(job)
    marks = _marks(facts)
    shown = s["rows"] if args.all else _top(s, marks)
    for line in _table({**s, "rows": shown}, marks, wide=args.wide):
        print(line)
    if len(shown) < len(s["rows"]):
        print(f"({len(s['rows']) - len(shown)} more trials: --all)")
    used = {m for m in marks.values()}
    legend = "  ".join(f"{m} {what}" for m, what in MARKS if m in used)
    if s["objectives"][1:]:
        legend += f"{'  ' if legend else ''}front: on the Pareto front of " + ", ".join(
            f"{m} {o}" for m, o in s["objectives"]
        )
    if legend:
        print(legend)
    print()
    lines = wrapped(facts, 10**6 if args.wide else WIDTH)
    print("\n".join(lines[:-1]))
    print(
        f"report: {facts['report']}" if facts["report"] else f"report: not written yet (fer-tune report {args.study})"
    )
    print(lines[-1])  # the next command
    print_pbt(args.study)
    return 0


def _top(s: dict, marks: dict[int, str]) -> list[dict]:
    """The rows worth a line in a large study, in trial order: the TOP best by the metric, the marked ones (the
    best, its ties, the collapsed) and every trial that is not finished."""
    from ..tune.study.outputs import ranked

    rows = s["rows"]
    if len(rows) <= TOP:
        return rows
    keep = {r["number"] for r in ranked(rows, *s["objectives"][0])[:TOP]} | set(marks)
    keep |= {r["number"] for r in rows if r["state"] not in ("COMPLETE", "PRUNED", "FAIL")}
    return [r for r in rows if r["number"] in keep]


def _marks(facts: dict) -> dict[int, str]:
    """{trial number: mark}: the best, its ties, the collapsed trials."""
    marks = {c["trial"]: "x" for c in facts["collapsed"]}
    marks.update({t["trial"]: "=" for t in facts["ties"]})
    if facts["winner"]:
        marks[facts["winner"]["trial"]] = "*"
    return marks


def _table(s: dict, marks: dict[int, str], *, wide: bool) -> list[str]:
    """The trials, one line each: every column as wide as its widest value; the parameters that fit in WIDTH
    columns (all of them with `wide`)."""
    from ..tune.study.outputs import objective_value

    metric, rows = s["metric"], s["rows"]
    params = [k for k in (rows[0] if rows else {}) if k.startswith("param_")]
    sw = max([len("status"), *(len(r["status"]) for r in rows)])
    others = [m for m, _ in s["objectives"][1:]]  # a multi-objective study's other objectives, and its front
    head = f"  {'#':>4} {'status':<{sw}} {'epochs':>6}{'best ' + metric:>14}" + "".join(f"{m:>12}" for m in others)
    head += "  front" if others else ""
    body = []
    for r in rows:
        best = f"{r['best_' + metric]:.2f}" if r["best_" + metric] != "" else "-"
        line = f"{marks.get(r['number'], ' ')} {r['number']:>4} {r['status']:<{sw}} {r['epochs']:>6}{best:>14}"
        line += "".join(f"{_fmt(objective_value(r, m, metric)):>12}" for m in others)
        line += f"  {'*' if r.get('pareto') == 'yes' else ' ':<5}" if others else ""
        body.append(line)
    cols, left = [], 0
    width = max([len(head), *(len(b) for b in body)])
    for p in params:
        w = max([len(p) - 6, *(len(_fmt(r[p])) for r in rows)])
        if not wide and width + 2 + w > WIDTH:
            left = len(params) - len(cols)
            break
        cols.append((p, w))
        width += 2 + w
    out = [(head + "".join(f"  {p[6:]:<{w}}" for p, w in cols)).rstrip()]
    for b, r in zip(body, rows):
        out.append((b.ljust(len(head)) + "".join(f"  {_fmt(r[p]):<{w}}" for p, w in cols)).rstrip())
    if left:
        out.append(f"({left} more parameter{'s' if left > 1 else ''} left out to fit {WIDTH} columns: --wide)")
    return out


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v) if v != "" else "-"


def register(sub: argparse._SubParsersAction) -> None:
    p = parser_with(
        sub,
        "status",
        "trials, states, the best marked, ties, collapsed trials, final stage and the next command",
        """
        fer-tune status results/joint
        fer-tune status results/joint --wide      # every parameter, lines as long as they need
        fer-tune status results/joint --all       # every trial (default: the best 20, the marked, the unfinished)
        fer-tune status results/joint --json
    """,
    )
    p.add_argument("study", help="the study directory (results/NAME); never disturbs a command running it")
    p.add_argument(
        "--wide", action="store_true", help=f"every parameter column and unwrapped lines (default: {WIDTH} columns)"
    )
    p.add_argument(
        "--all",
        action="store_true",
        help=f"every trial (default: the best {TOP} by the metric, the "
        "marked ones and those not finished, when the study has more)",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print everything as JSON (the rows of trials.csv, who runs the study now, the decision summary)",
    )
    p.set_defaults(func=cmd_status)
