"""MoE modes of train_moe.py: dispatch, routers, balancing, hash routing, export, compile, whole runs."""
import json
import re
from types import SimpleNamespace

import pytest
import torch

import quack_stand_in
import train_moe as tm
from conftest import DENSE, ONE_MICRO_BATCH, on_gloo_ranks, run_trainer, tiny_env

SMALL = {**DENSE, "MODEL_DIM": "32", "NUM_HEADS": "4", "NUM_KV_HEADS": "2", "TRAIN_SEQ_LEN": "16", "TRAIN_BATCH_TOKENS": "128",
         "VOCAB_SIZE": "64", "NUM_LAYERS": "2", "NUM_EXPERTS": "4", "TOP_K": "2", "EXPERT_HIDDEN": "16"}


def config(**overrides) -> tm.Hyperparameters:
    return tm.Hyperparameters({**SMALL, "MLP_MODE": "sparse", **{k: str(v) for k, v in overrides.items()}})


def randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Zero-initialised output weights would hide errors in the expert path."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


# ---------------------------------------------------------------- dispatch

def naive_experts(bank: tm.ExpertBank, x, idx, weights):
    """Per-expert Python loop: the obviously correct reference for ExpertBank.grouped."""
    out = torch.zeros(*idx.shape, x.size(-1))
    for e in range(bank.w_in.size(0)):
        tok, slot = (idx == e).nonzero(as_tuple=True)
        h = tm.activate(x[tok] @ bank.w_in[e].T, bank.act)
        out = out.index_put((tok, slot), h @ bank.w_out[e].T)
    return (out * weights[..., None]).sum(dim=1)


@pytest.mark.parametrize("act", ["relu2", "swiglu"])
def test_grouped_dispatch_matches_per_expert_loop_with_an_empty_expert(act):
    torch.manual_seed(0)
    bank = tm.ExpertBank(num_experts=5, dim=16, hidden=8, act=act)
    randomize(bank)
    x = torch.randn(12, 16)
    idx = torch.randint(0, 4, (12, 2))  # expert 4 receives nothing
    idx[:, 1] = (idx[:, 0] + 1) % 4
    counts = torch.zeros(5).scatter_add_(0, idx.flatten(), torch.ones(24))
    weights = torch.rand(12, 2)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    w1, w2 = weights.clone().requires_grad_(), weights.clone().requires_grad_()
    got = bank.grouped(x1, idx, w1, counts)
    grads = torch.autograd.grad(got.square().sum(), [x1, w1, bank.w_in, bank.w_out])
    want = naive_experts(bank, x2, idx, w2)
    ref_grads = torch.autograd.grad(want.square().sum(), [x2, w2, bank.w_in, bank.w_out])
    torch.testing.assert_close(got, want)
    for g, r in zip(grads, ref_grads):  # the routing weights' gradients sum over hidden units in another order
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)
    assert counts[4] == 0
    assert torch.equal(grads[2][4], torch.zeros_like(grads[2][4])) and torch.equal(grads[3][4], torch.zeros_like(grads[3][4]))


def test_weight_gradient_groups_cut_experts_at_chunk_boundaries():
    # Rows 0-9 go to expert 1 and rows 10-11 to expert 2; 3 chunks end at rows 4, 8 and 12.
    offsets, cuts, cut_expert = tm.expert_groups(torch.tensor([0.0, 10.0, 2.0, 0.0]), chunks=3)
    assert offsets.tolist() == [0, 10, 12, 12] and offsets.dtype == torch.int32
    assert cuts.tolist() == [0, 4, 8, 10, 12, 12, 12]
    assert cut_expert.tolist() == [1, 1, 1, 1, 2, 3, 3]  # empty groups may name any expert: they add zeros


def test_grouped_gradients_when_one_expert_takes_every_slot():
    torch.manual_seed(1)
    bank = tm.ExpertBank(num_experts=4, dim=16, hidden=8, act="relu2")
    randomize(bank)
    x = torch.randn(20, 16)
    idx = torch.stack([torch.full((20,), 2), torch.full((20,), 0)], dim=1)  # expert 2 first, expert 0 second
    counts = torch.tensor([20.0, 0.0, 20.0, 0.0])
    weights = torch.rand(20, 2)
    got = bank.grouped(x, idx, weights, counts)
    grads = torch.autograd.grad(got.square().sum(), [bank.w_in, bank.w_out])
    ref_grads = torch.autograd.grad(naive_experts(bank, x, idx, weights).square().sum(), [bank.w_in, bank.w_out])
    for g, r in zip(grads, ref_grads):  # scaled before the second matmul: summed in another order
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)
        assert g[1].abs().sum() == 0 and g[3].abs().sum() == 0 and g[2].abs().sum() > 0


def stand_in_quack(monkeypatch) -> list[str]:
    """tests/quack_stand_in.py as train_moe's QuACK; the list it returns names each GEMM called, in order."""
    calls = []

    def counted(name):
        def call(*args, **kwargs):
            calls.append(name)
            return getattr(quack_stand_in, name)(*args, **kwargs)
        return call

    monkeypatch.setattr(tm, "quack", SimpleNamespace(**{n: counted(n) for n in ("gemm", "gemm_act", "gemm_dact")}))
    return calls


@pytest.mark.parametrize("act", ["relu2", "leaky_relu2", "swiglu"])
def test_quack_experts_compute_what_the_torch_path_computes(act, monkeypatch):
    """QuackExperts' wiring (gathers, transposes, the epilogue's scale and reduction, the weight-gradient cuts) on
    a stand-in for QuACK's three GEMMs: output and every gradient as the torch path's, in bf16, with an empty
    expert and one taking most slots. The real kernels: tests/test_gpu.py."""
    calls = stand_in_quack(monkeypatch)
    torch.manual_seed(0)
    bank = tm.ExpertBank(num_experts=5, dim=32, hidden=16, act=act)
    randomize(bank)
    x, probe = torch.randn(60, 32).bfloat16(), torch.randn(60, 32)
    idx = torch.stack([torch.where(torch.rand(60) < 0.7, 1, torch.randint(0, 4, (60,))), torch.randint(0, 4, (60,))], 1)
    idx[:, 1] = torch.where(idx[:, 1] == idx[:, 0], (idx[:, 0] + 1) % 4, idx[:, 1])  # expert 4 gets nothing
    counts = torch.zeros(5).scatter_add_(0, idx.flatten(), torch.ones(120))
    weights = torch.rand(60, 2)
    results = {}
    for kernel in ("torch", "quack"):
        bank.kernel = kernel
        xi, wi = x.clone().requires_grad_(), weights.clone().requires_grad_()
        out = bank.grouped(xi, idx, wi, counts)
        results[kernel] = (out, *torch.autograd.grad((out * probe).sum(), [xi, wi, bank.w_in, bank.w_out]))
    assert calls == ["gemm_act", "gemm", "gemm_dact", "gemm", "gemm", "gemm"]
    for name, got, want in zip(["output", "x", "weights", "w_in", "w_out"], results["quack"], results["torch"]):
        assert got.shape == want.shape, name
        assert (got.float() - want.float()).norm() / want.float().norm() < 1e-2, name
    assert results["quack"][3][4].abs().sum() == 0 and results["quack"][4][4].abs().sum() == 0


def test_forwards_without_gradients_do_not_call_quack(monkeypatch):
    """Evaluation and calibration run without gradients, at shapes training never saw: QuACK would autotune each one
    (its tuning keys on every tensor's shape), on the clock when GPTQ's stages are cut. They take the torch path."""
    calls = stand_in_quack(monkeypatch)
    torch.manual_seed(0)
    bank = tm.ExpertBank(num_experts=4, dim=32, hidden=16, act="relu2")
    randomize(bank)
    x, idx, weights = torch.randn(24, 32).bfloat16(), torch.randint(0, 4, (24, 2)), torch.rand(24, 2)
    idx[:, 1] = (idx[:, 0] + 1) % 4
    counts = torch.zeros(4).scatter_add_(0, idx.flatten(), torch.ones(48))
    outputs = {}
    for kernel in ("torch", "quack"):
        bank.kernel = kernel
        with torch.no_grad():
            outputs[kernel] = bank.grouped(x, idx, weights, counts)
    assert calls == [] and torch.equal(outputs["quack"], outputs["torch"])
    with torch.enable_grad():
        bank.grouped(x, idx, weights, counts)
    assert calls == ["gemm_act", "gemm"]  # with gradients, QuACK runs


def test_expert_kernel_quack_without_a_hopper_gpu_is_a_config_error():
    if torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0):
        pytest.skip("an sm90 GPU is here")
    with pytest.raises(tm.ConfigError, match=r"^EXPERT_KERNEL=quack: needs a CUDA GPU of compute capability 9.0"):
        config(EXPERT_KERNEL="quack")
    assert config().expert_kernel == config(EXPERT_KERNEL="torch").expert_kernel == "torch"  # auto falls back


@pytest.mark.parametrize("installed", [True, False])
def test_the_environment_lines_give_quacks_versions(monkeypatch, installed):
    """Where QuACK runs, the log's environment names its packages' versions; a QuACK imported from a source checkout
    (no package metadata) is said to be one, where importlib.metadata.version would raise."""
    def dist(name, version):
        return SimpleNamespace(metadata={"Name": name}, version=version)

    found = [dist("numpy", "2.0"), dist("quack-kernels", "0.6.5"), dist("nvidia-cutlass-dsl", "4.7.1")] if installed else []
    monkeypatch.setattr(tm, "quack", SimpleNamespace())
    monkeypatch.setattr(tm.importlib.metadata, "distributions", lambda: found)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(tm.subprocess, "run", lambda *args, **kwargs: SimpleNamespace(stdout="nvidia-smi table"))
    lines = tm.environment_report(torch.device("cuda")).splitlines()
    assert lines[2] == ("quack-kernels 0.6.5 nvidia-cutlass-dsl 4.7.1" if installed else
                        "quack-kernels (a source checkout, no installed package)")
    assert lines[1].endswith("gpu NVIDIA H100 80GB HBM3") and lines[3] == "nvidia-smi table"


def test_top_k_matches_torch_topk():
    scores = torch.randn(300, 8)
    for k in (1, 2, 3, 8):
        values, idx = tm.top_k(scores, k)
        want = scores.topk(k, dim=-1)
        assert torch.equal(idx, want.indices) and torch.equal(values, want.values)


def test_soft_mode_is_the_gate_weighted_sum_of_all_experts():
    torch.manual_seed(0)
    layer = tm.MoEMLP(config(MLP_MODE="soft"), 0)
    randomize(layer)
    x = torch.randn(2, 5, 32)
    y, _ = layer(x, torch.zeros(2, 5, dtype=torch.long))
    flat = x.reshape(-1, 32)
    gates = (flat @ layer.router.T).softmax(-1)
    want = sum(gates[:, e : e + 1] * (tm.activate(flat @ layer.experts.w_in[e].T, "leaky_relu2") @ layer.experts.w_out[e].T) for e in range(4))
    torch.testing.assert_close(y.reshape(-1, 32), want)


def test_soft_mode_is_causal():
    torch.manual_seed(0)
    cfg = tm.Hyperparameters({**SMALL, "MLP_MODE": "soft"})
    model = tm.GPT(cfg)
    randomize(model)
    ids = torch.randint(0, 64, (1, 16))
    changed = ids.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 64
    a, _ = model.logits(ids)
    b, _ = model.logits(changed)
    torch.testing.assert_close(a[0, :10], b[0, :10])
    assert not torch.allclose(a[0, 10:], b[0, 10:])


# ---------------------------------------------------------------- routers

def test_softmax_router_aux_and_z_loss_by_hand():
    layer = tm.MoEMLP(config(MOE_AUX_COEF=0.01, ROUTER_Z_COEF=0.001), 0)
    x = torch.randn(6, 32)
    idx, weights, counts, aux = layer.route(x, torch.zeros(6, dtype=torch.long))
    logits = x @ layer.router.T
    probs = logits.softmax(-1)
    f = torch.stack([(idx == e).sum() for e in range(4)]).float() / 12
    want = 0.01 * 4 * (f * probs.mean(0)).sum() + 0.001 * logits.logsumexp(-1).square().mean()
    torch.testing.assert_close(aux, want)
    torch.testing.assert_close(weights, probs.gather(-1, idx))
    assert (weights.sum(-1) < 1).all()  # norm_topk_prob=0: the raw probabilities, not renormalized
    assert torch.equal(counts, f * 12)


def test_router_logits_stay_fp32_under_autocast_and_pick_near_tied_experts_exactly():
    layer = tm.MoEMLP(config(NUM_EXPERTS=4, TOP_K=1), 0)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # experts 0 and 1 nearly tied for every token: bf16 logits would round them together
        layer.router.copy_(torch.randn(4, 32, generator=g) * 0.02)
        layer.router[0] = 0.5 * torch.ones(32)
        layer.router[1] = layer.router[0] + 1e-4 * torch.randn(32, generator=g)
    x = (torch.rand(64, 32, generator=g) + 0.5).bfloat16()
    want = (x.double() @ layer.router.double().T).argmax(-1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (x.float() @ layer.router.float().T).dtype == torch.bfloat16  # what autocast does to a plain matmul
        idx, _, _, _ = layer.route(x, torch.zeros(64, dtype=torch.long))
        logits = tm.Fp32Logits.apply(x, layer.router)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits.double(), x.double() @ layer.router.double().T, rtol=1e-6, atol=1e-6)
    assert torch.equal(idx[:, 0], want) and set(want.tolist()) == {0, 1}


def test_router_logit_gradients_match_a_float64_matmul():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(40, 16, generator=g).bfloat16().requires_grad_()
    w = torch.randn(4, 16, generator=g, requires_grad=True)
    upstream = torch.randn(40, 4, generator=g)
    grad_x, grad_w = torch.autograd.grad(tm.Fp32Logits.apply(x, w), [x, w], upstream)
    assert grad_x.dtype == torch.bfloat16 and grad_w.dtype == torch.float32
    for got, want in ((grad_x, upstream.double() @ w.double()), (grad_w, upstream.double().T @ x.double())):
        assert (got.double() - want).norm() / want.norm() < 1e-2  # bf16 operands: ~3e-3


def test_top1_without_renormalization_trains_the_router():
    cfg = config(TOP_K=1)
    layer = tm.MoEMLP(cfg, 0)
    randomize(layer)
    layer.aux_coef = layer.z_coef = 0.0  # only the LM path
    y, _ = layer(torch.randn(2, 8, 32), torch.zeros(2, 8, dtype=torch.long))
    (grad,) = torch.autograd.grad(y.square().sum(), [layer.router])
    assert grad.abs().sum() > 0


def test_sigmoid_router_bias_selects_but_does_not_weigh():
    layer = tm.MoEMLP(config(ROUTER="sigmoid", NORM_TOPK_PROB=0), 0)
    x = torch.randn(10, 32)
    with torch.no_grad():
        layer.router_bias.copy_(torch.tensor([5.0, 5.0, -5.0, -5.0]))
    idx, weights, _, aux = layer.route(x, torch.zeros(10, dtype=torch.long))
    assert set(idx.flatten().tolist()) == {0, 1}
    torch.testing.assert_close(weights, (x @ layer.router.T).sigmoid().gather(-1, idx))
    assert aux == 0


def skewed_sigmoid_layer():
    """Experts 0 and 1 win most tokens of skewed_batch: their router rows align with its mean. The rows are
    large enough that scores spread over tokens, so a bias shift moves some tokens rather than all at once."""
    torch.manual_seed(0)
    layer = tm.MoEMLP(config(ROUTER="sigmoid", NUM_EXPERTS=8), 0)
    with torch.no_grad():
        layer.router.normal_(0, 0.1)
        layer.router[0] += 0.08
        layer.router[1] += 0.06
    return layer


def skewed_batch(n, seed):
    return torch.randn(n, 32, generator=torch.Generator().manual_seed(seed)) + 1.0


def loads_after_routing(layer, x):
    layer.expert_load.zero_()
    idx, _, counts, _ = layer.route(x, torch.zeros(len(x), dtype=torch.long))
    layer.expert_load += counts
    return counts


def test_balancing_bias_evens_out_a_skewed_router():
    layer = skewed_sigmoid_layer()
    x = skewed_batch(512, seed=1)
    before = loads_after_routing(layer, x)
    assert before.max() / before.mean() > 3
    for _ in range(300):
        loads_after_routing(layer, x)
        tm.balance_router_biases(layer, rate=0.01)
    after = loads_after_routing(layer, x)
    assert after.max() / after.mean() < 1.3 and after.min() > 0
    assert layer.router_bias.sum().abs() < 1e-4  # centred updates: the biases do not drift together


def rank_balancing(rank):
    layer = skewed_sigmoid_layer()
    for step in range(20):  # each rank routes its own half of the batch
        x = skewed_batch(64, seed=100 * step + rank)
        loads_after_routing(layer, x)
        tm.balance_router_biases(layer, rate=0.01)
    return layer.router_bias


def test_balancing_bias_is_identical_across_ranks_and_uses_global_loads(tmp_path):
    b0, b1 = on_gloo_ranks(rank_balancing, tmp_path)
    assert torch.equal(b0, b1)
    layer = skewed_sigmoid_layer()  # one process, both halves as one global batch
    for step in range(20):
        x = torch.cat([skewed_batch(64, seed=100 * step + r) for r in range(2)])
        loads_after_routing(layer, x)
        tm.balance_router_biases(layer, rate=0.01)
    torch.testing.assert_close(b0, layer.router_bias)


def test_hash_routing_is_balanced_per_layer_and_rebuilt_identically():
    cfg = config(ROUTER="hash", VOCAB_SIZE=1000, NUM_EXPERTS=8, TOP_K=2)
    model = tm.GPT(cfg)
    tables = [b.mlp.hash_table for b in model.blocks]
    for table in tables:
        assert (table[:, 0] != table[:, 1]).all()
        counts = torch.bincount(table.flatten(), minlength=8)
        assert counts.max() - counts.min() <= 1
    assert not torch.equal(tables[0], tables[1])
    assert not any("hash_table" in k for k in model.state_dict())  # costs no artifact bytes
    assert not any(n.endswith("router") for n, _ in model.named_parameters())
    torch.manual_seed(123)  # a different global RNG state must not matter: the table comes from SEED
    rebuilt = tm.GPT(cfg)
    for a, b in zip(tables, [blk.mlp.hash_table for blk in rebuilt.blocks]):
        assert torch.equal(a, b)
    other_seed = tm.GPT(config(ROUTER="hash", VOCAB_SIZE=1000, NUM_EXPERTS=8, TOP_K=2, SEED=7))
    assert not torch.equal(tables[0], other_seed.blocks[0].mlp.hash_table)


# ---------------------------------------------------------------- config, parameters, export

@pytest.mark.parametrize("overrides,variable", [
    ({"TOP_K": "5"}, "TOP_K"),
    ({"MLP_MODE": "soft", "ROUTER": "hash"}, "ROUTER"),
    ({"TOP_K": "1", "NORM_TOPK_PROB": "1"}, "NORM_TOPK_PROB"),
    ({"EXPERT_HIDDEN": "20"}, "EXPERT_HIDDEN"),
    ({"MOE_LAYERS": "0-5"}, "MOE_LAYERS"),
    ({"MOE_LAYERS": "one"}, "MOE_LAYERS"),
    ({"MOE_LAYERS": "odd", "NUM_LAYERS": "1"}, "MOE_LAYERS"),  # a single block has no odd layer
    ({"ROUTER": "topk"}, "ROUTER"),
    ({"EXPERT_ACT": "gelu"}, "EXPERT_ACT"),
    ({"NUM_EXPERTS": "1"}, "NUM_EXPERTS"),
])
def test_moe_config_errors(overrides, variable):
    with pytest.raises(tm.ConfigError, match=rf"^{variable}="):
        config(**overrides)


@pytest.mark.parametrize("spec,num_layers,layers", [("all", 5, (0, 1, 2, 3, 4)), ("odd", 5, (1, 3)), ("odd", 9, (1, 3, 5, 7)),
                                                    ("0,2-3", 5, (0, 2, 3)), ("3-3, 1 - 2", 5, (1, 2, 3))])
def test_moe_layer_specs(spec, num_layers, layers):
    assert tm.parse_layers("MOE_LAYERS", spec, num_layers) == layers


# Each was read as some layers without a word ("1-" as 1, "3-1" as none of them), or built a set of 10^11 layers.
@pytest.mark.parametrize("spec,message", [
    ("1-", "expected all, none, odd"), ("-1", "expected all, none, odd"), ("3-1", "expected all, none, odd"), ("1,,2", "expected all, none, odd"),
    ("1-2-3", "expected all, none, odd"), ("+1", "expected all, none, odd"), ("", "expected all, none, odd"), ("1,", "expected all, none, odd"),
    ("0-99999999999", "layers must lie in [0, NUM_LAYERS-1=4]"), ("5", "layers must lie in [0, NUM_LAYERS-1=4]"),
])
def test_malformed_moe_layer_specs_are_refused(spec, message):
    with pytest.raises(tm.ConfigError, match="^" + re.escape(f"MOE_LAYERS={spec!r}: {message}")):
        tm.parse_layers("MOE_LAYERS", spec, 5)


def test_auto_expert_sizes_match_dense_active_flops():
    dense = 2 * 32
    assert config(EXPERT_HIDDEN=0, TOP_K=2).expert_hidden == dense // 2
    assert config(MLP_MODE="soft", EXPERT_HIDDEN=0, NUM_EXPERTS=4).expert_hidden == dense // 4
    shared = config(MLP_MODE="shared_routed", EXPERT_HIDDEN=0, TOP_K=2, NUM_EXPERTS=8)
    assert shared.shared_hidden == 32 and shared.expert_hidden == 16


def test_parameter_report_counts_active_experts():
    cfg = config(NUM_EXPERTS=8, TOP_K=2, MOE_LAYERS="1")
    model = tm.GPT(cfg)
    report = tm.parameter_report(model)
    expert_params = 8 * (16 * 32 + 32 * 16)
    assert report["experts"] == expert_params and report["router"] == 8 * 32
    assert report["mlp"] == 2 * 32 * 64 * 1  # the dense layer 0
    assert report["total"] == sum(p.numel() for p in model.parameters())
    assert report["total"] - report["active"] == expert_params * 6 // 8


def test_export_quantizes_each_expert_and_keeps_routers_float():
    cfg = config(ROUTER="sigmoid", QUANT_EXPERT_BITS=5)
    model = tm.GPT(cfg)
    randomize(model)
    with torch.no_grad():
        model.blocks[0].mlp.router_bias.copy_(torch.tensor([1e-3, -2e-3, 3.3e-4, 0.0]))
    state = model.state_dict()
    header, arrays = tm.quantize_state(state, tm.rounded_levels(state, {"embed": 8, "attn": 8, "mlp": 8, "experts": 5}, 0.0))
    w_in = "blocks.0.mlp.experts.w_in"
    assert header[w_in]["bits"] == 5 and arrays[w_in + ".scale"].shape == (4 * 16,)  # a scale per row per expert
    assert arrays[w_in].min() >= -15 and arrays[w_in].max() <= 15
    assert header["blocks.0.mlp.router"]["kind"] == "float" and arrays["blocks.0.mlp.router"].dtype.itemsize >= 2
    loaded = tm.read_artifact(tm.pack_artifact(header, arrays))[1]
    assert torch.equal(loaded["blocks.0.mlp.router_bias"], state["blocks.0.mlp.router_bias"])
    fresh = tm.GPT(cfg)
    fresh.load_state_dict(loaded)
    assert torch.equal(fresh.blocks[0].mlp.router, state["blocks.0.mlp.router"].half().float())
    err = (fresh.blocks[0].mlp.experts.w_in - state[w_in]).square().mean() / state[w_in].square().mean()
    assert 0 < err.sqrt() < 0.06  # int5 per-row error, as for any other matrix


# ---------------------------------------------------------------- compile

MODES = {
    "sparse_softmax": {"MLP_MODE": "sparse", "ROUTER": "softmax"},
    "sparse_sigmoid": {"MLP_MODE": "sparse", "ROUTER": "sigmoid", "NORM_TOPK_PROB": "1"},
    "sparse_hash": {"MLP_MODE": "sparse", "ROUTER": "hash"},
    "shared_routed": {"MLP_MODE": "shared_routed", "EXPERT_ACT": "swiglu"},
    "soft": {"MLP_MODE": "soft"},
    "deepseek_v4": {"MLP_MODE": "sparse", "ROUTER": "sqrtsoftplus", "HASH_LAYERS": "1", "ROUTE_SCALE": "1.5",
                    "EXPERT_ACT": "swiglu", "SWIGLU_LIMIT": "10"},
}


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_compiles_fullgraph_without_recompiles(mode):
    import torch._dynamo

    torch._dynamo.reset()
    cfg = tm.Hyperparameters({**SMALL, **MODES[mode], "ROUTER_BIAS_RATE": "0.01"})
    torch.manual_seed(0)
    model = tm.GPT(cfg)
    randomize(model)
    step = torch.compile(model, fullgraph=True, dynamic=False)
    routings = []
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed in range(3):
            ids = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(seed))
            for m in model.modules():
                if isinstance(m, tm.MoEMLP):
                    m.reset_routing()
            loss = step(ids[:, :-1].contiguous(), ids[:, 1:].contiguous())
            loss.backward()
            tm.balance_router_biases(model, cfg.router_bias_rate)
            routings.append(model.blocks[0].mlp.expert_load.clone())
    assert all(torch.isfinite(r).all() for r in routings) and not torch.equal(routings[0], routings[1])
    eager = model(ids[:, :-1].contiguous(), ids[:, 1:].contiguous())
    assert eager.item() == pytest.approx(loss.item(), rel=2e-2)  # compiled experts run in bf16, eager in fp32


# ---------------------------------------------------------------- whole runs

@pytest.mark.parametrize("mode", MODES)
def test_every_mode_trains_exports_and_roundtrips(tiny_data, tmp_path, mode):
    env = tiny_env(tiny_data, RUN_ID=mode, ITERATIONS=25, NUM_EXPERTS=4, **MODES[mode], **ONE_MICRO_BATCH)
    result = run_trainer(tmp_path, env)
    assert result.returncode == 0, result.stderr[-3000:]
    evs = [json.loads(line) for line in (tmp_path / "logs" / f"{mode}.jsonl").read_text().splitlines()]
    train = [e["train_loss"] for e in evs if e["event"] == "train"]
    assert train[-1] < train[0] - 1.0
    final = {e["event"]: e for e in evs if e["event"].startswith("final") or e["event"] in ("model", "artifact")}
    assert final["model"]["expert_kernel"] == ("none" if mode == "soft" else "torch")  # soft: one wide matmul
    assert final["model"]["experts"] > 0 and final["model"]["active_params"] <= final["model"]["params"]
    assert final["artifact"]["status"] == "OK"
    assert abs(final["final_roundtrip"]["val_bpb"] - final["final_ema"]["val_bpb"]) < 0.02
    settings, state = tm.read_artifact((tmp_path / final["artifact"]["path"]).read_bytes())
    cfg = tm.Hyperparameters(settings)
    assert cfg.model_settings == tm.Hyperparameters(env).model_settings and cfg.num_experts == 4
    tm.GPT(cfg).load_state_dict(state)  # strict: the stored settings rebuild this exact model
    if MODES[mode].get("ROUTER") == "sigmoid":
        assert state["blocks.0.mlp.router_bias"].abs().sum() > 0  # the trained balancing bias was saved
