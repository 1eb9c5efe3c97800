"""Reference lines on the report's accuracy charts, from the decision's facts: chance (one emotion of seven picked
at random) and the majority-class rate (the commonest emotion's share of val: what predicting it for every face
scores), so that a score reads against what learning nothing scores."""

from __future__ import annotations

from typing import Any

from ..common import EMOTIONS

CHANCE_PCT = 100.0 / len(EMOTIONS)  # one emotion of seven picked at random


def accuracy_lines(decision: dict) -> list[tuple[float, str]]:
    """(y, label) of chance and the majority-class rate; none for a metric that is no accuracy."""
    out = []
    if decision.get("chance") is not None:
        out.append((float(decision["chance"]), f"chance {decision['chance']:.1f} %"))
    m = decision.get("majority")
    if m:
        at_least = "" if m.get("recorded") else "at least "
        out.append((float(m["pct"]), f"majority class ({m['class']}): {at_least}{m['pct']:.1f} %"))
    return out


def test_lines(seed: dict) -> list[tuple[float, str]]:
    """(y, label) of chance and the test split's majority-class rate, read off a completed final-stage seed's
    confusion matrix (its rows count each emotion's test images)."""
    model = next(iter(seed.get("models", {}).values()), {})
    rows = [sum(r) for r in model.get("confusion") or []]
    out = [(CHANCE_PCT, f"chance {CHANCE_PCT:.1f} %")]
    if rows and sum(rows):
        k = max(range(len(rows)), key=rows.__getitem__)
        out.append(
            (100.0 * rows[k] / sum(rows), f"majority class ({EMOTIONS[k]}): {100.0 * rows[k] / sum(rows):.1f} %")
        )
    return out


def add_lines(fig: Any, lines: list[tuple[float, str]], legend: bool = False, **where: Any) -> None:
    """Dotted horizontal lines labelled at their left end (`where`: plotly's row / col of a subplot figure), or with
    `legend` named in the legend instead: a chart whose bars carry their numbers, where a label at the line's end
    would fall on a bar's number whenever the bar ends near the line."""
    import plotly.graph_objects as go

    style = {"dash": "dot", "color": "#7f7f7f", "width": 1.5}
    for k, (y, label) in enumerate(lines):
        at_end = {
            "annotation_text": label,
            "annotation_position": "bottom left" if k == 0 else "top left",
            "annotation_font": {"size": 11, "color": "#555"},
        }
        fig.add_hline(y=y, line=style, **({} if legend else at_end), **where)
        if legend:
            fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", line=style, name=label, hoverinfo="skip"))


def pct_title(metric: str, lines: list) -> str:
    """An axis title with its unit: accuracies (those with reference lines) are in %."""
    return f"{metric} (%)" if lines else metric
