"""The routing report: one self-contained HTML file (plotly's JS inlined, no network) from a store.

    from moelora.dashboard import build_report
    build_report("runs/tensorboard/version_0")          # -> .../routing_report.html

Views: run header with the config; balance scalars over steps; dropped slots; expert load
(layers × experts, with a slider over training windows); load over time per layer; per-task
routing; co-activation; token-level routing of sample texts (plain HTML, coloured by expert).
"""

from __future__ import annotations

import html
import json
import os
import time
from pathlib import Path
from typing import Any

from . import analysis as A
from .store import STORE_DIR, StoreContents, read_store

REPORT_NAME = "routing_report.html"
MAX_POINTS = 60       # time buckets in the over-time views (windows are merged, not dropped)
MAX_SAMPLE_SETS = 6   # token-view sample records shown (the latest ones)

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1f2430;background:#f6f7f9}
header{background:#1f2a44;color:#fff;padding:18px 28px}
header h1{margin:0 0 6px;font-size:22px;font-weight:600}
header .sub{opacity:.8;font-size:13px}
.facts{display:flex;flex-wrap:wrap;gap:10px;margin-top:12px}
.fact{background:rgba(255,255,255,.1);border-radius:6px;padding:6px 10px;font-size:13px}
.fact b{display:block;font-size:16px}
main{max-width:1200px;margin:0 auto;padding:8px 24px 40px}
nav{font-size:13px;margin:12px 0}
nav a{margin-right:14px;color:#3b5bdb;text-decoration:none}
section{background:#fff;border-radius:8px;box-shadow:0 1px 3px rgba(0,0,0,.08);margin:16px 0;padding:14px 18px}
section h2{font-size:17px;margin:2px 0 4px}
p.note{color:#555;font-size:13px;margin:2px 0 10px}
.warn{background:#fff4e5;border-left:4px solid #f08c00;padding:8px 12px;font-size:13px}
table.cfg{border-collapse:collapse;font-size:12.5px;margin:4px 18px 8px 0;vertical-align:top;display:inline-table}
table.cfg caption{text-align:left;font-weight:600;padding:4px 0}
table.cfg td{border-top:1px solid #eee;padding:2px 8px 2px 0;max-width:420px;word-break:break-word}
table.cfg td:first-child{color:#666}
details pre{background:#f3f4f6;padding:10px;font-size:12px;overflow:auto;max-height:420px}
.controls{font-size:13px;margin-bottom:8px}
.controls select{margin:0 14px 0 4px}
.legend span{display:inline-block;margin:2px 10px 2px 0;font-size:12px}
.legend i{display:inline-block;width:12px;height:12px;border-radius:2px;margin-right:4px;vertical-align:-1px}
.text-row{margin:6px 0;line-height:2.1;font-size:14px}
.text-row .meta{display:inline-block;min-width:110px;font-size:11px;color:#666}
.tok{padding:2px 3px;margin:0 1px;border-radius:3px;white-space:pre}
.tok.none{outline:1px dashed #999;color:#777}
.tok.cont{margin-left:-2px;padding-left:1px;border-top-left-radius:0;border-bottom-left-radius:0}
"""

# The token view renders from embedded JSON so many layers × samples stay compact.
_TOKENS_JS = """
(function(){
  const data = JSON.parse(document.getElementById('token-data').textContent);
  const sampleSel = document.getElementById('token-sample'), layerSel = document.getElementById('token-layer');
  const out = document.getElementById('token-texts'), legend = document.getElementById('token-legend');
  data.sets.forEach((s, i) => sampleSel.add(new Option(s.label, i)));
  data.layers.forEach((l, i) => layerSel.add(new Option(l.label, i)));
  sampleSel.value = data.sets.length - 1; layerSel.value = data.layers.length - 1;
  function rgba(hex, a){ const v = parseInt(hex.slice(1), 16);
    return 'rgba(' + (v >> 16) + ',' + ((v >> 8) & 255) + ',' + (v & 255) + ',' + a.toFixed(2) + ')'; }
  function render(){
    const set = data.sets[sampleSel.value], layer = data.layers[layerSel.value];
    const colors = data.colors[layer.name] || [];
    out.textContent = ''; legend.textContent = '';
    (layer.experts || []).forEach((e, i) => { const s = document.createElement('span');
      const sw = document.createElement('i'); sw.style.background = colors[i]; s.append(sw, e); legend.append(s); });
    set.texts.forEach(t => {
      const row = document.createElement('div'); row.className = 'text-row';
      const m = document.createElement('span'); m.className = 'meta';
      m.textContent = [t.task, t.label === null || t.label === undefined ? '' : 'label ' + t.label].filter(Boolean).join(' · ');
      row.append(m);
      const r = t.routing[layer.name] || {experts: [], weights: []};
      t.tokens.forEach((tok, j) => {
        const span = document.createElement('span'); span.className = 'tok'; span.textContent = tok;
        if ((t.cont || [])[j]) span.classList.add('cont');  // a word piece continuing the previous token
        const ids = r.experts[j] || [], ws = r.weights[j] || [];
        let best = -1, bw = -1;
        ids.forEach((e, q) => { if (e >= 0 && (ws[q] ?? 0) > bw) { best = e; bw = ws[q] ?? 0; } });
        if (best < 0) { span.classList.add('none'); span.title = 'no expert (base output only)'; }
        else { span.style.background = rgba(colors[best] || '#888888', 0.25 + 0.75 * Math.min(1, bw));
          span.title = ids.map((e, q) => e < 0 ? 'dropped' : (layer.experts[e] || 'e' + e) + ' ' +
            (ws[q] ?? 0).toFixed(2)).join(', '); }
        row.append(span);
      });
      out.append(row);
    });
  }
  sampleSel.onchange = render; layerSel.onchange = render; render();
})();
"""


def _display_token(tok: str) -> tuple[str, bool]:
    """A token as shown, and whether it continues the previous word (WordPiece ``##x``); byte-BPE
    ``Ġx`` / SentencePiece ``▁x`` word-start markers become a space."""
    if tok.startswith("##") and len(tok) > 2:
        return tok[2:], True
    return tok.replace("Ġ", " ").replace("▁", " ").replace("Ċ", "\\n"), False


def _num_experts(contents: StoreContents, totals, name: str, sets) -> int:
    """Expert count of a layer: from its windows, else ``meta.json``, else the largest sampled id."""
    if name in totals:
        return totals[name].num_experts
    for layer in contents.meta.get("layers", []):
        if layer["name"] == name and layer.get("num_experts"):
            return int(layer["num_experts"])
    ids = [e for s in sets for t in s["texts"] for slots in t["routing"].get(name, {}).get("experts", [])
           for e in slots]
    return max(ids, default=-1) + 1


def token_view_data(contents: StoreContents, names: list[str], labels: dict[str, str],
                    totals) -> dict[str, Any] | None:
    """JSON for the token view: the latest sample sets, layers with expert names and colours."""
    from .figures import expert_colors

    sets = contents.samples[-MAX_SAMPLE_SETS:]
    if not sets:
        return None
    layers, colors = [], {}
    for n in names:
        e = _num_experts(contents, totals, n, sets)
        layers.append({"name": n, "label": labels.get(n, n), "experts": A.expert_labels(contents, n, e)})
        colors[n] = expert_colors(e)
    task_names = contents.meta.get("tasks") or []
    out_sets = []
    for s in sets:
        texts = []
        for t in s["texts"]:
            task = t.get("task")
            task_label = (task_names[task] if isinstance(task, int) and 0 <= task < len(task_names)
                          else (f"task {task}" if task is not None else ""))
            shown = [_display_token(str(x)) for x in t["tokens"]]
            texts.append({"tokens": [text for text, _ in shown], "cont": [int(c) for _, c in shown],
                          "task": task_label, "label": t.get("label"), "routing": t["routing"]})
        out_sets.append({"label": f"{s['stage']} · step {s['step']}", "texts": texts})
    return {"sets": out_sets, "layers": layers, "colors": colors}


def _json_script(element_id: str, data: Any) -> str:
    # Inside <script>, "</script" ends the element and "<!--<script" switches the parser into a
    # state where it does not (the rest of the page then vanishes into the data block): escape
    # every "<", ">" and "&" as a JSON \u escape, which JSON.parse reads back unchanged.
    body = (json.dumps(data, separators=(",", ":"))
            .replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026"))
    return f'<script type="application/json" id="{element_id}">{body}</script>'


def _table(caption: str, values: dict[str, Any]) -> str:
    rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(_short(v))}</td></tr>"
                   for k, v in values.items())
    return f'<table class="cfg"><caption>{html.escape(caption)}</caption>{rows}</table>'


def _short(v: Any) -> str:
    text = v if isinstance(v, str) else json.dumps(v, default=str)
    return text if len(text) <= 300 else text[:297] + "..."


def _header(contents: StoreContents, title: str, totals, stage, names, config_yaml: str | None,
            num_windows: int = 0) -> str:
    cfg = contents.meta.get("config") or {}
    method = cfg.get("method") or {}
    sizes = sorted({s.num_experts for s in totals.values()})
    steps = [w.step for w in contents.windows]
    facts = {
        "method": method.get("method", "?"),
        "wrapped layers": len(names),
        "experts per layer": "–".join(map(str, (sizes[0], sizes[-1]))) if len(sizes) > 1 else (sizes[0] if sizes else "?"),
        "top-k": method.get("top_k") if method.get("top_k") is not None else "–",  # MoA: per-token weights
        "backbone": (cfg.get("model") or {}).get("backbone", "?"),
        "last step": max(steps) if steps else 0,
        f"{stage or '-'} tokens routed": f"{sum(s.tokens for s in totals.values()) // max(len(totals), 1):,}",
        f"{stage or '-'} windows": num_windows,
    }
    fact_html = "".join(f'<div class="fact">{html.escape(k)}<b>{html.escape(str(v))}</b></div>' for k, v in facts.items())
    tables = "".join(_table(k, v) for k, v in cfg.items() if isinstance(v, dict) and v)
    yaml_block = (f"<details><summary>full run config (config.yaml)</summary><pre>{html.escape(config_yaml)}</pre></details>"
                  if config_yaml else "")
    created = contents.meta.get("created")
    sub = f"store {html.escape(str(contents.meta.get('store', '')))}" + (f" · started {html.escape(str(created))}" if created else "")
    return (f'<header><h1>{html.escape(title)}</h1><div class="sub">{sub}</div><div class="facts">{fact_html}</div></header>'
            f'<main><section id="config"><h2>Run configuration</h2>{tables or "<p class=note>no config recorded</p>"}'
            f"{yaml_block}</section>")


def _section(sid: str, title: str, note: str, body: str) -> str:
    return f'<section id="{sid}"><h2>{html.escape(title)}</h2><p class="note">{note}</p>{body}</section>'


_GATES_NOTE = ("The weight ω of every adapter head over training (WeightLoRA; one line per expert when the "
               "selection runs over experts). Hard thresholding keeps the K largest |ω| and zeroes the rest; at the "
               "end of the warm-up the zeroed heads are disconnected (removed from the model and the optimizer).")


def _gates_table(contents: StoreContents, labels: dict[str, str]) -> str:
    """The latest ω, status and ranks of every head, as an HTML table."""
    last = contents.gates[-1]
    rows = "".join(
        f"<tr><td>{html.escape(labels.get(n, n))}</td><td>{html.escape(str(g.get('status')))}</td>"
        f"<td>{html.escape(' '.join(f'{v:.3f}' for v in g['omega']))}</td>"
        f"<td>{html.escape(' '.join(str(r) for r in g.get('ranks') or []))}</td></tr>"
        for n, g in sorted(last["layers"].items(), key=lambda kv: (kv[1].get("status") != "active", kv[0])))
    kept = sum(1 for g in last["layers"].values() if g.get("status") == "active")
    return (f'<table class="cfg"><caption>step {int(last["step"])}: {kept} of {len(last["layers"])} heads '
            f"connected</caption><tr><td>head</td><td>status</td><td>ω</td><td>ranks</td></tr>{rows}</table>")


def render_html(contents: StoreContents, *, title: str = "moelora routing report",
                config_yaml: str | None = None) -> str:
    """The report as one HTML string (plotly's JS inlined)."""
    import plotly
    from plotly.offline import get_plotlyjs

    from . import figures as F

    names = A.layer_names(contents)
    labels = A.layer_labels(contents)
    stage = A.main_stage(contents)
    windows = A.windows_of(contents, stage)
    totals = A.total(windows)
    names = [n for n in names if n in totals] or names
    points = A.buckets(windows, MAX_POINTS)
    plot_cfg = {"displaylogo": False, "responsive": True}

    def plot(fig, div_id):
        return fig.to_html(full_html=False, include_plotlyjs=False, div_id=div_id, config=plot_cfg)

    parts = [_header(contents, title, totals, stage, names, config_yaml, len(windows))]
    silent = [labels.get(n, n) for n in A.layer_names(contents) if totals and n not in totals]
    if silent:
        contents.problems.append(f"{len(silent)} wrapped layer(s) recorded no routing in the {stage} windows and "
                                 f"are left out of the views: {silent[:10]}")
    if contents.problems:
        items = "".join(f"<li>{html.escape(p)}</li>" for p in contents.problems[:20])
        parts.append(f'<div class="warn">Some records were skipped:<ul>{items}</ul></div>')
    nav = [("summary", "balance"), ("drops", "drops"), ("load", "load"), ("load-time", "load over time"),
           ("tasks", "per task"), ("coactivation", "co-activation"), ("tokens", "tokens")]
    if contents.gates:
        nav.append(("gates", "adapter weights"))
    if not totals:  # no sections, so no navigation to them
        sanity = sum(1 for w in contents.windows if w.stage == "sanity")
        what = (f"only {sanity} sanity-check window(s), which the views leave out" if sanity
                else "nothing routed was recorded")
        parts.append(f'<div class="warn">The store holds no training or evaluation routing windows yet: {what}.</div>')
    else:
        parts.append("<nav>" + "".join(f'<a href="#{a}">{t}</a>' for a, t in nav) + "</nav>")
        parts.append(_section("summary", "Balance per layer over training",
                              f"Per {stage} window: normalised entropy of the expert load (1 = every expert equally "
                              "used, 0 = one expert takes everything), the largest expert's share of slots, and the "
                              "fraction of experts that got no token. Collapse shows as entropy falling and max share "
                              "rising.", plot(F.summary(points, names, labels), "plot-summary")))
        parts.append(_section("drops", "Dropped slots (adapter skipped)",
                              "Share of routed slots dropped because the expert was over capacity (SiRA). A dropped "
                              "slot adds no adapter delta; the token still gets the frozen base output.",
                              plot(F.drops(points, names, labels, totals), "plot-drops")))
        parts.append(_section("load", "Expert load per layer",
                              "Slots each expert received relative to a fair share (1 = fair, 0 = dead, "
                              "2 = twice its share). The slider steps through training windows; “all” is the "
                              "whole run. Hover shows counts and the mean router probability.",
                              plot(F.load(contents, points, totals, names, labels), "plot-load")))
        parts.append(_section("load-time", "Expert load over training, one layer",
                              "Each column is a window of training; pick the layer in the menu.",
                              plot(F.load_over_time(contents, points, names, labels), "plot-load-time")))
        if A.has_tasks(totals):
            parts.append(_section("tasks", "Routing per task",
                                  "For each task label (MeteoRA, multi-task data): the share of its slots each "
                                  "expert took. A diagonal-like pattern means experts specialised by task.",
                                  plot(F.tasks(contents, totals, names, labels), "plot-tasks")))
        else:
            parts.append(_section("tasks", "Routing per task", "No task ids were recorded in this run "
                                  "(set them with <code>moelora.set_task_ids</code> or a data task column).", ""))
        parts.append(_section("coactivation", "Expert co-activation",
                              "Row i: of the tokens that chose expert i, the share that also chose expert j "
                              "(top-k > 1). Pick the layer in the menu.",
                              plot(F.coactivation(contents, totals, names, labels), "plot-coactivation")))
    if contents.gates:
        parts.append(_section("gates", "Adapter weights ω (WeightLoRA)", _GATES_NOTE,
                              plot(F.gates(contents.gates, labels), "plot-gates") + _gates_table(contents, labels)))
    tokens = token_view_data(contents, names, labels, totals)
    if tokens:
        body = (_json_script("token-data", tokens)
                + '<div class="controls">sample<select id="token-sample"></select>layer<select id="token-layer">'
                '</select></div><div class="legend" id="token-legend"></div><div id="token-texts"></div>'
                f"<script>{_TOKENS_JS}</script>")
        note = ("Each token coloured by the expert with the largest gate weight in the chosen layer (darker = "
                "larger weight; hover for all chosen experts). Dashed: no expert (dropped or padding).")
    else:
        body, note = "", "No token samples were recorded in this run."
    parts.append(_section("tokens", "Token-level routing of sample texts", note, body))
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    parts.append(f'<p class="note">generated {stamp} by moelora · plotly {plotly.__version__} (inlined)</p></main>')
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style>"
            f"<script>{get_plotlyjs()}</script></head><body>{''.join(parts)}</body></html>")


def build_report(log_dir: str | os.PathLike, output: str | os.PathLike | None = None) -> Path:
    """Write the report of the run whose store is at or under ``log_dir``; returns its path.

    Args:
        log_dir: the run's log directory (holding ``routing/``), the store itself, or a parent.
        output: the HTML file (default: ``<run log dir>/routing_report.html``).
    """
    contents = read_store(log_dir)
    store = Path(contents.meta["store"])
    run_dir = store.parent if store.name == STORE_DIR else store
    config = run_dir / "config.yaml"
    config_yaml = config.read_text() if config.is_file() else None
    out = Path(output) if output else run_dir / REPORT_NAME
    # "-o some_dir" or "-o new_dir/" (Path drops the slash): the report goes inside it
    if out.is_dir() or str(output or "").endswith(("/", os.sep)):
        out = out / REPORT_NAME
    blocking = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise NotADirectoryError(f"cannot write the report to {out}: {blocking} is a file, not a directory.")
    page = render_html(contents, title=f"moelora routing report · {run_dir.name}", config_yaml=config_yaml)
    out.parent.mkdir(parents=True, exist_ok=True)
    # A temp file of its own (two report builds of one run may race) renamed over the report, so
    # a reader never sees half a page.
    from moelora.io import _atomic_write  # here: moelora.io imports the whole engine

    _atomic_write(out, lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))
    return out
