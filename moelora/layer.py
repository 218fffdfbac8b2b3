"""MoELoRALinear: a frozen base linear plus a routed bank of LoRA experts (design §3.4).

    x ──► base_layer (frozen, black box) ───────────────────────────────┐
    │                                                                  (+)──► y
    ├──► router(x) ─► Routing(expert_ids, weights) ─┐                   │
    └──► dropout ─► gated_lora(x, A, Bt, routing) ◄─┘ ──► cast to y.dtype┘
"""

from __future__ import annotations

from torch import Tensor, nn

from .balance import recomputing
from .experts import ExpertBank
from .kernels import gated_lora
from .state import AdapterState


class MoELoRALinear(nn.Module):
    """Wraps one linear (``nn.Linear`` or GPT-2's ``Conv1D``) with routed LoRA experts.

    The base layer is called as a black box and never merged, so quantized or custom bases keep
    working. Leading dims of the input are flattened to tokens and restored.

    Args:
        base_layer: the frozen module being wrapped (maps ``[..., d_in]`` to ``[..., d_out]``).
        bank: the experts.
        router: an ``nn.Module`` returning :class:`~moelora.routers.Routing`.
        name: the wrapped module's path in the model (the key for statistics).
        state: the model-wide :class:`~moelora.state.AdapterState`.
        dropout: expert-input dropout probability.
        backend: kernel backend for the expert math.
    """

    #: Whether this module's routing is recorded under its ``name`` (statistics, dashboard); a
    #: linear whose routing belongs to an enclosing block (MoA types) says False.
    records_routing = True

    def __init__(self, *, base_layer: nn.Module, bank: ExpertBank, router: nn.Module, name: str,
                 state: AdapterState, dropout: float = 0.0, backend: str = "auto") -> None:
        super().__init__()
        self.base_layer, self.bank, self.router = base_layer, bank, router
        self.name, self.backend = name, backend
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        object.__setattr__(self, "_state", state)  # not a submodule: shared by every layer
        self._aux_loss: Tensor | None = None
        self._aux_detached = False
        self.last_expert_ids: Tensor | None = None
        self.last_weights: Tensor | None = None  # [T, k] gate weights of the last forward (dashboard samples)

    @property
    def in_features(self) -> int:
        return self.bank.in_features

    @property
    def out_features(self) -> int:
        return self.bank.out_features

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        """``x [..., d_in]`` → ``[..., d_out]`` = base(x) + routed expert delta."""
        out = self.base_layer(x, *args, **kwargs)
        state = self._state
        if not state.enabled:
            return out
        lead = x.shape[:-1]
        flat = x.reshape(-1, x.shape[-1])
        recompute = recomputing()
        mask = state.mask_for(flat.shape[0], recomputing=recompute)
        delta = self._expert_delta(flat, mask, recompute)
        return out + delta.view(*lead, delta.shape[-1]).to(out.dtype)  # -1 is ambiguous at T = 0

    def _expert_delta(self, flat: Tensor, mask: Tensor | None, recompute: bool) -> Tensor:
        """The routed expert output ``[T, d_out]`` for tokens ``flat [T, d_in]`` (the part a
        method overrides); records routing unless this is a checkpoint recomputation."""
        routing = self.router(flat, token_mask=mask)
        delta = gated_lora(self._expert_input(flat), self.bank.A, self.bank.Bt,
                           routing.expert_ids, routing.weights, self.bank.col_expert, self.bank.col_scale(),
                           num_experts=self.bank.num_experts, backend=self.backend,
                           ranks=self.bank.ranks, check_layout=False)  # an ExpertBank: valid as built
        if not recompute:
            self._remember(routing, mask)
        return delta

    def _expert_input(self, flat: Tensor) -> Tensor:
        """``flat [T, d_in]`` in the bank's dtype, through the expert-input dropout."""
        x = flat.to(self.bank.A.dtype)
        # Outside training (or at p = 0) dropout is the identity: skip the module call (~3 µs).
        return self.dropout(x) if self.training and type(self.dropout) is not nn.Identity else x

    def _remember(self, routing, mask: Tensor | None) -> None:
        state = self._state
        tasks = state.task_ids_for(routing.expert_ids.shape[0])
        state.tracker.record(self.name, self.bank.num_experts, routing.expert_ids, routing.probs,
                             routing.dropped, mask, task_ids=tasks,
                             num_tasks=state.task_rows() if tasks is not None else None)
        aux = routing.aux_loss
        # Reentrant checkpointing runs the first forward under no_grad: the aux loss would be a
        # constant and balancing silently off. Remember it so aux_loss() can say so.
        detached = aux is not None and not aux.requires_grad and any(p.requires_grad for p in self.router.parameters())
        # Plain attributes, set past nn.Module.__setattr__ (~2 µs each, per layer per decode step).
        self.__dict__.update(_aux_loss=aux, _aux_detached=detached, last_expert_ids=routing.expert_ids.detach(),
                             last_weights=routing.weights.detach())

    def __getstate__(self) -> dict:
        # The pending aux loss is part of the last forward's autograd graph: copy.deepcopy (EMA,
        # swa_utils.AveragedModel) refuses non-leaf tensors, and a copy has no graph to train.
        state = self.__dict__.copy()
        state["_aux_loss"] = None
        return state

    def pop_aux_loss(self) -> Tensor | None:
        """The aux loss of the last forward, a 0-d tensor or None (then forgotten, so the graph
        is not kept alive)."""
        loss, self._aux_loss = self._aux_loss, None
        return loss

    def extra_repr(self) -> str:
        return f"name={self.name!r}, backend={self.backend!r}"


def wrapped_layers(model: nn.Module) -> list[MoELoRALinear]:
    """Every :class:`MoELoRALinear` in ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, MoELoRALinear)]

