"""RoutingDashboard: a Lightning callback that records the routing store and writes the report.

Live scalars are not logged here: :class:`~moelora.lightning.RoutingLogger` already sends bounded
per-layer scalars to the loggers. This callback keeps the full matrices (design §3.7, §3.9).
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch

from moelora.layer import MoELoRALinear, wrapped_layers

from .store import RECORDS, STORE_DIR, RoutingStore, record_problem


def _jsonable(values: Any) -> dict[str, Any]:
    """Hyper-parameters as JSON-friendly primitives (anything else becomes its repr)."""
    out = {}
    for k, v in dict(values or {}).items():
        if str(k).startswith("_"):  # LightningCLI internals such as _instantiator
            continue
        out[str(k)] = v if isinstance(v, (str, int, float, bool, type(None), list, dict)) else repr(v)
    return out


def routing_units(model) -> list:
    """The modules whose routing is recorded under their ``name``, in module order: wrapped
    linears with their own router, and block-level routers (MoA blocks, whose experts are the
    block's types; the MoA type linears record nothing themselves)."""
    return [m for m in model.modules() if getattr(m, "records_routing", False)]


def _num_experts(unit) -> int:
    return unit.bank.num_experts if hasattr(unit, "bank") else len(unit.expert_names)


def _expert_names(layer, config: Any) -> list[str] | None:
    """Names a method gives its experts: ``expert_names`` on the unit, its bank or router, else
    the config's provenance list (MeteoRA adapter names); ``None`` = plain indices."""
    e = _num_experts(layer)
    for owner in (layer, getattr(layer, "bank", None), getattr(layer, "router", None)):
        names = getattr(owner, "expert_names", None)
        if names is not None and len(names) == e:
            return [str(n) for n in names]
    provenance = getattr(config, "experts", None) or []
    if len(provenance) == e and all(isinstance(p, dict) and "name" in p for p in provenance):
        return [str(p["name"]) for p in provenance]
    return None


def _move_earlier_run(root: Path) -> None:
    """A fresh ``fit`` (not resuming) whose log dir already holds another run's routing (a fixed
    logger version): that store is moved to ``routing.1`` (the first free number), so the new run's
    windows are not added to the old ones and nothing is lost."""
    if not (root / RECORDS).is_file() or (root / RECORDS).stat().st_size == 0:
        return
    n = 1
    while root.with_name(f"{root.name}.{n}").exists():
        n += 1
    target = root.with_name(f"{root.name}.{n}")
    root.rename(target)
    warnings.warn(f"RoutingDashboard: {root.parent} already held the routing of an earlier run, which this fresh "
                  f"fit would have added to; it was moved to {target}. Resume with --ckpt_path to continue a "
                  "run, or give each run its own log dir.", UserWarning, stacklevel=2)


class RoutingDashboard(L.Callback):
    """Write routing statistics to ``<log_dir>/routing/`` while running, and the HTML report at
    the end of ``fit``.

    Every ``every_n_steps`` optimizer steps (and at each validation/test run) the tracker's
    statistics since the previous record are summed across ranks and appended as one window;
    a few texts of the first validation batch (and, during training, of the current batch every
    ``sample_every_n_steps``) are kept with each token's experts and gate weights.

    Args:
        every_n_steps: train window length in optimizer steps (default: the trainer's
            ``log_every_n_steps``).
        num_samples: texts per token-level sample (0 = no samples).
        max_tokens: tokens kept per sample text.
        sample_every_n_steps: least steps between two training samples (default: 10 windows).
        report: write the report at the end of ``fit``.
        report_path: the report file (default: ``<log_dir>/routing_report.html``).
    """

    def __init__(self, every_n_steps: int | None = None, num_samples: int = 6, max_tokens: int = 48,
                 sample_every_n_steps: int | None = None, report: bool = True,
                 report_path: str | None = None) -> None:
        for name, v in (("every_n_steps", every_n_steps), ("sample_every_n_steps", sample_every_n_steps)):
            if v is not None and v < 1:
                raise ValueError(f"dashboard.{name}={v} is invalid: expected an integer >= 1 (or null)")
        if num_samples < 0 or max_tokens < 1:
            raise ValueError(f"dashboard.num_samples={num_samples} / max_tokens={max_tokens} are invalid: "
                             "expected num_samples >= 0 and max_tokens >= 1")
        self.every_n_steps, self.num_samples, self.max_tokens = every_n_steps, num_samples, max_tokens
        self.sample_every_n_steps, self.report, self.report_target = sample_every_n_steps, report, report_path
        self.store: RoutingStore | None = None
        self.log_dir: Path | None = None
        self.report_path: Path | None = None
        self._layers: list[MoELoRALinear] = []
        self._units: list = []  # routing_units(): what the statistics and samples are keyed by
        self._last: dict = {}
        self._last_step = -1
        self._last_sample_step: int | None = None

    # ------------------------------------------------------------------ set-up
    def setup(self, trainer, pl_module, stage: str) -> None:
        log_dir = trainer.log_dir  # a collective under DDP: every rank must ask
        self._layers = wrapped_layers(pl_module)
        self._units = routing_units(pl_module)
        if not self._layers:
            warnings.warn("RoutingDashboard: the LightningModule has no moelora layers; nothing is recorded.")
            return
        self._last = self._stats()  # a baseline: forwards before this run are not recorded
        self._last_step = -1
        if not trainer.is_global_zero:
            return
        self.log_dir = Path(log_dir or trainer.default_root_dir)
        if self.store is None or self.store.root != self.log_dir / STORE_DIR:
            if stage == "fit" and getattr(trainer, "ckpt_path", None) is None:
                _move_earlier_run(self.log_dir / STORE_DIR)
            self.store = RoutingStore(self.log_dir / STORE_DIR)
        self.store.write_meta(self._meta(trainer, pl_module, stage))

    def _meta(self, trainer, pl_module, stage: str) -> dict[str, Any]:
        from moelora.lightning.callbacks import short_names

        config = self._layers[0]._state.config
        names = short_names([unit.name for unit in self._units])
        dm = getattr(trainer, "datamodule", None)
        tasks = getattr(dm, "task_names", None) or (list(getattr(dm, "suite_tasks", ()))
                                                    if getattr(dm, "num_tasks", 0) else None)
        hparams = {k: v for k, v in _jsonable(getattr(pl_module, "hparams", {})).items() if k != "method"}
        trainer_cfg = {"max_steps": trainer.max_steps, "max_epochs": trainer.max_epochs,
                       "accumulate_grad_batches": trainer.accumulate_grad_batches,
                       "precision": str(trainer.precision), "strategy": type(trainer.strategy).__name__,
                       "world_size": trainer.world_size, "log_every_n_steps": trainer.log_every_n_steps,
                       "val_check_interval": trainer.val_check_interval}
        old = {}
        if self.store.meta_path.is_file():  # a later validate/test in the same log dir keeps the start time
            import json

            old = json.loads(self.store.meta_path.read_text())
        return {
            "created": old.get("created", time.strftime("%Y-%m-%d %H:%M:%S")),
            "stages": sorted(set(old.get("stages", [])) | {stage}),
            "layers": [{"name": unit.name, "label": names[unit.name], "num_experts": _num_experts(unit),
                        "top_k": getattr(getattr(unit, "router", None), "top_k", None),
                        "experts": _expert_names(unit, config)}
                       for unit in self._units],
            "tasks": [str(t) for t in tasks] if tasks else None,
            "config": {"method": config.to_dict() if hasattr(config, "to_dict") else _jsonable(vars(config)),
                       "model": hparams, "data": _jsonable(getattr(dm, "hparams", {})) if dm is not None else {},
                       "trainer": trainer_cfg,
                       "dashboard": {"every_n_steps": self.every_n_steps or trainer.log_every_n_steps,
                                     "num_samples": self.num_samples, "max_tokens": self.max_tokens}},
        }

    # ------------------------------------------------------------------ windows
    def _stats(self) -> dict:
        return self._layers[0]._state.tracker.reduced().layers  # summed across ranks: a collective

    def _flush(self, trainer, stage: str) -> None:
        """Append everything routed since the last record as one ``stage`` window (every rank calls)."""
        if not self._layers:
            return
        now = self._stats()
        window = {n: s.since(self._last[n]) if n in self._last else s for n, s in now.items()}
        self._last = now
        broken = [n for n, s in window.items() if not bool(torch.isfinite(s.prob_sum).all())]
        if broken:  # the same on every rank (reduced): all of them stop
            raise FloatingPointError(
                f"router probabilities of {broken[:3]} are NaN/inf in the {stage} window ending at step "
                f"{trainer.global_step}: the adapter's weights or the activations stopped being finite (see "
                "train/loss). With precision='16-true', Adam's eps=1e-8 rounds to 0 in float16 and a zero "
                "gradient gives 0/0; use '16-mixed', 'bf16-mixed' or 'bf16-true', or a larger eps.")
        if self.store is not None and trainer.is_global_zero:
            self.store.append_window(stage, trainer.global_step, window, epoch=trainer.current_epoch)
            gates = getattr(self._layers[0]._state.tracker, "gates", None)  # per-head weights (WeightLoRA ω)
            record = {"kind": "gates", "stage": stage, "step": int(trainer.global_step), "layers": gates}
            if gates and stage == "train" and record_problem(record) is None:  # (non-finite ω: not recorded)
                self.store.append(record)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        every = self.every_n_steps or trainer.log_every_n_steps
        step = trainer.global_step
        # Under gradient accumulation several batches end on the same step (and the first ones on
        # step 0, before any optimizer step): record each optimizer step's window once.
        if step == 0 or step % every != 0 or step == self._last_step:
            return
        self._last_step = step
        self._flush(trainer, "train")
        due = self.sample_every_n_steps or 10 * every
        if self._last_sample_step is None or step - self._last_sample_step >= due:
            self._sample(trainer, batch, "train")

    def _eval_start(self, trainer) -> None:
        self._flush(trainer, "train")  # what trained since the last window stays a train window

    def _eval_end(self, trainer, stage: str) -> None:
        self._flush(trainer, "sanity" if trainer.sanity_checking else stage)

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._eval_start(trainer)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self._eval_end(trainer, "val")

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._eval_start(trainer)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._eval_end(trainer, "test")

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == 0 and dataloader_idx == 0 and not trainer.sanity_checking:
            self._sample(trainer, batch, "val")

    # ------------------------------------------------------------------ samples
    def _sample(self, trainer, batch: Any, stage: str) -> None:
        """Keep the first texts of ``batch`` with each token's experts and weights (rank 0)."""
        if self.store is None or not trainer.is_global_zero or self.num_samples == 0 or not isinstance(batch, dict) \
                or "input_ids" not in batch:
            return
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        shape = ids.shape
        layers = [m for m in self._units if m.last_expert_ids is not None
                  and m.last_expert_ids.shape[0] == ids.numel()]  # only layers that saw these tokens
        if not layers:
            return
        rows = self._pick_rows(batch)
        tokenizer = getattr(getattr(trainer, "datamodule", None), "tokenizer", None)
        texts = []
        for i in rows:
            real = mask[i].bool() if mask is not None else torch.ones(shape[1], dtype=torch.bool)
            positions = real.nonzero().flatten()[: self.max_tokens].cpu()
            token_ids = ids[i].cpu()[positions].tolist()
            tokens = tokenizer.convert_ids_to_tokens(token_ids) if tokenizer is not None else [str(t) for t in token_ids]
            routing = {}
            for m in layers:
                e = m.last_expert_ids.view(*shape, -1)[i].cpu()[positions]
                w = m.last_weights.view(*shape, -1)[i].float().cpu()[positions] if m.last_weights is not None \
                    else torch.ones_like(e, dtype=torch.float32)
                routing[m.name] = {"experts": e.tolist(), "weights": [[round(x, 3) for x in r] for r in w.tolist()]}
            texts.append({"tokens": [str(t) for t in tokens], "routing": routing,
                          "task": int(batch["task_ids"][i]) if "task_ids" in batch else None,
                          "label": int(batch["labels"][i]) if "labels" in batch and batch["labels"].dim() == 1 else None})
        self.store.append({"kind": "sample", "stage": stage, "step": int(trainer.global_step), "texts": texts})
        if stage == "train":
            self._last_sample_step = trainer.global_step

    def _pick_rows(self, batch: dict) -> list[int]:
        """Up to ``num_samples`` rows, one per task first (so every task shows), then in order."""
        n = batch["input_ids"].shape[0]
        if "task_ids" not in batch:
            return list(range(min(n, self.num_samples)))
        rows, seen = [], set()
        for i, t in enumerate(batch["task_ids"].tolist()):
            if t not in seen:
                seen.add(t)
                rows.append(i)
        rows += [i for i in range(n) if i not in rows]
        return sorted(rows[: self.num_samples])

    # ------------------------------------------------------------------ end
    def on_fit_end(self, trainer, pl_module) -> None:
        self._flush(trainer, "train")
        if self.report and self.store is not None and trainer.is_global_zero:
            from .report import build_report

            self.report_path = build_report(self.store.root, self.report_target)
