"""Router dashboard: turn train_moe.py metric logs (logs/<RUN_ID>.jsonl) into one offline HTML page + PNGs.

Usage:
    python scripts/router_dashboard.py logs/a.jsonl [logs/b.jsonl ...] --out dashboard.html [--png-dir DIR]

The HTML embeds every figure as a base64 PNG (no network, no JS); the same PNGs are written to --png-dir
(default: <out stem>_png/ beside the HTML). Figures: train loss and val_bpb of all runs overlaid; per run, one
expert-load heatmap per MoE layer (x = step, y = expert, color = load fraction, router_alert steps marked in
red) and per-layer curves of normalized load entropy, mean token entropy, MaxVio and dead experts.
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
    "final_roundtrip": {"val_bpb": NUMBER},
}


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


def _fig_compare(runs: list[dict]):
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.6))
    for run in runs:
        if len(run["train"]):
            ax1.plot(run["train"][:, 0], run["train"][:, 1], label=run["name"], lw=1.2)
        if len(run["val"]):
            ax2.plot(run["val"][:, 0], run["val"][:, 1], "o-", label=run["name"], ms=3)
    for ax, title in ((ax1, "train loss"), (ax2, "val_bpb")):
        ax.set(title=title, xlabel="step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _fig_heatmaps(run: dict):
    layers = run["layers"]
    fig, axes = plt.subplots(len(layers), 1, figsize=(6.5, 0.6 + 1.9 * len(layers)), squeeze=False)
    vmax = max(np.nanmax(d["load"]) for d in layers.values())
    for ax, (layer, d) in zip(axes[:, 0], layers.items()):
        mesh = ax.pcolormesh(_edges(d["steps"]), np.arange(d["experts"] + 1) - 0.5, d["load"].T,
                             cmap="viridis", vmin=0.0, vmax=vmax, shading="flat")
        for a in (a for a in run["alerts"] if a.get("layer") == layer and a.get("step") is not None):
            ax.axvline(a["step"], color="red", ls="--", lw=1.2)
            ax.text(a["step"], d["experts"] - 0.5, " alert", color="red", fontsize=7, va="top")
        ax.set(ylabel="expert", title=f"{run['name']} layer {layer}: expert load (uniform = {1 / d['experts']:.3g})")
        ax.title.set_fontsize(9)
        fig.colorbar(mesh, ax=ax, pad=0.01, label="load")
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    return fig


def _fig_router_curves(run: dict):
    fig, axes = plt.subplots(2, 2, figsize=(6.5, 5))
    for layer, d in run["layers"].items():
        norm = math.log(d["experts"]) if d["experts"] > 1 else 1.0
        for ax, y in zip(axes.flat, (d["load_entropy"] / norm, d["token_entropy"] / norm, d["maxvio"], d["dead"])):
            ax.plot(d["steps"], y, ".-", ms=3, lw=1, label=f"L{layer}")
    titles = ("load entropy / log E", "mean token entropy / log E", "MaxVio", "dead experts")
    for ax, title in zip(axes.flat, titles):
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    axes[0, 0].set_ylim(-0.02, 1.05)
    axes[0, 0].legend(fontsize=7, ncol=2)
    axes[1, 0].set_xlabel("step")
    axes[1, 1].set_xlabel("step")
    fig.suptitle(f"{run['name']}: router health", fontsize=10)
    fig.tight_layout()
    return fig


def _summary_row(run: dict) -> list[str]:
    def fmt(x, spec=".4f"):
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)
    last_dead = sum(int(d["dead"][-1]) for d in run["layers"].values() if np.isfinite(d["dead"][-1]))
    return [run["name"], fmt(run.get("model", {}).get("params"), ","),
            fmt(int(run["train"][-1, 0]) if len(run["train"]) else None, "d"),
            fmt(run["train"][-1, 1] if len(run["train"]) else None),
            fmt(run["val"][-1, 1] if len(run["val"]) else None),
            fmt(run.get("final_roundtrip", {}).get("val_bpb")),
            str(len(run["layers"])) if run["layers"] else "dense",
            str(last_dead) if run["layers"] else "-",
            ", ".join(f"L{a['layer']}@{a['step']}" for a in run["alerts"]) or "-"]


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
    compare = png_dir / "00_compare_loss.png"
    pngs = {compare: _png(_fig_compare(runs))}
    columns = []
    for i, run in enumerate(runs, 1):
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", run["name"])
        figs = [f'<h2>{html.escape(run["name"])}</h2><p class="src">{html.escape(run["path"])}</p>']
        if run["layers"]:
            for kind, make in (("heatmaps", _fig_heatmaps), ("router", _fig_router_curves)):
                path = png_dir / f"{i:02d}_{slug}_{kind}.png"
                pngs[path] = _png(make(run))
                figs.append(_img(path, pngs[path]))
        else:
            figs.append("<p><i>dense run: no router events</i></p>")
        columns.append(f'<div class="run">{"".join(figs)}</div>')
    head = ["run", "params", "last step", "train loss", "val_bpb", "roundtrip bpb", "MoE layers", "dead (last)",
            "router alerts"]
    table = "<tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>" + "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in _summary_row(r)) + "</tr>" for r in runs)
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>MoE router dashboard</title><style>
body{{font-family:sans-serif;margin:16px;background:#fff;color:#222}} img{{max-width:100%;display:block;margin:6px 0}}
table{{border-collapse:collapse;margin:8px 0}} td,th{{border:1px solid #bbb;padding:3px 8px;text-align:right}}
.runs{{display:flex;gap:16px;overflow-x:auto;align-items:flex-start}} .run{{flex:0 0 660px}}
.src{{color:#777;font-size:12px}} h2{{margin:8px 0 2px}}
</style></head><body>
<h1>MoE router dashboard</h1>
<table>{table}</table>
{_img(compare, pngs[compare])}
<div class="runs">{"".join(columns)}</div>
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
