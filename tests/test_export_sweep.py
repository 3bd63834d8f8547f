"""scripts/export_sweep.py on a tiny run's fp32 checkpoint: the run's own export reproduced exactly, other variants."""
import json
import sys
from pathlib import Path

import pytest
import torch

import train_moe as tm
from conftest import REPO, copy_run

sys.path.insert(0, str(REPO / "scripts"))
import export_sweep  # noqa: E402

SETTINGS = {"MLP_MODE": "dense", "VOCAB_SIZE": "64", "NUM_LAYERS": "2", "MODEL_DIM": "32", "NUM_HEADS": "4",
            "NUM_KV_HEADS": "2"}


def test_sweep_reproduces_the_run_and_compares_variants(quickstart_run, tmp_path, monkeypatch, capsys):
    copy_run(quickstart_run, tmp_path)  # a tiny one-MoE-layer run with SAVE_FP32=1
    run = {e["event"]: e for e in map(json.loads, (tmp_path / "logs" / "quickstart.jsonl").read_text().splitlines())}
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "sweep.json"
    code = export_sweep.main(["artifacts/quickstart.fp32.pt", "same:", "gptq4:QUANT_METHOD=gptq QUANT_EXPERT_BITS=4 QUANT_CLIP_SIGMAS=3 CALIBRATION_TOKENS=4096",
                              "--json", str(out)])
    assert code == 0
    rows = {r["variant"]: r for r in json.loads(out.read_text())}
    # The run's own settings give the run's own artifact and score: the sweep exports as the trainer does.
    assert rows["pre-export"]["val_bpb"] == pytest.approx(run["final_ema"]["val_bpb"], abs=1e-9)
    assert rows["same"]["model_bytes"] == run["artifact"]["model_bytes"]
    assert rows["same"]["val_bpb"] == pytest.approx(run["final_roundtrip"]["val_bpb"], abs=1e-9)
    assert rows["gptq4"]["experts_bits"] == 4 and rows["gptq4"]["model_bytes"] < rows["same"]["model_bytes"]
    assert rows["gptq4"]["gap"] == pytest.approx(rows["gptq4"]["val_bpb"] - rows["pre-export"]["val_bpb"])
    assert "| gptq4 | 8/8/6/4 |" in capsys.readouterr().out


@pytest.mark.parametrize("args,message", [
    (["missing.pt", "a:QUANT_METHOD=rtn"], "missing.pt: no such checkpoint"),
    (["missing.pt", "noname"], "variant 'noname': expected NAME:KEY=VALUE [KEY=VALUE ...]"),
    (["missing.pt", "a:QUANT_METHOD"], "variant 'a:QUANT_METHOD': expected NAME:KEY=VALUE [KEY=VALUE ...]"),
    (["missing.pt", "a:NUM_EXPERTS=16"], "variant 'a:NUM_EXPERTS=16': NUM_EXPERTS is not an export setting (QUANT_*, "
                                          "GPTQ_DAMP, CALIBRATION_*, ARTIFACT_LIMIT_BYTES); a sweep exports one run's weights"),
    (["notes.txt", "a:QUANT_FIT=1"], "notes.txt: not a checkpoint torch can read"),
    (["list.pt", "a:QUANT_FIT=1"], "list.pt: not a SAVE_FP32=1 checkpoint of train_moe.py (settings and state)"),
    (["missing.pt", "a:QUANT_FIT=1", "--json", "nope/sweep.json"], "--json nope/sweep.json: its folder does not exist"),
    (["missing.pt", "a:QUANT_FIT=1", "--json", "."], "--json .: is a folder"),
    (["no_tensor.pt", "a:QUANT_FIT=1"], "no_tensor.pt: its tensors do not fit train_moe.py's model for its settings "
                                        "(Error(s) in loading state_dict for GPT: Missing key(s) in state_dict: \"skip_weights\""),
    (["other_shape.pt", "a:QUANT_FIT=1"], "other_shape.pt: its tensors do not fit train_moe.py's model for its settings "
                                          "(Error(s) in loading state_dict for GPT: size mismatch for tok_emb.weight"),
])
def test_bad_arguments_are_one_error_line(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    torch.save([1, 2], tmp_path / "list.pt")
    state = tm.GPT(tm.Hyperparameters(SETTINGS)).state_dict()
    torch.save({"settings": SETTINGS, "state": {k: v for k, v in state.items() if k != "skip_weights"}}, "no_tensor.pt")
    torch.save({"settings": SETTINGS, "state": {**state, "tok_emb.weight": torch.zeros(3, 32)}}, "other_shape.pt")
    before = sorted(tmp_path.iterdir())
    assert export_sweep.main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1
    assert sorted(tmp_path.iterdir()) == before


def test_a_full_disk_for_the_json_is_one_line_and_no_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(export_sweep, "sweep", lambda checkpoint, variants: [dict(variant="pre-export", val_bpb=1.0)])
    real_write_bytes = Path.write_bytes

    def full_disk(path, data):
        real_write_bytes(path, data[:10])
        raise OSError(28, "No space left on device")

    (tmp_path / "run.fp32.pt").write_bytes(b"a checkpoint")
    monkeypatch.setattr(Path, "write_bytes", full_disk)
    assert export_sweep.main(["run.fp32.pt", "a:QUANT_FIT=1", "--json", "sweep.json"]) == 1
    assert capsys.readouterr().err == "error: sweep.json.tmp: No space left on device\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.fp32.pt"]
