"""The study report: results/NAME -> one HTML file a person opens with no server and no internet.

plotly.js is embedded once, packed (fer_tune.report.html says how); every figure is a plotly div. Sections: the decision
(what was found and how sure it is: fer_tune.report.decision), summary, Optuna's
own plots from the study's storage, learning curves of every trial, the seed's comparisons (optimizer x scheduler,
scheduler, dropout, architecture: whichever the study searches), the class-aware view (per-emotion val recall of
the top trials), the final stage (fer_tune.report.final) and a table against published numbers
(the shipped results/reference/*.csv, and RESULTS/reference/*.csv beside the study).

Everything from a file, a study name or a parameter is escaped: in the HTML, and in plotly's text, which interprets
HTML-like tags (see ``plotly_safe``). Only files and the Optuna storage are read, so the report also works on a
study that is running or was interrupted (shown as partial).
"""

from __future__ import annotations

import csv
import time
from collections import Counter
from pathlib import Path
from typing import Any

from ..common import FerTuneError, shipped
from ..tune.runtime.lock import running_line
from ..tune.study.outputs import ranked, status_summary, study_results
from ..tune.study.record import StudyRecord, load_optuna_study, read_study
from ..tune.study.spec import objectives
from . import final as report_final
from .decision import decide
from .decision_words import decision_section
from .guides import accuracy_lines
from .html import Page, duration, esc, fmt, key_table, number, params_text, table, write_page
from .optuna_plots import optuna_section
from .pareto import pareto_section
from .pbt import pbt_section
from .trials import class_section, comparisons_section, curves_section

TOP_TRIALS = 25  # rows of the trials table in a larger study (the best by the metric); every trial folded below


# ---------------------------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------------------------
def write_report(study_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the study's report (default results/NAME/report.html, atomically) and return its path."""
    sdir = Path(study_dir)
    text = build_report(sdir)
    path = Path(out) if out else sdir / "report.html"
    write_page(path, text)
    return path


def build_report(sdir: Path) -> str:
    record = read_study(sdir)
    spec = record["spec"]
    scanned = study_results(sdir, record)  # one pass over the trials' results, local or s3://...
    summary = status_summary(sdir, record, scanned)
    results = scanned[0]
    page = Page(f"fer-tune study {record['name']}")
    header = ""
    unfinished = [r for r in summary["rows"] if r["state"] not in ("COMPLETE", "PRUNED", "FAIL")]
    running = summary["running"]
    if running:
        header = "".join(
            f'<p class="banner" id="running-{what}">Running: {esc(running_line(what, info))} when this '
            f"report was written ({time.strftime('%Y-%m-%d %H:%M:%S')}).</p>"
            for what, info in running.items()
        )
    if summary["finished"] < summary["num_samples"] or unfinished:
        state = (
            "It is still running"
            if "study" in running
            else f"It was interrupted (<code>fer-tune resume {esc(sdir)}</code> continues it)"
        )
        header += (
            f'<p class="banner" id="partial">Partial study: {summary["finished"]} of {summary["num_samples"]} '
            f"trials finished ({len(unfinished)} started and unfinished). {state}; the figures show the "
            "results so far.</p>"
        )
    final = report_final.load_final(sdir)
    decision = decide(sdir, record, summary, results, final)
    decision_section(page, decision)
    lines = accuracy_lines(decision)  # chance and the majority-class rate on the accuracy charts
    _summary_section(page, sdir, record, summary)
    study, unread = _study(record)
    pareto_section(page, record, study, summary["rows"], summary["best"], final)
    optuna_section(page, record, study, unread, lines)
    curves_section(page, spec, summary["rows"], results, lines)
    comparisons_section(page, spec, summary["rows"], lines)
    class_section(page, spec, summary["rows"], results)
    if final is not None:
        report_final.final_section(page, final)
    pbt_section(page, sdir)
    _reference_section(page, sdir, report_final.reference_rows(final) if final else [], record["data"])
    return page.html(header, top=_data_line(record["data"]))


def is_synthetic(data: dict) -> bool:
    return data.get("format") == "synthetic"


def _data_line(data: dict) -> str:
    """The data the study used, at the top of the report."""
    sizes = ", ".join(f"{k} {v:,}" for k, v in data.get("sizes", {}).items())
    if is_synthetic(data):
        return (
            f'<p class="data synthetic" id="data-used">Data: the embedded synthetic faces ({esc(data.get("source"))}; '
            f"{esc(sizes)}), not FER2013. Accuracies here measure the pipeline, not emotion recognition on real "
            "faces.</p>"
        )
    return (
        f'<p class="data" id="data-used">Data: {esc(data.get("source"))} ({esc(data.get("format", ""))}; '
        f"{esc(sizes)}), protocol {esc(data.get('protocol', ''))}.</p>"
    )


def _summary_section(page: Page, sdir: Path, record: StudyRecord, s: dict) -> None:
    spec, data = record["spec"], record["data"]
    es = spec["early_stopping"]
    best = s["best"]
    metric = spec["metric"]
    wall = sum(r.get("wall_seconds", 0.0) for r in record["runs"])
    restarted = [r for r in s["rows"] if int(r["restarts"])]
    items = [
        ("study", f"{record['name']} ({sdir.resolve()})"),
        ("description", spec.get("description", "").strip()),
        ("space file", f"{record['space_file']} (copy: space.yaml)"),
        (
            "objectives" if len(objectives(spec)) > 1 else "metric",
            ", ".join(f"{m} ({mode})" for m, mode in objectives(spec))
            + ("; early stopping and the default final trial by the first" if len(objectives(spec)) > 1 else ""),
        ),
        ("sampler", f"{spec['sampler']} (seed {spec['seed']})"),
        ("scheduler (early stopping)", ", ".join([es["type"]] + [f"{k} {v}" for k, v in es.items() if k != "type"])),
        ("epochs per trial", f"at most {spec['max_epochs']}"),
        ("resources per trial", ", ".join(f"{k} {v}" for k, v in spec["resources"].items())),
        (
            "data",
            f"{data['source']} ({data.get('format', '')}; sizes "
            + ", ".join(f"{k} {v:,}" for k, v in data.get("sizes", {}).items())
            + ")",
        ),
        ("protocol", f"{data['protocol']}: {data.get('protocol_note', '')}"),
        (
            "trials",
            f"{s['finished']} of {s['num_samples']} finished; by state: "
            + (", ".join(f"{k} {n}" for k, n in sorted(s["states"].items())) or "none yet"),
        ),
        (
            "best",
            f"trial {best['number']}: {metric} {fmt(best['best_' + metric])} at epoch {best['best_epoch']}"
            + (" (the Pareto front's best)" if len(objectives(spec)) > 1 else "")
            + f"; {params_text(best)}"
            if best
            else "no trial has reported yet",
        ),
        ("device-hours", fmt(s["device_hours"], 4)),
        ("wall time", f"{duration(wall)} (all runs)"),
        (
            "precision",
            ", ".join(
                f"{p} ({n} trial{'s' if n > 1 else ''})"
                for p, n in sorted(
                    Counter(r.get("precision") or "not recorded" for r in s["rows"] if int(r["epochs"])).items()
                )
            )
            or "-",
        ),
        ("epochs trained", s["epochs_trained"]),
        ("created", record.get("created", "")),
        ("fixed settings", ", ".join(f"{k}={v}" for k, v in spec.get("fixed", {}).items()) or "-"),
        ("versions", ", ".join(f"{k} {v}" for k, v in record.get("fingerprint", {}).get("versions", {}).items())),
    ]
    parts = page.section("summary", "Summary")
    parts.append(key_table(items, id="summary-table"))
    space = [
        [
            n,
            p["type"],
            ", ".join(map(str, p.get("choices", [])))
            or f"{p.get('low', 0)} .. {p.get('high', 0)}{' (log)' if p.get('log') else ''}",
        ]
        for n, p in spec["space"].items()
    ]
    parts.append("<h3>Search space</h3>" + table(["parameter", "type", "values"], space))
    runs = [
        [
            r["dir"],
            r["num_samples"],
            r["seed"],
            r.get("max_concurrent") or "-",
            duration(r.get("wall_seconds", 0.0)),
            sessions_text(r.get("sessions"), live="study" in s["running"] and r is record["runs"][-1]),
        ]
        for r in record["runs"]
    ]
    parts.append(
        "<h3>Runs (the sweep and each extend; a resume continues its run)</h3>"
        + table(
            ["run", "trials", "sampler seed", "max concurrent", "wall time", "sessions"], runs, {1, 2}, id="runs-table"
        )
    )
    if restarted:
        parts.append(
            f'<p class="note">{len(restarted)} trial(s) continued from a checkpoint after a crash retry or a '
            f"resume, {sum(int(r['restarts']) for r in restarted)} restart(s) in all: "
            + ", ".join(f"#{r['number']} x{r['restarts']}" for r in restarted)
            + ".</p>"
        )
    else:
        parts.append('<p class="note">No trial was restarted (no crash retry, no trial continued by a resume).</p>')
    cols = ["number", "status", "epochs", f"best_{metric}", "best_epoch", "wall_seconds", "device_seconds", "node"]

    def trials_table(shown: list[dict], **kw: Any) -> str:
        rows = [
            [r["number"], r["status"], r["epochs"], fmt(r[f"best_{metric}"]), r["best_epoch"]]
            + [fmt(number(r[c]), 0) for c in ("wall_seconds", "device_seconds")]
            + [r["node"], r["restarts"], params_text(r)]
            for r in shown
        ]
        best_rows = {k for k, r in enumerate(shown) if best and r["number"] == best["number"]}
        return table(cols + ["restarts", "params"], rows, {0, 2, 3, 4, 5, 6, 8}, best_rows, **kw)

    note = f"The best trial ({best['number']}) is highlighted." if best else ""
    top = s["rows"]
    if len(top) > TOP_TRIALS:  # a large study: its best trials first, all of them folded below
        top = ranked(top, metric, spec["mode"])[:TOP_TRIALS]
        note = f"The best {len(top)} of {len(s['rows'])} trials by {metric}; every trial in the table below it. {note}"
    parts.append(
        "<h3>Trials</h3>"
        + (f'<p class="note">{note}</p>' if note else "")
        + f'<div class="scroll">{trials_table(top, id="trials-table")}</div>'
    )
    if len(top) < len(s["rows"]):
        parts.append(
            f"<details><summary>All {len(s['rows'])} trials (a click on a column's header sorts by it)</summary>"
            f'<div class="scroll tall">{trials_table(s["rows"], id="trials-all", sortable=True)}</div></details>'
        )


def sessions_text(sessions: list[dict] | None, live: bool = False) -> str:
    """A run's sessions (the command that started it, each resume) as one line of when and how each ended;
    `live`: the run's last session is running now."""
    if not sessions:
        return "-"
    out = []
    for k, x in enumerate(sessions):
        what = f"{'resumed' if x['kind'] == 'resume' else 'started'} {x['started']}"
        if x["kind"] == "resume":
            what += f" ({x.get('trials_continued', 0)} unfinished trial(s) taken up)"
        if "outcome" in x:
            what += f", {x['outcome']} after {duration(x.get('wall_seconds', 0.0))}"
        elif live and k == len(sessions) - 1:
            what += ", running"
        else:
            what += ", ended without a record (the driver was killed)"
        out.append(what)
    return "; ".join(out)


def _study(record: StudyRecord) -> tuple:
    """(the Optuna study, None) or (None, why it cannot be read here)."""
    try:
        return load_optuna_study(record), None
    except (FerTuneError, KeyError, ValueError, ImportError, RuntimeError) as exc:
        return None, exc


def _reference_section(page: Page, sdir: Path, own: list[dict], data: dict) -> None:
    parts = page.section("reference", "Against published numbers")
    if is_synthetic(data):  # synthetic numbers are never set beside FER2013 numbers
        parts.append(
            '<p class="note" id="reference-synthetic">This study ran on the embedded synthetic faces, so its '
            "accuracies are not comparable with results on FER2013 and are not listed here; the published "
            "numbers alone:</p>"
        )
        own = []
    # the results root's own reference/*.csv first, then the published numbers fer-tune ships
    dirs = [sdir.resolve().parent / "reference", shipped("reference")]
    seen: set[str] = set()
    rows: list[dict] = []
    for d in dirs:
        for f in (
            sorted((f for f in d.iterdir() if f.name.endswith(".csv")), key=lambda f: f.name) if d.is_dir() else []
        ):
            if f.name in seen:
                continue
            seen.add(f.name)
            with f.open(newline="") as fh:
                rows += list(csv.DictReader(fh))
    cols = ["result", "top1_pct", "split", "protocol", "epochs", "source", "note"]
    if not rows and not own:
        parts.append(f'<p class="note">No reference CSV found in {esc(" or ".join(map(str, dirs)))}.</p>')
        return
    parts.append(
        table(
            ["result", "top-1 %", "split", "protocol", "epochs", "source", "note"],
            [[r.get(c, "") for c in cols] for r in own + rows],
            {1},
            id="reference-table",
        )
    )
    parts.append(
        '<p class="note">Protocol paper: train = Training, val = PrivateTest, test = PublicTest (as '
        "usef-kh/fer); standard: train = Training, val = PublicTest, test = PrivateTest. Numbers on "
        "different protocols or splits are not directly comparable.</p>"
    )
