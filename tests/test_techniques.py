"""The record stack's techniques (../shared/docs/reference.md 7): each against a plain-tensor version of its definition,
each tensor that must change the output does, the BOS mask stops the smear and the bigram at a document start, depth
recurrence reuses its blocks' parameters, and LQER lowers the error of what it corrects and is counted in the bytes."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import train_moe as tm

TINY = dict(NUM_LAYERS="4", MODEL_DIM="32", NUM_HEADS="4", NUM_KV_HEADS="2", VOCAB_SIZE="64", MLP_MODE="dense",
            QUANT_METHOD="rtn", QUANT_FIT="0", TRAIN_SEQ_LEN="16")


def model(**overrides) -> tm.GPT:
    torch.manual_seed(0)
    m = tm.GPT(tm.Hyperparameters({**TINY, **{k: str(v) for k, v in overrides.items()}}))
    with torch.no_grad():  # every zero-initialised tensor moved, so that each one's effect shows
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return m


def ids(seed=0, bos_at=(5, 11)):
    torch.manual_seed(seed)
    x = torch.randint(2, 64, (2, 16))
    x[:, list(bos_at)] = 1
    return x


def test_leaky_relu2_is_leaky_relu_half_squared():
    h = torch.randn(1000)
    assert torch.equal(tm.activate(h, "leaky_relu2"), torch.where(h > 0, h, 0.5 * h) ** 2)
    m = model(MLP_ACT="leaky_relu2")
    assert m.blocks[0].mlp.act == "leaky_relu2" and not torch.equal(model(MLP_ACT="relu2")(ids(), ids()), m(ids(), ids()))


@pytest.mark.parametrize("dims", [0, 2, 4, 8])
def test_partial_rope_rotates_pairs_of_the_first_dims_only(dims):
    x, base, start = torch.randn(2, 3, 10, 8), 100.0, 7
    rotated, d = x.clone(), dims or 8
    for pos in range(10):
        for i in range(d // 2):
            angle = (start + pos) * base ** (-2 * i / d)
            a, b = x[..., pos, i], x[..., pos, i + d // 2]
            rotated[..., pos, i] = a * math.cos(angle) + b * math.sin(angle)
            rotated[..., pos, i + d // 2] = b * math.cos(angle) - a * math.sin(angle)
    torch.testing.assert_close(tm.rotary(x, base, start, dims), rotated, atol=1e-5, rtol=1e-5)


def test_xsa_removes_each_heads_component_along_its_own_value():
    y, v = torch.randn(2, 8, 5, 4), torch.randn(2, 2, 5, 4)
    out = tm.exclusive(y, v)
    for h in range(8):
        vn = F.normalize(v[:, h // 4], dim=-1)
        expected = y[:, h] - (y[:, h] * vn).sum(-1, keepdim=True) * vn
        torch.testing.assert_close(out[:, h], expected, atol=1e-6, rtol=1e-6)
        assert (out[:, h] * vn).sum(-1).abs().max() < 1e-5
    m = model(XSA_LAST_N=2)
    assert [b.attn.xsa for b in m.blocks] == [False, False, True, True]


def test_ln_scale_is_one_over_the_root_of_the_layer_number():
    m, x = model(LN_SCALE=1), torch.randn(3, 32)
    for layer, block in enumerate(m.blocks):
        torch.testing.assert_close(block.norm(x), F.rms_norm(x, (32,)) / math.sqrt(layer + 1))


def test_smear_gate_formula_and_the_bos_mask():
    m = model(SMEAR_GATE=1)
    x, tokens = torch.randn(2, 16, 32), ids()
    out = m.smear(x, tokens)
    for b in range(2):
        for t in range(16):
            gate = m.smear.lam * torch.sigmoid(x[b, t, :12] @ m.smear.w)
            prev = x[b, t - 1] if t > 0 and tokens[b, t] != 1 else torch.zeros(32)
            torch.testing.assert_close(out[b, t], x[b, t] + gate * prev, atol=1e-6, rtol=1e-6)
    # Across a document start nothing leaks: the token before a BOS does not reach the BOS position.
    changed = x.clone()
    changed[:, 4] += 1.0
    assert torch.equal(m.smear(changed, tokens)[:, 5], out[:, 5]) and not torch.equal(m.smear(changed, tokens)[:, 4], out[:, 4])
    with torch.no_grad():
        m.smear.lam.zero_()
    assert torch.equal(m.smear(x, tokens), x)  # lambda 0: identity, as at init


def test_bigram_hash_buckets_and_the_document_start():
    m = model(BIGRAM_BUCKETS=97, BIGRAM_DIM=8)
    tokens = ids()
    last, seen = 96, []
    for b in range(2):
        for t in range(16):
            bucket = last if t == 0 or tokens[b, t] == 1 else ((36313 * int(tokens[b, t])) ^ (27191 * int(tokens[b, t - 1]))) % last
            seen.append(bucket)
    expected = m.bigram.scale * m.bigram.proj(m.bigram.table[torch.tensor(seen).view(2, 16)])
    torch.testing.assert_close(m.bigram(tokens), expected)
    # The token before a BOS does not change the BOS position's bigram.
    other = tokens.clone()
    other[:, 4] = (other[:, 4] + 1) % 64
    assert torch.equal(m.bigram(other)[:, 5], m.bigram(tokens)[:, 5]) and not torch.equal(m.bigram(other)[:, 4], m.bigram(tokens)[:, 4])
    fresh = tm.GPT(tm.Hyperparameters({**TINY, "BIGRAM_BUCKETS": "97", "BIGRAM_DIM": "8"}))
    assert not fresh.bigram(tokens).any()  # the table starts at zero: the embedding alone


def test_attention_gate_scales_each_heads_output():
    m = model(ATTN_GATE=1)
    attn, x = m.blocks[0].attn, torch.randn(2, 16, 32)
    ungated = copy.deepcopy(attn)
    del ungated.gate
    captured = {}
    ungated.out.register_forward_pre_hook(lambda mod, args: captured.setdefault("y", args[0]))
    ungated(x)
    gate = torch.sigmoid(x[..., :12] @ attn.gate.T)  # [B, T, H]
    expected = attn.out((captured["y"].view(2, 16, 4, 8) * gate[..., None]).view(2, 16, 32))
    torch.testing.assert_close(attn(x), expected, atol=1e-5, rtol=1e-5)


def test_parallel_block_reads_one_input_for_attention_and_mlp():
    m = model(PARALLEL_LAYERS="1-3")
    block, x, x0, tokens = m.blocks[2], torch.randn(2, 16, 32), torch.randn(2, 16, 32), ids()
    mixed = block.resid_mix[0] * x + block.resid_mix[1] * x0
    h = F.rms_norm(mixed, (32,))
    expected = mixed + block.attn_scale * block.attn(h) + block.mlp_scale * block.mlp(h)[0]
    torch.testing.assert_close(block(x, x0, tokens)[0], expected, atol=1e-5, rtol=1e-5)
    assert [b.parallel for b in m.blocks] == [False, True, True, True]


def test_recurrence_reuses_the_same_parameters_and_runs_the_span_again():
    plain, looped = model(), model(RECUR_LAYERS="1-2", RECUR_LOOPS=2)
    assert looped.orders == [[0, 1, 2, 3], [0, 1, 2, 1, 2, 1, 2, 3]]
    shapes = {k: v.shape for k, v in plain.state_dict().items()}
    looped_shapes = {k: v.shape for k, v in looped.state_dict().items()}
    assert looped_shapes.keys() == shapes.keys()  # no new tensor: the repeats are the same blocks
    assert {k for k in shapes if shapes[k] != looped_shapes[k]} == {"skip_weights"}
    assert looped_shapes["skip_weights"][0] == 4 and shapes["skip_weights"][0] == 2
    calls = []
    for i, block in enumerate(looped.blocks):
        block.register_forward_hook(lambda mod, args, out, i=i: calls.append(i))
    tokens = ids()
    looped(tokens, tokens, looped=False)
    assert calls == [0, 1, 2, 3]
    calls.clear()
    out = looped(tokens, tokens)
    assert calls == [0, 1, 2, 1, 2, 1, 2, 3] and not torch.equal(out, looped(tokens, tokens, looped=False))


@pytest.mark.parametrize("overrides", [dict(RECUR_LAYERS="1,3"), dict(RECUR_LAYERS="2-3"), dict(ROPE_DIMS=3),
                                       dict(ROPE_DIMS=10), dict(XSA_LAST_N=5), dict(BIGRAM_BUCKETS=1),
                                       dict(PARALLEL_LAYERS="4"), dict(MLP_ACT="swiglu")])
def test_technique_settings_are_checked(overrides):
    with pytest.raises(tm.ConfigError, match=rf"^{next(iter(overrides))}="):
        tm.Hyperparameters({**TINY, **{k: str(v) for k, v in overrides.items()}})


def test_muon_weight_decay_row_norm_and_polar_express():
    torch.manual_seed(0)
    p, g = torch.nn.Parameter(torch.randn(6, 4)), torch.randn(6, 4)
    for wd, row_norm, polar in [(0.0, False, False), (0.1, False, False), (0.0, True, False), (0.0, False, True)]:
        q = torch.nn.Parameter(p.detach().clone())
        q.grad = g.clone()
        tm.Muon([q], lr=0.1, momentum=0.0, backend_steps=5, weight_decay=wd, row_norm=row_norm, polar_express=polar).step()
        update = g / g.norm(dim=-1, keepdim=True) if row_norm else g
        x = update.bfloat16().T
        x = x / (x.norm() + 1e-7)
        for a, b, c in tm.POLAR_EXPRESS if polar else [(3.4445, -4.7750, 2.0315)] * 5:
            gram = x @ x.T
            x = a * x + (b * gram + c * gram @ gram) @ x
        expected = p.detach() * (1 - 0.1 * wd) - 0.1 * (x.T * math.sqrt(6 / 4)).float()  # scaled in bf16, as Muon does
        torch.testing.assert_close(q.detach(), expected, atol=1e-6, rtol=1e-6)


def test_min_lr_floors_the_warmdown():
    cfg = tm.Hyperparameters({**TINY, "ITERATIONS": "100", "WARMDOWN_ITERS": "50", "MIN_LR": "0.1"})
    assert [tm.lr_scale(cfg, s, 0.0, math.inf) for s in (0, 50, 75, 95, 100)] == pytest.approx([1.0, 1.0, 0.5, 0.1, 0.1])


def test_lqer_lowers_the_error_it_corrects_and_is_counted():
    torch.manual_seed(0)
    state = {"blocks.0.mlp.fc.weight": torch.randn(64, 32) @ torch.randn(32, 32) / 6,
             "blocks.0.attn.q.weight": torch.randn(32, 32) * 0.01, "blocks.0.attn_scale": torch.ones(32)}
    levels = tm.rounded_levels(state, {"mlp": 4, "attn": 4}, 0.0)
    corrections = tm.lqer_corrections(state, levels, rank=4, count=1)
    assert list(corrections) == ["blocks.0.mlp.fc.weight"]  # the larger error of the two
    plain = tm.read_artifact(tm.pack_artifact(*tm.quantize_state(state, levels)))[1]
    corrected = tm.read_artifact(tm.pack_artifact(*tm.quantize_state(state, levels, corrections)))[1]
    name = "blocks.0.mlp.fc.weight"
    a, sa, b, sb = corrections[name]
    torch.testing.assert_close(corrected[name], plain[name] + tm.dequantize(a, sa, a.shape).T @ tm.dequantize(b, sb, b.shape))
    assert (corrected[name] - state[name]).norm() < 0.9 * (plain[name] - state[name]).norm()
    assert torch.equal(corrected["blocks.0.attn.q.weight"], plain["blocks.0.attn.q.weight"])
    header = tm.quantize_state(state, levels, corrections)[0]
    assert header[name]["lqer"] == 4 and "lqer" not in header["blocks.0.attn.q.weight"]
    extra = sum(t.numel() * t.element_size() for t in corrections[name])
    assert extra <= tm.lqer_bytes(state, rank=4, count=1) + 8 * 4
