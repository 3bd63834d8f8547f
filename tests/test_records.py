"""make_record.py and check_record.py on real (tiny) runs: a valid record passes, every kind of false claim fails."""
import json
import math
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, run_trainer, tiny_env

sys.path.insert(0, str(REPO / "scripts"))
import check_record  # noqa: E402
import make_record  # noqa: E402

NAME = "Tiny sparse MoE"
FOLDER = f"records/track_non_record_16mb/{time.strftime('%Y-%m-%d')}_Tiny_sparse_MoE"


@pytest.fixture(scope="module")
def finished_runs(tiny_data, tmp_path_factory) -> Path:
    """Two seeds of a tiny 4-expert sparse model, finished: logs/s1.*, logs/s2.*, artifacts/s*.moe.zst."""
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


def make(cwd: Path, *runs: str, track="track_non_record_16mb", extra=()) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "scripts/make_record.py"), "--runs", *runs, "--track", track, "--name", NAME,
           "--author", "Ada", "--github-id", "ada", "--blurb", "Two seeds of a tiny MoE.", *extra]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=60)


def check_cli(folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "scripts/check_record.py"), str(folder)],
                          capture_output=True, text=True, timeout=60)


def edit_json(path: Path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_valid_record_passes(workdir):
    result = make(workdir, "s1", "logs/s2.txt", extra=["--baseline-loss", "9.0", "9.1"])
    assert result.returncode == 0, result.stderr
    folder = workdir / FOLDER
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "s1.jsonl", "s1.txt", "s2.jsonl", "s2.txt",
                                                      "submission.json", "train_moe.py"]
    assert (folder / "train_moe.py").read_bytes() == (REPO / "train_moe.py").read_bytes()
    sub = json.loads((folder / "submission.json").read_text())
    roundtrip = {seed: make_record.read_events(workdir / f"logs/s{seed}.jsonl")["final_roundtrip"] for seed in (1, 2)}
    assert sub["seeds"] == [1, 2] and sub["mlp_mode"] == "sparse" and sub["num_experts"] == 4 and sub["top_k"] == 2
    assert sub["val_bpb"] == pytest.approx((roundtrip[1]["val_bpb"] + roundtrip[2]["val_bpb"]) / 2, abs=1e-12)
    assert sub["improvement_nats"] == pytest.approx(9.05 - sub["val_loss"]) and 0 <= sub["p_value"] < 0.05
    readme = (folder / "README.md").read_text()
    assert "RUN_ID=s1" in readme and "MLP_MODE=sparse" in readme and "## Mixture of experts" in readme
    result = check_cli(folder)
    assert result.returncode == 0 and result.stdout.startswith("OK "), result.stdout
    # A record is never overwritten.
    again = make(workdir, "s1", "s2")
    assert again.returncode == 1 and again.stderr.startswith("error: ") and "already exists" in again.stderr


def test_make_refuses_over_cap_and_unfinished_runs(workdir):
    edit_log = workdir / "logs/s2.jsonl"
    lines = [json.loads(line) for line in edit_log.read_text().splitlines()]
    for line in lines:
        if line["event"] == "artifact":
            line.update(model_bytes=16_000_000, artifact_bytes=16_000_000 + line["code_bytes"], status="OVER")
    (workdir / "artifacts/s2.moe.zst").unlink()  # else its real size contradicts the edited log first
    edit_log.write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = make(workdir, "s1", "s2")
    assert result.returncode == 1 and result.stderr.startswith("error: ") and "over the 16,000,000-byte cap" in result.stderr
    edit_log.write_text("".join(json.dumps(line) + "\n" for line in lines if line["event"] != "final_roundtrip"))
    result = make(workdir, "s2")
    assert result.returncode == 1 and result.stderr.startswith("error: ") and "no final_roundtrip event" in result.stderr
    assert not (workdir / "records").exists()


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


def test_claimed_size_recomputed_from_script_and_model_bytes(workdir):
    # A log whose model bytes push the artifact over the cap fails even where the claims copy the log.
    assert make(workdir, "s1").returncode == 0
    folder = workdir / FOLDER
    lines = [json.loads(line) for line in (folder / "s1.jsonl").read_text().splitlines()]
    for line in lines:
        if line["event"] == "artifact":
            line.update(model_bytes=16_000_000 - line["code_bytes"] + 1, artifact_bytes=16_000_001)
    (folder / "s1.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    edit_json(folder / "submission.json", lambda s: (s.update(bytes_total=16_000_001), s["seed_results"]["1"].update(artifact_bytes=16_000_001)))
    problems = check_record.check(folder)[0]
    assert "s1.txt: artifact 16,000,001 bytes is over the 16,000,000-byte cap" in problems


def test_missing_log_and_changed_script_all_reported(workdir):
    assert make(workdir, "s1", "s2").returncode == 0
    folder = workdir / FOLDER
    (folder / "s2.txt").unlink()
    with open(folder / "train_moe.py", "ab") as f:
        f.write(b"\n")
    result = check_cli(folder)
    lines = result.stderr.splitlines()
    assert result.returncode == 1 and result.stdout == ""
    assert all(line.startswith(f"error: {folder}: ") for line in lines)
    assert any("s1.txt: train_moe.py differs from the source this run logged" in line for line in lines)
    assert any("s2.jsonl: its text log s2.txt is missing" in line for line in lines)
    assert any("seed 2: claimed, but no finished log" in line for line in lines)
    assert any("bytes_code" in line for line in lines) and len(lines) >= 4


def test_ten_minute_track_limit(workdir):
    lines = [json.loads(line) for line in (workdir / "logs/s1.jsonl").read_text().splitlines()]
    for line in lines:
        if line["event"] == "train_done":
            line["train_time_ms"] = 600_001
    (workdir / "logs/s1.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = make(workdir, "s1", track="track_10min_16mb")
    assert result.returncode == 1 and result.stderr == "error: s1: trained 600001 ms, over track_10min_16mb's 600000 ms\n"


def test_source_extraction_is_byte_exact():
    # With and without a final newline, and with a 100-'=' line inside the source itself.
    for source in (b"print(1)\n", b"print(1)", b"x = 1\n" + b"=" * 100 + b"\ny = 2\n"):
        log = source + b"\n" + b"=" * 100 + b"\nenv\n" + b"=" * 100 + b"\nconfig seed:3\nconfig launch:A=1 b:c\n"
        extracted, environment, config = make_record.split_log(log)
        assert extracted == source and environment == "env" and config == {"seed": "3", "launch": "A=1 b:c"}


def test_welch_p_value_known_values():
    # Student t tails in closed form: df=1 is Cauchy, P(T>1) = 1/4; df=2, P(T>t) = 1/2 - t/(2 sqrt(2+t^2)).
    assert make_record.student_t_sf(1.0, 1) == pytest.approx(0.25, abs=1e-12)
    assert make_record.student_t_sf(2.0, 2) == pytest.approx(0.5 - 1 / math.sqrt(6), abs=1e-12)
    assert make_record.student_t_sf(-2.0, 2) == pytest.approx(0.5 + 1 / math.sqrt(6), abs=1e-12)
    # ours [1,2,3] vs baseline [4,5,6]: t = 3/sqrt(2/3), df = 4; scipy.stats.ttest_ind(..., equal_var=False,
    # alternative="less") gives p = 0.010655820564378...; by hand: P(T4>t) = 1/2 - (3/4)u(1 - u^2/3), u = t/sqrt(4+t^2).
    t = 3 / math.sqrt(2 / 3)
    u = t / math.sqrt(4 + t * t)
    assert make_record.welch_p_value([1, 2, 3], [4, 5, 6]) == pytest.approx(0.5 - 0.75 * u * (1 - u * u / 3), abs=1e-12)
    assert make_record.welch_p_value([1, 2, 3], [4, 5, 6]) == pytest.approx(0.0106558205643, abs=1e-10)
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
