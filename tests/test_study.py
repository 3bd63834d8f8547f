"""scripts/study.py: every configuration is a valid trainer config, and the table is computed from the logs."""
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import study  # noqa: E402
import train_moe  # noqa: E402


def test_every_configuration_is_a_valid_trainer_config():
    ids = set()
    for config in study.CONFIGS:
        for seed in study.SEEDS:
            env = study.run_env(config, seed, 90)
            cfg = train_moe.Hyperparameters(env)  # raises ConfigError on a bad knob
            assert cfg.max_wallclock_seconds == 90 and cfg.seed == seed and cfg.train_batch_tokens == 131072
            assert cfg.grad_accum_steps == 2
            assert cfg.data_path == study.DATA_PATH and cfg.vocab_size == 1024
            ids.add(cfg.run_id)
    assert len(ids) == len(study.CONFIGS) * len(study.SEEDS)
    sparse = train_moe.Hyperparameters(study.run_env("sparse_hash", 1, 90))
    assert (sparse.mlp_mode, sparse.router, sparse.quant_expert_bits) == ("sparse", "hash", 5)


def test_the_trainer_default_is_the_studys_winner():
    """docs/study.md's rule made moe16_fit the default: a bare run must be that configuration's model and export
    (GPTQ where a GPU is, as in the study; bits fitted to the cap, so QUANT_*_BITS do not apply)."""
    keys = ("mlp_mode", "moe_layers", "num_experts", "top_k", "expert_hidden", "router", "mlp_mult", "quant_fit",
            "quant_clip_sigmas", "quant_embed_bits", "num_layers", "model_dim", "calibration_tokens")
    winner = train_moe.Hyperparameters(study.run_env("moe16_fit", 1337, 65))
    default = train_moe.Hyperparameters({})
    assert {k: getattr(default, k) for k in keys} == {k: getattr(winner, k) for k in keys}
    assert default.moe_layers == (1, 3, 5, 7) and default.mlp_mode == "sparse" and default.num_experts == 16
    assert default.quant_fit and winner.quant_method == "gptq"
    # the earlier configurations stay the runs they were
    assert train_moe.Hyperparameters(study.run_env("moe_gptq", 1337, 65)).num_experts == 8
    # and the pinned baseline is still the challenge's dense model
    base = train_moe.Hyperparameters(study.run_env("dense_base", 1337, 65))
    assert (base.mlp_mode, base.quant_attn_bits, base.quant_mlp_bits) == ("dense", 8, 6)


def write_log(folder: Path, run_id: str, bpb: float, ema: float, maxvio=None, finished=True, slack_ms=None):
    events = [dict(event="train_done", steps=500, step_avg_ms=200.0, data_passes=1.25, cap_slack_ms=slack_ms),
              dict(event="final_raw", val_bpb=ema + 0.01), dict(event="final_ema", val_bpb=ema),
              dict(event="artifact", artifact_bytes=15_000_000, status="OK")]
    if maxvio is not None:
        events[1:1] = [dict(event="router", step=400, layer=0, maxvio=9.0, dead=3),  # superseded by the last report
                       dict(event="router", step=500, layer=0, maxvio=maxvio, dead=0),
                       dict(event="router", step=500, layer=1, maxvio=maxvio / 2, dead=1)]
    if finished:
        events.append(dict(event="final_roundtrip", val_bpb=bpb))
    (folder / f"{run_id}.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))


def test_table_means_spreads_and_order(tmp_path):
    write_log(tmp_path, "study_dense_base_s1", bpb=1.50, ema=1.49, slack_ms=388)
    write_log(tmp_path, "study_dense_base_s2", bpb=1.54, ema=1.52, slack_ms=-76)
    write_log(tmp_path, "study_sparse_hash_s1", bpb=1.45, ema=1.44, maxvio=0.4)
    write_log(tmp_path, "study_sparse_hash_s2", bpb=1.47, ema=1.45, maxvio=0.6)
    write_log(tmp_path, "study_soft_s1", bpb=1.0, ema=1.0, finished=False)  # never finished: not in the table
    lines = study.results_table(tmp_path).splitlines()
    assert len(lines) == 4 and lines[2].startswith("| sparse_hash |") and lines[3].startswith("| dense_base |")
    cells = [c.strip() for c in lines[2].split("|")[1:-1]]
    assert cells[1:6] == ["2", "1.4600", "0.0200", "1.4450", "+0.0150"]
    assert cells[6] == "15,000,000 OK" and cells[7:10] == ["500", "200.0", "1.25"]
    assert cells[10:] == ["0.60", "1"]  # worst layer over both seeds' last reports
    runs = study.runs_table(tmp_path).splitlines()
    assert len(runs) == 6 and runs[2].startswith("| study_dense_base_s1 | 500 | 200.0 | 1.25 | 388 | 1.4900 | 1.5000 |")
    assert runs[3].startswith("| study_dense_base_s2 | 500 | 200.0 | 1.25 | -76 (past the cap) |")
    assert runs[4].startswith("| study_sparse_hash_s1 | 500 | 200.0 | 1.25 | - |")  # no cap: a fixed-step run
    dense = [c.strip() for c in lines[3].split("|")[1:-1]]
    assert dense[1:4] == ["2 (1 past the cap)", "1.5200", "0.0400"] and dense[10:] == ["-", "-"]


def test_run_refuses_without_shards(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(study, "DATA_PATH", str(tmp_path / "missing"))
    with pytest.raises(SystemExit) as e:
        study.main(["run", "--only", "dense_base"])
    assert e.value.code == 2 and "study.py prepare" in capsys.readouterr().err


def test_commands_lists_every_run(capsys):
    assert study.main(["commands", "--only", "soft", "dense_wide", "--seeds", "7"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and all(line.endswith("python train_moe.py") for line in out)
    assert "RUN_ID=study_soft_s7" in out[0] and "MLP_MODE=soft" in out[0] and "MLP_MULT=3" in out[1]
