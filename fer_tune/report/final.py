"""The report's final-stage section, from results/NAME/final/ (written by fer_tune.tune.final.driver):

final.json (at launch), history.csv (every seed's train and fine-tune epochs, also while running), metrics.json
(when the stage finished: per seed models last / best_val / finetuned, and mean +- std over seeds) and
seed-S/saliency.png. A stage that is running or was interrupted has no metrics.json: its curves come from
history.csv and the section says so.
"""

from __future__ import annotations

import base64
import csv
import json
from pathlib import Path

from ..common import EMOTIONS
from ..recipe import MODELS
from ..recipe import pm as plain_pm
from .final_figures import MODEL_LABEL, accuracy_figure, confusion_figure, curves_figure, per_class_figure
from .guides import test_lines
from .html import Page, esc, fmt, key_table, number, table

TEST_SPLIT = {"paper": "PublicTest", "standard": "PrivateTest"}  # the FER2013 split each protocol tests on


def _read_json(path: Path) -> tuple[dict | None, str]:
    if not path.is_file():
        return None, ""
    try:
        return json.loads(path.read_text()), ""
    except (json.JSONDecodeError, OSError) as exc:
        return None, f"{path.name} cannot be read ({exc})"


def load_final(sdir: Path) -> dict | None:
    """Everything the section shows, or None when the study has no final/ directory."""
    fdir = Path(sdir) / "final"
    if not fdir.is_dir():
        return None
    info, err1 = _read_json(fdir / "final.json")
    metrics, err2 = _read_json(fdir / "metrics.json")
    history: list[dict] = []
    if (fdir / "history.csv").is_file():
        with (fdir / "history.csv").open(newline="") as fh:
            for r in csv.DictReader(fh):
                if r.get("arm") not in (None, "", "winner"):  # a baseline's epochs: compared in the table only
                    continue
                history.append(
                    {
                        "seed": int(r["seed"]),
                        "phase": r["phase"],
                        "epoch": int(r["epoch"]),
                        **{k: number(v) for k, v in r.items() if k not in ("seed", "phase", "epoch", "arm")},
                    }
                )
    return {"dir": fdir, "info": info, "metrics": metrics, "history": history, "errors": [e for e in (err1, err2) if e]}


def _seed_runs(fin: dict) -> dict[int, dict]:
    """{seed: {"train": [epoch rows], "finetune": [...], "best_epoch": int | None}} from metrics.json when the
    stage finished, else from history.csv."""
    m = fin["metrics"]
    runs: dict[int, dict] = {}
    if m:
        for s in m.get("seeds", []):
            runs[s["seed"]] = {
                "train": s.get("history", []),
                "finetune": s.get("finetune_history", []),
                "best_epoch": s.get("best_epoch"),
            }
        if any(r["train"] for r in runs.values()):
            return runs
    for h in fin["history"]:
        run = runs.setdefault(h["seed"], {"train": [], "finetune": [], "best_epoch": None})
        run["train" if h["phase"] == "train" else "finetune"].append(h)
    for run in runs.values():
        if run["train"] and run["best_epoch"] is None:
            run["best_epoch"] = max(run["train"], key=lambda h: h.get("val_acc") or -1)["epoch"]
    return runs


def _complete(seed: dict) -> bool:
    return seed.get("status", "complete") == "complete" and "models" in seed


def final_section(page: Page, fin: dict) -> None:
    parts = page.section("final", "Final stage: best configuration retrained, fine-tuned, tested")
    info, m = fin["info"], fin["metrics"]
    for e in fin["errors"]:
        parts.append(f'<p class="banner">{esc(e)}</p>')
    if info is None:
        parts.append(
            f'<p class="banner" id="final-state">{esc(fin["dir"])} holds no final.json yet: the final stage '
            "is starting or was stopped before it wrote one.</p>"
        )
        return
    runs = _seed_runs(fin)
    ok = [s for s in (m or {}).get("seeds", []) if _complete(s)]
    lines = test_lines(ok[0]) if ok else []  # chance, and the test split's majority rate once it is known
    if m and m.get("status") == "complete":
        state = "complete"
    elif m:
        state = "finished with failed seeds: " + ", ".join(
            f"seed {s['seed']} {s.get('status')}" for s in m.get("seeds", []) if not _complete(s)
        )
    else:
        done = {s: len(r["train"]) + len(r["finetune"]) for s, r in runs.items()}
        state = "running or interrupted (no metrics.json yet; `fer-tune final` continues it). Epochs so far: " + (
            ", ".join(f"seed {s}: {n}" for s, n in sorted(done.items())) or "none"
        )
    if state != "complete":
        parts.append(f'<p class="banner" id="final-state">Final stage {esc(state)}.</p>')
    trial, ft = info.get("trial", {}), info.get("finetune", {})
    items = [
        ("state", state),
        (
            "trial",
            f"#{trial.get('number')} ({trial.get('ray_trial_id')}): {trial.get('metric')} {fmt(trial.get('value'))}",
        ),
        ("params", ", ".join(f"{k}={fmt(v, 4)}" for k, v in trial.get("params", {}).items())),
        (
            "training",
            f"{info.get('config', {}).get('epochs', '?')} epochs; "
            + ", ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                for k, v in sorted(info.get("config", {}).items())
                if k != "epochs"
            ),
        ),
        ("fine-tune", f"{ft.get('epochs')} epochs, lr {ft.get('lr')}, {ft.get('scheduler')}, on {ft.get('on')}"),
        ("seeds", _seeds_text(info.get("seeds", []))),
        (
            "precision",
            ", ".join(sorted({s.get("precision", "not recorded") for s in (m or {}).get("seeds", [])})) or "-",
        ),
        ("test accuracy tracked", f"every {info.get('eval_every')} epochs (never used for selection)"),
        ("protocol", f"{info.get('protocol')}: {(m or {}).get('protocol_note', '')}"),
        ("created", info.get("created", "")),
    ]
    parts.append(key_table(items, id="final-table"))
    if runs:
        parts.append(page.figure(curves_figure(runs, lines), "final-curves"))
        if ft.get("on") == "train+val":
            parts.append(
                '<p class="note">The fine-tune trains on train + val (as the paper): its val curves are '
                "measured on data the model learns from.</p>"
            )
    if not m:
        _saliency(parts, fin["dir"], sorted(runs) or info.get("seeds", []))
        return
    if not ok:
        parts.append('<p class="note">No seed completed: no test evaluation to show.</p>')
        return
    agg = m.get("aggregate", {})
    rows = [
        [MODEL_LABEL[n]]
        + [pm(a[k]) for k in ("top1", "top2", "macro_f1")]
        + [", ".join(f"{v:.2f}" for v in a["top1"]["values"])]
        for n in MODELS
        if (a := agg.get(n))
    ]
    parts.append(
        f"<h3>Test accuracy over {len(ok)} seed(s){' (mean ± std)' if len(ok) > 1 else ''}</h3>"
        + table(["model", "top-1 %", "top-2 %", "macro F1 %", "top-1 per seed"], rows, {1, 2, 3}, id="final-accuracy")
    )
    if m.get("baseline"):
        parts.append(_baseline_table(m))
    if m.get("ensemble"):
        parts.append(_ensemble_table(m["ensemble"], m.get("baseline")))
    parts.append(page.figure(accuracy_figure(agg, lines), "final-accuracy"))
    parts.append(page.figure(confusion_figure(ok), "final-confusion"))
    parts.append(page.figure(per_class_figure(ok), "final-per-class"))
    _saliency(parts, fin["dir"], [s["seed"] for s in ok])


def _seeds_text(seeds: list[int]) -> str:
    """'2 (seeds 0, 1)', '1 (seed 0)': how many seeds, and which."""
    return f"{len(seeds)} (seed{'s' if len(seeds) != 1 else ''} {', '.join(map(str, seeds))})" if seeds else "none"


def pm(a: dict) -> str:
    """'mean ± std' over seeds; the mean alone with one seed (a spread needs two)."""
    return plain_pm(a, sign="±")


def _baseline_table(m: dict) -> str:
    b = m["baseline"]
    agg, bagg = m["aggregate"], b.get("aggregate", {})
    n = len(next(iter(agg.values()))["top1"]["values"]) if agg else 0
    rows = [
        [
            MODEL_LABEL[k],
            pm(agg[k]["top1"]),
            pm(bagg[k]["top1"]),
            f"{b['difference'][k]['top1']:+.2f}",
            ", ".join(f"{v:.2f}" for v in agg[k]["top1"]["values"]),
            ", ".join(f"{v:.2f}" for v in bagg[k]["top1"]["values"]),
        ]
        for k in MODELS
        if k in agg and k in bagg and k in b.get("difference", {})
    ]
    cfg = b.get("config", {})
    recipe = ", ".join(
        f"{k}={cfg[k]}"
        for k in (
            "optimizer",
            "lr",
            "momentum",
            "scheduler",
            "factor",
            "patience",
            "dropout",
            "weight_decay",
            "batch_size",
        )
        if k in cfg
    )
    spread = f"mean ± std over {n} seeds" if n > 1 else "one seed"
    failed = [s["seed"] for s in b.get("seeds", []) if not _complete(s)]
    return (
        f"<h3>The study's configuration against the {esc(b['name'])} recipe (test top-1 %, {spread})</h3>"
        + table(
            [
                "model",
                "this study's configuration",
                f"{b['name']} recipe",
                "difference (points)",
                "per seed (study)",
                f"per seed ({b['name']})",
            ],
            rows,
            {1, 2, 3},
            id="final-baseline",
        )
        + f'<p class="note">The {esc(b["name"])} recipe ({esc(recipe)}) was retrained on the same model, '
        "width, crops and data with the same epochs, fine-tune and seeds; the difference is the study's mean "
        "minus the recipe's"
        + (f", over the seeds both completed ({esc(', '.join(map(str, b['difference_seeds'])))})" if failed else "")
        + "."
        + (f" Seeds of the recipe that did not complete: {esc(', '.join(map(str, failed)))}." if failed else "")
        + "</p>"
    )


def _ensemble_table(e: dict, baseline: dict | None) -> str:
    """The members and their ensemble side by side: the study's reading of each, then the test split's."""
    done = [s for s in e["seeds"] if s["status"] == "complete"]
    spread = f"mean ± std over {len(done)} seeds" if len(done) > 1 else "one seed"

    def cells(agg: dict) -> list[str]:
        if not agg:
            return ["did not complete"] * 3 + [""]
        return [pm(agg[k]) for k in ("top1", "top2", "macro_f1")] + [
            ", ".join(f"{v:.2f}" for v in agg["top1"]["values"])
        ]

    rows = [
        [f"member {i}", f"#{m['trial']['number']}", fmt(m["trial"]["value"]), *cells(m["aggregate"])]
        for i, m in enumerate(e["members"], 1)
    ]
    rows.append(["ensemble", "", "", *cells(e["aggregate"])])
    if baseline and baseline.get("aggregate", {}).get("finetuned"):
        rows.append([f"{baseline['name']} recipe", "", "", *cells(baseline["aggregate"]["finetuned"])])
    diff = e.get("difference", {}).get("top1")
    metric = e["members"][0]["trial"]["metric"]
    return (
        f"<h3>Ensemble of {len(e['members'])} members, each fine-tuned (test %, {spread})</h3>"
        + table(
            ["model", "study trial", f"study {metric}", "top-1 %", "top-2 %", "macro F1 %", "top-1 per seed"],
            rows,
            {2, 3, 4, 5},
            id="final-ensemble",
        )
        + f'<p class="note">The members are the study\'s {len(e["members"])} best distinct configurations on the '
        "validation split, each retrained with this stage's epochs, fine-tune and seeds; per seed the ensemble "
        "averages its members' softmax on each test crop. Member 1 is the one validation picks alone"
        + (f": the ensemble differs from it by {diff:+.2f} points of top-1" if diff is not None else "")
        + ". model.pt and model.onnx hold the whole ensemble.</p>"
    )


def _saliency(parts: list[str], fdir: Path, seeds: list[int]) -> None:
    shown = 0
    for s in seeds:
        png = fdir / f"seed-{s}" / "saliency.png"
        if png.is_file():
            data = base64.b64encode(png.read_bytes()).decode()
            parts.append(
                f'<h3>Saliency maps, seed {esc(s)}</h3><p class="note">Test faces (center 40x40 crop) '
                "and |d loss / d pixel| overlaid, four per class in the order "
                f'{esc(", ".join(EMOTIONS))}.</p><img class="saliency" alt="saliency maps of seed '
                f'{esc(s)}" src="data:image/png;base64,{data}">'
            )
            shown += 1
    if not shown:
        parts.append('<p class="note">No saliency maps yet (written when a seed finishes).</p>')


def reference_rows(fin: dict) -> list[dict]:
    """This study's final test accuracies as rows of the comparison table."""
    m = fin.get("metrics") or {}
    agg = m.get("aggregate") or {}
    ft = m.get("finetune", {})
    epochs = m.get("config", {}).get("epochs", "")
    note = f"; {m.get('protocol_note')}" if m.get("protocol_note") else ""
    cfg = m.get("config", {})
    model = " ".join(x for x in (cfg.get("model", ""), f"width {cfg['width']}" if "width" in cfg else "") if x)
    return [
        {
            "result": f"this study{f' ({model})' if model else ''}, {MODEL_LABEL[n]} ("
            + (
                f"mean ± std over {len(agg[n]['top1']['values'])} seeds)"
                if len(agg[n]["top1"]["values"]) > 1
                else "one seed)"
            ),
            "top1_pct": pm(agg[n]["top1"]),
            "split": TEST_SPLIT.get(m.get("protocol", ""), "test"),
            "protocol": f"{m.get('protocol', '')}{note}",
            "epochs": f"{epochs} + {ft.get('epochs')} fine-tune" if n == "finetuned" else epochs,
            "source": "final/metrics.json",
        }
        for n in MODELS
        if n in agg
    ]
