"""scripts/compress_bench.py on a small artifact: every layout holds the same payload, the trainer's row is the file,
and a codec that does not give back its input is a failed row and exit status 1."""
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import compress_bench  # noqa: E402
import train_moe as tm  # noqa: E402


def small_artifact(path: Path) -> Path:
    torch.manual_seed(0)
    state = {"blocks.0.attn.qkv.weight": torch.randn(96, 32), "blocks.0.mlp.fc.weight": torch.randn(64, 32),
             "blocks.0.attn_scale": torch.randn(32)}
    bits = {"attn": 6, "mlp": 4}
    levels = tm.rounded_levels(state, bits, 0.0)
    path.write_bytes(tm.pack_artifact(*tm.quantize_state(state, levels, {}), {}))
    return path


def test_every_layout_and_codec_round_trips_and_the_table_compares_with_the_file(tmp_path, capsys):
    artifact = small_artifact(tmp_path / "a.moe")
    out = tmp_path / "bench.json"
    assert compress_bench.main([str(artifact), "--codecs", "zstd22", "bz2_9", "--threads", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert rows[0] == dict(artifact="a.moe", layout="trainer", codec="as written", bytes=artifact.stat().st_size,
                           pack_s=None, unpack_s=None, failed=None)
    measured = rows[2:]
    assert {r["layout"] for r in measured} == {"header_order", "grouped", "grouped_cols", "bits_cols", "grouped_rows_by_scale"}
    assert len(measured) == 10 and all(r["failed"] is None and r["bytes"] > 0 for r in measured)
    raw = tm.unseal(tm.decompress(artifact.read_bytes()))
    data = compress_bench.layouts(*tm.payload_arrays(raw), raw)
    assert data.pop("bits_cols") == raw  # the trainer's own layout
    assert len({bytes(sorted(d)) for d in data.values()}) == 1  # the others: the same bytes, reordered
    assert "| a.moe | trainer | as written |" in capsys.readouterr().out


def test_a_codec_that_does_not_give_back_its_input_is_a_failed_row_and_exit_1(tmp_path, capsys, monkeypatch):
    artifact = small_artifact(tmp_path / "a.moe")
    monkeypatch.setitem(compress_bench.CODECS, "zstd22", (lambda b: b, lambda b: b[:-1]))
    monkeypatch.setitem(compress_bench.CODECS, "bz2_9", (lambda b: b, lambda b: (_ for _ in ()).throw(ValueError("L1595"))))
    assert compress_bench.main([str(artifact), "--codecs", "zstd22", "bz2_9", "--threads", "1"]) == 1
    captured = capsys.readouterr()
    assert "round trip failed: does not give back its input |" in captured.out
    assert "round trip failed: does not give back its input (ValueError: L1595) |" in captured.out
    assert captured.err.startswith("error: 10 round trip(s) did not give back their input: a.moe header_order zstd22, ")
