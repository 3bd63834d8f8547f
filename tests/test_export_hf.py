"""scripts/export_hf.py, modeling_moe_golf.py and hf_layouts.py: every MLP mode and router exported in every expert
layout loads with AutoModelForCausalLM and gives train_moe's logits; the run's tokenizer travels with it and encodes as
SentencePiece; the README's snippet generates sample.py's text; layout conversions are exact and refuse incomplete
experts; bad inputs are one error line with nothing written."""
import hashlib
import json
import os
import re
import shlex
import subprocess
import sys

import pytest
import sentencepiece as spm
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import train_moe as tm
from conftest import REPO, copy_run

sys.path.insert(0, str(REPO / "scripts"))
import export_hf  # noqa: E402
import sample  # noqa: E402
import hf_layouts  # noqa: E402
import modeling_moe_golf  # noqa: E402

TINY = {"VOCAB_SIZE": "64", "NUM_LAYERS": "4", "MODEL_DIM": "32", "NUM_HEADS": "4", "NUM_KV_HEADS": "2",
        "MOE_LAYERS": "odd", "NUM_EXPERTS": "4", "TOP_K": "2", "EXPERT_HIDDEN": "16", "MLP_MULT": "2"}
MODES = {
    "dense": {"MLP_MODE": "dense"},
    "softmax": {"MLP_MODE": "sparse"},
    "softmax_norm_untied": {"MLP_MODE": "sparse", "NORM_TOPK_PROB": "1", "TIE_EMBEDDINGS": "0"},
    "sigmoid": {"MLP_MODE": "sparse", "ROUTER": "sigmoid"},
    "hash": {"MLP_MODE": "sparse", "ROUTER": "hash"},
    "shared_routed": {"MLP_MODE": "shared_routed", "EXPERT_ACT": "swiglu"},
    "shared_relu2_ungated": {"MLP_MODE": "shared_routed", "SHARED_GATE": "0", "SHARED_HIDDEN": "24"},
    "soft": {"MLP_MODE": "soft"},
    "swiglu": {"MLP_MODE": "sparse", "EXPERT_ACT": "swiglu"},
}
if "sqrtsoftplus" in tm.ROUTERS:
    MODES.update({
        "sqrtsoftplus": {"MLP_MODE": "sparse", "ROUTER": "sqrtsoftplus", "ROUTE_SCALE": "1.5"},
        "hash_layers_limit": {"MLP_MODE": "sparse", "ROUTER": "sigmoid", "HASH_LAYERS": "1", "EXPERT_ACT": "swiglu",
                              "SWIGLU_LIMIT": "0.5"},
        "hash_layers_softmax": {"MLP_MODE": "shared_routed", "HASH_LAYERS": "1", "ROUTE_SCALE": "2"},
    })
PARITY = 1e-4
FOLDER = ["config.json", "generation_config.json", "model.safetensors", "modeling_moe_golf.py", "tokenizer.json",
          "tokenizer_config.json"]


def make_artifact(path, mode: str, seed: int = 0, tokenizer=None, **overrides):
    """A randomized model of `mode` (no zero-initialised output weights, random selection biases) packed as the trainer
    packs it, at 8 bits; with a tokenizer, the model's vocabulary is its and the artifact records it as a run's does.
    Returns the path."""
    if tokenizer is not None:
        overrides["VOCAB_SIZE"] = str(spm.SentencePieceProcessor(model_file=str(tokenizer)).vocab_size())
    cfg = tm.Hyperparameters({**TINY, **MODES[mode], **overrides})
    if tokenizer is not None:
        cfg.model_settings.update(TOKENIZER_PATH=str(tokenizer),
                                  TOKENIZER_SHA256=hashlib.sha256(tokenizer.read_bytes()).hexdigest())
    torch.manual_seed(seed)
    model = tm.GPT(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        for name, b in model.named_buffers():
            if name.endswith("router_bias"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.2)
    state = model.state_dict()
    bits = {"embed": 8, "attn": 8, "mlp": 8, "experts": 8}
    path.write_bytes(tm.pack_artifact(*tm.quantize_state(state, tm.rounded_levels(state, bits, 0.0)), cfg.model_settings))
    return path


def reference(artifact) -> tm.GPT:
    cfg, state = sample.load_artifact(artifact)
    model = tm.GPT(cfg).eval()
    model.load_state_dict(state)
    return model


def tokens(vocab: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logit_gap(folder, model: tm.GPT) -> float:
    loaded = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    return (loaded(tokens()).logits - model.logits(tokens())[0]).abs().max().item()


@pytest.fixture(scope="module")
def artifacts(tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("artifacts")
    return {mode: make_artifact(root / f"{mode}.moe", mode, tokenizer=tiny_data["tokenizer_path"]) for mode in MODES}


@pytest.mark.parametrize("layout", hf_layouts.LAYOUTS)
@pytest.mark.parametrize("mode", MODES)
def test_exported_model_gives_train_moes_logits(artifacts, tmp_path, mode, layout):
    out = tmp_path / "hf"
    assert export_hf.main([str(artifacts[mode]), "--out", str(out), "--layout", layout]) == 0
    assert sorted(p.name for p in out.iterdir()) == FOLDER
    gap = logit_gap(out, reference(artifacts[mode]))
    assert gap < PARITY
    names = load_file(out / "model.safetensors")
    expert_names = [n for n in names if ".experts." in n or ".switch_mlp." in n]
    if MODES[mode]["MLP_MODE"] == "dense":
        assert not expert_names
    else:
        assert expert_names and all(hf_layouts.PATTERNS[layout].fullmatch(n) for n in expert_names)
    if "HASH_LAYERS" in MODES[mode] or MODES[mode].get("ROUTER") == "hash":
        cfg, _ = sample.load_artifact(artifacts[mode])
        table = tm.balanced_hash_table(cfg.vocab_size, cfg.num_experts, cfg.top_k, cfg.seed, cfg.moe_layers[0])
        assert torch.equal(names["model.layers.1.mlp.gate.tid2eid"], table)


def test_config_names_the_modeling_file_and_the_settings(artifacts, tmp_path):
    export_hf.export(artifacts["hash"], tmp_path / "hf", "mlx")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_moe_golf.MoeGolfForCausalLM"
    assert (config["model_type"], config["expert_layout"], config["router"], config["moe_layers"]) == ("moe_golf", "mlx", "hash", [1, 3])
    assert config["train_moe_settings"]["ROUTER"] == "hash"
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True)).__name__ == "MoeGolfForCausalLM"


def test_labels_give_train_moes_loss(artifacts, tmp_path):
    export_hf.export(artifacts["sigmoid"], tmp_path / "hf", "fused")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    ids = tokens()
    with torch.no_grad():
        expected = reference(artifacts["sigmoid"]).token_losses(ids[:, :-1], ids[:, 1:]).mean()
        assert loaded(ids, labels=ids).loss.item() == pytest.approx(expected.item(), abs=1e-5)


def test_loads_in_bfloat16_with_hash_tables_kept_as_integers(artifacts, tmp_path):
    export_hf.export(artifacts["hash"], tmp_path / "hf", "fused")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True, dtype=torch.bfloat16).eval()
    fp32 = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    assert model.model.layers[1].mlp.gate.tid2eid.dtype == torch.int64
    with torch.no_grad():
        assert (model(tokens()).logits - fp32(tokens()).logits).abs().max() < 0.25  # bf16 rounding of 30-capped logits


# ---------------------------------------------------------------- layouts

def fused_state(gated: bool, layers=(1, 3), experts=4, hidden=3, dim=5, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    state = {"model.embed_tokens.weight": torch.randn(7, dim, generator=g)}
    for i in layers:
        prefix = f"model.layers.{i}.mlp.experts"
        state[f"{prefix}.{'gate_up_proj' if gated else 'up_proj'}"] = torch.randn(experts, (2 if gated else 1) * hidden, dim, generator=g)
        state[f"{prefix}.down_proj"] = torch.randn(experts, dim, hidden, generator=g)
        state[f"model.layers.{i}.mlp.gate.weight"] = torch.randn(experts, dim, generator=g)
    return state


def assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("gated", [True, False], ids=["swiglu", "relu2"])
def test_round_trips_between_every_pair_of_layouts_are_exact(gated):
    fused = fused_state(gated)
    direct = {layout: hf_layouts.convert(fused, layout) for layout in hf_layouts.LAYOUTS}
    assert_same(direct["fused"], fused)
    for source in hf_layouts.LAYOUTS:
        for target in hf_layouts.LAYOUTS:
            there = hf_layouts.convert(direct[source], target)
            assert_same(there, direct[target])
            assert_same(hf_layouts.convert(there, source), direct[source])
    assert len([n for n in direct["per-expert"] if ".experts." in n]) == 2 * 4 * (3 if gated else 2)
    for layout, convert in (("per-expert", hf_layouts.to_per_expert), ("fused", hf_layouts.to_fused), ("mlx", hf_layouts.to_mlx)):
        assert_same(convert(direct["per-expert"]), direct[layout])


def test_gate_rows_come_first_and_each_expert_lands_in_its_slot():
    """Expert e's gate is all 10e+1, its up 10e+2, its down 10e+3: the fused bank is [gate; up] per expert."""
    F, D = 2, 3
    state = {}
    for e in range(3):
        for p, proj in enumerate(("gate_proj", "up_proj", "down_proj"), start=1):
            shape = (D, F) if proj == "down_proj" else (F, D)
            state[f"m.layers.0.mlp.experts.{e}.{proj}.weight"] = torch.full(shape, 10.0 * e + p)
    fused = hf_layouts.to_fused(state)
    gate_up = fused["m.layers.0.mlp.experts.gate_up_proj"]
    assert gate_up.shape == (3, 2 * F, D) and fused["m.layers.0.mlp.experts.down_proj"].shape == (3, D, F)
    for e in range(3):
        assert (gate_up[e, :F] == 10 * e + 1).all() and (gate_up[e, F:] == 10 * e + 2).all()
        assert (fused["m.layers.0.mlp.experts.down_proj"][e] == 10 * e + 3).all()
    mlx = hf_layouts.to_mlx(fused)
    assert (mlx["m.layers.0.mlp.switch_mlp.gate_proj.weight"][2] == 21).all()
    assert (mlx["m.layers.0.mlp.switch_mlp.up_proj.weight"][1] == 12).all()


def per_expert(gated=True) -> dict:
    return hf_layouts.to_per_expert(fused_state(gated, layers=(1,), experts=8))


def without(state: dict, *names) -> dict:
    return {n: t for n, t in state.items() if n not in names}


L1 = "model.layers.1.mlp"


@pytest.mark.parametrize("state,num_experts,message", [
    (without(per_expert(), *(f"{L1}.experts.3.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj"))), None,
     f"{L1}: expert 3 of 8 is missing"),
    (without(per_expert(), *(f"{L1}.experts.7.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj"))), 8,
     f"{L1}: expert 7 of 8 is missing"),
    (without(per_expert(), f"{L1}.experts.5.up_proj.weight"), None, f"{L1}: expert 5 of 8 has no up_proj"),
    (without(per_expert(False), f"{L1}.experts.0.down_proj.weight"), None, f"{L1}: expert 0 of 8 has no down_proj"),
    (without(per_expert(), f"{L1}.experts.2.gate_proj.weight"), None, f"{L1}: expert 2 of 8 has no gate_proj"),
    (per_expert(), 4, f"{L1}: expert 4 is beyond the 4 experts of the config"),
    (without(hf_layouts.to_mlx(per_expert()), f"{L1}.switch_mlp.up_proj.weight"), None,
     f"{L1}: switch_mlp has gate_proj but no up_proj"),
    (without(hf_layouts.to_mlx(per_expert()), f"{L1}.switch_mlp.down_proj.weight"), None, f"{L1}: switch_mlp has no down_proj"),
    (without(hf_layouts.to_fused(per_expert()), f"{L1}.experts.down_proj"), None, f"{L1}: experts without down_proj"),
    (without(hf_layouts.to_fused(per_expert()), f"{L1}.experts.gate_up_proj"), None,
     f"{L1}: down_proj without gate_up_proj or up_proj"),
    ({**hf_layouts.to_fused(per_expert()), f"{L1}.switch_mlp.up_proj.weight": torch.zeros(8, 3, 5)}, None,
     f"{L1}: experts stored in two layouts (fused and mlx)"),
    ({**hf_layouts.to_fused(per_expert()), f"{L1}.experts.down_proj": torch.zeros(7, 5, 3)}, None,
     f"{L1}: down is [7, 5, 3], expected [8, 5, 3] for up [8, 3, 5]"),
    (hf_layouts.to_fused(per_expert()), 16, f"{L1}: 8 experts, the config says 16"),
    ({**per_expert(), f"{L1}.experts.6.up_proj.weight": torch.zeros(4, 5)}, None,
     f"{L1}: the experts' up_proj differ in shape: [3, 5], [4, 5]"),
    ({**per_expert(), f"{L1}.experts.6.up_proj.weight": torch.zeros(3, 5, 1)}, None,
     f"{L1}: expert 6's up_proj is [3, 5, 1], not a matrix"),
    ({**hf_layouts.to_mlx(per_expert()), f"{L1}.switch_mlp.down_proj.weight": torch.zeros(5, 3)}, None,
     f"{L1}: down_proj is [5, 3], not a bank [experts, out, in]"),
], ids=["expert_missing", "last_expert_missing", "no_up", "no_down", "gate_of_one_missing", "too_many", "mlx_gate_no_up",
        "mlx_no_down", "fused_no_down", "fused_no_up", "two_layouts", "bank_sizes_differ", "count_differs",
        "expert_shapes_differ", "expert_not_a_matrix", "bank_not_3d"])
def test_incomplete_experts_are_refused_naming_the_layer(state, num_experts, message):
    for layout in hf_layouts.LAYOUTS:
        with pytest.raises(ValueError) as info:
            hf_layouts.convert(state, layout, num_experts)
        assert str(info.value) == message


def test_a_converter_that_swaps_gate_and_up_is_caught_by_the_logits(artifacts, tmp_path):
    """What a converter that wrote [up; gate] would produce: the folder still loads, every shape fits, only the
    logits tell; the real converter's folder gives train_moe's logits."""
    model = reference(artifacts["swiglu"])
    export_hf.export(artifacts["swiglu"], tmp_path / "per_expert", "per-expert")
    assert hf_layouts.main([str(tmp_path / "per_expert"), "--to", "fused", "--out", str(tmp_path / "fused")]) == 0
    assert logit_gap(tmp_path / "fused", model) < PARITY

    state = load_file(tmp_path / "fused" / "model.safetensors")
    swapped = tmp_path / "swapped"
    swapped.mkdir()
    for file in ("config.json", "modeling_moe_golf.py"):
        (swapped / file).write_bytes((tmp_path / "fused" / file).read_bytes())
    for name in [n for n in state if n.endswith("gate_up_proj")]:
        gate, up = state[name].chunk(2, dim=1)
        state[name] = torch.cat([up, gate], dim=1).contiguous()
    save_file(state, swapped / "model.safetensors", metadata={"format": "pt"})
    assert logit_gap(swapped, model) > 1e-2


def test_converting_a_folder_equals_exporting_in_that_layout(artifacts, tmp_path):
    export_hf.export(artifacts["shared_routed"], tmp_path / "per_expert", "per-expert")
    export_hf.export(artifacts["shared_routed"], tmp_path / "mlx", "mlx")
    assert hf_layouts.main([str(tmp_path / "per_expert"), "--to", "mlx", "--out", str(tmp_path / "converted")]) == 0
    assert_same(load_file(tmp_path / "converted" / "model.safetensors"), load_file(tmp_path / "mlx" / "model.safetensors"))
    assert (json.loads((tmp_path / "converted" / "config.json").read_text())
            == json.loads((tmp_path / "mlx" / "config.json").read_text()))
    assert logit_gap(tmp_path / "converted", reference(artifacts["shared_routed"])) < PARITY


# ---------------------------------------------------------------- refusals

def tree(root) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() if p.is_file() else None for p in root.rglob("*")}


def assert_refused(capsys, code: int, message: str) -> str:
    err = capsys.readouterr().err
    assert code == 1 and err.startswith(f"error: {message}") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("case,message", [
    ("missing", "{root}/missing.moe: no such artifact"),
    ("garbage", "{root}/garbage.moe: corrupt, or not a moe-golf artifact: "),
    ("no_settings", "{root}/no_settings.moe: the artifact has no model settings to rebuild its model from"),
    ("extra_tensor", "{root}/extra_tensor.moe: its tensors do not fit train_moe.py's model for its settings "
                     "(Unexpected key(s) in state_dict: \"blocks.1.mlp.mystery\"."),
    ("out_not_empty", "{root}/full: exists and is not an empty folder; choose a new one"),
])
def test_bad_inputs_are_one_error_line_and_write_nothing(artifacts, tmp_path, capsys, case, message):
    (tmp_path / "garbage.moe").write_bytes(b"not an artifact")
    state = reference(artifacts["softmax"]).state_dict()
    (tmp_path / "no_settings.moe").write_bytes(tm.pack_artifact(*tm.quantize_state(state, {})))
    cfg, _ = sample.load_artifact(artifacts["softmax"])
    (tmp_path / "extra_tensor.moe").write_bytes(
        tm.pack_artifact(*tm.quantize_state({**state, "blocks.1.mlp.mystery": torch.ones(3)}, {}), cfg.model_settings))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("keep me")
    artifact = artifacts["softmax"] if case == "out_not_empty" else tmp_path / f"{case}.moe"
    out = tmp_path / ("full" if case == "out_not_empty" else "hf")
    before = tree(tmp_path)
    assert_refused(capsys, export_hf.main([str(artifact), "--out", str(out)]), message.format(root=tmp_path))
    assert tree(tmp_path) == before


def test_a_model_the_modeling_file_does_not_reproduce_is_not_exported(artifacts, tmp_path, capsys, monkeypatch):
    """As if train_moe had gained a feature the modeling file lacks: here its RoPE turned the other way."""
    monkeypatch.setattr(modeling_moe_golf, "rotary", lambda x, base, start, dims=0: x.flip(-1))
    code = export_hf.main([str(artifacts["softmax"]), "--out", str(tmp_path / "hf")])
    assert_refused(capsys, code, f"{artifacts['softmax']}: the exported model's logits differ from train_moe's by up to")
    assert list(tmp_path.iterdir()) == []


def test_names_the_modeling_file_does_not_know_are_not_exported(artifacts, tmp_path, capsys, monkeypatch):
    renames = [(p, t.replace("q_gain", "q_scale")) for p, t in export_hf.RENAMES]
    monkeypatch.setattr(export_hf, "RENAMES", renames)
    code = export_hf.main([str(artifacts["dense"]), "--out", str(tmp_path / "hf")])
    err = assert_refused(capsys, code, "the exported weights do not fit modeling_moe_golf.py: missing keys "
                                       "model.layers.0.self_attn.q_gain, model.layers.1.self_attn.q_gain, ")
    assert "; unexpected keys model.layers.0.self_attn.q_scale, " in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args,message", [
    (["missing", "--to", "mlx", "--out", "new"], "missing: not an exported model folder (config.json and model.safetensors)"),
    (["exported", "--to", "mlx", "--out", "exported"], "exported: exists and is not an empty folder; choose a new one"),
])
def test_layout_cli_refusals(artifacts, tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    export_hf.export(artifacts["softmax"], tmp_path / "exported", "fused")
    before = tree(tmp_path)
    assert_refused(capsys, hf_layouts.main(args), message)
    assert tree(tmp_path) == before


# ---------------------------------------------------------------- the tokenizer, the README, file modes

def test_the_folders_tokenizer_encodes_and_decodes_as_sentencepiece(artifacts, tiny_data, tmp_path):
    export_hf.export(artifacts["softmax"], tmp_path / "hf", "fused")
    hf = AutoTokenizer.from_pretrained(tmp_path / "hf", trust_remote_code=True)
    sp = spm.SentencePieceProcessor(model_file=str(tiny_data["tokenizer_path"]))
    texts = tiny_data["documents"] + export_hf.TOKENIZER_CHECK  # the tokenizer's own training text and edge cases
    for text in texts:
        ids = hf(text)["input_ids"]
        assert ids == [sp.bos_id()] + sp.encode(text), text[:60]
        assert hf.decode(ids, skip_special_tokens=True) == sp.decode(ids)
    assert any(sp.is_byte(i) for text in texts for i in sp.encode(text))  # byte fallback was exercised
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == sp.bos_id()  # a document ends where the model starts the next one


def readme_commands() -> tuple[list[list[str]], str]:
    """The README's commands after the quick start (the tools on its artifact) and its Python snippet."""
    readme = (REPO / "README.md").read_text()
    bash = next(b for b in re.findall(r"```bash\n(.*?)```", readme, re.S) if "scripts/sample.py" in b)
    commands = [shlex.split(line, comments=True) for line in bash.splitlines()]
    python = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "AutoTokenizer" in b)
    return [c for c in commands if c[1] in ("scripts/sample.py", "scripts/export_hf.py")], python


def test_the_readme_snippet_as_written_generates_sample_pys_greedy_text(quickstart_run, tmp_path):
    """In a folder laid out as the repo after the quick start (a tiny MoE run in its place), the README's sample and
    export commands and then its snippet, all as written: the snippet prints sample.py's text. (A trained model: an
    untrained one emits byte pieces that are no UTF-8, which SentencePiece and transformers decode differently.)"""
    copy_run(quickstart_run, tmp_path)
    (tmp_path / "scripts").symlink_to(REPO / "scripts")
    commands, snippet = readme_commands()
    assert [c[1] for c in commands] == ["scripts/sample.py", "scripts/export_hf.py"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    outputs = [subprocess.run([sys.executable, *c[1:]], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
               for c in commands]
    assert all(r.returncode == 0 for r in outputs), [r.stderr[-2000:] for r in outputs]
    (tmp_path / "snippet.py").write_text(snippet)
    ran = subprocess.run([sys.executable, "snippet.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert ran.stdout == outputs[0].stdout and len(ran.stdout) > len("The history of") + 20


def test_outputs_get_the_modes_the_umask_gives(artifacts, tmp_path, capsys):
    """mkdtemp makes 700 and safetensors writes 600; an exported or converted folder is 755 with 644 files."""
    umask = os.umask(0o022)
    try:
        export_hf.export(artifacts["softmax"], tmp_path / "hf", "fused")
        assert hf_layouts.main([str(tmp_path / "hf"), "--to", "mlx", "--out", str(tmp_path / "mlx")]) == 0
    finally:
        os.umask(umask)
    assert capsys.readouterr().out == f"converted {tmp_path / 'hf'} to {tmp_path / 'mlx'} (layout mlx)\n"
    for folder in (tmp_path / "hf", tmp_path / "mlx"):
        assert oct(folder.stat().st_mode & 0o777) == "0o755"
        assert {p.name: oct(p.stat().st_mode & 0o777) for p in folder.iterdir()} == {name: "0o644" for name in FOLDER}


def test_a_tokenizer_of_another_hash_is_refused(artifacts, tiny_data, tmp_path, capsys):
    other = tmp_path / "other.model"
    other.write_bytes(tiny_data["tokenizer_path"].read_bytes() + b"\n")
    code = export_hf.main([str(artifacts["softmax"]), "--out", str(tmp_path / "hf"), "--tokenizer", str(other)])
    recorded = hashlib.sha256(tiny_data["tokenizer_path"].read_bytes()).hexdigest()
    assert_refused(capsys, code, f"{other}: SHA-256 {hashlib.sha256(other.read_bytes()).hexdigest()[:12]}..., but "
                                 f"{artifacts['softmax']} was trained with tok.model of SHA-256 {recorded[:12]}...")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.model"]
