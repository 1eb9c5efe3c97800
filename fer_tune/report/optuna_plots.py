"""The report's Optuna section: Optuna's own plots of the study's storage, each where it means something.

The optimization history shows the pruned trials too, at their last reported value (Optuna leaves them out, and
with them the region early stopping cut short). Importance and contour need MIN_FOR_SURFACE completed trials: below
that a sentence stands in their place (a ranking or a surface fitted through a handful of points looks certain
and is not). Accuracy axes carry their unit and the chance and majority-class lines."""

from __future__ import annotations

import warnings

from ..tune.study.record import StudyRecord
from ..tune.study.spec import objectives
from .guides import add_lines, pct_title
from .html import Page, esc

MIN_FOR_SURFACE = 10  # completed trials below which importance and contour are not drawn
FEW_FOR_IMPORTANCE = 20  # completed trials below which the report says the importances are only a hint
PRUNED_STYLE = {"symbol": "x", "size": 9, "color": "#ff7f0e"}


def optuna_section(page: Page, record: StudyRecord, study, unread, lines: list[tuple[float, str]]) -> None:
    import optuna.visualization as vis
    from optuna.trial import TrialState

    parts = page.section("optuna", "Optuna: history, parallel coordinates, importance, slice, contour")
    if study is None:
        parts.append(
            f'<p class="note">The Optuna storage cannot be read here ({esc(unread)}); its plots are left out.</p>'
        )
        return
    # a multi-objective study: the plots show the first objective (the one early stopping used)
    multi = len(objectives(record["spec"])) > 1
    first = {"target": (lambda t: t.values[0])} if multi else {}
    target = pct_title(record["spec"]["metric"], lines)
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not done:
        parts.append('<p class="note">No trial has completed yet: Optuna plots need completed trials.</p>')
        return
    pruned = [] if multi else study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))
    varied = [p for p in record["spec"]["space"] if len({repr(t.params.get(p)) for t in done if p in t.params}) > 1]
    figs = [
        ("optuna-history", lambda: _history(vis, study, record["name"], target, first, pruned)),
        ("optuna-parallel", lambda: vis.plot_parallel_coordinate(study, target_name=target, **first)),
    ]
    top = varied
    why = ""
    few = f"{len(done)} completed trial{'s' if len(done) > 1 else ''}; it needs at least {MIN_FOR_SURFACE}"
    if len(done) < 2:
        why = f"only {len(done)} trial has completed (importance needs at least 2)"
    elif not varied:
        why = "no searched parameter took more than one value among the completed trials"
    elif len(done) < MIN_FOR_SURFACE:
        why = f"{few}: with fewer, which parameter mattered cannot be told apart from the noise of a few trials"
    else:
        # imported here only: optuna.importance imports scikit-learn (a second of a report's few)
        from optuna.importance import PedAnovaImportanceEvaluator, get_param_importances

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                imp = get_param_importances(study, evaluator=PedAnovaImportanceEvaluator(), params=varied, **first)
            top = sorted(varied, key=lambda p: -imp.get(p, 0.0))
            figs.append(
                (
                    "optuna-importance",
                    lambda: vis.plot_param_importances(
                        study, evaluator=PedAnovaImportanceEvaluator(), params=varied, target_name=target, **first
                    ),
                )
            )
        except Exception as exc:  # noqa: BLE001 (Optuna raises several types; the report must still be written)
            why = f"Optuna could not compute it ({type(exc).__name__}: {exc})"
    if top:
        figs.append(("optuna-slice", lambda: vis.plot_slice(study, params=top[:3], target_name=target, **first)))
    for name, make in figs:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fig = make()
        except Exception as exc:  # noqa: BLE001
            parts.append(
                f'<p class="note">{esc(name[7:])} plot not available: {esc(type(exc).__name__)}: {esc(exc)}</p>'
            )
            continue
        if name == "optuna-history":
            add_lines(fig, lines)
        elif name == "optuna-slice":  # one subplot per parameter, each with the lines
            add_lines(fig, lines, **({"row": "all", "col": "all"} if len(top) > 1 else {}))
        parts.append(page.figure(fig, name))
        if name == "optuna-parallel":  # the importance (or why there is none) where it would be
            _importance_note(parts, why, len(done))
    if len(top) >= 2 and len(done) >= MIN_FOR_SURFACE:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                parts.append(
                    page.figure(vis.plot_contour(study, params=top[:2], target_name=target, **first), "optuna-contour")
                )
        except Exception as exc:  # noqa: BLE001
            parts.append(f'<p class="note">contour plot not available: {esc(type(exc).__name__)}: {esc(exc)}</p>')
    elif len(top) >= 2:
        parts.append(
            f'<p class="note" id="contour-note">The contour of {esc(top[0])} and {esc(top[1])} is not shown: {few} '
            "(a surface interpolated through fewer points draws structure that is not there); the slice plot "
            "above shows the trials themselves.</p>"
        )
    parts.append(
        f'<p class="note">{len(done)} completed trial(s)'
        + (f", {len(pruned)} pruned (in the history at their last value, x)" if pruned else "")
        + "; Optuna leaves pruned and failed trials out of its other plots. Top parameters (slice, contour): "
        + f"{esc(', '.join(top[:3]) or '-')}.</p>"
    )


def _importance_note(parts: list[str], why: str, n_done: int) -> None:
    if why:
        parts.append(f'<p class="note" id="importance-note">Hyperparameter importance is not shown: {esc(why)}.</p>')
    elif n_done < FEW_FOR_IMPORTANCE:
        parts.append(
            f'<p class="note" id="importance-note">The importances (PED-ANOVA, below) come from {n_done} completed '
            f"trials: with fewer than {FEW_FOR_IMPORTANCE} a few more trials can reorder them, so read them as a "
            "hint of where to look, not as a ranking.</p>"
        )


def _history(vis, study, name: str, target: str, first: dict, pruned: list):
    """Optuna's optimization history, the pruned trials added at their last reported value."""
    import plotly.graph_objects as go

    fig = vis.plot_optimization_history(study, target_name=target, **first)
    last = [
        (t.number, t.intermediate_values[max(t.intermediate_values)], max(t.intermediate_values))
        for t in pruned
        if t.intermediate_values
    ]
    if last:
        fig.add_trace(
            go.Scatter(
                x=[n for n, _, _ in last],
                y=[v for _, v, _ in last],
                mode="markers",
                name="pruned (last value)",
                marker=PRUNED_STYLE,
                customdata=[e for _, _, e in last],
                hovertemplate="trial %{x}: %{y:.2f} at epoch %{customdata}, then pruned<extra></extra>",
            )
        )
    fig.update_layout(
        title=f"Optimization history of {name}",
        xaxis_title="trial",
        yaxis_title=target,
    )
    return fig
