"""Quality part 3: SiRA vs plain LoRA vs MoE-LoRA top-k at matched trainable parameters, trained on
the whole task mix, with capacity-factor and expert-dropout ablations.

Matched parameters: the MoE-LoRA and SiRA have 4 experts of rank 2 (total rank 8, top-2) plus a
router ``Linear(d_in, 4)`` per wrapped linear; a rank-8 LoRA has the same expert parameters, a
rank-10 LoRA the same total (experts + routers: the routers add exactly 25% on MiniLM).
"""

from __future__ import annotations

from typing import Any

import common
import quality as Q

E, R, K = 4, 2, 2
SIRA_DEFAULT = {"capacity_factor": 1.25, "expert_dropout": 0.1}
#: (label, SiRAConfig overrides); the first is the default, the others change one field each.
VARIANTS = [
    ("SiRA (capacity 1.25, expert dropout 0.1: the defaults)", {}),
    ("SiRA, capacity 1.0", {"capacity_factor": 1.0}),
    ("SiRA, no capacity limit", {"capacity_factor": None, "eval_capacity_factor": None}),
    ("SiRA, no expert dropout", {"expert_dropout": 0.0}),
]


def sira_config(seed: int, **overrides):
    import moelora

    fields = dict(target_modules=list(Q.TARGETS), modules_to_save=["classifier"], num_experts=E, top_k=K, rank=R,
                  alpha=2.0 * R, seed=seed, **SIRA_DEFAULT)
    fields.update(overrides)
    return moelora.SiRAConfig(**fields)


def baselines(ctx: Q.Context, seed: int) -> dict[str, dict]:
    """Plain LoRA r=8 and MoE-LoRA top-2 (E=4, r=2) on the mix (shared with parts 4 and 5)."""
    return {
        "LoRA r=8": Q.train_multitask(ctx, seed, "peft_lora_r8", Q.peft_lora_model(8)),
        f"MoE-LoRA top-{K} (E={E}, r={R}, aux 0.01)": Q.train_multitask(
            ctx, seed, "moe_e4_r2_k2", Q.moelora_model(lambda s: Q.moe_config(s, num_experts=E, rank=R, top_k=K))),
    }


def run_seed(ctx: Q.Context, seed: int) -> dict[str, Any]:
    results = dict(baselines(ctx, seed))
    results["LoRA r=10 (total params matched)"] = Q.train_multitask(ctx, seed, "peft_lora_r10", Q.peft_lora_model(10))
    for i, (label, overrides) in enumerate(VARIANTS):
        results[label] = Q.train_multitask(ctx, seed, f"sira_{i}",
                                           Q.moelora_model(lambda s, o=overrides: sira_config(s, **o)))
    print(f"  [sira, seed {seed}] " + ", ".join(f"{k.split(' (')[0]} {v['acc']['mean']:.3f}" for k, v in results.items()),
          flush=True)
    return {"results": results}


def summarize(ctx: Q.Context, seeds: list[dict]) -> tuple[str, dict]:
    rows = _by_setting(seeds)
    return _markdown(ctx, rows, seeds), {"meta": ctx.cache["meta"]["sira"], "budget": Q.budget_payload(ctx),
                                         "experts": E, "rank": R, "top_k": K, "rows": rows}


def _by_setting(seeds: list[dict]) -> dict[str, list[dict]]:
    """``{setting: [per-seed result + seed]}`` from the per-seed rows of a part."""
    rows: dict[str, list[dict]] = {}
    for s in seeds:
        for label, res in s["results"].items():
            rows.setdefault(label, []).append(dict(res, seed=s["seed"]))
    return rows


def _markdown(ctx: Q.Context, rows: dict[str, list[dict]], seeds: list[dict]) -> str:
    b = ctx.budget
    intro = (
        f"All settings train on the six-task mix for {b.mix_steps} steps with a trainable classifier head "
        "(`modules_to_save=[\"classifier\"]`, not counted below) and adapters on query, key, value and dense, "
        "α/r = 2. LoRA: a real PEFT LoRA (`LoraConfig(r, lora_alpha=2r, modules_to_save=[\"classifier\"])`), "
        "rank 8 (the experts' total rank) and rank 10 (the MoE's total trainable parameters, routers included). "
        "MoE-LoRA: "
        f"`MoELoRAConfig(num_experts={E}, rank={R}, top_k={K}, aux_loss_coef=0.01)`. SiRA: "
        f"`SiRAConfig(num_experts={E}, rank={R}, top_k={K})` with its defaults (capacity factor 1.25 in "
        "training and 2.0 in eval, min capacity 4, position drop policy, expert dropout 0.1 on the gate "
        "probabilities, no balancing loss); each ablation row changes one field. Capacity is per batch "
        f"(~{b.batch_size} sequences of ~12 tokens).")
    lines = [Q.header(ctx, "Quality 3: SiRA vs LoRA vs MoE-LoRA (matched parameters) and SiRA ablations",
                      "sira", intro, seeds)]
    lines.append("\n## Accuracy on the mix\n")
    table = []
    for label, runs in rows.items():
        routing = [r.get("routing") for r in runs if r.get("routing")]
        drops = (f"{common.fmt_ms([x['train_drop'] for x in routing], 3)} / "
                 f"{common.fmt_ms([x['eval_drop'] for x in routing], 3)}") if routing else "–"
        table.append((label, [r["acc"] for r in runs], f"{runs[0]['params']:,} | {drops}"))
    lines.append(Q.acc_table(table, extra_header="trainable params | dropped slots train / eval"))
    lines.append("\nAgainst the default SiRA (a difference within the larger seed spread of the two rows is a tie): "
                 + Q.versus(rows, VARIANTS[0][0]) + "\n")
    lines += Q.cost_section(rows)
    return "\n".join(lines) + "\n"
