"""Fixed per-layer cost of a wrapped linear at decode size: one token through one linear.

Rows, each timed interleaved round by round (``--reps`` rounds of ``--calls`` calls, median per
call) on a ``--dim`` × ``--dim`` ``nn.Linear`` in eval mode under ``no_grad``, ``--threads`` torch
threads (default 1, the decode case):

- the bare linear;
- a PEFT LoRA (real ``peft``, rank ``--rank``, unmerged);
- moelora MoE-LoRA (E = ``--experts``, k = 2, rank ``--rank``) with routing statistics on, and with
  them off (``moelora.routing_stats(model).enabled = False``).

The "added µs" column is the row minus the bare linear: the fixed cost of routing, the expert op
and (when on) the statistics, which dominates on CPU when a layer sees one token.

    python -P benchmarks/layer_overhead.py                # writes benchmarks/results/layer_overhead.{md,json}
    python -P benchmarks/layer_overhead.py --quick        # few reps; writes only with --out
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "0"  # the interpreter would route "auto" through Python

import argparse  # noqa: E402
import copy  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

sys.path.pop(0)


class OneLinear(torch.nn.Module):
    """A model holding one linear named ``proj`` (PEFT and moelora both target it by name)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x):
        return self.proj(x)


def build_rows(dim: int, rank: int, experts: int) -> dict[str, torch.nn.Module]:
    import peft

    import moelora

    torch.manual_seed(0)
    base = OneLinear(dim).eval()
    lora = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=rank, lora_alpha=2 * rank,
                                                                    target_modules=["proj"])).eval()
    cfg = moelora.MoELoRAConfig(target_modules=["proj"], num_experts=experts, top_k=2, rank=rank, seed=0)
    stats_on = moelora.inject(copy.deepcopy(base), cfg).eval()
    stats_off = moelora.inject(copy.deepcopy(base), cfg).eval()
    moelora.routing_stats(stats_off).enabled = False
    return {"linear": base, "PEFT LoRA": lora, "moelora, stats on": stats_on, "moelora, stats off": stats_off}


def time_rows(rows: dict[str, torch.nn.Module], dim: int, reps: int, calls: int) -> dict[str, list[float]]:
    """Seconds per call of each row, one list entry per round; rows interleaved, order rotating."""
    x = torch.randn(1, dim)
    names = list(rows)
    times = {n: [] for n in names}
    with torch.no_grad():
        for n in names:  # warm-up
            for _ in range(calls):
                rows[n](x)
        for r in range(reps):
            for n in names[r % len(names):] + names[:r % len(names)]:
                start = time.perf_counter()
                for _ in range(calls):
                    rows[n](x)
                times[n].append((time.perf_counter() - start) / calls)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(parser, default_threads=1)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--reps", type=int, default=30, help="rounds (median taken)")
    parser.add_argument("--calls", type=int, default=200, help="calls per round")
    args = parser.parse_args(argv)
    common.setup(args)
    reps, calls = (5, 20) if args.quick else (args.reps, args.calls)
    times = time_rows(build_rows(args.dim, args.rank, args.experts), args.dim, reps, calls)
    median = {n: statistics.median(t) * 1e6 for n, t in times.items()}
    meta = common.machine_meta(common.command_line(argv))
    lines = ["# Fixed per-layer cost at one token", "", common.meta_line(meta), "",
             f"`{meta['command']}`: one token through a {args.dim}×{args.dim} linear, eval, no_grad; "
             f"E={args.experts}, k=2, r={args.rank}; median of {reps} interleaved rounds of {calls} calls.", "",
             "| row | µs per call | added µs |", "|---|---|---|"]
    for n, us in median.items():
        lines.append(f"| {n} | {us:.1f} | {us - median['linear']:.1f} |")
    print("\n".join(lines))
    out = common.output_dir(args)
    if out is not None:
        payload = {"meta": meta, "median_us": median, "rounds_s": times,
                   "shape": {"dim": args.dim, "rank": args.rank, "experts": args.experts, "top_k": 2}}
        md, _ = common.write_results(out, "layer_overhead", "\n".join(lines), payload)
        print(f"\nwrote {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
