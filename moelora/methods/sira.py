"""SiRA: sparse mixture of LoRA experts with expert capacity and expert dropout (arXiv 2311.09179).

SiRA has no official code and only its abstract could be checked (research/methods.md §2): it
fixes "top-k routing with a capacity limit" and "expert dropout on top of the gating network".
Every other choice is a field here with a documented default, taken from GShard / DeepSpeed /
Switch conventions where the paper is silent. The router is :class:`moelora.routers.SiRARouter`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from moelora.config import MoELoRAConfig, _fail, _is_number, register_config

DROP_POLICIES = ("position", "probability")
FILL_ORDERS = ("slot_major", "token_major")
DROPOUT_PLACEMENTS = ("probs", "logits", "inverted")


def _check_factor(name: str, value: Any) -> None:
    if value is not None and (not _is_number(value) or not math.isfinite(value) or value <= 0):
        _fail(name, value, "a finite number > 0, or null for no capacity limit")


@register_config
@dataclass
class SiRAConfig(MoELoRAConfig):
    """SiRA: top-k MoE-LoRA with expert capacity, token dropping and expert dropout.

    Per wrapped linear: ``p = softmax(W_g x)`` (fp32) → expert dropout (training only) → top-k
    → capacity ``C = max(min_capacity, ceil(k · capacity_factor · S / E))`` per routing group of
    ``S`` real tokens → slots past capacity are dropped (that expert's delta only; the base output
    and the token's other experts still apply) → renormalise over the kept slots.

    Defaults that differ from :class:`MoELoRAConfig`: ``aux_loss_coef = 0`` (SiRA's use of a
    balancing loss is unverified, so it is off unless asked for).
    """

    method: ClassVar[str] = "sira"

    capacity_factor: float | None = 1.25
    """Training capacity factor (Switch Transformer / OpenMoE default 1.25). ``None`` = no limit:
    no token is ever dropped."""
    eval_capacity_factor: float | None = 2.0
    """Capacity factor in eval mode (Switch / OpenMoE default 2.0). ``None`` = no limit. With a
    limit a token's output depends on the other tokens of its forward, so ``generate`` with the
    KV cache differs from an uncached forward (a decode step routes one token per sequence: a
    single sequence is never dropped, a batch of them can be); ``None`` makes inference
    token-independent."""
    min_capacity: int = 4
    """Lower bound on every expert's capacity per group (DeepSpeed ``MoE(min_capacity=4)``), so
    tiny batches are not starved. ``0`` disables the floor."""
    group_size: int | None = None
    """Tokens per routing group: capacity is computed and enforced per group of this many
    consecutive flattened tokens (batch-major, so a group can span sequences; the last group may
    be shorter). ``None`` = all tokens of one forward form a single group (the batch)."""
    drop_policy: str = "position"
    """Which slots an over-full expert keeps: ``"position"`` (earlier tokens first, GShard) or
    ``"probability"`` (highest gate value first, DeepSpeed ``drop_policy="probs"``)."""
    fill_order: str = "slot_major"
    """Order of slots under ``drop_policy="position"`` (and the tie-break under
    ``"probability"``): ``"slot_major"`` = every token's first choice in token order, then every
    second choice, ... (GShard top-2: a first choice never loses its place to another token's
    second choice); ``"token_major"`` = pure token order, a token's k slots together (DeepSpeed
    ``topkgating``)."""
    expert_dropout: float = 0.1
    """SiRA's expert dropout on the gate, training only: each (token, expert) pair is dropped with
    this probability. The value is unverified (0.1 as in design §3.1); ``0`` = off."""
    expert_dropout_placement: str = "probs"
    """Where expert dropout acts: ``"probs"`` = Bernoulli mask on the softmax probabilities (a
    dropped expert cannot be chosen); ``"logits"`` = −inf on the dropped experts' logits before
    the softmax (the survivors' probabilities re-normalise); ``"inverted"`` = standard inverted
    dropout on the probabilities (mask, rescale by 1/(1−p)). With ``renormalize=True`` the
    ``"inverted"`` rescale cancels, so it differs from ``"probs"`` only when ``renormalize=False``.
    In every placement a dropped expert is never selected; a token whose experts all drop gets
    the base output."""
    renormalize_after_drop: bool = True
    """With ``renormalize``: divide by the sum over the slots kept after capacity dropping (True,
    DeepSpeed; kept weights sum to 1) or over the top-k before dropping (False; a dropped slot's
    share is simply lost). Ignored when ``renormalize`` is False."""
    aux_loss_coef: float = 0.0
    """Weight of the Switch load-balancing loss, top-k form ``E · Σ_e f_e · P_e`` on the
    pre-capacity assignment with padding excluded. 0 (off) by default: unverified for SiRA."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_factor("capacity_factor", self.capacity_factor)
        _check_factor("eval_capacity_factor", self.eval_capacity_factor)
        if not isinstance(self.min_capacity, int) or isinstance(self.min_capacity, bool) or self.min_capacity < 0:
            _fail("min_capacity", self.min_capacity, "an integer >= 0")
        if self.group_size is not None and (not isinstance(self.group_size, int) or isinstance(self.group_size, bool)
                                            or self.group_size < 1):
            _fail("group_size", self.group_size, "an integer >= 1, or null for one group per batch")
        if self.drop_policy not in DROP_POLICIES:
            _fail("drop_policy", self.drop_policy, f"one of {DROP_POLICIES}")
        if self.fill_order not in FILL_ORDERS:
            _fail("fill_order", self.fill_order, f"one of {FILL_ORDERS}")
        if not _is_number(self.expert_dropout) or not 0.0 <= self.expert_dropout < 1.0:
            _fail("expert_dropout", self.expert_dropout, "a probability in [0, 1)")
        if self.expert_dropout_placement not in DROPOUT_PLACEMENTS:
            _fail("expert_dropout_placement", self.expert_dropout_placement, f"one of {DROPOUT_PLACEMENTS}")
        for name in ("renormalize", "renormalize_after_drop"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "true or false")

    def make_router(self, *, in_features: int, generator=None):
        """A :class:`~moelora.routers.SiRARouter` for one wrapped linear with ``in_features`` inputs."""
        from moelora.routers.sira import SiRARouter

        return SiRARouter(in_features=in_features, num_experts=self.num_experts, top_k=self.top_k,
                          capacity_factor=self.capacity_factor, eval_capacity_factor=self.eval_capacity_factor,
                          min_capacity=self.min_capacity, group_size=self.group_size,
                          drop_policy=self.drop_policy, fill_order=self.fill_order,
                          expert_dropout=self.expert_dropout,
                          expert_dropout_placement=self.expert_dropout_placement,
                          renormalize=self.renormalize, renormalize_after_drop=self.renormalize_after_drop,
                          noise_std=self.router_noise_std, aux_loss_coef=self.aux_loss_coef,
                          z_loss_coef=self.z_loss_coef, init_std=self.router_init_std, generator=generator)
