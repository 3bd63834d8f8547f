"""scripts/bench_step.py on the CPU: the rows it measures, its table and JSON, its recompile count, bad modes."""
import json
import sys
from pathlib import Path

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


def test_mode_names_pick_the_mlp_and_the_router_or_the_trainers_default():
    assert bench_step.mode_env({"NUM_EXPERTS": "4"}, "shared_routed:sigmoid") == {
        "MOE_LAYERS": "all", "EXPERT_HIDDEN": "0", "NUM_EXPERTS": "4", "MLP_MODE": "shared_routed", "ROUTER": "sigmoid"}
    assert bench_step.mode_env({"MOE_LAYERS": "0"}, "sparse") == {"MOE_LAYERS": "0", "EXPERT_HIDDEN": "0", "MLP_MODE": "sparse"}
    import train_moe

    assert bench_step.mode_env({"NUM_EXPERTS": "4"}, "default") == {"NUM_EXPERTS": "4"}
    default = train_moe.Hyperparameters(bench_step.mode_env({}, "default"))
    assert (default.mlp_mode, default.moe_layers, default.expert_hidden, default.num_experts) == ("sparse", (1, 3, 5, 7), 256, 16)


def test_recompile_counter_counts_real_recompiles():
    counter = bench_step.watch_recompiles()
    torch._dynamo.reset()
    fn = torch.compile(lambda x: x * 2 + 1, dynamic=False)
    fn(torch.ones(3))
    fn(torch.ones(3))
    assert counter.count == 0
    fn(torch.ones(5))  # a new static shape: one recompile
    assert counter.count == 1


def test_bad_mode_is_refused_before_anything_runs(shape_env, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        bench_step.main(["--modes", "dense", "sparse:bogus", "--json", str(tmp_path / "x.json")])
    assert e.value.code == 2
    assert "sparse:bogus" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
