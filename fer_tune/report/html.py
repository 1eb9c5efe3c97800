"""HTML for the reports: escaping (HTML and plotly's text), tables, numbers, and the one-file page that embeds
plotly.js once, inline (so that it opens offline).

The plotly.js it embeds is the bundle shipped beside this module (plotlyjs/plotly.min.js: only the trace types the
reports draw, built by plotlyjs/build.sh), gzipped and base64-encoded into the page: the browser unpacks it with its
DecompressionStream and runs it, then draws the figures, which wait in a queue until then. A figure's layout
template (plotly's default, 7 kB) is written once per page, not once per figure."""

from __future__ import annotations

import base64
import functools
import gzip
import html
import json
import re
from pathlib import Path
from typing import Any

from ..common import write_atomic

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1200px;padding:0 16px 48px;
color:#222}
h1{margin-top:24px}h2{border-bottom:1px solid #ccc;padding-bottom:4px;margin-top:40px}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;
vertical-align:top;font-size:14px}th{background:#f5f5f5}td.num{text-align:right;font-variant-numeric:tabular-nums}
.banner{background:#fff3cd;border:1px solid #e0c060;padding:8px 12px;margin:12px 0}
.note{color:#555;font-size:14px}code{background:#f3f3f3;padding:0 3px}
img.saliency{max-width:100%;image-rendering:pixelated;border:1px solid #ddd}
.top{position:sticky;top:0;z-index:10;background:#fff;padding:4px 0}
.data{background:#e8f1fb;border:1px solid #9cc3e6;padding:6px 12px;margin:4px 0;
font-size:14px}.data.synthetic{background:#fde8e8;border-color:#e6a0a0}
nav{display:flex;flex-wrap:wrap;gap:2px 14px;font-size:14px;padding:2px 0 4px;border-bottom:1px solid #ddd}
section{scroll-margin-top:96px}
.scroll{max-width:100%;overflow:auto}.scroll>table{width:max-content}.scroll.tall{max-height:560px}
table.sortable th{cursor:pointer}table.sortable th:hover{background:#e8e8e8}
tr.best td{background:#e3f2e1;font-weight:600}
ul.decision{margin:8px 0;padding-left:20px;line-height:1.45}ul.decision li{margin:4px 0}
p.next{font-size:15px;font-weight:600}
"""


CONFIG = '{"displaylogo": false, "responsive": true}'


def esc(value: Any) -> str:
    """Text for HTML: every <, >, & and quote escaped."""
    return html.escape(str(value), quote=True)


def _plotly_text(s: str) -> str:
    # plotly renders <b>, <i>, <a href>, <br>, ... in titles, names, tick labels and hover text: escape all but
    # the line breaks plotly's own hover texts (Optuna's) are made of
    return html.escape(s, quote=False).replace("&lt;br&gt;", "<br>")


def plotly_safe(obj: Any, key: str = "") -> Any:
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


def table(
    header: list[str],
    rows: list[list],
    numeric: set[int] = frozenset(),
    highlight: set[int] = frozenset(),
    *,
    id: str = "",
    sortable: bool = False,
) -> str:
    """An HTML table; `numeric`: right-aligned columns; `highlight`: rows marked as the best (class "best"); `id`:
    the table's element id (the report's tests and links find it by that); `sortable`: a click on a column's
    header sorts the rows by it (SORTER)."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join(
        ('<tr class="best">' if k in highlight else "<tr>")
        + "".join(f'<td class="num">{esc(c)}</td>' if i in numeric else f"<td>{esc(c)}</td>" for i, c in enumerate(r))
        + "</tr>"
        for k, r in enumerate(rows)
    )
    cls = ' class="sortable"' if sortable else ""
    return f"<table{_id(id)}{cls}><tr>{head}</tr>{body}</table>"


def key_table(items: list[tuple[str, Any]], *, id: str = "") -> str:
    """A two-column table of (key, value) rows, keys as row headers."""
    return f"<table{_id(id)}>" + "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in items) + "</table>"


def _id(id: str) -> str:
    return f' id="{esc(id)}"' if id else ""


def fmt(v: Any, digits: int = 2) -> str:
    """A value for a table: floats with `digits` decimals (3 significant digits below 0.01), "-" for none."""
    if v is None or v == "":
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}" if abs(v) >= 0.01 or v == 0 else f"{v:.3g}"
    return str(v)


def number(v: object) -> float | None:
    """A CSV cell as a float, None when it is empty or not a number."""
    try:
        return float(v) if v not in ("", None) else None  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


PLOTLY_JS = Path(__file__).with_name("plotlyjs") / "plotly.min.js"
TRACE_TYPES = ("scatter", "bar", "heatmap", "contour")  # the ones in PLOTLY_JS (see build.sh)

# Runs in <head> after the packed plotly.js: unpacks and runs it, then draws the figures queued by ferFigure (a
# figure met after that is drawn at once). A browser without DecompressionStream (before Chrome 80, Firefox 113,
# Safari 16.4) gets a sentence in each figure's place.
LOADER = """(function(){var T=%s,q=[],failed=null;
function draw(f){if(failed){document.getElementById(f[0]).textContent='This figure cannot be drawn: '+failed;return;}
var l=f[3];if(f[1]>=0)l.template=T[f[1]];Plotly.newPlot(f[0],f[2],l,f[4]);}
window.ferFigure=function(id,t,data,layout,config){var f=[id,t,data,layout,config];if(q)q.push(f);else draw(f);};
function done(why){failed=why;var w=q;q=null;w.forEach(draw);}
if(!window.DecompressionStream||!window.Response){done('this browser cannot unpack plotly.js (it needs '+
'DecompressionStream: Chrome or Edge 80+, Firefox 113+, Safari 16.4+).');return;}
var b=atob(document.getElementById('plotly-js').textContent),a=new Uint8Array(b.length);
for(var i=0;i<b.length;i++)a[i]=b.charCodeAt(i);
new Response(new Blob([a]).stream().pipeThrough(new DecompressionStream('gzip'))).text().then(function(js){
var s=document.createElement('script');s.textContent=js;document.head.appendChild(s);done(null);},
function(e){done('plotly.js could not be unpacked ('+e+').');});})();"""


# a click on a sortable table's header sorts its rows by that column (numbers as numbers, "-" and blanks last);
# a second click reverses the order
SORTER = """document.addEventListener('click',function(e){var th=e.target.closest('table.sortable th');if(!th)return;
var t=th.closest('table'),rows=Array.from(t.rows),head=rows.shift(),i=th.cellIndex,d=th.dataset.dir==='a'?-1:1;
function v(r){var s=r.cells[i].textContent.trim(),n=parseFloat(s.replace(/,/g,''));return s===''||s==='-'?null:
(isNaN(n)?s:n);}rows.sort(function(a,b){var x=v(a),y=v(b);if(x===null||y===null)return x===y?0:x===null?1:-1;
return (typeof x==typeof y?(x<y?-1:x>y?1:0):(typeof x=='number'?-1:1))*d;});th.dataset.dir=d===1?'a':'d';
rows.forEach(function(r){head.parentNode.appendChild(r);});});"""


@functools.lru_cache(maxsize=1)
def packed_plotly_js() -> str:
    """The shipped plotly.js bundle, gzipped and base64-encoded (what the page carries)."""
    return base64.b64encode(gzip.compress(PLOTLY_JS.read_bytes(), 9, mtime=0)).decode("ascii")


def _script_json(obj: Any) -> str:
    """JSON for inside a <script>: plotly's encoder (numpy arrays, dates), "</" never closing the script."""
    from plotly.io.json import to_json_plotly

    return to_json_plotly(obj).replace("</", "<\\/")


class Page:
    """Sections of HTML and plotly figures; `html()` embeds plotly.js once (packed) and each layout template once."""

    def __init__(self, title: str):
        self.title = title
        self.sections: list[tuple[str, str, list[str]]] = []
        self.figures: list[str] = []
        self.templates: list[str] = []

    def section(self, anchor: str, title: str) -> list[str]:
        parts: list[str] = []
        self.sections.append((anchor, title, parts))
        return parts

    def figure(self, fig: Any, name: str) -> str:
        """A figure's div and the script that draws it (`ferFigure(id, template, data, layout, config)`)."""
        div_id = f"fig-{name}"
        fig_dict = plotly_safe(fig.to_plotly_json() if hasattr(fig, "to_plotly_json") else fig)
        missing = sorted({t.get("type", "scatter") for t in fig_dict.get("data", [])} - set(TRACE_TYPES))
        if missing:  # a trace type the shipped bundle lacks (plotlyjs/build.sh's TRACES) would throw in the browser
            return (
                f'<p class="note" id="{div_id}-missing">Figure {esc(name)} is left out: it needs plotly\'s '
                f"{esc(', '.join(missing))} trace, which the report's plotly.js does not carry.</p>"
            )
        self.figures.append(div_id)
        layout = dict(fig_dict.get("layout", {}))
        template = layout.pop("template", None)
        k = -1
        if template is not None:
            t = _script_json(template)
            if t not in self.templates:
                self.templates.append(t)
            k = self.templates.index(t)
        height = layout.get("height")
        args = ", ".join(
            (json.dumps(div_id), str(k), _script_json(fig_dict.get("data", [])), _script_json(layout), CONFIG)
        )
        return (
            f'<div style="height:{f"{height}px" if height else "100%"}; width:100%;"><div id="{div_id}" '
            f'class="plotly-graph-div" style="height:100%; width:100%;"></div>'
            f'<script type="text/javascript">ferFigure({args});</script></div>'
        )

    def html(self, header: str, top: str = "") -> str:
        """The page: `top` (the data line) and the table of contents stay in view as the page scrolls; `header`
        (banners) follows them."""
        # the table of contents names each section by its title's head ("Optuna", "Learning curves"): one line
        nav = "".join(
            f'<a href="#{a}" title="{esc(t)}">{esc(re.split(r"[:(,]", t)[0].strip())}</a>' for a, t, _ in self.sections
        )
        body = "".join(f'<section id="{a}"><h2>{esc(t)}</h2>{"".join(p)}</section>' for a, t, p in self.sections)
        loader = LOADER % f"[{','.join(self.templates)}]"
        return (
            f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(self.title)}</title>'
            f'<style>{CSS}</style><script type="text/javascript">window.PlotlyConfig={{MathJaxConfig:"local"}};'
            f'</script><script id="plotly-js" type="application/gzip">{packed_plotly_js()}</script>'
            f'<script type="text/javascript">{loader}</script><script type="text/javascript">{SORTER}</script>'
            f'</head><body><h1>{esc(self.title)}</h1><div class="top">{top}<nav>{nav}</nav></div>{header}{body}'
            "</body></html>\n"
        )


def write_page(path: Path, text: str) -> None:
    """The report's file, written atomically (a reader never sees half a report)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, text.encode("utf-8"))


def params_text(row: dict) -> str:
    """A trials.csv row's parameters as `name=value, ...`."""
    return ", ".join(f"{k[6:]}={fmt(v, 4)}" for k, v in row.items() if k.startswith("param_") and v != "")
