"""WeightLoRACallback: the WeightLoRA schedule (IHT, disconnection, WeightLoRA+) under Lightning.

:class:`~moelora.lightning.MoELoRAModule` adds it by itself for a
:class:`~moelora.WeightLoRAConfig` (the config's ``callbacks()`` hook, through the module's
``configure_callbacks``), so ``moelora fit -c configs/weightlora.yaml`` needs nothing else.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_info

from moelora.inject import trainable_parameters
from moelora.methods.weightlora import WeightLoRAController, gated_layers, record_gates, weightlora_config
from moelora.methods.weightlora_config import CHECKPOINT_KEY
from moelora.state import get_state

from .callbacks import short_names


class WeightLoRACallback(L.Callback):
    """Runs :class:`~moelora.weightlora.WeightLoRAController` after every optimizer step.

    - The trainer's optimizers are updated in place at disconnection / expansion (removed
      parameters and their state leave; grown A/B replace their predecessors with their state),
      keeping the param-group layout the module's ``configure_optimizers`` gives the pruned
      model, so a checkpoint written after pruning resumes (the module rebuilds the pruned layout
      from ``checkpoint["weightlora"]``, the live config this callback saves, before loading).
    - Logs ``weightlora/active`` (non-zero ω), ``weightlora/heads`` (connected heads),
      ``weightlora/trainable_params`` and, per head, ``weightlora/<layer>/omega`` (|ω|, its mean
      over experts with ``over="experts"``) every ``log_every_n_steps`` and at every event; keeps the
      ω snapshot in the tracker (``tracker.gates``) for the routing dashboard.
    - Disconnection changes the parameter set. Under DDP (``strategy="ddp"``: the spawn and fork
      launchers copy the final weights back into an unpruned module, so they are refused) the
      model is wrapped again right after it, so the new reducer covers exactly the kept (and grown)
      parameters; every rank takes the same decision, since ω is synchronised and hard
      thresholding is deterministic. Other multi-process strategies (FSDP, DeepSpeed) cannot
      follow the change: there a run that would disconnect must use one process.

    Args:
        log_every_n_steps: logging interval (default: the trainer's).
    """

    def __init__(self, log_every_n_steps: int | None = None) -> None:
        self.log_every_n_steps = log_every_n_steps
        self.controller: WeightLoRAController | None = None
        self._last_step: int | None = None
        self.events: list[tuple[int, str]] = []

    def on_fit_start(self, trainer, pl_module) -> None:
        config = weightlora_config(pl_module.model)
        strategy = trainer.strategy
        if config.stage == "warmup" and trainer.world_size > 1:
            if type(strategy) is not DDPStrategy:  # not its subclasses: DeepSpeed is one
                raise RuntimeError(
                    f"WeightLoRA disconnects heads after warmup_steps={config.warmup_steps}, which changes the "
                    f"trained parameters; the {type(strategy).__name__} strategy ({trainer.world_size} processes) "
                    "cannot follow that. Use strategy='ddp', or run the warm-up in one process (devices=1) and "
                    "resume from its checkpoint with this strategy.")
            if getattr(strategy, "_start_method", "popen") != "popen":
                # ddp_spawn / ddp_fork / ddp_notebook copy the workers' final weights back into the
                # main process's module, which still has the warm-up layout: the shapes no longer fit.
                raise RuntimeError(
                    f"WeightLoRA changes the model's parameters at warmup_steps={config.warmup_steps}; with the "
                    f"'{strategy._start_method}' launcher Lightning loads the workers' final weights back into "
                    "the main process's unpruned module, which fails. Use strategy='ddp' (one launched process "
                    "per device).")
        self.controller = WeightLoRAController(pl_module.model)
        record_gates(pl_module.model)  # the dashboard's first window sees every head's ω

    def on_train_start(self, trainer, pl_module) -> None:
        self._last_step = trainer.global_step  # after a resume: the restored step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.controller is None or step == self._last_step:  # accumulating: no optimizer step yet
            return
        self._last_step = step
        event = self.controller.step(trainer.optimizers, step=step)
        if event is not None and event != "threshold":
            self.events.append((step, event))
            _rewrap_ddp(trainer, pl_module)
            kept = [layer.name for layer in gated_layers(pl_module.model)]
            rank_zero_info(f"WeightLoRA: step {step}: {event}; {len(kept)} head(s) kept, "
                           f"{trainable_parameters(pl_module.model)[0]:,} trainable parameters")
        every = self.log_every_n_steps or trainer.log_every_n_steps
        if event not in (None, "threshold") or step % every == 0:
            self._log(pl_module)

    def _log(self, pl_module) -> None:
        model = pl_module.model
        gates = record_gates(model)  # also the snapshot the routing dashboard records
        live = {n: g for n, g in gates.items() if g.get("status") == "active"}
        names = short_names(sorted(gates))
        values = {"weightlora/active": float(sum(sum(1 for v in g["omega"] if v != 0) for g in live.values())),
                  "weightlora/heads": float(len(live)),
                  "weightlora/trainable_params": float(trainable_parameters(model)[0])}
        for name, g in gates.items():
            omega = [abs(v) for v in g["omega"]] or [0.0]
            values[f"weightlora/{names[name]}/omega"] = sum(omega) / len(omega)
        pl_module.log_dict(values, on_step=True, on_epoch=False, sync_dist=False)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        checkpoint[CHECKPOINT_KEY] = get_state(pl_module.model).config.to_dict()


def _rewrap_ddp(trainer, pl_module) -> None:
    """After the parameter set changed: a fresh DistributedDataParallel around the module.

    The old wrapper's reducer holds buckets and autograd hooks for parameters that left the
    model (and none for grown ones); it is dropped with the wrapper. The new one broadcasts
    rank 0's parameters (equal on every rank already) and reduces exactly what is trained now.
    """
    strategy = trainer.strategy
    if trainer.world_size > 1 and type(strategy) is DDPStrategy:
        strategy.model = pl_module
        strategy.configure_ddp()
