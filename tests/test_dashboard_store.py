"""The routing store (round trip, appends, crash safety) and the tracker's per-task counts."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moelora.tracker import LayerStats, LoadTracker
from moelora.dashboard.store import RoutingStore, decode_layer, encode_layer, find_store, read_store, record_problem


def random_stats(seed: int, num_experts: int = 4, tasks: int | None = 3) -> LayerStats:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(-1, num_experts, (50, 2), generator=g)
    probs = torch.rand(50, num_experts, generator=g).softmax(-1)
    t = LoadTracker()
    task_ids = torch.randint(-1, tasks, (50,), generator=g) if tasks else None
    t.record("l", num_experts, ids, probs, torch.randint(0, 3, (num_experts,), generator=g), None, task_ids=task_ids)
    return t.layers["l"]


def assert_same(a: LayerStats, b: LayerStats) -> None:
    assert torch.equal(a.counts, b.counts) and torch.equal(a.dropped, b.dropped)
    assert torch.equal(a.coactivation, b.coactivation)
    torch.testing.assert_close(a.prob_sum, b.prob_sum, rtol=1e-8, atol=0)
    assert (a.tokens, a.forwards) == (b.tokens, b.forwards)
    assert (a.task_counts is None) == (b.task_counts is None)
    if a.task_counts is not None:
        assert torch.equal(a.task_counts, b.task_counts)


# ----------------------------------------------------------------------------- tracker extension
def test_task_counts_by_hand_respect_mask_and_negative_ids():
    tracker = LoadTracker()
    ids = torch.tensor([[0, 1], [2, -1], [1, 0], [3, 3]])
    tasks = torch.tensor([0, 2, -100, 2])   # token 2 has no task
    mask = torch.tensor([True, True, True, False])  # token 3 is padding
    tracker.record("l", 4, ids, None, None, mask, task_ids=tasks)
    s = tracker.layers["l"]
    assert s.task_counts.tolist() == [[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0]]
    # a forward whose task ids do not describe its tokens leaves task counts alone
    tracker.record("l", 4, ids, None, None, None, task_ids=torch.tensor([5, 5]))
    assert s.task_counts.shape == (3, 4)
    # a later, larger task id grows the rows; since() pads the earlier snapshot
    before = tracker.reduced().layers["l"]
    tracker.record("l", 4, ids[:1], None, None, None, task_ids=torch.tensor([4]))
    window = tracker.reduced().layers["l"].since(before)
    assert window.task_counts.tolist() == [[0] * 4] * 4 + [[1, 1, 0, 0]]
    assert window.counts.tolist() == [1, 1, 0, 0] and window.tokens == 1
    assert json.loads(json.dumps(s.to_dict()))["task_counts"][2] == [0, 0, 1, 0]


def test_reduced_snapshot_does_not_follow_the_tracker():
    # Regression: reduced() used to share tensors with the tracker, which adds in place, so every
    # later window (now.since(snapshot)) read zero and the live scalars were those of an empty window.
    tracker = LoadTracker()
    tracker.record("l", 2, torch.tensor([[0], [1]]), None, None, None, task_ids=torch.tensor([0, 1]))
    snapshot = tracker.reduced().layers["l"]
    tracker.record("l", 2, torch.tensor([[0], [0]]), None, None, None, task_ids=torch.tensor([1, 1]))
    window = tracker.reduced().layers["l"].since(snapshot)
    assert window.counts.tolist() == [2, 0] and window.task_counts.tolist() == [[0, 0], [2, 0]]
    assert window.entropy == 0.0 and window.max_share == 1.0


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, port, shards, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    tracker = LoadTracker()
    ids, tasks = shards[rank]
    tracker.record("l", 3, ids, None, None, None, task_ids=tasks)
    s = tracker.reduced().layers["l"]
    out[rank] = s.counts.tolist(), None if s.task_counts is None else s.task_counts.tolist()
    dist.destroy_process_group()


def test_task_counts_all_reduce_when_ranks_saw_different_tasks():
    # rank 0 saw tasks 0..3, rank 1 saw no task at all: the rows must still line up.
    shards = [(torch.tensor([[0], [1], [2], [2]]), torch.tensor([0, 3, 3, -1])),
              (torch.tensor([[1], [1]]), None)]
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(_free_port(), shards, out), nprocs=2, join=True)
        results = dict(out)
    want = ([1, 3, 2], [[1, 0, 0], [0, 0, 0], [0, 0, 0], [0, 1, 1]])
    assert results[0] == want and results[1] == want


# ----------------------------------------------------------------------------- store
def test_layer_round_trip_and_integral_counts_stay_integers():
    s = random_stats(0)
    enc = encode_layer(s)
    assert all(isinstance(v, int) for v in enc["counts"]) and isinstance(enc["prob_sum"][0], float)
    assert_same(decode_layer(json.loads(json.dumps(enc))), s)
    no_tasks = random_stats(1, tasks=None)
    assert "task_counts" not in encode_layer(no_tasks)
    assert decode_layer(encode_layer(no_tasks)).task_counts is None


def test_store_round_trip_append_and_reopen(tmp_path):
    store = RoutingStore(tmp_path / "routing")
    store.write_meta({"layers": [{"name": "a", "label": "a", "num_experts": 4}], "tasks": ["x", "y", "z"]})
    w1 = {"a": random_stats(1), "b": random_stats(2, num_experts=16, tasks=None)}
    store.append_window("train", 10, w1, epoch=0)
    sample = {"kind": "sample", "stage": "val", "step": 10,
              "texts": [{"tokens": ["[CLS]", "hi"], "task": 1, "label": 0,
                         "routing": {"a": {"experts": [[0, 1], [2, -1]], "weights": [[0.6, 0.4], [1.0, 0.0]]}}}]}
    store.append(sample)
    # a second writer (a resumed process) appends after the first one's records
    RoutingStore(tmp_path / "routing").append_window("val", 20, {"a": random_stats(3)}, epoch=1)
    got = read_store(tmp_path)
    assert got.problems == []
    assert got.meta["tasks"] == ["x", "y", "z"] and got.meta["format"] == "moelora-routing"
    assert [(w.stage, w.step, w.epoch) for w in got.windows] == [("train", 10, 0), ("val", 20, 1)]
    assert_same(got.windows[0].layers["a"], w1["a"])
    assert_same(got.windows[0].layers["b"], w1["b"])
    assert_same(got.windows[1].layers["a"], random_stats(3))
    assert got.samples[0]["texts"] == sample["texts"]


def test_layers_that_routed_nothing_are_not_stored(tmp_path):
    store = RoutingStore(tmp_path)
    store.append_window("train", 1, {"idle": LayerStats.empty(4)})
    assert not store.records_path.exists()
    store.append_window("train", 2, {"idle": LayerStats.empty(4), "busy": random_stats(0)})
    assert list(read_store(tmp_path).windows[0].layers) == ["busy"]


def test_partial_last_interval_is_ignored_and_earlier_data_survives(tmp_path):
    store = RoutingStore(tmp_path)
    for step in (1, 2):
        store.append_window("train", step, {"l": random_stats(step)})
    with open(store.records_path, "ab") as f:  # a crash in the middle of writing interval 3
        f.write(b'{"kind":"window","stage":"train","step":3,"layers":{"l":{"counts":[1,')
    got = read_store(tmp_path)
    assert [w.step for w in got.windows] == [1, 2]
    assert_same(got.windows[1].layers["l"], random_stats(2))
    assert len(got.problems) == 1 and "incomplete" in got.problems[0]
    # the next writer cuts the partial line off, so its own record is not glued onto it
    RoutingStore(tmp_path).append_window("train", 4, {"l": random_stats(4)})
    got = read_store(tmp_path)
    assert [w.step for w in got.windows] == [1, 2, 4] and got.problems == []


def test_invalid_lines_are_skipped_and_invalid_records_are_refused(tmp_path):
    store = RoutingStore(tmp_path)
    store.append_window("train", 1, {"l": random_stats(1)})
    bad = encode_layer(random_stats(2))
    bad["coactivation"] = bad["coactivation"][:2]  # wrong shape
    with open(store.records_path, "a") as f:
        f.write("not json\n")
        f.write(json.dumps({"kind": "window", "stage": "train", "step": 2, "layers": {"l": bad}}) + "\n")
    store.append_window("train", 3, {"l": random_stats(3)})
    got = read_store(tmp_path)
    assert [w.step for w in got.windows] == [1, 3]
    assert len(got.problems) == 2 and "coactivation" in got.problems[1]
    size = store.records_path.stat().st_size
    with pytest.raises(ValueError, match="coactivation"):
        store.append({"kind": "window", "stage": "train", "step": 4, "layers": {"l": bad}})
    with pytest.raises(ValueError, match="kind"):
        store.append({"stage": "train", "step": 4})
    assert store.records_path.stat().st_size == size


@pytest.mark.parametrize("value, ok", [
    (2.5, True), (10 ** 300, True), (1e308, True),           # 1e308 twice: the sum overflows, each is finite
    (True, False), (float("nan"), False), (float("inf"), False), (-float("inf"), False),
    (10 ** 400, False), ("3", False), (None, False), ([1], False),
], ids=lambda v: str(v)[:10])
def test_layer_vectors_hold_finite_json_numbers_only(value, ok):
    layer = encode_layer(random_stats(4))
    layer["counts"][1] = layer["counts"][2] = value
    rec = {"kind": "window", "stage": "train", "step": 1, "layers": {"l": layer}}
    # the checker is strict JSON: a bool is not a number, a number must fit a float64
    assert (record_problem(json.loads(json.dumps(rec))) is None) is ok


def test_windows_whose_expert_count_changes_are_skipped_with_the_reason(tmp_path):
    # Two runs appended to one store (older versions did that) gave raw shape errors in the report.
    from moelora.dashboard.report import build_report

    store = RoutingStore(tmp_path / "routing")
    store.write_meta({"layers": [{"name": "l", "label": "l", "num_experts": 4, "top_k": 2}]})
    store.append_window("train", 1, {"l": random_stats(1)})
    store.append_window("train", 2, {"l": random_stats(2, num_experts=8)})
    got = read_store(tmp_path)
    assert [w.step for w in got.windows] == [1]
    assert "gives layer l 8 experts where earlier windows gave 4" in got.problems[0]
    assert "8 experts where earlier windows gave 4" in build_report(tmp_path).read_text()


_WRITER = """
import sys, torch
from moelora.tracker import LoadTracker
from moelora.dashboard.store import RoutingStore
t = LoadTracker()
t.record("l", 64, torch.randint(0, 64, (500, 8)), None, None, None)
store = RoutingStore(sys.argv[1])
print("ready", flush=True)
step = 0
while True:
    step += 1
    store.append_window("train", step, {f"layer{i}": t.layers["l"] for i in range(24)})
"""


def test_killed_writer_loses_at_most_the_interval_being_written(tmp_path):
    # A real crash: SIGKILL a process that appends large windows (~0.9 MB each) back to back.
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        deadline = time.time() + 30
        while time.time() < deadline and (not (tmp_path / "records.jsonl").exists()
                                          or (tmp_path / "records.jsonl").stat().st_size < 3_000_000):
            time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    got = read_store(tmp_path)
    assert len(got.windows) >= 3
    assert [w.step for w in got.windows] == list(range(1, len(got.windows) + 1)), "no earlier interval lost"
    assert len(got.problems) <= 1  # at most the interval being written when the process died
    assert all(w.layers["layer23"].tokens == 500 for w in got.windows)


def test_find_store(tmp_path):
    with pytest.raises(FileNotFoundError, match="no routing store"):
        find_store(tmp_path)
    old = RoutingStore(tmp_path / "runs" / "version_0" / "routing")
    old.append_window("train", 1, {"l": random_stats(0)})
    new = RoutingStore(tmp_path / "runs" / "version_1" / "routing")
    new.append_window("train", 1, {"l": random_stats(0)})
    os.utime(old.records_path, (time.time() - 100, time.time() - 100))
    assert find_store(tmp_path / "runs" / "version_0") == old.root
    assert find_store(old.root) == old.root
    assert find_store(tmp_path) == new.root  # a parent: its most recently written run


def test_plus_joins_two_windows_and_undoes_since():
    # RoutingLogger sums the validation runs between two logs with plus(); the joined window of two
    # recordings equals one tracker that saw both, task rows padded as since() pads them.
    first, both = LoadTracker(), LoadTracker()
    a = (torch.tensor([[0, 1], [2, 0]]), torch.tensor([0, 1]))
    b = (torch.tensor([[1, 2]]), torch.tensor([3]))
    first.record("l", 3, a[0], None, None, None, task_ids=a[1])
    second = LoadTracker()
    second.record("l", 3, b[0], None, None, None, task_ids=b[1])
    for ids, tasks in (a, b):
        both.record("l", 3, ids, None, None, None, task_ids=tasks)
    joined = first.reduced().layers["l"].plus(second.reduced().layers["l"])
    want = both.reduced().layers["l"]
    for field in ("counts", "prob_sum", "dropped", "coactivation", "task_counts"):
        assert torch.equal(getattr(joined, field), getattr(want, field)), field
    assert (joined.tokens, joined.forwards) == (want.tokens, want.forwards) == (3, 2)
    back = joined.since(second.reduced().layers["l"])
    assert torch.equal(back.counts, first.reduced().layers["l"].counts) and back.tokens == 2
