"""The final stage's figures (plotly): train / fine-tune curves per seed, test accuracy per model, confusion matrices
and per-class precision / recall / F1, each from the numbers the final stage wrote."""

from __future__ import annotations

import statistics
from typing import Any

from ..common import EMOTIONS
from ..recipe import MODELS
from .guides import add_lines

MODEL_LABEL = {"last": "last epoch", "best_val": "best val epoch", "finetuned": "fine-tuned"}
CURVES = (
    ("train_acc", "#1f77b4", "train acc"),
    ("val_acc", "#ff7f0e", "val acc"),
    ("test_acc", "#2ca02c", "test acc"),
    ("train_loss", "#1f77b4", "train loss"),
    ("val_loss", "#ff7f0e", "val loss"),
)


# the emotions' first three letters under a third of the page's width (the full names in the hover text)
SHORT_TICKS = {"tickmode": "array", "tickvals": list(EMOTIONS), "ticktext": [e[:3] for e in EMOTIONS]}


def curves_figure(runs: dict[int, dict], lines: list = ()) -> Any:
    """Per seed: accuracy and loss per epoch; `lines`: chance and the test split's majority-class rate (guides)."""
    from plotly.subplots import make_subplots

    seeds = sorted(runs)
    fig = make_subplots(
        rows=len(seeds),
        cols=2,
        shared_xaxes=True,
        vertical_spacing=0.12 / max(1, len(seeds)),
        subplot_titles=[t for s in seeds for t in (f"seed {s}: accuracy %", f"seed {s}: loss")],
    )
    for i, s in enumerate(seeds, 1):
        run = runs[s]
        n_train = max((h["epoch"] for h in run["train"]), default=0)
        for phase, rows, dash in (("train", run["train"], "solid"), ("fine-tune", run["finetune"], "dot")):
            for key, color, label in CURVES:
                pts = [
                    (h["epoch"] + (n_train if phase == "fine-tune" else 0), h.get(key))
                    for h in rows
                    if h.get(key) is not None
                ]
                if not pts:
                    continue
                fig.add_trace(
                    dict(
                        type="scatter",
                        x=[p[0] for p in pts],
                        y=[p[1] for p in pts],
                        mode="lines+markers" if key == "test_acc" else "lines",
                        name=label,
                        legendgroup=key,  # one legend entry per curve: solid = training, dotted = fine-tune
                        showlegend=i == 1 and phase == "train",
                        line={"color": color, "dash": dash},
                    ),
                    row=i,
                    col=1 if key.endswith("acc") else 2,
                )
        if run["best_epoch"]:
            for col in (1, 2):
                fig.add_vline(x=run["best_epoch"], line={"color": "#888", "dash": "dash"}, row=i, col=col)
            fig.add_annotation(
                x=run["best_epoch"],
                y=1,
                yref="y domain",
                text="best val",
                showarrow=False,
                xanchor="left",
                row=i,
                col=1,
            )
        add_lines(fig, list(lines), row=i, col=1)
        if run["finetune"]:
            for col in (1, 2):
                fig.add_vrect(
                    x0=n_train + 0.5,
                    x1=n_train + len(run["finetune"]) + 0.5,
                    fillcolor="#999",
                    opacity=0.12,
                    line_width=0,
                    row=i,
                    col=col,
                )
    fig.update_xaxes(title_text="epoch (fine-tune shaded)", row=len(seeds))
    fig.update_layout(
        title="Train / val / test per epoch; the fine-tune's epochs (dotted, shaded) follow the training's; the "
        "dashed line marks the best-val epoch",
        height=320 * len(seeds) + 80,
    )
    return fig


def accuracy_figure(agg: dict, lines: list = ()) -> Any:
    """The test metrics per model (mean over seeds); `lines`: chance and the test split's majority-class rate."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for k, label in (("top1", "top-1"), ("top2", "top-2"), ("macro_f1", "macro F1")):
        names = [n for n in MODELS if n in agg]
        fig.add_trace(
            go.Bar(
                x=[MODEL_LABEL[n] for n in names],
                y=[agg[n][k]["mean"] for n in names],
                name=label,
                error_y=spread_bars([agg[n][k]["mean"] for n in names], [agg[n][k]["std"] for n in names]),
                text=[f"{agg[n][k]['mean']:.2f}" for n in names],
            )
        )
    fig.update_layout(
        barmode="group",
        title="Test metrics per model (%)"
        + (", mean ± std over seeds" if any(len(a["top1"]["values"]) > 1 for a in agg.values()) else ""),
        height=400,
        yaxis_title="%",
    )
    add_lines(fig, list(lines), legend=True)
    return fig


def confusion_figure(seeds: list[dict]) -> Any:
    from plotly.subplots import make_subplots

    fig = make_subplots(
        rows=2,
        cols=3,
        horizontal_spacing=0.08,
        vertical_spacing=0.14,
        subplot_titles=[f"{MODEL_LABEL[n]}: {kind}" for kind in ("counts", "row-normalized %") for n in MODELS],
    )
    for j, n in enumerate(MODELS, 1):
        total = [
            [sum(s["models"][n]["confusion"][a][b] for s in seeds) for b in range(len(EMOTIONS))]
            for a in range(len(EMOTIONS))
        ]
        norm = [[100.0 * v / max(1, sum(row)) for v in row] for row in total]
        for i, (z, digits) in enumerate(((total, 0), (norm, 1)), 1):
            fig.add_trace(
                dict(
                    type="heatmap",
                    z=z,
                    x=list(EMOTIONS),
                    y=list(EMOTIONS),
                    colorscale="Blues",
                    showscale=False,
                    text=[[f"{v:.{digits}f}" for v in row] for row in z],
                    texttemplate="%{text}",
                    hovertemplate="true %{y}, predicted %{x}: %{text}<extra></extra>",
                ),
                row=i,
                col=j,
            )
    fig.update_yaxes(autorange="reversed")
    fig.update_yaxes(title_text="true", col=1)  # beside the first column only: it would sit on the cells to its left
    fig.update_xaxes(title_text="predicted", **SHORT_TICKS)
    fig.update_layout(title=f"Confusion matrices on the test split, summed over {len(seeds)} seed(s)", height=820)
    return fig


def per_class_figure(seeds: list[dict]) -> Any:
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=3, subplot_titles=["precision %", "recall %", "F1 %"])
    for n, color in zip(MODELS, ("#9ecae1", "#3182bd", "#08519c")):
        for j, k in enumerate(("precision", "recall", "f1"), 1):
            vals = [[s["models"][n]["per_class"][e][k] for s in seeds] for e in EMOTIONS]
            means = [statistics.fmean(v) for v in vals]
            fig.add_trace(
                dict(
                    type="bar",
                    x=list(EMOTIONS),
                    y=means,
                    error_y=spread_bars(means, [statistics.stdev(v) if len(v) > 1 else 0.0 for v in vals]),
                    name=MODEL_LABEL[n],
                    legendgroup=n,
                    showlegend=j == 1,
                    marker={"color": color},
                ),
                row=1,
                col=j,
            )
    fig.update_xaxes(**SHORT_TICKS)
    spread = ", mean ± std over seeds (bars cut at 0 and 100)" if len(seeds) > 1 else f", seed {seeds[0]['seed']}"
    fig.update_layout(barmode="group", title=f"Per-class precision / recall / F1 on the test split{spread}", height=420)
    return fig


def spread_bars(means: list[float], stds: list[float]) -> dict:
    """Error bars of +- std kept inside 0..100 % (a percentage cannot leave it); none with one seed."""
    if not any(stds):
        return {"visible": False}
    return {
        "type": "data",
        "symmetric": False,
        "array": [min(s, 100.0 - m) for m, s in zip(means, stds)],
        "arrayminus": [min(s, m) for m, s in zip(means, stds)],
    }
