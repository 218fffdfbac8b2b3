"""One PEFT LoRA adapter per task of the bundled suite: the experts ``configs/meteora.yaml`` fuses.

    moelora suite-loras -o loras                   # loras/topic, loras/compare, ... (PEFT format)
    moelora fit -c configs/meteora.yaml            # fuse them as routed experts, train the gates

Each adapter is trained on its task alone (a plain rank-r LoRA: moelora with one expert and
top-1, which equals a PEFT LoRA exactly, tests/test_peft_parity.py) together with a throwaway
classification head, then written by :func:`moelora.export_lora_adapters` as a standard PEFT
directory (``adapter_config.json`` + ``adapter_model.safetensors``), loadable with
``peft.PeftModel.from_pretrained``. The head is not part of a PEFT LoRA and is not exported: the
fused model trains its own head with the gates, as MeteoRA on a classifier must.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from moelora.data.suite import TASKS, generate
from moelora.paths import make_output_dir

DEFAULT_TARGETS = ("query", "key", "value", "dense")


def train_task_lora(task: str, *, backbone: str = "minilm", steps: int = 150, batch_size: int = 16, lr: float = 1e-3,
                    rank: int = 8, alpha: float = 16.0, target_modules: Sequence[str] = DEFAULT_TARGETS,
                    examples: int = 400, seed: int = 0) -> torch.nn.Module:
    """Train a rank-``rank`` LoRA (+ head) on one suite task; returns the moelora-wrapped classifier.

    Args:
        task: a suite task name (``moelora.data.suite.TASKS``).
        steps / batch_size / lr: AdamW training budget (examples cycle in a fixed shuffled order).
        examples: generated training examples for the task.
        seed: seeds the data, the LoRA init and the head.
    """
    import moelora
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from moelora.lightning.data import resolve_path

    hf_logging.set_verbosity_error()  # the fresh head's "newly initialized" report is expected here
    path = resolve_path(backbone)
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    moelora.inject(model, moelora.MoELoRAConfig(
        target_modules=list(target_modules), modules_to_save=["classifier"], num_experts=1, top_k=1,
        rank=rank, alpha=alpha, aux_loss_coef=0.0, seed=seed))
    data = generate(examples, seed=seed, tasks=(task,))
    order = torch.randperm(len(data["text"]), generator=torch.Generator().manual_seed(seed)).tolist()
    texts = [data["text"][i] for i in order]
    labels = torch.tensor([data["label"][i] for i in order])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    model.train()
    for step in range(steps):
        lo = (step * batch_size) % len(texts)
        batch = tokenizer(texts[lo:lo + batch_size], padding=True, return_tensors="pt")
        model(**batch, labels=labels[lo:lo + batch_size]).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model.eval()


def make_suite_loras(out_dir: str | Path, *, tasks: Sequence[str] = TASKS, overwrite: bool = False,
                     **train_kwargs) -> dict[str, Path]:
    """Write ``out_dir/<task>/`` as a PEFT LoRA directory for every task in ``tasks``.

    The task order of the suite is the gate order ``configs/meteora.yaml`` expects (gate i is
    supervised by task id i). ``train_kwargs`` go to :func:`train_task_lora`.

    Raises:
        ValueError: an unknown task; FileExistsError: ``out_dir/<task>`` exists and ``overwrite``
        is false. Both are checked before any training; each adapter directory appears whole
        (written to a temporary directory, then renamed).
    """
    from moelora.lora_export import export_lora_adapters

    out = Path(out_dir)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ValueError(f"unknown suite task(s) {unknown or list(tasks)}; tasks are {list(TASKS)}.")
    clash = [str(out / t) for t in tasks if (out / t).exists()]
    if clash and not overwrite:
        raise FileExistsError(f"{clash} already exist; pass overwrite=True (--overwrite) or pick another directory.")
    make_output_dir(out, "suite-loras output")
    written = {}
    for task in tasks:
        model = train_task_lora(task, **train_kwargs)
        with tempfile.TemporaryDirectory(dir=out, prefix=f".{task}-") as tmp:
            exported = export_lora_adapters(model, tmp)["expert_0"]
            final = out / task
            if final.exists():
                shutil.rmtree(final)
            exported.rename(final)
        written[task] = final
        print(f"  {task}: {final}")
    return written


def suite_loras_main(argv: list[str] | None = None) -> int:
    """``moelora suite-loras``: train and export one PEFT LoRA per suite task."""
    p = argparse.ArgumentParser(prog="moelora suite-loras", description=__doc__.splitlines()[0])
    p.add_argument("-o", "--output", required=True, help="directory to write <task>/ adapter directories into")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), help=f"suite tasks (default: all of {list(TASKS)})")
    p.add_argument("--backbone", default="minilm", help="base model name or path (default: the bundled MiniLM)")
    p.add_argument("--steps", type=int, default=150, help="training steps per task (default 150)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--target-modules", nargs="+", default=list(DEFAULT_TARGETS))
    p.add_argument("--examples", type=int, default=400, help="training examples per task (default 400)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace adapter directories already there")
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "rank", "examples"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    try:
        make_suite_loras(args.output, tasks=args.tasks, overwrite=args.overwrite, backbone=args.backbone,
                         steps=args.steps, batch_size=args.batch_size, lr=args.lr, rank=args.rank, alpha=args.alpha,
                         target_modules=args.target_modules, examples=args.examples, seed=args.seed)
    except (ValueError, FileExistsError) as err:
        print(f"moelora suite-loras: {err}", file=sys.stderr)
        return 2
    return 0
