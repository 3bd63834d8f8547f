"""Tests for scripts/router_dashboard.py on synthetic logs: parsing, self-contained HTML, PNGs, CLI errors, browser render."""
import base64
import html
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
            "importance": None if hash_router else load, "load_entropy": ent / math.log(len(load)),  # normalized
            "token_entropy": None if hash_router else 0.8 * ent, "max_over_mean": max(load) / mean,
            "min_over_mean": min(load) / mean, "maxvio": max(load) / mean - 1, "dead": sum(p == 0 for p in load),
            "aux": 1.0, "z": 0.1, "bias_min": None, "bias_max": None, "unknown_key": [1, 2]}


def _common(step, loss):
    recs = [{"event": "train", "step": step, "train_loss": loss, "tokens_per_s": 1000}]
    if step % 500 == 0:
        recs.append({"event": "val", "step": step, "val_loss": loss - 0.1, "val_bpb": (loss - 0.1) / 1.7})
    return recs


def balanced_load(step, layer, seed=0):
    rng = np.random.default_rng(step * 10 + layer + 100_000 * seed)
    x = 1.0 + 0.05 * rng.standard_normal(E)
    return x / x.sum()


def collapsed_load(step, layer):
    if layer == 3 and step >= COLLAPSE_STEP:
        return [1.0, 0.0, 0.0, 0.0]
    return balanced_load(step, layer)


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _final(event, bpb):
    return {"event": event, "val_loss": bpb * 1.7, "val_bpb": bpb, "eval_stride": 0}


def write_logs(folder):
    """Two balanced MoE runs (the first with EMA), one whose layer 3 collapses at COLLAPSE_STEP (no EMA), one dense."""
    bal, bal_b, col = ([{"event": "model", "params": 123456}] for _ in range(3))
    dense = []
    for step in STEPS:
        loss = 4.0 - step / 1000
        bal += _common(step, loss)
        bal_b += _common(step, loss + 0.05)
        col += _common(step, loss + 0.3)
        dense += _common(step, loss + 0.1)
        for layer in LAYERS:
            bal.append(_router(step, layer, balanced_load(step, layer)))
            bal_b.append(_router(step, layer, balanced_load(step, layer, seed=1)))
            col.append(_router(step, layer, collapsed_load(step, layer)))
        if step == COLLAPSE_STEP:
            col.append({"event": "router_alert", "step": step, "layer": 3, "below_since": step - 100,
                        "min_over_mean": 0.0, "dead": 3, "max_over_mean": 4.0})
    bal += [_final("final_raw", 1.80), _final("final_ema", 1.78), _final("final_roundtrip", 1.77),
            {"event": "something_new", "x": 1}]
    col += [_final("final_raw", 2.05), _final("final_roundtrip", 2.10)]
    return {name: _write(folder / f"{name}.jsonl", records)
            for name, records in (("balanced", bal), ("balanced_b", bal_b), ("collapsed", col), ("dense", dense))}


@pytest.fixture
def logs(tmp_path):
    return write_logs(tmp_path)


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
    assert run["final_raw"]["val_bpb"] == 2.05 and "final_ema" not in run

    dense = rd.load_run(logs["dense"])
    assert dense["layers"] == {} and dense["alerts"] == [] and len(dense["train"]) == len(STEPS)
    balanced = rd.load_run(logs["balanced"])
    assert balanced["final_roundtrip"]["val_bpb"] == 1.77 and balanced["final_ema"]["val_bpb"] == 1.78


def test_hash_router_nulls(tmp_path):
    recs = [_router(s, 0, [0.25] * 4, hash_router=True) for s in (10, 20)]
    run = rd.load_run(_write(tmp_path / "hash.jsonl", recs))
    assert np.isnan(run["layers"][0]["token_entropy"]).all()
    assert len(rd.build_dashboard([run], tmp_path / "h.html")) == 3


def _check_png(path, min_w=300, min_h=200):
    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = mpimg.imread(path)
    assert img.shape[0] >= min_h and min_w <= img.shape[1] <= 1360  # fits a 1400 px window beside the margins
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
    assert mpimg.imread(pngs[1]).shape[0] >= 300  # two layer heatmaps stacked (layers 1 and 3)
    text = out.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", text, re.I)
    assert "http://" not in text and "https://" not in text and "<script" not in text.lower()
    imgs = re.findall(r'<img [^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(imgs) == 5
    assert base64.b64decode(imgs[1]) == pngs[1].read_bytes()  # HTML embeds exactly the written PNGs
    for name in ("balanced", "collapsed", "dense"):
        assert name in text
    assert "dense run: no router events" in text and "123,456" in text
    # runs stack in page order, one block each, with no sideways-scrolling container
    assert re.findall(r'<section class="run[^"]*"><h2>(\w+)', text) == ["balanced", "collapsed", "dense"]
    assert "overflow-x" not in text and "flex" not in text


def _rows(text):
    """Table rows as (is the row marked collapsed, [(cell text, its mark: "bad" red, "warn" amber or "")])."""
    cells = r"<td(?: class=(\w+))?>([^<]*)</td>"
    return [(" class=collapsed" in attrs, [(c, mark) for mark, c in re.findall(cells, row)])
            for attrs, row in re.findall(r"<tr([^>]*)>(.*?)</tr>", text) if "<td" in row]


def test_summary_flags_the_collapsed_layer(logs, tmp_path):
    runs = [rd.load_run(logs[k]) for k in ("balanced", "balanced_b", "collapsed", "dense")]
    rd.build_dashboard(runs, tmp_path / "d.html")
    text = (tmp_path / "d.html").read_text()
    rows = {tuple(c for c, _ in cells[:2]): (collapsed, cells) for collapsed, cells in _rows(text)}
    collapsed, cells = rows[("collapsed", "L3")]  # per layer: min/mean, MaxVio, dead (last, worst) and alerts
    assert collapsed and cells[3:] == [("0.000", "bad"), ("0.000", "warn"), ("3.000", ""), ("3.000", ""),
                                       ("3", "warn"), ("3", "warn"), ("1 (@500)", "bad")]
    assert not rows[("collapsed", "L1")][0] and not any(mark for _, mark in rows[("collapsed", "L1")][1])
    for run in ("balanced", "balanced_b"):
        for layer in ("L1", "L3"):
            assert not rows[(run, layer)][0] and not any(mark for _, mark in rows[(run, layer)][1])
    collapsed, cells = rows[("collapsed", "123,456")]  # the run's row: final bpb (raw, no EMA), roundtrip, verdict
    assert collapsed and cells[5:7] == [("2.0500", ""), ("2.1000", "")] and cells[-1] == ("COLLAPSED: L3", "bad")
    assert rows[("balanced", "123,456")][1][2:7] == [("1000", ""), ("3.0000", ""), ("1.7059 @1000", ""),
                                                     ("1.7800", ""), ("1.7700", "")]
    assert rows[("dense", "-")][1][-1] == ("dense", "")
    banner = re.search(r'<div class="alert">(.*?)</div>', text).group(1)
    assert "<b>collapsed</b> layer 3: router_alert at step 500" in banner and "3 of 4 experts dead" in banner
    assert banner.count("<li>") == 1 and '<h2>collapsed <span class="badge">COLLAPSED: L3</span>' in text

    rd.build_dashboard(runs[:2], tmp_path / "ok.html")
    ok = (tmp_path / "ok.html").read_text()
    assert 'class="alert"' not in ok and "<td class=bad" not in ok and "class=collapsed" not in ok


def test_low_min_over_mean_collapses_without_an_alert(tmp_path):
    """A layer under the trainer's default threshold at the last step is flagged even when its own threshold or
    patience kept the alert back; an early dip that recovered (a random router's first steps) is not."""
    fair, skewed, dipped = [0.25] * 4, [0.97, 0.01, 0.01, 0.01], [0.3, 0.3, 0.38, 0.02]
    loads = {0: [fair, fair, dipped], 1: [skewed, fair, fair]}
    recs = [_router(step, layer, loads[layer][i]) for i, step in enumerate((10, 20, 30)) for layer in loads]
    health = rd._health(rd.load_run(_write(tmp_path / "a.jsonl", recs)))
    assert health[0]["collapsed"] and health[0]["mom_last"] == pytest.approx(0.08) and not health[0]["alerts"]
    assert not health[1]["collapsed"] and health[1]["mom_worst"] == pytest.approx(0.04)


def _axes(fig):
    return {ax.get_title(): ax for ax in fig.axes}


def test_shared_scales_and_colours(logs):
    runs = [rd.load_run(logs[k]) for k in ("balanced", "collapsed")]
    look = rd.shared_look(runs)
    curves = [_axes(rd._fig_router_curves(run, look)) for run in runs]
    assert [t for t in curves[0] if t] == ["normalized load entropy", "mean token entropy / ln E", "min / mean load",
                                           "MaxVio", "dead experts"]
    for title in curves[0]:
        assert curves[0][title].get_ylim() == curves[1][title].get_ylim()  # one y scale per metric, every run
        assert curves[0][title].get_xlim() == curves[1][title].get_xlim()
    assert curves[0]["MaxVio"].get_ylim()[1] >= 3.0  # the collapsed layer's MaxVio fits the balanced run's axis too
    for panels in curves:  # a layer keeps its colour in every panel of every run
        colours = {line.get_label(): line.get_color() for ax in panels.values() for line in ax.lines
                   if line.get_label().startswith("L")}
        assert colours == {f"L{layer}": look["layer_color"][layer] for layer in LAYERS}
    # load_entropy is logged normalized (trainer): plotted as it is, not divided by ln E again
    logged = runs[1]["layers"][3]["load_entropy"]
    plotted = next(l for l in curves[1]["normalized load entropy"].lines if l.get_label() == "L3").get_ydata()
    np.testing.assert_allclose(plotted, logged)
    assert logged[0] == pytest.approx(1.0, abs=0.01)

    for run in runs:  # one fixed load colour scale, in fair shares, with its colorbar
        fig = rd._fig_heatmaps(run, look)
        meshes = [c for ax in fig.axes if ax.get_ylabel() == "expert" for c in ax.collections]
        assert len(meshes) == len(LAYERS) and all(m.get_clim() == (0.0, rd.LOAD_VMAX) for m in meshes)
        assert any("fair share" in ax.get_ylabel() for ax in fig.axes)
        assert all(ax.get_xlim() == curves[0]["MaxVio"].get_xlim() for ax in fig.axes if ax.get_ylabel() == "expert")


def test_compare_run_colours_and_final_points(logs):
    runs = [rd.load_run(logs[k]) for k in ("balanced", "collapsed", "dense")]
    look = rd.shared_look(runs)
    fig = rd._fig_compare(runs, look)
    train, val = _axes(fig)["train loss"], _axes(fig)["val_bpb"]
    assert [l.get_color() for l in train.lines] == look["run_color"] == ["C0", "C1", "C2"]
    points = [(l.get_color(), l.get_marker(), *l.get_xydata()[0]) for l in val.lines if len(l.get_xdata()) == 1]
    assert points == [("C0", "*", 1000, 1.78), ("C0", "X", 1000, 1.77),  # EMA, not raw, beside the roundtrip
                      ("C1", "s", 1000, 2.05), ("C1", "X", 1000, 2.10)]  # no EMA: raw
    assert all(l.get_color() == c for l, c in zip((l for l in val.lines if len(l.get_xdata()) > 1), look["run_color"]))
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["balanced", "collapsed", "dense", "final_ema", "final_raw", "final_roundtrip"]


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
WIDTH = 1400
# Measures the laid-out page once its images have loaded; only a test copy of the page carries it.
PROBE = """<script>addEventListener("load", () => {
  const box = e => { const r = e.getBoundingClientRect(); return [r.left, r.right, r.top]; };
  const out = document.createElement("pre");
  out.id = "probe";
  out.textContent = JSON.stringify({window: innerWidth, scroll: document.documentElement.scrollWidth,
    runs: [...document.querySelectorAll(".run")].map(box),
    images: [...document.images].map(i => [i.naturalWidth, ...box(i)]),
    wide: [...document.querySelectorAll("body *")].filter(e => box(e)[1] > innerWidth).map(e => e.tagName)});
  document.body.append(out);
});</script></body>"""


def _chromium(tmp_path, url, *args):
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", "--hide-scrollbars",
           f"--user-data-dir={tmp_path / 'profile'}", *args, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90)


@pytest.fixture
def three_runs_page(logs, tmp_path):
    """The issue's page: two balanced runs, then the collapsed one."""
    out = tmp_path / "dash.html"
    rd.build_dashboard([rd.load_run(logs[k]) for k in ("balanced", "balanced_b", "collapsed")], out)
    return out


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)")
def test_browser_every_run_on_screen_at_1400(three_runs_page, tmp_path):
    probe = tmp_path / "probe.html"
    probe.write_text(three_runs_page.read_text().replace("</body>", PROBE))
    r = _chromium(tmp_path, probe.resolve().as_uri(), f"--window-size={WIDTH},1000", "--dump-dom")
    found = re.search(r'<pre id="probe">(.*?)</pre>', r.stdout, re.S)
    assert found, f"no layout measured (rc={r.returncode}): {r.stderr[-2000:]}"
    layout = json.loads(html.unescape(found.group(1)))
    assert layout["window"] == WIDTH and layout["scroll"] <= WIDTH and layout["wide"] == []
    lefts, rights, tops = zip(*layout["runs"])
    assert len(tops) == 3 and list(tops) == sorted(tops) and len(set(lefts)) == 1  # stacked, not side by side
    assert max(rights) <= WIDTH
    assert len(layout["images"]) == 7 and all(w > 0 and right <= WIDTH for w, _, right, _ in layout["images"])


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)")
def test_browser_shows_the_collapse_first(three_runs_page, tmp_path):
    shot = tmp_path / "shot.png"
    r = _chromium(tmp_path, three_runs_page.resolve().as_uri(), f"--window-size={WIDTH},1000", f"--screenshot={shot}")
    assert shot.is_file(), f"no screenshot (rc={r.returncode}): {r.stderr[-2000:]}"
    img = (mpimg.imread(shot)[..., :3] * 255).round().astype(int)
    assert img.shape[:2] == (1000, WIDTH)
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 200  # the page rendered: text, tables, figures
    alarm = (np.abs(img - [0xC6, 0x28, 0x28]).max(axis=-1) <= 8).sum()  # the banner's and bad cells' red
    assert alarm > 20_000, f"the collapse is not flagged in the first screen ({alarm} red pixels)"


def test_a_run_stopped_by_its_cap_shows_its_last_step_and_scores(tmp_path):
    """As the trainer logged it before it logged a train line at the step where it stops: train lines every 10
    steps up to 20, a val line at step 0 only, the cap at step 35. The table and the figure end at 35, the val
    column says which step its score is from, and the final and roundtrip scores are there."""
    records = [{"event": "model", "params": 1000}, {"event": "val", "step": 0, "val_loss": 6.9, "val_bpb": 3.8344}]
    records += [{"event": "train", "step": step, "train_loss": 7 - step / 10} for step in (1, 10, 20)]
    records += [{"event": "train_done", "steps": 35, "stopped_by": "wallclock"}, _final("final_raw", 2.5),
                _final("final_ema", 2.4), _final("final_roundtrip", 2.45)]
    run = rd.load_run(_write(tmp_path / "capped.jsonl", records))
    rd.build_dashboard([run], tmp_path / "d.html")
    (_, cells), = _rows((tmp_path / "d.html").read_text())
    assert [c for c, _ in cells[2:7]] == ["35", "5.0000", "3.8344 @0", "2.4000", "2.4500"]
    fig = rd._fig_compare([run], rd.shared_look([run]))
    finals = [tuple(line.get_xydata()[0]) for line in _axes(fig)["val_bpb"].lines if line.get_marker() in ("*", "X")]
    assert finals == [(35, 2.4), (35, 2.45)]


def test_every_coloured_cell_follows_the_legend(logs, tmp_path):
    """Red only where the legend's collapse rule holds (an alert, or min/mean under the threshold at the last step),
    in a row marked collapsed; amber only for a dip earlier in the run or dead experts."""
    runs = [rd.load_run(logs[k]) for k in ("balanced", "collapsed")]
    fair, dipped = [0.25] * 4, [0.97, 0.01, 0.01, 0.01]
    recovered = [_router(step, 1, load) for step, load in ((10, dipped), (20, [0.4, 0.4, 0.2, 0.0]), (30, fair))]
    runs.append(rd.load_run(_write(tmp_path / "recovered.jsonl", recovered)))
    rd.build_dashboard(runs, tmp_path / "d.html")
    text = (tmp_path / "d.html").read_text()
    legend = re.search(r'<p class="legend">(.*?)</p>', text).group(1)
    assert "router_alert fired, or min/mean under 0.1 at the last step" in legend and "dead experts" in legend
    layers = text[text.index("<h3>MoE layers"):]
    head = re.findall(r"<th>([^<]*)</th>", layers)
    marked = {}
    for collapsed, cells in _rows(layers):
        for column, (_, mark) in zip(head, cells):
            if mark:
                marked.setdefault((mark, column), set()).add(collapsed)
    assert marked == {("bad", "min/mean last"): {True}, ("bad", "router_alert"): {True},
                      ("warn", "min/mean worst"): {True, False}, ("warn", "dead last"): {True},
                      ("warn", "dead max"): {True, False}}
