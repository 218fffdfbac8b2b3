"""Every benchmark script runs in quick mode and writes its tables where it is told (issue 10).

One test per ``benchmarks/*.py`` with a ``__main__`` entry (found by glob, so a new script is
covered without editing this file; ``_*.py`` helpers and ``common.py`` are skipped): run
``python -P <script> --quick --out <tmp>`` in a subprocess, then check it exited 0, wrote at
least one ``.md`` and one ``.json`` into ``<tmp>``, and left the committed results under
``benchmarks/results/`` byte-for-byte and mtime-for-mtime untouched. Benchmarks never assert
timings; this only proves the scripts run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
RESULTS = BENCH / "results"
MAIN = re.compile(r"^if __name__ == ['\"]__main__['\"]\s*:", re.M)

# Per-script exceptions, each with its reason. kernels.py: its --quick grid takes minutes, so the
# test adds --smoke (one case per table); it also checks its Triton kernels under the interpreter,
# so it must choose TRITON_INTERPRET itself (None = leave the variable unset).
EXTRA_ARGS: dict[str, list[str]] = {"kernels.py": ["--smoke"]}
ENV: dict[str, str | None] = {"kernels.py": None}
SLOW: set[str] = set()  # scripts whose quick mode takes > 60 s (none so far)
TIMEOUT_S = 300


def _scripts() -> list:
    found = sorted(p for p in BENCH.glob("*.py")
                   if not p.name.startswith("_") and p.name != "common.py" and MAIN.search(p.read_text()))
    return [pytest.param(p, id=p.stem, marks=[pytest.mark.slow] if p.name in SLOW else []) for p in found]


def _snapshot() -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(RESULTS)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(RESULTS.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("script", _scripts())
def test_quick_run_writes_results(script: Path, tmp_path: Path):
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TRITON_INTERPRET": "0"}
    if script.name in ENV:
        if ENV[script.name] is None:
            env.pop("TRITON_INTERPRET", None)
        else:
            env["TRITON_INTERPRET"] = ENV[script.name]
    before = _snapshot()
    cmd = [sys.executable, "-P", str(script), "--quick", "--out", str(out), *EXTRA_ARGS.get(script.name, [])]
    proc = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    log = f"$ {' '.join(cmd)}\n--- stdout (tail)\n{proc.stdout[-3000:]}\n--- stderr (tail)\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, log
    written = [p.name for p in out.rglob("*") if p.is_file()] if out.exists() else []
    assert any(n.endswith(".md") for n in written), f"no .md written to --out: {written}\n{log}"
    assert any(n.endswith(".json") for n in written), f"no .json written to --out: {written}\n{log}"
    after = _snapshot()
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"a --quick run touched committed results in benchmarks/results/: {changed}\n{log}"


def test_discovery_finds_the_known_scripts():
    names = {p.values[0].name for p in _scripts()}
    assert {"training_step.py", "kernels.py", "suite_baselines.py"} <= names, names
