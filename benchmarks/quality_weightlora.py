"""Quality part 5 (issue 11's benchmark entry): WeightLoRA keeping about a quarter of the heads, and
WeightLoRA+, vs LoRA on all heads, on the task mix: accuracy and trainable parameters.

A "head" is one wrapped linear (query, key, value or a dense of MiniLM). WeightLoRA trains a
scalar ω per head, keeps it K-sparse by iterative hard thresholding during warm-up, then
disconnects the heads with ω = 0; WeightLoRA+ re-spends the freed parameters on higher ranks
of the kept heads (``moelora.WeightLoRAConfig``, ``WeightLoRAController``).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import common
import quality as Q
import quality_sira as S


def _weightlora_module():
    import moelora

    try:
        return moelora.weightlora
    except AttributeError:
        from moelora.methods import weightlora

        return weightlora


def num_heads(seed: int = 0) -> int:
    """Wrapped linears of the LoRA baseline on MiniLM (query, key, value, dense: 37)."""
    import moelora

    model = moelora.inject(common.fresh_model(seed), Q.lora_config(seed))
    return len(moelora.wrapped_layers(model))


def _kind(name: str) -> str:
    for part, label in (("attention.self.query", "query"), ("attention.self.key", "key"),
                        ("attention.self.value", "value"), ("attention.output.dense", "attn-out dense"),
                        ("intermediate.dense", "FFN-up dense"), ("output.dense", "FFN-down dense"),
                        ("pooler.dense", "pooler dense")):
        if part in name:
            return label
    return name


def run_seed(ctx: Q.Context, seed: int) -> dict[str, Any]:
    import moelora

    if not hasattr(moelora, "WeightLoRAConfig"):
        raise Q.PartUnavailable("moelora.WeightLoRAConfig is not available in this checkout (WeightLoRA, issue 11)")
    wl = _weightlora_module()
    heads = num_heads()
    keep = max(1, round(heads / 4))
    warmup = max(1, ctx.budget.mix_steps // 3)
    results = {}
    for plus in (False, True):
        label = f"WeightLoRA{'+' if plus else ''} (K={keep} of {heads} heads)"

        def config(s, plus=plus):
            return moelora.WeightLoRAConfig(target_modules=list(Q.TARGETS), modules_to_save=["classifier"],
                                            rank=8, alpha=16.0, keep=keep, warmup_steps=warmup, plus=plus, seed=s)

        holder: dict[str, Any] = {}

        def hook(step, model, opt, holder=holder):
            if "ctl" not in holder:
                holder["ctl"] = wl.WeightLoRAController(model)
                holder["start_params"] = common.count_trainable(model, exclude_head=True)
            event = holder["ctl"].step(opt)
            if event in ("disconnect", "expand"):
                holder["event_step"] = step

        def after(model, holder=holder):
            cfg = wl.weightlora_config(model)
            kept = [layer.name for layer in wl.gated_layers(model)]
            ranks = sorted({int(r) for layer in wl.gated_layers(model) for r in layer.bank.ranks})
            return {"warmup_params": holder.get("start_params"), "stage": cfg.stage, "kept": kept,
                    "kept_ranks": ranks, "disconnected_at": holder.get("event_step")}

        results[label] = Q.train_multitask(ctx, seed, f"weightlora_{'plus' if plus else 'plain'}",
                                           Q.moelora_model(config), step_hook=hook,
                                           params_fn=lambda m: wl.param_groups(m), after_train=after)
    results["LoRA r=8 (all heads)"] = S.baselines(ctx, seed)["LoRA r=8"]
    print(f"  [weightlora, seed {seed}] " + ", ".join(f"{k} {v['acc']['mean']:.3f}" for k, v in results.items()),
          flush=True)
    return {"results": results, "heads": heads, "keep": keep, "warmup_steps": warmup}


def summarize(ctx: Q.Context, seeds: list[dict]) -> tuple[str, dict]:
    rows = S._by_setting(seeds)
    s0 = seeds[0]
    return _markdown(ctx, rows, seeds), {
        "meta": ctx.cache["meta"]["weightlora"], "budget": Q.budget_payload(ctx), "heads": s0["heads"],
        "keep": s0["keep"], "warmup_steps": s0["warmup_steps"], "rows": rows}


def _markdown(ctx: Q.Context, rows: dict[str, list[dict]], seeds: list[dict]) -> str:
    b = ctx.budget
    heads, keep, warmup = seeds[0]["heads"], seeds[0]["keep"], seeds[0]["warmup_steps"]
    intro = (
        f"All settings train on the six-task mix for {b.mix_steps} steps with a trainable classifier head (not "
        "counted below), rank 8, α 16, on query, key, value and dense (the heads). WeightLoRA: "
        f"`WeightLoRAConfig(keep={keep}, warmup_steps={warmup}, plus=False|True)` (K ≈ a quarter of the {heads} "
        "heads; other fields at their defaults: ω starts at 1, hard thresholding after every step from step "
        f"{max(1, warmup // 2)} to {warmup}, then the heads with ω = 0 are disconnected; WeightLoRA+ then raises "
        "the kept heads' rank to re-spend the freed parameters), driven by `WeightLoRAController.step(opt)` after "
        "every optimizer step, ω in its own parameter group at the LoRA lr (`weightlora.param_groups`). "
        "LoRA: a PEFT LoRA of rank 8 on every head (the same run as parts 3 and 4).")
    lines = [Q.header(ctx, "Quality 5: WeightLoRA / WeightLoRA+ vs LoRA on all heads", "weightlora", intro, seeds)]
    lines.append("\n## Accuracy on the mix\n")
    table = []
    for label, runs in rows.items():
        warm = runs[0].get("warmup_params")
        params = f"{runs[0]['params']:,}" + (f" (warm-up: {warm:,})" if warm else "")
        table.append((label, [r["acc"] for r in runs], params))
    lines.append(Q.acc_table(table, extra_header="trainable params after training"))
    for label, runs in rows.items():
        if runs[0].get("kept") is None:
            continue
        kinds = Counter(_kind(n) for r in runs for n in r["kept"])
        ranks = sorted({x for r in runs for x in r.get("kept_ranks", [])})
        lines.append(f"\n{label}: kept heads over all seeds by kind: "
                     + ", ".join(f"{k} {v}" for k, v in kinds.most_common())
                     + f"; ranks of the kept heads: {ranks}; stage at the end: {runs[0].get('stage')}.")
    if "LoRA r=8 (all heads)" in rows:
        lines.append("\n" + Q.versus(rows, "LoRA r=8 (all heads)") + "\n")
    lines += Q.cost_section(rows)
    return "\n".join(lines) + "\n"
