"""DeepSeek-V4 routing against reference formulas written from the published ports (MaxText PR #3871, Megatron-LM
PR #4481; ../shared/docs/reference.md section 2): sqrt(softplus) scores, hash layers weighted by the router, the
clamped SwiGLU. The references below are the ports' math on plain tensors, independent of MoEMLP's code."""

import pytest
import torch
import torch.nn.functional as F

import train_moe as tm
from test_moe import SMALL, randomize

E, K, D, N = 8, 2, 32, 64


def layer(**env) -> tm.MoEMLP:
    cfg = tm.Hyperparameters({**SMALL, "MLP_MODE": "sparse", "NUM_EXPERTS": str(E), "TOP_K": str(K), "MODEL_DIM": str(D),
                              "MOE_LAYERS": "0,1", **{k: str(v) for k, v in env.items()}})
    torch.manual_seed(0)
    m = tm.MoEMLP(cfg, layer=int(env.get("LAYER", 0)))
    if hasattr(m, "router"):
        with torch.no_grad():
            m.router.normal_(0, 1.0)  # logits of a few units: the scores' nonlinearity matters
    return m


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, D, generator=g), torch.randint(0, 64, (N,), generator=g)


def v4_topk_reference(x, router, bias, k, route_scale):
    """MaxText/Megatron V4 gate: score = sqrt(softplus(logits)) in fp32; choose by score + bias; weigh by the unbiased
    score, w / (sum(w) + 1e-20) * route_scale."""
    score = torch.sqrt(F.softplus((x.float() @ router.float().T)))
    idx = torch.topk(score + bias, k, dim=-1).indices
    w = score.gather(-1, idx)
    return idx, w / (w.sum(-1, keepdim=True) + 1e-20) * route_scale


def v4_hash_reference(x, router, ids, tid2eid, score_fn, route_scale):
    """V4 hash layer: experts from the token-id table, weights = the router's scores there, normalized, scaled."""
    idx = tid2eid[ids]
    w = score_fn(x.float() @ router.float().T).gather(-1, idx)
    return idx, w / (w.sum(-1, keepdim=True) + 1e-20) * route_scale


def test_sqrtsoftplus_picks_by_biased_score_and_weighs_by_the_unbiased_normalized_one():
    m = layer(ROUTER="sqrtsoftplus", ROUTE_SCALE=1.5)
    with torch.no_grad():
        m.router_bias.copy_(torch.linspace(-0.5, 0.5, E))  # big enough to change some picks
    x, ids = inputs()
    idx, weights, counts, aux = m.route(x, ids)
    ref_idx, ref_w = v4_topk_reference(x, m.router.detach(), m.router_bias, K, 1.5)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(weights, ref_w, atol=1e-6, rtol=1e-6)
    assert torch.allclose(weights.sum(-1), torch.full((N,), 1.5))
    unbiased = torch.topk(torch.sqrt(F.softplus(x @ m.router.detach().T)), K, dim=-1).indices
    assert not torch.equal(idx, unbiased)  # the bias did choose
    assert counts.sum() == N * K and aux.item() == 0.0  # balanced by the bias, no auxiliary loss


@pytest.mark.parametrize("router,score_fn", [("sqrtsoftplus", lambda l: torch.sqrt(F.softplus(l))),
                                             ("sigmoid", torch.sigmoid), ("softmax", lambda l: l.softmax(-1))])
def test_hash_layers_route_by_token_id_and_weigh_by_the_router(router, score_fn):
    cfg_env = dict(ROUTER=router, HASH_LAYERS=1, ROUTE_SCALE=1.5)
    hashed, routed = layer(**cfg_env, LAYER=0), layer(**cfg_env, LAYER=1)
    assert hashed.hashed and not routed.hashed
    assert not hasattr(hashed, "router_bias") and hasattr(routed, "router_bias") == (router != "softmax")
    x, ids = inputs()
    idx, weights, _, aux = hashed.route(x, ids)
    table = tm.balanced_hash_table(64, E, K, 1337, 0)
    ref_idx, ref_w = v4_hash_reference(x, hashed.router.detach(), ids, table, score_fn, 1.5)
    assert torch.equal(idx, ref_idx) and torch.equal(hashed.hash_table, table)
    torch.testing.assert_close(weights, ref_w, atol=1e-6, rtol=1e-6)
    assert aux.item() == 0.0
    # The router learns on a hash layer: the LM loss reaches it through the weights.
    randomize(hashed)  # experts' output projections start at zero
    y, _ = hashed(x.view(4, 16, D), ids.view(4, 16))
    y.square().sum().backward()
    assert hashed.router.grad is not None and hashed.router.grad.abs().sum() > 0


def test_plain_hash_routing_keeps_fixed_weights_and_no_router():
    m = layer(ROUTER="hash")
    x, ids = inputs()
    _, weights, _, _ = m.route(x, ids)
    assert torch.equal(weights, torch.full((N, K), 1 / K)) and not hasattr(m, "router")


def swiglu_reference(x, w_in, w_out, limit):
    """V4 expert: gate = min(g, limit), up = clamp(u, -limit, limit), silu(gate) * up, then down."""
    g, u = (x @ w_in.T).chunk(2, dim=-1)
    return (F.silu(g.clamp(max=limit)) * u.clamp(-limit, limit)) @ w_out.T


def test_swiglu_limit_clamps_the_gate_above_and_up_both_ways():
    m = layer(EXPERT_ACT="swiglu", SWIGLU_LIMIT=1.0)
    randomize(m)
    x, ids = inputs()
    x = x * 4  # pre-activations well past the limit
    idx, weights, counts, _ = m.route(x, ids)
    got = m.experts(x, weights, idx, counts)
    want = sum(weights[:, j : j + 1] * torch.stack([swiglu_reference(x[t], m.experts.w_in[e], m.experts.w_out[e], 1.0)
                                                     for t, e in enumerate(idx[:, j].tolist())]) for j in range(K))
    torch.testing.assert_close(got, want.detach(), atol=1e-4, rtol=1e-4)
    m.experts.limit = 0.0
    assert (m.experts(x, weights, idx, counts) - got).abs().max() > 0.1  # the clamp was active


@pytest.mark.parametrize("env,named", [
    (dict(ROUTER="hash", HASH_LAYERS=1), "HASH_LAYERS=1"),
    (dict(MLP_MODE="soft", HASH_LAYERS=1), "HASH_LAYERS=1"),
    (dict(HASH_LAYERS=3), "HASH_LAYERS=3"),  # two MoE layers
    (dict(SWIGLU_LIMIT=10), "SWIGLU_LIMIT=10"),  # relu2 experts
    (dict(ROUTER="sqrtsoftplus", TOP_K=1), "ROUTER=sqrtsoftplus"),
    (dict(HASH_LAYERS=1, TOP_K=1), "HASH_LAYERS=1"),
    (dict(ROUTE_SCALE=0), "ROUTE_SCALE='0'"),
])
def test_bad_v4_settings_are_config_errors(env, named):
    with pytest.raises(tm.ConfigError) as e:
        tm.Hyperparameters({**SMALL, "MLP_MODE": "sparse", "MOE_LAYERS": "0,1", **{k: str(v) for k, v in env.items()}})
    assert str(e.value).startswith(named)


def test_sqrtsoftplus_biases_balance_like_sigmoid():
    cfg = tm.Hyperparameters({**SMALL, "MLP_MODE": "sparse", "ROUTER": "sqrtsoftplus", "HASH_LAYERS": "1",
                              "MOE_LAYERS": "0,1"})
    model = tm.GPT(cfg)
    ids = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(0))
    model(ids[:, :-1], ids[:, 1:])
    tm.balance_router_biases(model, 0.01)
    assert not hasattr(model.blocks[0].mlp, "router_bias")  # the hash layer has no selection to bias
    assert model.blocks[1].mlp.router_bias.abs().sum() > 0
