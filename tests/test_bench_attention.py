"""scripts/bench_attention.py on the CPU: a row per SDPA backend and KV layout and per projection form, the JSON, and
a bad setting refused before any work."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import bench_attention  # noqa: E402

TINY = dict(NUM_LAYERS="2", MODEL_DIM="64", NUM_HEADS="4", NUM_KV_HEADS="2", TRAIN_SEQ_LEN="32", TRAIN_BATCH_TOKENS="2048")


def test_rows_for_every_backend_and_both_projection_forms(monkeypatch, tmp_path, capsys):
    for k, v in TINY.items():
        monkeypatch.setenv(k, v)
    assert bench_attention.main(["--iters", "2", "--json", str(tmp_path / "a.json")]) == 0
    rows = json.loads((tmp_path / "a.json").read_text())["rows"]
    assert [r["part"] for r in rows] == [f"sdpa {b}, kv heads {kv}" for b in ("cudnn_attention", "flash_attention",
                                                                           "efficient_attention", "math")
                                         for kv in ("grouped", "repeated")] + ["q, k, v: three projections", "q, k, v: one projection"]
    math_rows = [r for r in rows if r["part"].startswith("sdpa math")]
    assert all(r["ms"] > 0 for r in math_rows + rows[-2:])  # the math backend runs anywhere
    assert all(r["ms"] is None and r["reason"] for r in rows if r["ms"] is None)  # cuDNN on a CPU: a row that says why
    out = capsys.readouterr().out
    assert "q, k, v: one projection" in out and "device:cpu" in out


def test_a_bad_setting_is_refused(monkeypatch, capsys):
    monkeypatch.setenv("NUM_HEADS", "5")
    assert bench_attention.main(["--iters", "1"]) == 2
    assert capsys.readouterr().err.startswith("config_error: MODEL_DIM=512: must be divisible by NUM_HEADS=5")
