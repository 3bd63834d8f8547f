"""make_record.py and check_record.py on real (tiny) runs: a valid record passes, every kind of false claim fails,
a record-track folder must show the challenge's setting, and every problem is listed."""
import argparse
import contextlib
import hashlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, run_trainer, tiny_env
from test_tool_errors import DROP, edit_event, tamper  # edit_event: both logs alike (another run's); tamper: .jsonl only

sys.path.insert(0, str(REPO / "scripts"))
import check_record  # noqa: E402
import make_record  # noqa: E402
import train_moe as tm  # noqa: E402

NAME = "Tiny sparse MoE"
RECORD, NON_RECORD = "track_10min_16mb", "track_non_record_16mb"
FOLDER = f"records/{NON_RECORD}/{time.strftime('%Y-%m-%d')}_Tiny_sparse_MoE"
RECORD_FOLDER = f"records/{RECORD}/{time.strftime('%Y-%m-%d')}_Tiny_sparse_MoE"
H100 = "NVIDIA H100 80GB HBM3"  # torch.cuda.get_device_name() of the challenge's H100 SXM
OFFICIAL_VAL = 62_021_632  # the challenge's val split at TRAIN_SEQ_LEN=1024 (source: make_record.OFFICIAL_VAL_TOKENS)
# What a tiny CPU log says is rewritten to what an 8xH100 run on the challenge's data would have logged.
CHALLENGE_CONFIG = dict(world_size="8", vocab_size="1024", train_seq_len="1024",
                        data_path="./data/datasets/fineweb10B_sp1024",
                        tokenizer_path="./data/tokenizers/fineweb_1024_bpe.model")


@pytest.fixture(scope="module")
def finished_runs(tiny_data, tmp_path_factory) -> Path:
    """Two seeds of a tiny 4-expert sparse model, finished: logs/s1.*, logs/s2.*, artifacts/s*.moe."""
    root = tmp_path_factory.mktemp("runs")
    for seed in (1, 2):
        env = tiny_env(tiny_data, MLP_MODE="sparse", NUM_EXPERTS=4, SEED=seed, RUN_ID=f"s{seed}", ITERATIONS=4)
        result = run_trainer(root, env)
        assert result.returncode == 0, result.stderr[-3000:]
    return root


@pytest.fixture
def workdir(finished_runs, tmp_path) -> Path:
    """A private copy of the runs, so a test may tamper with them and build records in it."""
    for sub in ("logs", "artifacts"):
        shutil.copytree(finished_runs / sub, tmp_path / sub)
    return tmp_path


def make(cwd: Path, *runs: str, track=NON_RECORD, extra=()) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "scripts/make_record.py"), "--runs", *runs, "--track", track, "--name", NAME,
           "--author", "Ada", "--github-id", "ada", "--blurb", "Two seeds of a tiny MoE.", *extra]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=60)


def refusals(cwd: Path, *runs: str, track=RECORD) -> list[str]:
    """make_record in this process (no interpreter start per case): the problems it raises, [] when it wrote."""
    args = argparse.Namespace(runs=list(runs), track=track, name=NAME, author="Ada", github_id="ada", blurb="b",
                              baseline_loss=None, baseline_bpb=None)
    with contextlib.chdir(cwd):
        try:
            make_record.make_record(args)
        except make_record.RecordError as e:
            return list(e.args)
    return []


def check_cli(folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "scripts/check_record.py"), str(folder)],
                          capture_output=True, text=True, timeout=60)


def edit_json(path: Path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def rewrite_text_log(path: Path, gpu: str | None = None, **config):
    """Rewrite a real trainer log after its source (which stays byte-identical): with `gpu`, the environment report's
    device lines (`cpu threads N`, or a GPU's) become `cuda 12.8 gpu <gpu>` and an nvidia-smi stand-in; each
    `config key:` line named in `config` gets its new value (DROP removes the line)."""
    lines = path.read_bytes().split(b"\n")
    first, second = [i for i, line in enumerate(lines) if line == make_record.SEPARATOR][-2:]
    tail = []
    for line in lines[second + 1:]:
        key = line[len(b"config "):].partition(b":")[0].decode() if line.startswith(b"config ") else None
        if key in config:
            if config[key] is not DROP:
                tail.append(f"config {key}:{config[key]}".encode())
        else:
            tail.append(line)
    environment = lines[first + 1:second]
    if gpu is not None:  # the versions line stays; the device lines after it are replaced
        environment = environment[:1] + [f"cuda 12.8 gpu {gpu}".encode(), b"| 0  " + gpu.encode() + b"  On |"]
    path.write_bytes(b"\n".join(lines[:first + 1] + environment + lines[second:second + 1] + tail))


def as_challenge_run(logs: Path, run_id: str, gpu: str = H100, val_tokens=OFFICIAL_VAL, **config):
    """A tiny CPU run's logs rewritten as if it had run on 8 H100s with the challenge's data and tokenizer."""
    rewrite_text_log(logs / f"{run_id}.txt", gpu, **{**CHALLENGE_CONFIG, **config})
    edit_event(logs / f"{run_id}.jsonl", "model", val_tokens=val_tokens, world_size=8)


def test_valid_record_passes(workdir):
    result = make(workdir, "s1", "logs/s2.txt", extra=["--baseline-loss", "9.0", "9.1"])
    assert result.returncode == 0, result.stderr
    folder = workdir / FOLDER
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "s1.jsonl", "s1.txt", "s2.jsonl", "s2.txt",
                                                      "submission.json", "train_gpt.py", "train_moe.py"]
    source = (REPO / "train_moe.py").read_bytes()
    script = (folder / "train_gpt.py").read_bytes()
    assert (folder / "train_moe.py").read_bytes() == source and tm.unpack_code(script) == source != script
    sub = json.loads((folder / "submission.json").read_text())
    assert sub["bytes_code"] == len(script) < len(source) / 2
    roundtrip = {seed: make_record.read_events(workdir / f"logs/s{seed}.jsonl")["final_roundtrip"] for seed in (1, 2)}
    assert sub["seeds"] == [1, 2] and sub["mlp_mode"] == "sparse" and sub["num_experts"] == 4 and sub["top_k"] == 2
    assert sub["hardware"] == "1x CPU" and sub["track"] == NON_RECORD
    assert sub["val_bpb"] == pytest.approx((roundtrip[1]["val_bpb"] + roundtrip[2]["val_bpb"]) / 2, abs=1e-12)
    assert sub["improvement_nats"] == pytest.approx(9.05 - sub["val_loss"]) and 0 <= sub["p_value"] < 0.05
    readme = (folder / "README.md").read_text()
    assert "RUN_ID=s1" in readme and "MLP_MODE=sparse" in readme and "## Mixture of experts" in readme
    result = check_cli(folder)
    assert result.returncode == 0 and result.stdout.startswith("OK "), result.stdout
    # A record is never overwritten.
    again = make(workdir, "s1", "s2")
    assert again.returncode == 1 and again.stderr.startswith("error: ") and "already exists" in again.stderr


def test_record_track_accepts_a_run_that_shows_the_challenge_setting(workdir):
    for run_id in ("s1", "s2"):
        as_challenge_run(workdir / "logs", run_id)
    result = make(workdir, "s1", "s2", track=RECORD)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    folder = workdir / RECORD_FOLDER
    sub = json.loads((folder / "submission.json").read_text())
    assert sub["track"] == RECORD and sub["hardware"] == f"8x {H100}" and sub["seeds"] == [1, 2]
    assert (folder / "train_moe.py").read_bytes() == (REPO / "train_moe.py").read_bytes()  # rewrite kept the source
    checked = check_cli(folder)
    assert checked.returncode == 0 and checked.stdout.startswith(f"OK {folder}: "), checked.stderr


def test_cpu_run_is_refused_on_the_record_track_only(workdir, tiny_data):
    """The user's report: a 2-core CPU run on a non-challenge corpus passed as a track_10min_16mb record."""
    result = make(workdir, "s1", "s2", track=RECORD)
    tokenizer, vocab = tiny_data["tokenizer_path"], tiny_data["vocab_size"]
    val_tokens = make_record.read_events(workdir / "logs/s1.jsonl")["model"]["val_tokens"]
    expected = [f"error: {run}: {problem}" for run in ("s1", "s2") for problem in (
        "world size 1: track_10min_16mb runs on 8 GPUs (torchrun --standalone --nproc_per_node=8)",
        "no GPU in the environment report (no `cuda ... gpu ...` line): a CPU run; track_10min_16mb runs on 8xH100",
        f"vocab size {vocab}: the challenge's tokenizer has 1024 pieces",
        f"tokenizer {tokenizer}: not the challenge's fineweb_1024_bpe.model",
        f"val split of {val_tokens:,} scored tokens at TRAIN_SEQ_LEN=64: not the challenge's fineweb10B_sp1024 val "
        "split (62,021,632 at TRAIN_SEQ_LEN=1024)")]
    assert result.returncode == 1 and result.stdout == "" and result.stderr.splitlines() == expected
    assert not (workdir / "records").exists()
    # The same runs make a non-record submission.
    assert make(workdir, "s1", "s2", track=NON_RECORD).returncode == 0 and (workdir / FOLDER).is_dir()


# Each case changes one thing of an otherwise challenge-conform s1 (text-log changes, model-event changes) and names
# the one problem it must give on the record track; the non-record track takes every one of them.
TRACK_CASES = {
    "an H200": (dict(gpu="NVIDIA H200"), {}, "GPU 'NVIDIA H200' is not an H100: track_10min_16mb runs on 8xH100"),
    "an H800": (dict(gpu="NVIDIA H800"), {}, "GPU 'NVIDIA H800' is not an H100: track_10min_16mb runs on 8xH100"),
    "a GH200": (dict(gpu="NVIDIA GH200 480GB"), {},
                "GPU 'NVIDIA GH200 480GB' is not an H100: track_10min_16mb runs on 8xH100"),
    "an A100": (dict(gpu="NVIDIA A100-SXM4-80GB"), {},
                "GPU 'NVIDIA A100-SXM4-80GB' is not an H100: track_10min_16mb runs on 8xH100"),
    "a CPU": (dict(gpu=None), {},
              "no GPU in the environment report (no `cuda ... gpu ...` line): a CPU run; track_10min_16mb runs on 8xH100"),
    "4 GPUs": (dict(world_size="4"), {},
               "world size 4: track_10min_16mb runs on 8 GPUs (torchrun --standalone --nproc_per_node=8)"),
    "1 GPU": (dict(world_size="1"), {},
              "world size 1: track_10min_16mb runs on 8 GPUs (torchrun --standalone --nproc_per_node=8)"),
    "sp8192 vocabulary": (dict(vocab_size="8192"), {}, "vocab size 8192: the challenge's tokenizer has 1024 pieces"),
    "no vocabulary setting": (dict(vocab_size=DROP), {}, "vocab size None: the challenge's tokenizer has 1024 pieces"),
    "another 1024 tokenizer": (dict(tokenizer_path="data/tokenizers/study_1024_bpe.model"), {},
                               "tokenizer data/tokenizers/study_1024_bpe.model: not the challenge's fineweb_1024_bpe.model"),
    "another corpus": ({}, dict(val_tokens=1_198_080), "val split of 1,198,080 scored tokens at TRAIN_SEQ_LEN=1024: not "
                       "the challenge's fineweb10B_sp1024 val split (62,021,632 at TRAIN_SEQ_LEN=1024)"),
    "pre-release export": ({}, dict(val_tokens=63_779_840), "val split of 63,779,840 scored tokens at TRAIN_SEQ_LEN=1024: "
                           "not the challenge's fineweb10B_sp1024 val split (62,021,632 at TRAIN_SEQ_LEN=1024)"),
    "one sequence short": ({}, dict(val_tokens=OFFICIAL_VAL - 1024), "val split of 62,020,608 scored tokens at "
                           "TRAIN_SEQ_LEN=1024: not the challenge's fineweb10B_sp1024 val split (62,021,632 at TRAIN_SEQ_LEN=1024)"),
    "official count, wrong sequence length": (dict(train_seq_len="16384"), {}, "val split of 62,021,632 scored tokens at "
                                              "TRAIN_SEQ_LEN=16384: not the challenge's fineweb10B_sp1024 val split "
                                              "(62,021,632 at TRAIN_SEQ_LEN=1024)"),
    "no val count": ({}, dict(val_tokens=DROP), "model event val_tokens is null, not a count of val tokens: the val "
                     "split cannot be shown to be the challenge's"),
    "no sequence length": (dict(train_seq_len=DROP), {}, "config train_seq_len:None is not a positive integer: the val "
                           "split cannot be shown to be the challenge's"),
}


@pytest.mark.parametrize("text_changes, model_changes, problem", TRACK_CASES.values(), ids=TRACK_CASES)
def test_record_track_requires_the_challenge_setting(text_changes, model_changes, problem, workdir):
    as_challenge_run(workdir / "logs", "s1", **text_changes, **model_changes)
    assert refusals(workdir, "s1", track=RECORD) == [f"s1: {problem}"]
    assert not (workdir / "records").exists()
    assert refusals(workdir, "s1", track=NON_RECORD) == [] and (workdir / FOLDER).is_dir()


GPU_NAMES = {  # torch.cuda.get_device_name() -> passes the record track
    "NVIDIA H100 80GB HBM3": True, "NVIDIA H100 PCIe": True, "NVIDIA H100 NVL": True, "NVIDIA H100": True,
    "NVIDIA H200": False, "NVIDIA H200 NVL": False, "NVIDIA H800": False, "NVIDIA H800 PCIe": False,
    "NVIDIA GH200 480GB": False, "NVIDIA H20": False, "NVIDIA H1000": False, "NVIDIA A100-SXM4-80GB": False,
    "NVIDIA GeForce RTX 4090": False,
}


@pytest.mark.parametrize("gpu, passes", GPU_NAMES.items(), ids=GPU_NAMES)
def test_which_gpu_names_pass(gpu, passes):
    environment = f"python 3.12.3 torch 2.11.0+cu130\ncuda 12.8 gpu {gpu}\n"
    config = {**CHALLENGE_CONFIG, "seed": "1"}
    problems = make_record.track_problems(RECORD, environment, config, {"model": {"val_tokens": OFFICIAL_VAL}})
    assert problems == ([] if passes else [f"GPU {gpu!r} is not an H100: track_10min_16mb runs on 8xH100"])
    assert make_record.track_problems(NON_RECORD, environment, config, {"model": {}}) == []


VAL_COUNTS = [  # (val_tokens, TRAIN_SEQ_LEN, is the challenge's val split)
    (62_021_632, 1024, True), (62_021_632, 2048, True), (62_021_632, 4096, True), (62_021_632, 8192, True),
    (62_013_440, 16384, True), (62_020_608, 3072, True), (62_021_696, 64, True), (62_022_592, 64, True),
    (62_020_608, 1024, False), (62_022_656, 1024, False), (62_021_633, 1024, False), (62_021_632, 16384, False),
    (62_021_568, 64, False), (62_022_656, 64, False), (63_779_840, 1024, False), (1_198_080, 1024, False),
]


@pytest.mark.parametrize("val_tokens, seq_len, official", VAL_COUNTS)
def test_which_val_counts_are_the_challenge_split(val_tokens, seq_len, official):
    assert make_record.is_official_val_split(val_tokens, seq_len) is official


def test_check_record_reports_track_problems(workdir):
    for run_id in ("s1", "s2"):
        as_challenge_run(workdir / "logs", run_id)
    assert make(workdir, "s1", "s2", track=RECORD).returncode == 0
    folder = workdir / RECORD_FOLDER
    rewrite_text_log(folder / "s1.txt", gpu="NVIDIA H200")
    edit_event(folder / "s2.jsonl", "model", val_tokens=1_198_080)
    assert sorted(check_record.check(folder)[0]) == sorted([
        "s1.txt: GPU 'NVIDIA H200' is not an H100: track_10min_16mb runs on 8xH100",
        f"submission.json: hardware claimed '8x {H100}', s1.txt ran on '8x NVIDIA H200'",
        "s2.txt: val split of 1,198,080 scored tokens at TRAIN_SEQ_LEN=1024: not the challenge's fineweb10B_sp1024 "
        "val split (62,021,632 at TRAIN_SEQ_LEN=1024)"])
    rewrite_text_log(folder / "s2.txt", world_size="4")
    result = check_cli(folder)
    assert result.returncode == 1 and result.stdout == ""
    assert sorted(result.stderr.splitlines()) == sorted(f"error: {folder}: {problem}" for problem in [
        "s1.txt: GPU 'NVIDIA H200' is not an H100: track_10min_16mb runs on 8xH100",
        "s2.txt: world size 4: track_10min_16mb runs on 8 GPUs (torchrun --standalone --nproc_per_node=8)",
        "s2.txt: val split of 1,198,080 scored tokens at TRAIN_SEQ_LEN=1024: not the challenge's fineweb10B_sp1024 "
        "val split (62,021,632 at TRAIN_SEQ_LEN=1024)",
        "s1.txt and s2.txt differ in settings: world_size 8 vs 4",
        f"submission.json: hardware claimed '8x {H100}', s1.txt ran on '8x NVIDIA H200'",
        f"submission.json: hardware claimed '8x {H100}', s2.txt ran on '4x {H100}'"])


def test_check_record_refuses_a_cpu_record_moved_into_the_record_track(workdir):
    assert make(workdir, "s1", "s2").returncode == 0
    folder = workdir / RECORD_FOLDER
    shutil.copytree(workdir / FOLDER, folder)
    edit_json(folder / "submission.json", lambda s: s.update(track=RECORD))
    problems = check_record.check(folder)[0]
    assert len(problems) == 10 and all(p.startswith(("s1.txt: ", "s2.txt: ")) for p in problems)
    for start in ("world size 1:", "no GPU in the environment report", "vocab size ", "tokenizer ", "val split of "):
        assert sorted(p.partition(": ")[0] for p in problems if p.partition(": ")[2].startswith(start)) == \
            ["s1.txt", "s2.txt"], (start, problems)
    assert check_record.check(workdir / FOLDER)[0] == []  # where it was, it passes


def test_every_problem_of_every_run_is_listed(workdir):
    """Over time, over the cap, a wrong size, a wrong GPU, a seed twice, a different source and settings: all told."""
    logs = workdir / "logs"
    as_challenge_run(logs, "s1")
    as_challenge_run(logs, "s2", gpu="NVIDIA H200", seed="1", num_layers="3")
    edit_event(logs / "s1.jsonl", "train_done", train_time_ms=600_001)
    code_bytes = make_record.read_events(logs / "s2.jsonl")["artifact"]["code_bytes"]
    edit_event(logs / "s2.jsonl", "artifact", model_bytes=16_000_000, artifact_bytes=16_000_000 + code_bytes, status="OVER")
    (logs / "s2.txt").write_bytes((logs / "s2.txt").read_bytes().replace(b"import", b"import ", 1))
    real_size = (workdir / "artifacts/s2.moe").stat().st_size
    result = make(workdir, "s1", "s2", track=RECORD)
    s1, s2 = Path("logs/s1.txt"), Path("logs/s2.txt")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.splitlines() == [
        "error: s1: trained 600001 ms, over track_10min_16mb's 600000 ms",
        f"error: s2: artifact {16_000_000 + code_bytes:,} bytes is over the 16,000,000-byte cap",
        f"error: s2: {Path('artifacts/s2.moe')} is {real_size} bytes, the log says 16000000",
        "error: s2: GPU 'NVIDIA H200' is not an H100: track_10min_16mb runs on 8xH100",
        f"error: {s1} and {s2} ran the same seed 1; give each seed once",
        f"error: {s2} and {s1} ran different train_moe.py sources",
        f"error: {s1} and {s2} differ in settings: num_layers 2 vs 3",
    ]
    assert not (workdir / "records").exists()


def test_same_seed_and_different_settings_are_both_told(workdir):
    """The user's report: two runs of different settings and one seed were refused for the seed only."""
    (workdir / "logs/s2.txt").write_bytes((workdir / "logs/s2.txt").read_bytes()
                                          .replace(b"\nconfig seed:2\n", b"\nconfig seed:1\n")
                                          .replace(b"\nconfig top_k:2\n", b"\nconfig top_k:1\n"))
    assert refusals(workdir, "s1", "s2", track=NON_RECORD) == [
        f"{Path('logs/s1.txt')} and {Path('logs/s2.txt')} ran the same seed 1; give each seed once",
        f"{Path('logs/s1.txt')} and {Path('logs/s2.txt')} differ in settings: top_k 2 vs 1"]


def test_missing_events_of_every_run_are_listed(workdir):
    for run_id, event in (("s1", "final_roundtrip"), ("s2", "artifact")):
        path = workdir / f"logs/{run_id}.jsonl"
        path.write_text("".join(line + "\n" for line in path.read_text().splitlines()
                                if json.loads(line)["event"] != event))
    assert refusals(workdir, "s1", "s2", track=NON_RECORD) == [
        f"{Path('logs/s1.jsonl')}: no final_roundtrip event: the run did not finish",
        f"{Path('logs/s2.jsonl')}: no artifact event: the run did not finish"]


def test_make_refuses_over_cap_and_unfinished_runs(workdir):
    edit_log = workdir / "logs/s2.jsonl"
    code_bytes = make_record.read_events(edit_log)["artifact"]["code_bytes"]
    edit_event(edit_log, "artifact", model_bytes=16_000_000, artifact_bytes=16_000_000 + code_bytes, status="OVER")
    (workdir / "artifacts/s2.moe").unlink()  # else its real size contradicts the edited log too
    lines = [json.loads(line) for line in edit_log.read_text().splitlines()]
    result = make(workdir, "s1", "s2")
    assert result.returncode == 1 and result.stderr.startswith("error: ") and "over the 16,000,000-byte cap" in result.stderr
    assert len(result.stderr.splitlines()) == 1
    edit_log.write_text("".join(json.dumps(line) + "\n" for line in lines if line["event"] != "final_roundtrip"))
    result = make(workdir, "s2")
    assert result.returncode == 1 and result.stderr.startswith("error: ") and "no final_roundtrip event" in result.stderr
    assert not (workdir / "records").exists()


def test_a_jsonl_that_disagrees_with_its_text_log_or_an_artifact_not_the_logged_one_is_refused(workdir):
    """On a real run's logs: a better score in the .jsonl alone, and an artifact of the logged size but other bytes."""
    logs, artifact = workdir / "logs", workdir / "artifacts/s2.moe"
    shown = make_record.read_events(logs / "s1.jsonl")["final_roundtrip"]["val_bpb"]
    tamper(logs / "s1.jsonl", "final_roundtrip", val_bpb=shown - 0.01)
    changed = bytearray(artifact.read_bytes())
    changed[len(changed) // 2] ^= 0xFF
    artifact.write_bytes(changed)
    logged = make_record.read_events(logs / "s2.jsonl")["artifact"]["sha256"]
    assert refusals(workdir, "s1", "s2", track=NON_RECORD) == [
        f"{Path('logs/s1.jsonl')}: final_roundtrip val_bpb is {shown - 0.01}, but {Path('logs/s1.txt')} logs "
        f"val_bpb:{shown:.8f}",
        f"s2: {Path('artifacts/s2.moe')} is not this run's artifact: its SHA-256 is "
        f"{hashlib.sha256(changed).hexdigest()}, the log says {logged}"]


def test_make_refuses_runs_of_different_sources(workdir):
    text_log = workdir / "logs/s2.txt"
    text_log.write_bytes(text_log.read_bytes().replace(b"import", b"import ", 1))
    result = make(workdir, "s1", "s2")
    assert result.returncode == 1 and result.stderr == f"error: {Path('logs/s2.txt')} and {Path('logs/s1.txt')} ran different train_moe.py sources\n"


def test_false_claims_fail(workdir):
    assert make(workdir, "s1", "s2").returncode == 0
    folder = workdir / FOLDER
    assert check_record.check(folder)[0] == []
    edit_json(folder / "submission.json", lambda s: s["seed_results"]["2"].update(val_bpb=s["seed_results"]["2"]["val_bpb"] - 1e-6))
    problems = check_record.check(folder)[0]
    assert len(problems) == 1 and problems[0].startswith("seed 2: val_bpb claimed")
    edit_json(folder / "submission.json", lambda s: s.update(bytes_total=16_000_001))
    assert any("bytes_total 16,000,001 is over" in p for p in check_record.check(folder)[0])
    edit_json(folder / "submission.json", lambda s: s.update(hardware="8x NVIDIA H100 80GB HBM3"))
    assert "submission.json: hardware claimed '8x NVIDIA H100 80GB HBM3', s1.txt ran on '1x CPU'" in check_record.check(folder)[0]


def test_claimed_size_recomputed_from_script_and_model_bytes(workdir):
    # A log whose model bytes push the artifact over the cap fails even where the claims copy the log.
    assert make(workdir, "s1").returncode == 0
    folder = workdir / FOLDER
    code_bytes = make_record.read_events(folder / "s1.jsonl")["artifact"]["code_bytes"]
    edit_event(folder / "s1.jsonl", "artifact", model_bytes=16_000_000 - code_bytes + 1, artifact_bytes=16_000_001)
    edit_json(folder / "submission.json", lambda s: (s.update(bytes_total=16_000_001), s["seed_results"]["1"].update(artifact_bytes=16_000_001)))
    problems = check_record.check(folder)[0]
    assert "s1.txt: artifact 16,000,001 bytes is over the 16,000,000-byte cap" in problems


def test_missing_log_and_changed_script_all_reported(workdir):
    assert make(workdir, "s1", "s2").returncode == 0
    folder = workdir / FOLDER
    (folder / "s2.txt").unlink()
    (folder / "train_gpt.py").write_bytes(tm.pack_code((folder / "train_moe.py").read_bytes() + b"# an edit\n"))
    result = check_cli(folder)
    lines = result.stderr.splitlines()
    assert result.returncode == 1 and result.stdout == ""
    assert all(line.startswith(f"error: {folder}: ") for line in lines)
    assert any("s1.txt: train_gpt.py does not unpack to the source this run logged" in line for line in lines)
    assert any("train_moe.py differs from the source train_gpt.py unpacks to" in line for line in lines)
    assert any("s2.jsonl: its text log s2.txt is missing" in line for line in lines)
    assert any("seed 2: claimed, but no finished log" in line for line in lines)
    assert any("bytes_code" in line for line in lines) and len(lines) >= 5


TAIL = b".encode('latin-1'),max_order=16),'train_moe.py','exec'))\n"


@pytest.mark.parametrize("script,problem", [
    (b"print('hello')\n", "train_gpt.py is not a packed trainer"),
    (tm.CODE_HEAD + b"'not closed" + TAIL, "train_gpt.py: its packed source does not unpack"),
    (tm.CODE_HEAD + b"b'bytes'" + TAIL, "train_gpt.py: its packed source does not unpack"),  # not a str literal
    (tm.CODE_HEAD + b"''" + TAIL, "train_gpt.py: its packed source does not unpack"),  # PPMd: nothing to decode
])
def test_a_script_that_is_not_the_packed_trainer_is_refused(workdir, script, problem):
    assert make(workdir, "s1").returncode == 0
    folder = workdir / FOLDER
    (folder / "train_gpt.py").write_bytes(script)
    assert any(p.startswith(problem) for p in check_record.check(folder)[0])


def test_packing_falls_back_to_the_highest_order_that_gives_the_source_back(monkeypatch):
    """pyppmd 1.3.1 gives back another text, or raises, for some texts at a given order: the script names the order
    whose round trip it checked."""
    source, decompress = b"print('packed')\n" * 50, tm.pyppmd.decompress
    wrong = {16: lambda data: source + b"#", 15: lambda data: (_ for _ in ()).throw(ValueError("L1595: Corrupted input data."))}
    monkeypatch.setattr(tm.pyppmd, "decompress", lambda data, max_order: wrong.get(max_order, lambda d: decompress(d, max_order=max_order))(data))
    script = tm.pack_code(source)
    assert script.endswith(b",max_order=14),'train_moe.py','exec'))\n")
    monkeypatch.setattr(tm.pyppmd, "decompress", decompress)
    assert tm.unpack_code(script) == source
    namespace = {}
    exec(script.replace(b"exec(compile(", b"SOURCE=(("), namespace)  # the script itself decodes at the order it names
    assert namespace["SOURCE"][0] == source


def test_the_packed_trainer_runs_as_the_trainer_and_logs_the_source_it_holds(tiny_data, tmp_path):
    """train_gpt.py as a record ships it trains, exports and scores like train_moe.py, embeds train_moe.py's exact
    source in its log, and counts its own bytes."""
    script = tm.pack_code((REPO / "train_moe.py").read_bytes())
    (tmp_path / "train_gpt.py").write_bytes(script)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(tiny_env(tiny_data, RUN_ID="packed", ITERATIONS=4), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "train_gpt.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    source, _, config = make_record.split_log((tmp_path / "logs" / "packed.txt").read_bytes())
    assert source == (REPO / "train_moe.py").read_bytes() and config["mlp_mode"] == "dense"
    artifact = make_record.read_events(tmp_path / "logs" / "packed.jsonl")["artifact"]
    assert artifact["code_bytes"] == len(script) and artifact["status"] == "OK"


def test_ten_minute_track_limit(workdir):
    as_challenge_run(workdir / "logs", "s1")
    edit_event(workdir / "logs/s1.jsonl", "train_done", train_time_ms=600_001)
    result = make(workdir, "s1", track=RECORD)
    assert result.returncode == 1 and result.stderr == "error: s1: trained 600001 ms, over track_10min_16mb's 600000 ms\n"
    edit_event(workdir / "logs/s1.jsonl", "train_done", train_time_ms=600_000)
    assert refusals(workdir, "s1", track=RECORD) == []


def test_source_extraction_is_byte_exact():
    # With and without a final newline, and with a 100-'=' line inside the source itself.
    for source in (b"print(1)\n", b"print(1)", b"x = 1\n" + b"=" * 100 + b"\ny = 2\n"):
        log = source + b"\n" + b"=" * 100 + b"\nenv\n" + b"=" * 100 + b"\nconfig seed:3\nconfig launch:A=1 b:c\n"
        extracted, environment, config = make_record.split_log(log)
        assert extracted == source and environment == "env" and config == {"seed": "3", "launch": "A=1 b:c"}


def test_welch_p_value_known_values():
    # ours [1,2,3] vs baseline [4,5,6]: t = -3/sqrt(2/3), df = 4; scipy.stats.ttest_ind(..., equal_var=False,
    # alternative="less") gives p = 0.010655820564378...; by hand: P(T4 > |t|) = 1/2 - (3/4)u(1 - u^2/3), u = |t|/sqrt(4+t^2).
    t = 3 / math.sqrt(2 / 3)
    u = t / math.sqrt(4 + t * t)
    assert make_record.welch_p_value([1, 2, 3], [4, 5, 6]) == pytest.approx(0.5 - 0.75 * u * (1 - u * u / 3), abs=1e-12)
    assert make_record.welch_p_value([1, 2, 3], [4, 5, 6]) == pytest.approx(0.0106558205643, abs=1e-10)
    # One-sided, ours lower: the other way round is the complement.
    assert make_record.welch_p_value([4, 5, 6], [1, 2, 3]) == pytest.approx(1 - 0.0106558205643, abs=1e-10)
    # Unequal sizes and variances, non-integer df: against a fine numerical integral of the t density.
    ours, base = [2.01, 2.03, 2.02, 2.05], [2.06, 2.04, 2.09]
    n1, n2 = len(ours), len(base)
    v1, v2 = statistics.variance(ours) / n1, statistics.variance(base) / n2
    t = (statistics.fmean(base) - statistics.fmean(ours)) / math.sqrt(v1 + v2)
    df = (v1 + v2) ** 2 / (v1 ** 2 / (n1 - 1) + v2 ** 2 / (n2 - 1))
    density = lambda x: math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi) * (1 + x * x / df) ** (-(df + 1) / 2)
    steps = 20_000  # Simpson's rule over [0, t]; P(T > t) = 1/2 - that integral
    h = t / steps
    integral = h / 3 * sum((1 if i in (0, steps) else 4 if i % 2 else 2) * density(i * h) for i in range(steps + 1))
    p = make_record.welch_p_value(ours, base)
    assert p == pytest.approx(0.5 - integral, abs=1e-10) and 0.01 < p < 0.1
    assert make_record.welch_p_value(base, ours) == pytest.approx(1 - p, abs=1e-12)
    # Neither side varies: nothing to test; scipy's NaN would not go into submission.json.
    assert make_record.welch_p_value([2.0, 2.0], [3.0, 3.0]) == 0.0
    assert make_record.welch_p_value([3.0, 3.0], [2.0, 2.0]) == 1.0
