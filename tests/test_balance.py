"""LoadTracker statistics on hand-computed routings, and the DDP all-reduce."""

import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moelora.balance import LoadTracker


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


def test_accumulated_statistics_equal_a_loop_over_tokens():
    g = torch.Generator().manual_seed(0)
    E, batches = 5, []
    tracker = LoadTracker()
    for T in (7, 1, 12):
        ids = torch.randint(-1, E, (T, 2), generator=g)
        probs = torch.rand(T, E, generator=g).softmax(-1)
        mask = torch.rand(T, generator=g) > 0.3
        task = torch.randint(-1, 3, (T,), generator=g)
        probs[~mask] = float("nan")  # padding rows may hold anything: they must not leak in
        tracker.record("l", E, ids, probs, None, mask, task_ids=task, num_tasks=4)
        batches.append((ids, probs, mask, task))
        if T == 1:
            tracker.layers  # reading in the middle settles; later records still add up
    counts, probs_sum, co, tasks, tokens = _loop_statistics(batches, E)
    s = tracker.layers["l"]
    assert s.counts.tolist() == counts and s.coactivation.tolist() == co
    assert s.tokens == tokens and s.forwards == 3
    torch.testing.assert_close(s.prob_sum, torch.tensor(probs_sum, dtype=torch.float64))
    for task_id in range(s.task_counts.shape[0]):
        assert s.task_counts[task_id].tolist() == tasks.get(task_id, [0.0] * E)




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
