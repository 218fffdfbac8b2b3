"""The per-forward routing path never reads a device value back to the host.

On a GPU such a read is a device sync, and it happens in every wrapped layer of every forward:
hundreds of stalls per step. Tensors on the ``meta`` device carry no data, so any such read
(``.item()``, ``bool(t)``, ``.tolist()``, a boolean-mask index, ``bincount``'s size) raises
there: running the routing on meta tensors is a CPU-only check that no sync is left.
"""

import pytest
import torch

from moelora.kernels import build_routing_plan
from moelora.routers.flylora import FlyLoRARouter
from moelora.routers.meteora import MeteoRARouter
from moelora.routers.sira import SiRARouter
from moelora.routers.topk import TopKRouter
from moelora.tracker import LoadTracker

META = torch.device("meta")
T, D, E = 12, 8, 4


def _inputs():
    x = torch.empty(T, D, device=META)
    mask = torch.empty(T, dtype=torch.bool, device=META)
    return x, mask


def test_topk_and_sira_routers_train_and_eval_without_a_sync():
    x, mask = _inputs()
    routers = [TopKRouter(in_features=D, num_experts=E, top_k=2, noise_std=0.1, aux_loss_coef=0.01,
                          z_loss_coef=0.001),
               SiRARouter(in_features=D, num_experts=E, top_k=2, capacity_factor=1.0, expert_dropout=0.1,
                          aux_loss_coef=0.01, group_size=4)]
    for router in routers:
        router.to(META)
        for training in (True, False):
            router.train(training)
            routing = router(x, token_mask=mask)
            assert routing.expert_ids.shape == (T, 2) and routing.expert_ids.device == META


class _State:
    """The two things a MeteoRA gate reads from the model's adapter state."""

    def __init__(self, ids):
        self.task_ids, self.wrapped = ids, ["a", "b"]

    def task_ids_for(self, n):
        return self.task_ids if self.task_ids.numel() == n else None


def test_meteora_gate_loss_and_forced_routing_without_a_sync():
    x, mask = _inputs()
    router = MeteoRARouter(in_features=D, num_experts=E, top_k=2, gate_loss_coef=0.5).to(META)
    router.bind_state(_State(torch.empty(T, dtype=torch.long, device=META)))
    routing = router.train()(x, token_mask=mask)
    assert routing.aux_loss is not None and routing.aux_loss.device == META
    router.forced = torch.tensor([0.0, 0.7, 0.0, 0.3])  # select_experts keeps it on the host
    routing = router.eval()(x, token_mask=mask)
    assert routing.expert_ids.shape == (T, 2)


def test_flylora_bias_counts_and_routing_plan_without_a_sync():
    topk = torch.empty(T, 3, dtype=torch.long, device=META)
    router = FlyLoRARouter(num_ranks=8, top_k=3).to(META)
    assert router.counts(topk, torch.empty(T, dtype=torch.bool, device=META)).shape == (8,)
    plan = build_routing_plan(topk, 8, block_m=16)
    assert plan.sorted_slot_ids.device == META


@pytest.mark.parametrize("defer", [True, False], ids=["deferred", "one-by-one"])
def test_tracker_record_without_a_sync(defer):
    ids, mask = torch.empty(T, 2, dtype=torch.long, device=META), torch.empty(T, dtype=torch.bool, device=META)
    tracker = LoadTracker()
    tracker.DEFER_MAX_TOKENS = T if defer else 0
    tracker.record("l", E, ids, torch.empty(T, E, device=META), torch.empty(E, device=META), mask,
                   task_ids=torch.empty(T, dtype=torch.long, device=META), num_tasks=3)
    tracker.record("l", E, ids, torch.empty(T, E, device=META), None, None)
    tracker.record("l", E, ids, torch.empty(T, E, device=META), torch.empty(E, device=META), mask)
    assert len(tracker._deferred) == (3 if defer else 0)
    tracker._record_deferred()  # the batched add: concatenated, with filled-in masks and task ids
    pending = tracker._pending["l"]
    assert pending.forwards.device == META and pending.tokens.device == META  # counters stay on the device


class _TwoLinears(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(D, D), torch.nn.Linear(D, D)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def _method_configs():
    import moelora
    from moelora.methods.flylora import FlyLoRAConfig
    from moelora.methods.sira import SiRAConfig
    from moelora.methods.weightlora_config import WeightLoRAConfig

    common = dict(target_modules=["a", "b"])
    return [moelora.MoELoRAConfig(num_experts=E, top_k=2, rank=2, aux_loss_coef=0.01, z_loss_coef=0.01, **common),
            SiRAConfig(num_experts=E, top_k=2, rank=2, aux_loss_coef=0.01, **common),
            FlyLoRAConfig(rank=8, top_k=2, **common),
            WeightLoRAConfig(rank=2, keep=1, **common)]


def test_a_whole_training_step_and_eval_forward_without_a_sync():
    # The wrapped layers end to end (router, expert op forward and backward, aux losses, tracker)
    # on the dense-gated torch path that a GPU model takes through Triton with the same routing.
    import moelora

    for config in _method_configs():
        model = _TwoLinears()
        moelora.inject(model, config)
        model.to(META).train()
        y = model(torch.empty(3, 5, D, device=META))
        aux = moelora.aux_loss(model)
        (y.sum() if aux is None else y.sum() + aux).backward()
        model.eval()(torch.empty(3, 5, D, device=META))
        tracker = moelora.routing_stats(model)
        assert tracker._deferred, "15 tokens: deferred"
        tracker._record_deferred()  # the batched add, still without a sync
        assert tracker._pending, type(config).__name__
