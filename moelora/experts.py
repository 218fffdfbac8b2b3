"""ExpertBank: every LoRA expert of one wrapped linear in two rank-major tensors (design §3.2).

    A  [R, d_in]    expert e owns rows rank_offsets[e] : rank_offsets[e+1]
    Bt [R, d_out]   (PEFT's lora_B [d_out, r] transposed)
    R = Σ_e r_e     heterogeneous ranks, rank 0 allowed (the expert owns no rows here)

With homogeneous ranks ``A.view(E, r, d_in)`` is the per-expert stack.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn


class FullPrecisionBuffers:
    """``nn.Module`` mixin: the buffers named in ``full_precision_buffers`` survive a half-precision
    cast of the model (``model.bfloat16()``, ``model.half()``, Lightning's ``"bf16-true"``) as their
    pre-cast float32 values; device moves and float64 still apply. For buffers whose low bits
    matter: expert scales, the FlyLoRA balancing bias."""

    full_precision_buffers: tuple[str, ...] = ()

    def _apply(self, fn, recurse=True):
        before = {name: getattr(self, name) for name in self.full_precision_buffers}
        super()._apply(fn, recurse)
        for name, old in before.items():
            now = getattr(self, name)
            if now.dtype in (torch.bfloat16, torch.float16):
                setattr(self, name, old.to(device=now.device, dtype=torch.float32))
        return self


class ExpertBank(FullPrecisionBuffers, nn.Module):
    """Stacked LoRA experts with per-expert ranks and output scales.

    Args:
        in_features: d_in.
        out_features: d_out.
        ranks: ``r_e`` per expert (>= 0).
        scales: output scale per expert (alpha / r_e, alpha / sqrt(r_e), or an imported value).
        init: ``"kaiming"`` (A ~ U(±1/sqrt(d_in)), PEFT's default) or ``"gaussian"`` (A ~ N(0, 1/r_e²)
            as PEFT's ``init_lora_weights="gaussian"``); B is always zero.
        dtype: parameter dtype.
        generator: optional RNG for reproducible init.
    """

    full_precision_buffers = ("scale",)  # a bf16 alpha/r would bias every expert output (8/3 → 2.671875)

    def __init__(self, *, in_features: int, out_features: int, ranks: Sequence[int],
                 scales: Sequence[float], init: str = "kaiming", dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, generator: torch.Generator | None = None) -> None:
        super().__init__()
        ranks = tuple(int(r) for r in ranks)
        if not ranks or any(r < 0 for r in ranks):
            raise ValueError(f"ranks must be a non-empty list of integers >= 0, got {list(ranks)}")
        if len(scales) != len(ranks):
            raise ValueError(f"got {len(scales)} scales for {len(ranks)} experts")
        self.in_features, self.out_features, self.ranks = in_features, out_features, ranks
        total = sum(ranks)
        self.A = nn.Parameter(torch.empty(total, in_features, dtype=dtype, device=device))
        self.Bt = nn.Parameter(torch.zeros(total, out_features, dtype=dtype, device=device))
        # At least fp32 (a bf16 alpha/r would be off by up to 0.4%); float64 banks keep float64.
        scale_dtype = torch.promote_types(dtype, torch.float32)
        self.register_buffer("scale", torch.tensor([float(s) for s in scales], dtype=scale_dtype, device=device))
        offsets = [0]
        for r in ranks:
            offsets.append(offsets[-1] + r)
        self.rank_offsets = tuple(offsets)
        col_expert = torch.repeat_interleave(torch.arange(len(ranks)), torch.tensor(ranks, dtype=torch.long))
        self.register_buffer("col_expert", col_expert.to(device), persistent=False)
        self.reset_parameters(init=init, generator=generator)

    @property
    def num_experts(self) -> int:
        return len(self.ranks)

    @property
    def total_rank(self) -> int:
        """R = Σ_e r_e."""
        return self.rank_offsets[-1]

    @torch.no_grad()
    def reset_parameters(self, *, init: str = "kaiming", generator: torch.Generator | None = None) -> None:
        """Re-draw A per expert and zero B (so the adapter starts as the identity on the base)."""
        self.Bt.zero_()
        for e, r in enumerate(self.ranks):
            if r == 0:
                continue
            rows = self.A[self.rank_offsets[e]:self.rank_offsets[e + 1]]
            # Draw in float32 on CPU so the init is identical across devices and dtypes.
            if init == "kaiming":
                bound = 1.0 / math.sqrt(self.in_features)
                values = torch.rand(rows.shape, generator=generator) * (2 * bound) - bound
            elif init == "gaussian":
                values = torch.randn(rows.shape, generator=generator) / r
            else:
                raise ValueError(f"init={init!r} is invalid: expected 'kaiming' or 'gaussian'")
            rows.copy_(values)

    def col_scale(self) -> Tensor:
        """``[R]`` the owning expert's scale for every rank row."""
        return self.scale[self.col_expert]

    def expert_rows(self, expert: int) -> slice:
        """Rows of A / Bt owned by ``expert``."""
        return slice(self.rank_offsets[expert], self.rank_offsets[expert + 1])

    def lora_pair(self, expert: int) -> tuple[Tensor, Tensor]:
        """PEFT layout of one expert: ``(lora_A [r_e, d_in], lora_B [d_out, r_e])`` (views / transposes)."""
        rows = self.expert_rows(expert)
        return self.A[rows], self.Bt[rows].t()

    @torch.no_grad()
    def set_lora_pair(self, expert: int, lora_A: Tensor, lora_B: Tensor) -> None:
        """Copy a PEFT-layout pair (``lora_A [r_e, d_in]``, ``lora_B [d_out, r_e]``) into ``expert``."""
        rows = self.expert_rows(expert)
        want_a, want_b = tuple(self.A[rows].shape), (self.out_features, self.ranks[expert])
        if tuple(lora_A.shape) != want_a or tuple(lora_B.shape) != want_b:
            raise ValueError(f"expert {expert}: expected lora_A {want_a} and lora_B {want_b}, "
                             f"got {tuple(lora_A.shape)} and {tuple(lora_B.shape)}")
        self.A[rows] = lora_A.to(self.A.dtype)
        self.Bt[rows] = lora_B.t().to(self.Bt.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, ranks={list(self.ranks)}"
