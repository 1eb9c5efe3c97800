"""The decision summary's facts (fer_tune.report.decision) in sentences: the report's first section and the lines
`fer-tune status` prints under its table. Both show the same sentences."""

from __future__ import annotations

import textwrap

from .final_figures import MODEL_LABEL
from .html import Page, esc

LISTED = 8  # trials named in one sentence before "and N more"


def _pct(v: float) -> str:
    return f"{v:.2f} %"


def _span(iv: list[float] | None, sign: bool = False) -> str:
    if not iv:
        return ""
    f = "{:+.1f}" if sign else "{:.1f}"
    return f"{f.format(iv[0])} to {f.format(iv[1])}"


def _trials(items: list[str]) -> str:
    more = len(items) - LISTED
    return ", ".join(items[:LISTED]) + (f" and {more} more" if more > 0 else "")


def sentences(f: dict) -> list[tuple[str, str]]:
    """[(key, sentence)]: unread (results missing), winner, ties, warm start, collapsed, edges, final, baseline,
    cost, next."""
    out: list[tuple[str, str]] = []
    w, metric = f["winner"], f["metric"]
    acc = f["interval_method"] is not None
    unit = " %" if acc else ""
    if f.get("unread"):
        n, where = f["unread"]["trials"], " and ".join(f["unread"]["where"])
        out.append(
            (
                "unread",
                f"Results missing: {n} finished trial(s) have none in {where} (a copy made without tune/, or a Ray "
                "storage this machine cannot read): the table, the winner and the cost below leave them out.",
            )
        )
    if w is None:
        out.append(("winner", f"No trial has reported {metric} yet: there is nothing to decide."))
    else:
        multi = len(f["objectives"]) > 1
        text = (
            f"Winner: trial {w['trial']}"
            + (f", the Pareto front's best {metric}" if multi else "")
            + f", {metric} {w['value']:.2f}{unit} at epoch {w['epoch']}"
        )
        if acc:
            text += (
                f" (95 % interval {_span(w['interval'])} % on {f['val_images']:,} val images; the best of "
                f"{f['trials_scored']} trials' best epochs, so it reads high)."
            )
            if w.get("above_majority") is False:
                text += (
                    f" Its interval reaches down to the majority-class rate ({_pct(f['majority']['pct'])}): the "
                    "study has not shown that it beats predicting the commonest emotion for every face."
                )
        else:
            text += f" (no interval: the summary computes intervals for accuracies, not {metric})."
        out.append(("winner", text))
        ties, runner = f["ties"], f["runner_up"]
        if ties:
            named = [
                f"trial {t['trial']} ({t['value']:.2f} %"
                + (f", {t['status']} at epoch {t['epochs']})" if t["status"] != "completed" else ")")
                for t in ties
            ]
            out.append(
                (
                    "ties",
                    f"Ties: {_trials(named)} lie{'s' if len(named) == 1 else ''} inside the winner's interval: "
                    "the val split cannot rank them.",
                )
            )
        elif acc and runner:
            lo, hi = w["interval"]
            where = (  # inside the interval yet no tie: every trial there collapsed
                "lies inside the winner's interval but learnt no emotion (below)"
                if lo <= runner["value"] <= hi
                else "lies below the winner's interval"
            )
            tied = runner.get("tied", [runner["trial"]])
            if len(tied) > 1:  # several trials share the next best value
                who = f"trials {_trials([str(t) for t in tied])}"
                where = where.replace("lies", "lie", 1)
            else:
                who = f"trial {runner['trial']}"
            out.append(("ties", f"Ties: none; the next best, {who} at {runner['value']:.2f} %, {where}."))
        elif runner is None:
            out.append(("ties", "Ties: none; it is the only trial with a score."))
    out += _warm_words(f)
    out += _collapse_words(f)
    out += _edge_words(f)
    out += _final_words(f)
    c = f["cost"]
    cost = f"Cost: {c['device_hours']:.3g} device-hours in the study"
    if c.get("final_device_hours") is not None:
        cost += f" and {c['final_device_hours']:.3g} in the final stage"
    saved = 1 - c["epochs_trained"] / c["epoch_budget"] if c["epoch_budget"] else 0.0
    cost += (
        f"; {c['epochs_trained']:,} trial epochs trained of the {c['epoch_budget']:,} the trials would have run "
        f"without early stopping" + (f" ({saved * 100:.0f} % saved)" if saved > 0 else "") + "."
    )
    out.append(("cost", cost))
    out.append(("next", f"Next: {f['next']}"))
    return out


DEFINITIONS = (
    "How to read it: every interval is a 95 % Wilson score interval for a binomial proportion (an accuracy as k "
    "correct of n images, n the split's size): the noise of the split's sampling, not of the training seed. A tie "
    "is a trial that did not collapse whose best val score lies inside the winner's interval. A collapsed trial "
    "predicts one emotion for every val face (every other emotion's recall below 1 % at its best epoch) or scores at or below the "
    "majority-class rate, the commonest emotion's share of val. A parameter sits at the edge when the winner's "
    "value lies within 5 % of either end of its searched range (on the log scale where it is searched on one). A "
    "baseline's difference has Newcombe's hybrid score interval (method 10), built from the two Wilson intervals."
)


def _warm_words(f: dict) -> list[tuple[str, str]]:
    """Where the configurations run first stand: the paper's recipe, another study's best."""
    w, ties = f["winner"], {t["trial"] for t in f["ties"]}
    parts = []
    for p in f.get("warm_start", []):
        who = "the paper's recipe" if p["from"] == "paper" else p["from"].replace("#", "'s trial ")
        if p["value"] is None:
            where = f"no score ({p['status']})"
        elif w is not None and p["trial"] == w["trial"]:
            where = "it is the winner"
        else:
            where = f"{p['value']:.2f}" + (" %" if f["interval_method"] else "")
            where += ", a tie with the winner" if p["trial"] in ties else ""
            where += f", {p['status']}" if p["status"] not in ("completed", "") else ""
        parts.append(f"trial {p['trial']} ran {who} ({where})")
    if not parts:
        return []
    return [("warm", "Warm start: " + "; ".join(parts) + ".")]


def _collapse_words(f: dict) -> list[tuple[str, str]]:
    if f["chance"] is None or not f["trials_scored"]:
        return []
    maj = f["majority"]
    rate = ""
    if maj is not None:
        rate = ("" if maj["recorded"] else "at least ") + f"{_pct(maj['pct'])}, {maj['class']}'s share of val"
    bad = f["collapsed"]
    if not bad:
        if not f["collapse_checked"]:
            text = (
                f"Collapsed: none scores at or below the majority-class rate ({rate}); per-emotion recall was not "
                "recorded, so a model that predicts one emotion is not looked for."
                if maj
                else "Collapsed: not checked (per-emotion recall and the val split's class counts were not recorded)."
            )
            return [("collapsed", text)]
        return [
            (
                "collapsed",
                "Collapsed: none (no trial predicts one emotion for every val face"
                + (f" or scores at or below the majority-class rate, {rate}" if maj else "")
                + ").",
            )
        ]
    one = [c for c in bad if c["predicts"]]
    low = [c for c in bad if not c["predicts"]]
    parts = []
    by_class: dict[str, list[str]] = {}
    for c in one:
        by_class.setdefault(c["predicts"], []).append(str(c["trial"]))
    for emotion, ts in by_class.items():
        parts.append(
            f"trial{'s' if len(ts) > 1 else ''} {_trials(ts)} predict{'' if len(ts) > 1 else 's'} {emotion} for every val face"
        )
    if low:
        ts = [str(c["trial"]) for c in low]
        parts.append(
            f"trial{'s' if len(ts) > 1 else ''} {_trials(ts)} score{'' if len(ts) > 1 else 's'} at or below the majority-class rate ({rate})"
        )
    text = f"Collapsed: {len(bad)} of {f['trials_scored']} trials learnt no emotion: {'; '.join(parts)}" + (
        f"; chance is {_pct(f['chance'])}."
        if low
        else f" (majority-class rate {rate}; chance {_pct(f['chance'])})."
        if maj
        else "."
    )
    if f["collapsed_setting"]:
        text += f" All have {' and '.join(f['collapsed_setting'])}, and no other trial has: narrow the space there."
    return [("collapsed", text)]


def _edge_words(f: dict) -> list[tuple[str, str]]:
    if not f["edges"]:
        return []
    shown = [
        f"{e['param']} ({e['value']:.4g}, at the {'top' if e['side'] == 'high' else 'bottom'} of "
        f"{e['low']:.4g} .. {e['high']:.4g}{', log' if e['log'] else ''})"
        for e in f["edges"]
    ]
    names = " and ".join(e["param"] for e in f["edges"])
    return [
        (
            "edges",
            f"Edges: widen {names}; the winner's {'; '.join(shown)} sit{'s' if len(shown) == 1 else ''} within 5 % "
            "of the end of the searched range, so better values may lie beyond it.",
        )
    ]


def _final_words(f: dict) -> list[tuple[str, str]]:
    fin = f["final"]
    if fin is None:
        return [("final", "Final stage: not run yet (no test score; the study's scores are on val).")]
    if "top1" not in fin:
        state = {
            "running": "running: no test score yet",
            "unfinished": "started and not finished: no test score yet",
            "partial": "finished without a completed seed",
            "complete": "finished without a test score",
        }[fin["state"]]
        return [("final", f"Final stage: {state}.")]
    seeds = fin["seeds"]
    spread = (
        f"over {len(seeds)} seeds {min(seeds):.2f} to {max(seeds):.2f} % (std {fin['std']:.2f})"
        if fin["std"] is not None
        else "one seed, so no seed spread"
    )
    text = (
        f"Final stage: trial {fin['trial']} retrained, test top-1 of the {fin['model_label']} model "
        f"{_pct(fin['top1'])}"
        + (
            f" (95 % interval {_span(fin['interval'])} % on {fin['test_images']:,} test images)"
            if fin["interval"]
            else ""
        )
        + f"; {spread}."
    )
    if fin["others"]:
        text += (
            " Its other models: "
            + ", ".join(f"{MODEL_LABEL[n]} {_pct(v)}" for n, v in fin["others"].items())
            + (
                " (differences inside the interval do not rank them)."
                if fin["interval"]
                and all(fin["interval"][0] <= v <= fin["interval"][1] for v in fin["others"].values())
                else "."
            )
        )
    if fin.get("seeds_failed"):
        text += f" Seeds that did not complete: {', '.join(map(str, fin['seeds_failed']))}."
    out = [("final", text)]
    b = fin.get("baseline")
    if b:
        iv = b["interval"]
        verdict = (
            "the test split cannot tell them apart"
            if iv and iv[0] <= 0 <= iv[1]
            else "the difference holds beyond the test split's noise"
            if iv
            else ""
        )
        out.append(
            (
                "baseline",
                f"Baseline: the {b['name']} recipe scored {_pct(b['top1'])}; the study's configuration "
                f"{'leads' if b['difference'] >= 0 else 'trails'} it by {abs(b['difference']):.2f} points"
                + (
                    f" (95 % Newcombe hybrid score interval {_span(iv, sign=True)} points, conservative since both are "
                    f"tested on the same images): {verdict}"
                    if iv
                    else ""
                )
                + (f"; per seed {', '.join(f'{d:+.2f}' for d in b['per_seed'])}" if b["per_seed"] else "")
                + ".",
            )
        )
    else:
        out.append(("baseline", "Baseline: none was retrained beside it (fer-tune final --baseline paper)."))
    e = fin.get("ensemble")
    if e:
        iv, d = e["difference_interval"], e["difference"]
        text = (
            f"Ensemble: the {len(e['members'])} members (trials {', '.join(map(str, e['members']))}) together score "
            f"{_pct(e['top1'])} (95 % interval {_span(e['interval'])} %"
            + (f"; std {e['std']:.2f} over seeds" if e["std"] is not None else "")
            + ")"
        )
        if d is not None:
            text += f", {d:+.2f} points on member 1, the configuration validation picks alone" + (
                f" (95 % interval {_span(iv, sign=True)} points): "
                + ("the test split cannot tell them apart" if iv[0] <= 0 <= iv[1] else "beyond the test split's noise")
                if iv
                else ""
            )
        out.append(("ensemble", text + "."))
    return out


def decision_section(page: Page, f: dict) -> None:
    """The report's first section: the sentences, each a line of its own."""
    parts = page.section("decision", "Decision")
    items = "".join(f'<li id="decision-{key}">{_lead(text)}</li>' for key, text in sentences(f) if key != "next")
    parts.append(
        f'<ul class="decision">{items}</ul><p class="next" id="decision-next">Next: <code>{esc(f["next"])}</code></p>'
        + (
            f'<p class="note" id="decision-definitions">{esc(DEFINITIONS).replace(" %", "&nbsp;%")}</p>'
            if f["interval_method"]
            else ""
        )
    )


def _lead(text: str) -> str:
    """A sentence in HTML, its label ("Winner", "Ties", ...) bold, and no line break before a % sign."""
    label, _, rest = text.partition(": ")
    return f"<b>{esc(label)}:</b> {esc(rest)}".replace(" %", "&nbsp;%")


def wrapped(f: dict, width: int = 100) -> list[str]:
    """The sentences as lines of at most `width` characters (a command is never broken)."""
    lines: list[str] = []
    for key, text in sentences(f):
        if key == "next":
            lines.append(text)
            continue
        glued = text.replace(" %", "\0%")  # a number and its % stay on one line
        lines += [
            line.replace("\0", " ")
            for line in textwrap.wrap(
                glued, width, subsequent_indent="  ", break_on_hyphens=False, break_long_words=False
            )
        ]
    return lines
