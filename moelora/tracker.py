"""The routing-statistics tracker: what every wrapped layer routed where, per forward.

Statistics are recorded once per real forward: a recomputation under activation checkpointing
(which runs inside the backward pass) is not counted again.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from .balance import recomputing


@dataclass
class LayerStats:
    """Accumulated routing statistics of one wrapped layer (all tensors on CPU, float64).

    Attributes:
        counts: ``[E]`` slots routed to each expert (after drops).
        prob_sum: ``[E]`` sum of router probabilities over tokens (``mean_probs`` divides by tokens).
        dropped: ``[E]`` slots that were routed to an expert but dropped.
        coactivation: ``[E, E]`` how often two experts were chosen for the same token; its
            diagonal is ``counts``.
        tokens: real tokens seen.
        forwards: forward passes recorded.
        task_counts: ``[N, E]`` slots routed to each expert by tokens of task id ``n`` (rows grow
            with the largest id seen), or ``None`` while no forward carried task ids.
    """

    counts: Tensor
    prob_sum: Tensor
    dropped: Tensor
    coactivation: Tensor
    tokens: int = 0
    forwards: int = 0
    task_counts: Tensor | None = None

    @classmethod
    def empty(cls, num_experts: int) -> "LayerStats":
        z = lambda *s: torch.zeros(*s, dtype=torch.float64)  # noqa: E731
        return cls(z(num_experts), z(num_experts), z(num_experts), z(num_experts, num_experts))

    @property
    def num_experts(self) -> int:
        return self.counts.numel()

    def grow_tasks(self, num_tasks: int) -> Tensor:
        """``task_counts [max(N, num_tasks), E]``: at least ``num_tasks`` rows (new rows are zero)."""
        have = 0 if self.task_counts is None else self.task_counts.shape[0]
        if num_tasks > have:
            grown = torch.zeros(num_tasks, self.num_experts, dtype=torch.float64)
            if self.task_counts is not None:
                grown[:have] = self.task_counts
            self.task_counts = grown
        return self.task_counts

    def since(self, earlier: "LayerStats") -> "LayerStats":
        """The statistics accumulated after the snapshot ``earlier`` of the same layer (a window)."""
        return self._combine(earlier, -1)

    def plus(self, other: "LayerStats") -> "LayerStats":
        """Two disjoint windows of the same layer taken together (the inverse of :meth:`since`)."""
        return self._combine(other, 1)

    def _combine(self, other: "LayerStats", sign: int) -> "LayerStats":
        tasks = None
        if self.task_counts is not None or other.task_counts is not None:
            # The two may know different task ids: pad both with zero rows.
            rows = max(t.shape[0] for t in (self.task_counts, other.task_counts) if t is not None)
            tasks = dataclasses.replace(self).grow_tasks(rows) + sign * dataclasses.replace(other).grow_tasks(rows)
        return LayerStats(self.counts + sign * other.counts, self.prob_sum + sign * other.prob_sum,
                          self.dropped + sign * other.dropped, self.coactivation + sign * other.coactivation,
                          self.tokens + sign * other.tokens, self.forwards + sign * other.forwards, tasks)

    def to_dict(self) -> dict:
        """JSON-ready copy: lists of floats plus the summary scalars."""
        out = {"counts": self.counts.tolist(), "mean_probs": self.mean_probs.tolist(),
               "dropped": self.dropped.tolist(), "coactivation": self.coactivation.tolist(),
               "forwards": self.forwards, **self.summary()}
        if self.task_counts is not None:
            out["task_counts"] = self.task_counts.tolist()
        return out

    @property
    def load(self) -> Tensor:
        """``[E]`` share of routed slots per expert (sums to 1; zeros before any token)."""
        total = self.counts.sum()
        return self.counts / total if total > 0 else self.counts.clone()

    @property
    def mean_probs(self) -> Tensor:
        """``[E]`` mean router probability per expert."""
        return self.prob_sum / max(self.tokens, 1)

    @property
    def entropy(self) -> float:
        """Normalised entropy of the load in [0, 1]: 1 = perfectly balanced (1.0 when E = 1)."""
        if self.num_experts == 1:
            return 1.0
        p = self.load[self.load > 0]
        return float(-(p * p.log()).sum() / math.log(self.num_experts)) if p.numel() else 0.0

    @property
    def max_share(self) -> float:
        """Largest expert's share of the routed slots."""
        return float(self.load.max()) if self.counts.sum() > 0 else 0.0

    @property
    def dead_fraction(self) -> float:
        """Fraction of experts that received no slot."""
        return float((self.counts == 0).double().mean())

    @property
    def drop_rate(self) -> float:
        """Dropped slots / (kept + dropped slots)."""
        total = float(self.counts.sum() + self.dropped.sum())
        return float(self.dropped.sum()) / total if total > 0 else 0.0

    def summary(self) -> dict[str, float]:
        """Bounded scalars for loggers."""
        return {"entropy": self.entropy, "max_share": self.max_share,
                "dead_fraction": self.dead_fraction, "drop_rate": self.drop_rate,
                "tokens": float(self.tokens)}


def _outside_inference_mode(method):
    """Run ``method`` with inference mode off: accumulators created under ``torch.inference_mode()``
    would be inference tensors, which the next normal forward may not add into in place."""
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        if torch.is_inference_mode_enabled():
            with torch.inference_mode(False):
                return method(*args, **kwargs)
        return method(*args, **kwargs)
    return wrapper


@dataclass
class _Pending:
    """One layer's statistics since they were last settled, on the routing's device.
    ``coactivation`` counts tokens (0/1 per token and expert); ``slots`` ``[E+1]`` counts routed
    slots (the last entry collects empty ones), which differ only where a custom router repeats
    an expert within a token. Settling writes ``slots`` onto the co-activation's diagonal.

    Every field is a tensor updated in place, the counters included: a Python int would be a
    constant to ``torch.compile``, which then recompiled the model at every forward (its guard
    ``forwards == n`` failing) until it gave up and ran it eagerly."""

    prob_sum: Tensor
    dropped: Tensor
    coactivation: Tensor
    slots: Tensor
    tokens: Tensor  # 0-d int64: real tokens
    forwards: Tensor  # 0-d int64
    task_counts: Tensor | None = None

    @property
    def num_experts(self) -> int:
        return self.prob_sum.numel()

    @classmethod
    def zeros(cls, num_experts: int, device: torch.device) -> "_Pending":
        # float64 where the device has it (exact counts past 2**24 slots); MPS has no float64.
        dtype = torch.float32 if device.type == "mps" else torch.float64
        z = lambda *s: torch.zeros(*s, dtype=dtype, device=device)  # noqa: E731
        n = lambda: torch.zeros((), dtype=torch.long, device=device)  # noqa: E731
        return cls(z(num_experts), z(num_experts), z(num_experts, num_experts), z(num_experts + 1), n(), n())

    @_outside_inference_mode
    def grow_tasks(self, rows: int) -> None:
        """Give ``task_counts`` at least ``rows`` rows (new tensors: only called eagerly, see
        :meth:`LoadTracker._open`)."""
        grown = self.prob_sum.new_zeros(rows, self.num_experts)
        if self.task_counts is not None:
            grown[:self.task_counts.shape[0]] = self.task_counts
        self.task_counts = grown

    def zero_(self) -> None:
        """Start a new window in place: a compiled model keeps adding into these same tensors."""
        for t in (self.prob_sum, self.dropped, self.coactivation, self.slots, self.tokens, self.forwards,
                  self.task_counts):
            if t is not None:
                t.zero_()


def concat_routings(group: list[tuple]) -> tuple:
    """One routing from several forwards of one layer: ``group`` holds :meth:`LoadTracker.record`
    argument tuples ``(name, E, expert_ids [T_i, k], probs [T_i, E] | None, dropped [E] | None,
    token_mask [T_i] | None, task_ids | None, num_tasks | None)`` with equal ``E``, ``k`` and
    device; returns ``(expert_ids [ΣT_i, k], probs, dropped, token_mask, task_ids, num_tasks)``.
    A forward without a mask has all tokens real; one without task ids gets id -1 (none)."""
    if len(group) == 1:
        return group[0][2:]
    ids = [g[2] for g in group]
    dev = ids[0].device
    probs = None if group[0][3] is None else torch.cat([g[3] for g in group])
    drops = [g[4].to(dev) for g in group if g[4] is not None]
    dropped = torch.stack(drops).sum(0) if drops else None
    mask = None
    if any(g[5] is not None for g in group):
        mask = torch.cat([torch.ones(t.shape[0], dtype=torch.bool, device=dev) if g[5] is None
                          else g[5].reshape(-1).to(dev, torch.bool) for g, t in zip(group, ids)])
    tasks = num_tasks = None
    has_tasks = [g[6] is not None and g[6].numel() == t.shape[0] for g, t in zip(group, ids)]
    if any(has_tasks):
        tasks = torch.cat([g[6].reshape(-1).to(dev, torch.long) if has else
                           torch.full((t.shape[0],), -1, dtype=torch.long, device=dev)
                           for g, t, has in zip(group, ids, has_tasks)])
        bounds = [g[7] for g, has in zip(group, has_tasks) if has]
        num_tasks = None if any(b is None for b in bounds) else max(bounds)
    return torch.cat(ids), probs, dropped, mask, tasks, num_tasks


class LoadTracker:
    """Accumulates :class:`LayerStats` per wrapped layer, keyed by module name.

    :meth:`record` never reads a value back to the host: on a GPU every wrapped layer records in
    every forward, and a device sync there would stall the launch queue hundreds of times per
    step. It adds into per-layer accumulators on the routing's device, which are settled into the
    CPU float64 :attr:`layers` when those are read.

    Under ``torch.compile`` the adds are part of the compiled graph (no graph break). The graph
    only ever adds into accumulators that already exist: settling zeroes them in place rather
    than replacing them, and a compiled forward that finds a layer without one keeps that
    layer's routing in a short queue instead, which :meth:`flush` records eagerly (the model's
    forward pre-hook calls it, so the next forward does). Every forward is counted.

    Small forwards (at most :attr:`DEFER_MAX_TOKENS` tokens: a decoding step, a head that sees
    one row per sequence) are not added one by one: their routings are held and added
    :attr:`DEFER_ENTRIES` at a time, one concatenated add per layer, or as soon as the statistics
    are read. At one token a layer's dozen small adds cost about as much as its expert math;
    deferred, they cost a list append.
    """

    #: The most routings a compiled model may queue before one is recorded eagerly; past it they
    #: are dropped (and counted in :attr:`lost_forwards`). Only a compiled model that is never
    #: called through its top-level forward and whose statistics are never read gets there.
    MAX_QUEUED = 4096
    #: Eager forwards of at most this many tokens are deferred (see the class docstring); 0 = none.
    DEFER_MAX_TOKENS = 64
    #: Deferred routings are added once this many are held.
    DEFER_ENTRIES = 1024

    def __init__(self) -> None:
        self._layers: dict[str, LayerStats] = {}
        self._pending: dict[str, _Pending] = {}
        self._queued: list[tuple] = []    # compiled forwards' routings, recorded by flush()
        self._deferred: list[tuple] = []  # small eager forwards' routings, recorded in batches
        #: Layer forwards of a compiled model that could not be recorded (see :attr:`MAX_QUEUED`).
        self.lost_forwards = 0
        #: Set False to stop recording (the counts so far are kept, deferred ones included):
        #: for inference, where the statistics are not read.
        self.enabled = True

    @property
    def layers(self) -> dict[str, LayerStats]:
        """``{layer name: LayerStats}`` (CPU float64), including everything recorded so far."""
        self._settle()
        return self._layers

    @layers.setter
    def layers(self, value: dict[str, LayerStats]) -> None:
        self._discard_pending()  # the statistics are replaced as a whole
        self._layers = value

    def _discard_pending(self) -> None:
        """Drop what was recorded but not settled (the accumulators stay, zeroed in place)."""
        self._queued.clear()
        self._deferred.clear()
        for p in self._pending.values():
            p.zero_()

    def flush(self) -> None:
        """Record the routings a compiled forward queued (see the class docstring). Cheap when
        there are none; called by the injected model's forward pre-hook and before settling."""
        if self._queued:
            # Not a decorator: that would import torch._dynamo (and triton) with moelora.
            torch.compiler.disable(self._record_queued)()

    def _record_queued(self) -> None:
        queued, self._queued = self._queued, []
        self._add_all(queued)

    def _record_deferred(self) -> None:
        deferred, self._deferred = self._deferred, []
        self._add_all(deferred)

    @_outside_inference_mode
    def _settle(self) -> None:
        self.flush()
        if self._deferred:
            self._record_deferred()
        if self.lost_forwards:
            warnings.warn(f"{self.lost_forwards} layer forwards of a compiled model were not recorded: the model "
                          "was never called through its top-level forward between reads of the statistics "
                          f"(more than LoadTracker.MAX_QUEUED = {self.MAX_QUEUED} queued)", stacklevel=3)
            self.lost_forwards = 0
        for name, p in self._pending.items():
            forwards = int(p.forwards)
            if not forwards:
                continue
            stats = self._layers.get(name)
            if stats is None:
                stats = self._layers[name] = LayerStats.empty(p.num_experts)
            coactivation = p.coactivation.cpu().double()
            coactivation.diagonal().copy_(p.slots[:-1])  # slots, not tokens: see _Pending
            stats.counts += coactivation.diagonal()
            stats.prob_sum += p.prob_sum.cpu().double()
            stats.dropped += p.dropped.cpu().double()
            stats.coactivation += coactivation
            stats.tokens += int(p.tokens)
            stats.forwards += forwards
            if p.task_counts is not None:
                stats.grow_tasks(p.task_counts.shape[0])[:p.task_counts.shape[0]] += p.task_counts.cpu().double()
            p.zero_()

    @_outside_inference_mode
    def _open(self, name: str, num_experts: int, device: torch.device) -> _Pending:
        """Fresh accumulators for layer ``name`` (after settling what it had). Only called
        eagerly: a tensor made inside a compiled graph that runs under inference mode is an
        inference tensor, and the next training forward could not add into it."""
        if name in self._pending:
            self._settle()
        p = self._pending[name] = _Pending.zeros(num_experts, device)
        return p

    def record(self, name: str, num_experts: int, expert_ids: Tensor, probs: Tensor | None,
               dropped: Tensor | None, token_mask: Tensor | None, task_ids: Tensor | None = None,
               num_tasks: int | None = None) -> None:
        """Add one forward's routing of layer ``name``; skipped during checkpoint recompute.

        Args:
            expert_ids: ``[T, k]`` with ``-1`` for empty slots.
            probs: ``[T, E]`` or ``None``.
            dropped: ``[E]`` dropped-slot counts or ``None``.
            token_mask: ``[T]`` bool real tokens, or ``None`` (all real).
            task_ids: ``[T]`` per-token task ids (negative = none) for ``task_counts``, or ``None``;
                ignored when their count is not ``T`` (a layer that sees other tokens).
            num_tasks: an upper bound on ``max(task_ids) + 1`` known on the host
                (:meth:`~moelora.state.AdapterState.task_rows`); without it the maximum is read
                from the device (one sync).
        """
        if not self.enabled or recomputing():
            return
        if probs is not None and probs.requires_grad:
            probs = probs.detach()
        entry = (name, num_experts, expert_ids, probs, dropped, token_mask, task_ids, num_tasks)
        if torch.compiler.is_compiling():
            p = self._pending.get(name)
            opened = p is not None and p.prob_sum.device == expert_ids.device and p.num_experts == num_experts
            by_task = task_ids is not None and task_ids.numel() == expert_ids.shape[0]
            # New tensors are made eagerly (see _open): queue this routing until then.
            if not opened or (by_task and (num_tasks is None or p.task_counts is None
                                           or p.task_counts.shape[0] < num_tasks)):
                if len(self._queued) < self.MAX_QUEUED:
                    self._queued.append(entry)
                else:
                    self.lost_forwards += 1
                return
            self._add(p, *entry[2:])
        elif expert_ids.shape[0] <= self.DEFER_MAX_TOKENS:
            # The mask and task ids may be the caller's tensors, refilled in place before the add.
            self._deferred.append((*entry[:5], None if token_mask is None else token_mask.clone(),
                                   None if task_ids is None else task_ids.clone(), num_tasks))
            if len(self._deferred) >= self.DEFER_ENTRIES:
                self._record_deferred()
        else:
            self._add_all([entry])

    def _add_all(self, entries: list[tuple]) -> None:
        """Add eagerly the ``record`` arguments in ``entries``: one add per layer, of its routings
        concatenated (grouped by layer and shape, in order of first appearance)."""
        groups: dict[tuple, list[tuple]] = {}
        for entry in entries:
            name, num_experts, ids, probs = entry[:4]
            key = (name, num_experts, ids.device, ids.shape[1], None if probs is None else probs.dtype)
            groups.setdefault(key, []).append(entry)
        for (name, num_experts, dev, *_), group in groups.items():
            p = self._pending.get(name)
            if p is None or p.prob_sum.device != dev or p.num_experts != num_experts:
                p = self._open(name, num_experts, dev)
            self._add(p, *concat_routings(group), forwards=len(group))

    def _add(self, p: _Pending, expert_ids: Tensor, probs: Tensor | None, dropped: Tensor | None,
             token_mask: Tensor | None, task_ids: Tensor | None, num_tasks: int | None,
             forwards: int = 1) -> None:
        """Add ``forwards`` forwards' routing (``record``'s arguments, concatenated) into ``p``."""
        dev, num_experts = expert_ids.device, p.num_experts
        by_task = task_ids is not None and task_ids.numel() == expert_ids.shape[0]
        valid = expert_ids >= 0
        real = None if token_mask is None else token_mask.to(dev).reshape(-1, 1)
        if real is not None:
            valid = valid & real
        index = torch.where(valid, expert_ids, num_experts).long()
        chosen = torch.zeros(expert_ids.shape[0], num_experts + 1, dtype=p.prob_sum.dtype, device=dev)
        chosen = chosen.scatter_(1, index, 1.0)[:, :num_experts]                # [T, E] 0/1
        p.coactivation += chosen.t() @ chosen
        # Every slot counts, also one that repeats an expert within a token (the kernels apply
        # each); kept apart from the token-level co-activation to stay two ops per forward.
        p.slots.scatter_add_(0, index.reshape(-1), valid.reshape(-1).to(p.slots.dtype))
        if probs is not None:
            pr = probs.to(p.prob_sum.dtype)
            p.prob_sum += (pr if real is None else torch.where(real, pr, 0)).sum(0)
        if dropped is not None:
            p.dropped += dropped.to(p.dropped.dtype)
        p.tokens += expert_ids.shape[0] if real is None else real.sum()
        p.forwards += forwards
        if by_task:
            tasks = task_ids.reshape(-1).to(dev).long()
            rows = num_tasks if num_tasks is not None else (int(tasks.max()) + 1 if tasks.numel() else 0)
            if rows > 0:
                if p.task_counts is None or p.task_counts.shape[0] < rows:
                    p.grow_tasks(rows)
                slots = chosen.new_zeros(expert_ids.shape[0], num_experts + 1)
                slots = slots.scatter_add_(1, index, valid.to(slots.dtype))[:, :num_experts]  # [T, E]
                # A slot without a task (negative id) adds a zero row to task 0.
                p.task_counts.index_add_(0, tasks.clamp(min=0), torch.where((tasks >= 0).view(-1, 1), slots, 0))

    def reset(self) -> None:
        """Forget every statistic (the accumulators stay, zeroed, for a compiled model to add into)."""
        self._layers.clear()
        self._discard_pending()

    def reduced(self) -> "LoadTracker":
        """A copy holding every layer's statistics summed across distributed ranks.

        The tracker itself keeps its local counts, so reducing again later never double-counts.
        Without an initialised process group the copy equals the local statistics. Every rank
        must call this at the same point with the same layer names (a collective).
        """
        out = LoadTracker()
        # Clone: the tracker adds in place, so a shared tensor would make a snapshot follow it
        # (every later window ``now.since(snapshot)`` would read zero).
        out.layers = {name: LayerStats(s.counts.clone(), s.prob_sum.clone(), s.dropped.clone(),
                                       s.coactivation.clone(), s.tokens, s.forwards,
                                       None if s.task_counts is None else s.task_counts.clone())
                      for name, s in self.layers.items()}
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return out
        on_gpu = torch.distributed.get_backend() == "nccl"
        # Ranks may have seen different task ids (or none): agree on one row count first.
        rows = torch.tensor([max((0 if s.task_counts is None else s.task_counts.shape[0])
                                 for s in out.layers.values()) if out.layers else 0], dtype=torch.float64)
        rows = rows.cuda() if on_gpu else rows
        torch.distributed.all_reduce(rows, op=torch.distributed.ReduceOp.MAX)
        num_tasks = int(rows.item())
        for name in sorted(out.layers):
            s = out.layers[name]
            e = s.num_experts
            tasks = [] if num_tasks == 0 else [dataclasses.replace(s).grow_tasks(num_tasks).flatten()]
            flat = torch.cat([s.counts, s.prob_sum, s.dropped, s.coactivation.flatten(),
                              torch.tensor([s.tokens, s.forwards], dtype=torch.float64), *tasks])
            if on_gpu:
                flat = flat.cuda()
            torch.distributed.all_reduce(flat)
            flat = flat.cpu()
            s.counts, s.prob_sum, s.dropped = flat[:e], flat[e:2 * e], flat[2 * e:3 * e]
            end = 3 * e + e * e
            s.coactivation = flat[3 * e:end].view(e, e)
            s.tokens, s.forwards = int(flat[end]), int(flat[end + 1])
            s.task_counts = flat[end + 2:].view(num_tasks, e) if num_tasks else None
        return out
