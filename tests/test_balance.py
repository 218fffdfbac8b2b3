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


def test_mask_excludes_padding_and_uniform_load_has_entropy_one():
    tracker = LoadTracker()
    ids = torch.tensor([[0], [1], [2], [3], [0]])
    mask = torch.tensor([True, True, True, True, False])
    tracker.record("l", 4, ids, None, None, mask)
    s = tracker.layers["l"]
    assert s.tokens == 4 and s.counts.tolist() == [1, 1, 1, 1]
    assert s.entropy == pytest.approx(1.0) and s.dead_fraction == 0.0


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
