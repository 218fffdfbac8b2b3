"""Speed and peak memory of every moelora method against real PEFT peers (issue 10).

Training (bundled all-MiniLM-L6-v2, ``AutoModelForSequenceClassification``, 2 labels): one step =
forward + loss (+ ``moelora.aux_loss``) + backward + AdamW step, on one fixed batch of suite text
(``moelora.data.suite.generate``) packed to exactly ``--seq`` tokens per row, the same for every
row. Every adapter targets ``query`` and ``value`` and the classifier head trains in every row.
Rows: plain PEFT LoRA r=8 (real ``peft``, the reference), a moelora E=1 LoRA (moelora's own
overhead), MoE-LoRA top-k (E=8, k=2, r=8), SiRA, FlyLoRA, MoA soft / sparse and MeteoRA over 8
PEFT LoRAs saved with real ``peft`` (gates trained).

Inference (tiny random Llama: hidden 256, 4 layers, vocab 1000; 8 rank-8 PEFT LoRAs on
``q_proj``/``v_proj`` saved to disk): one forward under ``no_grad`` with ``use_cache=False``.
Rows: the base model, a single PEFT LoRA (unmerged, the reference), MeteoRA top-2 over the 8, and
PEFT's X-LoRA over the same 8 (adapters named "0"…"7", top-2).

How: all rows of a section are built in one process and timed interleaved, one step of each row
per round with the order rotating, after ``--warmup`` rounds; the table gives the median of
``--reps`` rounds. Times and memory are reported as ratios to the PEFT LoRA row of the same run,
which is what to compare across runs (absolute times move with the machine's load). Peak memory:
see ``benchmarks/_bench.py`` (CPU: peak RSS growth over the steps, each row in a fresh process;
CUDA: ``max_memory_allocated``). Torch threads are fixed (``--threads``, default 2).

    python -P benchmarks/training_step.py                  # full run (~5 min on 2 idle cores, 15 on a
                                                           # busy machine); writes
                                                           # benchmarks/results/training_step.{md,json}
    python -P benchmarks/training_step.py --quick          # tiny shapes, 2 reps (< 1 min); writes to a
                                                           # fresh temp dir unless --out is given
    python -P benchmarks/training_step.py --section infer --reps 50 --out /tmp/ts

``-P`` keeps the script's directory off ``sys.path``: ``benchmarks/kernels.py`` would otherwise
shadow Hugging Face's ``kernels`` package, which transformers probes for. This is a benchmark,
never a test: ``tests/test_benchmarks.py`` only runs ``--quick``.
"""

from __future__ import annotations

import os

# The Triton interpreter would route every CPU layer of "auto" through Python: never benchmark it.
os.environ["TRITON_INTERPRET"] = "0"

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _bench as B  # noqa: E402
import _peers as P  # noqa: E402

# Drop the script directory again (plain ``python`` put it there too): benchmarks/kernels.py must
# not shadow HF's ``kernels`` when transformers probes for it later.
sys.path[:] = [p for p in sys.path if p and Path(p).resolve() != HERE]

RESULTS = HERE / "results"
SECTIONS = {"train": P.TRAIN_ROWS, "infer": P.INFER_ROWS}
REFERENCE = "peft-lora"
TITLES = {"train": "Training step on MiniLM", "infer": "Inference on a tiny Llama: MeteoRA vs X-LoRA"}


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes, 1 warm-up + 2 reps (smoke test)")
    ap.add_argument("--out", type=Path, default=None,
                    help="results directory (default benchmarks/results; --quick: a fresh temp dir)")
    ap.add_argument("--section", choices=["all", "train", "infer"], default="all")
    ap.add_argument("--only", default=None, help="comma-separated row names (reference row always kept)")
    ap.add_argument("--reps", type=int, default=None, help="timed rounds (default 10 train / 30 infer)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 2 / 5)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default 2; --quick: 1, which stays fast on a busy machine)")
    ap.add_argument("--batch", type=int, default=None, help="training batch (default 16)")
    ap.add_argument("--seq", type=int, default=None, help="training tokens per row (default 128)")
    ap.add_argument("--infer-batch", type=int, default=None, help="inference batch (default 8)")
    ap.add_argument("--infer-seq", type=int, default=None, help="inference tokens per row (default 128)")
    ap.add_argument("--memory", choices=["isolated", "inprocess", "off"], default=None,
                    help="peak memory: a fresh process per row (default), sequentially in this process "
                         "(--quick default; not isolated), or not at all")
    ap.add_argument("--mem-steps", type=int, default=2, help="steps measured for peak memory")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--child", nargs=2, metavar=("SECTION", "ROW"), help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    q = args.quick
    args.reps = args.reps or (2 if q else None)
    args.threads = args.threads or (1 if q else 2)
    args.batch, args.seq = args.batch or (2 if q else 16), args.seq or (16 if q else 128)
    args.infer_batch, args.infer_seq = args.infer_batch or (2 if q else 8), args.infer_seq or (16 if q else 128)
    args.memory = args.memory or ("inprocess" if q else "isolated")
    return args


def context(args: argparse.Namespace, section: str, work: Path) -> P.Context:
    batch, seq = (args.batch, args.seq) if section == "train" else (args.infer_batch, args.infer_seq)
    return P.Context(batch=batch, seq=seq, device=torch.device(args.device), work=work)


def sync_for(device: torch.device):
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]


# ---------------------------------------------------------------------------------- memory (child)
def child(args: argparse.Namespace) -> None:
    """Build one row in this fresh process and print its peak memory as the last stdout line."""
    section, name = args.child
    ctx = context(args, section, args.work)
    try:
        row = SECTIONS[section][name][1](ctx)
        result = B.peak_memory(row.step, steps=args.mem_steps, device=ctx.device)
    except Exception as e:  # noqa: BLE001 - reported in the table
        result = {"error": _error(e)}
    print(json.dumps(result))


def memory_isolated(args, section: str, names: list[str], work: Path) -> dict[str, dict]:
    out = {}
    for name in names:
        cmd = [sys.executable, "-P", str(Path(__file__).resolve()), "--child", section, name, "--work", str(work),
               "--threads", str(args.threads), "--device", args.device, "--mem-steps", str(args.mem_steps),
               "--batch", str(args.batch), "--seq", str(args.seq),
               "--infer-batch", str(args.infer_batch), "--infer-seq", str(args.infer_seq)]
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True,
                              env={**os.environ, "TRITON_INTERPRET": "0"})
        try:
            out[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            out[name] = {"error": f"child exited {proc.returncode}: {proc.stderr.strip()[-300:]}"}
        print(f"  memory {section}/{name}: {out[name]}", flush=True)
    return out


# ------------------------------------------------------------------------------------------ a run
def run_section(args, section: str, work: Path) -> dict:
    table = SECTIONS[section]
    names = list(table)
    if args.only:
        wanted = set(args.only.split(",")) | {REFERENCE}
        names = [n for n in names if n in wanted]
    ctx = context(args, section, work)
    reps = args.reps or (10 if section == "train" else 30)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else (2 if section == "train" else 5))
    print(f"[{section}] batch {ctx.batch} × {ctx.seq} tokens, {warmup} warm-up + {reps} timed rounds", flush=True)
    rows: dict[str, dict] = {n: {"name": n, "label": table[n][0]} for n in names}
    built = {}
    for name in names:
        try:
            row = table[name][1](ctx)
            rows[name].update(trainable=row.trainable, notes=row.notes)
            if args.memory == "inprocess":  # right after the build, earlier rows alive: not isolated
                rows[name]["memory"] = B.peak_memory(row.step, steps=args.mem_steps, device=ctx.device)
            else:
                row.step()  # fail here, not in the timing loop; one more warm-up step
            built[name] = row
        except Exception as e:  # noqa: BLE001 - e.g. a method that is not merged yet
            rows[name]["error"] = _error(e)
            print(f"  {name}: not available: {rows[name]['error']}", flush=True)
        row = None
    try:
        timings = B.interleaved_medians({n: r.step for n, r in built.items()}, warmup=warmup, reps=reps,
                                        sync=sync_for(ctx.device))
    finally:
        built.clear()
    for name, t in timings.items():
        rows[name].update(t)
    timed = [n for n, t in timings.items() if "error" not in t]
    if args.memory == "isolated":
        for name, m in memory_isolated(args, section, timed, work).items():
            rows[name]["memory"] = m
    ref = rows.get(REFERENCE, {})
    for r in rows.values():
        if "median_s" in r and "median_s" in ref and "error" not in r:
            r["time_ratio"] = B.paired_ratio(r["times_s"], ref["times_s"])
            r["ratio_of_medians"] = r["median_s"] / ref["median_s"]
        peak, ref_peak = r.get("memory", {}).get("peak_delta_mib"), ref.get("memory", {}).get("peak_delta_mib")
        if peak is not None and ref_peak:
            r["memory_ratio"] = peak / ref_peak
    return {"batch": ctx.batch, "seq": ctx.seq, "warmup": warmup, "reps": reps, "rows": list(rows.values())}


def targets(sections: dict[str, dict]) -> list[dict]:
    """The issue's targets, checked against this run's numbers only."""
    out = []
    rows = {s: {r["name"]: r for r in v["rows"]} for s, v in sections.items()}
    train, infer = rows.get("train", {}), rows.get("infer", {})
    if "moe-topk" in train:
        v = train["moe-topk"].get("time_ratio")
        out.append({"target": "MoE-LoRA top-k (E=8, k=2, r=8) training step ≤ 1.3× PEFT LoRA r=8",
                    "row": "train/moe-topk", "measured": v, "met": None if v is None else v <= 1.3,
                    "shown": None if v is None else f"{v:.2f}×"})
    if "meteora" in infer:
        v = infer["meteora"].get("time_ratio")
        out.append({"target": "MeteoRA inference over 8 adapters ≤ 1.3× a single PEFT LoRA",
                    "row": "infer/meteora", "measured": v, "met": None if v is None else v <= 1.3,
                    "shown": None if v is None else f"{v:.2f}×"})
        x, m = infer.get("xlora", {}).get("times_s"), infer["meteora"].get("times_s")
        v = B.paired_ratio(x, m) if x and m else None
        out.append({"target": "MeteoRA inference ≥ 2× faster than X-LoRA over the same 8",
                    "row": "infer/xlora ÷ infer/meteora", "measured": v, "met": None if v is None else v >= 2.0,
                    "shown": None if v is None else f"{v:.2f}× faster"})
    return out


# ----------------------------------------------------------------------------------------- report
def _cell(v, fmt: str) -> str:
    return "–" if v is None else format(v, fmt)


def _mib(v) -> str:
    return "–" if v is None else f"{v:.1f}" if abs(v) < 10 else f"{v:.0f}"


def markdown(result: dict) -> str:
    m = result["meta"]
    others = m.get("others_cores")
    lines = ["## Speed and memory", "",
             f"`{m['command']}` on {m['device']}, {m['threads']} torch threads; torch {m['torch']}, "
             f"transformers {m['transformers']}, peft {m['peft']}; {m['date']}; {m['wall_min']:.1f} min.", ""]
    if others is not None and others >= 0.1:
        lines += [f"**The machine was shared**: other processes kept {others:.1f} of its {os.cpu_count()} cores "
                  f"busy on average during this run (load average {m['load_start']:.1f} at start), so absolute "
                  "times are noisy. Rows were timed interleaved, so the ratios to PEFT LoRA are the numbers to "
                  "read.", ""]
    elif others is not None:
        lines += [f"The machine was otherwise idle (other processes: {others:.2f} cores on average).", ""]
    if m.get("quick"):
        lines += ["**Quick mode** (tiny shapes, 2 reps): a smoke run, not a measurement.", ""]
    for section, res in result["sections"].items():
        unit = "step" if section == "train" else "forward"
        lines += [f"### {TITLES[section]}", "",
                  f"Batch {res['batch']} × {res['seq']} tokens; median of {res['reps']} timed rounds after "
                  f"{res['warmup']} warm-up round{'s' if res['warmup'] != 1 else ''} (interquartile range in "
                  "brackets); `× PEFT LoRA` = median over rounds of this row's time / the PEFT LoRA row's time "
                  f"in the same round. Peak memory = extra memory over {m['mem_steps']} {unit}s from the built "
                  f"model ({m['memory_method']})."
                  + (f" Other processes used {res['others_cores']:.1f} cores on average during this section."
                     if res.get("others_cores") is not None else ""), ""]
        head = ["method", "trainable params"] if section == "train" else ["method"]
        head += [f"{unit} ms", "× PEFT LoRA", "peak extra MiB", "× PEFT LoRA"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in res["rows"]:
            cells = [r["label"]]
            if section == "train":
                cells.append(f"{r['trainable']:,}" if "trainable" in r else "–")
            if "error" in r:
                cells += [f"not available: {r['error']}"] + ["–"] * (len(head) - len(cells) - 1)
            else:
                mem = r.get("memory", {})
                ms = f"{r['median_s'] * 1e3:.1f} [{r['p25_s'] * 1e3:.0f}–{r['p75_s'] * 1e3:.0f}]"
                cells += [ms, _cell(r.get("time_ratio"), ".2f"),
                          _mib(mem.get("peak_delta_mib")) if "error" not in mem else "error",
                          _cell(r.get("memory_ratio"), ".2f")]
            lines.append("| " + " | ".join(cells) + " |")
        notes = [f"{r['label']}: {n}" for r in res["rows"] for n in r.get("notes", [])]
        notes += [f"{r['label']}: memory not measured: {r['memory']['error']}" for r in res["rows"]
                  if "error" in r.get("memory", {})]
        lines += [""] + [f"- {n}" for n in notes] + ([""] if notes else [])
    if result["targets"]:
        lines += ["### Targets (issue 10)", "", "| target | measured | met |", "|---|---|---|"]
        for t in result["targets"]:
            met = "–" if t["met"] is None else ("yes" if t["met"] else "**no**")
            lines.append(f"| {t['target']} | {t['shown'] or 'not measured'} | {met} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        child(args)
        return {}
    out = args.out or (Path(tempfile.mkdtemp(prefix="training_step_quick_")) if args.quick else RESULTS)
    command = "python -P benchmarks/training_step.py " + " ".join(sys.argv[1:] if argv is None else argv)
    meta = B.meta(command.strip(), torch.device(args.device), args.threads)
    meta.update(quick=args.quick, mem_steps=args.mem_steps, memory_mode=args.memory,
                memory_method={"isolated": "a fresh process per row", "inprocess": "rows one after another in "
                               "one process, not isolated", "off": "not measured"}[args.memory])
    if args.memory != "off":
        meta["memory_method"] += ", " + ("torch.cuda.max_memory_allocated" if args.device.startswith("cuda")
                                         else "peak RSS growth (VmHWM after clear_refs)")
    clock0 = B.cpu_clock()
    sections = ["train", "infer"] if args.section == "all" else [args.section]
    results = {}
    with tempfile.TemporaryDirectory(prefix="training_step_adapters_") as tmp:
        work = Path(tmp)
        if "train" in sections and (not args.only or "meteora" in args.only.split(",")):
            P.save_minilm_adapters(work)
        if "infer" in sections:
            P.save_llama_adapters(work)
        for section in sections:
            c0 = B.cpu_clock()
            results[section] = run_section(args, section, work)
            results[section]["others_cores"] = B.others_cores(c0, B.cpu_clock())
    clock1 = B.cpu_clock()
    meta["load_end"] = B.load_average()
    meta["others_cores"] = B.others_cores(clock0, clock1)
    meta["wall_min"] = (clock1["wall_s"] - clock0["wall_s"]) / 60 if clock0 and clock1 else float("nan")
    result = {"meta": meta, "sections": results, "targets": targets(results)}
    md = markdown(result)
    print(md)
    B.write_json_atomic(out / "training_step.json", result)
    B.write_atomic(out / "training_step.md", md + "\n")
    print(f"wrote {out / 'training_step.md'} and .json")
    return result


if __name__ == "__main__":
    main()
