"""The study report: results/NAME -> one HTML file a person opens with no server and no internet.

plotly.js is embedded once (one inline script in <head>); every figure is a plotly div. Sections: summary, Optuna's
own plots from the study's storage, learning curves of every trial, the seed's comparisons (optimizer x scheduler,
scheduler, dropout, architecture: whichever the study searches), the class-aware view (per-emotion val recall of
the top trials), the final stage (fer_tune.report_final) and a table against published numbers
(results/reference/*.csv).

Everything from a file, a study name or a parameter is escaped: in the HTML, and in plotly's text, which interprets
HTML-like tags (see ``plotly_safe``). Only files and the Optuna storage are read, so the report also works on a
study that is running or was interrupted (shown as partial).
"""

from __future__ import annotations

import csv
import html
import time
import warnings
from collections import Counter
from pathlib import Path

from .common import EMOTIONS, FerTuneError
from .lock import running_line
from .study import read_study, resolve_storage
from .trials import status_summary, study_results

STATUS_STYLE = {  # learning-curve style per trial status: color, dash, end-marker symbol
    "completed": ("#1f77b4", "solid", "circle"), "pruned": ("#ff7f0e", "dash", "x"),
    "diverged": ("#d62728", "dot", "x-thin-open"), "error": ("#d62728", "dot", "x-thin-open"),
}
RUNNING_STYLE = ("#2ca02c", "dashdot", "circle-open")
COMPARISONS = (("optimizer", "optimizer"), ("scheduler", "learning-rate scheduler"), ("dropout", "dropout"),
               ("model", "architecture"))
TOP_CLASS_TRIALS = 10
REPO_REFERENCE = Path(__file__).resolve().parents[1] / "results" / "reference"

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1200px;padding:0 16px 48px;
color:#222}
h1{margin-top:24px}h2{border-bottom:1px solid #ccc;padding-bottom:4px;margin-top:40px}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;
vertical-align:top;font-size:14px}th{background:#f5f5f5}td.num{text-align:right;font-variant-numeric:tabular-nums}
.banner{background:#fff3cd;border:1px solid #e0c060;padding:8px 12px;margin:12px 0}
.note{color:#555;font-size:14px}nav a{margin-right:12px}code{background:#f3f3f3;padding:0 3px}
img.saliency{max-width:100%;image-rendering:pixelated;border:1px solid #ddd}
.data{position:sticky;top:0;z-index:10;background:#e8f1fb;border:1px solid #9cc3e6;padding:6px 12px;margin:8px 0;
font-size:14px}.data.synthetic{background:#fde8e8;border-color:#e6a0a0}
"""


# ---------------------------------------------------------------------------------------------------------
# escaping and page assembly
# ---------------------------------------------------------------------------------------------------------
def esc(value) -> str:
    """Text for HTML: every <, >, & and quote escaped."""
    return html.escape(str(value), quote=True)


def _plotly_text(s: str) -> str:
    # plotly renders <b>, <i>, <a href>, <br>, ... in titles, names, tick labels and hover text: escape all but
    # the line breaks plotly's own hover texts (Optuna's) are made of
    return html.escape(s, quote=False).replace("&lt;br&gt;", "<br>")


def plotly_safe(obj, key: str = ""):
    """A figure dict with every string escaped for plotly's text rendering, except the hover/text templates this
    module (or Optuna) wrote, whose user data arrive through customdata / text (escaped here)."""
    if isinstance(obj, dict):
        return {k: v if k in ("hovertemplate", "texttemplate") else plotly_safe(v, k) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plotly_safe(v, key) for v in obj]
    if isinstance(obj, str):
        return _plotly_text(obj)
    if hasattr(obj, "dtype") and getattr(obj.dtype, "kind", "") in "OUS":  # numpy arrays of strings
        return [plotly_safe(v, key) for v in obj.tolist()]
    return obj


def table(header: list[str], rows: list[list], numeric: set[int] = frozenset()) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td class=\"num\">{esc(c)}</td>" if i in numeric else f"<td>{esc(c)}</td>"
                                    for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def fmt(v, digits: int = 2) -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if abs(v) >= 0.01 or v == 0 else f"{v:.3g}"
    return str(v)


def duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class Page:
    """Sections of HTML and plotly figures; `html()` embeds plotly.js once, inline."""

    def __init__(self, title: str):
        self.title = title
        self.sections: list[tuple[str, str, list[str]]] = []
        self.figures: list[str] = []

    def section(self, anchor: str, title: str) -> list[str]:
        parts: list[str] = []
        self.sections.append((anchor, title, parts))
        return parts

    def figure(self, fig, name: str) -> str:
        import plotly.io as pio

        div_id = f"fig-{name}"
        self.figures.append(div_id)
        fig_dict = plotly_safe(fig.to_plotly_json() if hasattr(fig, "to_plotly_json") else fig)
        return pio.to_html(fig_dict, include_plotlyjs=False, full_html=False, div_id=div_id,
                           config={"displaylogo": False, "responsive": True})

    def html(self, header: str) -> str:
        from plotly.offline import get_plotlyjs

        nav = "".join(f'<a href="#{a}">{esc(t)}</a>' for a, t, _ in self.sections)
        body = "".join(f'<section id="{a}"><h2>{esc(t)}</h2>{"".join(p)}</section>' for a, t, p in self.sections)
        return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(self.title)}</title>'
                f'<style>{CSS}</style><script type="text/javascript">window.PlotlyConfig={{MathJaxConfig:"local"}};'
                f'</script><script type="text/javascript">{get_plotlyjs()}</script></head><body>'
                f"<h1>{esc(self.title)}</h1>{header}<nav>{nav}</nav>{body}</body></html>\n")


# ---------------------------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------------------------
def write_report(study_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the study's report (default results/NAME/report.html, atomically) and return its path."""
    sdir = Path(study_dir)
    text = build_report(sdir)
    path = Path(out) if out else sdir / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


def build_report(sdir: Path) -> str:
    from . import report_final

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
        header = "".join(f'<p class="banner" id="running-{what}">Running: {esc(running_line(what, info))} when this '
                         f'report was written ({time.strftime("%Y-%m-%d %H:%M:%S")}).</p>'
                         for what, info in running.items())
    if summary["finished"] < summary["num_samples"] or unfinished:
        state = ("It is still running" if "study" in running else
                 f"It was interrupted (<code>fer-tune resume {esc(sdir)}</code> continues it)")
        header += (f'<p class="banner" id="partial">Partial study: {summary["finished"]} of {summary["num_samples"]} '
                   f"trials finished ({len(unfinished)} started and unfinished). {state}; the figures show the "
                   "results so far.</p>")
    _summary_section(page, sdir, record, summary)
    _optuna_section(page, record)
    _curves_section(page, spec, summary["rows"], results)
    _comparisons_section(page, spec, summary["rows"])
    _class_section(page, spec, summary["rows"], results)
    final = report_final.load_final(sdir)
    if final is not None:
        report_final.final_section(page, final)
    _reference_section(page, sdir, report_final.reference_rows(final) if final else [], record["data"])
    return page.html(_data_line(record["data"]) + header)


def is_synthetic(data: dict) -> bool:
    return data.get("format") == "synthetic"


def _data_line(data: dict) -> str:
    """The data the study used, at the top of the report."""
    sizes = ", ".join(f"{k} {v:,}" for k, v in data.get("sizes", {}).items())
    if is_synthetic(data):
        return (f'<p class="data synthetic" id="data-used">Data: the embedded synthetic faces ({esc(data.get("source"))}; '
                f"{esc(sizes)}), not FER2013. Accuracies here measure the pipeline, not emotion recognition on real "
                "faces.</p>")
    return (f'<p class="data" id="data-used">Data: {esc(data.get("source"))} ({esc(data.get("format", ""))}; '
            f"{esc(sizes)}), protocol {esc(data.get('protocol', ''))}.</p>")


def _params(row: dict) -> str:
    return ", ".join(f"{k[6:]}={fmt(v, 4)}" for k, v in row.items() if k.startswith("param_") and v != "")


def _summary_section(page: Page, sdir: Path, record: dict, s: dict) -> None:
    spec, data = record["spec"], record["data"]
    es = spec["early_stopping"]
    best = s["best"]
    metric = spec["metric"]
    wall = sum(r.get("wall_seconds", 0.0) for r in record["runs"])
    restarted = [r for r in s["rows"] if int(r["restarts"])]
    items = [
        ("study", f"{record['name']} ({sdir.resolve()})"), ("description", spec.get("description", "").strip()),
        ("space file", f"{record['space_file']} (copy: space.yaml)"), ("metric", f"{metric} ({spec['mode']})"),
        ("sampler", f"{spec['sampler']} (seed {spec['seed']})"),
        ("scheduler (early stopping)", ", ".join([es["type"]] + [f"{k} {v}" for k, v in es.items() if k != "type"])),
        ("epochs per trial", f"at most {spec['max_epochs']}"),
        ("resources per trial", ", ".join(f"{k} {v}" for k, v in spec["resources"].items())),
        ("data", f"{data['source']} ({data.get('format', '')}; sizes "
                 + ", ".join(f"{k} {v:,}" for k, v in data.get("sizes", {}).items()) + ")"),
        ("protocol", f"{data['protocol']}: {data.get('protocol_note', '')}"),
        ("trials", f"{s['finished']} of {s['num_samples']} finished; by state: "
                   + (", ".join(f"{k} {n}" for k, n in sorted(s["states"].items())) or "none yet")),
        ("best", f"trial {best['number']}: {metric} {fmt(best['best_' + metric])} at epoch {best['best_epoch']}; "
                 f"{_params(best)}" if best else "no trial has reported yet"),
        ("device-hours", fmt(s["device_hours"], 4)), ("wall time", f"{duration(wall)} (all runs)"),
        ("precision", ", ".join(f"{p} ({n} trial{'s' if n > 1 else ''})" for p, n in sorted(Counter(
            r.get("precision") or "not recorded" for r in s["rows"] if int(r["epochs"])).items())) or "-"),
        ("epochs trained", s["epochs_trained"]), ("created", record.get("created", "")),
        ("fixed settings", ", ".join(f"{k}={v}" for k, v in spec.get("fixed", {}).items()) or "-"),
        ("versions", ", ".join(f"{k} {v}" for k, v in record.get("fingerprint", {}).get("versions", {}).items())),
    ]
    parts = page.section("summary", "Summary")
    parts.append('<table id="summary-table">' + "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>"
                                                      for k, v in items) + "</table>")
    space = [[n, p["type"], ", ".join(map(str, p.get("choices", []))) or
              f"{p.get('low', 0)} .. {p.get('high', 0)}{' (log)' if p.get('log') else ''}"]
             for n, p in spec["space"].items()]
    parts.append("<h3>Search space</h3>" + table(["parameter", "type", "values"], space))
    runs = [[r["dir"], r["num_samples"], r["seed"], r.get("max_concurrent") or "-",
             duration(r.get("wall_seconds", 0.0))] for r in record["runs"]]
    parts.append("<h3>Runs (sweep, extends; resumes continue a run)</h3>"
                 + table(["run", "trials", "sampler seed", "max concurrent", "wall time"], runs, {1, 2}))
    parts.append(f'<p class="note">{len(restarted)} trial(s) continued from a checkpoint (crash retries or '
                 f"resumes), {sum(int(r['restarts']) for r in restarted)} restart(s) in all"
                 + (": " + ", ".join(f"#{r['number']} x{r['restarts']}" for r in restarted) if restarted else "")
                 + ".</p>")
    cols = ["number", "status", "epochs", f"best_{metric}", "best_epoch", "wall_seconds", "device_seconds", "node",
            "restarts"]
    rows = [[r[c] for c in cols] + [_params(r)] for r in s["rows"]]
    parts.append("<h3>Trials</h3>" + table(cols + ["params"], rows, {0, 2, 3, 4, 5, 6, 8}).replace(
        "<table>", '<table id="trials-table">', 1))


def _optuna_section(page: Page, record: dict) -> None:
    import optuna
    import optuna.visualization as vis
    from optuna.importance import PedAnovaImportanceEvaluator, get_param_importances
    from optuna.trial import TrialState

    parts = page.section("optuna", "Optuna: history, parallel coordinates, importance, slice, contour")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=record["optuna_study"], storage=resolve_storage(record["storage"]))
    except (FerTuneError, KeyError, ValueError, ImportError, RuntimeError) as exc:
        parts.append(f'<p class="note">The Optuna storage cannot be read here ({esc(exc)}); its plots are left '
                     "out.</p>")
        return
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not done:
        parts.append('<p class="note">No trial has completed yet: Optuna plots need completed trials.</p>')
        return
    varied = [p for p in record["spec"]["space"] if len({repr(t.params.get(p)) for t in done if p in t.params}) > 1]
    figs = [("optuna-history", lambda: vis.plot_optimization_history(study, target_name=record["spec"]["metric"])),
            ("optuna-parallel", lambda: vis.plot_parallel_coordinate(study, target_name=record["spec"]["metric"]))]
    top = varied
    why = ""
    if len(done) < 2:
        why = f"only {len(done)} trial has completed (importance needs at least 2)"
    elif not varied:
        why = "no searched parameter took more than one value among the completed trials"
    else:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                imp = get_param_importances(study, evaluator=PedAnovaImportanceEvaluator(), params=varied)
            top = sorted(varied, key=lambda p: -imp.get(p, 0.0))
            figs.append(("optuna-importance", lambda: vis.plot_param_importances(
                study, evaluator=PedAnovaImportanceEvaluator(), params=varied,
                target_name=record["spec"]["metric"])))
        except Exception as exc:  # noqa: BLE001 (Optuna raises several types; the report must still be written)
            why = f"Optuna could not compute it ({type(exc).__name__}: {exc})"
    if top:
        figs.append(("optuna-slice", lambda: vis.plot_slice(study, params=top[:3],
                                                             target_name=record["spec"]["metric"])))
    if len(top) >= 2:
        figs.append(("optuna-contour", lambda: vis.plot_contour(study, params=top[:2],
                                                                 target_name=record["spec"]["metric"])))
    for name, make in figs:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fig = make()
        except Exception as exc:  # noqa: BLE001
            parts.append(f'<p class="note">{esc(name[7:])} plot not available: {esc(type(exc).__name__)}: '
                         f"{esc(exc)}</p>")
            continue
        if name == "optuna-history":
            fig.update_layout(title=f"Optimization history of {record['name']}")
        parts.append(page.figure(fig, name))
    if why:
        parts.append(f'<p class="note" id="importance-note">Hyperparameter importance is not shown: {esc(why)}.</p>')
    parts.append(f'<p class="note">{len(done)} completed trial(s); Optuna leaves pruned and failed trials out of '
                 f"these plots. Top parameters (slice, contour): {esc(', '.join(top[:3]) or '-')}.</p>")


def _curves_section(page: Page, spec: dict, rows: list[dict], results: dict) -> None:
    import plotly.graph_objects as go

    metric = spec["metric"]
    parts = page.section("curves", f"Learning curves ({metric} per epoch, every trial)")
    fig = go.Figure()
    best = max((r for r in rows if r[f"best_{metric}"] != ""), default=None,
               key=lambda r: r[f"best_{metric}"] * (1 if spec["mode"] == "max" else -1))
    shown: set[str] = set()
    for r in rows:
        res = [x for x in results.get(r["ray_trial_id"], []) if metric in x]
        if not res:
            continue
        # a trial Tune holds as pending or paused while the study runs is drawn as running
        status = "running" if r["state"] == "RUNNING" and r["status"] != "interrupted" else r["status"]
        color, dash, symbol = STATUS_STYLE.get(status, RUNNING_STYLE)
        is_best = best is not None and r["number"] == best["number"]
        label = f"trial {r['number']} ({status})"
        xs, ys = [x["epoch"] for x in res], [x[metric] for x in res]
        fig.add_trace(go.Scatter(
            x=xs, y=ys, mode="lines+markers", name=f"best: {label}" if is_best else status,
            legendgroup="best" if is_best else status, showlegend=is_best or status not in shown,
            line={"color": "#000" if is_best else color, "dash": dash, "width": 3 if is_best else 1.5},
            marker={"size": [4] * (len(xs) - 1) + [10], "symbol": ["circle"] * (len(xs) - 1) + [symbol]},
            customdata=[[label, _params(r)]] * len(xs),
            hovertemplate="%{customdata[0]}<br>epoch %{x}: %{y:.2f}<br>%{customdata[1]}<extra></extra>"))
        shown.add(status)
    if not fig.data:
        parts.append('<p class="note">No trial has reported an epoch yet.</p>')
        return
    fig.update_layout(title=f"{metric} per epoch; pruned (x) and failed (thin x) trials end early", height=520,
                      xaxis_title="epoch", yaxis_title=metric, legend_title_text="trial status")
    parts.append(page.figure(fig, "curves"))


def _comparisons_section(page: Page, spec: dict, rows: list[dict]) -> None:
    import plotly.graph_objects as go

    metric, key = spec["metric"], f"best_{spec['metric']}"
    pick = max if spec["mode"] == "max" else min
    scored = [r for r in rows if r[key] != ""]
    space = spec["space"]
    parts = page.section("comparisons", f"Comparisons: best {metric} per setting")
    varied = {n for n, _ in COMPARISONS if n in space and len({str(r.get(f"param_{n}")) for r in scored}) > 1}

    def best_per(name: str, subset: list[dict]) -> dict[str, tuple[float, int]]:
        groups: dict[str, list[float]] = {}
        for r in subset:
            groups.setdefault(str(r[f"param_{name}"]), []).append(float(r[key]))
        return {v: (pick(xs), len(xs)) for v, xs in groups.items()}

    if {"optimizer", "scheduler"} <= varied:
        fig = go.Figure()
        for sched in sorted({str(r["param_scheduler"]) for r in scored}):
            b = best_per("optimizer", [r for r in scored if str(r["param_scheduler"]) == sched])
            fig.add_trace(go.Bar(x=list(b), y=[v for v, _ in b.values()], name=sched,
                                 text=[f"{v:.2f}" for v, _ in b.values()], customdata=[n for _, n in b.values()],
                                 hovertemplate="%{x}: %{y:.2f} (%{customdata} trials)<extra></extra>"))
        fig.update_layout(barmode="group", title=f"Best {metric} per optimizer x scheduler", height=420,
                          xaxis_title="optimizer", yaxis_title=metric, legend_title_text="scheduler")
        parts.append(page.figure(fig, "cmp-optimizer-scheduler"))
    for name, label in COMPARISONS:
        if name not in varied or (name == "optimizer" and "scheduler" in varied):
            continue
        if space[name]["type"] == "float":
            fig = go.Figure()
            for status in sorted({r["status"] for r in scored}):
                sub = [r for r in scored if r["status"] == status]
                fig.add_trace(go.Scatter(
                    x=[r[f"param_{name}"] for r in sub], y=[r[key] for r in sub], mode="markers", name=status,
                    marker={"color": STATUS_STYLE.get(status, RUNNING_STYLE)[0], "size": 9},
                    text=[f"trial {r['number']} ({status})" for r in sub],
                    hovertemplate="%{text}<br>%{x:.4g}: %{y:.2f}<extra></extra>"))
        else:
            b = best_per(name, scored)
            fig = go.Figure(go.Bar(x=list(b), y=[v for v, _ in b.values()], text=[f"{v:.2f}" for v, _ in b.values()],
                                   customdata=[n for _, n in b.values()],
                                   hovertemplate="%{x}: %{y:.2f} (%{customdata} trials)<extra></extra>"))
            fig.update_xaxes(type="category")
        fig.update_layout(title=f"Best {metric} per {label}", height=380, xaxis_title=label, yaxis_title=metric)
        parts.append(page.figure(fig, f"cmp-{name}"))
    if not scored:
        parts.append('<p class="note">No trial has a value yet.</p>')
    elif not varied:
        parts.append('<p class="note">This study varies none of optimizer, scheduler, dropout and model (the '
                     "seed's comparisons); see the Optuna plots for its parameters.</p>")
    else:
        parts.append(f'<p class="note">Each trial counts with its best epoch; pruned trials stopped early. '
                     f"{len(scored)} trial(s) with a value.</p>")


def _class_section(page: Page, spec: dict, rows: list[dict], results: dict) -> None:
    import plotly.graph_objects as go

    key = f"best_{spec['metric']}"
    parts = page.section("classes", "Class-aware view: per-emotion val recall")
    recalls = {}
    for r in rows:
        at = {x["epoch"]: x for x in results.get(r["ray_trial_id"], [])}.get(r["best_epoch"] or -1, {})
        if any(f"val_recall_{e}" in at for e in EMOTIONS):
            recalls[r["number"]] = [at.get(f"val_recall_{e}") for e in EMOTIONS]
    scored = sorted((r for r in rows if r[key] != "" and r["number"] in recalls),
                    key=lambda r: r[key], reverse=spec["mode"] == "max")
    if not scored:
        parts.append('<p class="note">No trial reported per-class recall (trials trained before fer-tune reported '
                     "<code>val_recall_&lt;emotion&gt;</code>, or none has finished an epoch).</p>")
        return
    top = scored[:TOP_CLASS_TRIALS]
    z = [recalls[r["number"]] for r in top]
    fig = go.Figure(go.Heatmap(
        z=z, x=list(EMOTIONS), y=[f"trial {r['number']}" for r in top], zmin=0, zmax=100, colorscale="Viridis",
        text=[[fmt(v, 1) for v in row] for row in z], texttemplate="%{text}",
        customdata=[[_params(r)] * len(EMOTIONS) for r in top],
        hovertemplate="%{y}, %{x}: %{z:.1f} %<br>%{customdata}<extra></extra>", colorbar={"title": "recall %"}))
    fig.update_layout(title=f"Val recall per emotion at each trial's best epoch (top {len(top)} by {key})",
                      height=160 + 34 * len(top), yaxis={"autorange": "reversed"})
    parts.append(page.figure(fig, "class-recall"))
    for emotion in ("disgust", "fear"):
        i = EMOTIONS.index(emotion)
        ranked = sorted((r for r in scored if recalls[r["number"]][i] is not None),
                        key=lambda r: -recalls[r["number"]][i])[:3]
        parts.append(f"<h3>Best {emotion} recall</h3>" + table(
            ["trial", f"{emotion} recall %", key, "params"],
            [[r["number"], fmt(recalls[r["number"]][i], 1), fmt(r[key]), _params(r)] for r in ranked], {0, 1, 2}))


def _reference_section(page: Page, sdir: Path, own: list[dict], data: dict) -> None:
    parts = page.section("reference", "Against published numbers")
    if is_synthetic(data):  # synthetic numbers are never set beside FER2013 numbers
        parts.append('<p class="note" id="reference-synthetic">This study ran on the embedded synthetic faces, so its '
                     "accuracies are not comparable with results on FER2013 and are not listed here; the published "
                     "numbers alone:</p>")
        own = []
    dirs = [sdir.resolve().parent / "reference", REPO_REFERENCE]
    seen: set[str] = set()
    rows: list[dict] = []
    for d in dirs:
        for f in sorted(d.glob("*.csv")) if d.is_dir() else []:
            if f.name in seen:
                continue
            seen.add(f.name)
            with f.open(newline="") as fh:
                rows += list(csv.DictReader(fh))
    cols = ["result", "top1_pct", "split", "protocol", "epochs", "source", "note"]
    if not rows and not own:
        parts.append(f'<p class="note">No reference CSV found in {esc(" or ".join(map(str, dirs)))}.</p>')
        return
    parts.append(table(cols, [[r.get(c, "") for c in cols] for r in own + rows], {1}).replace(
        "<table>", '<table id="reference-table">', 1))
    parts.append('<p class="note">Protocol paper: train = Training, val = PrivateTest, test = PublicTest (as '
                 "usef-kh/fer); standard: train = Training, val = PublicTest, test = PrivateTest. Numbers on "
                 "different protocols or splits are not directly comparable.</p>")
