"""Kernel benchmark: MoE-LoRA forward and forward+backward times (research/kernels.md §8).

    python benchmarks/kernels.py            # the §8 grid (long on CPU)
    python benchmarks/kernels.py --quick    # a small slice, a few minutes on 2 CPU cores
    python benchmarks/kernels.py --smoke --out DIR   # one case of each table, 1 rep: checks the
                                            # script runs (tests/test_benchmarks.py), not a measurement

Implementations (each where it runs):
    ours-torch     moelora.kernels.gated_lora, backend="torch": the op users get (dense-gated up
                   to DENSE_MAX_RANK["torch"], sorted-segment grouped above it)
    ours-dense     the dense-gated torch twin alone (no dispatch)
    ours-grouped   moelora.kernels.grouped_lora, torch twin (sorted segments, explicit backward)
    ours-triton    gated_lora with backend="triton" (GPU only; dense-gated up to
                   DENSE_MAX_RANK["triton"], grouped kernels above; on CPU the interpreter is
                   checked for correctness at a tiny shape and never timed)
    loop           naive per-expert loop, MixLoRA / HF-Mixtral style (where, gather, 2 matmuls,
                   gate multiply, in-place index_add_), autograd backward
    lora-kr        one dense LoRA of rank k·r (the "multi-LoRA ≈ single LoRA" bar)
    lora-R         one dense LoRA of rank R = E·r
    grouped_mm     torch._grouped_mm on expert-sorted tokens (where this torch build runs it)

Prints a table and writes markdown + JSON to benchmarks/results/kernels_<device>[_quick].* (or
to ``--out DIR``; ``--smoke`` writes to a fresh temp dir unless ``--out`` is given).
Timings are medians after warm-up. This is a benchmark, never a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

CUDA = torch.cuda.is_available()


def _choose_interpreter() -> None:
    """On CPU, run Triton under its interpreter (only the smoke check uses it). Called from
    ``__main__`` only, never at import: transformers may import a top-level ``kernels`` module
    while probing for Hugging Face's package, and from this directory that is this file."""
    if not CUDA:
        os.environ.setdefault("TRITON_INTERPRET", "1")

# The repository root only while moelora is imported (it may not be installed): left on sys.path,
# its top-level kernels/ shadows Hugging Face's ``kernels``, which bitsandbytes probes on import.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moelora import kernels as K  # noqa: E402

sys.path.pop(0)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

sys.path.pop(0)

RESULTS = Path(__file__).resolve().parent / "results"
H100_BW = 3.0e12  # bytes/s, research/kernels.md §4 (D2D copy); the GPU run measures its own


# ----------------------------------------------------------------------------- implementations


def make(T, d, m, E, k, r, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    R = E * r
    x = torch.randn(T, d, generator=g).to(device, dtype)
    A = (torch.randn(R, d, generator=g) / d ** 0.5).to(device, dtype)
    Bt = (torch.randn(R, m, generator=g) / R ** 0.5).to(device, dtype)
    logits = torch.randn(T, E, generator=g)
    w, ids = logits.softmax(-1).topk(k, dim=-1)
    w = (w / w.sum(-1, keepdim=True)).to(device, dtype)
    col_expert = torch.arange(E).repeat_interleave(r).to(device)
    scale = torch.full((E,), 2.0, device=device, dtype=dtype)
    return dict(x=x, A=A, Bt=Bt, ids=ids.to(device), w=w, col_expert=col_expert, scale=scale,
                col_scale=scale[col_expert], E=E, k=k, r=r)


def ours(c, backend):
    return lambda x, A, Bt, w: K.gated_lora(x, A, Bt, c["ids"], w, c["col_expert"], c["col_scale"],
                                            num_experts=c["E"], backend=backend, ranks=[c["r"]] * c["E"])


def ours_dense(c, backend):
    """The dense-gated autograd.Function directly (no dense/grouped dispatch)."""
    impl = K.resolve_backend(backend, c["x"].device, c["x"].dtype)
    return lambda x, A, Bt, w: K.ops._GatedLoRAFn.apply(x, A, Bt, w, c["ids"], c["col_expert"], c["col_scale"],
                                                        c["E"], impl)


def ours_grouped(c, backend):
    return lambda x, A, Bt, w: K.grouped_lora(x, A, Bt, c["ids"], w, [c["r"]] * c["E"], c["scale"], backend=backend)


def loop(c):
    """MixLoRA / HF-Mixtral expert loop: per expert ``torch.where`` over the routing, gather its
    tokens, LoRA, gate multiply, in-place ``index_add_`` into a zero output (as
    ``MixtralSparseMoeBlock.forward`` and MixLoRA's ``_mixtral_compatible_forward`` do)."""
    E, r, ids = c["E"], c["r"], c["ids"]

    def fn(x, A, Bt, w):
        y = torch.zeros(x.shape[0], Bt.shape[1], dtype=x.dtype, device=x.device)
        for e in range(E):
            tok, slot = torch.where(ids == e)
            if tok.numel() == 0:
                continue
            a, b = A[e * r:(e + 1) * r], Bt[e * r:(e + 1) * r]
            ye = ((x[tok] @ a.t()) @ b) * (c["scale"][e] * w[tok, slot]).unsqueeze(1)
            y.index_add_(0, tok, ye)
        return y
    return fn


def dense_lora(rank):
    return lambda x, A, Bt, w: (x @ A[:rank].t()) @ Bt[:rank]


def grouped_mm(c):
    """Tokens sorted by expert, two torch._grouped_mm calls, gate multiply, index_add."""
    E, r, k = c["E"], c["r"], c["k"]

    def fn(x, A, Bt, w):
        flat = c["ids"].reshape(-1)
        order = torch.argsort(flat, stable=True)
        tok = order // k
        offs = torch.bincount(flat, minlength=E).cumsum(0).to(torch.int32)
        h = torch._grouped_mm(x[tok], A.view(E, r, -1).transpose(1, 2), offs=offs)
        y_s = torch._grouped_mm(h, Bt.view(E, r, -1), offs=offs) * (w.reshape(-1)[order] * c["scale"][0]).unsqueeze(1)
        return torch.zeros(x.shape[0], Bt.shape[1], dtype=y_s.dtype, device=x.device).index_add(0, tok, y_s)
    return fn


# ----------------------------------------------------------------------------- timing


def sync():
    if CUDA:
        torch.cuda.synchronize()


def timed(fn, args, backward, reps, warmup=1):
    """Median seconds of fn(*args) (+ backward of dy when ``backward``)."""
    return timed_many({"f": fn}, args, backward, reps, warmup)["f"]


def timed_many(fns, args, backward, reps, warmup=1):
    """Median seconds of each ``fns[name](*args)`` (+ backward), the implementations interleaved
    rep by rep so slow drifts of a shared machine hit them alike. A failing one gets its error."""
    leaves = [a.detach().requires_grad_(backward) for a in args]
    times = {n: [] for n in fns}
    dy = {}
    if backward:
        # The output gradient is drawn once, outside the timed region: randn of a [T, d] tensor
        # costs as much as a whole small LoRA step on a CPU (3 ms at T=512, d=1024).
        for name, fn in fns.items():
            try:
                with torch.no_grad():
                    dy[name] = torch.randn_like(fn(*leaves))
            except Exception as e:
                times[name] = e
    for i in range(warmup + reps):
        for name, fn in fns.items():
            if isinstance(times[name], Exception):
                continue
            for t in leaves:
                t.grad = None
            try:
                sync()
                t0 = time.perf_counter()
                y = fn(*leaves)
                if backward:
                    y.backward(dy[name])
                sync()
            except Exception as e:  # e.g. _grouped_mm without a kernel for this device/dtype
                times[name] = e
                continue
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {n: (t if isinstance(t, Exception) else statistics.median(t)) for n, t in times.items()}


def fwd_bytes(T, d, m, R, s):
    """research/kernels.md §4: s·(T·d + 2·T·m + R·(d+m)) (y read and written when accumulated)."""
    return s * (T * d + 2 * T * m + R * (d + m))


def measure_bw():
    buf = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    out = torch.empty_like(buf)
    t = timed(lambda b: out.copy_(b), [buf], False, 10, 3)
    return 2 * buf.numel() / t


def run_case(T, d, m, E, k, r, dtype, reps, impls, bw):
    device = "cuda" if CUDA else "cpu"
    c = make(T, d, m, E, k, r, dtype, device)
    args = [c["x"], c["A"], c["Bt"], c["w"]]
    fns = {"ours-torch": ours(c, "torch"), "ours-dense": ours_dense(c, "torch"),
           "ours-grouped": ours_grouped(c, "torch"), "loop": loop(c),
           "lora-kr": dense_lora(k * r), "lora-R": dense_lora(E * r), "grouped_mm": grouped_mm(c)}
    if CUDA:
        fns["ours-triton"] = ours(c, "triton")
    row = dict(T=T, d=d, m=m, E=E, k=k, r=r, R=E * r, dtype=str(dtype).replace("torch.", ""))
    fns = {n: f for n, f in fns.items() if n in impls}
    for mode, bwd in (("fwd", False), ("fb", True)):
        for name, t in timed_many(fns, args, bwd, reps).items():
            if isinstance(t, Exception):
                row[f"{name}:{mode}"] = None
                row.setdefault("notes", []).append(f"{name} {mode}: {type(t).__name__}: {str(t)[:80]}")
            else:
                row[f"{name}:{mode}"] = t
    for mode in ("fwd", "fb"):
        best = row.get(f"ours-triton:{mode}") or row.get(f"ours-torch:{mode}")
        for ref in ("loop", "lora-kr", "lora-R"):
            if best and row.get(f"{ref}:{mode}"):
                row[f"x_vs_{ref}:{mode}"] = row[f"{ref}:{mode}"] / best
    for mode in ("fwd", "fb"):
        # What a routed op would gain over the loop if it cost exactly one dense LoRA of rank k·r
        # (the same FLOPs, no routing, no gather or scatter): an upper bound for any torch-op path.
        if row.get(f"loop:{mode}") and row.get(f"lora-kr:{mode}"):
            row[f"ceiling:{mode}"] = row[f"loop:{mode}"] / row[f"lora-kr:{mode}"]
    if CUDA and row.get("ours-triton:fwd"):
        row["hbm_frac:fwd"] = fwd_bytes(T, d, m, E * r, c["x"].element_size()) / row["ours-triton:fwd"] / bw
    return row


def rankwise_case(T, d, m, r, k, dtype, reps):
    device = "cuda" if CUDA else "cpu"
    g = torch.Generator().manual_seed(0)
    x, A, Bt = (torch.randn(T, d, generator=g).to(device, dtype), torch.randn(r, d, generator=g).to(device, dtype),
                torch.randn(r, m, generator=g).to(device, dtype))

    def peft(x, A, Bt):  # PEFT FlyLoRA-style: dense A, topk, scatter mask, linear
        h = x @ A.t()
        mask = torch.zeros_like(h).scatter(1, h.abs().topk(k, dim=1).indices, 1.0)
        return (h * mask) @ Bt

    fns = {"ours-torch": lambda x, A, Bt: K.rankwise_lora(x, A, Bt, k, backend="torch")[0],
           "peft-style": peft, "lora-r": lambda x, A, Bt: (x @ A.t()) @ Bt}
    if CUDA:
        fns["ours-triton"] = lambda x, A, Bt: K.rankwise_lora(x, A, Bt, k, backend="triton")[0]
    row = dict(T=T, d=d, r=r, k=k)
    for mode, bwd in (("fwd", False), ("fb", True)):
        for name, t in timed_many(fns, [x, A, Bt], bwd, reps).items():
            row[f"{name}:{mode}"] = None if isinstance(t, Exception) else t
    return row


def interpreter_smoke():
    """Triton kernels under TRITON_INTERPRET=1 against the torch twin at a tiny shape (not timed)."""
    if not K.triton_available():
        return {"status": "triton not installed"}
    out = {}
    c = make(37, 100, 72, 4, 2, 8, torch.float32, "cpu")
    args = [c["x"], c["A"], c["Bt"], c["w"]]
    for name, fa, fb in (("gated", ours(c, "triton"), ours(c, "torch")),
                         ("grouped", ours_grouped(c, "triton"), ours_grouped(c, "torch"))):
        ya, yb = fa(*args), fb(*args)
        out[name] = float((ya - yb).norm() / yb.norm())
    ya, ia = K.rankwise_lora(c["x"], c["A"], c["Bt"], 4, backend="triton")
    yb, ib = K.rankwise_lora(c["x"], c["A"], c["Bt"], 4, backend="torch")
    out["rankwise"] = float((ya - yb).norm() / yb.norm())
    out["rankwise_same_ranks"] = bool(torch.equal(ia, ib))
    return out


# ----------------------------------------------------------------------------- report


def fmt(v, unit=1e3):
    return "–" if v is None else f"{v * unit:.2f}"


def targets(rows):
    """The issue's targets, checked against this run's numbers (never estimated)."""
    small = [r["x_vs_loop:fb"] for r in rows if r["R"] <= 256 and r.get("x_vs_loop:fb")]
    large = [r["x_vs_loop:fb"] for r in rows if r["R"] > 256 and r.get("x_vs_loop:fb")]
    out = []
    if small:
        ceil = [r["ceiling:fb"] for r in rows if r["R"] <= 256 and r.get("ceiling:fb")]
        out.append(f"- fwd+bwd ≥ 3× the loop for E·r ≤ 256: {'met' if min(small) >= 3 else '**not met**'} "
                   f"(measured {min(small):.2f}–{max(small):.2f}×; a dense LoRA of rank k·r is "
                   f"{min(ceil):.2f}–{max(ceil):.2f}× faster than the loop on the same rows).")
    if large:
        out.append(f"- never slower than the loop elsewhere (fwd+bwd): {'met' if min(large) >= 1 else '**not met**'} "
                   f"(measured {min(large):.2f}–{max(large):.2f}×).")
    if CUDA:
        big = [r for r in rows if r["T"] == 8192 and r["d"] == 4096 and (r["E"], r["k"], r["r"]) == (8, 2, 16)]
        for r in big:
            out.append(f"- H100: ≥ 10× the loop (fwd+bwd): {r.get('x_vs_loop:fb', 0):.2f}×; ≤ 1.2× a dense LoRA of "
                       f"rank k·r (fwd): {1 / r['x_vs_lora-kr:fwd']:.2f}×; ≥ 70 % HBM (fwd): "
                       f"{100 * r.get('hbm_frac:fwd', 0):.0f} %.")
    else:
        out.append("- H100 targets (10× loop, ≤ 1.2× dense LoRA(k·r), ≥ 70 % HBM): not measured, no GPU here.")
    return out


def markdown(rows, sweep, fly, smoke, meta):
    impls = ["ours-triton", "ours-torch", "ours-dense", "ours-grouped", "loop", "lora-kr", "lora-R", "grouped_mm"]
    impls = [i for i in impls if any(f"{i}:fwd" in r for r in rows)]
    lines = [f"# Kernel benchmark ({meta['device']})", "",
             f"torch {meta['torch']}, {meta['threads']} threads, dtype {meta['dtype']}, medians of {meta['reps']} "
             f"runs after warm-up, times in ms. Mode: {meta['mode']}.", ""]
    if not CUDA:
        lines += ["**GPU numbers were not measured here**: no GPU was available, so the Triton path is not "
                  "timed (`ours-triton` and the HBM-roofline column are absent). The Triton kernels were "
                  "run under the interpreter for correctness only (relative error against the torch twin, "
                  "T = 37, d = 100): " + ", ".join(f"{k} {v:.1e}" if isinstance(v, float) else f"{k} {v}"
                                                   for k, v in smoke.items()) + ".", ""]
    if meta.get("load"):
        lines += [f"Load average at start / end: {meta['load']} (other work shared the 2 cores; cells can move "
                  "by tens of percent run to run).", ""]
    for mode, title in (("fwd", "Forward"), ("fb", "Forward + backward")) if rows else ():
        head = ["T", "d", "E", "k", "r", "E·r"] + impls + ["× loop", "× lora-kr", "× lora-R", "loop ÷ lora-kr"]
        if CUDA:
            head.append("HBM frac")
        lines += [f"## {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            cells = [str(r[c]) for c in ("T", "d", "E", "k", "r", "R")] + [fmt(r.get(f"{i}:{mode}")) for i in impls]
            cells += [fmt(r.get(f"x_vs_{ref}:{mode}"), 1) for ref in ("loop", "lora-kr", "lora-R")]
            cells.append(fmt(r.get(f"ceiling:{mode}"), 1))
            if CUDA:
                cells.append(fmt(r.get(f"hbm_frac:{mode}"), 1))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if rows:
        lines += ["`× loop` = loop time / `ours-torch` time (`ours-triton` on a GPU), higher is better; "
                  "`× lora-kr` = dense LoRA(k·r) time / ours (1/× is our cost relative to a single LoRA). "
                  "`loop ÷ lora-kr` = what a routed op would gain over the loop if it cost exactly one dense "
                  "LoRA of rank k·r (same FLOPs, no routing): the most any implementation built from torch "
                  "ops can reach.", ""]
        lines += ["## Targets (issue 3)", ""] + targets(rows) + [""]
    if sweep:
        lines += ["## Dense-gated vs sorted-grouped (torch twins), the `DENSE_MAX_RANK['torch']` sweep", "",
                  "| T | d | E | k | r | E·r | dense fwd | grouped fwd | dense f+b | grouped f+b | grouped/dense f+b |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in sweep:
            ratio = (r["ours-grouped:fb"] / r["ours-dense:fb"]) if r.get("ours-dense:fb") else None
            lines.append(f"| {r['T']} | {r['d']} | {r['E']} | {r['k']} | {r['r']} | {r['R']} | "
                         f"{fmt(r['ours-dense:fwd'])} | {fmt(r['ours-grouped:fwd'])} | {fmt(r['ours-dense:fb'])} | "
                         f"{fmt(r['ours-grouped:fb'])} | {fmt(ratio, 1)} |")
        lines.append("")
    if fly:
        lines += ["## Rank-wise (FlyLoRA)", "", "| T | d | r | k | " + " | ".join(
            f"{n} {m}" for n in ("ours-triton", "ours-torch", "peft-style", "lora-r") if f"{n}:fwd" in fly[0]
            for m in ("fwd", "f+b")) + " |"]
        cols = [n for n in ("ours-triton", "ours-torch", "peft-style", "lora-r") if f"{n}:fwd" in fly[0]]
        lines.append("|" + "---|" * (4 + 2 * len(cols)))
        for r in fly:
            lines.append(f"| {r['T']} | {r['d']} | {r['r']} | {r['k']} | " + " | ".join(
                f"{fmt(r[f'{n}:fwd'])} | {fmt(r[f'{n}:fb'])}" for n in cols) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a small slice of the grid")
    ap.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (GPU default)")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2,
                    help="torch CPU threads (on a shared, loaded machine 1 gives steadier numbers)")
    ap.add_argument("--sweep-only", action="store_true", help="only the dense-vs-grouped rank sweep")
    ap.add_argument("--smoke", action="store_true",
                    help="one small case per table, 1 rep: checks the script runs (not a measurement)")
    ap.add_argument("--out", type=Path, default=None,
                    help="results directory (default benchmarks/results; --smoke: a fresh temp dir)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or ("bfloat16" if CUDA else "float32"))
    reps = args.reps or (1 if args.smoke else 3 if args.quick else 5)
    configs = [(8, 2, 16), (16, 4, 16), (64, 2, 8), (8, 2, 64)]
    if args.smoke:
        grid = [(256, 256, 256, 8, 2, 16)]
        sweep_E, sweep_T = (8,), (256,)
        fly = [(256, 256, 256, 32, 4)]
    elif args.quick:
        grid = [(T, 1024, 1024, *c) for T in (512, 2048) for c in configs]
        sweep_E, sweep_T = (2, 4, 8, 32, 128), (2048,)
        fly = [(2048, 1024, 1024, 32, 4)]
    else:
        grid = [(T, d, d, *c) for d in (1024, 4096) for T in (256, 2048, 8192) for c in configs]
        sweep_E, sweep_T = (1, 2, 4, 8, 16, 32, 64, 128, 256), (256, 2048)
        fly = [(T, d, d, r, k) for d in (1024, 4096) for T in (2048, 8192) for r in (32, 64) for k in (4, 8)]
    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    bw = measure_bw() if CUDA else H100_BW
    smoke = {} if CUDA else interpreter_smoke()
    impls = {"ours-triton", "ours-torch", "ours-dense", "ours-grouped", "loop", "lora-kr", "lora-R", "grouped_mm"}
    if args.sweep_only:
        grid, fly = [], []
    rows = []
    for case in grid:
        rows.append(run_case(*case, dtype, reps, impls, bw))
        print(json.dumps({k: (round(v * 1e3, 3) if isinstance(v, float) and ":" in k and not k.startswith(("x_", "ceiling", "hbm")) else v)
                          for k, v in rows[-1].items() if k != "notes"}), flush=True)
    sweep = []
    for T in sweep_T:
        for E in sweep_E:
            sweep.append(run_case(T, 1024, 1024, E, min(2, E), 16, dtype, reps, {"ours-dense", "ours-grouped"}, bw))
            print("sweep", T, E * 16, {k: v for k, v in sweep[-1].items() if ":" in k}, flush=True)
    fly_rows = [rankwise_case(*c, dtype, reps) for c in fly]
    meta = dict(device=torch.cuda.get_device_name() if CUDA else f"CPU ({platform.processor() or platform.machine()})",
                torch=torch.__version__, threads=torch.get_num_threads(), dtype=str(dtype).replace("torch.", ""),
                reps=reps, quick=args.quick, smoke=args.smoke,
                mode="dense-vs-grouped sweep only" if args.sweep_only else
                ("smoke (not a measurement)" if args.smoke else "quick" if args.quick else "full §8 grid"), hbm_bytes_per_s=bw if CUDA else None, gpu_measured=CUDA,
                load=f"{load0:.1f} / {os.getloadavg()[0]:.1f}" if load0 is not None else None)
    md = markdown(rows, sweep, fly_rows, smoke, meta)
    print(md)
    out = args.out or (Path(tempfile.mkdtemp(prefix="kernels_smoke_")) if args.smoke else RESULTS)
    stem = f"kernels_{'gpu' if CUDA else 'cpu'}{'_smoke' if args.smoke else '_quick' if args.quick else ''}"
    stem += f"{'_sweep' if args.sweep_only else ''}" + ("" if CUDA else f"_t{torch.get_num_threads()}")
    common.write_results(out, stem, md, dict(meta=meta, interpreter_smoke=smoke, grid=rows,
                                             dense_vs_grouped=sweep, rankwise=fly_rows))
    print(f"wrote {out / stem}.md and .json")


if __name__ == "__main__":
    _choose_interpreter()
    main()
