"""scripts/sample.py: generation with a KV cache is the full forward's, token for token and routing weight for routing
weight, and the exported transformers model generates the same; the text is streamed whole; bad inputs are one
error line."""
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from transformers import AutoModelForCausalLM

import train_moe as tm
from conftest import REPO
from test_export_hf import MODES, make_artifact, reference

sys.path.insert(0, str(REPO / "scripts"))
import export_hf  # noqa: E402
import sample  # noqa: E402

GENERATED = 24
ROUTED = [m for m in MODES if m in ("softmax", "sigmoid", "hash", "shared_routed", "soft", "sqrtsoftplus",
                                     "hash_layers_limit", "hash_layers_softmax")]


@pytest.fixture(scope="module")
def artifacts(tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("sample_artifacts")
    return {mode: make_artifact(root / f"{mode}.moe", mode, tokenizer=tiny_data["tokenizer_path"]) for mode in ROUTED}


@pytest.fixture(scope="module")
def exported(artifacts, tmp_path_factory):
    root = tmp_path_factory.mktemp("sample_hf")
    for mode, artifact in artifacts.items():
        export_hf.export(artifact, root / mode, "fused")
    return {mode: AutoModelForCausalLM.from_pretrained(root / mode, trust_remote_code=True).eval() for mode in artifacts}


PROMPT = [1, 17, 5, 42, 8, 33]


@torch.no_grad()
def recomputed_greedy(model: tm.GPT, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model.logits(torch.tensor([ids]))[0][0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("mode", ROUTED)
def test_cached_greedy_generation_is_the_full_forwards_and_transformers(artifacts, exported, mode):
    model = reference(artifacts[mode])
    cached = list(sample.generate(model, PROMPT, GENERATED))
    assert cached == recomputed_greedy(model, PROMPT, GENERATED)
    hf = exported[mode].generate(torch.tensor([PROMPT]), max_new_tokens=GENERATED, do_sample=False)
    assert hf[0, len(PROMPT):].tolist() == cached
    # And the cached logits are the full forward's at every position, not just their argmax.
    with torch.no_grad(), sample.kv_cache(model):
        steps = [model.logits(torch.tensor([PROMPT]))[0]] + [model.logits(torch.tensor([[t]]))[0] for t in cached[:-1]]
    full = model.logits(torch.tensor([PROMPT + cached[:-1]]))[0]
    assert (torch.cat(steps, dim=1) - full).abs().max() < 1e-4


def test_transformers_cache_continues_with_several_tokens_at_once(exported):
    """As assisted generation does: new tokens after cached ones see the cache and each other causally."""
    hf, ids = exported["softmax"], torch.tensor([PROMPT + [3, 9, 27, 4, 11]])
    with torch.no_grad():
        first = hf(ids[:, :len(PROMPT)], use_cache=True)
        rest = hf(ids[:, len(PROMPT):], cache=first.cache, use_cache=True)
        assert (torch.cat([first.logits, rest.logits], dim=1) - hf(ids).logits).abs().max() < 1e-5


def test_sampling_is_reproducible_per_seed_and_stops_before_the_stop_token(artifacts):
    model = reference(artifacts["softmax"])
    draws = [list(sample.generate(model, PROMPT, GENERATED, temperature=1.0, seed=s)) for s in (0, 0, 1)]
    assert draws[0] == draws[1] != draws[2]
    # (The tiny model's greedy draw repeats one token: the stop is checked on seed 0's draw.)
    stop = next(t for i, t in enumerate(draws[0]) if t not in draws[0][:i] and i >= 3)
    assert list(sample.generate(model, PROMPT, GENERATED, temperature=1.0, seed=0, stop=stop)) == draws[0][: draws[0].index(stop)]


# ---------------------------------------------------------------- routing at generation

def tm_routes(model: tm.GPT, run) -> dict[int, list]:
    """{block: [(expert ids, weights) per call]} of every MoE layer while `run()` runs."""
    routes = {}
    for i, block in enumerate(model.blocks):
        if isinstance(block.mlp, tm.MoEMLP):
            def route(x, ids, original=block.mlp.route, calls=routes.setdefault(i, [])):
                idx, weights, counts, aux = original(x, ids)
                calls.append((idx, weights))
                return idx, weights, counts, aux
            block.mlp.route = route
    try:
        run()
    finally:
        for block in model.blocks:
            block.mlp.__dict__.pop("route", None)
    return routes


def hf_routes(model, run) -> dict[int, list]:
    routes, handles = {}, []
    for i, layer in enumerate(model.model.layers):
        if hasattr(layer.mlp, "gate"):
            calls = routes.setdefault(i, [])
            handles.append(layer.mlp.gate.register_forward_hook(lambda m, args, out, calls=calls: calls.append(out)))
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return routes


def routing_gap(a: dict, b: dict) -> float:
    """Max |weight difference| over every layer and token; infinite where different experts were picked."""
    assert a.keys() == b.keys() and a
    gap = 0.0
    for layer in a:
        (idx_a, w_a), (idx_b, w_b) = (tuple(torch.cat(part) for part in zip(*calls)) for calls in (a[layer], b[layer]))
        if not torch.equal(idx_a, idx_b):
            return float("inf")
        gap = max(gap, (w_a - w_b).abs().max().item())
    return gap


def softmax_over_top_k(gate, x, input_ids):
    """A classic bug: the top-k logits renormalized by their own softmax, i.e. NORM_TOPK_PROB=1 always."""
    top, idx = (x.float() @ gate.weight.float().T).topk(gate.top_k, dim=-1)
    return idx, top.softmax(dim=-1)


@pytest.mark.parametrize("mode", [m for m in ROUTED if m != "soft"])
def test_generation_routes_as_the_training_forward(artifacts, exported, mode):
    """Every token's experts and weights, per MoE layer: in the cached generation of sample.py and in the
    transformers model's generate, equal to train_moe's training forward (MoEMLP.route) over the same tokens."""
    model = reference(artifacts[mode])
    generated = []
    cached = tm_routes(model, lambda: generated.extend(sample.generate(model, PROMPT, GENERATED)))
    seen = torch.tensor([PROMPT + generated[:-1]])  # the last token is never fed back
    training = tm_routes(model, lambda: model.logits(seen))
    assert routing_gap(cached, training) < 1e-5
    hf = exported[mode]
    transformers_routes = hf_routes(hf, lambda: hf.generate(torch.tensor([PROMPT]), max_new_tokens=GENERATED, do_sample=False))
    assert routing_gap(transformers_routes, training) < 1e-5


def test_a_router_that_renormalizes_top_k_fails_the_routing_comparison(artifacts, exported, monkeypatch):
    """NORM_TOPK_PROB=0 keeps the raw softmax probabilities of the chosen experts; a router that takes the softmax
    of the top-k logits alone picks the same experts with other weights, and the comparison above catches it."""
    model, hf = reference(artifacts["softmax"]), exported["softmax"]
    seen = torch.tensor([PROMPT + list(sample.generate(model, PROMPT, GENERATED))[:-1]])
    training = tm_routes(model, lambda: model.logits(seen))
    for layer in hf.model.layers:
        if hasattr(layer.mlp, "gate"):
            monkeypatch.setattr(layer.mlp.gate, "forward", lambda x, ids, gate=layer.mlp.gate: softmax_over_top_k(gate, x, ids))
    wrong = hf_routes(hf, lambda: hf(seen))
    first = min(wrong)  # the later layers see what the wrong weights made of the earlier ones
    assert torch.equal(wrong[first][0][0].sort(-1).values, training[first][0][0].sort(-1).values)
    assert routing_gap(wrong, training) > 1e-2


# ---------------------------------------------------------------- command line

@pytest.fixture(scope="module")
def tiny_artifact(tiny_data, tmp_path_factory):
    """As artifacts were before they recorded their tokenizer."""
    vocab = str(tiny_data["vocab_size"])
    return make_artifact(tmp_path_factory.mktemp("tiny") / "tiny.moe", "softmax", VOCAB_SIZE=vocab)


@pytest.fixture(scope="module")
def small_artifact(tmp_path_factory):
    return make_artifact(tmp_path_factory.mktemp("small") / "small.moe", "softmax")  # VOCAB_SIZE=64, no record


def test_cli_prints_the_prompt_and_the_generated_text(tiny_data, tiny_artifact, capsys):
    args = [str(tiny_artifact), "--prompt", "The router", "--tokens", "30", "--temperature", "0",
            "--tokenizer", str(tiny_data["tokenizer_path"])]
    assert sample.main(args) == 0
    sp = spm.SentencePieceProcessor(model_file=str(tiny_data["tokenizer_path"]))
    prompt = [sp.bos_id()] + sp.encode("The router")
    tokens = list(sample.generate(reference(tiny_artifact), prompt, 30, stop=sp.bos_id()))
    out = capsys.readouterr().out
    assert out == sp.decode(prompt + tokens) + "\n" and out.startswith("The router") and len(out) > len("The router\n")


def test_text_waits_for_the_last_byte_of_a_character(tiny_data):
    sp = spm.SentencePieceProcessor(model_file=str(tiny_data["tokenizer_path"]))
    ids = sp.encode("price: 5€, ok")
    assert any(sp.is_byte(i) for i in ids)  # the tiny tokenizer spells € in bytes
    pieces = list(sample.text_pieces(sp, ids[:2], iter(ids[2:])))
    assert "".join(pieces) == sp.decode(ids)[len(sp.decode(ids[:2])):] and not any("\ufffd" in p for p in pieces)
    assert "€" in pieces  # the three bytes come out as one piece


@pytest.mark.parametrize("case,message", [
    (["missing.moe", "--prompt", "x"], "missing.moe: no such artifact"),
    (["{artifact}", "--prompt", ""], "--prompt is empty; give some text to continue"),
    (["{artifact}", "--prompt", "x", "--tokens", "0"], "--tokens 0: generate at least 1"),
    (["{artifact}", "--prompt", "x", "--temperature", "-1"], "--temperature -1.0: a finite number >= 0"),
    (["{artifact}", "--prompt", "x", "--tokenizer", "nope.model"], "nope.model: no such tokenizer; pass the run's with --tokenizer"),
    (["{artifact}", "--prompt", "x"], "{default}: no such tokenizer; pass the run's with --tokenizer"),
    (["{artifact}", "--prompt", "x", "--tokenizer", "{artifact}"], "{artifact}: not a SentencePiece model"),
    (["{small}", "--prompt", "x", "--tokenizer", "{tokenizer}"], "{tokenizer}: {vocab} pieces, but the model has VOCAB_SIZE=64"),
    (["{artifact}", "--prompt", "x", "--seed", str(2**64)], f"--seed {2**64}: an integer from 0 to 2**64 - 1"),
    (["{artifact}", "--prompt", "x", "--seed", "-1"], "--seed -1: an integer from 0 to 2**64 - 1"),
    (["{artifact}", "--prompt", "caf\udce9"], "--prompt holds bytes that are not UTF-8 text"),  # how argv gives b"caf\xe9"
], ids=["no_artifact", "empty_prompt", "no_tokens", "negative_temperature", "no_tokenizer", "default_tokenizer_absent",
        "not_a_tokenizer", "vocab_differs", "seed_too_big", "seed_negative", "prompt_not_utf8"])
def test_bad_inputs_are_one_error_line(tiny_data, tiny_artifact, small_artifact, tmp_path, monkeypatch, capsys, case,
                                       message):
    monkeypatch.chdir(tmp_path)
    values = dict(artifact=tiny_artifact, small=small_artifact, tokenizer=tiny_data["tokenizer_path"],
                  vocab=tiny_data["vocab_size"], default=Path(sample.load_artifact(tiny_artifact)[0].tokenizer_path))
    assert sample.main([arg.format(**values) for arg in case]) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith(f"error: {message.format(**values)}") and captured.err.count("\n") == 1, captured.err
    assert captured.out == "" and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("temperature", ["1e-300", "5e-324"])
def test_a_tiny_temperature_samples_the_likeliest_token(tiny_data, tiny_artifact, capsys, temperature):
    """logits / 1e-300 overflowed to inf and the softmax to NaN: multinomial raised."""
    args = [str(tiny_artifact), "--prompt", "The router", "--tokens", "12", "--tokenizer", str(tiny_data["tokenizer_path"])]
    assert sample.main([*args, "--temperature", "0"]) == 0
    greedy = capsys.readouterr().out
    assert sample.main([*args, "--temperature", temperature, "--seed", str(2**64 - 1)]) == 0
    assert capsys.readouterr().out == greedy


def run_sample(args: list, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, REPO / "scripts/sample.py", *args], stderr=subprocess.PIPE, timeout=120, **kwargs)


def test_a_prompt_of_bytes_that_are_not_utf8_is_one_line(tiny_data, tiny_artifact):
    result = run_sample([tiny_artifact, "--prompt", b"caf\xe9", "--tokenizer", tiny_data["tokenizer_path"]],
                        stdout=subprocess.PIPE)
    assert result.returncode == 1 and result.stdout == b""
    assert result.stderr == b"error: --prompt holds bytes that are not UTF-8 text\n"


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full")
def test_stdout_on_a_full_disk_is_one_line(tiny_data, tiny_artifact):
    with open("/dev/full", "w") as full:
        result = run_sample([tiny_artifact, "--prompt", "The", "--tokenizer", tiny_data["tokenizer_path"]], stdout=full)
    assert result.returncode == 1 and result.stderr == b"error: stdout: No space left on device\n"


# ---------------------------------------------------------------- the artifact's tokenizer record

def test_the_recorded_tokenizer_is_found_without_being_named(tiny_data, artifacts, tmp_path, monkeypatch):
    """At the path the run used; else beside the artifact; a file of another hash is passed over for the right one."""
    monkeypatch.chdir(tmp_path)
    tokenizer, artifact = tiny_data["tokenizer_path"], artifacts["softmax"]
    cfg, _ = sample.load_model(artifact)
    assert sample.load_tokenizer(artifact, cfg)[0] == tokenizer
    moved = tmp_path / "run"
    moved.mkdir()
    (moved / artifact.name).write_bytes(artifact.read_bytes())
    (moved / tokenizer.name).write_bytes(tokenizer.read_bytes() + b"\n")  # beside it, but another file
    assert sample.load_tokenizer(moved / artifact.name, cfg)[0] == tokenizer
    cfg.tokenizer_path = str(tmp_path / "gone" / tokenizer.name)  # as if the run's folder were gone
    with pytest.raises(ValueError, match=rf"{moved / tokenizer.name}: SHA-256 [0-9a-f]{{12}}\.\.\., but "):
        sample.load_tokenizer(moved / artifact.name, cfg)
    (moved / tokenizer.name).write_bytes(tokenizer.read_bytes())
    assert sample.load_tokenizer(moved / artifact.name, cfg)[0] == moved / tokenizer.name


def test_cli_refuses_a_tokenizer_of_another_hash(tiny_data, artifacts, tmp_path, capsys):
    other = tmp_path / "other.model"
    other.write_bytes(tiny_data["tokenizer_path"].read_bytes() + b"\n")
    assert sample.main([str(artifacts["softmax"]), "--prompt", "x", "--tokenizer", str(other)]) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith(f"error: {other}: SHA-256 ") and "was trained with tok.model of SHA-256" in captured.err
    assert captured.err.count("\n") == 1 and captured.out == ""
    assert sample.main([str(artifacts["softmax"]), "--prompt", "The router", "--tokens", "5"]) == 0  # its own: found
    assert capsys.readouterr().out.startswith("The router")


@pytest.mark.parametrize("settings", [
    dict(ROPE_DIMS="4", XSA_LAST_N="2", ATTN_GATE="1", MLP_ACT="leaky_relu2"),  # continued through the cache
    dict(SMEAR_GATE="1", BIGRAM_BUCKETS="61", BIGRAM_DIM="8"),  # they read the token before: recomputed
    dict(RECUR_LAYERS="0", RECUR_LOOPS="2"),
], ids=["cached", "looks_back", "recurrence"])
def test_generation_with_the_techniques_is_the_greedy_continuation_of_the_whole_sequence(settings):
    """With every token fed back, the model's own argmax over the whole sequence: the cache (or, where a technique
    reads the token before or runs a block twice, the recomputation) changes nothing."""
    cfg = tm.Hyperparameters({"NUM_LAYERS": "2", "MODEL_DIM": "32", "NUM_HEADS": "4", "NUM_KV_HEADS": "2",
                              "VOCAB_SIZE": "64", "MLP_MODE": "dense", "QUANT_METHOD": "rtn", **settings})
    torch.manual_seed(0)
    model = tm.GPT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    prompt = [1, 17, 5, 1, 42, 8]  # a BOS inside the prompt too
    generated = list(sample.generate(model, prompt, 12))
    ids = list(prompt)
    for _ in range(12):
        with torch.no_grad():
            ids.append(int(model.logits(torch.tensor([ids]))[0][0, -1].argmax()))
    assert generated == ids[len(prompt):]
