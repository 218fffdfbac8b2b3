"""FlyLoRA: frozen sparse A, rank-wise top-k vs a float64 per-token loop, gradients vs autograd of
that loop, the balancing-bias rule (hand case, skewed input, eval, checkpoint recompute, DDP),
save/load, and the refusal to fold into base weights."""

import json
import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.checkpoint import checkpoint

import moelora
from moelora.inject import adapter_state_dict
from moelora.methods.flylora import FlyLoRABank, sparse_projection
from moelora.routers.flylora import bias_step

# torch.utils.checkpoint imports triton on first use. Inside a test, conftest's interpreter_scope has
# TRITON_INTERPRET=0, and triton then builds its language helpers for the GPU, which breaks every
# later interpreter test in this process. Import it now, at collection, while TRITON_INTERPRET=1.
try:
    import triton  # noqa: F401
except ImportError:
    pass

D_IN, D_HID, D_OUT = 24, 16, 8


class Net(nn.Module):
    """Two linears (one nested, so module names differ in depth) over ``x [B, S, D_IN]``."""

    def __init__(self, seed=0, dtype=torch.float64):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(D_IN, D_HID).to(dtype)
        self.block = nn.Sequential(nn.Tanh(), nn.Linear(D_HID, D_OUT).to(dtype))

    def forward(self, x, attention_mask=None):
        return self.block(self.fc1(x))


def config(**kw):
    kw.setdefault("target_modules", ["fc1", "block.1"])
    kw.setdefault("rank", 8)
    kw.setdefault("top_k", 2)
    kw.setdefault("alpha", 16.0)
    kw.setdefault("adapter_dtype", "float64")
    kw.setdefault("backend", "torch")
    return moelora.FlyLoRAConfig(**kw)


def flylora_net(seed=0, B_seed=None, **kw):
    model = moelora.inject(Net(seed), config(**kw))
    if B_seed is not None:  # B = 0 at init; tests of the delta need a non-zero B
        g = torch.Generator().manual_seed(B_seed)
        with torch.no_grad():
            for layer in moelora.wrapped_layers(model):
                layer.bank.Bt.copy_(torch.randn(layer.bank.Bt.shape, generator=g, dtype=torch.float64))
    return model


def naive_delta(x, A, Bt, bias, k, score, scale):
    """Float64 per-token loop: rank c's value h_c = A_c·x; keep the k best scores (ties → lowest c)."""
    rows = []
    for t in range(x.shape[0]):
        h = A @ x[t]
        s = [float(h[c].detach()) + float(bias[c]) for c in range(len(h))]
        s = [abs(v) for v in s] if score == "abs" else s
        chosen = sorted(range(len(s)), key=lambda c: (-s[c], c))[:k]
        rows.append(sum(scale * h[c] * Bt[c] for c in chosen))
    return torch.stack(rows)


# ----------------------------------------------------------------------------- config


def test_config_defaults_round_trip_and_validation():
    cfg = moelora.FlyLoRAConfig(target_modules=["q_proj"])
    assert (cfg.rank, cfg.top_k, cfg.alpha, cfg.num_experts, cfg.score, cfg.grad_x) == (32, 8, 64.0, 32, "signed", False)
    assert cfg.bias_update_rate == 1e-3 and cfg.row_density == 8 / 32 and cfg.seed == 0 and cfg.lora_scale == 2.0
    assert cfg.nonzeros_per_row(4096) == 1024  # n // (r // k) of the PEFT code, = floor(n·k/r)
    assert moelora.FlyLoRAConfig(target_modules=["q"], density=0.29).nonzeros_per_row(100) == 29  # not 28.99…
    assert moelora.FlyLoRAConfig(target_modules=["q"], rank=10, top_k=3).nonzeros_per_row(384) == 115
    assert moelora.FlyLoRAConfig(target_modules=["q"], density=0.001).nonzeros_per_row(100) == 1
    again = moelora.config_from_dict(json.loads(cfg.to_json()))
    assert again == cfg and type(again) is moelora.FlyLoRAConfig
    for bad, field in [(dict(score="max"), "score"), (dict(bias_update_rate=-1.0), "bias_update_rate"),
                       (dict(bias_update_rate=math.inf), "bias_update_rate"), (dict(density=0.0), "density"),
                       (dict(density=1.5), "density"), (dict(rank=8, num_experts=4), "num_experts"),
                       (dict(rank=8, top_k=9), "top_k"), (dict(seed=None), "seed"), (dict(grad_x="yes"), "grad_x"),
                       (dict(aux_loss_coef=0.01), "aux_loss_coef"), (dict(router_noise_std=1.0), "router_noise_std"),
                       (dict(count_padding=1), "count_padding"), (dict(rank=0), "rank")]:
        with pytest.raises(ValueError, match=f"`{field}`"):
            moelora.FlyLoRAConfig(target_modules=["q_proj"], **bad)


# ----------------------------------------------------------------------------- A


def test_sparse_projection_has_p_nonzeros_per_row_from_normal_with_std_1_over_r():
    r, d, p = 16, 2048, 512
    A = sparse_projection(r, d, p, torch.Generator().manual_seed(0))
    assert A.shape == (r, d) and A.dtype == torch.float32
    assert (A != 0).sum(1).tolist() == [p] * r
    values = A[A != 0].double()
    n = values.numel()
    sigma = 1 / r
    assert abs(float(values.mean())) < 4 * sigma / math.sqrt(n)
    assert float(values.std()) == pytest.approx(sigma, rel=0.03)
    for z, share in ((1, 0.6827), (2, 0.9545)):  # normal, not merely right-variance
        assert float((values.abs() < z * sigma).double().mean()) == pytest.approx(share, abs=0.015)
    # Positions uniform without replacement: each column is hit r·p/d = 4 times on average.
    hits = (A != 0).sum(0).double()
    assert float(hits.mean()) == r * p / d and float(hits[: d // 2].sum()) == pytest.approx(r * p / 2, rel=0.05)
    assert not torch.equal(A[0] != 0, A[1] != 0)


@pytest.mark.parametrize("density,expected", [(None, 24 * 2 // 8), (0.5, 12), (0.01, 1)])
def test_injected_A_is_a_frozen_buffer_with_configured_density(density, expected):
    model = flylora_net(density=density)
    for layer in moelora.wrapped_layers(model):
        A = layer.bank.A
        assert isinstance(layer.bank, FlyLoRABank) and "A" in dict(layer.bank.named_buffers())
        assert not A.requires_grad and "A" not in dict(layer.bank.named_parameters())
        want = max(1, int((density or 2 / 8) * layer.in_features))
        assert (A != 0).sum(1).tolist() == [want] * 8
    assert (model.fc1.bank.A != 0).sum(1)[0] == expected
    model.requires_grad_(True)  # even so, A can never be trained
    assert not model.fc1.bank.A.requires_grad
    assert [n for n, p in model.named_parameters() if p.requires_grad and ".bank." in n] == \
        ["fc1.bank.Bt", "block.1.bank.Bt"]


def test_A_is_shared_by_seed_and_module_name_and_differs_across_modules():
    a, b = flylora_net(seed=0), flylora_net(seed=5)  # other base weights, same adapter seed
    reordered = moelora.inject(Net(1), config(target_modules=["block.1", "fc1"]))
    for name in ("fc1", "block.1"):
        A = a.get_submodule(name).bank.A
        assert torch.equal(A, b.get_submodule(name).bank.A)
        assert torch.equal(A, reordered.get_submodule(name).bank.A)
    assert not torch.equal(a.fc1.bank.A[:, :D_HID], a.block[1].bank.A)
    other = moelora.inject(Net(0), config(seed=1))
    assert not torch.equal(a.fc1.bank.A, other.fc1.bank.A)


# ----------------------------------------------------------------------------- forward


def test_B_zero_gives_the_base_output():
    x = torch.randn(2, 5, D_IN, dtype=torch.float64)
    base = Net(0)(x)
    model = flylora_net()
    assert torch.equal(model(x), base)
    model.eval()
    assert torch.equal(model(x), base)


@pytest.mark.parametrize("score", ["signed", "abs"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_layer_equals_float64_loop_over_chosen_ranks(score, with_bias):
    model = flylora_net(B_seed=1, score=score).eval()
    layer = model.fc1
    if with_bias:
        layer.router.bias.copy_(torch.randn(8, generator=torch.Generator().manual_seed(2)) * 0.3)
    x = torch.randn(3, 4, D_IN, dtype=torch.float64)
    got = layer(x)
    flat = x.reshape(-1, D_IN)
    want = layer.base_layer(flat) + naive_delta(flat, layer.bank.A, layer.bank.Bt, layer.router.bias.double(),
                                                2, score, 16.0 / 8)
    torch.testing.assert_close(got.reshape(-1, D_HID), want, rtol=1e-12, atol=1e-12)
    # The chosen ranks are reported to the tracker as expert ids (k per token).
    stats = moelora.routing_stats(model).layers["fc1"]
    assert stats.counts.sum() == 12 * 2 and stats.num_experts == 8


@pytest.mark.parametrize("grad_x", [True, False])
def test_gradients_match_autograd_of_the_loop(grad_x):
    model = flylora_net(B_seed=3, grad_x=grad_x, score="abs").eval()
    layer = model.fc1
    layer.router.bias.copy_(torch.linspace(-0.2, 0.2, 8, dtype=torch.float32))
    x = torch.randn(6, D_IN, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(6, D_HID, dtype=torch.float64)
    (layer(x) * upstream).sum().backward()

    x2 = x.detach().clone().requires_grad_(True)
    Bt = layer.bank.Bt.detach().clone().requires_grad_(True)
    x_for_adapter = x2 if grad_x else x2.detach()  # grad_x off: the adapter sees a constant x
    ref = layer.base_layer(x2) + naive_delta(x_for_adapter, layer.bank.A, Bt, layer.router.bias.double(), 2,
                                             "abs", 2.0)
    (ref * upstream).sum().backward()
    torch.testing.assert_close(layer.bank.Bt.grad, Bt.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-12, atol=1e-12)
    if not grad_x:  # nothing but the base path reaches x
        torch.testing.assert_close(x.grad, upstream @ layer.base_layer.weight, rtol=1e-12, atol=1e-12)


def test_only_the_top_k_rows_of_B_get_gradient():
    model = flylora_net(B_seed=4).eval()
    layer = model.fc1
    for t in range(4):
        layer.bank.Bt.grad = None
        x = torch.randn(1, D_IN, dtype=torch.float64, generator=torch.Generator().manual_seed(t))
        layer(x).sum().backward()
        rows = set(torch.nonzero(layer.bank.Bt.grad.abs().sum(1)).flatten().tolist())
        assert rows == set(layer.last_expert_ids[0].tolist()) and len(rows) == 2


# ----------------------------------------------------------------------------- balancing bias


def hand_net(count_padding):
    """fc1 with A = identity on the first 8 inputs: token e_i·5 picks rank i (k = 1, signed)."""
    model = moelora.inject(Net(0), config(target_modules=["fc1"], top_k=1, bias_update_rate=0.25,
                                          count_padding=count_padding))
    with torch.no_grad():
        model.fc1.bank.A.copy_(torch.eye(8, D_IN, dtype=torch.float64))
    return model


@pytest.mark.parametrize("count_padding,want", [(False, [-0.25, -0.25, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25]),
                                                (True, [-0.25, -0.25, 0.0, 0.25, 0.25, 0.25, 0.25, 0.25])])
def test_bias_update_rule_on_a_hand_case(count_padding, want):
    model = hand_net(count_padding).train()
    chosen = [0, 0, 1, 2, 1, 1, 1, 1]  # the rank each token picks; the last 5 are padding
    x = torch.zeros(1, 8, D_IN, dtype=torch.float64)
    for t, rank in enumerate(chosen):
        x[0, t, rank] = 5.0
    mask = torch.tensor([[1, 1, 1, 0, 0, 0, 0, 0]])
    model(x, attention_mask=mask)
    assert model.fc1.last_expert_ids.flatten().tolist() == chosen
    # real tokens only: c = [2, 1, 0, ...], Σc = 3, r = 8 → sign(3 − 8c) = [−, −, +, +, ...]
    # padding counted:  c = [2, 5, 1, 0, ...], Σc = 8 → sign(8 − 8c) = [−, −, 0, +, ...]  (c_2 = mean)
    assert model.fc1.router.bias.tolist() == want
    # The tracker never counts padding, whatever the bias rule does.
    assert moelora.routing_stats(model).layers["fc1"].counts.tolist()[:3] == [2, 1, 0]
    model.eval()
    model(x, attention_mask=mask)
    assert model.fc1.router.bias.tolist() == want


def test_bias_moves_counts_toward_balance_and_not_in_eval():
    model = moelora.inject(Net(0), config(target_modules=["fc1"], bias_update_rate=0.02)).train()
    g = torch.Generator().manual_seed(0)
    direction = torch.randn(D_IN, generator=g, dtype=torch.float64)
    x = direction + 0.05 * torch.randn(4, 16, D_IN, generator=g, dtype=torch.float64)  # skewed: one direction

    def share_of_top_two():
        ids = model.fc1.last_expert_ids.flatten()
        counts = torch.bincount(ids, minlength=8).sort(descending=True).values
        return float(counts[:2].sum() / counts.sum())

    model.eval()
    with torch.no_grad():
        model(x)
    assert share_of_top_two() > 0.95, "the input must start fully skewed onto two ranks"
    assert torch.count_nonzero(model.fc1.router.bias) == 0, "eval must not change the bias"
    model.train()
    with torch.no_grad():
        window = []
        for step in range(200):
            model(x)
            if step >= 150:
                window.append(model.fc1.last_expert_ids.flatten())
    counts = torch.bincount(torch.cat(window), minlength=8).double()
    assert float(counts.max() / counts.sum()) < 0.25 and int((counts == 0).sum()) == 0
    frozen = model.fc1.router.bias.clone()
    model.eval()
    with torch.no_grad():
        for _ in range(3):
            model(x)
    assert torch.equal(model.fc1.router.bias, frozen)


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpoint_recompute_neither_updates_nor_reroutes(reentrant):
    """With a large u every update flips the top-k, so a recompute that updated or routed with the
    updated bias would change the counts, the bias or the gradients."""
    x = torch.randn(2, 6, D_IN, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    results = []
    for use_checkpoint in (False, True):
        model = flylora_net(B_seed=5, bias_update_rate=1.0).train()
        xi = x.clone().requires_grad_(True)
        for _ in range(2):  # two steps: the second routes with the first's update
            out = checkpoint(model, xi, use_reentrant=reentrant) if use_checkpoint else model(xi)
            out.square().sum().backward()
        stats = moelora.routing_stats(model).layers
        results.append(({n: l.router.bias.clone() for n, l in ((l.name, l) for l in moelora.wrapped_layers(model))},
                        {n: (s.counts.clone(), s.forwards) for n, s in stats.items()},
                        [l.bank.Bt.grad.clone() for l in moelora.wrapped_layers(model)], xi.grad.clone()))
    (bias0, counts0, grads0, gx0), (bias1, counts1, grads1, gx1) = results
    assert bias0.keys() == bias1.keys() and all(torch.equal(bias0[n], bias1[n]) for n in bias0)
    assert all(torch.equal(counts0[n][0], counts1[n][0]) and counts0[n][1] == counts1[n][1] == 2 for n in counts0)
    for g0, g1 in zip(grads0, grads1):
        torch.testing.assert_close(g0, g1, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx0, gx1, rtol=1e-12, atol=1e-12)
    # Sensitivity: routing this x with the updated bias picks other ranks than the first forward did.
    probe = flylora_net(B_seed=5, bias_update_rate=1.0).train()
    with torch.no_grad():
        probe(x)
        first = probe.fc1.last_expert_ids.clone()
        probe.eval()
        probe(x)
    assert not torch.equal(first, probe.fc1.last_expert_ids)


@pytest.mark.parametrize("reentrant", [False, True])
def test_two_forwards_sharing_one_backward_recompute_with_their_own_bias(reentrant):
    """Forward 2 routes with forward 1's update; with moelora.checkpoint each recomputation must
    route with the bias its own forward used (not the last one), or the gradients change."""
    g = torch.Generator().manual_seed(8)
    x1, x2 = (torch.randn(2, 6, D_IN, dtype=torch.float64, generator=g) for _ in range(2))
    grads = []
    for use_checkpoint in (False, True):
        model = flylora_net(B_seed=5, bias_update_rate=1.0).train()
        run = (lambda x: moelora.checkpoint(model, model, x, use_reentrant=reentrant)) if use_checkpoint else model
        xs = [x.clone().requires_grad_(True) for x in (x1, x2)]
        (run(xs[0]).square().sum() + run(xs[1]).square().sum()).backward()
        grads.append([l.bank.Bt.grad.clone() for l in moelora.wrapped_layers(model)] + [x.grad for x in xs])
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g1, g0, rtol=1e-12, atol=1e-12)


def test_save_load_reproduces_outputs_and_bias(tmp_path):
    model = flylora_net(B_seed=6, bias_update_rate=0.1).train()
    x = torch.randn(2, 5, D_IN, dtype=torch.float64)
    with torch.no_grad():
        for _ in range(3):
            model(x)
    assert torch.count_nonzero(model.fc1.router.bias) > 0
    model.eval()
    want = model(x)
    moelora.save_adapter(model, tmp_path / "a")
    loaded = moelora.load_adapter(Net(0), tmp_path / "a").eval()
    for a, b in zip(moelora.wrapped_layers(model), moelora.wrapped_layers(loaded)):
        assert isinstance(b, moelora.FlyLoRALinear) and b.grad_x == a.grad_x
        saved, back = adapter_state_dict(a), adapter_state_dict(b)
        assert set(saved) == {"bank.A", "bank.Bt", "bank.scale", "router.bias"} == set(back)
        assert all(torch.equal(saved[k], back[k]) for k in saved)
    assert torch.equal(loaded(x), want)


# ----------------------------------------------------------------------------- no folding


def test_folding_flylora_into_base_weights_is_refused(tmp_path):
    model = flylora_net(B_seed=8).eval()
    x = torch.randn(3, D_IN, dtype=torch.float64)
    before = model(x)
    with pytest.raises(ValueError, match="FlyLoRA.*merge_flylora"):
        moelora.merge_into_base(model)
    with pytest.raises(ValueError, match="not a fixed weight delta"):
        moelora.export_lora_adapters(model, tmp_path / "peft")
    moelora.save_adapter(model, tmp_path / "saved")
    from moelora.lora_export import export_saved_adapter

    with pytest.raises(ValueError, match="not a fixed weight delta"):
        export_saved_adapter(tmp_path / "saved", tmp_path / "peft", collapse=[1.0] * 8)
    assert not (tmp_path / "peft").exists()
    assert isinstance(model.fc1, moelora.FlyLoRALinear) and torch.equal(model(x), before)


def test_merge_into_base_folds_single_expert_lora_exactly_and_refuses_routed():
    x = torch.randn(4, D_IN, dtype=torch.float64)
    for E, ok in ((1, True), (2, False)):
        cfg = moelora.MoELoRAConfig(target_modules=["fc1", "block.1"], num_experts=E, top_k=1, rank=4,
                                    adapter_dtype="float64", seed=0)
        model = moelora.inject(Net(0), cfg).eval()
        with torch.no_grad():
            for layer in moelora.wrapped_layers(model):
                layer.bank.Bt.normal_()
        want = model(x)
        if ok:
            merged = moelora.merge_into_base(model)
            assert isinstance(merged.fc1, nn.Linear) and not moelora.wrapped_layers(merged)
            torch.testing.assert_close(merged(x), want, rtol=1e-10, atol=1e-10)
        else:
            with pytest.raises(ValueError, match="num_experts=2"):
                moelora.merge_into_base(model)
            assert torch.equal(model(x), want)


# ----------------------------------------------------------------------------- DDP


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, port, shards, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    model = flylora_net(B_seed=9, bias_update_rate=0.05).train()
    with torch.no_grad():
        for step in shards[rank]:
            model(step)
    out[rank] = [layer.router.bias.tolist() for layer in moelora.wrapped_layers(model)]
    dist.destroy_process_group()


def test_ddp_ranks_keep_identical_biases_equal_to_one_process_on_all_tokens():
    g = torch.Generator().manual_seed(10)
    skew = torch.randn(D_IN, generator=g, dtype=torch.float64)
    # Rank 0 sees skewed tokens, rank 1 ordinary ones: local-only updates would disagree.
    shards = [[skew + 0.1 * torch.randn(1, 6, D_IN, generator=g, dtype=torch.float64) for _ in range(3)],
              [torch.randn(1, 4, D_IN, generator=g, dtype=torch.float64) for _ in range(3)]]
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_ddp_worker, args=(_free_port(), shards, out), nprocs=2, join=True)
        results = dict(out)
    single = flylora_net(B_seed=9, bias_update_rate=0.05).train()
    local = flylora_net(B_seed=9, bias_update_rate=0.05).train()
    with torch.no_grad():
        for s0, s1, in zip(*shards):
            single(torch.cat([s0.reshape(-1, D_IN), s1.reshape(-1, D_IN)]))
            local(s0)
    want = [layer.router.bias.tolist() for layer in moelora.wrapped_layers(single)]
    assert results[0] == results[1] == want
    assert want != [layer.router.bias.tolist() for layer in moelora.wrapped_layers(local)]


# ----------------------------------------------------------------------------- Triton path


@pytest.mark.triton
def test_layer_on_the_triton_kernels_matches_the_torch_path():
    pytest.importorskip("triton")
    x = torch.randn(2, 5, D_IN, generator=torch.Generator().manual_seed(11))
    outs = []
    for backend in ("torch", "triton"):
        model = moelora.inject(Net(0, dtype=torch.float32), config(adapter_dtype="float32", backend=backend,
                                                                    grad_x=True, score="abs"))
        with torch.no_grad():
            for layer in moelora.wrapped_layers(model):
                layer.bank.Bt.copy_(torch.randn(layer.bank.Bt.shape, generator=torch.Generator().manual_seed(12)))
        model.train()
        xi = x.clone().requires_grad_(True)
        model(xi).square().sum().backward()
        outs.append((model.fc1.router.bias.clone(), model.fc1.bank.Bt.grad.clone(), xi.grad.clone()))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_half_precision_cast_keeps_the_balancing_bias_float32():
    # After model.bfloat16() the bias was bf16: a ±1e-3 step vanished where |d| ≥ 0.5 and was
    # doubled where 0.25 ≤ |d| < 0.5, so balancing silently stopped or overshot.
    from moelora.routers.flylora import FlyLoRARouter

    start = torch.tensor([0.6, -0.6, 0.3, -0.3, 0.1, 0.0, 0.7, -0.7])
    routers = {}
    for dtype in (None, torch.bfloat16, torch.float16, torch.float64):
        router = FlyLoRARouter(num_ranks=8, top_k=2, bias_update_rate=1e-3)
        router.bias.copy_(start)
        if dtype is not None:
            router.to(dtype)
        for _ in range(5):  # ranks 0 and 1 always chosen: they step down, the others up
            router.update(torch.tensor([[0, 1], [0, 1], [1, 0]]))
        routers[dtype] = router
    want = routers[None].bias
    torch.testing.assert_close(want, start + 5e-3 * torch.tensor([-1, -1, 1, 1, 1, 1, 1, 1.0]))
    for dtype in (torch.bfloat16, torch.float16):
        assert routers[dtype].bias.dtype == torch.float32 and torch.equal(routers[dtype].bias, want), dtype
    assert routers[torch.float64].bias.dtype == torch.float64
    torch.testing.assert_close(routers[torch.float64].bias.float(), want)
