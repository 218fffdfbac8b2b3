"""WeightLoRA gates (arXiv 2506.02724): a trainable weight ω on every head or expert of a layer.

:class:`OmegaRouter` replaces a wrapped layer's router and multiplies the gate weights it applies:

    plain LoRA head (no inner router):  ids = 0,  w = ω[0]                      (h = W x + ω · s B A x)
    over="heads"  (ω: [1]):             ids, w = inner(x);  w ← w · ω[0]       (the whole layer)
    over="experts" (ω: [E]):            ids, w = inner(x restricted to active experts);  w ← w · ω[ids]

With ``over="experts"`` an expert whose ``active`` flag is off (set by hard thresholding when its
ω is zeroed) is out of the routing: the inner router runs on the rows of the active experts only
(softmax and top-k over them), so it is exactly the router the layer has once those experts are
removed. Removing them (:func:`moelora.weightlora.disconnect`) therefore leaves the outputs
unchanged. Expert ids in the returned routing are always indices of the layer's bank.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from moelora.kernels.ops import device_constant

from .base import Routing

OVER = ("heads", "experts")


def expert_rows(router: nn.Module, num_experts: int) -> dict[str, Tensor]:
    """Parameters and buffers of ``router`` with one row per expert (leading dim ``num_experts``):
    the gate rows that go with the experts when experts are removed. ``{name: tensor}``."""
    out = {}
    for name, t in list(router.named_parameters()) + list(router.named_buffers()):
        if t.dim() >= 1 and t.shape[0] == num_experts:
            out[name] = t
    return out


class OmegaRouter(nn.Module):
    """The WeightLoRA gate of one wrapped layer, wrapping that layer's own router (if any).

    Args:
        inner: the layer's router (``None`` for a plain LoRA head: one expert, every token).
        over: ``"heads"`` (one ω for the layer) or ``"experts"`` (one ω per expert of the bank).
        num_experts: experts in the layer's bank (E); ω has ``E`` entries with ``over="experts"``.
        omega_init: initial value of every ω.

    Attributes:
        omega: ``[1]`` or ``[E]`` float32 parameter, the WeightLoRA weights.
        active: ``[E]`` bool buffer (``over="experts"``): experts still in the routing.
    """

    def __init__(self, *, inner: nn.Module | None, over: str, num_experts: int, omega_init: float = 1.0) -> None:
        super().__init__()
        if over not in OVER:
            raise ValueError(f"over={over!r} is invalid: expected one of {OVER}")
        if over == "experts" and inner is None:
            raise ValueError("over='experts' needs the layer's router (inner) to route between experts")
        self.inner, self.over = inner, over
        size = num_experts if over == "experts" else 1
        self.omega = nn.Parameter(torch.full((size,), float(omega_init), dtype=torch.float32))
        self.register_buffer("active", torch.ones(num_experts if over == "experts" else 1, dtype=torch.bool))
        self._active_cache: tuple[tuple[int, int], list[int] | None] | None = None
        #: Names of the bank's experts (dashboard); set by whoever knows them (MeteoRA adapter names).
        self.expert_names: list[str] | None = None

    # ------------------------------------------------------------------ what a layer reads
    @property
    def num_experts(self) -> int:
        return 1 if self.inner is None else int(self.inner.num_experts)

    @property
    def top_k(self) -> int:
        return 1 if self.inner is None else int(self.inner.top_k)

    def bind_state(self, state) -> None:
        """Pass the model's adapter state on to an inner router that reads it (MeteoRA gates)."""
        if self.inner is not None and hasattr(self.inner, "bind_state"):
            self.inner.bind_state(state)

    def active_experts(self) -> list[int] | None:
        """Indices of the active experts, or ``None`` when all are active (host-side, cached by
        the buffer's version so a forward does not read the device)."""
        key = (id(self.active), self.active._version)  # a new buffer (load with assign, .to()) or an in-place write
        if self._active_cache is None or self._active_cache[0] != key:
            flags = self.active.tolist()
            self._active_cache = (key, None if all(flags) else [i for i, f in enumerate(flags) if f])
        return self._active_cache[1]

    @torch.no_grad()
    def set_active(self, mask: Tensor) -> None:
        """``mask [E]`` bool: which experts stay in the routing (``over="experts"``)."""
        if not bool(mask.any()):
            raise ValueError("at least one expert must stay active")
        self.active.copy_(mask.to(self.active.device))

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, *, token_mask: Tensor | None = None) -> Routing:
        """Route ``x [T, d_in]``: the inner router's routing with its weights multiplied by ω."""
        if self.inner is None:
            t = x.shape[0]
            ids = torch.zeros(t, 1, dtype=torch.long, device=x.device)
            return Routing(expert_ids=ids, weights=self.omega.view(1, 1).expand(t, 1),
                           probs=torch.ones(t, 1, device=x.device))
        if self.over == "heads":
            r = self.inner(x, token_mask=token_mask)
            return dataclasses.replace(r, weights=r.weights * self.omega[0])
        # A forced (static) routing of the inner gate (moelora.select_experts) names experts in the
        # bank's numbering; an inactive expert's ω is 0, so it still contributes nothing.
        subset = None if getattr(self.inner, "forced", None) is not None else self.active_experts()
        r = self.inner(x, token_mask=token_mask) if subset is None else self._route_subset(x, token_mask, subset)
        gate = self.omega[r.expert_ids.clamp(min=0)]
        return dataclasses.replace(r, weights=r.weights * gate.to(r.weights.dtype))

    def _route_subset(self, x: Tensor, token_mask: Tensor | None, subset: list[int]) -> Routing:
        """The inner router run on the rows of experts ``subset`` only, ids mapped back to the bank."""
        inner, e = self.inner, self.num_experts
        index = device_constant(subset, self.omega.device)
        rows = {name: t.index_select(0, index.to(t.device)) for name, t in expert_rows(inner, e).items()}
        supervised = hasattr(inner, "task_lookup")  # a MeteoRA gate
        saved = inner.num_experts, inner.top_k, getattr(inner, "task_lookup", None)
        inner.num_experts, inner.top_k = len(subset), min(inner.top_k, len(subset))
        if supervised:
            # Its supervision names experts in the bank's numbering (through its lookup when some
            # adapters are absent from this layer); here the gate sees only ``subset``.
            position = {expert: i for i, expert in enumerate(subset)}
            inner.task_lookup = tuple(position.get(b, -1) for b in (saved[2] or range(e)))
        try:
            r = torch.func.functional_call(inner, rows, (x,), {"token_mask": token_mask}, strict=False)
        finally:
            inner.num_experts, inner.top_k = saved[:2]
            if supervised:
                inner.task_lookup = saved[2]
        index = index.to(r.expert_ids.device)
        ids = torch.where(r.expert_ids >= 0, index[r.expert_ids.clamp(min=0)], r.expert_ids)
        probs = dropped = None
        if r.probs is not None:
            probs = r.probs.new_zeros(r.probs.shape[0], e).index_copy(1, index, r.probs)
        if r.dropped is not None:
            dropped = r.dropped.new_zeros(e).index_copy(0, index, r.dropped)
        return dataclasses.replace(r, expert_ids=ids, probs=probs, dropped=dropped)

    # ------------------------------------------------------------------ surgery
    @torch.no_grad()
    def keep_experts(self, keep: list[int]) -> dict[str, tuple[Tensor, Tensor]]:
        """Remove every expert not in ``keep`` (bank indices, ascending): ω entries, active flags
        and the inner router's rows. ``top_k`` becomes ``min(top_k, len(keep))``.

        Returns:
            ``{param name: (old, new)}`` for every parameter replaced (to update an optimizer).
        """
        e = self.num_experts
        index = torch.tensor(keep, dtype=torch.long)
        replaced = {}
        targets = [(self.inner, n, t) for n, t in expert_rows(self.inner, e).items()]
        targets += [(self, "omega", self.omega), (self, "active", self.active)]
        for owner, name, old in targets:
            module = owner.get_submodule(name.rpartition(".")[0]) if "." in name else owner
            leaf = name.rpartition(".")[2]
            new = old.detach().index_select(0, index.to(old.device)).clone()
            if isinstance(old, nn.Parameter):
                new = nn.Parameter(new, requires_grad=old.requires_grad)
                setattr(module, leaf, new)
                prefix = "" if owner is self else "inner."
                replaced[prefix + name] = (old, new)
            else:
                module.register_buffer(leaf, new, persistent=leaf not in module._non_persistent_buffers_set)
        forced = getattr(self.inner, "forced", None)  # MeteoRA's static routing override
        if isinstance(forced, Tensor) and forced.shape[0] == e:
            self.inner.forced = forced.index_select(0, index.to(forced.device))
        self.inner.num_experts = len(keep)
        self.inner.top_k = min(int(self.inner.top_k), len(keep))
        self._active_cache = None
        if self.expert_names is not None and len(self.expert_names) == e:
            self.expert_names = [self.expert_names[i] for i in keep]
        return replaced

    def extra_repr(self) -> str:
        return f"over={self.over!r}, omega={tuple(self.omega.shape)}"
