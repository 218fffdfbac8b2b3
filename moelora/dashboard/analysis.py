"""Numbers behind the report, from a store's windows: sums, time buckets, per-task and co-activation.

Nothing here knows a method: a layer is a name with ``E`` experts (top-k experts, SiRA experts,
MeteoRA adapters, FlyLoRA ranks or MoA types alike), and ``E`` may differ between layers.
"""

from __future__ import annotations

import dataclasses
import math

from moelora.tracker import LayerStats

from .store import StoreContents, Window


def add(a: LayerStats | None, b: LayerStats) -> LayerStats:
    """``a + b`` for two windows of the same layer (``a`` may be ``None``)."""
    if a is None:
        return dataclasses.replace(b)
    tasks = None
    if a.task_counts is not None or b.task_counts is not None:
        rows = max(t.shape[0] for t in (a.task_counts, b.task_counts) if t is not None)
        tasks = dataclasses.replace(a).grow_tasks(rows) + dataclasses.replace(b).grow_tasks(rows)
    return LayerStats(a.counts + b.counts, a.prob_sum + b.prob_sum, a.dropped + b.dropped,
                      a.coactivation + b.coactivation, a.tokens + b.tokens, a.forwards + b.forwards, tasks)


def layer_names(contents: StoreContents) -> list[str]:
    """Layers in the run's order (``meta.json``), then any only seen in windows."""
    names = [layer["name"] for layer in contents.meta.get("layers", [])]
    for w in contents.windows:
        names += [n for n in w.layers if n not in names]
    return names


def layer_labels(contents: StoreContents) -> dict[str, str]:
    """Short display names (the store's labels; the full name where none was stored)."""
    stored = {layer["name"]: layer.get("label") or layer["name"] for layer in contents.meta.get("layers", [])}
    return {n: stored.get(n, n) for n in layer_names(contents)}


def expert_labels(contents: StoreContents, name: str, num_experts: int) -> list[str]:
    """Expert names of layer ``name`` (as stored, e.g. MeteoRA adapter names), else ``e0, e1, ...``."""
    for layer in contents.meta.get("layers", []):
        if layer["name"] == name and len(layer.get("experts") or ()) == num_experts:
            return [str(e) for e in layer["experts"]]
    return [f"e{i}" for i in range(num_experts)]


def task_labels(contents: StoreContents, num_tasks: int) -> list[str]:
    names = contents.meta.get("tasks") or []
    return [str(names[i]) if i < len(names) else f"task {i}" for i in range(num_tasks)]


def main_stage(contents: StoreContents) -> str | None:
    """The stage the over-time views follow: ``train`` when the run trained, else the most recorded."""
    stages = [w.stage for w in contents.windows if w.stage != "sanity"]
    if not stages:
        return None
    return "train" if "train" in stages else max(set(stages), key=stages.count)


def windows_of(contents: StoreContents, stage: str | None) -> list[Window]:
    return [w for w in contents.windows if w.stage == stage]


def total(windows: list[Window]) -> dict[str, LayerStats]:
    """Every layer's statistics summed over ``windows``."""
    out: dict[str, LayerStats] = {}
    for w in windows:
        for name, s in w.layers.items():
            out[name] = add(out.get(name), s)
    return out


def buckets(windows: list[Window], max_points: int) -> list[tuple[int, dict[str, LayerStats]]]:
    """At most ``max_points`` consecutive groups of windows, each summed, keyed by its last step.

    Groups are merged, not sub-sampled, so every recorded token still counts (a long run's
    report stays small without hiding any interval).
    """
    if not windows:
        return []
    per = max(1, math.ceil(len(windows) / max_points))
    return [(group[-1].step, total(group)) for group in (windows[i:i + per] for i in range(0, len(windows), per))]


def nan_if_empty(values: list[float], ok: bool) -> list[float | None]:
    """``values`` or ``None``s (plotly's gaps) where there is no data."""
    return values if ok else [None] * len(values)


def utilisation(s: LayerStats) -> list[float | None]:
    """``[E]`` load relative to a fair share: ``counts / (Σ counts / E)``; 1 = fair, 0 = dead."""
    total_slots = float(s.counts.sum())
    fair = total_slots / s.num_experts
    return nan_if_empty([float(c) / fair if fair > 0 else 0.0 for c in s.counts], total_slots > 0)


def task_shares(s: LayerStats) -> tuple[list[list[float | None]], list[list[int]]]:
    """``[N][E]`` share of each task's slots per expert (rows sum to 1; gaps for absent tasks)
    and the raw counts."""
    if s.task_counts is None:
        return [], []
    rows, counts = [], []
    for row in s.task_counts:
        n = float(row.sum())
        rows.append(nan_if_empty([float(v) / n if n > 0 else 0.0 for v in row], n > 0))
        counts.append([int(v) for v in row])
    return rows, counts


def coactivation_conditional(s: LayerStats) -> list[list[float | None]]:
    """``[E][E]`` P(expert j also chosen | expert i chosen) = C[i, j] / C[i, i]; the diagonal
    (always 1) is left blank so the colour range shows the pairs."""
    c = s.coactivation
    out = []
    for i in range(s.num_experts):
        chosen = float(c[i, i])
        out.append([None if (i == j or chosen == 0) else float(c[i, j]) / chosen for j in range(s.num_experts)])
    return out


def shares_tokens(s: LayerStats) -> bool:
    """Whether any token chose two different experts of this layer (off-diagonal co-activation)."""
    c = s.coactivation
    return bool((c.sum() - c.diagonal().sum()) > 0)


def summary_series(points: list[tuple[int, dict[str, LayerStats]]], names: list[str],
                   metric: str) -> dict[str, list[float | None]]:
    """Per layer, ``metric`` of each bucket (gaps where the layer routed nothing)."""
    return {n: [getattr(layer[n], metric) if n in layer and layer[n].tokens > 0 else None for _, layer in points]
            for n in names}


def has_drops(stats: dict[str, LayerStats]) -> bool:
    return any(float(s.dropped.sum()) > 0 for s in stats.values())


def has_tasks(stats: dict[str, LayerStats]) -> bool:
    return any(s.task_counts is not None and float(s.task_counts.sum()) > 0 for s in stats.values())
