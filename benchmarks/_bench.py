"""Measurement helpers for benchmarks/training_step.py: interleaved timing, peak memory, run
metadata and atomic result files. Nothing here knows about models (see ``_peers.py``).

Peak memory, and why it is measured this way:

* On CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus the
  memory allocated before the first step: exactly the tensors the steps added at their peak.
* On CPU there is no allocator counter for torch tensors (``tracemalloc`` does not see them, and
  the profiler's memory view needs per-op bookkeeping that distorts the run). We read the process's
  resident set instead: the row is built in a **fresh process**, then the kernel's high-water mark
  is reset (``echo 5 > /proc/self/clear_refs``, Linux ≥ 4.0) and the peak is ``VmHWM`` after the
  steps minus ``VmRSS`` before them. Where ``clear_refs`` is unavailable the fallback is the
  growth of ``ru_maxrss`` over the steps (it misses a peak lower than the model-load peak). RSS
  includes what the allocator keeps cached after frees, so it is an upper bound on live tensor
  memory, the same way for every row.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import re
import resource
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch

import common  # benchmarks/common.py: callers put this directory on sys.path

MiB = 1 << 20


# ------------------------------------------------------------------------------------------- timing
def interleaved_medians(steps: dict[str, Callable[[], Any]], *, warmup: int, reps: int,
                        sync: Callable[[], None] = lambda: None) -> dict[str, dict[str, float]]:
    """Run every callable ``warmup + reps`` times, one call of each per round (rotating the order
    every round), so slow drifts of a shared machine hit every row alike. Returns per name the
    median seconds of the timed rounds and the quartiles. The cyclic GC runs between rounds only.
    A callable that raises gets ``{"error": ...}`` and is not called again."""
    names = list(steps)
    times: dict[str, list[float]] = {n: [] for n in names}
    errors: dict[str, str] = {}
    gc_was = gc.isenabled()
    try:
        for i in range(warmup + reps):
            gc.collect()
            gc.disable()
            order = names[i % len(names):] + names[:i % len(names)]
            for name in order:
                if name in errors:
                    continue
                sync()
                t0 = time.perf_counter()
                try:
                    steps[name]()
                    sync()
                except Exception as e:  # noqa: BLE001 - reported in the table
                    errors[name] = f"{type(e).__name__}: {e}"[:200]
                    continue
                if i >= warmup:
                    times[name].append(time.perf_counter() - t0)
            gc.enable()
    finally:
        if gc_was:
            gc.enable()
    out: dict[str, dict[str, Any]] = {name: {"error": err} for name, err in errors.items()}
    for name, ts in times.items():
        if name in errors:
            continue
        q = statistics.quantiles(ts, n=4) if len(ts) >= 2 else [ts[0]] * 3
        out[name] = {"median_s": statistics.median(ts), "p25_s": q[0], "p75_s": q[2], "n": len(ts), "times_s": ts}
    return out


def paired_ratio(times: list[float], ref: list[float]) -> float:
    """Median over rounds of ``times[i] / ref[i]``: both were timed in the same round, so a load
    change between rounds cancels (the ratio of the two medians does not get that)."""
    return statistics.median(t / r for t, r in zip(times, ref))


# ------------------------------------------------------------------------------------------- memory
def _status_kib(key: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{key}:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) if m else None


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    hwm, rss = _status_kib("VmHWM"), _status_kib("VmRSS")
    return hwm is not None and rss is not None and hwm <= rss + 1024  # the reset took


def peak_memory(step: Callable[[], Any], *, steps: int, device: torch.device) -> dict[str, Any]:
    """Peak memory added by ``steps`` calls of ``step`` (the model is already built)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        return {"method": "torch.cuda.max_memory_allocated", "base_mib": base / MiB,
                "peak_delta_mib": (torch.cuda.max_memory_allocated() - base) / MiB}
    if _reset_hwm():
        base = _status_kib("VmRSS")
        for _ in range(steps):
            step()
        return {"method": "VmHWM after clear_refs", "base_mib": base / 1024,
                "peak_delta_mib": (_status_kib("VmHWM") - base) / 1024}
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    for _ in range(steps):
        step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"method": "ru_maxrss growth", "base_mib": base / 1024, "peak_delta_mib": (peak - base) / 1024}


# --------------------------------------------------------------------------------------- metadata
def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "peft", "moelora"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def cpu_clock() -> dict[str, float] | None:
    """Busy CPU seconds of the whole machine (``/proc/stat``), this process's own CPU seconds
    (children it waited for included) and the wall clock; see :func:`others_cores`."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    t = os.times()
    return {"busy_s": (sum(fields[:8]) - idle) / hz, "mine_s": t.user + t.system + t.children_user + t.children_system,
            "wall_s": time.monotonic()}


def others_cores(start: dict[str, float] | None, end: dict[str, float] | None) -> float | None:
    """Average number of cores other processes kept busy between two :func:`cpu_clock` readings:
    the honest "was the machine shared" number (the load average counts this run too)."""
    if not start or not end or end["wall_s"] <= start["wall_s"]:
        return None
    other = (end["busy_s"] - start["busy_s"]) - (end["mine_s"] - start["mine_s"])
    return max(0.0, other / (end["wall_s"] - start["wall_s"]))


def load_average() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def meta(command: str, device: torch.device, threads: int) -> dict[str, Any]:
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU: {cpu_name()}, {os.cpu_count()} logical cores"
    return {"command": command, "device": dev, "threads": threads, **versions(),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "load_start": load_average()}


# ------------------------------------------------------------------------------------------ output
def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temp file next to ``path``, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    common._atomic_write(path, text)


def write_json_atomic(path: Path, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=1, default=str) + "\n")
