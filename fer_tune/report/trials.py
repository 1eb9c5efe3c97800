"""The report's figures of the trials: learning curves, the comparisons the study searched (optimizer x scheduler,
scheduler, dropout, architecture) and the class-aware view (per-emotion val recall of the top trials)."""

from __future__ import annotations

from ..common import EMOTIONS
from ..tune.study.outputs import ranked
from .guides import add_lines, pct_title
from .html import Page, fmt, params_text, table

STATUS_STYLE = {  # learning-curve style per trial status: color, dash, end-marker symbol
    "completed": ("#1f77b4", "solid", "circle"),
    "pruned": ("#ff7f0e", "dash", "x"),
    "diverged": ("#d62728", "dot", "x-thin-open"),
    "error": ("#d62728", "dot", "x-thin-open"),
}
RUNNING_STYLE = ("#2ca02c", "dashdot", "circle-open")
COMPARISONS = (
    ("optimizer", "optimizer"),
    ("scheduler", "learning-rate scheduler"),
    ("dropout", "dropout"),
    ("model", "architecture"),
)


TOP_CLASS_TRIALS = 10
TOP_CURVES = 20  # learning curves drawn in full (with their status); a larger study's others are drawn faint


def curves_section(page: Page, spec: dict, rows: list[dict], results: dict, lines: list = ()) -> None:
    """Every trial's metric per epoch, by status, the best in black; `lines`: chance and majority-class rate."""
    import plotly.graph_objects as go

    metric = spec["metric"]
    parts = page.section("curves", f"Learning curves ({metric} per epoch, every trial)")
    fig = go.Figure()
    scored = ranked(rows, metric, spec["mode"])
    best = scored[0] if scored else None
    series = {r["number"]: [x for x in results.get(r["ray_trial_id"], []) if metric in x] for r in rows}
    drawn = [r for r in rows if series[r["number"]]]
    top = {r["number"] for r in scored[:TOP_CURVES]} | {r["number"] for r in drawn if r["state"] == "RUNNING"}
    faint = [r for r in drawn if r["number"] not in top] if len(drawn) > TOP_CURVES else []
    if faint:  # one light trace for the rest: a study of 1,000 trials stays readable (and small)
        xs, ys = [], []
        for r in faint:
            res = series[r["number"]]
            xs += [x["epoch"] for x in res] + [None]
            ys += [x[metric] for x in res] + [None]
        fig.add_trace(
            go.Scatter(
                x=xs,
                y=ys,
                mode="lines",
                name=f"the other {len(faint)} trials",
                line={"color": "rgba(120,120,120,0.25)", "width": 1},
                hoverinfo="skip",
            )
        )
    shown: set[str] = set()
    for r in drawn:
        if faint and r["number"] not in top:
            continue
        res = series[r["number"]]
        # a trial Tune holds as pending or paused while the study runs is drawn as running
        status = "running" if r["state"] == "RUNNING" and r["status"] != "interrupted" else r["status"]
        color, dash, symbol = STATUS_STYLE.get(status, RUNNING_STYLE)
        is_best = best is not None and r["number"] == best["number"]
        label = f"trial {r['number']} ({status})"
        xs, ys = [x["epoch"] for x in res], [x[metric] for x in res]
        fig.add_trace(
            go.Scatter(
                x=xs,
                y=ys,
                mode="lines+markers",
                name=f"best: {label}" if is_best else status,
                legendgroup="best" if is_best else status,
                showlegend=is_best or status not in shown,
                line={"color": "#000" if is_best else color, "dash": dash, "width": 3 if is_best else 1.5},
                marker={"size": [4] * (len(xs) - 1) + [10], "symbol": ["circle"] * (len(xs) - 1) + [symbol]},
                customdata=[[label, params_text(r)]] * len(xs),
                hovertemplate="%{customdata[0]}<br>epoch %{x}: %{y:.2f}<br>%{customdata[1]}<extra></extra>",
            )
        )
        if not is_best:  # the best trial has its own entry: its status still needs one of its own
            shown.add(status)
    if not fig.data:
        parts.append('<p class="note">No trial has reported an epoch yet.</p>')
        return
    title = f"{metric} per epoch; pruned (x) and failed (thin x) trials end early"
    if faint:
        title = f"{metric} per epoch: the best {len(drawn) - len(faint)} of {len(drawn)} trials, the others in grey"
    fig.update_layout(
        title=title,
        height=520,
        xaxis_title="epoch",
        yaxis_title=pct_title(metric, lines),
        legend_title_text="trial status",
    )
    add_lines(fig, list(lines))
    parts.append(page.figure(fig, "curves"))


def comparisons_section(page: Page, spec: dict, rows: list[dict], lines: list = ()) -> None:
    """Per setting the seed's comparisons vary: a bar of its best trial and every trial as a point, n on each."""
    import plotly.graph_objects as go

    metric, key = spec["metric"], f"best_{spec['metric']}"
    pick = max if spec["mode"] == "max" else min
    scored = [r for r in rows if r[key] != ""]
    space = spec["space"]
    parts = page.section("comparisons", f"Comparisons: {metric} per setting, every trial")
    ytitle = pct_title(metric, lines)
    varied = {n for n, _ in COMPARISONS if n in space and len({str(r.get(f"param_{n}")) for r in scored}) > 1}

    full = int(spec["max_epochs"])

    def best_per(name: str, subset: list[dict]) -> dict[str, dict]:
        """Per value of `name`: the best trial's score, its epochs, and how many trials (all / run to the end)."""
        groups: dict[str, list[dict]] = {}
        for r in subset:
            groups.setdefault(str(r[f"param_{name}"]), []).append(r)
        out = {}
        for v, rs in groups.items():
            top = pick(rs, key=lambda r: float(r[key]))
            out[v] = {
                "score": float(top[key]),
                "epochs": int(top["epochs"] or 0),
                "trial": top["number"],
                "n": len(rs),
                "n_full": sum(int(r["epochs"] or 0) >= full for r in rs),
            }
        return out

    def bar(b: dict[str, dict], **kw) -> go.Bar:
        """Bars of best_per: n trials on each; hatched where the best of them stopped before the last epoch."""
        return go.Bar(
            x=list(b),
            y=[g["score"] for g in b.values()],
            text=[
                f"{g['score']:.2f}<br>n={g['n']}" + (f"<br>{g['epochs']} ep" if g["epochs"] < full else "")
                for g in b.values()
            ],
            marker_pattern_shape=["/" if g["epochs"] < full else "" for g in b.values()],
            customdata=[[g["trial"], g["epochs"], g["n"], g["n_full"]] for g in b.values()],
            hovertemplate="%{x}: %{y:.2f} (trial %{customdata[0]}, %{customdata[1]} epochs); %{customdata[2]} "
            f"trials, %{{customdata[3]}} of them ran all {full} epochs<extra></extra>",
            **kw,
        )

    def points(param: str, subset: list[dict], **kw) -> go.Scatter:
        """Every trial of `subset` at its best score over its setting's bar; x: stopped before the last epoch."""
        return go.Scatter(
            x=[str(r[f"param_{param}"]) for r in subset],
            y=[float(r[key]) for r in subset],
            mode="markers",
            marker={
                "color": "#222",
                "size": 8,
                "symbol": ["circle-open" if int(r["epochs"] or 0) >= full else "x-thin-open" for r in subset],
                "line": {"width": 1.5},
            },
            customdata=[[r["number"], r["status"], r["epochs"]] for r in subset],
            hovertemplate="trial %{customdata[0]} (%{customdata[1]}, %{customdata[2]} epochs): %{y:.2f}<extra></extra>",
            **kw,
        )

    if {"optimizer", "scheduler"} <= varied:
        fig = go.Figure()
        for k, sched in enumerate(sorted({str(r["param_scheduler"]) for r in scored})):
            sub = [r for r in scored if str(r["param_scheduler"]) == sched]
            fig.add_trace(bar(best_per("optimizer", sub), name=sched, offsetgroup=sched))
            fig.add_trace(
                points("optimizer", sub, name="every trial", offsetgroup=sched, legendgroup="t", showlegend=not k)
            )
        fig.update_layout(
            barmode="group",
            scattermode="group",
            title=f"{metric} per optimizer x scheduler: the best trial (bar, n trials) and every trial (points)",
            height=420,
            xaxis_title="optimizer",
            yaxis_title=ytitle,
            legend_title_text="scheduler",
        )
        add_lines(fig, list(lines), legend=True)
        parts.append(page.figure(fig, "cmp-optimizer-scheduler"))
    for name, label in COMPARISONS:
        if name not in varied or (name == "optimizer" and "scheduler" in varied):
            continue
        if space[name]["type"] == "float":
            fig = go.Figure()
            for status in sorted({r["status"] for r in scored}):
                sub = [r for r in scored if r["status"] == status]
                fig.add_trace(
                    go.Scatter(
                        x=[r[f"param_{name}"] for r in sub],
                        y=[r[key] for r in sub],
                        mode="markers",
                        name=status,
                        marker={"color": STATUS_STYLE.get(status, RUNNING_STYLE)[0], "size": 9},
                        text=[f"trial {r['number']} ({status})" for r in sub],
                        hovertemplate="%{text}<br>%{x:.4g}: %{y:.2f}<extra></extra>",
                    )
                )
            title = f"{metric} per {label}: every trial"
        else:
            fig = go.Figure([bar(best_per(name, scored), name="best trial"), points(name, scored, name="every trial")])
            fig.update_xaxes(type="category")
            title = f"{metric} per {label}: the best trial (bar, n trials) and every trial (points)"
        fig.update_layout(title=title, height=380, xaxis_title=label, yaxis_title=ytitle)
        add_lines(fig, list(lines), legend=True)
        parts.append(page.figure(fig, f"cmp-{name}"))
    if not scored:
        parts.append('<p class="note">No trial has a value yet.</p>')
    elif not varied:
        parts.append(
            '<p class="note">This study varies none of optimizer, scheduler, dropout and model (the '
            "seed's comparisons); see the Optuna plots for its parameters.</p>"
        )
    else:
        parts.append(
            f'<p class="note">Each bar is the best trial of its setting, at that trial\'s best epoch; n counts the '
            "trials with the setting, each of them a point (o: ran every epoch, x: stopped early). A hatched bar's "
            f"best trial was stopped before epoch {full} (early stopping "
            "or a failure): it stands for fewer epochs than the others, so it does not rank the setting against a "
            f"bar of full-length trials. {len(scored)} trial(s) with a value.</p>"
        )


def class_section(page: Page, spec: dict, rows: list[dict], results: dict) -> None:
    import plotly.graph_objects as go

    key = f"best_{spec['metric']}"
    parts = page.section("classes", "Class-aware view: per-emotion val recall")
    recalls = {}
    for r in rows:
        at = {x["epoch"]: x for x in results.get(r["ray_trial_id"], [])}.get(r["best_epoch"] or -1, {})
        if any(f"val_recall_{e}" in at for e in EMOTIONS):
            recalls[r["number"]] = [at.get(f"val_recall_{e}") for e in EMOTIONS]
    scored = [r for r in ranked(rows, spec["metric"], spec["mode"]) if r["number"] in recalls]
    if not scored:
        parts.append(
            '<p class="note">No trial reported per-class recall (trials trained before fer-tune reported '
            "<code>val_recall_&lt;emotion&gt;</code>, or none has finished an epoch).</p>"
        )
        return
    top = scored[:TOP_CLASS_TRIALS]
    z = [recalls[r["number"]] for r in top]
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=list(EMOTIONS),
            y=[f"trial {r['number']}" for r in top],
            zmin=0,
            zmax=100,
            colorscale="Viridis",
            text=[[fmt(v, 1) for v in row] for row in z],
            texttemplate="%{text}",
            customdata=[[params_text(r)] * len(EMOTIONS) for r in top],
            hovertemplate="%{y}, %{x}: %{z:.1f} %<br>%{customdata}<extra></extra>",
            colorbar={"title": {"text": "recall %", "side": "right"}},
        )
    )
    fig.update_layout(
        title=f"Val recall per emotion at each trial's best epoch (top {len(top)} by {key})",
        height=160 + 34 * len(top),
        yaxis={"autorange": "reversed"},
    )
    parts.append(page.figure(fig, "class-recall"))
    for emotion in ("disgust", "fear"):
        i = EMOTIONS.index(emotion)
        by_recall = sorted(
            (r for r in scored if recalls[r["number"]][i] is not None), key=lambda r: -recalls[r["number"]][i]
        )[:3]
        if by_recall and not any(recalls[r["number"]][i] for r in by_recall):
            parts.append(
                f'<h3>Best {emotion} recall</h3><p class="note">No trial recognised any {emotion} face of the val '
                f"split at its best epoch (recall 0 in all {len(scored)} trials with a value).</p>"
            )
            continue
        parts.append(
            f"<h3>Best {emotion} recall</h3>"
            + table(
                ["trial", f"{emotion} recall %", key, "params"],
                [[r["number"], fmt(recalls[r["number"]][i], 1), fmt(r[key]), params_text(r)] for r in by_recall],
                {0, 1, 2},
            )
        )
