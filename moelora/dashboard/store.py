"""The routing store: recorded routing statistics of one run, in an open format (JSON Lines).

Layout, under the run's log directory::

    routing/
        meta.json       run description: layers (name, label, expert count and names), task
                        names, the run's config. Rewritten whole, atomically (tmp + fsync + rename).
        records.jsonl   one JSON object per line, appended as the run goes:
            {"kind": "window", "stage": "train"|"val"|"test"|"sanity"|"predict", "step", "epoch", "time",
             "layers": {name: {"counts" [E], "prob_sum" [E], "dropped" [E], "coactivation" [E][E],
                               "tokens", "forwards", "task_counts" [N][E] (optional)}}}
            {"kind": "sample", "stage", "step", "time",
             "texts": [{"tokens": [str], "task": int|null, "label": int|null,
                        "routing": {name: {"experts": [[k ids] per token], "weights": [[k]]}}}]}
            {"kind": "gates", "stage", "step", "time",          (methods with per-head weights: WeightLoRA)
             "layers": {name: {"omega": [floats], "status": "active"|"disconnected", "ranks" (optional)}}}

A window holds what the tracker accumulated since the previous record (the
:meth:`~moelora.tracker.LayerStats.since` difference), so every recorded forward is in exactly
one window and any span of training is a sum of windows. ``counts``, ``dropped``,
``coactivation`` and ``task_counts`` are slot counts; ``prob_sum`` is the sum of router
probabilities over ``tokens`` real tokens (mean probability = prob_sum / tokens).

Crash safety: each record is one ``write`` of one complete line followed by ``fsync``. A crash
mid-write can leave at most one partial line at the end of the file; readers ignore a last line
without its newline (and any line that does not validate), and the next writer cuts such a tail
off before appending. So a crash loses at most the interval being written, never earlier ones.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moelora.tracker import LayerStats

FORMAT = "moelora-routing"
VERSION = 1
STORE_DIR = "routing"
META = "meta.json"
RECORDS = "records.jsonl"
KINDS = ("window", "sample", "gates")


# ----------------------------------------------------------------------------- encoding
def _numbers(t: torch.Tensor) -> list:
    """A tensor as nested lists: ints when every value is integral (counts), else floats."""
    if t.numel() and bool(torch.all(t == t.round())):
        return t.to(torch.int64).tolist()
    return [float(f"{v:.9g}") for v in t.flatten().tolist()] if t.dim() == 1 else [_numbers(r) for r in t]


def encode_layer(stats: LayerStats) -> dict[str, Any]:
    """One layer's window as a JSON-ready dict (see the module docstring)."""
    out = {"counts": _numbers(stats.counts), "prob_sum": _numbers(stats.prob_sum),
           "dropped": _numbers(stats.dropped), "coactivation": _numbers(stats.coactivation),
           "tokens": int(stats.tokens), "forwards": int(stats.forwards)}
    if stats.task_counts is not None:
        out["task_counts"] = _numbers(stats.task_counts)
    return out


def decode_layer(d: dict[str, Any]) -> LayerStats:
    """The inverse of :func:`encode_layer` (float64 CPU tensors, as the tracker keeps them)."""
    f = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    e = len(d["counts"])
    tasks = d.get("task_counts")
    return LayerStats(f(d["counts"]), f(d["prob_sum"]), f(d["dropped"]), f(d["coactivation"]).view(e, e),
                      int(d["tokens"]), int(d["forwards"]),
                      f(tasks).view(-1, e) if tasks else None)


# ----------------------------------------------------------------------------- validation
_NUMBER_TYPES = frozenset((int, float))  # exact types: a JSON true/false is a bool, refused


def _is_vector(v: Any, n: int) -> bool:
    """``v`` is a list of ``n`` finite JSON numbers. Checked with C-level passes (the set of types,
    one sum: inf/nan make it non-finite) rather than a Python loop per element, which is only the
    fallback when the sum is not finite: a 64-expert layer's coactivation alone is 4096 numbers
    per window, and checking them one by one made reading a 96-layer store take 40 s."""
    if not isinstance(v, list) or len(v) != n or not set(map(type, v)) <= _NUMBER_TYPES:
        return False
    try:
        if math.isfinite(sum(v)):
            return True
    except OverflowError:
        pass
    return all(map(_finite, v))  # the sum overflowed, or one is inf/nan: decide number by number


def _finite(x: int | float) -> bool:
    try:
        return math.isfinite(x)
    except OverflowError:  # an int beyond float range cannot become a float64 tensor
        return False


def _layer_problem(d: Any) -> str | None:
    if not isinstance(d, dict) or not isinstance(d.get("counts"), list) or not d["counts"]:
        return "layer without counts"
    e = len(d["counts"])
    for key in ("counts", "prob_sum", "dropped"):
        if not _is_vector(d.get(key), e):
            return f"{key} is not {e} finite numbers"
    co = d.get("coactivation")
    if not (isinstance(co, list) and len(co) == e and all(_is_vector(r, e) for r in co)):
        return f"coactivation is not {e}x{e}"
    tasks = d.get("task_counts")
    if tasks is not None and not (isinstance(tasks, list) and all(_is_vector(r, e) for r in tasks)):
        return f"task_counts rows are not {e} numbers"
    for key in ("tokens", "forwards"):
        if not isinstance(d.get(key), int) or d[key] < 0:
            return f"{key} is not a count"
    return None


def _gates_problem(layers: Any) -> str | None:
    """Why a gates record's ``layers`` is invalid (per-head WeightLoRA weights), or ``None``."""
    if not isinstance(layers, dict):
        return "gates without layers"
    for name, g in layers.items():
        if not isinstance(g, dict) or not isinstance(g.get("omega"), list) or not _is_vector(g["omega"], len(g["omega"])):
            return f"gates of {name}: omega is not a list of finite numbers"
        if not isinstance(g.get("status"), str):
            return f"gates of {name}: status missing"
    return None


def record_problem(rec: Any) -> str | None:
    """Why ``rec`` is not a valid record, or ``None`` when it is."""
    if not isinstance(rec, dict) or rec.get("kind") not in KINDS:
        return "not a record (no known 'kind')"
    if not isinstance(rec.get("stage"), str) or not isinstance(rec.get("step"), int):
        return "stage or step missing"
    if rec["kind"] == "window":
        if not isinstance(rec.get("layers"), dict):
            return "window without layers"
        for name, d in rec["layers"].items():
            problem = _layer_problem(d)
            if problem:
                return f"layer {name}: {problem}"
        return None
    if rec["kind"] == "gates":
        return _gates_problem(rec.get("layers"))
    texts = rec.get("texts")
    if not isinstance(texts, list):
        return "sample without texts"
    for t in texts:
        if not (isinstance(t, dict) and isinstance(t.get("tokens"), list) and isinstance(t.get("routing"), dict)):
            return "sample text without tokens or routing"
        n = len(t["tokens"])
        if any(not isinstance(r, dict) or len(r.get("experts", ())) != n for r in t["routing"].values()):
            return "sample routing does not match its tokens"
    return None


# ----------------------------------------------------------------------------- reading
@dataclass
class Window:
    """One recorded interval: what every layer routed between two records."""

    stage: str
    step: int
    epoch: int | None
    time: float | None
    layers: dict[str, LayerStats]


@dataclass
class StoreContents:
    """Everything a store holds, validated; ``problems`` says what was skipped and why."""

    meta: dict[str, Any]
    windows: list[Window] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    gates: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def find_store(path: str | os.PathLike) -> Path:
    """The store directory for ``path``: the store itself, a log dir holding ``routing/``, or a
    directory above runs (the most recently written store beneath it wins).

    Raises:
        FileNotFoundError: no store at or under ``path``, with what to do about it.
    """
    path = Path(path)
    if path.is_file() and path.name in (RECORDS, META):  # the store's own file: its directory
        path = path.parent
    for candidate in (path, path / STORE_DIR):
        if (candidate / META).is_file() or (candidate / RECORDS).is_file():
            return candidate
    if path.is_dir():
        found = [p.parent for p in path.rglob(f"{STORE_DIR}/{RECORDS}")]
        if found:
            return max(found, key=lambda p: (p / RECORDS).stat().st_mtime)
    raise FileNotFoundError(
        f"no routing store at {path}: expected {path / STORE_DIR / RECORDS}. Runs of `moelora fit` write it "
        "(the RoutingDashboard callback, `--dashboard.*` options); pass the run's log directory, "
        "e.g. runs/tensorboard/version_0.")


def read_records(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Valid records of a JSONL file in order, and the problems of the lines that were skipped."""
    if not path.is_file():
        return [], []
    data = path.read_bytes()
    lines = data.split(b"\n")
    records, problems = [], []
    if lines[-1].strip():
        problems.append(f"{path.name}: the last record is incomplete (interrupted write) and was ignored")
    for number, line in enumerate(lines[:-1], 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError):
            problems.append(f"{path.name}:{number}: not valid JSON, skipped")
            continue
        problem = record_problem(rec)
        if problem:
            problems.append(f"{path.name}:{number}: {problem}, skipped")
            continue
        records.append(rec)
    return records, problems


def read_store(path: str | os.PathLike) -> StoreContents:
    """Read and validate a store (``path`` as for :func:`find_store`)."""
    root = find_store(path)
    meta, problems = {}, []
    if (root / META).is_file():
        try:
            meta = json.loads((root / META).read_text())
        except json.JSONDecodeError:
            problems.append(f"{META} is not valid JSON; run description missing")
        if not isinstance(meta, dict):
            problems.append(f"{META} holds a JSON {type(meta).__name__}, not an object; run description missing")
            meta = {}
    if meta and (meta.get("format") != FORMAT or meta.get("version", 0) > VERSION):
        problems.append(f"{META}: format {meta.get('format')!r} version {meta.get('version')} is not "
                        f"{FORMAT!r} <= {VERSION}; reading anyway")
    records, bad = read_records(root / RECORDS)
    out = StoreContents(meta=meta, problems=problems + bad)
    out.meta.setdefault("store", str(root))
    widths: dict[str, int] = {}  # a layer keeps one expert count for a whole run (pruned experts stay numbered)
    for rec in records:
        if rec["kind"] == "window":
            odd = [(n, len(d["counts"]), widths[n]) for n, d in rec["layers"].items()
                   if widths.setdefault(n, len(d["counts"])) != len(d["counts"])]
            if odd:
                name, got, first = odd[0]
                out.problems.append(f"{RECORDS}: the {rec['stage']} window at step {rec['step']} gives layer {name} "
                                    f"{got} experts where earlier windows gave {first} (a store holding two runs?); "
                                    "skipped")
                continue
            out.windows.append(Window(rec["stage"], rec["step"], rec.get("epoch"), rec.get("time"),
                                      {n: decode_layer(d) for n, d in rec["layers"].items()}))
        elif rec["kind"] == "gates":
            out.gates.append(rec)
        else:
            out.samples.append(rec)
    return out


# ----------------------------------------------------------------------------- writing
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class RoutingStore:
    """Writes one run's store (single writer: rank 0). See the module docstring for the format.

    Args:
        root: the store directory (``<log_dir>/routing``); created on first write.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.records_path = self.root / RECORDS
        self.meta_path = self.root / META
        self._repaired = False

    def write_meta(self, meta: dict[str, Any]) -> None:
        """Replace ``meta.json`` atomically: readers see the old or the new file, never a mix."""
        self.root.mkdir(parents=True, exist_ok=True)
        body = {"format": FORMAT, "version": VERSION, **meta}
        tmp = self.meta_path.with_name(f".{META}.tmp")
        with tmp.open("w") as f:
            json.dump(body, f, indent=1, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.meta_path)
        _fsync_dir(self.root)

    def _repair(self) -> None:
        """Cut a partial last line left by an interrupted write, so the next line starts clean."""
        self._repaired = True
        if not self.records_path.is_file():
            return
        with self.records_path.open("rb+") as f:
            size = f.seek(0, os.SEEK_END)
            if size == 0:
                return
            f.seek(size - 1)
            if f.read(1) == b"\n":
                return
            f.seek(0)
            f.truncate(f.read().rfind(b"\n") + 1)  # everything up to the last complete line
            f.flush()
            os.fsync(f.fileno())

    def append(self, record: dict[str, Any]) -> None:
        """Append one record as one line, durably (``fsync``) before returning.

        Raises:
            ValueError: the record does not validate (nothing is written).
        """
        record = {"time": time.time(), **record}
        problem = record_problem(record)
        if problem:
            raise ValueError(f"refusing to store an invalid routing record: {problem}")
        line = (json.dumps(record, separators=(",", ":"), allow_nan=False) + "\n").encode()
        self.root.mkdir(parents=True, exist_ok=True)
        if not self._repaired:
            self._repair()
        created = not self.records_path.exists()
        fd = os.open(self.records_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = memoryview(line)
            while view:  # one write in practice; loop in case the OS writes less
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            _fsync_dir(self.root)

    def append_window(self, stage: str, step: int, layers: dict[str, LayerStats], *,
                      epoch: int | None = None) -> None:
        """Append the window ``layers`` (layers that routed nothing are left out)."""
        enc = {name: encode_layer(s) for name, s in layers.items() if s.forwards > 0}
        if enc:
            self.append({"kind": "window", "stage": stage, "step": int(step), "epoch": epoch, "layers": enc})
