"""Quality part 4: MoA (heterogeneous Mixture of Adapters), soft and sparse, vs homogeneous
MoE-LoRA top-k vs plain LoRA on the task mix: accuracy and trainable parameters.

MoA places one LoRA per *type* (q, k, v, o, down by default) plus a parallel adapter beside each
FFN, weighted per token by a sigmoid router per block (``moelora.MoAConfig``). The LoRA and
MoE-LoRA rows are the same runs as in part 3 (shared under ``--part all``).
"""

from __future__ import annotations

from typing import Any

import common
import quality as Q
import quality_sira as S

MOA_RANK, MOA_ALPHA = 8, 16.0   # rank as the official runs (8); α/r = 2 like every other method here


def moa_config(seed: int, variant: str):
    import moelora

    return moelora.MoAConfig(variant=variant, rank=MOA_RANK, alpha=MOA_ALPHA, modules_to_save=["classifier"],
                             seed=seed)


def _activation(model) -> dict[str, Any]:
    """Mean router weight and activation rate per type over the evaluation (MoA stats)."""
    import moelora

    stats = moelora.moa_stats(model)
    per_type: dict[str, list[tuple[float, float]]] = {}
    for block in stats.values():
        for t, s in block.items():
            per_type.setdefault(t, []).append((s["mean_weight"], s["activation_rate"]))
    return {t: {"mean_weight": sum(w for w, _ in v) / len(v), "activation_rate": sum(a for _, a in v) / len(v)}
            for t, v in per_type.items()}


def run_seed(ctx: Q.Context, seed: int) -> dict[str, Any]:
    import moelora

    if not hasattr(moelora, "MoAConfig"):
        raise Q.PartUnavailable("moelora.MoAConfig is not available in this checkout (MoA, issue 6)")
    results = {}
    for variant in ("soft", "sparse"):
        results[f"MoA {variant}"] = Q.train_multitask(
            ctx, seed, f"moa_{variant}", Q.moelora_model(lambda s, v=variant: moa_config(s, v)),
            after_eval=lambda m: {"moa_types": _activation(m)})
    results.update(S.baselines(ctx, seed))
    print(f"  [moa, seed {seed}] " + ", ".join(f"{k.split(' (')[0]} {v['acc']['mean']:.3f}" for k, v in results.items()),
          flush=True)
    return {"results": results}


def summarize(ctx: Q.Context, seeds: list[dict]) -> tuple[str, dict]:
    rows = S._by_setting(seeds)
    return _markdown(ctx, rows, seeds), {"meta": ctx.cache["meta"]["moa"], "budget": Q.budget_payload(ctx),
                                         "moa": {"rank": MOA_RANK, "alpha": MOA_ALPHA}, "rows": rows}


def _markdown(ctx: Q.Context, rows: dict[str, list[dict]], seeds: list[dict]) -> str:
    b = ctx.budget
    intro = (
        f"All settings train on the six-task mix for {b.mix_steps} steps with a trainable classifier head (not "
        f"counted below). MoA: `MoAConfig(variant=\"soft\"|\"sparse\", rank={MOA_RANK}, alpha={MOA_ALPHA:g})`, "
        "otherwise the official defaults: LoRA experts on q, k, v, o (attention output) and down (FFN output) "
        "of every block, a parallel adapter (size 16) beside every FFN, a SwiGLU router (factor 4) with sigmoid "
        "weights reading the block input; sparse: a type runs for a token only where its weight ≥ the "
        "token's threshold σ(w·x+b)·0.5 (threshold network untrained, as the official code). LoRA: a PEFT LoRA of "
        "rank 8 on query, key, value and every dense (incl. the pooler). MoE-LoRA: 4 experts of rank 2, top-2, on the "
        "same modules (both as in part 3). α/r = 2 everywhere.")
    lines = [Q.header(ctx, "Quality 4: MoA soft / sparse vs MoE-LoRA vs LoRA", "moa", intro, seeds)]
    lines.append("\n## Accuracy on the mix\n")
    table = [(label, [r["acc"] for r in runs], f"{runs[0]['params']:,}") for label, runs in rows.items()]
    lines.append(Q.acc_table(table, extra_header="trainable params"))
    sparse = rows.get("MoA sparse", [])
    acts = [r.get("moa_types") for r in sparse if r.get("moa_types")]
    if acts:
        types = list(acts[0])
        lines.append("\n## Sparse MoA: share of tokens each type ran for (evaluation)\n")
        lines.append("| " + " | ".join(types) + " |\n|" + "---|" * len(types))
        lines.append("| " + " | ".join(common.fmt_ms([a[t]["activation_rate"] for a in acts], 2) for t in types) + " |")
    if "LoRA r=8" in rows:
        lines.append("\n" + Q.versus(rows, "LoRA r=8") + "\n")
    lines += Q.cost_section(rows)
    return "\n".join(lines) + "\n"
