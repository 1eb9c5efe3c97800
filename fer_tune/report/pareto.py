"""The multi-objective study's section of the report: the Pareto front of its objectives (accuracy against a
model's cost, fer_tune.cost), the trials on it, and which one the final stage takes.

Optuna's own plot_pareto_front draws the completed trials (the front's in their own colour); the trial that
`fer-tune final` takes (or took) is marked on it.
"""

from __future__ import annotations

import warnings

from ..cost import COST_METRICS
from ..tune.study.outputs import objective_value
from ..tune.study.record import StudyRecord
from ..tune.study.spec import objectives
from .html import Page, esc, fmt, params_text, table

UNITS = {"params": "params (M)", "mflops": "MFLOPs / crop", "latency_ms": "latency (ms / image)"}


def pareto_section(
    page: Page, record: StudyRecord, study, rows: list[dict], best: dict | None, final: dict | None
) -> None:
    """The front (figure and table) of a multi-objective study; nothing for a single objective. `study`: the
    Optuna study (None when its storage cannot be read), `best`: the trial the final stage takes by default,
    `final`: the final stage as fer_tune.report.final.load_final reads it, if there is one."""
    spec = record["spec"]
    goals = objectives(spec)
    if len(goals) < 2:
        return
    first = goals[0][0]
    parts = page.section("pareto", "Pareto front: " + " against ".join(f"{m} ({mode})" for m, mode in goals))
    front = sorted((r for r in rows if r.get("pareto") == "yes"), key=lambda r: -float(r[f"best_{first}"]))
    retrained = ((final or {}).get("info") or {}).get("trial")  # the final stage's final.json, when it has one
    taken = retrained["number"] if retrained else (best["number"] if best else None)
    parts.append(
        '<p class="note" id="pareto-note">A trial is on the front when no other completed trial is at least as good '
        "in every objective and better in one. Early stopping needs one number, so it ranks trials by the first "
        f"objective ({esc(first)}) alone: a trial it stopped early has no values and is not on the front, and a "
        "cheap model that learns slowly may be stopped before it shows its trade-off."
        + (
            " latency_ms is measured (one image, its test crops, batch 1, on the trial's device) and moves by tens "
            "of percent on machines whose cores or GPU other trials share; params and mflops are counted."
            if "latency_ms" in dict(goals)
            else ""
        )
        + "</p>"
    )
    if study is not None and front:
        parts.append(_figure(page, study, goals, taken))
    if not front:
        parts.append('<p class="note">No trial has completed yet, so there is no front.</p>')
        return
    header = ["trial", *(UNITS.get(m, m) for m, _ in goals), "params"]
    table_rows = [
        [r["number"], *(fmt(_num(objective_value(r, m, first)), 4) for m, _ in goals), params_text(r)] for r in front
    ]
    marked = {k for k, r in enumerate(front) if str(r["number"]) == str(taken)}
    parts.append(table(header, table_rows, set(range(len(goals) + 1)), marked, id="pareto-table"))
    if retrained:
        what = (
            f"The final stage retrained trial {retrained['number']}"
            + (" (highlighted)" if marked else " (not on the front: it was picked with --trial)")
            + "."
        )
    elif taken is not None:
        what = (
            f"<code>fer-tune final</code> takes trial {taken} (highlighted), the front's best {esc(first)}; "
            "<code>fer-tune final STUDY --trial N</code> retrains any other point."
        )
    else:
        what = ""
    parts.append(f'<p class="note" id="pareto-final">{what}</p>')


def _num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


def _figure(page: Page, study, goals: list[tuple[str, str]], taken: int | None) -> str:
    import optuna.visualization as vis

    names = [UNITS.get(m, m) if m in COST_METRICS else m for m, _ in goals]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if len(goals) <= 3:
                fig = vis.plot_pareto_front(study, target_names=names)
            else:  # Optuna draws 2 or 3 objectives: the first two (their own front)
                fig = vis.plot_pareto_front(study, target_names=names[:2], targets=lambda t: t.values[:2])
    except Exception as exc:  # noqa: BLE001 (Optuna raises several types; the report must still be written)
        return f'<p class="note">Pareto front plot not available: {esc(type(exc).__name__)}: {esc(exc)}</p>'
    trial = next((t for t in study.get_trials(deepcopy=False) if t.number == taken and t.values), None)
    if trial is not None and len(goals) == 2:
        fig.add_annotation(
            x=trial.values[0],
            y=trial.values[1],
            text=f"final: trial {trial.number}",
            showarrow=True,
            arrowhead=2,
        )
    fig.update_layout(title="Pareto front (completed trials)")
    return page.figure(fig, "pareto")
