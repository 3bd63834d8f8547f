"""scripts/bench_step.py on the CPU: the rows it measures, its table and JSON, its recompile count, bad modes, and
--peer against a stand-in for train_gpt.py."""
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import bench_step  # noqa: E402
from conftest import DENSE  # noqa: E402

SHAPE = dict(**DENSE, NUM_LAYERS="2", MODEL_DIM="64", NUM_HEADS="4", NUM_KV_HEADS="2", TRAIN_SEQ_LEN="32",
             TRAIN_BATCH_TOKENS="2048", COMPILE="0", NUM_EXPERTS="4", TOP_K="2")


@pytest.fixture
def shape_env(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MLP_MODE", "ROUTER"):
        monkeypatch.delenv(k, raising=False)
    for k, v in SHAPE.items():
        monkeypatch.setenv(k, v)


def test_rows_table_and_json(shape_env, tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench_step.main(["--modes", "dense", "sparse:hash", "soft", "--steps", "2", "--warmup", "1", "--json", str(out)])
    result = json.loads(out.read_text())
    rows = {r["mode"]: r for r in result["rows"]}
    assert list(rows) == ["dense", "sparse:hash", "soft"]
    assert result["meta"]["shape"]["train_batch_tokens"] == 2048 and result["meta"]["world_size"] == 1
    # At the dense MLP's active FLOPs: hash routing has no router, so active parameters match dense exactly;
    # soft adds its router (4 experts x 64 per layer) and runs every expert (128 = 4 x 32 hidden).
    assert rows["sparse:hash"]["active_params"] == rows["dense"]["active_params"]
    assert rows["sparse:hash"]["params"] - rows["dense"]["params"] == 2 * (4 - 2) * 2 * 64 * 64
    assert rows["soft"]["active_params"] - rows["dense"]["active_params"] == 2 * 4 * 64
    assert rows["dense"]["vs_dense"] == 1.0
    for r in rows.values():
        assert len(r["step_times_ms"]) == 2 and all(t > 0 for t in r["step_times_ms"])
        assert r["ms_per_step"] == pytest.approx(sorted(r["step_times_ms"])[0] / 2 + sorted(r["step_times_ms"])[1] / 2)
        assert r["tokens_per_s_per_gpu"] == pytest.approx(2048 / (r["ms_per_step"] / 1000))
        assert r["vs_dense"] == pytest.approx(r["ms_per_step"] / rows["dense"]["ms_per_step"])
        assert r["graph_breaks"] == 0 and r["recompiles"] == 0 and r["host_sync"] == "n/a"
    table = capsys.readouterr().out
    assert "sparse:hash" in table and "vs dense" in table and f"{rows['soft']['vs_dense']:.3f}" in table


def test_trains_like_the_trainer(shape_env):
    """The benchmarked step is the trainer's: it changes the weights, and the sigmoid biases move."""
    import train_moe

    cfg = train_moe.Hyperparameters(bench_step.mode_env(dict(SHAPE, ROUTER_BIAS_RATE="0.01"), "sparse:sigmoid"))
    model = train_moe.GPT(cfg)
    optimizers = train_moe.build_optimizers(model, cfg)
    loader = bench_step.RandomBatches(cfg, torch.device("cpu"))
    before = model.blocks[0].mlp.experts.w_in.detach().clone()
    losses = [train_moe.train_step(cfg, model, model, optimizers, loader).item() for _ in range(3)]
    assert all(4 < x < 8 for x in losses)  # near ln(1024) = 6.93 at init
    assert not torch.equal(before, model.blocks[0].mlp.experts.w_in)
    assert model.blocks[0].mlp.router_bias.abs().sum() > 0
    assert loader.calls == 3 * cfg.grad_accum_steps


def test_mode_names_pick_the_mlp_the_router_and_the_expert_kernel():
    assert bench_step.mode_env({"NUM_EXPERTS": "4"}, "shared_routed:sigmoid@torch") == {
        "MOE_LAYERS": "all", "EXPERT_HIDDEN": "0", "NUM_EXPERTS": "4", "MLP_MODE": "shared_routed", "ROUTER": "sigmoid",
        "EXPERT_KERNEL": "torch"}
    assert bench_step.mode_env({"MOE_LAYERS": "0"}, "sparse") == {"MOE_LAYERS": "0", "EXPERT_HIDDEN": "0", "MLP_MODE": "sparse"}
    import train_moe

    default = train_moe.Hyperparameters(bench_step.mode_env({}, "default@torch"))
    assert (default.mlp_mode, default.moe_layers, default.expert_hidden, default.num_experts) == ("sparse", (1, 3, 5, 7), 256, 16)
    assert default.expert_kernel == "torch"


def test_recompile_counter_counts_real_recompiles():
    counter = bench_step.watch_recompiles()
    torch._dynamo.reset()
    fn = torch.compile(lambda x: x * 2 + 1, dynamic=False)
    fn(torch.ones(3))
    fn(torch.ones(3))
    assert counter.count == 0
    fn(torch.ones(5))  # a new static shape: one recompile
    assert counter.count == 1


@pytest.mark.parametrize("mode", ["sparse:bogus", "sparse@quack"])
def test_bad_mode_is_refused_before_anything_runs(shape_env, capsys, tmp_path, mode):
    if mode.endswith("@quack") and torch.cuda.is_available():
        pytest.skip("QuACK may run here")
    with pytest.raises(SystemExit) as e:
        bench_step.main(["--modes", "dense", mode, "--json", str(tmp_path / "x.json")])
    assert e.value.code == 2
    assert mode in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


# A stand-in for train_gpt.py, which needs CUDA and real shards: its step lines in its own format (step 1 holds the
# compile), then a sleep where the real one would validate and export. It saves the env and folder it ran with.
FAKE_PEER = '''import json, os, sys, time
json.dump(dict(env=dict(os.environ), cwd=os.getcwd()), open({seen!r}, "w"))
args_iterations = int(os.environ["ITERATIONS"])
print("logs/fake.txt")
print("model_params:17059912")
approx_training_time_ms = 0
for step, ms in enumerate({step_ms!r}[:{logged}], 1):
    approx_training_time_ms += ms
    train_loss = 6.9
    print(f"step:{{step}}/{{args_iterations}} train_loss:{{train_loss:.4f}} "
          f"train_time:{{approx_training_time_ms:.0f}}ms step_avg:{{approx_training_time_ms / step:.2f}}ms")
{end}
'''
STEP_MS = [900, 120, 110, 100, 130, 105]  # warm-up 1, then 5 timed steps: median 110


def fake_peer(tmp_path, logged=len(STEP_MS), end="time.sleep(600)") -> Path:
    path = tmp_path / "train_gpt.py"
    path.write_text(FAKE_PEER.format(seen=str(tmp_path / "seen.json"), step_ms=STEP_MS, logged=logged, end=end))
    return path


@pytest.fixture
def peer_data(shape_env, monkeypatch, tmp_path):
    """What --peer checks for; the fake peer reads none of it."""
    data = tmp_path / "shards"
    data.mkdir()
    for name in ("fineweb_train_000000.bin", "fineweb_val_000000.bin", "tok.model"):
        (data / name).write_bytes(b"")
    monkeypatch.setenv("DATA_PATH", str(data))
    monkeypatch.setenv("TOKENIZER_PATH", str(data / "tok.model"))
    return data


def test_peer_steps_are_the_differences_of_its_cumulative_train_time():
    log = ("logs/x.txt\nwarmup_step:1/20\nstep:1/4 train_loss:6.9312 train_time:850ms step_avg:850.00ms\n"
           "step:2/4 train_loss:nan train_time:971ms step_avg:485.50ms\n"
           "step:2/4 val_loss:6.9 val_bpb:4.1 train_time:971ms step_avg:485.50ms\n"
           "step:3/4 train_loss:6.2000 train_time:1083ms step_avg:361.00ms\n"
           "step:5/4 train_loss:6.1000 train_time:1200ms step_avg:240.00ms\n")  # a gap: step 4 is missing
    assert bench_step.parse_peer_steps(log) == [850.0, 121.0, 112.0]
    assert bench_step.parse_peer_steps("no steps here\n") == []


def test_peer_row_from_its_log_and_stopped_after_its_last_step(tmp_path):
    env = dict(os.environ, ITERATIONS="6", TRAIN_BATCH_TOKENS="524288")
    start = time.perf_counter()
    row = bench_step.time_peer(str(fake_peer(tmp_path)), env, steps=5, warmup=1)
    assert time.perf_counter() - start < 60  # not the 600 s it sleeps after its last step
    assert row == dict(mode="peer:train_gpt.py", ms_per_step=110.0, tokens_per_s_per_gpu=524288 / 0.110,
                       peak_mem_gib=None, compile_s=(900 - 110) / 1000, graph_breaks=None, recompiles=None,
                       host_sync=None, max_over_mean_load=None, params=17059912, active_params=17059912,
                       step_times_ms=[120.0, 110.0, 100.0, 130.0, 105.0])
    assert not Path(json.loads((tmp_path / "seen.json").read_text())["cwd"]).exists()  # its logs/ went with its folder


def test_peer_row_beside_the_dense_row(peer_data, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "bench.json"
    fake_peer(tmp_path)
    bench_step.main(["--modes", "dense", "--steps", "5", "--warmup", "1", "--json", str(out), "--peer", "train_gpt.py"])
    rows = {r["mode"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["dense", "peer:train_gpt.py"]
    peer = rows["peer:train_gpt.py"]
    assert peer["ms_per_step"] == 110.0 and peer["vs_dense"] == 110.0 / rows["dense"]["ms_per_step"]
    table = capsys.readouterr().out.splitlines()
    assert table[-1].startswith("peer:train_gpt.py") and f"{peer['vs_dense']:.3f}" in table[-1]
    # The dense row's shape as the trainer resolved it (MLP_MULT and VOCAB_SIZE are its defaults), warm-up + steps.
    expected = dict(ITERATIONS="6", WARMUP_STEPS="0", TRAIN_LOG_EVERY="1", VAL_LOSS_EVERY="0", MAX_WALLCLOCK_SECONDS="0",
                    TRAIN_BATCH_TOKENS="2048", TRAIN_SEQ_LEN="32", NUM_LAYERS="2", MODEL_DIM="64", NUM_HEADS="4",
                    NUM_KV_HEADS="2", MLP_MULT="2", VOCAB_SIZE="1024", DATA_PATH=str(peer_data))
    seen = json.loads((tmp_path / "seen.json").read_text())["env"]
    assert {k: seen[k] for k in expected} == expected


STEP_1 = "step:1/6 train_loss:6.9000 train_time:900ms step_avg:900.00ms"
STEP_2 = "step:2/6 train_loss:6.9000 train_time:1020ms step_avg:510.00ms"
STEP_3 = "step:3/6 train_loss:6.9000 train_time:1130ms step_avg:376.67ms"


@pytest.mark.parametrize("logged, end, status, tail", [
    (2, "sys.exit('RuntimeError: CUDA is required')", 1, f"{STEP_1} | {STEP_2} | RuntimeError: CUDA is required"),
    (3, "", 0, f"{STEP_1} | {STEP_2} | {STEP_3}"),
])
def test_a_peer_that_stops_short_fails_after_the_trainer_rows(peer_data, tmp_path, capsys, logged, end, status, tail):
    path = fake_peer(tmp_path, logged=logged, end=end)
    out = tmp_path / "bench.json"
    with pytest.raises(SystemExit) as e:
        bench_step.main(["--modes", "dense", "--steps", "5", "--warmup", "1", "--json", str(out), "--peer", str(path)])
    assert e.value.code == 1
    captured = capsys.readouterr()
    assert captured.err == f"error: peer {path} exited with status {status} after {logged} of 6 steps; " \
                           f"its output ends: {tail}\n"
    assert "dense" in captured.out.splitlines()[-1]  # the trainer rows' table came first
    assert [r["mode"] for r in json.loads(out.read_text())["rows"]] == ["dense"]


NO_SHARDS = "--peer needs DATA_PATH, a folder of fineweb_train_*.bin and fineweb_val_*.bin shards"


@pytest.mark.parametrize("env, peer, message", [
    (dict(DATA_PATH=None), "fake", f"{NO_SHARDS} (DATA_PATH='')"),
    (dict(DATA_PATH="{tmp}"), "fake", f"{NO_SHARDS} (DATA_PATH='{{tmp}}')"),
    (dict(TOKENIZER_PATH=None), "fake", "--peer needs TOKENIZER_PATH, the shards' SentencePiece model (TOKENIZER_PATH='')"),
    ({}, "{tmp}/missing.py", "--peer {tmp}/missing.py: no such file"),
    (dict(RANK="0", WORLD_SIZE="1"), "fake", "--peer runs without torchrun: launch the bench with python"),
    (dict(GRAD_ACCUM_STEPS="4"), "fake",
     "--peer: train_gpt.py runs 8 micro-batches a step, GRAD_ACCUM_STEPS=4 would time another step"),
])
def test_peer_refusals_come_before_any_work(peer_data, tmp_path, capsys, monkeypatch, env, peer, message):
    for k, v in env.items():
        if v is None:
            monkeypatch.delenv(k)
        else:
            monkeypatch.setenv(k, v.format(tmp=tmp_path))
    path = str(fake_peer(tmp_path)) if peer == "fake" else peer.format(tmp=tmp_path)
    with pytest.raises(SystemExit) as e:
        bench_step.main(["--modes", "dense", "--json", str(tmp_path / "x.json"), "--peer", path])
    assert e.value.code == 1
    assert capsys.readouterr().err == f"error: {message.format(tmp=tmp_path)}\n"
    assert not (tmp_path / "x.json").exists() and not (tmp_path / "seen.json").exists()


# A stand-in that steps two optimizers per step, as train_gpt.py does, and marks the validation it reaches after its last.
OPTIMIZING_PEER = '''import os, pathlib, sys, torch
w = torch.nn.Parameter(torch.ones(4, 4))
first, second = torch.optim.SGD([w], lr=0.1), torch.optim.Adam([w], lr=0.1)
for step in range(1, int(os.environ["ITERATIONS"]) + 1):
    (w @ w).sum().backward()
    first.step(), second.step()
    print(f"step:{{step}}")
pathlib.Path({marker!r}).write_text("validated")
'''


@pytest.mark.parametrize("iterations_short", [False, True])
def test_the_peer_profile_holds_two_of_its_steps_and_stops_it_before_validation(tmp_path, iterations_short, monkeypatch):
    marker, path = tmp_path / "validated", tmp_path / "train_gpt.py"
    path.write_text(OPTIMIZING_PEER.format(marker=str(marker)))
    out = tmp_path / "prof" / "profile_peer.txt"
    if iterations_short:  # a peer that ends before its profiled steps (here: one that ignores ITERATIONS and runs 2)
        path.write_text(OPTIMIZING_PEER.format(marker=str(marker)).replace('int(os.environ["ITERATIONS"])', "2"))
        with pytest.raises(bench_step.PeerError, match="under the profiler exited with status 0 and no kernel table; "
                                                        "its output ends: step:1 | step:2"):
            bench_step.profile_peer(str(path), dict(os.environ), skip=2, out=out)
        assert not out.exists()
        return
    bench_step.profile_peer(str(path), dict(os.environ), skip=2, out=out)
    assert not marker.exists()  # stopped once its table was written
    table = out.read_text()
    # Two steps profiled, a step counted by the first optimizer's steps: each op ran twice, SGD's and Adam's once each.
    rows = {line.split()[0]: line for line in table.splitlines() if line.strip().startswith(("aten::mm", "Optimizer.step#"))}
    assert rows["aten::mm"].split()[-1] == "6"  # w @ w forward, and two matmuls in its backward, per step
    assert rows["Optimizer.step#SGD.step"].split()[-1] == "2" and rows["Optimizer.step#Adam.step"].split()[-1] == "2"
    assert json.loads((tmp_path / "prof" / "kernels_peer.json").read_text()) == {}  # no device kernels on a CPU


def test_a_modes_profile_files_are_named_without_its_colon_and_at_sign(tmp_path):
    """The device tool (and some file systems) refuse '@' in names; the family table reads the same names back."""
    bench_step.profile("sparse:sigmoid@torch", lambda: torch.ones(8).sum(), torch.device("cpu"), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kernels_sparse_sigmoid_torch.json", "profile_sparse_sigmoid_torch.txt"]
    assert bench_step.file_label("default@quack") == "default_quack"


def test_kernel_families_sum_each_profiled_rows_kernels_once():
    profiles = {"dense": {"nvjet_tst_128x256_h_bz_coopA": 10.0, "triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0": 2.0,
                          "flash_fwd_kernel": 3.0, "triton_poi_fused_mul_0": 0.5, "at::native::vectorized_elementwise_kernel": 0.25,
                          "void multi_tensor_apply_kernel<foreach_lerp>": 1.0, "Memcpy DtoD": 0.125, "mystery": 1.0,
                          "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26_64x64x64": 4.0,
                          "_ZN7cutlass13device_kernelIN2at4cuda6GemmUniversalINS5_17GroupProblemShapeIN4cute": 6.0,
                          "kernel_cutlass_kernel_quackgemm_default_epiGemmDefaultSm90_object_at__TiledMMA": 2.0},
                "peer": {"sm90_xmma_gemm_bf16": 9.0}}
    table = bench_step.family_table(profiles, {"dense": 31.0, "peer": 9.5}).splitlines()
    lines = {line.split()[0]: line.split()[1:] for line in table[1:]}
    assert lines["matmul"] == ["10.00", "9.00"] and lines["attention"] == ["7.00", "0.00"] and lines["norm"] == ["2.00", "0.00"]
    assert lines["grouped"] == ["8.00", "0.00"] and lines["optimizer"] == ["1.00", "0.00"] and lines["copy"] == ["0.12", "0.00"]
    assert lines["elementwise"] == ["0.75", "0.00"] and lines["other"] == ["1.00", "0.00"]
    assert lines["total"] == ["29.88", "9.00"]  # each kernel in one family only
    assert table[-2].split()[2:] == ["31.00", "9.50"] and table[-1].split()[2:] == ["1.12", "0.50"]  # timed step, GPU idle


def test_kernel_times_leave_out_annotations_and_host_events():
    """An annotation's GPU range (ProfilerStep*, Optimizer.step#...) spans kernels counted on their own."""
    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    events = [SimpleNamespace(name=n, device_type=d, is_user_annotation=a, self_device_time_total=us) for n, d, a, us in [
        ("nvjet_a", cuda, False, 3000.0), ("nvjet_a", cuda, False, 1000.0), ("ProfilerStep#2", cuda, True, 9000.0),
        ("Optimizer.step#Muon.step", cuda, True, 500.0), ("aten::mm", cpu, False, 4000.0), ("idle", cuda, False, 0.0)]]
    assert bench_step.kernel_times(SimpleNamespace(events=lambda: events)) == {"nvjet_a": 2.0}
