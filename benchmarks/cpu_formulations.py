"""Other torch-op formulations of routed LoRA on a CPU, timed against ours and the expert loop.

    python -P benchmarks/cpu_formulations.py                 # 8 cells, 2 threads (~2 min)
    python -P benchmarks/cpu_formulations.py --threads 1
    python -P benchmarks/cpu_formulations.py --quick --out DIR   # 2 cells, 3 reps: a smoke run

Issue 3 asks for forward+backward at least 3x faster than the per-expert loop for E·r <= 256 on
CPU; ``benchmarks/kernels.py`` measures our op at 1.5-4.9x. This script asks whether a different
formulation built from torch ops would do better. Each is checked against the loop's output and
gradients (``max rel err``) before it is timed. Uniform ranks, fp32.

Implementations (forward + backward, gradients for x, A, Bt and the gate weights):
    loop        the MixLoRA / HF-Mixtral expert loop of kernels.py (autograd)
    ours-torch  moelora.kernels.gated_lora, backend="torch" (what users get)
    lora-kr     one dense LoRA of rank k·r: same FLOPs, no routing
    csr         the routed gate as a CSR [T, R] matrix with k·r entries per row: h = SDDMM
                (``torch.sparse.sampled_addmm``), y = S·Bt, and the backward as SpMM / SDDMM
                (MKL sparse BLAS). No [·, d] row is gathered or scattered.
    padded-bmm  tokens sorted by expert into one [E, C, d] buffer padded to the largest expert
                count C, ``bmm`` for every GEMM, one ``index_add_`` back (no per-expert loop).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

sys.path.pop(0)

# benchmarks/kernels.py under another module name: as "kernels" it would shadow the repository's
# kernels package and Hugging Face's (see common.py).
_spec = importlib.util.spec_from_file_location("bench_kernels", Path(__file__).resolve().parent / "kernels.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def _routing_pattern(ids: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR ``(crow, cols)`` of the ``[T, R]`` routed gate: the k·r columns of each token's experts."""
    T, k = ids.shape
    cols = (ids.unsqueeze(-1) * r + torch.arange(r, device=ids.device)).reshape(-1)
    return torch.arange(0, T * k * r + 1, k * r, device=ids.device), cols


class _CSRLoRA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, A, Bt, w, ids, scale, r):
        crow, cols = _routing_pattern(ids, r)
        ctx.csr = lambda values: torch.sparse_csr_tensor(crow, cols, values, size=(x.shape[0], A.shape[0]))
        h = torch.sparse.sampled_addmm(ctx.csr(x.new_zeros(cols.numel())), x, A.t(), beta=0.0).values()
        g = (w * scale[ids]).repeat_interleave(r, dim=1).reshape(-1)                 # [T·k·r]
        s = ctx.csr(h * g)
        ctx.save_for_backward(x, A, Bt, h, g, ids, scale)
        ctx.s, ctx.r = s, r
        return s @ Bt

    @staticmethod
    def backward(ctx, dy):
        x, A, Bt, h, g, ids, scale = ctx.saved_tensors
        (T, k), r = ids.shape, ctx.r
        du = torch.sparse.sampled_addmm(ctx.csr(torch.zeros_like(h)), dy, Bt.t(), beta=0.0).values()
        gw = (du * h).view(T, k, r).sum(-1) * scale[ids]
        dh = ctx.csr(du * g)
        return dh @ A, dh.t() @ x, ctx.s.t() @ dy, gw, None, None, None


class _PaddedBmmLoRA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, A, Bt, w, ids, scale, r):
        (T, k), E = ids.shape, A.shape[0] // r
        flat = ids.reshape(-1)
        counts = torch.bincount(flat, minlength=E)
        C = int(counts.max())
        order = torch.argsort(flat, stable=True)
        e_sorted = flat.index_select(0, order)
        dst = e_sorted * C + torch.arange(order.numel()) - (counts.cumsum(0) - counts).index_select(0, e_sorted)
        tok = torch.div(order, k, rounding_mode="floor")
        gather = torch.zeros(E * C, dtype=torch.long).index_copy_(0, dst, tok)         # pads read row 0
        scatter = torch.full((E * C,), T, dtype=torch.long).index_copy_(0, dst, tok)   # pads add to row T
        gate = x.new_zeros(E * C).index_copy_(0, dst, w.reshape(-1)[order] * scale[e_sorted]).view(E, C, 1)
        xp = x.index_select(0, gather).view(E, C, -1)
        h = torch.bmm(xp, A.view(E, r, -1).transpose(1, 2))                          # [E, C, r]
        yp = torch.bmm(h * gate, Bt.view(E, r, -1))
        ctx.save_for_backward(x, A, Bt, h, gate, gather, scatter, dst, order, ids, scale)
        ctx.r = r
        return x.new_zeros(T + 1, Bt.shape[1]).index_add_(0, scatter, yp.flatten(0, 1))[:T]

    @staticmethod
    def backward(ctx, dy):
        x, A, Bt, h, gate, gather, scatter, dst, order, ids, scale = ctx.saved_tensors
        r, (T, k), E = ctx.r, ids.shape, A.shape[0] // ctx.r
        Ae, Be = A.view(E, r, -1), Bt.view(E, r, -1)
        dyp = dy.index_select(0, gather).view(E, -1, dy.shape[1])
        du = torch.bmm(dyp, Be.transpose(1, 2))
        slot_gw = (du * h).sum(-1).flatten()                                         # [E·C], unscaled
        gw = slot_gw.index_select(0, dst)                                            # sorted slot order
        gw = torch.empty_like(gw).index_copy_(0, order, gw).view(T, k) * scale[ids]
        gdu = du * gate
        gx = x.new_zeros(T + 1, x.shape[1]).index_add_(0, scatter, torch.bmm(gdu, Ae).flatten(0, 1))[:T]
        xp = x.index_select(0, gather).view(E, -1, x.shape[1])
        gA = torch.bmm(gdu.transpose(1, 2), xp).reshape(A.shape)
        gB = torch.bmm((h * gate).transpose(1, 2), dyp).reshape(Bt.shape)
        return gx, gA, gB, gw, None, None, None


def _fns(c):
    ids, scale, r = c["ids"], c["scale"], c["r"]
    return {
        "loop": bench.loop(c),
        "ours-torch": bench.ours(c, "torch"),
        "lora-kr": bench.dense_lora(c["k"] * r),
        "csr": lambda x, A, Bt, w: _CSRLoRA.apply(x, A, Bt, w, ids, scale, r),
        "padded-bmm": lambda x, A, Bt, w: _PaddedBmmLoRA.apply(x, A, Bt, w, ids, scale, r),
    }


def _grads(fn, args, dy):
    leaves = [a.detach().requires_grad_() for a in args]
    y = fn(*leaves)
    y.backward(dy)
    return [y.detach()] + [t.grad for t in leaves]


def max_rel_err(fn, ref_fn, args) -> float:
    """Largest relative error (max-abs normalised) of fn's output and 4 gradients vs ref_fn's."""
    dy = torch.randn(args[0].shape[0], args[2].shape[1], generator=torch.Generator().manual_seed(5))
    got, ref = _grads(fn, args, dy), _grads(ref_fn, args, dy)
    return max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(got, ref))


def run(cells, reps):
    rows = []
    for T, d, E, k, r in cells:
        c = bench.make(T, d, d, E, k, r, torch.float32, "cpu")
        args = [c["x"], c["A"], c["Bt"], c["w"]]
        fns = _fns(c)
        errs = {n: max_rel_err(f, fns["loop"], args) for n, f in fns.items() if n not in ("loop", "lora-kr")}
        times = bench.timed_many(fns, args, True, reps)
        row = dict(T=T, d=d, E=E, k=k, r=r, ms={n: t * 1e3 for n, t in times.items()}, max_rel_err=errs)
        rows.append(row)
        print(T, d, E, k, r, {n: round(v, 2) for n, v in row["ms"].items()}, flush=True)
    return rows


def markdown(rows, meta, command):
    names = list(rows[0]["ms"])
    lines = ["# Routed LoRA on CPU: torch-op formulations, forward + backward", "",
             f"`{command}` · torch {torch.__version__}, {meta['threads']} thread(s), fp32, medians of "
             f"{meta['reps']} interleaved runs, ms. {meta['machine']}; load average at the end {meta['load_average']}.", "",
             "| T | d | E | k | r | " + " | ".join(names) + " | " +
             " | ".join(f"{n} × loop" for n in names[1:]) + " | max rel err (csr / padded / ours) |",
             "|" + "---|" * (5 + 2 * len(names))]
    for w in rows:
        ms = w["ms"]
        e = w["max_rel_err"]
        lines.append(f"| {w['T']} | {w['d']} | {w['E']} | {w['k']} | {w['r']} | "
                     + " | ".join(f"{ms[n]:.2f}" for n in names) + " | "
                     + " | ".join(f"{ms['loop'] / ms[n]:.2f}" for n in names[1:])
                     + f" | {e['csr']:.0e} / {e['padded-bmm']:.0e} / {e['ours-torch']:.0e} |")
    lines += ["", "`× loop` = loop time / that implementation's time (higher is better). `lora-kr` is "
              "the bound for any routed implementation: the same FLOPs with no routing at all."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_args(parser)
    parser.add_argument("--reps", type=int, default=None, help="timed runs per cell (default 15; 3 in --quick)")
    args = parser.parse_args(argv)
    common.setup(args)
    if args.quick:
        cells = [(256, 1024, 8, 2, 16), (256, 1024, 16, 4, 16)]
    else:
        cells = [(T, d, E, k, 16) for d in (1024, 4096) for T in (256, 2048) for E, k in ((8, 2), (16, 4))]
    reps = args.reps or (3 if args.quick else 15)
    rows = run(cells, reps)
    command = "python -P benchmarks/cpu_formulations.py" + (" --quick" if args.quick else "") + \
        f" --threads {torch.get_num_threads()}"
    meta = dict(common.machine_meta(command), reps=reps)
    md = markdown(rows, meta, command)
    print(md)
    out = common.output_dir(args)
    if out:
        stem = f"cpu_formulations_t{torch.get_num_threads()}" + ("_quick" if args.quick else "")
        common.write_results(out, stem, md, dict(meta=meta, rows=rows))


if __name__ == "__main__":
    main()
