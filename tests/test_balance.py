"""LoadTracker statistics on hand-computed routings, and the DDP all-reduce."""

import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moelora.tracker import LoadTracker


def test_statistics_by_hand():
    tracker = LoadTracker()
    ids = torch.tensor([[0, 1], [0, 2], [0, -1], [1, 0]])
    probs = torch.tensor([[0.5, 0.3, 0.2, 0.0]] * 4)
    dropped = torch.tensor([0, 0, 1, 0])
    tracker.record("layer", 4, ids, probs, dropped, None)
    s = tracker.layers["layer"]
    assert s.counts.tolist() == [4, 2, 1, 0]
    assert s.tokens == 4 and s.forwards == 1
    assert s.max_share == pytest.approx(4 / 7)
    assert s.dead_fraction == 0.25
    assert s.drop_rate == pytest.approx(1 / 8)
    p = torch.tensor([4, 2, 1]) / 7
    assert s.entropy == pytest.approx(float(-(p * p.log()).sum()) / math.log(4))
    torch.testing.assert_close(s.mean_probs, torch.tensor([0.5, 0.3, 0.2, 0.0], dtype=torch.float64))
    assert s.coactivation[0, 1] == 2 and s.coactivation[0, 2] == 1 and s.coactivation[0, 0] == 4


def test_a_repeated_expert_counts_every_slot():
    # A custom router may route two slots of a token to one expert; the kernels apply both.
    tracker = LoadTracker()
    tracker.record("l", 3, torch.tensor([[1, 1], [0, 1]]), None, None, None,
                   task_ids=torch.tensor([0, 1]), num_tasks=2)
    s = tracker.layers["l"]
    assert s.counts.tolist() == [1, 3, 0] and s.coactivation.diagonal().tolist() == [1, 3, 0]
    assert s.coactivation[0, 1] == 1 and s.coactivation[1, 0] == 1
    assert s.task_counts.tolist() == [[0, 2, 0], [1, 1, 0]]


def test_mask_excludes_padding_and_uniform_load_has_entropy_one():
    tracker = LoadTracker()
    ids = torch.tensor([[0], [1], [2], [3], [0]])
    mask = torch.tensor([True, True, True, True, False])
    tracker.record("l", 4, ids, None, None, mask)
    s = tracker.layers["l"]
    assert s.tokens == 4 and s.counts.tolist() == [1, 1, 1, 1]
    assert s.entropy == pytest.approx(1.0) and s.dead_fraction == 0.0


def _loop_statistics(batches, num_experts):
    """Float64 per-token loop over every recorded forward: the oracle for the tracker's sums."""
    E = num_experts
    counts, probs_sum, co = [0.0] * E, [0.0] * E, [[0.0] * E for _ in range(E)]
    tasks, tokens = {}, 0
    for ids, probs, mask, task in batches:
        for t in range(ids.shape[0]):
            if mask is not None and not bool(mask[t]):
                continue
            tokens += 1
            slots = [int(e) for e in ids[t] if int(e) >= 0]
            chosen = sorted(set(slots))
            for e in slots:  # every slot counts, a repeated expert too (the kernels apply each)
                counts[e] += 1
                co[e][e] += 1
                if task is not None and int(task[t]) >= 0:
                    tasks.setdefault(int(task[t]), [0.0] * E)[e] += 1
            for e in chosen:
                for f in chosen:
                    if f != e:
                        co[e][f] += 1
            for e in range(E):
                probs_sum[e] += float(probs[t, e])
    return counts, probs_sum, co, tasks, tokens


@pytest.mark.parametrize("defer_tokens, defer_entries", [(0, 1024), (64, 1024), (64, 2), (7, 1024)],
                         ids=["one-by-one", "deferred", "deferred-flushed-every-2", "mixed"])
def test_accumulated_statistics_equal_a_loop_over_tokens(defer_tokens, defer_entries):
    # Deferred small forwards are added in batches, concatenated: the sums must not change.
    g = torch.Generator().manual_seed(0)
    E, batches = 5, []
    dropped_sum = torch.zeros(E, dtype=torch.float64)
    tracker = LoadTracker()
    tracker.DEFER_MAX_TOKENS, tracker.DEFER_ENTRIES = defer_tokens, defer_entries
    for step, T in enumerate((7, 1, 12, 3, 1, 5)):
        ids = torch.randint(-1, E, (T, 2), generator=g)
        probs = torch.rand(T, E, generator=g).softmax(-1)
        mask = None if step == 3 else torch.rand(T, generator=g) > 0.3
        task = None if step == 4 else torch.randint(-1, 3, (T,), generator=g)
        dropped = torch.randint(0, 3, (E,), generator=g) if step % 2 else None
        if mask is not None:
            probs[~mask] = float("nan")  # padding rows may hold anything: they must not leak in
        tracker.record("l", E, ids, probs, dropped, mask, task_ids=task, num_tasks=None if step == 5 else 4)
        batches.append((ids, probs, None if mask is None else mask.clone(), task))
        dropped_sum += 0 if dropped is None else dropped
        if mask is not None:
            mask.fill_(True)  # the caller's tensor, refilled in place before a deferred add
        if T == 1:
            tracker.layers  # reading in the middle settles; later records still add up
    counts, probs_sum, co, tasks, tokens = _loop_statistics(batches, E)
    s = tracker.layers["l"]
    assert s.counts.tolist() == counts and s.coactivation.tolist() == co
    assert s.tokens == tokens and s.forwards == 6
    assert s.dropped.tolist() == dropped_sum.tolist()
    torch.testing.assert_close(s.prob_sum, torch.tensor(probs_sum, dtype=torch.float64))
    for task_id in range(s.task_counts.shape[0]):
        assert s.task_counts[task_id].tolist() == tasks.get(task_id, [0.0] * E)


def test_deferred_forwards_are_kept_when_recording_stops_and_dropped_by_reset():
    tracker = LoadTracker()
    tracker.record("l", 3, torch.tensor([[0], [2]]), None, None, None)
    tracker.enabled = False  # stops recording; what was recorded (but not yet added) stays
    tracker.record("l", 3, torch.tensor([[1]]), None, None, None)
    assert tracker.layers["l"].counts.tolist() == [1, 0, 1] and tracker.layers["l"].forwards == 1
    tracker.enabled = True
    tracker.record("l", 3, torch.tensor([[1]]), None, None, None)
    tracker.reset()
    assert tracker.layers == {}


def test_deferred_routings_of_layers_and_expert_counts_stay_apart():
    tracker = LoadTracker()
    tracker.record("a", 3, torch.tensor([[0, 1]]), torch.tensor([[0.5, 0.5, 0.0]]), None, None)
    tracker.record("b", 2, torch.tensor([[1]]), None, None, None)
    tracker.record("a", 3, torch.tensor([[2, 1]]), torch.tensor([[0.0, 0.25, 0.75]]), None, None)
    layers = tracker.layers
    assert layers["a"].counts.tolist() == [1, 2, 1] and layers["a"].forwards == 2
    assert layers["a"].prob_sum.tolist() == [0.5, 0.75, 0.75]
    assert layers["b"].counts.tolist() == [0, 1] and layers["b"].tokens == 1


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, port, shards, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    tracker = LoadTracker()
    tracker.record("l", 3, shards[rank], None, None, None)
    reduced = tracker.reduced()
    again = tracker.reduced()  # reducing twice must not double-count
    assert tracker.layers["l"].tokens == len(shards[rank]), "the local tracker must keep its own counts"
    assert again.layers["l"].counts.tolist() == reduced.layers["l"].counts.tolist()
    out[rank] = reduced.layers["l"].counts.tolist(), reduced.layers["l"].tokens
    dist.destroy_process_group()


def test_all_reduce_over_two_gloo_ranks():
    shards = [torch.tensor([[0], [0], [1]]), torch.tensor([[2], [2], [2], [0]])]
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(_free_port(), shards, out), nprocs=2, join=True)
        results = dict(out)
    single = LoadTracker()
    single.record("l", 3, torch.cat(shards), None, None, None)
    want = single.layers["l"].counts.tolist(), single.layers["l"].tokens
    assert results[0] == want and results[1] == want
