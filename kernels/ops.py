"""Public expert ops: one ``autograd.Function`` each, with backend dispatch.

``backend``:
    ``"torch"``   the torch twins of :mod:`moelora.kernels.reference` (any device).
    ``"triton"``  the Triton kernels (CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1``).
    ``"auto"``    Triton for CUDA tensors, and for CPU tensors when ``TRITON_INTERPRET=1`` asks for
                  it; the torch twin otherwise (and always where triton is not installed).

Only ``h = x Aᵀ`` (``[T, R]``) is saved for backward, never a ``[T·k, d_out]`` tensor.

Dense-gated vs sorted grouped: the dense formulation does ``R/k·r̄`` times the FLOPs of the
sparse one but reads ``x`` and writes ``y`` exactly once, so it wins while the layer stays
memory-bound. ``gated_lora`` switches to :func:`~moelora.kernels.grouped.grouped_lora` when the
rank exceeds :data:`DENSE_MAX_RANK` for the implementation it runs (see that constant).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from collections.abc import Sequence

import torch
from torch import Tensor

from . import reference

BACKENDS = ("auto", "torch", "triton")

#: Largest bank rank the dense-gated path handles; above it ``gated_lora`` takes the grouped path.
#: Tunable: edit the dict (keys are the implementation, ``"triton"`` or ``"torch"``).
#:
#: * ``"triton"`` = 256, compared with ``R_pad = next_pow2(max(16, R))``: **analysis, not
#:   measurement** (no GPU was available). research/kernels.md §4: on an H100 in bf16 the ridge
#:   is ≈265 FLOP/B and the dense-gated forward has intensity ≈0.67·R, so it stays bandwidth-bound
#:   (same time as the sparse path) up to R ≈ 256–384; the 64×R_pad fp32 accumulator also fits in
#:   registers only up to R_pad = 256. Re-tune on the device with ``benchmarks/kernels.py``.
#: * ``"torch"`` = 96, compared with ``R``: measured on this project's CPU machine (fp32, d = 1024,
#:   k = 2, r = 16, T ∈ {256, 2048}, 1 and 2 threads; ``python -P benchmarks/kernels.py
#:   --sweep-only --reps 15 --threads N``, benchmarks/results/kernels_cpu_sweep_t{1,2}.md). The
#:   dense twin won forward+backward at R ≤ 64 (1.1–1.7×, ties at R = 64 with 1 thread); the
#:   sorted-segment twin won from R = 128 on (1.08–1.9× at 128, 1.2–25× at 256–4096); 96 sits
#:   between the two measured points. A CPU
#:   is compute-bound at these ranks, so the dense formulation's R/(k·r) extra FLOPs cost time
#:   there. The crossover also depends on k·r (at k = E every slot is routed and dense always
#:   wins), which a threshold on R alone ignores.
DENSE_MAX_RANK = {"triton": 256, "torch": 96}

_TRITON_FOUND: bool | None = None


def triton_available() -> bool:
    """Whether the ``triton`` package is installed (checked once, without importing it)."""
    global _TRITON_FOUND
    if _TRITON_FOUND is None:
        _TRITON_FOUND = importlib.util.find_spec("triton") is not None
    return _TRITON_FOUND


def _interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


#: Input dtypes the Triton kernels take (fp32 accumulation); float64 always runs the torch twin.
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """Pick the implementation for ``backend`` on ``device``: ``"torch"`` or ``"triton"``.

    ``"auto"`` takes Triton for CUDA tensors, and for CPU tensors when ``TRITON_INTERPRET=1``,
    if triton is installed and ``dtype`` (when given) is one the kernels take
    (:data:`TRITON_DTYPES`); otherwise the torch twin. ``"triton"`` raises instead of falling back.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is invalid: expected one of {BACKENDS}.")
    if backend == "torch":
        return "torch"
    usable = device.type == "cuda" or (device.type == "cpu" and _interpret_requested())
    dtype_ok = dtype is None or dtype in TRITON_DTYPES
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs the triton package, which is not installed. "
                               "Install triton (Linux) or use backend='auto' or 'torch'.")
        if not usable:
            raise ValueError(f"backend='triton' runs on CUDA tensors, or on CPU tensors only when "
                             f"TRITON_INTERPRET=1 is set before triton is imported; got a {device.type} "
                             f"tensor. Move the inputs to a GPU, set TRITON_INTERPRET=1, or use backend='torch'.")
        if not dtype_ok:
            raise ValueError(f"backend='triton' takes {[str(d) for d in TRITON_DTYPES]} inputs, got {dtype}; "
                             f"use backend='torch' (or 'auto') for float64.")
        return "triton"
    return "triton" if usable and dtype_ok and triton_available() else "torch"


_CONSTANTS: dict[tuple, Tensor] = {}


def autocast_off(device_type: str):
    """Context in which autocast is off on ``device_type`` (a no-op where autocast does not exist).

    Routers and the expert ops choose their own precision (fp32 logits; fp32 ``h`` and rank
    scores; fp32 accumulation). Inside a bf16/fp16 autocast region every matmul would otherwise be
    recast to low precision despite fp32 operands, so routing and FlyLoRA's rank choice would
    differ from the same model outside autocast (and the torch twin from the Triton kernels, which
    autocast never touches)."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def without_autocast(backward):
    """Decorate an ``autograd.Function.backward(ctx, grad, ...)``: run it with autocast off on the
    gradient's device. Backward runs under whatever autocast state its caller has, not the
    forward's (which the ops set with :func:`autocast_off`)."""
    @functools.wraps(backward)
    def run(ctx, grad, *rest):
        with autocast_off(grad.device.type):
            return backward(ctx, grad, *rest)
    return run


def device_constant(values: Sequence[int | float], device: torch.device | str,
                    dtype: torch.dtype = torch.long) -> Tensor:
    """``torch.tensor(values)`` on ``device``, built once per (values, device, dtype) and reused.

    For small host-known constants (rank offsets, kept-expert indices) used in every forward:
    a fresh ``torch.tensor(..., device="cuda")`` is a blocking host-to-device copy, which waits
    for everything queued on the GPU (a sync per layer per forward). Not cached while
    ``torch.compile`` traces (the tensor would be a fake one)."""
    key = (tuple(values), str(device), dtype)
    hit = _CONSTANTS.get(key)
    if hit is not None:
        return hit
    tensor = torch.tensor(list(values), dtype=dtype, device=device)
    if not torch.compiler.is_compiling():
        if len(_CONSTANTS) >= 4096:  # bounded: shapes come from the model's banks, a handful each
            _CONSTANTS.clear()
        _CONSTANTS[key] = tensor
    return tensor


def check_operands(op: str, x: Tensor, A: Tensor, Bt: Tensor, expert_ids: Tensor | None = None,
                   num_experts: int | None = None, **others: Tensor | None) -> None:
    """Raise a ``ValueError`` that names the argument and the fix when ``x``, ``A``, ``Bt`` differ
    in dtype, any operand (``others`` included: weights, scales, ...) is on another device than
    ``x``, or ``expert_ids`` is not an integer tensor or (CPU tensors only) holds an id outside
    ``[-1, num_experts)``. The range is not read on a GPU: that would be a device sync per layer
    per forward; there an out-of-range id's slot is ignored by the Triton path."""
    if not (x.dtype == A.dtype == Bt.dtype):
        raise ValueError(f"{op}: x is {x.dtype}, A is {A.dtype}, Bt is {Bt.dtype}; they must share the "
                         f"adapter dtype. Cast the input first, e.g. x.to(A.dtype).")
    named = {"A": A, "Bt": Bt, "expert_ids": expert_ids, **others}
    away = {n: str(t.device) for n, t in named.items() if t is not None and t.device != x.device}
    if away:
        raise ValueError(f"{op}: x is on {x.device} but {away} are not; move every operand to one device.")
    if expert_ids is None:
        return
    check_expert_ids(op, expert_ids, num_experts)


def _is_integer(t: Tensor) -> bool:
    return not (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool)


def check_expert_ids(op: str, expert_ids: Tensor, num_experts: int | None) -> None:
    """``expert_ids`` is an integer tensor and (CPU only, see :func:`check_operands`) in ``[-1, E)``."""
    if not _is_integer(expert_ids):
        raise ValueError(f"{op}: expert_ids must be an integer tensor (int64 or int32), got {expert_ids.dtype}.")
    if (num_experts is not None and expert_ids.device.type == "cpu" and expert_ids.numel()
            and not torch.compiler.is_compiling()):
        lo, hi = (int(v) for v in torch.aminmax(expert_ids))  # one pass: this runs per layer per forward
        if lo < -1 or hi >= num_experts:
            raise ValueError(f"{op}: expert_ids holds ids in [{lo}, {hi}], outside [-1, {num_experts}) for "
                             f"num_experts={num_experts} (-1 marks an empty slot). Check the router's "
                             f"expert count against the bank's.")


_CHECKED_LAYOUTS: dict[tuple, bool] = {}


def check_bank_layout(op: str, col_expert: Tensor, num_experts: int, ranks: Sequence[int] | None) -> list[int] | None:
    """Check the rank-major bank layout ``gated_lora`` is given; returns ``ranks`` as ints.

    ``col_expert`` must be an integer ``[R]`` tensor, sorted, in ``[0, E)`` and (when ``ranks`` is
    given) holding ``ranks[e]`` rows of expert ``e``; ``ranks`` must be E ints >= 0 summing to R.
    A wrong layout is otherwise silent: the dense path reads ``col_expert`` and the grouped path
    (taken above :data:`DENSE_MAX_RANK`) reads ``ranks``, so a model would change its output when
    it grows. The values of ``col_expert`` are read on CPU only (a sync on a GPU), once per
    buffer version: the bank's ``col_expert`` is a constant, checked at its first forward."""
    if not _is_integer(col_expert):
        raise ValueError(f"{op}: col_expert must be an integer tensor (int64), got {col_expert.dtype}.")
    R = col_expert.shape[0]
    if ranks is not None:
        ranks = [int(r) for r in ranks]
        if len(ranks) != num_experts or min(ranks, default=0) < 0 or sum(ranks) != R:
            raise ValueError(f"{op}: ranks={ranks} must be num_experts={num_experts} integers >= 0 summing to "
                             f"R={R} (the bank's rows).")
    if col_expert.device.type != "cpu" or not R or torch.compiler.is_compiling():
        return ranks
    # inference tensors keep no version counter: checked every call
    key = None if col_expert.is_inference() else \
        (col_expert.data_ptr(), col_expert._version, R, num_experts, None if ranks is None else tuple(ranks))
    if key in _CHECKED_LAYOUTS:
        return ranks
    sorted_ok = bool((col_expert[1:] >= col_expert[:-1]).all())
    lo, hi = (int(v) for v in torch.aminmax(col_expert))
    if not sorted_ok or lo < 0 or hi >= num_experts:
        raise ValueError(f"{op}: col_expert must be sorted expert ids in [0, {num_experts}) (the bank is rank-major: "
                         f"expert e's rows are contiguous); it holds ids in [{lo}, {hi}]"
                         f"{'' if sorted_ok else ', not sorted'}.")
    counts = torch.bincount(col_expert, minlength=num_experts).tolist() if ranks is not None else None
    if counts != ranks:
        raise ValueError(f"{op}: ranks={ranks} disagree with col_expert, which holds {counts} rows per "
                         f"expert; pass the bank's own ranks.")
    if key is not None:
        if len(_CHECKED_LAYOUTS) >= 4096:
            _CHECKED_LAYOUTS.clear()
        _CHECKED_LAYOUTS[key] = True
    return ranks


def triton_ops():
    """``torch.ops.moelora`` with the Triton custom ops registered (imports triton on first call)."""
    from .triton import library  # noqa: F401  (registers the ops)

    return torch.ops.moelora


def dense_max_rank(impl: str, total_rank: int, num_experts: int | None = None, top_k: int | None = None) -> bool:
    """True when the dense-gated path of ``impl`` should run a bank of ``total_rank`` rows.

    On the torch path a dense bank also runs when ``num_experts <= 2·top_k``: the dense
    formulation then does at most twice the routed FLOPs and no gather or scatter, and it won
    forward+backward there at every measured rank (1.1–2.8× at E = k = 8 and E = 2k = 8, 16;
    T ∈ {256, 2048}, 1 and 2 threads), while the grouped twin won at E = 4k (0.6–0.95×)."""
    if impl == "triton":
        return 1 << (max(total_rank, 16) - 1).bit_length() <= DENSE_MAX_RANK["triton"]
    few_experts = num_experts is not None and top_k is not None and num_experts <= 2 * top_k
    return total_rank <= DENSE_MAX_RANK["torch"] or few_experts


def differentiable_grads(forward, inputs: Sequence[Tensor | None], needs: Sequence[bool],
                         grad_y: Tensor) -> list[Tensor | None]:
    """Input gradients of ``forward(*inputs)`` for ``grad_y``, as a graph that can itself be
    differentiated: the backward of every op when autograd records it (``create_graph=True``,
    e.g. a gradient penalty). The fast backwards read the saved ``h``, which has no history back
    to x and A, so they would silently drop second-order terms; this path re-runs the torch twin's
    forward on the saved inputs instead (one extra forward, only when asked for)."""
    with torch.enable_grad():
        y = forward(*inputs)
        wanted = [t for t, n in zip(inputs, needs) if n]
        got = iter(torch.autograd.grad(y, wanted, grad_y, create_graph=True, allow_unused=True))
    return [next(got) if n else None for n in needs]


def _gated_forward(x, A, Bt, weights, expert_ids, col_expert, col_scale, num_experts, impl):
    """``(y [T, d_out], h [T, R])`` of the dense-gated op on ``impl`` (no autograd)."""
    if impl == "triton":
        ops = triton_ops()
        h = ops.shrink(x, A)                           # [T, R] fp32
        return ops.gate_expand(h, Bt, expert_ids, weights, col_expert, col_scale, x.dtype), h
    gate = reference.column_gate(expert_ids, weights, col_expert, col_scale, num_experts, A.dtype)
    return reference.gated_lora_forward(x, A, Bt, gate)


def gate_dtype(A: Tensor) -> torch.dtype:
    """Dtype of the routing weights and expert scales handed to the kernels: at least fp32. A bf16
    alpha/r is off by up to 0.4 % (8/3 → 2.671875), a bias on every expert output; the gate is
    formed in this dtype and rounded once, per element, to the bank's dtype."""
    return torch.promote_types(A.dtype, torch.float32)


class _GatedLoRAFn(torch.autograd.Function):
    """Dense-gated MoE-LoRA; gradients for x, A, Bt and the gate weights."""

    @staticmethod
    def forward(ctx, x, A, Bt, weights, expert_ids, col_expert, col_scale, num_experts, impl):
        y, h = _gated_forward(x, A, Bt, weights, expert_ids, col_expert, col_scale, num_experts, impl)
        ctx.save_for_backward(x, A, Bt, h, weights, expert_ids, col_expert, col_scale)
        ctx.num_experts, ctx.impl = num_experts, impl
        return y

    @staticmethod
    @without_autocast
    def backward(ctx, grad_y):
        x, A, Bt, h, weights, expert_ids, col_expert, col_scale = ctx.saved_tensors
        need_x, need_A, need_Bt, need_w = ctx.needs_input_grad[:4]
        grad_y = grad_y.to(A.dtype)
        if torch.is_grad_enabled():
            def twin(x, A, Bt, w):
                gate = reference.column_gate(expert_ids, w, col_expert, col_scale, ctx.num_experts, A.dtype)
                return reference.gated_lora_forward(x, A, Bt, gate)[0]

            return (*differentiable_grads(twin, (x, A, Bt, weights), ctx.needs_input_grad[:4], grad_y),
                    None, None, None, None, None)
        if ctx.impl == "triton":
            ops = triton_ops()
            gx = gA = gB = gw = None
            if need_x or need_A or need_w:
                du = ops.shrink(grad_y, Bt)            # [T, R] fp32, ungated
                if need_w:
                    gw = ops.gate_grad(du, h, expert_ids, col_expert, col_scale)
                if need_x:
                    gx = ops.gate_expand(du, A, expert_ids, weights, col_expert, col_scale, x.dtype)
                if need_A:
                    gA = ops.xty(du, x, expert_ids, weights, col_expert, col_scale, A.dtype)
            if need_Bt:
                gB = ops.xty(h, grad_y, expert_ids, weights, col_expert, col_scale, Bt.dtype)
        else:
            # The gate is rebuilt (T·k scatter) instead of saved: it is as large as h.
            gate = reference.column_gate(expert_ids, weights, col_expert, col_scale, ctx.num_experts, A.dtype)
            gx, gA, gB, gw = reference.gated_lora_backward(
                grad_y, x, A, Bt, h, gate, expert_ids, col_expert, col_scale, ctx.num_experts,
                need_x=need_x, need_A=need_A, need_Bt=need_Bt, need_w=need_w)
        if gw is not None:
            gw = gw.to(weights.dtype)
        return gx, gA, gB, gw, None, None, None, None, None


def gated_lora(x: Tensor, A: Tensor, Bt: Tensor, expert_ids: Tensor, weights: Tensor,
               col_expert: Tensor, col_scale: Tensor, *, num_experts: int,
               backend: str = "auto", ranks: Sequence[int] | None = None, check_layout: bool = True) -> Tensor:
    """Mixture of LoRA experts with explicit token routing (dense-gated formulation).

    Args:
        x: ``[T, d_in]`` expert input, in the adapter dtype (fp32, bf16 or fp16).
        A: ``[R, d_in]`` stacked down projections, ``R = Σ_e r_e`` (rank 0 experts own no rows).
        Bt: ``[R, d_out]`` stacked up projections (``lora_B`` transposed).
        expert_ids: ``[T, k]`` int64, chosen expert per slot, ``-1`` = empty slot.
        weights: ``[T, k]`` float gate weights (any float dtype; cast to the adapter dtype).
        col_expert: ``[R]`` int64 owning expert of each rank row (sorted: the bank is rank-major).
        col_scale: ``[R]`` float output scale of each rank row's expert (alpha / r).
        num_experts: E.
        backend: ``"auto" | "torch" | "triton"``.
        ranks: optional host copy of ``r_e`` per expert. Only read when ``R`` exceeds
            :data:`DENSE_MAX_RANK` and the grouped path takes over; without it the ranks are
            read back from ``col_expert`` (one device sync).
        check_layout: check the bank layout and operand devices (:func:`check_bank_layout`);
            ``False`` is for callers whose bank is an :class:`~moelora.experts.ExpertBank` (valid
            by construction, on one device), where the check's ~4 µs per call shows at decode
            size. Dtypes and expert ids are checked either way.

    Returns:
        ``[T, d_out]`` in the adapter dtype: ``Σ_j w[t,j] · scale_e · B_e A_e x_t``.
        Gradients flow to x, A, Bt and weights (not to the scales). Deterministic.
    """
    if x.dim() != 2 or A.dim() != 2 or Bt.dim() != 2:
        raise ValueError(f"gated_lora expects 2-D x, A, Bt; got {tuple(x.shape)}, {tuple(A.shape)}, {tuple(Bt.shape)}")
    if A.shape[0] != Bt.shape[0] or A.shape[1] != x.shape[1]:
        raise ValueError(f"gated_lora shape mismatch: x {tuple(x.shape)}, A {tuple(A.shape)}, Bt {tuple(Bt.shape)}")
    if expert_ids.dim() != 2 or expert_ids.shape != weights.shape or expert_ids.shape[0] != x.shape[0]:
        raise ValueError(f"gated_lora routing shape mismatch: x {tuple(x.shape)}, expert_ids "
                         f"{tuple(expert_ids.shape)}, weights {tuple(weights.shape)}")
    if col_expert.shape != (A.shape[0],) or col_scale.shape != (A.shape[0],):
        raise ValueError(f"gated_lora: col_expert {tuple(col_expert.shape)} and col_scale "
                         f"{tuple(col_scale.shape)} must both be [R] with R = {A.shape[0]}")
    if check_layout:
        check_operands("gated_lora", x, A, Bt, expert_ids, num_experts, weights=weights, col_expert=col_expert,
                       col_scale=col_scale)
        ranks = check_bank_layout("gated_lora", col_expert, num_experts, ranks)
    else:
        check_operands("gated_lora", x, A, Bt, expert_ids, num_experts)
    impl = resolve_backend(backend, x.device, x.dtype)
    if not dense_max_rank(impl, A.shape[0], num_experts, expert_ids.shape[1]):
        from .grouped import grouped_lora  # which checks the operands itself

        if ranks is None:
            ranks = torch.bincount(col_expert, minlength=num_experts).tolist()
        offsets = [0]
        for r in ranks:
            offsets.append(offsets[-1] + int(r))
        first = device_constant([min(o, A.shape[0] - 1) for o in offsets[:-1]], col_scale.device)
        return grouped_lora(x, A, Bt, expert_ids, weights, ranks, col_scale[first], backend=impl)
    precise = gate_dtype(A)
    args = (x, A, Bt, weights.to(precise), expert_ids, col_expert, col_scale.to(precise), num_experts, impl)
    with autocast_off(x.device.type):
        if not (torch.is_grad_enabled() and any(t.requires_grad for t in args[:4])):
            # Inference: the same math without an autograd node (Function.apply costs ~20 µs per
            # call on CPU, a sizeable share of a decode step's per-layer time).
            return _gated_forward(*args)[0]
        return _GatedLoRAFn.apply(*args)
