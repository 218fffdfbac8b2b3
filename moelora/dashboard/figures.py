"""Plotly figures of the report, one function per view. Inputs are the store's windows, summed
(``totals``) or grouped over time (``points``: ``[(step, {layer: LayerStats})]``)."""

from __future__ import annotations

import colorsys

import plotly.graph_objects as go
from plotly.colors import sample_colorscale
from plotly.subplots import make_subplots

from moelora.tracker import LayerStats

from . import analysis as A
from .store import StoreContents

TEMPLATE = "plotly_white"
# Tableau 10: distinguishable for the common expert counts; more experts get golden-angle hues.
TABLEAU = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
           "#9c755f", "#bab0ac"]


def expert_colors(n: int) -> list[str]:
    """``n`` distinct colours as ``#rrggbb`` (the token view uses the same ones)."""
    if n <= len(TABLEAU):
        return TABLEAU[:n]
    out = []
    for i in range(n):
        r, g, b = colorsys.hls_to_rgb((i * 0.381966) % 1.0, 0.5, 0.62)
        out.append(f"#{int(r * 255):02x}{int(g * 255):02x}{int(b * 255):02x}")
    return out


def layer_colors(n: int) -> list[str]:
    """Shallow → deep layers along a sequential scale, so depth trends read at a glance."""
    return sample_colorscale("Viridis", [i / max(n - 1, 1) * 0.9 for i in range(n)])


def _dropdown(buttons: list[dict], active: int = 0, y: float = 1.18) -> list[dict]:
    return [{"buttons": buttons, "active": active, "direction": "down", "x": 0.0, "xanchor": "left",
             "y": y, "yanchor": "top", "showactive": True}]


def _axis_labels(contents: StoreContents, names: list[str], sizes: dict[str, int]) -> list[str]:
    """Expert axis labels shared by all layers: the stored names when every layer has the same
    ones, else plain indices (layers may differ in expert count, e.g. MoA types, FlyLoRA ranks)."""
    width = max(sizes.values(), default=0)
    per_layer = {tuple(A.expert_labels(contents, n, sizes[n])) for n in names if n in sizes}
    if len(per_layer) == 1 and len(next(iter(per_layer))) == width:
        return list(next(iter(per_layer)))
    return [f"e{i}" for i in range(width)]


def _step_ticks(steps: list[int]) -> dict:
    """Integer ticks at the recorded steps for short runs (plotly would put ticks at 1.5, 2.5)."""
    return {"tickmode": "array", "tickvals": steps} if len(steps) <= 15 else {}


def _top(matrices: list[list[list[float | None]]]) -> float:
    """One colour range for every layer of a menu (fixed, so switching layers compares fairly):
    0 to the largest value, which makes weak structure visible (shares rarely reach 1)."""
    return max((v for m in matrices for row in m for v in row if v is not None), default=1.0) or 1.0


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def summary(points, names: list[str], labels: dict[str, str]) -> go.Figure:
    """Normalised entropy, max share and dead-expert fraction per layer over steps."""
    metrics = [("entropy", "normalised entropy (1 = balanced)"), ("max_share", "max share (largest expert)"),
               ("dead_fraction", "dead-expert fraction")]
    fig = make_subplots(rows=3, cols=1, shared_xaxes=True, vertical_spacing=0.07,
                        subplot_titles=[t for _, t in metrics])
    steps = [s for s, _ in points]
    colors = layer_colors(len(names))
    for row, (metric, _) in enumerate(metrics, 1):
        series = A.summary_series(points, names, metric)
        for i, n in enumerate(names):
            fig.add_trace(go.Scatter(x=steps, y=series[n], mode="lines+markers", name=labels[n],
                                     legendgroup=n, showlegend=row == 1, line={"color": colors[i], "width": 1.5},
                                     marker={"size": 4}, hovertemplate=f"{labels[n]}<br>step %{{x}}: %{{y:.3f}}"
                                     "<extra></extra>"), row=row, col=1)
        mean = [_mean([series[n][j] for n in names]) for j in range(len(steps))]
        fig.add_trace(go.Scatter(x=steps, y=mean, mode="lines", name="mean over layers", legendgroup="mean",
                                 showlegend=row == 1, line={"color": "black", "width": 3, "dash": "dash"},
                                 hovertemplate="mean<br>step %{x}: %{y:.3f}<extra></extra>"), row=row, col=1)
        fig.update_yaxes(range=[-0.03, 1.03], row=row, col=1)
    fig.update_xaxes(title_text="step", row=3, col=1)
    fig.update_xaxes(**_step_ticks(steps))
    fig.update_layout(template=TEMPLATE, height=640, margin={"t": 40, "b": 50, "l": 60, "r": 20},
                      legend={"font": {"size": 10}})
    return fig


def drops(points, names: list[str], labels: dict[str, str], totals: dict[str, LayerStats]) -> go.Figure:
    """Share of routed slots dropped over capacity (SiRA) per layer over steps."""
    fig = go.Figure()
    steps = [s for s, _ in points]
    series = A.summary_series(points, names, "drop_rate")
    for i, (n, color) in enumerate(zip(names, layer_colors(len(names)))):
        fig.add_trace(go.Scatter(x=steps, y=series[n], mode="lines+markers", name=labels[n],
                                 line={"color": color, "width": 1.5}, marker={"size": 4},
                                 hovertemplate=f"{labels[n]}<br>step %{{x}}: %{{y:.2%}} dropped<extra></extra>"))
    if not A.has_drops(totals):
        fig.add_annotation(text="no slot was dropped: this run's routers have no capacity limit",
                           xref="paper", yref="paper", x=0.5, y=0.5, showarrow=False, font={"size": 14})
    fig.update_xaxes(**_step_ticks(steps))
    fig.update_layout(template=TEMPLATE, height=340, xaxis_title="step", yaxis_title="dropped slots",
                      yaxis={"tickformat": ".0%", "rangemode": "tozero"}, margin={"t": 20, "b": 50, "l": 60, "r": 20})
    return fig


def _load_matrix(contents, layers: dict[str, LayerStats], names, labels, width):
    z, custom = [], []
    for n in names:
        s = layers.get(n)
        if s is None:
            z.append([None] * width)
            custom.append([["", 0, 0.0, ""]] * width)
            continue
        util, load = A.utilisation(s), s.load.tolist()
        # Methods without router probabilities (FlyLoRA's rank-wise top-k) record none: say so, not 0.
        probs = ([f"{p:.3f}" for p in s.mean_probs.tolist()] if float(s.prob_sum.sum()) > 0
                 else ["n/a"] * s.num_experts)
        experts = A.expert_labels(contents, n, s.num_experts)
        pad = width - s.num_experts
        z.append(util + [None] * pad)
        custom.append([[experts[e], int(s.counts[e]), load[e], probs[e]] for e in range(s.num_experts)]
                      + [["(none)", 0, 0.0, ""]] * pad)
    return z, custom


def load(contents: StoreContents, points, totals: dict[str, LayerStats], names, labels) -> go.Figure:
    """Layers × experts load relative to a fair share, with a slider over training windows."""
    sizes = {n: s.num_experts for n, s in totals.items()}
    xlabels = _axis_labels(contents, names, sizes)
    width = len(xlabels)
    ylabels = [labels[n] for n in names]
    z, custom = _load_matrix(contents, totals, names, labels, width)
    zmax = max(2.0, max((v for r in z for v in r if v is not None), default=2.0))
    hover = ("layer %{y}<br>expert %{customdata[0]}<br>load %{z:.2f}× fair share<br>slots %{customdata[1]} "
             "(%{customdata[2]:.1%})<br>mean router prob %{customdata[3]}<extra></extra>")
    fig = go.Figure(go.Heatmap(z=z, x=xlabels, y=ylabels, customdata=custom, hovertemplate=hover,
                               colorscale="RdBu_r", zmin=0, zmax=zmax, zmid=1,
                               colorbar={"title": {"text": "× fair"}}, xgap=1, ygap=1))
    steps = []
    for step, layers in points:
        zs, cs = _load_matrix(contents, layers, names, labels, width)
        steps.append({"label": str(step), "method": "restyle", "args": [{"z": [zs], "customdata": [cs]}, [0]]})
    steps.append({"label": "all", "method": "restyle", "args": [{"z": [z], "customdata": [custom]}, [0]]})
    fig.update_layout(
        template=TEMPLATE, height=max(360, 150 + 26 * len(names)), margin={"t": 20, "b": 40, "l": 120, "r": 20},
        xaxis={"title": "expert", "side": "top", "type": "category"}, yaxis={"autorange": "reversed", "type": "category"},
        sliders=[{"active": len(steps) - 1, "steps": steps, "pad": {"t": 10},
                  "currentvalue": {"prefix": "window ending at step: "}}] if len(points) > 1 else [])
    return fig


def load_over_time(contents: StoreContents, points, names, labels) -> go.Figure:
    """One layer's expert load per window (experts × steps); a menu picks the layer."""
    steps = [str(s) for s, _ in points]

    def matrix(n):
        sizes = [layers[n].num_experts for _, layers in points if n in layers]
        e = max(sizes, default=1)
        cols = [A.utilisation(layers[n]) if n in layers else [None] * e for _, layers in points]
        return [[c[i] for c in cols] for i in range(e)], A.expert_labels(contents, n, e)

    first_z, first_y = matrix(names[0]) if names else ([], [])
    # The same colour range as the load view: up to the largest load of any layer, at least 2× fair.
    zmax = max(2.0, _top([matrix(n)[0] for n in names]) or 0.0)
    fig = go.Figure(go.Heatmap(z=first_z, x=steps, y=first_y, colorscale="RdBu_r", zmin=0, zmax=zmax, zmid=1,
                               colorbar={"title": {"text": "× fair"}}, xgap=1, ygap=1,
                               hovertemplate="step %{x}<br>expert %{y}<br>load %{z:.2f}× fair share<extra></extra>"))
    buttons = []
    for n in names:
        z, y = matrix(n)
        buttons.append({"label": labels[n], "method": "restyle", "args": [{"z": [z], "y": [y]}, [0]]})
    experts = max((layers[n].num_experts for _, layers in points for n in names if n in layers), default=1)
    fig.update_layout(template=TEMPLATE, height=max(430, 150 + 14 * experts),  # a readable row per expert
                      margin={"t": 70, "b": 50, "l": 90, "r": 20},
                      xaxis={"title": "window ending at step", "type": "category"},
                      yaxis={"title": "expert", "type": "category", "autorange": "reversed"},
                      updatemenus=_dropdown(buttons, y=1.2))
    return fig


def tasks(contents: StoreContents, totals: dict[str, LayerStats], names, labels) -> go.Figure:
    """Per task: the share of its slots each expert took (rows sum to 1); a menu picks the layer."""
    with_tasks = [n for n in names if n in totals and totals[n].task_counts is not None]
    rows = max(totals[n].task_counts.shape[0] for n in with_tasks)
    ylabels = A.task_labels(contents, rows)

    def view(n):
        shares, counts = A.task_shares(totals[n])
        pad = rows - len(shares)
        e = totals[n].num_experts
        return shares + [[None] * e] * pad, counts + [[0] * e] * pad, A.expert_labels(contents, n, e)

    z, c, x = view(with_tasks[0])
    zmax = _top([view(n)[0] for n in with_tasks])
    fig = go.Figure(go.Heatmap(z=z, x=x, y=ylabels, customdata=c, colorscale="Blues", zmin=0, zmax=zmax,
                               colorbar={"title": {"text": "share"}}, xgap=1, ygap=1, texttemplate="%{z:.2f}",
                               hovertemplate="task %{y}<br>expert %{x}<br>%{z:.1%} of the task's slots "
                               "(%{customdata})<extra></extra>"))
    buttons = []
    for n in with_tasks:
        z, c, x = view(n)
        buttons.append({"label": labels[n], "method": "restyle", "args": [{"z": [z], "customdata": [c], "x": [x]}, [0]]})
    fig.update_layout(template=TEMPLATE, height=max(320, 170 + 34 * rows), margin={"t": 70, "b": 50, "l": 110, "r": 20},
                      xaxis={"title": "expert", "type": "category"}, yaxis={"type": "category", "autorange": "reversed"},
                      updatemenus=_dropdown(buttons, y=1.25 if rows < 5 else 1.15))
    return fig


def coactivation(contents: StoreContents, totals: dict[str, LayerStats], names, labels) -> go.Figure:
    """P(expert j also chosen | expert i chosen) per layer; a menu picks the layer."""
    present = [n for n in names if n in totals]

    def view(n):
        s = totals[n]
        x = A.expert_labels(contents, n, s.num_experts)
        return A.coactivation_conditional(s), s.coactivation.to("cpu").long().tolist(), x

    z, c, x = view(present[0])
    zmax = _top([view(n)[0] for n in present])
    fig = go.Figure(go.Heatmap(z=z, x=x, y=x, customdata=c, colorscale="Viridis", zmin=0, zmax=zmax,
                               colorbar={"title": {"text": "P(j | i)"}}, xgap=1, ygap=1, hoverongaps=False,
                               hovertemplate="chosen %{y}: also %{x} in %{z:.1%} of its tokens<br>"
                               "(%{customdata} tokens chose both)<extra></extra>"))
    buttons = []
    for n in present:
        z, c, x = view(n)
        buttons.append({"label": labels[n], "method": "restyle",
                        "args": [{"z": [z], "customdata": [c], "x": [x], "y": [x]}, [0]]})
    experts = max(totals[n].num_experts for n in present)
    fig.update_layout(template=TEMPLATE, height=max(520, 170 + 14 * experts),  # a readable row per expert
                      margin={"t": 70, "b": 50, "l": 90, "r": 20},
                      xaxis={"title": "also chosen (j)", "type": "category"},
                      yaxis={"title": "expert chosen (i)", "type": "category", "autorange": "reversed"},
                      updatemenus=_dropdown(buttons, y=1.16))
    if not any(A.shares_tokens(totals[n]) for n in present):
        fig.add_annotation(text="no token chose two experts in any layer", xref="paper", yref="paper",
                           x=0.5, y=0.5, showarrow=False, font={"size": 14})
    return fig


def gates(records: list[dict], labels: dict[str, str]) -> go.Figure:
    """|ω| of every head (one line per layer; per expert with ``over="experts"``) over steps, from the
    store's ``gates`` records (WeightLoRA). A disconnected head's line ends at 0."""
    fig = go.Figure()
    names = list(dict.fromkeys(n for rec in records for n in rec["layers"]))
    colors = layer_colors(len(names))
    for i, n in enumerate(names):
        width = max(len(rec["layers"][n]["omega"]) for rec in records if n in rec["layers"])
        for e in range(width):
            steps, values = [], []
            for rec in records:
                g = rec["layers"].get(n)
                if g is not None:
                    omega = g["omega"]
                    steps.append(rec["step"])
                    values.append(abs(omega[e]) if e < len(omega) else 0.0)
            latest = next(r["layers"][n] for r in reversed(records) if n in r["layers"])
            experts = latest.get("experts") or list(range(width))
            name = labels.get(n, n) + (f" · e{experts[e] if e < len(experts) else e}" if width > 1 else "")
            fig.add_trace(go.Scatter(x=steps, y=values, mode="lines+markers", name=name, legendgroup=n,
                                     line={"color": colors[i], "width": 1.5}, marker={"size": 4},
                                     hovertemplate=f"{name}<br>step %{{x}}: |ω| %{{y:.3f}}<extra></extra>"))
    fig.update_layout(template=TEMPLATE, height=380, xaxis_title="step", yaxis_title="|ω|",
                      yaxis={"rangemode": "tozero"}, margin={"t": 20, "b": 50, "l": 60, "r": 20},
                      legend={"font": {"size": 10}})
    return fig
