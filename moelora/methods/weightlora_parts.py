"""WeightLoRA building blocks: the gate-aware tracker, bank surgery and optimizer surgery.

Nothing here knows the WeightLoRA schedule; :mod:`moelora.methods.weightlora` drives it. Bank
surgery keeps the rank-major layout of :class:`~moelora.experts.ExpertBank` (design §3.2)::

    keep_bank_experts(bank, [0, 2])      A [R, d_in] → A[rows of experts 0 and 2]   (new Parameters)
    grow_bank_ranks(bank, [8, 8], ...)   expert e's rows r_e → r'_e: old rows first, new rows after

Optimizer surgery moves a replaced parameter's place and state (Adam moments, momentum) to the
new parameter, mapping rows the way the parameter's rows moved, or removes it entirely.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from moelora.tracker import LoadTracker
from moelora.kernels.ops import device_constant
from moelora.experts import ExpertBank

PLUS_INITS = ("zero_b", "zero_a")


# ----------------------------------------------------------------------------- tracker
class WeightLoRATracker(LoadTracker):
    """A :class:`~moelora.tracker.LoadTracker` that also holds WeightLoRA's gates.

    Attributes:
        gates: ``{layer name: {"omega": [floats], "status": "active" | "disconnected",
            "ranks": [ints], "experts": [original expert indices]}}``, the latest snapshot of every
            head's ω (written by :func:`moelora.weightlora.record_gates`; read by the dashboard).
        expert_maps: ``{layer name: (kept original indices, original E)}`` for banks whose experts
            were pruned: their routing is recorded in the original numbering (dropped experts
            simply receive nothing), so statistics keep one shape for the whole run.
    """

    def __init__(self) -> None:
        super().__init__()
        self.gates: dict[str, dict] = {}
        self.expert_maps: dict[str, tuple[list[int], int]] = {}

    @torch.no_grad()
    def record(self, name: str, num_experts: int, expert_ids: Tensor, probs: Tensor | None,
               dropped: Tensor | None, token_mask: Tensor | None, task_ids: Tensor | None = None,
               num_tasks: int | None = None) -> None:
        """As :meth:`LoadTracker.record`, with a pruned bank's experts mapped to their original ids."""
        mapping = self.expert_maps.get(name)
        if mapping is not None and len(mapping[0]) == num_experts != mapping[1]:
            kept, num_experts = mapping
            index = device_constant(kept, expert_ids.device)
            expert_ids = torch.where(expert_ids >= 0, index[expert_ids.clamp(min=0)], expert_ids)
            if probs is not None:
                probs = probs.new_zeros(probs.shape[0], num_experts).index_copy(1, index.to(probs.device), probs)
            if dropped is not None:
                dropped = dropped.new_zeros(num_experts).index_copy(0, index.to(dropped.device), dropped)
        super().record(name, num_experts, expert_ids, probs, dropped, token_mask, task_ids=task_ids,
                       num_tasks=num_tasks)

    def reduced(self) -> WeightLoRATracker:
        """As :meth:`LoadTracker.reduced` (a collective under DDP), keeping the gates."""
        out = WeightLoRATracker()
        out.layers, out.enabled = super().reduced().layers, self.enabled
        out.gates, out.expert_maps = copy.deepcopy(self.gates), dict(self.expert_maps)
        return out


def install_tracker(state) -> WeightLoRATracker:
    """Make ``state.tracker`` a :class:`WeightLoRATracker` (keeping what it recorded); returns it.

    In place: a handle the user already holds (``stats = moelora.routing_stats(model)`` before
    :func:`moelora.add_gates`) must stay the live tracker, its ``enabled`` and ``reset`` included."""
    tracker = state.tracker
    if not isinstance(tracker, WeightLoRATracker):
        tracker.__class__ = WeightLoRATracker
        tracker.gates, tracker.expert_maps = {}, {}
    return tracker


# ----------------------------------------------------------------------------- optimizer surgery
def as_optimizers(optimizers) -> list[torch.optim.Optimizer]:
    """``None``, one optimizer or a sequence of them, as a list."""
    if optimizers is None:
        return []
    if isinstance(optimizers, torch.optim.Optimizer) or hasattr(optimizers, "param_groups"):
        return [optimizers]
    return list(optimizers)


def replace_param(optimizers: Iterable[torch.optim.Optimizer], old: Tensor, new: Tensor | None,
                  rows: Callable[[Tensor], Tensor] | None = None) -> None:
    """Put ``new`` where ``old`` is in every optimizer's param groups (same group, same position)
    and move ``old``'s state; ``new=None`` removes ``old`` and its state.

    Args:
        rows: maps a state tensor shaped like ``old`` (Adam's ``exp_avg``, SGD's momentum) to one
            shaped like ``new``; other state entries (``step``) are kept as they are.
    """
    for opt in optimizers:
        for group in opt.param_groups:
            at = next((i for i, p in enumerate(group["params"]) if p is old), None)
            if at is None:
                continue
            state = opt.state.pop(old, None)
            if new is None:
                del group["params"][at]
                continue
            group["params"][at] = new
            if not state:
                continue
            if new.shape != old.shape and any(isinstance(v, Tensor) and v.dim() > 0 and v.shape != old.shape
                                              for v in state.values()):
                # Factored statistics (Adafactor's row_var / col_var) cannot be carried to a resized
                # parameter; zero rows there would divide by zero. Start its state afresh.
                warnings.warn(f"{type(opt).__name__}: the optimizer state of a resized adapter tensor "
                              f"{tuple(old.shape)} -> {tuple(new.shape)} holds statistics of other shapes, "
                              "which cannot be remapped; it starts afresh.", UserWarning, stacklevel=4)
                continue
            opt.state[new] = {k: (rows(v) if rows is not None and isinstance(v, Tensor) and v.dim() > 0
                                  and v.shape == old.shape else v) for k, v in state.items()}


def remove_params(optimizers: Iterable[torch.optim.Optimizer], params: Iterable[Tensor]) -> None:
    """Remove ``params`` (and their state) from every optimizer."""
    optimizers = list(optimizers)
    for p in params:
        replace_param(optimizers, p, None)


# ----------------------------------------------------------------------------- bank surgery
def _set_layout(bank: ExpertBank, A: Tensor, Bt: Tensor, scale: Tensor, ranks: Sequence[int]) -> dict:
    """Install new tensors and per-expert ranks in ``bank``; returns ``{"A": (old, new), "Bt": ...}``."""
    old_a, old_b = bank.A, bank.Bt
    bank.A = nn.Parameter(A, requires_grad=old_a.requires_grad)
    bank.Bt = nn.Parameter(Bt, requires_grad=old_b.requires_grad)
    bank.scale = scale
    bank.ranks = tuple(int(r) for r in ranks)
    offsets = [0]
    for r in bank.ranks:
        offsets.append(offsets[-1] + r)
    bank.rank_offsets = tuple(offsets)
    col = torch.repeat_interleave(torch.arange(len(bank.ranks)), torch.tensor(bank.ranks, dtype=torch.long))
    bank.col_expert = col.to(bank.scale.device)
    return {"A": (old_a, bank.A), "Bt": (old_b, bank.Bt)}


@torch.no_grad()
def keep_bank_experts(bank: ExpertBank, keep: Sequence[int]) -> tuple[dict, Tensor]:
    """Keep only experts ``keep`` (ascending bank indices) of ``bank``, in place.

    Returns:
        ``({"A": (old, new), "Bt": (old, new)}, rows)`` where ``rows [R_new]`` are the old row
        indices the new rows come from (``new = old[rows]``).
    """
    rows = [i for e in keep for i in range(bank.rank_offsets[e], bank.rank_offsets[e + 1])]
    index = torch.tensor(rows, dtype=torch.long, device=bank.A.device)
    scale = bank.scale.index_select(0, torch.tensor(list(keep), dtype=torch.long, device=bank.scale.device))
    swapped = _set_layout(bank, bank.A.detach().index_select(0, index).clone(),
                          bank.Bt.detach().index_select(0, index).clone(), scale.clone(),
                          [bank.ranks[e] for e in keep])
    return swapped, index


def _draw(shape: tuple[int, int], scheme: str, rank: int, generator: torch.Generator | None) -> Tensor:
    """New low-rank rows drawn as :meth:`ExpertBank.reset_parameters` draws A (CPU float32)."""
    if scheme == "gaussian":
        return torch.randn(shape, generator=generator) / max(rank, 1)
    bound = 1.0 / math.sqrt(shape[1])
    return torch.rand(shape, generator=generator) * (2 * bound) - bound


@torch.no_grad()
def grow_bank_ranks(bank: ExpertBank, ranks: Sequence[int], *, plus_init: str = "zero_b", scheme: str = "kaiming",
                    generator: torch.Generator | None = None) -> tuple[dict, Tensor]:
    """Raise expert ``e``'s rank from ``bank.ranks[e]`` to ``ranks[e]`` without changing the output.

    Each expert keeps its rows (and its scale: the new rows add ``scale_e · B_new A_new x`` with
    the same ``scale_e``) and gets ``ranks[e] - r_e`` new rows right after them:

    - ``plus_init="zero_b"``: new A rows drawn like a fresh LoRA's A (``scheme``), new B columns 0;
    - ``plus_init="zero_a"``: new A rows 0, new B columns drawn U(±1/sqrt(d_out)).

    Either way ``B_new A_new = 0`` at the switch. Returns ``(swapped, dest)`` where ``dest [R_old]``
    are the new row indices of the old rows (``new[dest] = old``; new rows of the state are 0).
    """
    if plus_init not in PLUS_INITS:
        raise ValueError(f"plus_init={plus_init!r} is invalid: expected one of {PLUS_INITS}")
    old_ranks = list(bank.ranks)
    if len(ranks) != len(old_ranks) or any(n < o for n, o in zip(ranks, old_ranks)):
        raise ValueError(f"new ranks {list(ranks)} must not be below the current ranks {old_ranks}")
    d_in, d_out = bank.in_features, bank.out_features
    A = bank.A.new_zeros(sum(ranks), d_in)
    Bt = bank.Bt.new_zeros(sum(ranks), d_out)
    dest, start = [], 0
    for e, (old, new) in enumerate(zip(old_ranks, ranks)):
        dest += list(range(start, start + old))
        extra = slice(start + old, start + new)
        if new > old:
            if plus_init == "zero_b":
                A[extra] = _draw((new - old, d_in), scheme, new, generator).to(A.dtype)
            else:
                Bt[extra] = _draw((new - old, d_out), "kaiming", new, generator).to(Bt.dtype)
        start += new
    index = torch.tensor(dest, dtype=torch.long, device=bank.A.device)
    A[index] = bank.A.detach()
    Bt[index] = bank.Bt.detach()
    return _set_layout(bank, A, Bt, bank.scale.clone(), ranks), index


def grown_rows(dest: Tensor, new_rows: int) -> Callable[[Tensor], Tensor]:
    """State mapping for :func:`grow_bank_ranks`: old rows to ``dest``, new rows zero."""
    def grow(v: Tensor) -> Tensor:
        out = v.new_zeros((new_rows, *v.shape[1:]))
        out[dest.to(v.device)] = v
        return out
    return grow


def picked_rows(index: Tensor) -> Callable[[Tensor], Tensor]:
    """State mapping for a parameter whose new rows are ``old[index]``."""
    return lambda v: v.index_select(0, index.to(v.device))
