"""Router dashboard: turn train_moe.py metric logs (logs/<RUN_ID>.jsonl) into one offline HTML page + PNGs.

Usage:
    python scripts/router_dashboard.py logs/a.jsonl [logs/b.jsonl ...] --out dashboard.html [--png-dir DIR]

The HTML embeds every figure as a base64 PNG (no network, no JS); the same PNGs are written to --png-dir
(default: <out stem>_png/ beside the HTML). The page stacks everything vertically, each figure fitting a 1400 px
window: a red banner naming each collapsed MoE layer (a router_alert fired, or its least-used expert is under
ALERT_MIN_LOAD of a fair share at the last step); a table of runs (the step it ended at, its last periodic val_bpb
and that step, its final and roundtrip scores) and one of MoE layers (min/mean, MaxVio, dead experts, alerts; red:
what makes a layer collapsed, its row pink; amber: under the threshold earlier, or dead experts); train loss and
val_bpb of all runs overlaid, one colour per run, with the final (EMA, else raw) and roundtrip scores marked at the
last step (train_done's, when it logged no train line there); per run, one expert-load heatmap
per MoE layer (colour = load / fair share on one fixed scale, router_alert steps marked in red) and per-layer
curves (one colour per layer) of normalized load entropy (logged already divided by ln E), token entropy, min/mean,
MaxVio and dead experts, each on one y scale shared by all runs.
Dense runs (no "router" events) get only the loss curves and the table. Unknown events and keys are ignored.
A line that is not a JSON object with an "event" name, a field of the wrong type in an event that is plotted, a log
with nothing to plot or an output that cannot be written ends the command with one `error:` line and exit status 1,
and nothing is written.
"""
from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
import os
import re
import shutil
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from tqdm import tqdm  # noqa: E402

ROUTER_SERIES = ("load_entropy", "token_entropy", "maxvio", "dead", "max_over_mean", "min_over_mean")
INT, NUMBER, OPTIONAL, LOADS = "an integer", "a number", "a number or null", "a non-empty list of numbers"
# The fields read from each plotted event; NaN is a number (a diverged run's loss), an OPTIONAL null or absence is NaN.
FIELDS = {
    "train": {"step": INT, "train_loss": NUMBER},
    "val": {"step": INT, "val_bpb": NUMBER, "val_loss": OPTIONAL},
    "router": {"step": INT, "layer": INT, "load": LOADS, **{k: OPTIONAL for k in ROUTER_SERIES}},
    "router_alert": {"step": INT, "layer": INT, "min_over_mean": OPTIONAL, "dead": OPTIONAL, "max_over_mean": OPTIONAL},
    "model": {"params": INT},
    "train_done": {"steps": INT},
    **{event: {"val_bpb": NUMBER} for event in ("final_raw", "final_ema", "final_roundtrip")},
}
FINAL_MARKERS = {"final_ema": ("*", 15), "final_raw": ("s", 11), "final_roundtrip": ("X", 8)}  # small on top
ALERT_MIN_LOAD = 0.1  # train_moe.py's default ROUTER_ALERT_MIN_LOAD (a run's own value is not in its log)
LOAD_VMAX = 3.0  # heatmap colour top in fair shares: a collapse saturates it, a balanced run's noise stays flat
FIG_WIDTH = 13.2  # inches at 100 dpi: 1320 px, inside a 1400 px window with the page's margins and a scrollbar


class DashboardError(Exception):
    """A problem with an input or output file, reported as one `error:` line."""


def _is_int(value) -> bool:
    # true is no number; numpy holds the plotted ints as int64.
    return isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2**63


def _is_number(value) -> bool:
    return isinstance(value, float) or _is_int(value)


IS_KIND = {INT: _is_int, NUMBER: _is_number, OPTIONAL: _is_number,
           LOADS: lambda v: isinstance(v, list) and len(v) > 0 and all(map(_is_number, v))}


def _fields(rec: dict, where: str) -> dict:
    """The fields of rec that its event's figures read, type-checked."""
    fields = {}
    for key, kind in FIELDS[rec["event"]].items():
        value = rec.get(key)
        if kind == OPTIONAL and value is None:
            value = math.nan
        elif key not in rec:
            raise DashboardError(f"{where}: {rec['event']} event has no {key} ({kind})")
        elif not IS_KIND[kind](value):
            raise DashboardError(f"{where}: {rec['event']} event's {key} is {json.dumps(value)[:40]}, not {kind}")
        fields[key] = value
    return fields


def load_run(path, name: str | None = None) -> dict:
    """Parse one jsonl log into curves, per-layer router matrices (load: steps x experts) and alerts."""
    path = Path(path)
    if not path.is_file():
        raise DashboardError(f"{path}: {'not a file' if path.exists() else 'no such file'}")
    try:
        f = path.open("rb")
    except OSError as e:
        raise DashboardError(f"{path}: cannot be read ({e.strerror})") from None
    train, val, alerts, extras, raw_layers, events = [], [], [], {}, {}, 0
    bar = tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc=path.name, leave=False, disable=None)
    with f, bar:
        for lineno, raw in enumerate(f, 1):
            bar.update(len(raw))
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise DashboardError(f"{path}:{lineno}: not valid JSON ({e})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("event"), str):
                raise DashboardError(f"{path}:{lineno}: not a train_moe.py event (a JSON object with an 'event' name)")
            events += 1
            if rec["event"] not in FIELDS:
                continue
            fields = _fields(rec, f"{path}:{lineno}")
            if rec["event"] == "train":
                train.append((fields["step"], fields["train_loss"]))
            elif rec["event"] == "val":
                val.append((fields["step"], fields["val_bpb"], fields["val_loss"]))
            elif rec["event"] == "router":
                raw_layers.setdefault(fields["layer"], []).append(fields)
            elif rec["event"] == "router_alert":
                alerts.append(fields)
            else:
                extras[rec["event"]] = fields
    if not events:
        raise DashboardError(f"{path}: holds no events (an empty log)")
    if not (train or val or raw_layers):
        raise DashboardError(f"{path}: holds no train, val or router event: nothing to plot")
    layers = {}
    for layer, recs in sorted(raw_layers.items()):
        recs = sorted({r["step"]: r for r in recs}.values(), key=lambda r: r["step"])  # last per step
        n_exp = max(len(r["load"]) for r in recs)
        load = np.full((len(recs), n_exp), np.nan)
        for i, r in enumerate(recs):
            load[i, :len(r["load"])] = r["load"]
        layers[layer] = {"steps": np.array([r["step"] for r in recs]), "load": load, "experts": n_exp,
                         **{k: np.array([r[k] for r in recs], dtype=float) for k in ROUTER_SERIES}}
    train.sort()
    val.sort()
    return {"name": name or path.stem, "path": str(path), "train": np.array(train).reshape(-1, 2),
            "val": np.array(val).reshape(-1, 3), "layers": layers, "alerts": alerts, **extras}


def _edges(steps: np.ndarray) -> np.ndarray:
    """Cell edges around each step so uneven log intervals render with true widths."""
    s = steps.astype(float)
    if len(s) == 1:
        return np.array([s[0] - 0.5, s[0] + 0.5])
    mid = (s[1:] + s[:-1]) / 2
    return np.concatenate([[s[0] - (mid[0] - s[0])], mid, [s[-1] + (s[-1] - mid[-1])]])


def _last_and(values: np.ndarray, worst) -> tuple[float, float]:
    """The last logged value and the worst (worst = np.min or np.max) over the run, NaN if none was logged."""
    values = values[np.isfinite(values)]
    return (values[-1], worst(values)) if len(values) else (math.nan, math.nan)


def _health(run: dict) -> dict[int, dict]:
    """Per MoE layer, the collapse numbers of the summary table and the verdict that colours the page."""
    health = {}
    for layer, d in run["layers"].items():
        h = {"experts": d["experts"], "alerts": [a["step"] for a in run["alerts"] if a["layer"] == layer]}
        h["mom_last"], h["mom_worst"] = _last_and(d["min_over_mean"], np.min)
        h["maxvio_last"], h["maxvio_worst"] = _last_and(d["maxvio"], np.max)
        h["dead_last"], h["dead_max"] = _last_and(d["dead"], np.max)
        # A router only starting out is routinely this skewed (hence the trainer's patience): judge the last window.
        h["collapsed"] = bool(h["alerts"]) or h["mom_last"] < ALERT_MIN_LOAD
        health[layer] = h
    return health


def _entropy_norm(d: dict) -> float:
    return math.log(d["experts"]) if d["experts"] > 1 else 1.0


# Router curve panels: title, series. load_entropy is logged already divided by ln E; token_entropy is in nats.
PANELS = (("normalized load entropy", lambda d: d["load_entropy"]),
          ("mean token entropy / ln E", lambda d: d["token_entropy"] / _entropy_norm(d)),
          ("min / mean load", lambda d: d["min_over_mean"]),
          ("MaxVio", lambda d: d["maxvio"]),
          ("dead experts", lambda d: d["dead"]))
# Smallest y top per panel, so that a balanced run's noise stays small next to what a collapse would reach.
PANEL_FLOOR = {"MaxVio": 1.0, "dead experts": 1.0}


def shared_look(runs: list[dict]) -> dict:
    """Colours and axis limits common to every figure, so that equal heights and colours mean equal things
    across runs: a run's colour (overlays), a layer's colour (router curves), one step range, one y range per panel."""
    data = [d for run in runs for d in run["layers"].values()]
    layers = sorted({layer for run in runs for layer in run["layers"]})
    edges = [_edges(d["steps"]) for d in data]
    ylim = {}
    for title, series in PANELS:
        values = np.concatenate([[PANEL_FLOOR.get(title, 1.0)], *(series(d) for d in data)])
        top = values[np.isfinite(values)].max() * 1.05
        ylim[title] = (-0.03 * top, top)
    return {"run_color": [f"C{i % 10}" for i in range(len(runs))],
            "layer_color": {layer: plt.cm.plasma(0.8 * k / max(len(layers) - 1, 1)) for k, layer in enumerate(layers)},
            "xlim": (min(e[0] for e in edges), max(e[-1] for e in edges)) if data else None, "ylim": ylim}


def _last_step(run: dict) -> int:
    """The step the run ended at: a run stopped by its wallclock cap logged no train line there before this fix."""
    return int(max([0, *run["train"][:, 0], *run["val"][:, 0], run.get("train_done", {}).get("steps", 0)]))


def _final_events(run: dict) -> list[str]:
    return [e for e in ("final_ema" if "final_ema" in run else "final_raw", "final_roundtrip") if e in run]


def _fig_compare(runs: list[dict], look: dict):
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(FIG_WIDTH, 3.6), layout="constrained")
    finals = set()
    for run, color in zip(runs, look["run_color"]):
        if len(run["train"]):
            ax1.plot(run["train"][:, 0], run["train"][:, 1], color=color, lw=1.2)
        if len(run["val"]):
            ax2.plot(run["val"][:, 0], run["val"][:, 1], "o-", color=color, ms=3)
        for event in _final_events(run):  # the final evals score the last step's model
            marker, size = FINAL_MARKERS[event]
            ax2.plot(_last_step(run), run[event]["val_bpb"], marker, color=color, ms=size, mec="black", mew=0.7)
            finals.add(event)
    for ax, title in ((ax1, "train loss"), (ax2, "val_bpb")):
        ax.set(title=title, xlabel="step")
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], color=c, lw=2, label=run["name"]) for run, c in zip(runs, look["run_color"])]
    handles += [Line2D([], [], marker=marker, ls="none", color="0.6", mec="black", ms=9, label=event)
                for event, (marker, _) in FINAL_MARKERS.items() if event in finals]
    fig.legend(handles=handles, loc="outside right upper", fontsize=8)
    return fig


def _fig_heatmaps(run: dict, look: dict):
    layers, health = run["layers"], _health(run)
    heights = [1.1 + 0.06 * d["experts"] for d in layers.values()]
    fig, axes = plt.subplots(len(layers), 1, figsize=(FIG_WIDTH, 0.6 + sum(heights)), sharex=True, squeeze=False,
                             gridspec_kw={"height_ratios": heights}, layout="constrained")
    for ax, (layer, d) in zip(axes[:, 0], layers.items()):
        # In fair shares (load x E), so one colour scale fits layers and runs with any number of experts.
        mesh = ax.pcolormesh(_edges(d["steps"]), np.arange(d["experts"] + 1) - 0.5, d["load"].T * d["experts"],
                             cmap="viridis", vmin=0.0, vmax=LOAD_VMAX, shading="flat")
        for step in health[layer]["alerts"]:
            ax.axvline(step, color="red", ls="--", lw=1.5)
            ax.text(step, d["experts"] - 0.5, " router_alert", color="red", fontsize=8, fontweight="bold", va="top")
        collapsed = health[layer]["collapsed"]
        ax.set_title(f"layer {layer}" + (": COLLAPSED" if collapsed else ""), loc="left", fontsize=9,
                     color="red" if collapsed else "black", fontweight="bold" if collapsed else "normal")
        ax.set(ylabel="expert", xlim=look["xlim"])
    axes[-1, 0].set_xlabel("step")
    fig.colorbar(mesh, ax=axes[:, 0], extend="max", pad=0.01, label="load / fair share (1 = uniform)")
    fig.suptitle(f"{run['name']}: expert load per MoE layer", fontsize=10)
    return fig


def _fig_router_curves(run: dict, look: dict):
    fig, axes = plt.subplots(1, len(PANELS), figsize=(FIG_WIDTH, 2.8), layout="constrained")
    for layer, d in run["layers"].items():
        for ax, (_, series) in zip(axes, PANELS):
            ax.plot(d["steps"], series(d), ".-", ms=3, lw=1, color=look["layer_color"][layer], label=f"L{layer}")
    for ax, (title, _) in zip(axes, PANELS):
        ax.set(xlim=look["xlim"], ylim=look["ylim"][title], xlabel="step")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
        if title == "min / mean load":
            ax.axhline(ALERT_MIN_LOAD, color="red", ls="--", lw=1)
        if title == "dead experts":
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside right upper", fontsize=7, title="layer")
    fig.suptitle(f"{run['name']}: router health (y scales shared by all runs; red dashed: alert threshold)",
                 fontsize=10)
    return fig


def _fmt(x, spec=".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _table(head: list[str], rows: list[tuple[list, bool]]) -> str:
    """rows: (cells, collapsed); a cell is its text, or (text, "bad") to colour it red, (text, "warn") amber."""
    def td(cell):
        text, mark = cell if isinstance(cell, tuple) else (cell, "")
        return f'<td{f" class={mark}" if mark else ""}>{html.escape(text)}</td>'
    return ("<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>" + "".join(
        f'<tr{" class=collapsed" if collapsed else ""}>{"".join(map(td, cells))}</tr>' for cells, collapsed in rows)
            + "</table>")


def _run_row(run: dict, health: dict) -> tuple[list, bool]:
    collapsed = [f"L{layer}" for layer, h in health.items() if h["collapsed"]]
    verdict = ("COLLAPSED: " + ", ".join(collapsed), "bad") if collapsed else "ok" if health else "dense"
    final = run.get("final_ema", run.get("final_raw", {}))
    val = f"{run['val'][-1, 1]:.4f} @{run['val'][-1, 0]:.0f}" if len(run["val"]) else "-"
    return [run["name"], _fmt(run.get("model", {}).get("params"), ","), str(_last_step(run)),
            _fmt(run["train"][-1, 1] if len(run["train"]) else None, ".4f"), val, _fmt(final.get("val_bpb"), ".4f"),
            _fmt(run.get("final_roundtrip", {}).get("val_bpb"), ".4f"), str(len(health)) if health else "dense",
            (str(len(run["alerts"])), "bad") if run["alerts"] else "0", verdict], bool(collapsed)


def _layer_row(run: dict, layer: int, h: dict) -> tuple[list, bool]:
    alerts = f"{len(h['alerts'])} (" + ", ".join(f"@{s}" for s in h["alerts"]) + ")" if h["alerts"] else "0"
    # Red: what makes the layer collapsed, as the legend says; amber: trouble that alone does not.
    low_last, low_ever = h["mom_last"] < ALERT_MIN_LOAD, h["mom_worst"] < ALERT_MIN_LOAD
    return [run["name"], f"L{layer}", str(h["experts"]), (_fmt(h["mom_last"]), "bad" if low_last else ""),
            (_fmt(h["mom_worst"]), "warn" if low_ever else ""), _fmt(h["maxvio_last"]), _fmt(h["maxvio_worst"]),
            (_fmt(h["dead_last"], ".0f"), "warn" if h["dead_last"] > 0 else ""),
            (_fmt(h["dead_max"], ".0f"), "warn" if h["dead_max"] > 0 else ""),
            (alerts, "bad" if h["alerts"] else "")], h["collapsed"]


def _banner(runs: list[dict], healths: list[dict]) -> str:
    items = [f"<li><b>{html.escape(run['name'])}</b> layer {layer}: "
             + (f"router_alert at step {', '.join(map(str, h['alerts']))}; " if h["alerts"] else "")
             + f"min/mean {_fmt(h['mom_last'])} at the last step, "
             f"{_fmt(h['dead_last'], '.0f')} of {h['experts']} experts dead</li>"
             for run, health in zip(runs, healths) for layer, h in health.items() if h["collapsed"]]
    return f'<div class="alert"><b>Router collapse</b><ul>{"".join(items)}</ul></div>' if items else ""


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def _img(path: Path, png: bytes) -> str:
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def build_dashboard(runs: list[dict], out_html, png_dir=None) -> list[Path]:
    """Write the PNG figures and one self-contained HTML page; return the PNG paths (in page order)."""
    out_html = Path(out_html)
    png_dir = Path(png_dir) if png_dir else out_html.with_name(out_html.stem + "_png")
    for path in (out_html, png_dir):
        if not path.parent.is_dir():
            raise DashboardError(f"cannot write {path}: {path.parent} is not a folder")
    if out_html.is_dir():
        raise DashboardError(f"cannot write {out_html}: it is a folder")
    if png_dir.exists() and not png_dir.is_dir():
        raise DashboardError(f"cannot write PNGs into {png_dir}: it is not a folder")
    look, healths = shared_look(runs), [_health(run) for run in runs]
    compare = png_dir / "00_compare_loss.png"
    pngs = {compare: _png(_fig_compare(runs, look))}
    sections = []
    for i, (run, health) in enumerate(zip(runs, healths), 1):
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", run["name"])
        collapsed = [f"L{layer}" for layer, h in health.items() if h["collapsed"]]
        badge = f' <span class="badge">COLLAPSED: {", ".join(collapsed)}</span>' if collapsed else ""
        parts = [f'<h2>{html.escape(run["name"])}{badge}</h2><p class="src">{html.escape(run["path"])}</p>']
        if run["layers"]:
            for kind, make in (("heatmaps", _fig_heatmaps), ("router", _fig_router_curves)):
                path = png_dir / f"{i:02d}_{slug}_{kind}.png"
                pngs[path] = _png(make(run, look))
                parts.append(_img(path, pngs[path]))
        else:
            parts.append("<p><i>dense run: no router events</i></p>")
        sections.append(f'<section class="run{" collapsed" if collapsed else ""}">{"".join(parts)}</section>')
    runs_table = _table(["run", "params", "last step", "last train loss", "last val_bpb @step", "final bpb (EMA, else raw)",
                         "roundtrip bpb", "MoE layers", "router alerts", "router health"],
                        [_run_row(run, health) for run, health in zip(runs, healths)])
    layers_table = _table(["run", "layer", "experts", "min/mean last", "min/mean worst", "MaxVio last",
                           "MaxVio worst", "dead last", "dead max", "router_alert"],
                          [_layer_row(run, layer, h) for run, health in zip(runs, healths)
                           for layer, h in health.items()])
    legend = (f'<p class="legend"><span class=bad>red</span>: collapsed: a router_alert fired, or min/mean under '
              f'{ALERT_MIN_LOAD:g} at the last step (the row pink); <span class=warn>amber</span>: min/mean under '
              f'{ALERT_MIN_LOAD:g} earlier in the run, or dead experts</p>') if any(healths) else ""
    router = "<h3>MoE layers</h3>" + layers_table if any(healths) else ""
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>MoE router dashboard</title><style>
body{{font-family:sans-serif;margin:16px;background:#fff;color:#222}}
img{{max-width:100%;height:auto;display:block;margin:6px 0}} table{{border-collapse:collapse;margin:8px 0}}
td,th{{border:1px solid #bbb;padding:3px 8px;text-align:right;overflow-wrap:anywhere}} td:first-child{{text-align:left}}
tr.collapsed td{{background:#fde0e0}} tr td.bad,.legend .bad{{background:#c62828;color:#fff;font-weight:bold}}
tr td.warn,.legend .warn{{background:#ffb74d}} .legend span{{padding:0 4px}}
.alert{{background:#c62828;color:#fff;font-size:18px;padding:8px 16px;margin:8px 0;border-radius:4px}}
.badge{{background:#c62828;color:#fff;font-size:16px;padding:2px 8px;border-radius:4px;vertical-align:middle}}
.run{{margin:24px 0;padding-left:10px;border-left:6px solid #ddd}} .run.collapsed{{border-left-color:#c62828}}
.src{{color:#777;font-size:12px;overflow-wrap:anywhere}} h2{{margin:8px 0 2px}}
</style></head><body>
<h1>MoE router dashboard</h1>
{_banner(runs, healths)}
{legend}
{runs_table}
{router}
{_img(compare, pngs[compare])}
{"".join(sections)}
</body></html>
"""
    _write_files({**pngs, out_html: page.encode("utf-8")}, png_dir)
    return list(pngs)


def _write_files(files: dict[Path, bytes], png_dir: Path) -> None:
    """All under temporary names first, then renamed: a failed write leaves no partial page or figure."""
    partial = {path: path.with_name(f".{path.name}.partial") for path in files}
    made_png_dir = not png_dir.exists()
    try:
        png_dir.mkdir(exist_ok=True)
        for path, data in files.items():
            partial[path].write_bytes(data)
        for path in files:
            os.replace(partial[path], path)
    except OSError as e:
        for path in partial.values():
            path.unlink(missing_ok=True)
        if made_png_dir:
            shutil.rmtree(png_dir, ignore_errors=True)
        raise DashboardError(f"cannot write the dashboard: {e}") from None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("logs", nargs="+", type=Path, help="jsonl metric logs (one per run)")
    p.add_argument("--out", type=Path, default=Path("dashboard.html"), help="HTML output (default: dashboard.html)")
    p.add_argument("--png-dir", type=Path, default=None, help="PNG folder (default: <out stem>_png beside the HTML)")
    args = p.parse_args(argv)
    try:
        names = [path.stem for path in args.logs]
        runs = [load_run(path, name if names.count(name) == 1 else f"{name}#{i}")
                for i, (path, name) in enumerate(zip(args.logs, names), 1)]
        pngs = build_dashboard(runs, args.out, args.png_dir)
    except DashboardError as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)  # one line, whatever the message holds
        return 1
    print(f"wrote {args.out} and {len(pngs)} PNGs in {pngs[0].parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
