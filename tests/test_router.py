"""TopKRouter and the balance losses: invariants (hypothesis) and exact values."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moelora.balance import switch_loss, z_loss
from moelora.routers import TopKRouter


@settings(max_examples=40, deadline=None)
@given(T=st.integers(1, 12), E=st.integers(1, 8), data=st.data(), renorm=st.booleans(), seed=st.integers(0, 999))
def test_topk_invariants(T, E, data, renorm, seed):
    k = data.draw(st.integers(1, E))
    torch.manual_seed(seed)
    router = TopKRouter(in_features=6, num_experts=E, top_k=k, renormalize=renorm, init_std=1.0)
    r = router(torch.randn(T, 6))
    assert r.expert_ids.shape == (T, k) and r.weights.shape == (T, k)
    # distinct experts per token, all valid
    assert all(len(set(row.tolist())) == k for row in r.expert_ids)
    assert r.expert_ids.min() >= 0 and r.expert_ids.max() < E
    assert torch.all(r.weights >= 0)
    torch.testing.assert_close(r.probs.sum(-1), torch.ones(T))
    if renorm:
        torch.testing.assert_close(r.weights.sum(-1), torch.ones(T))
    else:
        torch.testing.assert_close(r.weights, r.probs.gather(1, r.expert_ids))
    # the kept experts are the most probable ones
    kth = r.probs.gather(1, r.expert_ids).min(-1).values
    mask = torch.ones_like(r.probs, dtype=torch.bool).scatter(1, r.expert_ids, False)
    assert torch.all(r.probs.masked_fill(~mask, -1).max(-1).values <= kth + 1e-7)


def test_permuting_tokens_permutes_routing():
    torch.manual_seed(0)
    router = TopKRouter(in_features=6, num_experts=5, top_k=2, init_std=1.0)
    x = torch.randn(9, 6)
    perm = torch.randperm(9)
    a, b = router(x), router(x[perm])
    assert torch.equal(a.expert_ids[perm], b.expert_ids)
    torch.testing.assert_close(a.weights[perm], b.weights)


def test_switch_loss_is_one_when_uniform_and_larger_when_collapsed():
    E, T, k = 4, 8, 2
    probs = torch.full((T, E), 1 / E)
    ids = torch.tensor([[t % E, (t + 1) % E] for t in range(T)])
    assert switch_loss(probs, ids).item() == pytest.approx(1.0)
    collapsed = torch.zeros(T, E)
    collapsed[:, 0], collapsed[:, 1] = 0.7, 0.3
    ids = torch.tensor([[0, 1]] * T)
    # f = [0.5, 0.5, 0, 0], P = [0.7, 0.3, 0, 0] -> E * (0.35 + 0.15) = 2
    assert switch_loss(collapsed, ids).item() == pytest.approx(2.0)


def test_switch_loss_ignores_padding_and_empty_slots():
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]])
    ids = torch.tensor([[0], [1], [0]])
    mask = torch.tensor([True, True, False])
    want = switch_loss(probs[:2], ids[:2])
    assert switch_loss(probs, ids, mask).item() == pytest.approx(want.item())
    ids_empty = torch.tensor([[0], [1], [-1]])
    # f counts only real slots; P still averages all tokens
    f = torch.tensor([0.5, 0.5])
    assert switch_loss(probs, ids_empty).item() == pytest.approx(2 * (f * probs.mean(0)).sum().item())


def test_z_loss_value():
    logits = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    want = (math.log(2) ** 2 + math.log(math.e + math.e ** 2) ** 2) / 2
    assert z_loss(logits).item() == pytest.approx(want, rel=1e-6)
    exact = z_loss(logits.double())  # float64 logits (model.double()) keep float64
    assert exact.dtype == torch.float64 and exact.item() == pytest.approx(want, rel=1e-14)


def test_a_zero_router_breaks_ties_to_the_lowest_experts():
    # Equal probabilities everywhere: torch.topk's tie order is unspecified (CPU picked 3 and 5 of 6).
    from moelora.routers.meteora import MeteoRARouter
    from moelora.routers.sira import SiRARouter

    x = torch.randn(9, 6)
    cases = [(TopKRouter(in_features=6, num_experts=6, top_k=2, init_std=0.0), (True, False)),
             (MeteoRARouter(in_features=6, num_experts=6, top_k=2, init_std=0.0), (True, False)),
             (SiRARouter(in_features=6, num_experts=6, top_k=2, init_std=0.0, eval_capacity_factor=None), (False,))]
    for router, modes in cases:
        for training in modes:
            ids = router.train(training)(x).expert_ids
            assert ids.tolist() == [[0, 1]] * 9, (type(router).__name__, training)


def test_aux_loss_in_graph_only_in_training():
    torch.manual_seed(0)
    router = TopKRouter(in_features=4, num_experts=3, top_k=1, aux_loss_coef=0.5, z_loss_coef=0.1)
    x = torch.randn(10, 4)
    r = router.train()(x)
    assert r.aux_loss is not None and r.aux_loss.requires_grad
    r.aux_loss.backward()
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
    assert router.eval()(x).aux_loss is None


def test_noise_only_in_training():
    torch.manual_seed(0)
    router = TopKRouter(in_features=4, num_experts=4, top_k=2, noise_std=5.0)
    x = torch.randn(32, 4)
    router.eval()
    assert torch.equal(router(x).expert_ids, router(x).expert_ids)
    router.train()
    assert not torch.equal(router(x).expert_ids, router(x).expert_ids)


def test_router_weights_are_float32_even_for_half_inputs():
    router = TopKRouter(in_features=4, num_experts=3, top_k=2)
    r = router(torch.randn(5, 4, dtype=torch.bfloat16))
    assert router.weight.dtype == torch.float32 and r.probs.dtype == torch.float32


def test_invalid_top_k():
    with pytest.raises(ValueError, match="top_k"):
        TopKRouter(in_features=4, num_experts=3, top_k=4)


@pytest.mark.parametrize("router", ["topk", "sira"])
def test_aux_loss_of_an_empty_batch_is_zero_not_nan(router):
    # A NaN here would poison `loss + moelora.aux_loss(model)` for the whole step.
    from moelora.routers import SiRARouter

    cls = TopKRouter if router == "topk" else SiRARouter
    r = cls(in_features=6, num_experts=4, top_k=2, aux_loss_coef=0.01, z_loss_coef=0.001).train()
    assert r(torch.randn(0, 6)).aux_loss.item() == 0.0
    assert switch_loss(torch.zeros(0, 4), torch.zeros(0, 2, dtype=torch.long)).item() == 0.0
    assert z_loss(torch.zeros(0, 4)).item() == 0.0
