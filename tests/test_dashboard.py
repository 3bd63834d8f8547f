"""Tests for scripts/router_dashboard.py on synthetic logs: parsing, self-contained HTML, PNGs, CLI errors, browser render."""
import base64
import importlib.util
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")
import matplotlib.image as mpimg  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "router_dashboard.py"
spec = importlib.util.spec_from_file_location("router_dashboard", SCRIPT)
rd = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rd)

E, LAYERS, STEPS = 4, (1, 3), list(range(100, 1001, 100))
COLLAPSE_STEP = 500


def _router(step, layer, load, hash_router=False):
    load = [float(x) for x in load]
    ent = -sum(p * math.log(p) for p in load if p > 0)
    mean = 1.0 / len(load)
    return {"event": "router", "step": step, "layer": layer, "load": load,
            "importance": None if hash_router else load, "load_entropy": ent,
            "token_entropy": None if hash_router else 0.8 * ent, "max_over_mean": max(load) / mean,
            "min_over_mean": min(load) / mean, "maxvio": max(load) / mean - 1, "dead": sum(p == 0 for p in load),
            "aux": 1.0, "z": 0.1, "bias_min": None, "bias_max": None, "unknown_key": [1, 2]}


def _common(step, loss):
    recs = [{"event": "train", "step": step, "train_loss": loss, "tokens_per_s": 1000}]
    if step % 500 == 0:
        recs.append({"event": "val", "step": step, "val_loss": loss - 0.1, "val_bpb": (loss - 0.1) / 1.7})
    return recs


def balanced_load(step, layer):
    rng = np.random.default_rng(step * 10 + layer)
    x = 1.0 + 0.05 * rng.standard_normal(E)
    return x / x.sum()


def collapsed_load(step, layer):
    if layer == 3 and step >= COLLAPSE_STEP:
        return [1.0, 0.0, 0.0, 0.0]
    return balanced_load(step, layer)


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def logs(tmp_path):
    bal, col, dense = [{"event": "model", "params": 123456}], [{"event": "model", "params": 123456}], []
    for step in STEPS:
        loss = 4.0 - step / 1000
        bal += _common(step, loss)
        col += _common(step, loss + 0.3)
        dense += _common(step, loss + 0.1)
        for layer in LAYERS:
            bal.append(_router(step, layer, balanced_load(step, layer)))
            col.append(_router(step, layer, collapsed_load(step, layer)))
        if step == COLLAPSE_STEP:
            col.append({"event": "router_alert", "step": step, "layer": 3, "min_over_mean": 0.0, "dead": 3,
                        "max_over_mean": 4.0})
    bal += [{"event": "final_roundtrip", "val_bpb": 1.77, "val_loss": 3.0}, {"event": "something_new", "x": 1}]
    return {"balanced": _write(tmp_path / "balanced.jsonl", bal),
            "collapsed": _write(tmp_path / "collapsed.jsonl", col),
            "dense": _write(tmp_path / "dense.jsonl", dense)}


def test_load_run_values(logs):
    run = rd.load_run(logs["collapsed"])
    assert run["name"] == "collapsed"
    assert sorted(run["layers"]) == list(LAYERS)
    for layer in LAYERS:
        d = run["layers"][layer]
        assert d["steps"].tolist() == STEPS and d["experts"] == E
        expected = np.array([collapsed_load(s, layer) for s in STEPS])
        np.testing.assert_allclose(d["load"], expected)  # heatmap matrix = logged loads (steps x experts)
    d3 = run["layers"][3]
    assert d3["dead"].tolist() == [0] * 4 + [3] * 6
    np.testing.assert_allclose(d3["load_entropy"][STEPS.index(COLLAPSE_STEP):], 0.0)
    assert run["alerts"] == [{"step": 500, "layer": 3, "min_over_mean": 0.0, "dead": 3, "max_over_mean": 4.0}]
    assert run["train"][:, 0].tolist() == STEPS
    np.testing.assert_allclose(run["train"][:, 1], [4.3 - s / 1000 for s in STEPS])
    assert run["val"][:, 0].tolist() == [500, 1000]
    np.testing.assert_allclose(run["val"][:, 1], [(4.2 - 0.5) / 1.7, (4.2 - 1.0) / 1.7])

    dense = rd.load_run(logs["dense"])
    assert dense["layers"] == {} and dense["alerts"] == [] and len(dense["train"]) == len(STEPS)
    assert rd.load_run(logs["balanced"])["final_roundtrip"]["val_bpb"] == 1.77


def test_hash_router_nulls(tmp_path):
    recs = [_router(s, 0, [0.25] * 4, hash_router=True) for s in (10, 20)]
    run = rd.load_run(_write(tmp_path / "hash.jsonl", recs))
    assert np.isnan(run["layers"][0]["token_entropy"]).all()
    assert len(rd.build_dashboard([run], tmp_path / "h.html")) == 3


def _check_png(path, min_w=300, min_h=200):
    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = mpimg.imread(path)
    assert img.shape[0] >= min_h and img.shape[1] >= min_w
    assert img[..., :3].std() > 0.02  # not a blank canvas
    return img


def test_dashboard_html_and_pngs(logs, tmp_path):
    runs = [rd.load_run(logs[k]) for k in ("balanced", "collapsed", "dense")]
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "dash.html"
    pngs = rd.build_dashboard(runs, out, tmp_path / "pngs")
    # compare figure + (heatmaps, router curves) for each of the two sparse runs; none for the dense run
    assert len(pngs) == 5 and all(p.parent == tmp_path / "pngs" for p in pngs)
    for p in pngs:
        _check_png(p)
    assert mpimg.imread(pngs[1]).shape[0] >= 400  # two layer heatmaps stacked (layers 1 and 3)
    text = out.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", text, re.I)
    assert "http://" not in text and "https://" not in text and "<script" not in text.lower()
    imgs = re.findall(r'<img [^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(imgs) == 5
    assert base64.b64decode(imgs[1]) == pngs[1].read_bytes()  # HTML embeds exactly the written PNGs
    for name in ("balanced", "collapsed", "dense"):
        assert name in text
    assert "L3@500" in text and "dense run: no router events" in text and "123,456" in text


def test_dense_only_default_png_dir(logs, tmp_path):
    out = tmp_path / "dense.html"
    pngs = rd.build_dashboard([rd.load_run(logs["dense"])], out)
    assert pngs == [tmp_path / "dense_png" / "00_compare_loss.png"]
    _check_png(pngs[0])
    assert out.read_text().count("data:image/png;base64,") == 1


def _cli(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=120)


def test_cli_ok(logs, tmp_path):
    out = tmp_path / "cli.html"
    r = _cli(logs["balanced"], logs["collapsed"], "--out", out, "--png-dir", tmp_path / "p")
    assert r.returncode == 0, r.stderr
    assert out.is_file() and len(list((tmp_path / "p").glob("*.png"))) == 5


def test_cli_bad_json_names_line(logs, tmp_path):
    lines = logs["balanced"].read_text().splitlines()
    lines.insert(2, '{"event": "train", "step": 3, "train_loss": ')  # truncated write: line 3
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    r = _cli(logs["dense"], bad, "--out", tmp_path / "x.html")
    assert r.returncode == 1
    assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("error: ")
    assert "bad.jsonl:3" in r.stderr and "JSON" in r.stderr
    assert not (tmp_path / "x.html").exists()


def test_cli_missing_file(tmp_path):
    r = _cli(tmp_path / "nope.jsonl", "--out", tmp_path / "x.html")
    assert r.returncode == 1 and r.stderr.startswith("error: ") and "nope.jsonl" in r.stderr and "Traceback" not in r.stderr


CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)")
def test_browser_renders(logs, tmp_path):
    out = tmp_path / "dash.html"
    rd.build_dashboard([rd.load_run(logs["balanced"]), rd.load_run(logs["collapsed"])], out)
    shot = tmp_path / "shot.png"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1400,1000",
           out.resolve().as_uri()]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert shot.is_file(), f"no screenshot (rc={r.returncode}): {r.stderr[-2000:]}"
    img = mpimg.imread(shot)[..., :3]
    assert img.shape[:2] == (1000, 1400)
    colors = np.unique((img * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colors) > 200, f"screenshot looks blank: {len(colors)} colors"  # viridis heatmaps + text
    assert img.std() > 0.05
