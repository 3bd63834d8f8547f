"""The wallclock as a hard wall: training plus calibration never past MAX_WALLCLOCK_SECONDS, with calibration's time
measured (rehearsed before the clock starts), not reserved by a constant."""
import copy
import json
import math
import time

import pytest
import torch

import train_moe as tm
from conftest import ONE_MICRO_BATCH, run_trainer, tiny_env
from test_export import Metrics
from test_moe import randomize


def events(run_dir, run_id):
    return [json.loads(line) for line in (run_dir / "logs" / f"{run_id}.jsonl").read_text().splitlines()]


def only(evs, name):
    found = [e for e in evs if e["event"] == name]
    assert len(found) == 1, (name, found)
    return found[0]


def test_calibration_cost_sums_phases_and_plans_whole_sequences():
    fit, gptq = tm.CalibrationCost(1.0, 1e-4), tm.CalibrationCost(2.0, 2e-4)
    total = tm.CalibrationCost.total([fit, gptq])
    assert total == (3.0, pytest.approx(3e-4), ())
    extra = tm.CALIBRATION_MARGIN
    assert total.seconds(1000) == pytest.approx(3.3 + extra)
    # Everything fits: all the tokens asked for, even when they are not whole sequences.
    assert total.tokens_within(100.0, 1000, 64) == 1000
    # 2 s of tokens fit after the fixed 3 s and the margin: 6666 tokens, cut to whole sequences of 64.
    assert total.tokens_within(5.0 + extra, 10_000, 64) == 6656
    assert total.tokens_within(3.0 + extra, 10_000, 64) == 0  # the fixed part alone fills it
    assert total.tokens_within(1.0, 10_000, 64) == 0
    assert tm.CalibrationCost.total([]) == (0.0, 0.0, ())


def test_each_stage_plans_by_its_rehearsed_share():
    """The stages after this one keep their rehearsed shares of the time: with the last stage rehearsed at 80%, a stage
    gets the tokens that fit its share and theirs, fewer than equal shares would give; a share list of another model's
    length falls back to equal shares."""
    margin = tm.CALIBRATION_MARGIN
    weighted = tm.StageSchedule(tm.CalibrationCost(1.0, 1e-3, (0.1, 0.1, 0.8)), 10.0 + margin, [])
    assert weighted.tokens(0, 3, now=0.0) == pytest.approx((10.0 / 1.0 - 1.0) / 1e-3)  # 9,000
    assert weighted.tokens(2, 3, now=0.0) == pytest.approx((10.0 / 0.8 - 1.0) / 1e-3)  # 11,500
    equal = tm.StageSchedule(tm.CalibrationCost(1.0, 1e-3), 10.0 + margin, [])
    assert equal.tokens(2, 3, now=0.0) == pytest.approx((10.0 * 3 - 1.0) / 1e-3)  # 29,000
    other = tm.StageSchedule(tm.CalibrationCost(1.0, 1e-3, (0.5, 0.5)), 10.0 + margin, [])
    assert other.tokens(2, 3, now=0.0) == pytest.approx(equal.tokens(2, 3, now=0.0))
    assert weighted.tokens(0, 3, now=10.0) < 0  # only the margin left: no sequence, the stage rounds


def test_the_rehearsal_times_every_gptq_stage(tiny_data):
    cfg = tm.Hyperparameters(tiny_env(tiny_data, QUANT_METHOD="gptq", QUANT_FIT=0, CALIBRATION_TOKENS=512))
    torch.manual_seed(0)
    model = tm.GPT(cfg)
    cold, warm = tm.rehearse_calibration(model, cfg, torch.device("cpu"))
    assert cold.keys() == warm.keys() == {"gptq"}
    shares = warm["gptq"].stages
    assert len(shares) == len(tm.calibration_stages(model)) > 1
    assert sum(shares) == pytest.approx(1.0) and min(shares) > 0


def test_the_fit_scores_its_share_of_the_calibration_sequences(tiny_data, monkeypatch):
    """QUANT_FIT_SHARE=0.25 of 16 calibration sequences: the fit scores on the first 4, in the rehearsal and in the
    export, and its rehearsed passes count per calibration token, so that a cut plans the fit's time right."""
    cfg = tm.Hyperparameters(tiny_env(tiny_data, QUANT_METHOD="rtn", QUANT_FIT=1, CALIBRATION_TOKENS=16 * 64,
                                      QUANT_FIT_SHARE=0.25))
    assert cfg.train_seq_len == 64 and tm.Hyperparameters({}).quant_fit_share == 0.25
    scored, fit_options = [], tm.fit_options

    def passes_of_20_ms(model, cfg, batches):  # three passes over the batches, 20 ms each
        scored.append([tuple(x.shape) for x, _ in batches])
        for _ in range(3):
            for _ in batches:
                time.sleep(0.02)
        return {}

    monkeypatch.setattr(tm, "fit_options", passes_of_20_ms)
    torch.manual_seed(0)
    model = tm.GPT(cfg)
    cold, warm = tm.rehearse_calibration(model, cfg, torch.device("cpu"))
    assert scored == [[(4, 64)], [(4, 64)]]
    # 60 ms of passes over 256 tokens: 60 ms per 1,024 calibration tokens (unscaled it would be 240 ms).
    assert 0.06 <= warm["fit"].predicted(1024) - warm["fit"].fixed < 0.1
    monkeypatch.setattr(tm, "fit_options", lambda model, cfg, batches: scored.append([tuple(x.shape) for x, _ in batches])
                        or fit_options(model, cfg, batches))
    tm.export_artifact(model, cfg, tm.DistributedTokenLoader(cfg, torch.device("cpu")), 1000, Metrics(), {}, math.inf)
    assert scored[-1] == [(4, 64)]
    two_batches = [(torch.zeros(8, 64), torch.zeros(8, 64))] * 2
    assert [[len(x) for x, _ in tm.fit_sequences(two_batches, share)] for share in (1.0, 0.5, 0.3, 0.01)] == [
        [8, 8], [8], [5], [1]]


# 512 calibration tokens (QUANT_FIT scores 21 roundings of the model on them) keep calibration to seconds on 2 cores:
# rehearsed at 0.3 to 0.6 s with its margin, so a 3 s cap leaves the loop 2.4 s or more: 20 to 50 one-micro-batch steps.
CAP_S = 3
@pytest.mark.parametrize("overrides", [
    dict(QUANT_METHOD="gptq", CALIBRATION_TOKENS=512),  # dense
    dict(QUANT_METHOD="gptq", CALIBRATION_TOKENS=512, MLP_MODE="sparse", MOE_LAYERS="1", NUM_EXPERTS=4, EXPERT_HIDDEN=64),
    dict(QUANT_METHOD="rtn", QUANT_FIT=1, CALIBRATION_TOKENS=512, MLP_MODE="sparse", MOE_LAYERS="1", NUM_EXPERTS=4,
         EXPERT_HIDDEN=64),
], ids=["dense_gptq", "sparse_gptq", "sparse_quant_fit"])
def test_a_tiny_cap_holds_training_plus_calibration(tiny_data, tmp_path, overrides):
    cap_ms = 1000 * CAP_S
    env = tiny_env(tiny_data, RUN_ID="wall", ITERATIONS=10**6, MAX_WALLCLOCK_SECONDS=CAP_S, TRAIN_LOG_EVERY=1000,
                   **overrides, **ONE_MICRO_BATCH)
    result = run_trainer(tmp_path, env)
    assert result.returncode == 0, result.stderr[-3000:]
    evs = events(tmp_path, "wall")
    done, rehearsal, exported = only(evs, "train_done"), only(evs, "calibration_rehearsal"), only(evs, "export_bits")
    assert done["stopped_by"] == "wallclock"
    assert done["train_time_ms"] <= cap_ms and done["cap_slack_ms"] == cap_ms - done["train_time_ms"]
    assert done["calibration_ms"] == exported["calibration_ms"] > 0
    # The reserve is the rehearsed prediction with its margin.
    phases = [k for k in rehearsal if k.endswith(("_fixed_s", "_tokens_s"))]
    assert sorted(phases) == sorted(f"{p}_{part}_s" for p in (["fit"] if overrides.get("QUANT_FIT") else [])
                                    + (["gptq"] if overrides["QUANT_METHOD"] == "gptq" else []) for part in ("fixed", "tokens"))
    predicted_s = sum(rehearsal[k] for k in phases)
    assert exported["predicted_ms"] == round(1000 * predicted_s)
    assert rehearsal["reserve_ms"] == round(1000 * (predicted_s + tm.CALIBRATION_MARGIN))
    assert rehearsal["cold_s"] > 0  # the first rehearsal, which pays the first calls, logged beside the prediction
    if overrides["QUANT_METHOD"] == "gptq":  # each stage's share of GPTQ's rehearsed time, which its plan follows
        assert len(rehearsal["gptq_stage_shares"]) > 1 and sum(rehearsal["gptq_stage_shares"]) == pytest.approx(1.0)
    else:
        assert "gptq_stage_shares" not in rehearsal


def test_under_torchrun_every_rank_stops_on_the_same_step(tiny_data, tmp_path):
    """Rank 0 rehearses and every rank gets its figures; the stop is all-reduced: were the ranks to stop apart, the next
    collective would hang (run_trainer's timeout)."""
    env = tiny_env(tiny_data, RUN_ID="wall2", ITERATIONS=10**6, MAX_WALLCLOCK_SECONDS=CAP_S, TRAIN_LOG_EVERY=1000,
                   QUANT_METHOD="gptq", CALIBRATION_TOKENS=512, **ONE_MICRO_BATCH)
    result = run_trainer(tmp_path, env, nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    done = only(events(tmp_path, "wall2"), "train_done")
    assert done["stopped_by"] == "wallclock" and done["train_time_ms"] <= 1000 * CAP_S


def test_a_cap_that_calibration_alone_fills_is_a_config_error(tiny_data, tmp_path):
    env = tiny_env(tiny_data, RUN_ID="nowall", ITERATIONS=10**6, MAX_WALLCLOCK_SECONDS=0.2, QUANT_METHOD="gptq",
                   CALIBRATION_TOKENS=4096)
    result = run_trainer(tmp_path, env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("config_error: MAX_WALLCLOCK_SECONDS=0.2: calibration on CALIBRATION_TOKENS=4096")
    assert not list((tmp_path / "artifacts").glob("*")) if (tmp_path / "artifacts").exists() else True


@pytest.mark.parametrize("seconds,tokens", [(1.4, 1088), (0.2, 0)])
def test_a_slow_calibration_is_cut_short_and_logged(tiny_data, monkeypatch, seconds, tokens):
    """Calibration rehearsed at 1 ms a token (4096 tokens: 4 s) with `seconds` left: it runs on the whole sequences that
    fit after the margin, and with none it rounds to nearest at QUANT_*_BITS."""
    cfg = tm.Hyperparameters(tiny_env(tiny_data, QUANT_METHOD="gptq", CALIBRATION_TOKENS=4096))
    torch.manual_seed(0)
    model = tm.GPT(cfg)
    randomize(model)
    seen = []
    calibrate = tm.calibrated_levels
    monkeypatch.setattr(tm, "calibrated_levels", lambda m, c, batches, bits, schedule: seen.append(
        sum(x.numel() for x, _ in batches)) or calibrate(m, c, batches, bits, schedule))
    log = Metrics()
    costs = {"gptq": tm.CalibrationCost(0.0, 1e-3)}
    bits, blob, calibration_seconds, _ = tm.export_artifact(model, cfg, tm.DistributedTokenLoader(cfg, torch.device("cpu")),
                                                            1000, log, costs, seconds)
    cut = [v for e, v in log.lines if e == "calibration_cut" and v["phases"] == "fit+gptq"]  # the plan, not the stages
    assert len(cut) == 1 and cut[0]["tokens"] == tokens and cut[0]["wanted"] == 4096
    assert cut[0]["method"] == ("gptq" if tokens else "rtn")
    assert seen == ([tokens] if tokens else [])
    if not tokens:  # exactly the rounded levels of the QUANT_*_BITS
        rounded = tm.rounded_levels(model.state_dict(), bits, cfg.quant_clip_sigmas)
        state = tm.read_artifact(blob)[1]
        for name, (_, q, scale) in rounded.items():
            assert torch.equal(state[name], tm.dequantize(q, scale, state[name].shape))
        assert bits == {"embed": 8, "attn": 8, "mlp": 6, "experts": 6}


def test_a_stage_behind_schedule_calibrates_on_fewer_sequences_or_rounds(tiny_data):
    """A deadline already past leaves every stage rounding to
    nearest (exactly the rounded levels); a schedule with room for all cuts none."""
    cfg = tm.Hyperparameters(tiny_env(tiny_data, QUANT_METHOD="gptq", CALIBRATION_TOKENS=1024))
    torch.manual_seed(0)
    model = tm.GPT(cfg)
    randomize(model)
    batches = tm.calibration_batches(cfg, tm.DistributedTokenLoader(cfg, torch.device("cpu")), 1024)
    bits = {"embed": 8, "attn": 6, "mlp": 5, "experts": 5}
    stages = len(tm.calibration_stages(model))
    late = tm.StageSchedule(tm.CalibrationCost(1.0, 1e-3), 0.0, [])
    levels = tm.calibrated_levels(copy.deepcopy(model), cfg, batches, bits, late)
    assert late.cut == [(s, 0) for s in range(stages)]
    for name, (b, q, scale) in tm.rounded_levels(model.state_dict(), bits, cfg.quant_clip_sigmas).items():
        assert torch.equal(levels[name][1], q) and torch.equal(levels[name][2], scale)
    on_time = tm.StageSchedule(tm.CalibrationCost(0.0, 1e-9), math.inf, [])
    calibrated = tm.calibrated_levels(copy.deepcopy(model), cfg, batches, bits, on_time)
    assert on_time.cut == []
    assert any(not torch.equal(calibrated[n][1], levels[n][1]) for n in levels)  # GPTQ moved some levels
