"""Lightning callbacks: bounded routing scalars for the live loggers, and prediction files."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter

import moelora
from moelora.tracker import LayerStats

METRICS = ("entropy", "max_share", "dead_fraction", "drop_rate")


def short_names(names: list[str]) -> dict[str, str]:
    """Layer names without their common dotted prefix (``bert.encoder.layer.0...`` → ``0...``)."""
    if len(names) < 2:
        return {n: n.rsplit(".", 1)[-1] for n in names}
    parts = [n.split(".") for n in names]
    common = 0
    while all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1
    return {n: ".".join(p[common:]) for n, p in zip(names, parts)}


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


class RoutingLogger(L.Callback):
    """Logs per-layer routing scalars over the last window of training steps, summed across ranks.

    Forwards of validation runs inside ``fit`` (the sanity check included) are left out of the
    window: they route with other settings (SiRA's eval capacity, no expert dropout) and the
    scalars are training ones, as the routing report's windows are.

    Keys are bounded: ``routing/<layer>/<metric>`` for the four metrics in :data:`METRICS`, plus
    their means over layers. At the end of ``fit`` the run's cumulative statistics go to
    ``<log_dir>/routing_stats.json``: those of this ``fit`` (the tracker is not in checkpoints, so
    a resumed run counts from its resume step).

    Args:
        every_n_steps: window length in optimizer steps (default: the trainer's log interval).
        per_layer: log every layer's scalars, not only the means over layers.
    """

    def __init__(self, every_n_steps: int | None = None, per_layer: bool = True) -> None:
        self.every_n_steps, self.per_layer = every_n_steps, per_layer
        self._last: dict[str, LayerStats] = {}
        self._last_step: int | None = None
        self._eval: dict[str, LayerStats] = {}  # validation routing since the last log (left out)
        self._eval_start: dict[str, LayerStats] | None = None  # set while a validation runs
        self.stats_path: Path | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        every = self.every_n_steps or trainer.log_every_n_steps
        step = trainer.global_step
        # Step 0 = no optimizer step yet (accumulating); several batches end on one step then too.
        if step == 0 or step % every != 0 or step == self._last_step:
            return
        self._last_step = step
        totals = moelora.routing_stats(pl_module.model, sync=True).layers  # collective: every rank
        names = short_names(sorted(totals))
        values: dict[str, float] = {}
        for name, now in totals.items():
            window = now.since(self._last[name]) if name in self._last else now
            if name in self._eval:
                window = window.since(self._eval[name])
            summary = window.summary()
            for metric in METRICS:
                if self.per_layer:
                    values[f"routing/{names[name]}/{metric}"] = summary[metric]
                values.setdefault(f"routing/mean_{metric}", 0.0)
                values[f"routing/mean_{metric}"] += summary[metric] / len(totals)
        self._last, self._eval = totals, {}
        if values:
            pl_module.log_dict(values, on_step=True, on_epoch=False, sync_dist=False)

    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.state.fn == "fit":  # collective under DDP: every rank runs validation
            self._eval_start = moelora.routing_stats(pl_module.model, sync=True).layers

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn != "fit" or self._eval_start is None:
            return
        for name, now in moelora.routing_stats(pl_module.model, sync=True).layers.items():
            # a layer first seen in this validation (the sanity check: nothing routed before) ran all of it
            ran = now.since(self._eval_start[name]) if name in self._eval_start else now
            self._eval[name] = self._eval[name].plus(ran) if name in self._eval else ran
        self._eval_start = None

    def on_fit_end(self, trainer, pl_module) -> None:
        totals = moelora.routing_stats(pl_module.model, sync=True).layers
        log_dir = trainer.log_dir  # a collective under DDP: every rank must ask
        if not trainer.is_global_zero or not log_dir:
            return
        self.stats_path = Path(log_dir) / "routing_stats.json"
        self.stats_path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.stats_path, {name: s.to_dict() for name, s in totals.items()})


class RoutingPredictionWriter(BasePredictionWriter):
    """Writes ``<log_dir>/predictions.jsonl``: per example its tokens, prediction and, per layer,
    the experts each real (non-padding) token was routed to."""

    def __init__(self, output: str | None = None) -> None:
        super().__init__(write_interval="epoch")
        self.output = output
        self.path: Path | None = None

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        log_dir = trainer.log_dir  # a collective under DDP: every rank must ask
        if not trainer.is_global_zero:
            return
        self.path = Path(self.output or Path(log_dir or ".") / "predictions.jsonl")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tokenizer = getattr(trainer.datamodule, "tokenizer", None)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with tmp.open("w") as f:
            for batch in predictions:
                for i in range(batch["input_ids"].shape[0]):
                    real = batch["attention_mask"][i].bool()
                    ids = batch["input_ids"][i][real].tolist()
                    pred = batch["predictions"][i]
                    if pred.dim() == 1 and pred.shape[0] == real.shape[0]:
                        pred = pred[real]  # per-token (causal LM): the same positions as tokens and routing
                    row = {"input_ids": ids,
                           "tokens": tokenizer.convert_ids_to_tokens(ids) if tokenizer is not None else None,
                           "prediction": pred.tolist(),
                           "routing": {name: r[i][real].tolist() for name, r in batch["routing"].items()}}
                    f.write(json.dumps(row) + "\n")
        os.replace(tmp, self.path)
