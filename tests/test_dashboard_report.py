"""The report builder on synthetic routing statistics: numbers behind each view, HTML structure,
self-containment, and `moelora report`."""

import json
import re

import pytest
import torch

from moelora.tracker import LayerStats
from moelora.dashboard import analysis as A
from moelora.dashboard import figures as F
from moelora.dashboard.cli import report_main
from moelora.dashboard.report import build_report, render_html
from moelora.dashboard.store import RoutingStore, read_store

PLOTS = ["plot-summary", "plot-drops", "plot-load", "plot-load-time", "plot-tasks", "plot-coactivation"]


def stats(counts, *, coact=None, dropped=None, tasks=None, tokens=None) -> LayerStats:
    c = torch.tensor(counts, dtype=torch.float64)
    e = c.numel()
    co = torch.tensor(coact, dtype=torch.float64) if coact is not None else torch.diag(c)
    return LayerStats(c, torch.full((e,), 0.5, dtype=torch.float64) * (tokens or 1),
                      torch.tensor(dropped or [0] * e, dtype=torch.float64), co, tokens or int(c.sum()), 1,
                      torch.tensor(tasks, dtype=torch.float64) if tasks is not None else None)


def synthetic_store(path, *, tasks=True, drops=True, samples=True, steps=8):
    """A run with three differently shaped layers: top-2 of 4 (with task ids), 16 rank-experts
    (FlyLoRA-like), and 3 named expert types (MoA-like)."""
    store = RoutingStore(path / "routing")
    store.write_meta({"layers": [{"name": "m.l0.q", "label": "l0.q", "num_experts": 4, "top_k": 2},
                                 {"name": "m.l0.ranks", "label": "l0.ranks", "num_experts": 16, "top_k": 4},
                                 {"name": "m.l1.moa", "label": "l1.moa", "num_experts": 3, "top_k": 1,
                                  "experts": ["lora", "parallel", "prompt"]}],
                      "tasks": ["topic", "compare"],
                      "config": {"method": {"method": "synthetic", "top_k": 2}, "model": {"backbone": "tiny"}}})
    g = torch.Generator().manual_seed(0)
    for step in range(1, steps + 1):
        skew = step / steps  # expert 0 takes over in the first layer: a collapse to see
        c0 = [40 + 60 * skew, 30 - 10 * skew, 20 - 10 * skew, 10 - 5 * skew]
        co = [[c0[0], 5, 5, 5], [5, c0[1], 3, 2], [5, 3, c0[2], 1], [5, 2, 1, c0[3]]]
        layers = {
            "m.l0.q": stats([round(v) for v in c0], coact=[[round(v) for v in r] for r in co],
                            dropped=[step if drops else 0, 0, 0, 0], tokens=50,
                            tasks=[[30, 10, 5, 5], [5, 5, 20, 20]] if tasks else None),
            "m.l0.ranks": stats(torch.randint(0, 30, (16,), generator=g).tolist(), tokens=100),
            "m.l1.moa": stats([10, 20, 0], tokens=30),
        }
        store.append_window("train", step * 10, layers, epoch=0)
    store.append_window("val", steps * 10, {"m.l0.q": stats([5, 5, 5, 5])})
    if samples:
        store.append({"kind": "sample", "stage": "val", "step": steps * 10, "texts": [
            {"tokens": ["[CLS]", "hello", "##s", "</script>", "[SEP]"], "task": 1, "label": 0,
             "routing": {"m.l0.q": {"experts": [[0, 1], [2, -1], [1, 0], [3, 2], [-1, -1]],
                                    "weights": [[0.7, 0.3], [1.0, 0.0], [0.6, 0.4], [0.5, 0.5], [0, 0]]}}}]})
    return store


# ----------------------------------------------------------------------------- numbers
def test_utilisation_coactivation_and_task_shares_by_hand():
    s = stats([3, 1, 0, 0], coact=[[3, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]],
              tasks=[[2, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0]])
    assert A.utilisation(s) == [3.0, 1.0, 0.0, 0.0]  # fair share = 4 slots / 4 experts
    assert A.utilisation(stats([0, 0])) == [None, None]
    cond = A.coactivation_conditional(s)
    assert cond[0] == [None, 1 / 3, 0.0, 0.0] and cond[1] == [1.0, None, 0.0, 0.0] and cond[2] == [None] * 4
    shares, counts = A.task_shares(s)
    assert shares == [[1.0, 0.0, 0.0, 0.0], [None] * 4, [0.5, 0.5, 0.0, 0.0]] and counts[2] == [1, 1, 0, 0]


def test_buckets_merge_windows_without_losing_tokens(tmp_path):
    synthetic_store(tmp_path, steps=25)
    contents = read_store(tmp_path)
    train = A.windows_of(contents, A.main_stage(contents))
    assert A.main_stage(contents) == "train" and len(train) == 25
    points = A.buckets(train, 10)
    assert len(points) <= 10 and points[-1][0] == 250
    whole = A.total(train)
    for name in whole:
        merged = sum(layers[name].counts for _, layers in points if name in layers)
        assert torch.equal(merged, whole[name].counts)
        assert sum(layers[name].tokens for _, layers in points) == whole[name].tokens
    assert whole["m.l0.q"].task_counts.tolist()[0] == [30 * 25, 10 * 25, 5 * 25, 5 * 25]


def test_figures_hold_the_numbers_for_layers_of_different_widths(tmp_path):
    synthetic_store(tmp_path)
    contents = read_store(tmp_path)
    train = A.windows_of(contents, "train")
    totals, points = A.total(train), A.buckets(train, 60)
    names, labels = A.layer_names(contents), A.layer_labels(contents)
    fig = F.load(contents, points, totals, names, labels)
    z = fig.data[0].z
    assert len(z) == 3 and all(len(row) == 16 for row in z)  # padded to the widest layer
    assert list(z[0][:4]) == pytest.approx(A.utilisation(totals["m.l0.q"]))
    assert list(z[0][4:]) == [None] * 12 and list(z[2][:3]) == pytest.approx([1.0, 2.0, 0.0])
    assert list(fig.data[0].y) == ["l0.q", "l0.ranks", "l1.moa"]
    assert len(fig.layout.sliders[0].steps) == len(points) + 1  # every window, then the whole run
    first_window = fig.layout.sliders[0].steps[0].args[0]["z"][0]
    assert first_window[0][:4] == pytest.approx(A.utilisation(points[0][1]["m.l0.q"]))

    tasks = F.tasks(contents, totals, names, labels)
    assert list(tasks.data[0].y) == ["topic", "compare"]
    assert list(tasks.data[0].z[0]) == pytest.approx([0.6, 0.2, 0.1, 0.1])
    coact = F.coactivation(contents, totals, names, labels)
    moa = [b for b in coact.layout.updatemenus[0].buttons if b.label == "l1.moa"][0]
    assert moa.args[0]["x"][0] == ["lora", "parallel", "prompt"]  # named experts (MoA types)

    summary = F.summary(points, names, labels)
    entropy = [t for t in summary.data if t.name == "l0.q"][0].y
    assert entropy[0] > entropy[-1]  # the synthetic collapse shows as falling entropy
    drops = F.drops(points, names, labels, totals)
    assert list([t for t in drops.data if t.name == "l0.q"][0].y)[-1] == pytest.approx(8 / (100 + 20 + 10 + 5 + 8))  # kept 135, dropped 8


# ----------------------------------------------------------------------------- HTML
def embedded_json(page: str, element_id: str):
    m = re.search(rf'<script type="application/json" id="{element_id}">(.*?)</script>', page, re.S)
    assert m, element_id
    return json.loads(m.group(1))


def test_report_html_is_self_contained_with_every_view(tmp_path):
    synthetic_store(tmp_path)
    (tmp_path / "config.yaml").write_text("model:\n  backbone: tiny-from-yaml\n")
    out = build_report(tmp_path, tmp_path / "r.html")
    page = out.read_text()
    for plot_id in PLOTS:
        assert f'id="{plot_id}"' in page
    assert page.count("Plotly.newPlot(") == len(PLOTS)
    from plotly.offline import get_plotlyjs

    assert get_plotlyjs() in page  # the whole library is inlined
    assert not re.search(r"<script[^>]+src=", page) and "<link" not in page, "nothing may load from elsewhere"
    tokens = embedded_json(page, "token-data")
    assert tokens["sets"][0]["texts"][0]["tokens"] == ["[CLS]", "hello", "s", "</script>", "[SEP]"]
    assert tokens["sets"][0]["texts"][0]["cont"] == [0, 0, 1, 0, 0]  # "##s" joins "hello"
    assert tokens["sets"][0]["texts"][0]["task"] == "compare"
    assert [layer["label"] for layer in tokens["layers"]][:1] == ["l0.q"]
    assert "tiny-from-yaml" in page and "synthetic" in page  # header: config.yaml and the recorded config


def test_report_without_tasks_drops_or_samples_says_so(tmp_path):
    synthetic_store(tmp_path, tasks=False, drops=False, samples=False)
    page = render_html(read_store(tmp_path))
    assert 'id="plot-tasks"' not in page and "No task ids were recorded" in page
    assert "no slot was dropped" in page and 'id="token-data"' not in page
    assert page.count("Plotly.newPlot(") == len(PLOTS) - 1


def test_report_of_a_damaged_or_empty_store(tmp_path):
    store = synthetic_store(tmp_path / "a")
    with open(store.records_path, "ab") as f:
        f.write(b'{"kind":"window","sta')
    page = build_report(tmp_path / "a").read_text()
    assert "Some records were skipped" in page and "incomplete" in page
    RoutingStore(tmp_path / "b" / "routing").write_meta({"layers": []})
    assert "holds no training or evaluation routing windows" in build_report(tmp_path / "b").read_text()
    store = RoutingStore(tmp_path / "c" / "routing")
    store.write_meta({"layers": [{"name": "m.l0.q", "label": "l0.q", "num_experts": 4, "top_k": 2}]})
    store.append_window("sanity", 0, {"m.l0.q": stats([1, 2, 3, 4])})
    page = build_report(tmp_path / "c").read_text()
    assert "only 1 sanity-check window(s)" in page and "<nav>" not in page, "no links to sections that do not exist"
    (tmp_path / "c" / "routing" / "meta.json").write_text("[1, 2]")  # valid JSON, not an object
    assert "holds a JSON list, not an object" in build_report(tmp_path / "c").read_text()


def test_moelora_report_command(tmp_path, capsys):
    synthetic_store(tmp_path / "run")
    assert report_main([str(tmp_path / "run"), "-o", str(tmp_path / "out.html")]) == 0
    assert (tmp_path / "out.html").stat().st_size > 1_000_000  # plotly inlined
    assert "routing report:" in capsys.readouterr().out
    from moelora.cli import main

    assert main(["report", str(tmp_path)]) == 0  # a parent directory: its run is found
    assert (tmp_path / "run" / "routing_report.html").is_file()
    assert report_main([str(tmp_path / "missing")]) == 1
    assert "no routing store" in capsys.readouterr().err


def test_token_json_survives_strings_that_open_html_comments(tmp_path):
    # "<!--<script>" inside a <script> element puts the HTML parser in a state where "</script>"
    # no longer ends it: the token view, its selectors and the footer vanished, without an error.
    store = synthetic_store(tmp_path, samples=False)
    evil = "<!--<script>"
    store.append({"kind": "sample", "stage": "val", "step": 80, "texts": [
        {"tokens": ["a", evil, "</script>", "&amp;"], "task": 0, "label": 0,
         "routing": {"m.l0.q": {"experts": [[0, 1]] * 4, "weights": [[0.5, 0.5]] * 4}}}]})
    page = build_report(tmp_path, tmp_path / "r.html").read_text()
    block = re.search(r'<script type="application/json" id="token-data">(.*?)</script>', page, re.S).group(1)
    assert "<" not in block and ">" not in block and "&" not in block
    assert json.loads(block)["sets"][0]["texts"][0]["tokens"] == ["a", evil, "</script>", "&amp;"]
    assert page.rstrip().endswith("</html>") and page.count('id="token-sample"') == 1


def test_report_into_a_directory_and_concurrent_builds(tmp_path):
    import threading

    synthetic_store(tmp_path / "run")
    (tmp_path / "out").mkdir()
    assert build_report(tmp_path / "run", tmp_path / "out") == tmp_path / "out" / "routing_report.html"
    errors = []

    def build():
        try:
            build_report(tmp_path / "run")
        except Exception as err:  # noqa: BLE001 - collected for the assert
            errors.append(err)
    threads = [threading.Thread(target=build) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and not [p for p in (tmp_path / "run").iterdir() if p.name.endswith(".tmp")]


def test_report_output_paths(tmp_path):
    # "-o new_dir/" once wrote a file named new_dir; a file in the way once gave "[Errno 17] File
    # exists"; the store's own records file once gave ".../records.jsonl/routing/records.jsonl".
    from moelora.dashboard.store import RECORDS, STORE_DIR

    synthetic_store(tmp_path / "run")
    assert build_report(tmp_path / "run", f"{tmp_path / 'new'}/") == tmp_path / "new" / "routing_report.html"
    (tmp_path / "afile").write_text("keep me")
    with pytest.raises(NotADirectoryError, match="afile is a file, not a directory"):
        build_report(tmp_path / "run", tmp_path / "afile" / "r.html")
    assert (tmp_path / "afile").read_text() == "keep me"
    records = next((tmp_path / "run").rglob(f"{STORE_DIR}/{RECORDS}"))
    assert build_report(records, tmp_path / "r2.html").is_file()


def test_coactivation_note_only_when_no_token_shared_experts():
    names, labels = ["a"], {"a": "a"}
    top1 = {"a": stats([3, 2, 0])}
    sparse = {"a": stats([2, 2, 0], coact=[[2, 2, 0], [2, 2, 0], [0, 0, 0]], tokens=10)}  # 0.4 slots/token
    contents = type("C", (), {"meta": {}})()
    note = "no token chose two experts"
    assert any(note in a.text for a in F.coactivation(contents, top1, names, labels).layout.annotations)
    assert not any(note in a.text for a in F.coactivation(contents, sparse, names, labels).layout.annotations)


def test_windows_start_at_the_first_optimizer_step_under_accumulation():
    from types import SimpleNamespace

    from moelora.dashboard.callback import RoutingDashboard
    from moelora.lightning import RoutingLogger

    cb, flushed = RoutingDashboard(every_n_steps=1), []
    cb._flush = lambda trainer, stage: flushed.append(trainer.global_step)
    cb._sample = lambda *a: None
    for step in (0, 1, 1, 2, 2):  # accumulate_grad_batches=2: the first batch ends before any step
        cb.on_train_batch_end(SimpleNamespace(global_step=step, log_every_n_steps=1), None, None, None, 0)
    assert flushed == [1, 2]
    # RoutingLogger returns before it reads the model (None here) at step 0
    RoutingLogger(every_n_steps=1).on_train_batch_end(SimpleNamespace(global_step=0, log_every_n_steps=1),
                                                       None, None, None, 0)
