"""Nothing that went wrong may look right: each class of bad input or failed run ends with one line, its exit
status, and nothing new on disk (an earlier run of the same RUN_ID intact)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import train_moe as tm
from conftest import REPO, run_trainer, selected, side_by_side, tiny_env
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
    return {"QUANT_FIT": "1", "ARTIFACT_LIMIT_BYTES": str(len(tm.pack_code(tm.SOURCE)) + 1000), "QUANT_FIT_MARGIN_BYTES": "1000"}


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
    "limit_below_the_code": (lambda d, t: {"ARTIFACT_LIMIT_BYTES": "1000"}, "config_error: ARTIFACT_LIMIT_BYTES=1000: the packed trainer alone"),
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
    "moe_layers_open_range": (lambda d, t: {"MOE_LAYERS": "1-"}, "config_error: MOE_LAYERS='1-': expected all, none, odd"),
}


# Files of a finished run with the RUN_ID the failing rerun uses: they must come out untouched.
EARLIER_RUN = {Path("logs/again.txt"): b"log", Path("logs/again.jsonl"): b"{}", Path("artifacts/again.moe"): b"artifact"}


def files_under(run_dir: Path) -> dict:
    return {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def failed_checks(request, tiny_data, tmp_path_factory) -> dict:
    """Each case this session runs, its fault made in a run folder of its own (beside an earlier run's files) and the
    trainer run there: (its result, the folder's files before, after). The cases' trainers run side by side."""
    folders, jobs = {}, {}
    for case in selected(request, "test_a_failed_check_stops_before_anything_is_touched", CHECKS):
        run_dir = tmp_path_factory.mktemp("failed_check") / "run"
        run_dir.mkdir()
        overrides = CHECKS[case][0](tiny_data, run_dir)
        if case not in ("logs_is_a_file", "artifacts_is_a_file"):
            for path, content in EARLIER_RUN.items():
                (run_dir / path).parent.mkdir(exist_ok=True)
                (run_dir / path).write_bytes(content)
        folders[case] = (run_dir, files_under(run_dir))
        jobs[case] = (run_dir, tiny_env(tiny_data, **{"RUN_ID": "again", **overrides}))
    results = side_by_side(lambda cwd, env: run_trainer(cwd, env, timeout=120), jobs)
    return {case: (results[case], before, files_under(run_dir)) for case, (run_dir, before) in folders.items()}


@pytest.mark.parametrize("case", CHECKS)
def test_a_failed_check_stops_before_anything_is_touched(failed_checks, case):
    result, before, after = failed_checks[case]
    line = CHECKS[case][1]
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith(line), result.stderr[-2000:]
    assert after == before


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
    assert not (tmp_path / "artifacts" / "later.moe").exists()
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
    limit = len(tm.pack_code((REPO / "train_moe.py").read_bytes())) + 1000
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


@pytest.mark.parametrize("name", ["MATRIX_LR", "ROPE_BASE", "LOGIT_SOFTCAP", "EMA_DECAY", "QUANT_CLIP_SIGMAS", "GPTQ_DAMP",
                                  "QUANT_FIT_SHARE"])
@pytest.mark.parametrize("value", ["inf", "nan", "-inf", "1e400"])
def test_numbers_must_be_finite(name, value):
    with pytest.raises(tm.ConfigError, match=rf"^{name}="):
        tm.Hyperparameters({name: value})


# --- a rerun of a finished RUN_ID ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def finished_run(tiny_data, tmp_path_factory) -> Path:
    """A run that succeeded as RUN_ID=again: its logs and artifact, which no later run of the RUN_ID may destroy."""
    root = tmp_path_factory.mktemp("finished")
    result = run_trainer(root, tiny_env(tiny_data, RUN_ID="again", ITERATIONS=5))
    assert result.returncode == 0, result.stderr[-2000:]
    return root


def files(root: Path) -> dict:
    """Every file a run writes under logs/ and artifacts/ (its bytes, or where it links to), but the lock, which each
    run of the RUN_ID takes (the last one's pid stays in it)."""
    return {p.relative_to(root).as_posix(): p.readlink() if p.is_symlink() else p.read_bytes()
            for folder in ("logs", "artifacts") for p in (root / folder).glob("*") if p.suffix != ".lock"}


def with_finished_run(finished_run: Path, run_dir: Path) -> dict:
    for sub in ("logs", "artifacts"):
        shutil.copytree(finished_run / sub, run_dir / sub)
    return files(run_dir)


def assert_finished_run_intact(run_dir: Path, earlier: dict, status: int):
    """The earlier run byte for byte; of the failed one only its logs, under their .partial names, ending with why."""
    now = files(run_dir)
    assert {name: now.get(name) for name in earlier} == earlier
    assert sorted(set(now) - set(earlier)) == ["logs/again.jsonl.partial", "logs/again.txt.partial"]
    if not (run_dir / "logs/again.jsonl.partial").is_symlink():  # else it was the full disk
        last = json.loads((run_dir / "logs/again.jsonl.partial").read_text().splitlines()[-1])
        assert last["event"] == "error" and last["status"] == status


def full_disk(path: str, **overrides):
    """The file the run writes at `path` is /dev/full: every write to it fails with ENOSPC, as on a full disk."""
    def make(tiny_data, run_dir):
        if not Path("/dev/full").exists():
            pytest.skip("no /dev/full")
        (run_dir / path).symlink_to("/dev/full")
        return overrides
    return make


def bad_later_shard(tiny_data, run_dir):
    data = copy_shards(tiny_data, run_dir / "data")
    tokens = tokens_of(data / "fineweb_train_000000.bin")
    write_shard(data / "fineweb_train_000000.bin", tokens[:3000])
    write_shard(data / "fineweb_train_000001.bin", np.full(5000, tiny_data["vocab_size"]))
    return {"DATA_PATH": data}


# Each case: a fault that stops the rerun once it has begun (fault(tiny_data, run dir) -> env overrides), its exit
# status and the start of its one stderr line.
RERUN_FAULTS = {
    "non-finite loss": (lambda d, r: {"SCALAR_LR": "1e30", "TRAIN_LOG_EVERY": "1000"}, 3, "error: non-finite train loss"),
    "bad later shard": (bad_later_shard, 2, "config_error: VOCAB_SIZE="),
    "over the cap": (lambda d, r: {"ARTIFACT_LIMIT_BYTES": str(len(tm.pack_code(tm.SOURCE)) + 1000)}, 4, "error: artifact "),
    "full disk: text log": (full_disk("logs/again.txt.partial"), 1,
                            "error: logs/again.txt.partial: No space left on device"),
    "full disk: jsonl log": (full_disk("logs/again.jsonl.partial"), 1,
                             "error: logs/again.jsonl.partial: No space left on device"),
    "full disk: artifact": (full_disk("artifacts/again.moe.partial.tmp"), 1,
                            "error: artifacts/again.moe.partial.tmp: No space left on device"),
    "full disk: SAVE_FP32": (full_disk("artifacts/again.fp32.pt.partial.tmp", SAVE_FP32="1"), 1,
                             "error: artifacts/again.fp32.pt.partial.tmp: No space left on device"),
}


@pytest.mark.parametrize("fault, status, line", RERUN_FAULTS.values(), ids=RERUN_FAULTS)
def test_a_failed_rerun_leaves_the_finished_run_byte_identical(fault, status, line, finished_run, tiny_data, tmp_path):
    earlier = with_finished_run(finished_run, tmp_path)
    result = run_trainer(tmp_path, tiny_env(tiny_data, RUN_ID="again", ITERATIONS=5, **fault(tiny_data, tmp_path)))
    assert result.returncode == status, result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith(line), result.stderr[-2000:]
    assert_finished_run_intact(tmp_path, earlier, status)


def test_a_rerun_that_succeeds_replaces_the_finished_run_and_a_stale_lock(finished_run, tiny_data, tmp_path):
    """How quickstart.sh and study.py rerun a RUN_ID; the lock file of a run that was killed does not stop it."""
    earlier = with_finished_run(finished_run, tmp_path)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "logs/again.lock").write_text(gone.stdout.strip())
    result = run_trainer(tmp_path, tiny_env(tiny_data, RUN_ID="again", ITERATIONS=3, SEED=7))
    assert result.returncode == 0 and result.stderr == "", result.stderr[-2000:]
    now = files(tmp_path)
    assert sorted(now) == sorted(earlier)
    assert all(now[name] != earlier[name] for name in now)
    artifact = [e for e in map(json.loads, now["logs/again.jsonl"].decode().splitlines()) if e["event"] == "artifact"][-1]
    assert artifact["sha256"] == tm.hashlib.sha256(now["artifacts/again.moe"]).hexdigest()


def start_trainer(cwd: Path, env: dict) -> subprocess.Popen:
    full_env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return subprocess.Popen([sys.executable, str(REPO / "train_moe.py")], cwd=cwd, env={**full_env, **env, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for_training(run_dir: Path, process: subprocess.Popen):
    log = run_dir / "logs/again.jsonl.partial"
    for _ in range(1200):  # a limit for a run that never gets there, not a timing
        if log.is_file() and '"event": "train"' in log.read_text():
            return
        assert process.poll() is None, process.communicate()[1]
        time.sleep(0.1)
    raise AssertionError("the run never reached training")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_second_run_is_refused_and_a_signal_stops_the_first(sig, finished_run, tiny_data, tmp_path):
    earlier = with_finished_run(finished_run, tmp_path)
    env = tiny_env(tiny_data, RUN_ID="again", ITERATIONS=10**6)
    first = start_trainer(tmp_path, env)
    try:
        wait_for_training(tmp_path, first)
        second = run_trainer(tmp_path, env)
        assert second.returncode == 2 and second.stderr.splitlines() == [
            f"config_error: RUN_ID=again: process {first.pid} is running it (lock logs/again.lock); wait, or choose "
            "another RUN_ID"], second.stderr[-2000:]
        first.send_signal(sig)
        _, stderr = first.communicate(timeout=120)
    finally:
        first.kill()
    assert first.returncode == 128 + sig and stderr.splitlines() == [f"error: stopped by {sig.name}"], stderr[-2000:]
    assert_finished_run_intact(tmp_path, earlier, 128 + sig)


def signal_at(owner, name: str, call: int, after: bool = False):
    """Patches owner.name to send this process `sig` at its call-th call (after it ran, with after)."""
    def patch(monkeypatch, sig):
        real, calls = getattr(owner, name), []

        def wrapper(*args, **kwargs):
            calls.append(None)
            if len(calls) == call and not after:
                os.kill(os.getpid(), sig)
            result = real(*args, **kwargs)
            if len(calls) == call and after:
                os.kill(os.getpid(), sig)
            return result
        monkeypatch.setattr(owner, name, wrapper)
    return patch


# Where after training the signal comes: the trainer runs in this process, so it comes exactly there.
EXPORT_STAGES = {
    "calibration and packing": signal_at(tm, "export_artifact", 1),
    "the artifact half-written": signal_at(Path, "write_bytes", 1, after=True),  # its .tmp is on disk
    "the roundtrip evaluation": signal_at(tm, "evaluate", 3),  # after final_raw and final_ema: written, not scored
}


def main_in_process(run_dir: Path, env: dict, monkeypatch, capsys) -> tuple[int, list[str]]:
    """train_moe.main() in this process (so a test can reach inside it): its exit status and stderr lines."""
    monkeypatch.chdir(run_dir)
    monkeypatch.setattr(sys, "argv", ["train_moe.py"])  # not pytest's arguments: the trainer takes none
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}  # main() installs its own
    try:
        with pytest.raises(SystemExit) as exit_info:
            tm.main()
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    return exit_info.value.code, [line for line in capsys.readouterr().err.splitlines()
                                  if not line.startswith("config_warning:")]  # of this process's environment


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("stage", EXPORT_STAGES.values(), ids=EXPORT_STAGES)
def test_a_signal_during_export_leaves_no_unscored_artifact(stage, sig, finished_run, tiny_data, tmp_path, monkeypatch,
                                                             capsys):
    earlier = with_finished_run(finished_run, tmp_path)
    stage(monkeypatch, sig)
    status, err = main_in_process(tmp_path, tiny_env(tiny_data, RUN_ID="again", ITERATIONS=3), monkeypatch, capsys)
    assert status == 128 + sig and err == [f"error: stopped by {sig.name}"]
    assert_finished_run_intact(tmp_path, earlier, 128 + sig)


def came_while_importing(monkeypatch, sig):
    monkeypatch.setattr(tm, "STOPPED_IMPORTING", [sig])  # as train_moe.py's handler keeps it while torch imports


BEFORE_THE_RUN = {
    "while the libraries import": came_while_importing,
    "checking the inputs": signal_at(tm.Hyperparameters, "check_inputs", 1),
}


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("stage", BEFORE_THE_RUN.values(), ids=BEFORE_THE_RUN)
def test_a_signal_before_the_run_starts_writes_nothing(stage, sig, finished_run, tiny_data, tmp_path, monkeypatch, capsys):
    earlier = with_finished_run(finished_run, tmp_path)
    stage(monkeypatch, sig)
    status, err = main_in_process(tmp_path, tiny_env(tiny_data, RUN_ID="again", ITERATIONS=3), monkeypatch, capsys)
    assert status == 128 + sig and err == [f"error: stopped by {sig.name}"]
    assert files(tmp_path) == earlier


def test_an_artifact_that_reads_back_changed_is_not_scored(finished_run, tiny_data, tmp_path, monkeypatch, capsys):
    """The disk gives back other bytes than the trainer wrote: its own reader refuses them, as the tools do."""
    earlier = with_finished_run(finished_run, tmp_path)
    real_write_artifact = tm.write_artifact
    monkeypatch.setattr(tm, "write_artifact", lambda path, blob: real_write_artifact(path, blob[:-1] + bytes([blob[-1] ^ 1])))
    status, err = main_in_process(tmp_path, tiny_env(tiny_data, RUN_ID="again", ITERATIONS=3), monkeypatch, capsys)
    assert status == 1 and len(err) == 1 and err[0].startswith("error: artifacts/again.moe.partial: corrupt")
    assert_finished_run_intact(tmp_path, earlier, 1)
