"""scripts/export_sweep.py on a tiny run's fp32 checkpoint: the run's own export reproduced exactly, other variants."""
import json
import sys

import pytest
import torch

from conftest import REPO, run_trainer, tiny_env

sys.path.insert(0, str(REPO / "scripts"))
import export_sweep  # noqa: E402


def test_sweep_reproduces_the_run_and_compares_variants(tiny_data, tmp_path, monkeypatch, capsys):
    env = tiny_env(tiny_data, RUN_ID="swept", MLP_MODE="sparse", MOE_LAYERS="1", NUM_EXPERTS=4, EXPERT_HIDDEN=32,
                   ITERATIONS=20, SAVE_FP32=1)
    result = run_trainer(tmp_path, env)
    assert result.returncode == 0, result.stderr[-3000:]
    run = {e["event"]: e for e in map(json.loads, (tmp_path / "logs" / "swept.jsonl").read_text().splitlines())}
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "sweep.json"
    code = export_sweep.main(["artifacts/swept.fp32.pt", "same:", "gptq4:QUANT_METHOD=gptq QUANT_EXPERT_BITS=4 QUANT_CLIP_SIGMAS=3 CALIBRATION_TOKENS=4096",
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
])
def test_bad_arguments_are_one_error_line(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    torch.save([1, 2], tmp_path / "list.pt")
    assert export_sweep.main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1
