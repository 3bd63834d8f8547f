"""Router-collapse telemetry of train_moe.py: the statistics, their accumulation, the alert, and whole runs."""
import json
import math

import pytest
import torch

import train_moe as tm
from conftest import ONE_MICRO_BATCH, run_trainer, tiny_env
from test_moe import SMALL


def test_stats_of_a_uniform_routing():
    s = tm.router_stats([25.0] * 4, [10.0] * 4, [4 * math.log(4) * 10, 40.0, 0.3, 0.1, 2.0], None)
    assert s["load"] == [0.25] * 4 and s["importance"] == [0.25] * 4
    assert s["load_entropy"] == pytest.approx(1.0) and s["token_entropy"] == pytest.approx(math.log(4))  # normalized
    assert (s["max_over_mean"], s["min_over_mean"], s["maxvio"], s["dead"]) == (1.0, 1.0, 0.0, 0)
    assert s["aux"] == pytest.approx(0.15) and s["z"] == pytest.approx(0.05)  # per forward call
    assert s["bias_min"] is None


def test_stats_of_a_collapsed_routing():
    s = tm.router_stats([100.0, 0.0, 0.0, 0.0], [97.0, 1.0, 1.0, 1.0], [0.5, 100.0, 0.0, 0.0, 1.0], [0.5, -0.1, 0.0, 0.2])
    assert s["load"] == [1.0, 0.0, 0.0, 0.0] and s["importance"] == [0.97, 0.01, 0.01, 0.01]
    assert s["load_entropy"] == 0.0 and s["token_entropy"] == pytest.approx(0.005)
    assert (s["max_over_mean"], s["min_over_mean"], s["maxvio"], s["dead"]) == (4.0, 0.0, 3.0, 3)
    assert (s["bias_min"], s["bias_max"]) == (-0.1, 0.5)


def test_stats_with_one_dead_expert_and_hash_routing():
    s = tm.router_stats([30.0, 30.0, 40.0, 0.0], [0.0] * 4, [0.0, 50.0, 0.0, 0.0, 1.0], None)
    want_entropy = -(2 * 0.3 * math.log(0.3) + 0.4 * math.log(0.4))
    assert s["load_entropy"] == pytest.approx(want_entropy / math.log(4))
    assert s["dead"] == 1 and s["min_over_mean"] == 0.0 and s["max_over_mean"] == pytest.approx(1.6)
    assert s["importance"] is None and s["token_entropy"] is None  # hash routing has no probabilities


class FakeLog:
    def __init__(self):
        self.events = []

    def record(self, event, **values):
        self.events.append((event, values))

    metrics = record


def test_telemetry_sums_steps_on_device_and_reports_each_layer():
    cfg = tm.Hyperparameters({**SMALL, "MLP_MODE": "sparse", "MOE_LAYERS": "1"})
    model = tm.GPT(cfg)
    telemetry = tm.RouterTelemetry(model, threshold=0.1, patience=0)
    mlp = model.blocks[1].mlp
    loads = []
    for seed in range(2):
        mlp.reset_routing()
        ids = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(seed))
        model(ids[:, :-1], ids[:, 1:])
        loads.append(mlp.expert_load.clone())
        telemetry.accumulate()
    log = FakeLog()
    telemetry.report(log, step=2)
    (router,) = [v for e, v in log.events if e == "router"]
    total = loads[0] + loads[1]
    assert router["layer"] == 1 and router["step"] == 2
    assert router["load"] == pytest.approx((total / total.sum()).tolist())
    assert sum(router["importance"]) == pytest.approx(1.0)
    assert 0 < router["token_entropy"] <= math.log(4) + 1e-6
    assert all(w.abs().sum() == 0 for w in telemetry.window)  # the window restarts after a report


def alerts_for(windows: list, patience: int, steps: list) -> list:
    cfg = tm.Hyperparameters({**SMALL, "MLP_MODE": "sparse"})
    telemetry = tm.RouterTelemetry(tm.GPT(cfg), threshold=0.1, patience=patience)
    log = FakeLog()
    for step, window in zip(steps, windows):
        for w in telemetry.window:
            w.copy_(window)
        telemetry.report(log, step)
    return [(v["step"], v["layer"], v["below_since"]) for e, v in log.events if e == "router_alert"]


COLLAPSED = torch.tensor([64.0, 0.0, 0.0, 64.0] + [0.0] * 9)
BALANCED = torch.tensor([32.0] * 4 + [0.0] * 9)


def test_alert_once_per_episode():
    windows = [COLLAPSED, COLLAPSED, BALANCED, COLLAPSED]
    assert alerts_for(windows, 0, [1, 2, 3, 4]) == [(1, 0, 0), (1, 1, 0), (4, 0, 3), (4, 1, 3)]


def test_alert_waits_for_the_collapse_to_persist():
    # Reports every 10 steps: an episode counts from the start of its first collapsed window.
    windows = [COLLAPSED, COLLAPSED, BALANCED, COLLAPSED, COLLAPSED, COLLAPSED]
    steps = [10, 20, 30, 40, 50, 60]
    assert alerts_for(windows, 20, steps) == [(20, 0, 0), (20, 1, 0), (50, 0, 30), (50, 1, 30)]
    assert alerts_for(windows, 30, steps) == [(60, 0, 30), (60, 1, 30)]
    assert alerts_for(windows, 30, steps[:5]) == []  # neither episode lasted 30 steps


PATIENCE = 5
ITERATIONS = 20  # the collapse comes by step 9 and lasts: reports at steps 1 to 10 and 20


@pytest.fixture(scope="module")
def balancing_runs(tiny_data, tmp_path_factory):
    """The same sigmoid-routed model with a router LR high enough to collapse: balancing off, then hash routing."""
    cwd = tmp_path_factory.mktemp("balancing")
    common = dict(MLP_MODE="sparse", NUM_EXPERTS=8, ITERATIONS=ITERATIONS, TRAIN_LOG_EVERY=10, ROUTER_LR=0.3, EMA_DECAY=0,
                  ROUTER_ALERT_PATIENCE=PATIENCE, **ONE_MICRO_BATCH)
    runs = {"off": dict(ROUTER="sigmoid", ROUTER_BIAS_RATE=0), "hash": dict(ROUTER="hash")}
    events = {}
    for name, overrides in runs.items():
        result = run_trainer(cwd, tiny_env(tiny_data, RUN_ID=name, **common, **overrides))
        assert result.returncode == 0, result.stderr[-3000:]
        events[name] = [json.loads(line) for line in (cwd / "logs" / f"{name}.jsonl").read_text().splitlines()]
    return events


def test_alert_fires_in_a_collapsing_run_and_not_in_a_balanced_one(balancing_runs):
    alerts = [(e["step"], e["layer"]) for e in balancing_runs["off"] if e["event"] == "router_alert"]
    # One alert per episode, at the first report once a layer has been under the threshold for PATIENCE steps.
    since, alerted, expected, last_step, this_step = {}, set(), [], 0, 0
    for e in balancing_runs["off"]:
        if e["event"] != "router":
            continue
        layer, step = e["layer"], e["step"]
        if step != this_step:
            last_step, this_step = this_step, step
        if e["min_over_mean"] >= 0.1:
            since.pop(layer, None), alerted.discard(layer)
        elif step - since.setdefault(layer, last_step) >= PATIENCE and layer not in alerted:
            alerted.add(layer), expected.append((step, layer))
    assert alerts == expected and alerted  # and the run ends collapsed
    assert not [e for e in balancing_runs["hash"] if e["event"] == "router_alert"]
    last = {e["layer"]: e for e in balancing_runs["hash"] if e["event"] == "router"}
    assert all(e["min_over_mean"] > 0.5 and e["step"] == ITERATIONS for e in last.values())
