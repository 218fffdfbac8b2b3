"""Per-model adapter state shared by every wrapped layer: config, tracker, current token mask."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .tracker import LoadTracker
from .config import MoELoRAConfig

STATE_ATTR = "_moelora_state"


@dataclass
class AdapterState:
    """Lives on the injected model as ``model._moelora_state``.

    Attributes:
        config: the method config the model was injected with.
        tracker: routing statistics of every wrapped layer.
        token_mask: ``[T]`` bool real-token mask of the current forward (from ``attention_mask``),
            or ``None``; layers use it only when its length equals their token count.
        last_token_mask: the mask of the forward that just finished, for activation-checkpoint
            recomputation (which runs in backward, after that forward returned).
        enabled: ``False`` inside :func:`moelora.disable_adapters` (layers return the base output).
        wrapped: names of the wrapped linears, in injection order.
        saved_modules: names of the ``modules_to_save`` wrappers.
        requires_grad: each original parameter's ``requires_grad`` before injection (for unwrap).
        handles: forward-hook handles to remove on unwrap.
        in_forward: True between the model's forward pre-hook and its forward hook.
        replay: while a checkpointed block runs, the
            :class:`~moelora.checkpointing.ForwardContext` of the forward that made the checkpoint
            (its token mask is read on recomputation); ``None`` outside one.
        forcing: ``(router, layer name, model-wide expert weights)`` entries that
            :func:`moelora.select_experts` set (``None`` outside it); a recomputation replays them.
        task_ids: int64 task ids of the current forward, one per token, shaped as given to
            :func:`moelora.set_task_ids` (``[batch, seq]`` or ``[T]``; negative = none); MeteoRA
            gates supervise on them, statistics group by them. Read them with :meth:`task_ids_for`.
    """

    config: MoELoRAConfig
    tracker: LoadTracker = field(default_factory=LoadTracker)
    token_mask: Tensor | None = None
    last_token_mask: Tensor | None = None
    enabled: bool = True
    wrapped: list[str] = field(default_factory=list)
    saved_modules: list[str] = field(default_factory=list)
    requires_grad: dict[str, bool] = field(default_factory=dict)
    handles: list[Any] = field(default_factory=list)
    task_ids: Tensor | None = None
    replay: Any = None
    in_forward: bool = False
    forcing: tuple[tuple[nn.Module, str, Tensor], ...] | None = None

    def mask_for(self, num_tokens: int, *, recomputing: bool = False) -> Tensor | None:
        """The token mask of this forward (or, when ``recomputing``, of the forward being
        recomputed) if it describes ``num_tokens`` tokens, else ``None``.

        A recomputation inside a checkpointed block gets the mask of the forward that made that
        checkpoint (``replay``, set by :class:`~moelora.checkpointing.ReplayingCheckpoint`), so two
        forwards sharing one backward each replay their own. A recomputation that runs the model's
        forward again (``in_forward``: the whole model checkpointed) gets that forward's mask;
        anything else the last forward's."""
        if not recomputing or self.in_forward:
            m = self.token_mask
        elif self.replay is not None:
            m = self.replay.mask
        else:
            m = self.last_token_mask
        return m if m is not None and m.numel() == num_tokens else None

    def task_rows(self) -> int:
        """``1 + max(task_ids)`` of this forward (0 without ids), read from the device once per
        set of ids rather than once per layer: the tracker sizes its per-task counts with it."""
        ids = self.task_ids
        if ids is None:
            return 0
        cached = self.__dict__.get("_task_rows")
        if cached is None or cached[0] is not ids:
            cached = self.__dict__["_task_rows"] = (ids, int(ids.max()) + 1 if ids.numel() else 0)
        return max(cached[1], 0)

    def task_ids_for(self, num_tokens: int) -> Tensor | None:
        """``[num_tokens]`` task ids for a wrapped linear that sees ``num_tokens`` rows, or ``None``.

        A layer on the token stream gets the per-token ids. A layer that sees one row per sequence
        (BERT's pooler, a head on the pooled vector) gets each sequence's id, when the ids were
        given as ``[batch, seq]`` and every sequence holds a single non-negative id (negative
        entries, e.g. padding, are ignored). Anything else gets ``None``.
        """
        ids = self.task_ids
        if ids is None:
            return None
        if ids.numel() == num_tokens:
            return ids.reshape(-1)
        if ids.dim() == 2 and ids.shape[0] == num_tokens:
            top = ids.max(dim=1).values  # the sequence's id, if it has one; -1 when none
            low = ids.masked_fill(ids < 0, torch.iinfo(ids.dtype).max).min(dim=1).values
            if bool(((low == top) | (top < 0)).all()):
                return top
        return None


def get_state(model: nn.Module) -> AdapterState:
    """The adapter state of an injected model; a clear error if the model was never injected."""
    state = getattr(model, STATE_ATTR, None)
    if state is None:
        raise ValueError(f"{type(model).__name__} has no moelora adapter: call moelora.inject(model, config) "
                         "or moelora.load_adapter(model, path) first.")
    return state
