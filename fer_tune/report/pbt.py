"""The report's PBT section, from results/NAME/pbt/ (fer_tune.tune.pbt.driver): the population over time (each member's
metric per epoch, a dashed step where it took another's weights), the lr / weight_decay / dropout schedules the best
members followed, every clone, and the best member's test result (and its replay by `fer-tune final --from-pbt`
when it ran). The figures' data are computed first (population_traces, schedule_traces), then drawn."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..tune.pbt.read import cadence, member_number, schedule_rows, stage
from ..tune.runtime.lock import describe
from .html import Page, esc, fmt, key_table, table

COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
WINNERS = 3  # schedules shown: the best members at the end


def population_traces(st: dict) -> list[dict]:
    """Per member and segment: {member, x, y, dashed_from (the donor's point it started from, or None)}."""
    metric = st["record"]["metric"]
    by_member = {m["member"]: m for m in st["members"]}
    out = []
    for m in st["members"]:
        for seg in m["segments"]:
            pts = [(r["epoch"], r[metric]) for r in seg["rows"] if isinstance(r.get(metric), (int, float))]
            start = None
            if seg["since"]:
                donor, at = seg["since"].split("@")
                event = next((e for e in st["clones"] if e["into"] == m["member"] and str(e["epoch"]) == at), None)
                value = event.get("value") if event else None
                if value is not None and member_number(donor) in by_member:
                    start = (int(at), value)
            out.append({"member": m["member"], "x": [p[0] for p in pts], "y": [p[1] for p in pts], "from": start})
    return out


def winners(st: dict) -> list[dict]:
    """The members with the best metric at their latest epoch, best first."""
    metric, sign = st["record"]["metric"], 1 if st["record"]["mode"] == "max" else -1
    scored = [m for m in st["members"] if isinstance(m["last"].get(metric), (int, float))]
    return sorted(scored, key=lambda m: (-m["last"]["epoch"], -sign * m["last"][metric]))[:WINNERS]


def schedule_traces(st: dict) -> dict[str, list[dict]]:
    """{key: [{member, x, y}]}: the step schedules of the winners, one point per segment start and the end."""
    epochs = st["record"]["settings"]["epochs"]
    out: dict[str, list[dict]] = {k: [] for k in st["record"]["settings"]["mutate"]}
    for m in winners(st):
        rows = schedule_rows(m["lineage"], min(epochs, m["last"]["epoch"]))
        for k in out:
            xs = [r["first"] for r in rows] + [rows[-1]["last"]] if rows else []
            ys = [r["values"][k] for r in rows] + [rows[-1]["values"][k]] if rows else []
            out[k].append({"member": m["member"], "x": xs, "y": ys})
    return out


def _population_figure(st: dict) -> Any:
    fig: dict = {"data": [], "layout": {}}
    shown: set[int] = set()
    for t in population_traces(st):
        color = COLORS[t["member"] % len(COLORS)]
        if t["from"] is not None and t["x"]:
            fig["data"].append(
                dict(
                    type="scatter",
                    x=[t["from"][0], t["x"][0]],
                    y=[t["from"][1], t["y"][0]],
                    mode="lines",
                    line={"color": color, "dash": "dash"},
                    showlegend=False,
                    hoverinfo="skip",
                )
            )
        fig["data"].append(
            dict(
                type="scatter",
                x=t["x"],
                y=t["y"],
                mode="lines+markers",
                name=f"member {t['member']}",
                legendgroup=str(t["member"]),
                showlegend=t["member"] not in shown,
                line={"color": color},
            )
        )
        shown.add(t["member"])
    metric = st["record"]["metric"]
    fig["layout"] = {
        "title": f"The population: {metric} per member (dashed: the weights it took from another member)",
        "xaxis": {"title": "epoch"},
        "yaxis": {"title": metric},
        "height": 420,
    }
    return fig


def _schedule_figure(st: dict) -> Any:
    from plotly.subplots import make_subplots

    traces = schedule_traces(st)
    fig = make_subplots(rows=1, cols=len(traces), subplot_titles=list(traces))
    for col, (key, rows) in enumerate(traces.items(), 1):
        for t in rows:
            fig.add_trace(
                dict(
                    type="scatter",
                    x=t["x"],
                    y=t["y"],
                    mode="lines",
                    line={"shape": "hv", "color": COLORS[t["member"] % len(COLORS)]},
                    name=f"member {t['member']}",
                    legendgroup=str(t["member"]),
                    showlegend=col == 1,
                ),
                row=1,
                col=col,
            )
        if key in ("lr", "weight_decay"):
            fig.update_yaxes(type="log", row=1, col=col)
        fig.update_xaxes(title_text="epoch", row=1, col=col)
    fig.update_layout(title="Schedules the best members followed (their weights' whole lineage)", height=360)
    return fig


def pbt_section(page: Page, sdir: Path) -> None:
    """The section, when the study has a PBT stage."""
    st = stage(sdir)
    if st is None:
        return
    rec, done = st["record"], st["metrics"]
    s, metric = rec["settings"], rec["metric"]
    parts = page.section("pbt", "Population-based training, seeded by the study's top trials")
    if st["running"]:
        parts.append(
            f'<p class="banner" id="pbt-state">The PBT stage is being run by {esc(describe(st["running"]))}.</p>'
        )
    elif not done:
        parts.append(
            f'<p class="banner" id="pbt-state">The PBT stage is unfinished (<code>fer-tune pbt {esc(sdir)}</code> '
            "continues it); the figures show its epochs so far.</p>"
        )
    tops = ", ".join(f"#{m['trial']['number']} ({fmt(m['trial']['value'])})" for m in rec["members"])
    items = [
        ("method", f"{s['method'].upper()} (Jaderberg et al. 2017; PB2: Parker-Holder et al. 2020)"),
        ("population", f"{s['population']} members from the top {s['top_k']} trials: {tops}"),
        ("training", f"{s['epochs']} epochs, scheduler constant (the perturbations are the lr schedule)"),
        ("perturbed", f"{', '.join(s['mutate'])} {cadence(s)}; ranges " + _ranges(rec)),
        ("clones", str(len(st["clones"]))),
        ("created", rec.get("created", "")),
    ]
    if done:
        b, test = done["best"], done["test"]
        items.append(
            (
                "best member",
                f"member {b['member']} (weights from trial #{b['trial']['number']}, {len(b['clones'])} clone(s) on "
                f"their way): {metric} {fmt(b['value'])} at epoch {b['epoch']}; test top-1 {fmt(test['top1'])} %, "
                f"top-2 {fmt(test['top2'])} % (TenCrop, {done['test_split']}); exported to {st['dir'] / 'model.pt'}",
            )
        )
    replay = st["replay"]
    if replay and replay.get("aggregate"):
        agg = replay["aggregate"]
        items.append(
            (
                "replayed from scratch",
                "fer-tune final --from-pbt: test top-1 "
                + ", ".join(f"{n} {fmt(a['top1']['mean'])} %" for n, a in agg.items())
                + f" over {len(replay.get('seeds', []))} seed(s)",
            )
        )
    parts.append(key_table(items, id="pbt-table"))
    if st["members"]:
        parts.append(page.figure(_population_figure(st), "pbt-population"))
        parts.append(page.figure(_schedule_figure(st), "pbt-schedules"))
    rows = [
        [e["epoch"], e["into"], e["from"], fmt(e.get("value"))]
        + [f"{fmt(e['old'][k], 4)} -> {fmt(v, 4)}" for k, v in e["new"].items()]
        for e in st["clones"]
    ]
    parts.append(
        "<h3>Clones</h3>"
        + (
            table(
                ["epoch", "member", "took the weights of", f"its {metric}", *s["mutate"]],
                rows,
                {0, 1, 2, 3},
                id="pbt-clones",
            )
            if rows
            else '<p class="note">No member has taken another\'s weights yet.</p>'
        )
    )


def _ranges(rec: dict) -> str:
    return ", ".join(
        f"{k} {fmt(lo, 4)} .. {fmt(hi, 4)}{' (log)' if logs else ''}" for k, (lo, hi, logs) in rec["mutations"].items()
    )
