"""Checks of a user's text dataset, run once in ``TextDataModule.setup`` so bad rows fail there,
naming the column and the row, instead of mid-training in the collate function or the loss (or,
worse, training on silently altered labels)."""

from __future__ import annotations

from typing import Any


class DataError(ValueError):
    """Data the data module refuses: a file, a split, a column or a row, named in the message.
    Raised in ``setup``, inside ``trainer.fit``; the ``moelora`` CLI prints it as one line."""


class DataFileNotFoundError(DataError, FileNotFoundError):
    """A data file that does not exist."""


def _integral(value: Any) -> int | None:
    """``value`` as an int when it is one exactly (bool, int, an integral float, a digit string)."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return None


def _first_bad(values, ok) -> tuple[int, Any] | None:
    return next(((i, v) for i, v in enumerate(values) if not ok(v)), None)


def check_rows(name: str, ds, *, text_column: str, label_column: str | None, task_column: str | None,
               num_labels: int | None) -> None:
    """Raise a :class:`DataError` naming ``data.<name>``'s column and row when a text is not a string,
    a label is not a whole number in ``[0, num_labels)`` (``num_labels`` when known) or a task id
    is not a whole number. ``label_column=None`` for causal LM."""
    bad = _first_bad(ds[text_column], lambda v: isinstance(v, str))
    if bad is not None:
        raise DataError(f"data.{name}: row {bad[0]} of column {text_column!r} is {bad[1]!r}, not a string (an empty "
                        f"CSV cell reads as None). Fill or drop such rows.")
    if label_column is not None:
        labels = ds[label_column]
        bad = _first_bad(labels, lambda v: _integral(v) is not None)
        if bad is not None:
            raise DataError(f"data.{name}: row {bad[0]} of column {label_column!r} is {bad[1]!r}; labels must be whole "
                            f"numbers 0..num_labels-1 (map class names such as 'pos'/'neg' to ids first).")
        if num_labels is not None:
            bad = _first_bad(labels, lambda v: 0 <= _integral(v) < num_labels)
            if bad is not None:
                raise DataError(f"data.{name}: row {bad[0]} of column {label_column!r} is {bad[1]!r}, outside "
                                f"[0, {num_labels}) for model.num_labels={num_labels}.")
    if task_column and task_column in ds.column_names:
        bad = _first_bad(ds[task_column], lambda v: v is None or _integral(v) is not None)
        if bad is not None:
            raise DataError(f"data.{name}: row {bad[0]} of column {task_column!r} is {bad[1]!r}; task ids must be whole "
                            f"numbers (negative = no task). Set data.task_column=null to ignore the column.")
