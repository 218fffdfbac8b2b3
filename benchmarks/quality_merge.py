"""Quality part 2: merging per-task adapters into one (FlyLoRA's multi-task merging claim).

Per task, one FlyLoRA adapter and one vanilla PEFT LoRA adapter (the same ones part 1 fuses),
each trained on its task alone. Then one merged adapter per method, evaluated on every task:

- FlyLoRA: ``moelora.merge_flylora`` (mean of B; A is the same frozen sparse random matrix for
  every task because it is drawn from the seed and the module name).
- vanilla LoRA, mean of the updates: ``add_weighted_adapter(combination_type="cat", weights=1/6)``,
  i.e. ΔW = (1/6)·Σ_i s·B_i·A_i exactly (the same operation FlyLoRA's merge is on ΔW).
- vanilla LoRA, PEFT ``linear``: factor-wise average, A = Σ √(s/6)·A_i, B = Σ √(s/6)·B_i.
- vanilla LoRA, PEFT ``ties``: TIES on the factors (density 0.2, sign by total, weights 1).

Retained accuracy of a task = merged accuracy on the task / that task's own adapter's accuracy.
"""

from __future__ import annotations

from typing import Any

import common
import quality as Q

FLY_RANK, FLY_K = 16, 4      # 16 rank-1 experts, 4 active per token; α/r = 2 like the LoRA (α = 32)
TIES_DENSITY = 0.2           # the TIES paper's top-20% (also PEFT's documented example value)


def fly_config(seed: int):
    import moelora

    return moelora.FlyLoRAConfig(target_modules=list(Q.TARGETS), rank=FLY_RANK, top_k=FLY_K,
                                 alpha=2.0 * FLY_RANK, seed=seed)


def flylora_adapters(ctx: Q.Context, seed: int) -> dict[str, Any]:
    """One FlyLoRA adapter per task on the seed's base model (frozen shared head), saved."""

    def build():
        import moelora

        def make(tid: int):
            return moelora.inject(common.fresh_model(seed), fly_config(seed))

        return Q.train_task_adapters(ctx, seed, make=make, save=moelora.save_adapter, tag="fly")

    return ctx.memo(("fly_task_adapters", seed), build)


def _merged_flylora(ctx: Q.Context, seed: int, dirs: dict[str, str]):
    import moelora

    out = ctx.tmp / f"fly_seed{seed}" / "_merged"
    moelora.merge_flylora(list(dirs.values()), out_dir=out)
    return moelora.load_adapter(common.fresh_model(seed), out, trainable=False)


def _merged_peft(seed: int, dirs: dict[str, str], how: str):
    import peft

    names = list(dirs)
    model = peft.PeftModel.from_pretrained(common.fresh_model(seed), dirs[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(dirs[name], adapter_name=name)
    n = len(names)
    if how == "mean":
        model.add_weighted_adapter(names, [1.0 / n] * n, "merged", combination_type="cat")
    elif how == "linear":
        model.add_weighted_adapter(names, [1.0 / n] * n, "merged", combination_type="linear")
    elif how == "ties":
        model.add_weighted_adapter(names, [1.0] * n, "merged", combination_type="ties", density=TIES_DENSITY,
                                   majority_sign_method="total")
    else:
        raise ValueError(how)
    model.set_adapter("merged")
    return model


def run_seed(ctx: Q.Context, seed: int) -> dict[str, Any]:
    from moelora.data.suite import TASKS

    _, test = ctx.data(seed)
    fly = flylora_adapters(ctx, seed)
    lora = Q.task_adapters(ctx, seed)
    single = {"flylora": fly["acc"], "lora": lora["acc"]}
    merged = {"FlyLoRA mean of B (merge_flylora)": ("flylora", common.evaluate(_merged_flylora(ctx, seed, fly["dirs"]),
                                                                                ctx.tok, test))}
    for how, label in (("mean", "LoRA mean of ΔW (PEFT cat, w=1/6)"), ("linear", "LoRA PEFT linear (w=1/6)"),
                       ("ties", f"LoRA PEFT ties (density {TIES_DENSITY}, w=1)")):
        merged[label] = ("lora", common.evaluate(_merged_peft(seed, lora["dirs"], how), ctx.tok, test))
    row = {"merged": {}, "retained": {}, "params": {"flylora": fly["params"], "lora": lora["params"]},
           "seconds": {"flylora_adapters": round(fly["seconds"], 1), "lora_adapters": round(lora["seconds"], 1)}}
    for label, (kind, acc) in merged.items():
        row["merged"][label] = acc
        ret = {t: acc[t] / single[kind][t] if single[kind][t] else float("nan") for t in TASKS}
        ret["mean"] = sum(ret[t] for t in TASKS) / len(TASKS)
        row["retained"][label] = ret
    row["single"] = {kind: dict(acc, mean=sum(acc[t] for t in TASKS) / len(TASKS)) for kind, acc in single.items()}
    print(f"  [merge, seed {seed}] retained: " + ", ".join(f"{k}: {v['mean']:.3f}" for k, v in row["retained"].items()),
          flush=True)
    return row


def summarize(ctx: Q.Context, seeds: list[dict]) -> tuple[str, dict]:
    return _markdown(ctx, seeds), {"meta": ctx.cache["meta"]["merge"], "budget": Q.budget_payload(ctx),
                                   "flylora": {"rank": FLY_RANK, "top_k": FLY_K}, "ties_density": TIES_DENSITY,
                                   "seeds": seeds}


def _markdown(ctx: Q.Context, seeds: list[dict]) -> str:
    b = ctx.budget
    s0 = seeds[0]
    intro = (
        f"Per task: a FlyLoRA adapter (`FlyLoRAConfig(rank={FLY_RANK}, top_k={FLY_K}, alpha={2 * FLY_RANK})`, "
        f"{s0['params']['flylora']:,} trainable: B only) and a vanilla PEFT LoRA (r=8, α=16, "
        f"{s0['params']['lora']:,} trainable), both on query, key, value and dense, each trained "
        f"{b.task_steps} steps on its task alone over the seed's base model (MiniLM + a frozen seeded head "
        "shared by every adapter). The six adapters of a method are then merged into one and evaluated on "
        "every task. Vanilla merges: mean of the updates ΔW (`add_weighted_adapter(..., combination_type=\"cat\", "
        "weights=[1/6]*6)`, exact), PEFT `linear` (averages the A and B factors separately, so cross terms "
        f"B_i·A_j appear), PEFT `ties` on the factors (density {TIES_DENSITY}, majority sign by total, weights 1). "
        "Merge settings are not tuned.")
    lines = [Q.header(ctx, "Quality 2: merging per-task adapters (FlyLoRA vs vanilla LoRA)", "merge", intro, seeds)]
    lines.append("\n## Single-task adapters (each on its own task)\n")
    lines.append(Q.acc_table([("FlyLoRA, own task", [s["single"]["flylora"] for s in seeds], ""),
                              ("LoRA, own task", [s["single"]["lora"] for s in seeds], "")]))
    lines.append("\n## Merged adapter accuracy on every task\n")
    labels = list(s0["merged"])
    lines.append(Q.acc_table([(lab, [s["merged"][lab] for s in seeds], "") for lab in labels]))
    lines.append("\n## Retained accuracy (merged / single-task adapter, per task)\n")
    lines.append(Q.acc_table([(lab, [s["retained"][lab] for s in seeds], "") for lab in labels]))
    fly = common.mean_spread([s["retained"][labels[0]]["mean"] for s in seeds])[0]
    best_label, best = max(((lab, common.mean_spread([s["retained"][lab]["mean"] for s in seeds])[0])
                            for lab in labels[1:]), key=lambda x: x[1])
    verdict = ("FlyLoRA retains more" if fly > best else "FlyLoRA does **not** retain more")
    lines.append(f"\n{verdict} than the best vanilla merge here: {fly:.3f} vs {best:.3f} ({best_label}), mean retained "
                 "accuracy over tasks and seeds. Chance is 0.5 on every task, so a retained ratio near "
                 "0.5 / single-task accuracy means the merged adapter lost the task.\n")
    lines.append("\n## Cost\n\n| seed | FlyLoRA adapters train s | LoRA adapters train s |\n|---|---|---|")
    for s in seeds:
        lines.append(f"| {s['seed']} | {s['seconds']['flylora_adapters']} | {s['seconds']['lora_adapters']} |")
    return "\n".join(lines) + "\n"
