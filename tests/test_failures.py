"""Nothing that went wrong may look right: each class of bad input or failed run ends with one line, its exit
status, and nothing new on disk (an earlier run of the same RUN_ID intact)."""
import json
import shutil

import numpy as np
import pytest

import train_moe as tm
from conftest import REPO, run_trainer, tiny_env
from data.shards import write_shard


def copy_shards(tiny_data, folder):
    shutil.copytree(tiny_data["data_path"], folder)
    return folder


def tokens_of(path):
    return tm.load_data_shard(path).numpy().astype(np.int64)


# Each case: a function (tiny_data, tmp_path) -> env overrides that set the fault up, and the one stderr line's start.
def zero_token_shard(tiny_data, tmp_path):
    data = copy_shards(tiny_data, tmp_path / "data")
    write_shard(data / "fineweb_train_000001.bin", np.zeros(0, dtype=np.int64))
    return {"DATA_PATH": data}


def val_token_out_of_range(tiny_data, tmp_path):
    data = copy_shards(tiny_data, tmp_path / "data")
    tokens = tokens_of(data / "fineweb_val_000000.bin")
    tokens[7] = tiny_data["vocab_size"]
    write_shard(data / "fineweb_val_000000.bin", tokens)
    return {"DATA_PATH": data}


def first_train_shard_out_of_range(tiny_data, tmp_path):
    data = copy_shards(tiny_data, tmp_path / "data")
    tokens = tokens_of(data / "fineweb_train_000000.bin")
    tokens[-1] = 60000
    write_shard(data / "fineweb_train_000000.bin", tokens)
    return {"DATA_PATH": data}


def val_shorter_than_a_sequence(tiny_data, tmp_path):
    data = copy_shards(tiny_data, tmp_path / "data")
    write_shard(data / "fineweb_val_000000.bin", tokens_of(data / "fineweb_val_000000.bin")[:40])
    return {"DATA_PATH": data}


def logs_is_a_file(tiny_data, tmp_path):
    (tmp_path / "logs").write_text("not a folder")
    return {}


def artifacts_is_a_file(tiny_data, tmp_path):
    (tmp_path / "artifacts").write_text("not a folder")
    return {}


def folder_named_like_a_shard(tiny_data, tmp_path):
    data = copy_shards(tiny_data, tmp_path / "data")
    (data / "fineweb_train_000001.bin").mkdir()
    return {"DATA_PATH": data}


def wandb_without_credentials(tiny_data, tmp_path):
    """No API key, no netrc entry in the (fresh) home folder, not offline: wandb.init would fail after training began."""
    return {"WANDB": "1", "WANDB_API_KEY": "", "WANDB_MODE": "", "HOME": tmp_path, "NETRC": tmp_path / "none"}


def margin_at_the_limit(tiny_data, tmp_path):
    return {"QUANT_FIT": "1", "ARTIFACT_LIMIT_BYTES": "16000000", "QUANT_FIT_MARGIN_BYTES": "16000000"}


def margin_leaving_less_than_the_code(tiny_data, tmp_path):
    return {"QUANT_FIT": "1", "ARTIFACT_LIMIT_BYTES": str(len(tm.SOURCE) + 1000), "QUANT_FIT_MARGIN_BYTES": "1000"}


CHECKS = {
    "zero_token_shard": (zero_token_shard, "config_error: DATA_PATH="),
    "val_token_out_of_range": (val_token_out_of_range, "config_error: VOCAB_SIZE="),
    "first_train_shard_out_of_range": (first_train_shard_out_of_range, "config_error: VOCAB_SIZE="),
    "val_shorter_than_a_sequence": (val_shorter_than_a_sequence, "config_error: DATA_PATH="),
    "logs_is_a_file": (logs_is_a_file, "config_error: RUN_ID="),
    "artifacts_is_a_file": (artifacts_is_a_file, "config_error: RUN_ID="),
    "run_id_with_a_path": (lambda d, t: {"RUN_ID": "../../x"}, "config_error: RUN_ID="),
    "run_id_too_long": (lambda d, t: {"RUN_ID": "x" * 300}, "config_error: RUN_ID="),
    "world_size_without_torchrun": (lambda d, t: {"WORLD_SIZE": "2"}, "config_error: WORLD_SIZE=2: set by torchrun"),
    "limit_below_the_code": (lambda d, t: {"ARTIFACT_LIMIT_BYTES": "1000"}, "config_error: ARTIFACT_LIMIT_BYTES=1000: train_moe.py alone"),
    "beta2_one": (lambda d, t: {"BETA2": "1"}, "config_error: BETA2="),
    "adam_eps_zero": (lambda d, t: {"ADAM_EPS": "0"}, "config_error: ADAM_EPS="),
    "qk_gain_huge": (lambda d, t: {"QK_GAIN_INIT": "1e300"}, "config_error: QK_GAIN_INIT="),
    "model_dim_huge": (lambda d, t: {"MODEL_DIM": "1000000000000"}, "config_error: MODEL_DIM="),
    "model_over_memory": (lambda d, t: {"MODEL_DIM": "16384", "NUM_LAYERS": "256", "NUM_HEADS": "128",
                                        "NUM_KV_HEADS": "128"}, "config_error: MODEL_DIM="),
    "folder_named_like_a_shard": (folder_named_like_a_shard, "config_error: DATA_PATH="),
    "wandb_without_credentials": (wandb_without_credentials, "config_error: WANDB=1: no wandb credentials"),
    "margin_at_the_limit": (margin_at_the_limit, "config_error: QUANT_FIT_MARGIN_BYTES=16000000: "),
    "margin_leaving_less_than_the_code": (margin_leaving_less_than_the_code, "config_error: QUANT_FIT_MARGIN_BYTES=1000: "),
    "moe_layers_open_range": (lambda d, t: {"MOE_LAYERS": "1-"}, "config_error: MOE_LAYERS='1-': expected all, odd"),
}


@pytest.fixture
def earlier_run(tmp_path):
    """Files of a finished run with the RUN_ID the failing rerun uses: they must come out untouched."""
    files = {tmp_path / "logs" / "again.txt": b"log", tmp_path / "logs" / "again.jsonl": b"{}",
             tmp_path / "artifacts" / "again.moe.zst": b"artifact"}
    return files


@pytest.mark.parametrize("case", CHECKS)
def test_a_failed_check_stops_before_anything_is_touched(tiny_data, tmp_path, earlier_run, case):
    make, line = CHECKS[case]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    overrides = make(tiny_data, run_dir)
    if case not in ("logs_is_a_file", "artifacts_is_a_file"):
        for path, content in earlier_run.items():
            path = run_dir / path.relative_to(tmp_path)
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(content)
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    result = run_trainer(run_dir, tiny_env(tiny_data, **{"RUN_ID": "again", **overrides}), timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith(line), result.stderr[-2000:]
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_a_bad_later_shard_stops_the_run_naming_it(tiny_data, tmp_path):
    data = copy_shards(tiny_data, tmp_path / "data")
    tokens = tokens_of(data / "fineweb_train_000000.bin")
    write_shard(data / "fineweb_train_000000.bin", tokens[:3000])  # the second shard is reached in step 1
    bad = tokens[3000:].copy()
    bad[5] = tiny_data["vocab_size"] + 1
    write_shard(data / "fineweb_train_000001.bin", bad)
    result = run_trainer(tmp_path, tiny_env(tiny_data, RUN_ID="later", DATA_PATH=data))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"config_error: VOCAB_SIZE={tiny_data['vocab_size']}: {data / 'fineweb_train_000001.bin'} holds token id {tiny_data['vocab_size'] + 1}"]
    assert not (tmp_path / "artifacts" / "later.moe.zst").exists()
    assert "config_error: VOCAB_SIZE=" in (tmp_path / "logs" / "later.txt").read_text()


@pytest.mark.parametrize("overrides", [{"SCALAR_LR": "1e30"}, {"TIED_EMBED_LR": "1e30"}])
def test_a_non_finite_loss_ends_the_run_with_status_3_and_no_artifact(tiny_data, tmp_path, overrides):
    result = run_trainer(tmp_path, tiny_env(tiny_data, RUN_ID="nan", TRAIN_LOG_EVERY=1000, **overrides))
    assert result.returncode == 3, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: non-finite train loss (first at step ")
    step = int(lines[0].rsplit(" ", 1)[1].rstrip(")"))
    evs = [json.loads(line) for line in (tmp_path / "logs" / "nan.jsonl").read_text().splitlines()]
    logged = [e["train_loss"] for e in evs if e["event"] == "train"]
    # Steps 1-10 are logged, each after the flag is read: the run stops at the first non-finite one, unlogged.
    assert 1 <= step <= 10 and len(logged) == step - 1 and all(map(np.isfinite, logged))
    assert evs[-1]["event"] == "error" and evs[-1]["status"] == 3
    assert not (tmp_path / "artifacts").exists() or not list((tmp_path / "artifacts").iterdir())


def test_an_artifact_over_the_limit_is_scored_then_exits_4(tiny_data, tmp_path):
    limit = len((REPO / "train_moe.py").read_bytes()) + 1000
    result = run_trainer(tmp_path, tiny_env(tiny_data, RUN_ID="over", ITERATIONS=5, ARTIFACT_LIMIT_BYTES=limit))
    assert result.returncode == 4
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: artifact ") and lines[0].endswith(f"is over ARTIFACT_LIMIT_BYTES={limit:,}")
    evs = {e["event"]: e for e in map(json.loads, (tmp_path / "logs" / "over.jsonl").read_text().splitlines())}
    assert evs["artifact"]["status"] == "OVER" and np.isfinite(evs["final_roundtrip"]["val_bpb"])
    assert "status:OVER" in result.stdout


def test_a_misspelt_setting_is_named_and_the_run_goes_on(tiny_data, tmp_path):
    env = tiny_env(tiny_data, RUN_ID="typo", ITERATIONS=2, MLP_MDOE="sparse", NUM_EXPERT="4", LANG="C")
    result = run_trainer(tmp_path, env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [
        "config_warning: MLP_MDOE is not a setting and is ignored; did you mean MLP_MODE?",
        "config_warning: NUM_EXPERT is not a setting and is ignored; did you mean NUM_EXPERTS?"]
    assert "config mlp_mode:dense" in (tmp_path / "logs" / "typo.txt").read_text()


@pytest.mark.parametrize("name", ["MATRIX_LR", "ROPE_BASE", "LOGIT_SOFTCAP", "EMA_DECAY", "QUANT_CLIP_SIGMAS", "GPTQ_DAMP"])
@pytest.mark.parametrize("value", ["inf", "nan", "-inf", "1e400"])
def test_numbers_must_be_finite(name, value):
    with pytest.raises(tm.ConfigError, match=rf"^{name}="):
        tm.Hyperparameters({name: value})
