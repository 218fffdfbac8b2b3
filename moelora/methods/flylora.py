"""FlyLoRA: implicit rank-wise mixture of experts with a frozen sparse random projection
(NeurIPS 2025, arXiv 2510.08396; semantics: design §3.6, research/methods.md §3).

    cfg = moelora.FlyLoRAConfig(target_modules=["q_proj", "v_proj"], rank=32, top_k=8, alpha=64)
    model = moelora.inject(hf_model, cfg)        # A frozen + shared by every task with this seed
    ...train...; moelora.save_adapter(model, "task_a/")
    moelora.merge_flylora(["task_a/", "task_b/"], out_dir="merged/")

Per wrapped linear ``W0 [d_out, d_in]``: ``A [r, d_in]`` frozen sparse random (a buffer, saved
with the adapter), ``B`` zero-init and trainable (the bank's ``Bt [r, d_out]``), ``E = r``
rank-1 experts, no router parameters::

    h = A · dropout(x)                                          [T, r]
    y = W0 x + (α/r) · B (h ⊙ topk_mask(score(h + d), k))         [T, d_out]

The official repository has two implementations that disagree (research/methods.md §3, kernels.md
§5). Where they differ, moelora follows the PEFT code that produced the paper's numbers unless
noted, and makes the choice a field:

    what                paper text / flylora.py   PEFT layer.py           moelora (field: default)
    top-k score         |h + d|                   h + d (signed)          score: "signed"
    gradient into x     yes                       no (A x under no_grad)  grad_x: False
    non-zeros per row   int(n · ρ), ρ = k/r       n // (r // k)           density: None = k/r, int(n · ρ)
    bias rate u         1e-3                      0.01 (MMLU run: 1e-3)   bias_update_rate: 1e-3
    bias updated        training forwards         every forward, also     training forwards only, never
                                                  eval and recomputes     in checkpoint recomputes
    padding in counts   (no mask)                 counted                 count_padding: False
    DDP                 (single process)          fails                   counts all-reduced: equal biases
    task merge          -                         mean of every lora_*    mean of B (and d); A must be
                                                  tensor (A included)     identical, else an error

Both draw the non-zeros of ``A`` from ``N(0, 1/r²)``. ``n // (r // k)`` and ``int(n · k/r)``
agree whenever k divides r (every published setting).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from moelora.config import MoELoRAConfig, _fail, _is_number, register_config
from moelora.experts import ExpertBank
from moelora.kernels import rankwise_lora
from moelora.layer import MoELoRALinear
from moelora.routers.flylora import SCORES, FlyLoRARouter
from moelora.state import AdapterState


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@register_config
@dataclass
class FlyLoRAConfig(MoELoRAConfig):
    """FlyLoRA: ``r`` rank-1 experts per wrapped linear, routed by a frozen sparse random ``A``.

    Inherited fields that FlyLoRA does not use: ``renormalize``, ``router_init_std`` and
    ``init_lora_weights`` (there is no router network, and ``A`` is always the sparse random
    projection). ``aux_loss_coef``, ``z_loss_coef`` and ``router_noise_std`` must stay 0:
    balancing is the bias rule, not a loss.
    """

    method: ClassVar[str] = "flylora"
    #: Never folded into the base weights or exported as a static PEFT LoRA (moelora.merge.refuse_static).
    static_refusal: ClassVar[str | None] = (
        "Each token uses only its top-k ranks, chosen from A·x, so folding B·A (or exporting it as a plain "
        "LoRA) would apply all ranks to every token and change the model's outputs. Keep it as an adapter "
        "(moelora.save_adapter / moelora.load_adapter); to combine FlyLoRA task adapters, average them with "
        "moelora.merge_flylora([dirs], out_dir=...).")

    rank: int = 32
    """r: rank-1 experts per wrapped linear (the official MMLU run: 32)."""
    top_k: int = 8
    """k: ranks used per token, ``1 <= k <= rank`` (official: 8)."""
    alpha: float = 64.0
    """Output scale α/r (α/√r with ``use_rslora``); official: α = 64 at r = 32, i.e. 2."""
    num_experts: int | None = None
    """Derived: always ``rank`` (E = r rank-1 experts). Leave unset; any other value is an error."""
    score: str = "signed"
    """Top-k score: ``"signed"`` = ``h + d`` (the official PEFT layer, which produced the paper's
    numbers; large negative activations are never chosen) or ``"abs"`` = ``|h + d|`` (the paper
    text and the minimal ``flylora.py``)."""
    grad_x: bool = False
    """Let the gradient flow from the adapter back into x. False = the PEFT code (``A x`` under
    ``no_grad``: upstream layers see the base path's gradient only); True = the minimal file."""
    bias_update_rate: float = 1e-3
    """u in ``d ← d + u · sign(mean(c) − c)``, applied after every training forward (0 = off).
    1e-3 as in the official MMLU script and ``flylora.py`` (the PEFT config default is 0.01)."""
    density: float | None = None
    """Fraction of non-zeros per row of A: each row has ``max(1, int(density · d_in))`` non-zeros
    at uniformly random columns. ``None`` = ``top_k / rank`` (the paper's ρ = k/r)."""
    count_padding: bool = False
    """Count padding tokens (``attention_mask == 0``) in the balancing counts c, as the official
    code does (it has no mask). Default False: padding does not steer the bias."""
    seed: int = 0
    """Seeds A per wrapped module from ``(seed, module name)``, so every task's adapter on the same
    base model shares A (which merging needs). Must be an integer."""
    aux_loss_coef: float = 0.0
    """Must be 0: FlyLoRA balances with the bias rule, not a loss."""

    def __post_init__(self) -> None:
        if _is_int(self.rank) and self.rank >= 1:
            if self.num_experts is None:
                self.num_experts = self.rank
            elif self.num_experts != self.rank:
                _fail("num_experts", self.num_experts,
                      f"null or equal to rank={self.rank} (FlyLoRA has E = r rank-1 experts; set rank instead)")
            if not _is_int(self.top_k) or not 1 <= self.top_k <= self.rank:
                _fail("top_k", self.top_k, f"an integer in [1, rank={self.rank}]")
        super().__post_init__()
        if self.score not in SCORES:
            _fail("score", self.score, f"one of {SCORES}")
        if not isinstance(self.grad_x, bool):
            _fail("grad_x", self.grad_x, "true or false")
        if not isinstance(self.count_padding, bool):
            _fail("count_padding", self.count_padding, "true or false")
        if not _is_number(self.bias_update_rate) or not math.isfinite(self.bias_update_rate) \
                or self.bias_update_rate < 0:
            _fail("bias_update_rate", self.bias_update_rate, "a finite number >= 0 (0 turns balancing off)")
        if self.density is not None and (not _is_number(self.density) or not 0 < self.density <= 1):
            _fail("density", self.density, "a number in (0, 1], or null for top_k / rank")
        if not _is_int(self.seed):
            _fail("seed", self.seed, "an integer (FlyLoRA's A must be reproducible so task adapters share it)")
        for name in ("aux_loss_coef", "z_loss_coef", "router_noise_std"):
            if getattr(self, name) != 0:
                _fail(name, getattr(self, name), "0: FlyLoRA has no router network and no aux loss "
                      "(balancing is the bias rule; tune bias_update_rate)")

    @property
    def row_density(self) -> float:
        """The density actually used: ``density`` or ``top_k / rank``."""
        return self.density if self.density is not None else self.top_k / self.rank

    def nonzeros_per_row(self, in_features: int) -> int:
        """p = ``max(1, floor(density · d_in))`` non-zeros in every row of A (``(k · d_in) // r``,
        in exact integers, when ``density`` is None; a given density is snapped by 1e-9 first, so
        ``0.29 · 100`` gives 29 although it is 28.999… in binary)."""
        if self.density is None:
            return max(1, self.top_k * in_features // self.rank)
        return max(1, math.floor(self.density * in_features + 1e-9))

    def make_router(self, *, in_features: int, generator=None) -> FlyLoRARouter:
        """The bias holder of one layer (FlyLoRA has no router parameters; ``A`` routes)."""
        return FlyLoRARouter(num_ranks=self.rank, top_k=self.top_k, score=self.score,
                             bias_update_rate=self.bias_update_rate, count_padding=self.count_padding)

    def make_layer(self, *, base_layer: nn.Module, name: str, state: AdapterState, in_features: int,
                   out_features: int, ranks: list[int] | None, scales: list[float] | None, dtype: torch.dtype,
                   device: torch.device, generator: torch.Generator | None) -> "FlyLoRALinear":
        """``moelora.inject`` hook: the FlyLoRA layer for module ``name`` (A drawn from ``generator``,
        which ``inject`` seeds from ``(seed, name)``). ``ranks`` / ``scales``: explicit per-expert
        values (a saved adapter's ranks on load), or None for the config's."""
        if ranks is not None and list(ranks) != [1] * self.rank:
            raise ValueError(f"{name}: FlyLoRA needs {self.rank} rank-1 experts, got expert ranks {list(ranks)}; "
                             "do not pass expert_ranks for FlyLoRA (or the saved adapter's config is damaged).")
        if scales is not None and set(scales) != {self.lora_scale}:
            raise ValueError(f"{name}: FlyLoRA uses one output scale alpha/r = {self.lora_scale} for every rank, "
                             f"got {sorted(set(scales))}; set alpha instead of expert_scales.")
        scale = self.lora_scale
        bank = FlyLoRABank(in_features=in_features, out_features=out_features, rank=self.rank, scale=scale,
                           nonzeros=self.nonzeros_per_row(in_features), dtype=dtype, generator=generator)
        router = self.make_router(in_features=in_features)
        return FlyLoRALinear(base_layer=base_layer, bank=bank.to(device), router=router.to(device), name=name,
                             state=state, dropout=self.dropout, backend=self.backend, grad_x=self.grad_x)


def sparse_projection(rank: int, in_features: int, nonzeros: int,
                      generator: torch.Generator | None = None) -> Tensor:
    """FlyLoRA's A: ``[rank, in_features]`` float32 on CPU; every row has exactly ``nonzeros``
    entries at distinct uniformly random columns, drawn from ``N(0, 1/rank²)``; the rest are 0.

    Drawn on CPU in float32 from ``generator`` so the same seed gives the same A on any device
    and in any adapter dtype.
    """
    if not 1 <= nonzeros <= in_features:
        raise ValueError(f"nonzeros={nonzeros} must be in [1, in_features={in_features}]")
    A = torch.zeros(rank, in_features)
    for i in range(rank):
        cols = torch.randperm(in_features, generator=generator)[:nonzeros]
        A[i, cols] = torch.randn(nonzeros, generator=generator) / rank
    return A


class FlyLoRABank(ExpertBank):
    """An :class:`ExpertBank` of ``r`` rank-1 experts whose ``A [r, d_in]`` is a frozen buffer.

    ``A`` keeps the bank's state-dict key (``bank.A``), so saving, loading and checkpoints treat
    it like any bank; as a buffer it never reaches an optimizer, whatever ``requires_grad_`` is
    called on the model. ``Bt [r, d_out]`` starts at zero (the model starts equal to the base).
    """

    def __init__(self, *, in_features: int, out_features: int, rank: int, scale: float, nonzeros: int,
                 dtype: torch.dtype = torch.float32, generator: torch.Generator | None = None) -> None:
        super().__init__(in_features=in_features, out_features=out_features, ranks=[1] * rank,
                         scales=[scale] * rank, dtype=dtype)
        A = sparse_projection(rank, in_features, nonzeros, generator).to(dtype)
        del self.A  # the parameter ExpertBank made; A is fixed, so it becomes a buffer
        self.register_buffer("A", A)

    @torch.no_grad()
    def reset_parameters(self, *, init: str = "sparse", generator: torch.Generator | None = None) -> None:
        """Zero B only: A is fixed by (seed, module name) and never re-drawn."""
        self.Bt.zero_()


class FlyLoRALinear(MoELoRALinear):
    """A frozen base linear plus FlyLoRA's rank-wise experts (see the module docstring).

    The balancing bias (``router.bias``) is updated after each forward in training mode, outside
    autograd, all-reduced under ``torch.distributed``; never in eval, never during an activation-
    checkpoint recompute (which instead routes with the bias its own forward used, so the
    recomputed top-k matches). That bias snapshot is per layer: it assumes each training forward's
    backward runs before the layer's next training forward (true for ordinary training loops and
    gradient accumulation).

    Args:
        grad_x: let the gradient flow from the adapter into x.
        (others as :class:`~moelora.layer.MoELoRALinear`; ``router`` is a
        :class:`~moelora.routers.flylora.FlyLoRARouter`, ``bank`` a :class:`FlyLoRABank`.)
    """

    def __init__(self, *, base_layer: nn.Module, bank: FlyLoRABank, router: FlyLoRARouter, name: str,
                 state: AdapterState, dropout: float = 0.0, backend: str = "auto", grad_x: bool = False) -> None:
        super().__init__(base_layer=base_layer, bank=bank, router=router, name=name, state=state,
                         dropout=dropout, backend=backend)
        self.grad_x = grad_x
        # A host copy of the scale: reading the bank's buffer every forward would sync the GPU.
        self.scale_value = float(bank.scale[0])

    def _expert_delta(self, flat: Tensor, mask: Tensor | None, recompute: bool) -> Tensor:
        """``(α/r) · B (h ⊙ mask)`` with ``h = A x`` for ``flat [T, d_in]``; the chosen ranks are
        recorded and the balancing bias updated after training forwards, never in recompute."""
        router, replay = self.router, self._state.replay
        bias = router.routing_bias(recompute)
        if recompute and replay is not None:
            # Under moelora.checkpoint each recomputation has its own forward's bias: two forwards
            # sharing one backward route with different ones (the first one's update in between).
            bias = replay.saved.get(self.name, bias)
        delta, idx = rankwise_lora(self._expert_input(flat), self.bank.A, self.bank.Bt,
                                   router.top_k, bias=bias, score=router.score,
                                   scale=self.scale_value, grad_x=self.grad_x, backend=self.backend)
        if not recompute:
            self._remember(router.routing(idx), mask)
            if self.training and router.bias_update_rate:
                router.update(idx, mask)
                if replay is not None:
                    replay.saved[self.name] = router.routing_bias(True)  # the bias before this update
        return delta

    def extra_repr(self) -> str:
        return f"name={self.name!r}, backend={self.backend!r}, grad_x={self.grad_x}"
