"""Parity of our MoEMLP with the Hugging Face transformers reference MoE blocks (docs/reference.md sections 2, 5).

Each test builds a tiny reference block (fp32, CPU, eager experts loop) on seeded random weights, copies those
weights into one of our layers and checks that both pick the same experts with the same weights and produce the
same output: OLMoE (norm_topk_prob false/true), Qwen2-MoE (sigmoid-gated shared expert), Mixtral (top-2
renormalised) and DeepSeek-V3 (sigmoid scores, selection-only bias). Reference experts are fused transformers-v5
`gate_up_proj` [E, 2F, D] with the gate rows first, like our `experts.w_in`; dense reference MLPs are per-matrix
`gate_proj`/`up_proj`/`down_proj` and are stacked [gate; up] into our `fc`.
"""

import pytest
import torch
import transformers

import train_moe as tm

D, F, B, T = 32, 16, 2, 8
TOL = dict(atol=1e-6, rtol=1e-5)


def ours(**env) -> tm.MoEMLP:
    base = {"MODEL_DIM": str(D), "NUM_HEADS": "4", "NUM_KV_HEADS": "2", "MLP_MODE": "sparse", "NUM_EXPERTS": "8",
            "TOP_K": "2", "EXPERT_HIDDEN": str(F), "EXPERT_ACT": "swiglu", "ROUTER": "softmax",
            "NORM_TOPK_PROB": "0", "TRAIN_SEQ_LEN": "64", "TRAIN_BATCH_TOKENS": "512"}
    base.update({k: str(v) for k, v in env.items()})
    return tm.MoEMLP(tm.Hyperparameters(base), layer=0).eval()


def reference(block_cls, config):
    """A reference block with every parameter drawn from a seeded normal (buffers left as built); eager experts loop."""
    config._experts_implementation = "eager"
    block = block_cls(config).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return block


def inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, D, generator=g), torch.zeros(B, T, dtype=torch.long)


@torch.no_grad()
def copy_weights(layer: tm.MoEMLP, ref) -> None:
    """Reference router + fused experts (+ dense shared expert and its [1, D] gate) into our layer."""
    layer.router.copy_(ref.gate.weight)
    layer.experts.w_in.copy_(ref.experts.gate_up_proj)  # [E, 2F, D], gate rows first on both sides
    layer.experts.w_out.copy_(ref.experts.down_proj)  # [E, D, F]
    if hasattr(ref.gate, "e_score_correction_bias"):
        layer.router_bias.copy_(ref.gate.e_score_correction_bias)
    for name in ("shared_expert", "shared_experts"):  # Qwen2-MoE, DeepSeek-V3
        if not hasattr(ref, name) or layer.mode != "shared_routed":  # a sparse layer is compared on routing only
            continue
        shared = getattr(ref, name)
        layer.shared.fc.weight.copy_(torch.cat([shared.gate_proj.weight, shared.up_proj.weight]))
        layer.shared.proj.weight.copy_(shared.down_proj.weight)
    if hasattr(ref, "shared_expert_gate"):
        layer.shared_gate.copy_(ref.shared_expert_gate.weight)


@torch.no_grad()
def compare_routing(layer: tm.MoEMLP, ref, x: torch.Tensor, ids: torch.Tensor, sort_slots: bool = False):
    """Asserts the same experts per slot with the same weights; returns our (idx, weights) [N, K]."""
    flat = x.reshape(-1, D)
    _, ref_w, ref_idx = ref.gate(flat)
    idx, w, _, _ = layer.route(flat, ids.reshape(-1))
    if sort_slots:  # the reference takes topk(sorted=False): compare per-token sets, weights in the same order
        ref_idx, order = ref_idx.sort(dim=-1)
        ref_w = ref_w.gather(-1, order)
        idx, order = idx.sort(dim=-1)
        w = w.gather(-1, order)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(w, ref_w, **TOL)
    return idx, w


@torch.no_grad()
def compare(layer: tm.MoEMLP, ref, x: torch.Tensor, ids: torch.Tensor, sort_slots: bool = False) -> None:
    """Equal routing and equal block outputs."""
    compare_routing(layer, ref, x, ids, sort_slots)
    y, _ = layer(x, ids)
    torch.testing.assert_close(y, ref(x), **TOL)


def olmoe(norm: bool):
    from transformers.models.olmoe.modeling_olmoe import OlmoeConfig, OlmoeSparseMoeBlock

    cfg = OlmoeConfig(hidden_size=D, intermediate_size=F, num_experts=8, num_experts_per_tok=2, norm_topk_prob=norm,
                      hidden_act="silu")
    return reference(OlmoeSparseMoeBlock, cfg)


@pytest.mark.parametrize("norm", [False, True])
def test_olmoe_sparse_block(norm):
    ref = olmoe(norm)
    layer = ours(NORM_TOPK_PROB=int(norm))
    copy_weights(layer, ref)
    compare(layer, ref, *inputs())


def test_norm_topk_prob_false_signature():
    """Unnormalised top-k softmax weights sum to < 1 (as the reference's do); normalised ones sum to exactly 1."""
    x, ids = inputs()
    flat = x.reshape(-1, D)
    weights = {}
    for norm in (False, True):
        ref = olmoe(norm)  # same seed: same router for both
        layer = ours(NORM_TOPK_PROB=int(norm))
        copy_weights(layer, ref)
        with torch.no_grad():
            _, weights[norm] = compare_routing(layer, ref, x, ids)
    sums = weights[False].sum(-1)
    assert (sums < 1 - 1e-4).all(), sums
    torch.testing.assert_close(weights[True].sum(-1), torch.ones(B * T), **TOL)
    # The confusion in reference.md: a softmax over only the top-K logits is the normalised form, not the raw one.
    with torch.no_grad():
        topk_softmax = (flat @ layer.router.T).topk(2, dim=-1).values.softmax(-1)
    torch.testing.assert_close(topk_softmax, weights[True], **TOL)
    assert not torch.allclose(topk_softmax, weights[False], atol=1e-3)


@pytest.mark.parametrize("norm", [False, True])
def test_qwen2_moe_shared_expert_block(norm):
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeConfig, Qwen2MoeSparseMoeBlock

    shared_hidden = 24
    cfg = Qwen2MoeConfig(hidden_size=D, moe_intermediate_size=F, shared_expert_intermediate_size=shared_hidden,
                         num_experts=8, num_experts_per_tok=2, norm_topk_prob=norm, hidden_act="silu")
    ref = reference(Qwen2MoeSparseMoeBlock, cfg)
    layer = ours(MLP_MODE="shared_routed", SHARED_GATE=1, SHARED_HIDDEN=shared_hidden, NORM_TOPK_PROB=int(norm))
    copy_weights(layer, ref)
    compare(layer, ref, *inputs())


def test_mixtral_sparse_block():
    from transformers.models.mixtral.modeling_mixtral import MixtralConfig, MixtralSparseMoeBlock

    cfg = MixtralConfig(hidden_size=D, intermediate_size=F, num_local_experts=8, num_experts_per_tok=2,
                        hidden_act="silu", router_jitter_noise=0.0)
    ref = reference(MixtralSparseMoeBlock, cfg)
    layer = ours(NORM_TOPK_PROB=1)
    copy_weights(layer, ref)
    compare(layer, ref, *inputs())


def deepseek_v3(norm: bool):
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Config, DeepseekV3MoE

    cfg = DeepseekV3Config(hidden_size=D, moe_intermediate_size=F, n_routed_experts=8, num_experts_per_tok=2,
                           n_group=1, topk_group=1, routed_scaling_factor=1.0, norm_topk_prob=norm,
                           n_shared_experts=1, hidden_act="silu")
    ref = reference(DeepseekV3MoE, cfg)
    # Deliberately skewed selection bias: expert 0 gets +1 (beats any unbiased sigmoid score, so it is always
    # picked), expert 7 gets -1 (never picked), the rest a ramp.
    ref.gate.e_score_correction_bias.copy_(torch.tensor([1.0, 0.15, 0.1, 0.05, -0.05, -0.1, -0.15, -1.0]))
    return ref


@pytest.mark.parametrize("norm", [False, True])
def test_deepseek_v3_router_bias_selects_scores_weigh(norm):
    """DeepseekV3TopkRouter: the bias picks the experts, the unbiased sigmoid scores weigh them."""
    ref = deepseek_v3(norm)
    layer = ours(ROUTER="sigmoid", NORM_TOPK_PROB=int(norm))
    copy_weights(layer, ref)
    x, ids = inputs()
    flat = x.reshape(-1, D)
    idx, w = compare_routing(layer, ref, x, ids, sort_slots=True)

    scores = (flat @ layer.router.T).sigmoid().detach()
    assert (idx == 0).any(-1).all() and not (idx == 7).any()  # the bias drove the selection...
    unbiased = scores.topk(2, dim=-1).indices.sort(-1).values
    assert (unbiased != idx).any(-1).sum() >= 4  # ...and changed it for several tokens
    expected = scores.gather(-1, idx)  # ...but the weights are the unbiased sigmoid scores
    if norm:
        expected = expected / expected.sum(-1, keepdim=True)
    torch.testing.assert_close(w, expected, **TOL)
    biased = (scores + layer.router_bias).gather(-1, idx)
    assert not torch.allclose(w, biased / biased.sum(-1, keepdim=True) if norm else biased, atol=1e-3)


@pytest.mark.parametrize("norm", [False, True])
def test_deepseek_v3_moe_block(norm):
    """The whole DeepseekV3MoE block (biased router, routed experts, one ungated shared expert) = our shared_routed."""
    ref = deepseek_v3(norm)
    layer = ours(MLP_MODE="shared_routed", ROUTER="sigmoid", SHARED_GATE=0, SHARED_HIDDEN=F, NORM_TOPK_PROB=int(norm))
    copy_weights(layer, ref)
    compare(layer, ref, *inputs(), sort_slots=True)
