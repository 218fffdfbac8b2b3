"""Quality of every moelora method on the bundled multi-task suite (issue 10, "Quality").

    python -P benchmarks/quality.py                      # every part, 3 seeds (see each .md for its budget)
    python -P benchmarks/quality.py --part meteora       # one part: meteora|merge|sira|moa|weightlora
    python -P benchmarks/quality.py --quick --out /tmp/q # smoke run (tiny budgets, one seed, < 40 s)

Each part writes ``benchmarks/results/quality_<part>.{md,json}``; the parts live in
``benchmarks/quality_<part>.py`` and share the helpers here (budgets, the per-task PEFT LoRA
adapters, which parts 1 and 2 both use, and the multi-task runs that parts 3-5 share).

Backbone: MiniLM (all-MiniLM-L6-v2) as ``AutoModelForSequenceClassification`` with 2 labels; the
suite has six binary tasks (``moelora.data.suite``). Every number is a test accuracy on held-out
examples of fresh seeds; "mean ± spread" is the mean over seeds ± half the range.
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

sys.path.pop(0)

PARTS = ("meteora", "merge", "sira", "moa", "weightlora")
#: LoRA targets on MiniLM everywhere: every linear of the encoder and the pooler (the only rank-8
#: setting that solves the suite in benchmarks/results/suite_baselines.md).
TARGETS = ["query", "key", "value", "dense"]


class PartUnavailable(RuntimeError):
    """A part's method is missing from this checkout (its API has not landed): the part is skipped."""


@dataclass(frozen=True)
class Budget:
    """Training / evaluation budget shared by the parts (documented in every results file)."""

    n_train: int = 400       # training examples per task
    n_test: int = 100        # test examples per task
    batch_size: int = 16
    lr: float = 1e-3         # AdamW, constant, no weight decay, for every adapter (2e-3 made single-task runs diverge)
    task_steps: int = 80     # steps of each single-task adapter (parts 1-2)
    gate_steps: int = 150    # MeteoRA gate-only steps (part 1)
    gate_lr: float = 1e-2    # gates start from scratch: a larger lr than the LoRAs'
    mix_steps: int = 240     # steps of a multi-task run (parts 3-5): 3,840 examples, 1.6 passes over the mix

    def line(self) -> str:
        return (f"{self.n_train} training / {self.n_test} test examples per task and seed (test examples "
                f"from a different generator seed), batch {self.batch_size}, AdamW lr {self.lr:g} constant "
                f"(no warm-up, no weight decay)")


FULL = Budget()
QUICK = Budget(n_train=8, n_test=4, batch_size=8, task_steps=2, gate_steps=2, mix_steps=2)
#: Parts that share cached runs of a seed run together in one worker: (meteora, merge) share the
#: per-task PEFT adapters; (sira, moa, weightlora) share the LoRA and MoE-LoRA multi-task runs.
GROUPS = (("meteora", "merge"), ("sira", "moa", "weightlora"))


class Context:
    """What the parts share within one invocation: args, budget, data, temp dir, cached runs."""

    def __init__(self, args: argparse.Namespace, *, load_tokenizer: bool = True) -> None:
        self.args = args
        self.quick = bool(args.quick)
        self.budget = QUICK if self.quick else FULL
        self.seeds = common.seeds_for(args)
        self.jobs = 1
        self.tmp = Path(tempfile.mkdtemp(prefix="moelora_quality_"))
        self.cache: dict[Any, Any] = {}
        self.tok = common.tokenizer() if load_tokenizer else None

    def close(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def data(self, seed: int) -> tuple[dict, dict]:
        key = ("data", seed)
        if key not in self.cache:
            self.cache[key] = common.suite_data(self.budget.n_train, self.budget.n_test, seed)
        return self.cache[key]

    def memo(self, key: Any, fn):
        """``fn()`` once per key within this invocation (parts reuse each other's runs under ``all``)."""
        if key not in self.cache:
            self.cache[key] = fn()
        return self.cache[key]


# ------------------------------------------------------------------------ per-task PEFT LoRA adapters
def peft_lora_config(rank: int = 8, alpha: float = 16.0, modules_to_save: list[str] | None = None):
    import peft

    return peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(TARGETS), lora_dropout=0.0,
                           modules_to_save=modules_to_save)


def peft_lora_model(rank: int = 8):
    """``make_model`` for :func:`train_multitask`: a real PEFT LoRA (α = 2r) with a trainable head."""

    def make(seed: int):
        import peft

        return peft.get_peft_model(common.fresh_model(seed),
                                   peft_lora_config(rank, 2.0 * rank, modules_to_save=["classifier"]))

    return make


def train_task_adapters(ctx: Context, seed: int, *, make: Callable[[int], Any], save: Callable[[Any, Path], None],
                        tag: str) -> dict[str, Any]:
    """Train ``make(task_id)`` (a fresh adapted model) on each task alone and ``save`` it under
    ``ctx.tmp/<tag>_seed<seed>/<task>``. Returns ``{"dirs": {task: dir}, "acc": {task: own-task
    accuracy}, "seconds": training seconds, "params": trainable parameters of one adapter}``."""
    from moelora.data.suite import TASKS

    train, test = ctx.data(seed)
    dirs, acc, seconds, params = {}, {}, 0.0, 0
    for tid, task in enumerate(TASKS):
        model = make(tid)
        params = common.count_trainable(model)
        run = common.train(model, ctx.tok, common.filter_task(train, tid), steps=ctx.budget.task_steps,
                           batch_size=ctx.budget.batch_size, lr=ctx.budget.lr, seed=seed * 100 + tid)
        seconds += run["seconds"]
        acc[task] = common.evaluate(model, ctx.tok, common.filter_task(test, tid))[task]
        out = ctx.tmp / f"{tag}_seed{seed}" / task
        save(model, out)
        dirs[task] = str(out)
    return {"dirs": dirs, "acc": acc, "seconds": seconds, "params": params}


def task_adapters(ctx: Context, seed: int) -> dict[str, Any]:
    """One real PEFT LoRA per task (r=8, α=16, ``TARGETS``), trained on that task alone on top of
    the seed's base model (MiniLM + a frozen, seeded, shared classifier head) and saved with
    ``save_pretrained``; see :func:`train_task_adapters` for what it returns."""

    def make(tid: int):
        import peft
        import torch

        base = common.fresh_model(seed)
        torch.manual_seed(seed * 100 + tid)  # each task's LoRA A from its own seed
        return peft.get_peft_model(base, peft_lora_config())

    def build():
        return train_task_adapters(ctx, seed, make=make, save=lambda model, out: model.save_pretrained(str(out)),
                                   tag="peft")

    return ctx.memo(("peft_task_adapters", seed), build)


# --------------------------------------------------------------------------------- multi-task runs
def train_multitask(ctx: Context, seed: int, name: str, make_model, *, steps: int | None = None,
                    step_hook=None, extra_loss=None, params_fn=None, after_train=None,
                    after_eval=None) -> dict[str, Any]:
    """Train ``make_model(seed)`` on the whole suite mix with the shared budget and evaluate it.

    ``step_hook(step, model, optimizer)`` runs after every optimizer step, ``params_fn(model)``
    gives the optimizer's parameter groups (default: every trainable parameter). Cached by ``(name, seed)``: parts that share a baseline (LoRA, MoE-LoRA) train it once under
    ``--part all``. Returns ``{"acc": per-task accuracy + mean, "params": trainable parameters
    without the head (counted after ``after_train``), "head_params", "seconds", "final_loss",
    "routing": {"train_drop", "eval_drop", "max_share"} for moelora models}`` plus whatever
    ``after_train(model)`` returns (it runs between training and evaluation) and whatever
    ``after_eval(model)`` returns (after evaluation; routing statistics then cover the test set).
    """

    def build():
        import moelora

        train, test = ctx.data(seed)
        model = make_model(seed)
        run = common.train(model, ctx.tok, train, steps=steps or ctx.budget.mix_steps,
                           batch_size=ctx.budget.batch_size, lr=ctx.budget.lr, seed=seed,
                           step_hook=step_hook, extra_loss=extra_loss,
                           params=None if params_fn is None else params_fn(model))
        result = {"head_params": common.count_trainable(model) - common.count_trainable(model, exclude_head=True),
                  "seconds": round(run["seconds"], 1), "final_loss": run["final_loss"]}
        if after_train is not None:
            result.update(after_train(model) or {})
        result["params"] = common.count_trainable(model, exclude_head=True)
        routed = getattr(model, "_moelora_state", None) is not None and moelora.wrapped_layers(model)
        if routed:
            tracker = moelora.routing_stats(model)
            train_drop = _mean([s.drop_rate for s in tracker.layers.values()])
            tracker.reset()
        result["acc"] = common.evaluate(model, ctx.tok, test)
        if routed:
            stats = list(tracker.layers.values())
            result["routing"] = {"train_drop": train_drop, "eval_drop": _mean([s.drop_rate for s in stats]),
                                 "max_share": _mean([s.max_share for s in stats])}
        if after_eval is not None:
            result.update(after_eval(model) or {})
        return result

    return ctx.memo(("multitask", name, seed), build)


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def moelora_model(config_factory):
    """``make_model`` for :func:`train_multitask`: MiniLM + ``moelora.inject(config_factory(seed))``."""

    def make(seed: int):
        import moelora

        return moelora.inject(common.fresh_model(seed), config_factory(seed))

    return make


def lora_config(seed: int, rank: int = 8):
    """Plain LoRA in moelora form (one expert, top-1: exactly a PEFT LoRA, tests/test_peft_parity.py;
    but its one-output router counts as trainable, so the baselines use :func:`peft_lora_model`)."""
    import moelora

    return moelora.MoELoRAConfig(target_modules=list(TARGETS), modules_to_save=["classifier"], num_experts=1,
                                 top_k=1, rank=rank, alpha=2.0 * rank, aux_loss_coef=0.0, seed=seed)


def moe_config(seed: int, *, num_experts: int = 4, rank: int = 2, top_k: int = 2, aux: float = 0.01):
    """Homogeneous MoE-LoRA top-k (E·r = 8: the LoRA's total rank; α/r = 2 like the LoRA)."""
    import moelora

    return moelora.MoELoRAConfig(target_modules=list(TARGETS), modules_to_save=["classifier"],
                                 num_experts=num_experts, top_k=top_k, rank=rank, alpha=2.0 * rank,
                                 aux_loss_coef=aux, seed=seed)


# ---------------------------------------------------------------------------------- markdown helpers
def per_seed(rows: list[dict], key: str) -> list[float]:
    return [r[key] for r in rows]


def acc_table(rows: list[tuple[str, list[dict], str]], *, tasks=None, extra_header: str = "") -> str:
    """``rows``: (label, per-seed accuracy dicts, extra cells); one line per row, mean ± spread."""
    from moelora.data.suite import TASKS

    tasks = tasks or TASKS
    head = "| setting | " + " | ".join(tasks) + " | mean |" + (f" {extra_header} |" if extra_header else "")
    extra_cols = extra_header.count("|") + 1 if extra_header else 0
    lines = [head, "|" + "---|" * (len(tasks) + 2 + extra_cols)]
    for label, accs, extra in rows:
        cells = " | ".join(common.fmt_ms([a[t] for a in accs]) for t in tasks)
        mean = common.fmt_ms([a["mean"] for a in accs])
        lines.append(f"| {label} | {cells} | **{mean}** |" + (f" {extra} |" if extra_header else ""))
    return "\n".join(lines)


def header(ctx: Context, title: str, part: str, intro: str, rows: list[dict]) -> str:
    """Title, command, intro and the seeds / budget / time / machine lines of a part's markdown."""
    meta = common.machine_meta(_command(ctx, part))
    ctx.cache.setdefault("meta", {})[part] = meta
    mode = "QUICK SMOKE RUN: numbers are meaningless\n\n" if ctx.quick else ""
    times = ", ".join(f"{r['part_seconds']:.0f}" for r in rows)
    par = (f"; the seeds ran in {ctx.jobs} parallel processes of {ctx.args.threads} torch thread(s) each"
           if ctx.jobs > 1 else f"; {ctx.args.threads} torch thread(s)")
    alone = "" if ctx.args.part != "all" else (
        f" (every part in one run, {ctx.cache.get('total_wall', 0):.0f} s wall in all; this part alone: "
        f"`--part {part}`)")
    return (f"# {title}\n\n{mode}`{meta['command']}`{alone}\n\n{intro}\n\n"
            f"- Seeds: {', '.join(str(r['seed']) for r in rows)} (each seed: its own data, initialisation and "
            f"adapters); cells are mean ± spread (half the range) over seeds.\n"
            f"- Budget: {ctx.budget.line()}.\n"
            f"- Time of this part per seed: {times} s (wall, including the runs it shares with other parts when it "
            f"computed them){par}; on {common.meta_line(meta)}.\n")


def _command(ctx: Context, part: str) -> str:
    """The command of this run (``--part all`` is the default and left out)."""
    args = ctx.args
    bits = ["python -P benchmarks/quality.py"] + ([] if args.part == "all" else [f"--part {part}"])
    if args.quick:
        bits.append("--quick")
    if args.seeds != common.parse_seeds("0,1,2"):
        bits.append("--seeds " + ",".join(map(str, args.seeds)))
    if args.threads != 1:
        bits.append(f"--threads {args.threads}")
    return " ".join(bits)


def target_line(name: str, value: float, goal: float, *, fmt: str = "{:.3f}", op: str = ">=") -> str:
    met = value >= goal if op == ">=" else value <= goal
    return f"- Target {name} {op} {fmt.format(goal)}: **{'met' if met else 'NOT met'}** ({fmt.format(value)})."


def cost_section(rows: dict[str, list[dict]]) -> list[str]:
    """The "## Cost" markdown lines: each setting's training seconds per seed."""
    return ["\n## Cost\n\n| setting | train s per seed |\n|---|---|"] + [
        f"| {label} | {', '.join(str(r['seconds']) for r in runs)} |" for label, runs in rows.items()]


def versus(rows: dict[str, list[dict]], ref: str) -> str:
    """One sentence: every setting's mean accuracy against ``ref``'s, with the difference and
    whether it exceeds the larger of the two seed spreads (else it is called a tie)."""
    stats = {label: common.mean_spread([r["acc"]["mean"] for r in runs]) for label, runs in rows.items()}
    m0, s0 = stats[ref]
    parts = []
    for label, (m, s) in stats.items():
        if label == ref:
            continue
        d = m - m0
        word = "tie" if abs(d) <= max(s, s0) else ("above" if d > 0 else "below")
        parts.append(f"{label}: {m:.3f} ({d:+.3f} vs {ref}, {word}{' within the seed spread' if word == 'tie' else ''})")
    return "; ".join(parts) + f"; {ref}: {m0:.3f} ± {s0:.3f}."


def budget_payload(ctx: Context) -> dict:
    return asdict(ctx.budget)


# ------------------------------------------------------------------------------------------- main
def run_unit(args: argparse.Namespace, seed: int, parts: tuple[str, ...]) -> dict[str, dict]:
    """Run ``parts`` for one seed (one worker's unit of work); ``{part: row}``, where a row is the
    part's ``run_seed`` result plus ``seed`` and ``part_seconds``, or ``{"skipped": reason}``."""
    common.setup(args)
    sys.modules.setdefault("quality", sys.modules[__name__])  # the parts import this module's helpers
    ctx = Context(args)
    out: dict[str, dict] = {}
    try:
        for part in parts:
            start = time.perf_counter()
            try:
                row = _load_part(part).run_seed(ctx, seed)
            except PartUnavailable as err:  # a method this checkout does not have yet: say so, go on
                out[part] = {"seed": seed, "skipped": str(err)}
                continue
            except Exception:  # noqa: BLE001 - keep the other parts' results; main reports it and fails
                import traceback

                out[part] = {"seed": seed, "error": traceback.format_exc()}
                print(f"  [{part}, seed {seed}] FAILED:\n{out[part]['error']}", flush=True)
                continue
            row.update(seed=seed, part_seconds=round(time.perf_counter() - start, 1))
            out[part] = row
            print(f"  [{part}, seed {seed}] done in {row['part_seconds']:.0f} s", flush=True)
    finally:
        ctx.close()
    return out


def _run_unit_star(job):
    return run_unit(*job)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_args(parser, default_threads=1)
    parser.add_argument("--part", choices=(*PARTS, "all"), default="all", help="which part to run (default all)")
    parser.add_argument("--jobs", type=int, default=2,
                        help="worker processes, each running one seed of a group of parts (default 2: one per core)")
    args = parser.parse_args(argv)
    common.setup(args)
    out = common.output_dir(args)
    parts = PARTS if args.part == "all" else (args.part,)
    sys.modules.setdefault("quality", sys.modules[__name__])
    ctx = Context(args, load_tokenizer=False)
    units = [(args, seed, tuple(p for p in group if p in parts)) for group in GROUPS for seed in ctx.seeds]
    units = [u for u in units if u[2]]
    ctx.jobs = max(1, min(args.jobs, len(units)))
    start = time.perf_counter()
    if ctx.jobs == 1:
        results = [run_unit(*u) for u in units]
    else:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(ctx.jobs) as pool:
            results = list(pool.imap_unordered(_run_unit_star, units))
    ctx.cache["total_wall"] = time.perf_counter() - start
    rows: dict[str, list[dict]] = {p: [] for p in parts}
    for result in results:
        for part, row in result.items():
            rows[part].append(row)
    failed = []
    try:
        for part in parts:
            part_rows = sorted(rows[part], key=lambda r: r["seed"])
            skipped = [r for r in part_rows if "skipped" in r]
            if any("error" in r for r in part_rows):
                failed.append(part)  # nothing written: a failed part must not overwrite good results
                continue
            if skipped:
                markdown = f"# Quality part {part}: not run\n\n`{_command(ctx, part)}`\n\n{skipped[0]['skipped']}\n"
                payload = {"meta": common.machine_meta(_command(ctx, part)), "skipped": skipped[0]["skipped"]}
            else:
                markdown, payload = _load_part(part).summarize(ctx, part_rows)
            print(markdown, flush=True)
            if out is not None:
                md, js = common.write_results(out, f"quality_{part}", markdown, payload)
                print(f"wrote {md} and {js}", flush=True)
    finally:
        ctx.close()
    print(f"quality: {', '.join(parts)} in {time.perf_counter() - start:.0f} s wall"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


def _load_part(part: str):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    try:
        return importlib.import_module(f"quality_{part}")
    finally:
        sys.path.pop(0)


if __name__ == "__main__":
    sys.exit(main())
