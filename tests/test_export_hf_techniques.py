"""scripts/export_hf.py and modeling_moe_golf.py on train_moe's model techniques (MLP_ACT and EXPERT_ACT leaky_relu2,
ROPE_DIMS, XSA_LAST_N, LN_SCALE, SMEAR_GATE, BIGRAM_BUCKETS, ATTN_GATE, PARALLEL_LAYERS, RECUR_LAYERS), each alone
and all together: the exported folder gives train_moe's logits on sequences with documents starting inside them; a
forward continued through the cache in pieces (one token, several, a BOS alone) gives the whole sequence's; greedy
generation with the cache equals generation without it and train_moe's own greedy loop."""
import json
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import export_hf  # noqa: E402
import hf_layouts  # noqa: E402
from test_export_hf import FOLDER, PARITY, make_artifact, reference  # noqa: E402

BOS = 1  # the tiny tokenizer's (data/prepare.py's SPECIAL_IDS), which starts every document
TECHNIQUES = {
    "leaky_relu2": {"MLP_MODE": "shared_routed", "MLP_ACT": "leaky_relu2", "EXPERT_ACT": "leaky_relu2"},
    "rope_dims": {"ROPE_DIMS": "4"},  # of the heads' 8
    "xsa": {"XSA_LAST_N": "2"},
    "ln_scale": {"LN_SCALE": "1"},
    "smear_gate": {"SMEAR_GATE": "1"},
    "bigram": {"BIGRAM_BUCKETS": "97", "BIGRAM_DIM": "8"},
    "attn_gate": {"ATTN_GATE": "1"},
    "parallel": {"PARALLEL_LAYERS": "1,2"},
    "recur": {"RECUR_LAYERS": "1-2", "RECUR_LOOPS": "2"},  # blocks 0 1 2 1 2 1 2 3: 8 runs, 4 skips
}
TECHNIQUES["all"] = {k: v for t in TECHNIQUES.values() for k, v in t.items()} | {"TIE_EMBEDDINGS": "0"}
# Pieces of a 24-token sequence fed one after another through the cache: the prompt, two, then BOS alone (row 0's
# 9 and 10), a piece starting right after BOS, one token, a piece starting at BOS (row 1's 17).
PIECES = [7, 2, 1, 1, 5, 1, 7]


def sequence(vocab: int, seed: int = 1) -> torch.Tensor:
    """Two rows of 24 random ids, each a document from its first id, with more starting inside (two in a row)."""
    ids = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(seed))
    ids[ids == BOS] = BOS + 1
    ids[:, 0] = ids[0, 9] = ids[0, 10] = ids[1, 5] = ids[1, 17] = BOS
    return ids


@pytest.fixture(scope="module")
def exported(tiny_data, tmp_path_factory):
    """{technique: (artifact, folder exported in the fused layout)}, built on first use."""
    root, done = tmp_path_factory.mktemp("techniques"), {}

    def get(technique: str):
        if technique not in done:
            artifact = make_artifact(root / f"{technique}.moe", "softmax", tokenizer=tiny_data["tokenizer_path"],
                                     BOS_ID=str(BOS), **TECHNIQUES[technique])
            out = root / technique
            assert export_hf.main([str(artifact), "--out", str(out)]) == 0
            done[technique] = artifact, out
        return done[technique]
    return get


def load(folder, **kwargs):
    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, **kwargs).eval()


@torch.no_grad()
@pytest.mark.parametrize("technique", TECHNIQUES)
def test_exported_technique_gives_train_moes_logits(exported, technique):
    artifact, folder = exported(technique)
    assert sorted(p.name for p in folder.iterdir()) == FOLDER
    model = reference(artifact)
    ids = sequence(model.tok_emb.num_embeddings)
    assert (load(folder)(ids).logits - model.logits(ids)[0]).abs().max() < PARITY


@torch.no_grad()
@pytest.mark.parametrize("technique", TECHNIQUES)
def test_the_cache_fed_in_pieces_gives_the_whole_sequences_logits(exported, technique):
    artifact, folder = exported(technique)
    model = load(folder)
    ids = sequence(model.config.vocab_size)
    whole, pieces, cache, start = model(ids).logits, [], None, 0
    for n in PIECES:  # the first call makes the cache, from the config, as generate does
        out = model(ids[:, start : start + n], cache=cache, use_cache=True)
        cache, start = out.cache, start + n
        pieces.append(out.logits)
    assert start == ids.size(1) and cache.get_seq_length() == start
    assert (torch.cat(pieces, dim=1) - whole).abs().max() < PARITY


@torch.no_grad()
@pytest.mark.parametrize("technique", TECHNIQUES)
def test_greedy_generation_with_the_cache_equals_without_and_train_moes(exported, technique):
    artifact, folder = exported(technique)
    model, ref = load(folder), reference(artifact)
    model.generation_config.eos_token_id = None  # run through a BOS the model may emit, as train_moe's loop does
    prompt = sequence(model.config.vocab_size)[:, :11]  # ends with two BOS in row 0
    cached = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=True)
    uncached = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=False)
    expected = prompt
    for _ in range(12):
        expected = torch.cat((expected, ref.logits(expected)[0][:, -1].argmax(-1, keepdim=True)), dim=1)
    assert torch.equal(cached, uncached) and torch.equal(cached, expected)


def test_all_techniques_in_every_layout_and_their_config(exported, tmp_path):
    artifact, folder = exported("all")
    config = json.loads((folder / "config.json").read_text())
    assert {k: config[k] for k in ("mlp_act", "expert_act", "rotary_dim", "xsa_layers", "ln_scale", "smear_gate",
                                   "bos_token_id", "bigram_buckets", "bigram_dim", "attn_gate", "parallel_layers",
                                   "recur_layers", "recur_loops")} == {
        "mlp_act": "leaky_relu2", "expert_act": "leaky_relu2", "rotary_dim": 4, "xsa_layers": [2, 3], "ln_scale": True,
        "smear_gate": True, "bos_token_id": BOS, "bigram_buckets": 97, "bigram_dim": 8, "attn_gate": True,
        "parallel_layers": [1, 2], "recur_layers": [1, 2], "recur_loops": 2}
    model, ids = reference(artifact), sequence(config["vocab_size"])
    for layout in ("per-expert", "mlx"):
        assert hf_layouts.main([str(folder), "--to", layout, "--out", str(tmp_path / layout)]) == 0
        with torch.no_grad():
            assert (load(tmp_path / layout)(ids).logits - model.logits(ids)[0]).abs().max() < PARITY
    with torch.no_grad():  # bf16: the ids the cache keeps stay integers; rounding of 30-capped logits
        bf16 = load(folder, dtype=torch.bfloat16)
        out = bf16(ids[:, :7], use_cache=True)
        step = bf16(ids[:, 7:9], cache=out.cache, use_cache=True).logits
        assert (step - model.logits(ids[:, :9])[0][:, 7:]).abs().max() < 0.25


def test_the_cache_has_a_layer_per_block_run_and_one_for_ids_where_the_embedding_looks_back(exported):
    """Without recurrence, smear or bigram, one layer per block, as before."""
    counts = {}
    for technique in ("xsa", "smear_gate", "recur"):
        model = load(exported(technique)[1])
        counts[technique] = len(model(sequence(model.config.vocab_size), use_cache=True).cache.layers)
    assert counts == {"xsa": 4, "smear_gate": 5, "recur": 8}
