"""scripts/bench_experts.py on the CPU, with tests/quack_stand_in.py as QuACK: its rows, the skew it draws, the
weight-gradient check that catches a wrong cut, its totals and a bad skew."""
import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "tests"))

import bench_experts  # noqa: E402
import quack_stand_in  # noqa: E402

ARGS = ["--tokens", "4096", "--dim", "32", "--experts", "8", "--hidden", "16", "--iters", "1", "--chunks", "0", "8"]


@pytest.fixture
def stand_in(monkeypatch):
    monkeypatch.setattr(bench_experts, "quack", quack_stand_in)


@pytest.mark.parametrize("busiest", [1.0, 2.5, 4.0])
def test_routing_gives_the_busiest_expert_its_share(busiest):
    idx = bench_experts.routed(20000, 8, busiest, torch.Generator().manual_seed(0))
    counts = torch.bincount(idx.flatten(), minlength=8).float()
    assert (idx[:, 0] != idx[:, 1]).all()
    assert counts[0] / counts.mean() == pytest.approx(busiest, rel=0.05)
    assert counts[1:].max() / counts[1:].min() < 1.15  # the others even


def test_rows_errors_and_totals(stand_in, tmp_path, capsys):
    out = tmp_path / "experts.json"
    bench_experts.main(ARGS + ["--skews", "1", "3", "--json", str(out)])
    result = json.loads(out.read_text())
    rows, totals = result["rows"], result["totals"]
    assert [r["gemm"] for r in rows if r["path"] == "dense"] == [
        "fc forward", "proj forward", "proj input grad", "proj weight grad", "fc input grad", "fc weight grad"]
    for busiest in (1, 3):
        at = [r for r in rows if r["path"] != "dense" and round(r["busiest"]) == busiest]
        assert len([r for r in at if r["path"] == "torch"]) == 2 + 2  # two GEMMs, one cut weight grad per chunk count
        assert len([r for r in at if r["path"] == "quack"]) == 4 + 3 * 2
    checked = [r["error"] for r in rows if r.get("error") is not None]
    assert len(checked) == 2 * (2 + 2 * 2) and max(checked) < 1e-5  # fp32: the cuts sum to the uncut product
    assert [(round(t["busiest"]), t["chunks"]) for t in totals] == [(1, 0), (1, 8), (3, 0), (3, 8)]
    dense = sum(r["ms"] for r in rows if r["path"] == "dense")
    for t in totals:
        cut = [r for r in rows if r["path"] == "quack" and r["busiest"] == t["busiest"]
               and r["chunks"] in (None, t["chunks"])]
        summed = sum(r["ms"] for r in cut) + next(r["ms"] for r in cut if r["gemm"].startswith("per-expert"))
        assert t["ms"] == pytest.approx(summed) and t["vs_dense"] == pytest.approx(summed / dense)
    printed = capsys.readouterr().out
    for t in totals:
        assert f"QuACK layer at busiest {t['busiest']:.2f}, chunks {t['chunks']}: {t['ms']:.3f} ms" in printed


def test_a_cut_summed_into_the_wrong_expert_shows_as_an_error(stand_in, monkeypatch, tmp_path):
    groups = bench_experts.train_moe.expert_groups

    def shifted(counts, chunks):
        offsets, cuts, cut_expert = groups(counts, chunks)
        return offsets, cuts, (cut_expert + 1) % len(counts)

    monkeypatch.setattr(bench_experts.train_moe, "expert_groups", shifted)
    out = tmp_path / "experts.json"
    bench_experts.main(ARGS + ["--skews", "1", "--json", str(out)])
    errors = [r["error"] for r in json.loads(out.read_text())["rows"] if r.get("error") is not None]
    assert len(errors) == 6 and min(errors) > 0.1


def test_without_quack_only_torch_and_dense_rows(monkeypatch, tmp_path):
    monkeypatch.setattr(bench_experts, "quack", None)
    out = tmp_path / "experts.json"
    bench_experts.main(ARGS + ["--skews", "2", "--json", str(out)])
    result = json.loads(out.read_text())
    assert {r["path"] for r in result["rows"]} == {"dense", "torch"} and result["totals"] == []


@pytest.mark.parametrize("busiest", ["5", "0.8"])  # 8 experts, top-2: 1 to 4 times a fair share
def test_a_skew_top_2_cannot_reach_is_refused(busiest, capsys):
    with pytest.raises(SystemExit) as e:
        bench_experts.main(ARGS + ["--skews", busiest])
    assert e.value.code == 2
    assert f"busiest={float(busiest)}: top-2 over 8 experts allows 1 to 4.0 times a fair share" in capsys.readouterr().err
