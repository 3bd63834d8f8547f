"""Router dashboard: turn train_moe.py metric logs (logs/<RUN_ID>.jsonl) into one offline HTML page + PNGs.

Usage:
    python scripts/router_dashboard.py logs/a.jsonl [logs/b.jsonl ...] --out dashboard.html [--png-dir DIR]

The HTML embeds every figure as a base64 PNG (no network, no JS); the same PNGs are written to --png-dir
(default: <out stem>_png/ beside the HTML). Figures: train loss and val_bpb of all runs overlaid; per run, one
expert-load heatmap per MoE layer (x = step, y = expert, color = load fraction, router_alert steps marked in
red) and per-layer curves of normalized load entropy, mean token entropy, MaxVio and dead experts.
Dense runs (no "router" events) get only the loss curves and the table. Unknown events and keys are ignored.
"""
from __future__ import annotations

import argparse
import base64
import html
import json
import math
import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

ROUTER_SERIES = ("load_entropy", "token_entropy", "maxvio", "dead", "max_over_mean", "min_over_mean")


class DashboardError(Exception):
    """A problem with an input file, reported as one line."""


def _num(value) -> float:
    return float("nan") if value is None else float(value)


def load_run(path, name: str | None = None) -> dict:
    """Parse one jsonl log into curves, per-layer router matrices (load: steps x experts) and alerts."""
    path = Path(path)
    if not path.is_file():
        raise DashboardError(f"{path}: no such file")
    train, val, alerts, extras, raw_layers = [], [], [], {}, {}
    with path.open("rb") as f, tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc=path.name,
                                    leave=False, disable=None) as bar:
        for lineno, raw in enumerate(f, 1):
            bar.update(len(raw))
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise DashboardError(f"{path}:{lineno}: not valid JSON ({e})") from None
            if not isinstance(rec, dict):
                raise DashboardError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            event = rec.get("event")
            try:
                if event == "train" and rec.get("train_loss") is not None:
                    train.append((int(rec["step"]), float(rec["train_loss"])))
                elif event == "val" and rec.get("val_bpb") is not None:
                    val.append((int(rec["step"]), float(rec["val_bpb"]), _num(rec.get("val_loss"))))
                elif event == "router":
                    raw_layers.setdefault(int(rec["layer"]), []).append(rec)
                elif event == "router_alert":
                    alerts.append({k: rec.get(k) for k in ("step", "layer", "min_over_mean", "dead", "max_over_mean")})
                elif event in ("model", "final_roundtrip"):
                    extras[event] = rec
            except (KeyError, TypeError, ValueError) as e:
                raise DashboardError(f"{path}:{lineno}: bad {event!r} event ({type(e).__name__}: {e})") from None
    layers = {}
    for layer, recs in sorted(raw_layers.items()):
        recs = sorted({int(r["step"]): r for r in recs}.values(), key=lambda r: int(r["step"]))  # last per step
        n_exp = max(len(r.get("load") or []) for r in recs)
        load = np.full((len(recs), n_exp), np.nan)
        for i, r in enumerate(recs):
            load[i, :len(r.get("load") or [])] = r.get("load") or []
        layers[layer] = {"steps": np.array([int(r["step"]) for r in recs]), "load": load, "experts": n_exp,
                         **{k: np.array([_num(r.get(k)) for r in recs]) for k in ROUTER_SERIES}}
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
    last_dead = sum(int(d["dead"][-1]) for d in run["layers"].values() if not np.isnan(d["dead"][-1]))
    return [run["name"], fmt(run.get("model", {}).get("params"), ","),
            fmt(int(run["train"][-1, 0]) if len(run["train"]) else None, "d"),
            fmt(run["train"][-1, 1] if len(run["train"]) else None),
            fmt(run["val"][-1, 1] if len(run["val"]) else None),
            fmt(run.get("final_roundtrip", {}).get("val_bpb")),
            str(len(run["layers"])) if run["layers"] else "dense",
            str(last_dead) if run["layers"] else "-",
            ", ".join(f"L{a['layer']}@{a['step']}" for a in run["alerts"]) or "-"]


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


def build_dashboard(runs: list[dict], out_html, png_dir=None) -> list[Path]:
    """Write the PNG figures and one self-contained HTML page; return the PNG paths (in page order)."""
    out_html = Path(out_html)
    png_dir = Path(png_dir) if png_dir else out_html.with_name(out_html.stem + "_png")
    png_dir.mkdir(parents=True, exist_ok=True)
    out_html.parent.mkdir(parents=True, exist_ok=True)
    pngs = [_save(_fig_compare(runs), png_dir / "00_compare_loss.png")]
    columns = []
    for i, run in enumerate(runs, 1):
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", run["name"])
        figs = [f'<h2>{html.escape(run["name"])}</h2><p class="src">{html.escape(run["path"])}</p>']
        if run["layers"]:
            for kind, make in (("heatmaps", _fig_heatmaps), ("router", _fig_router_curves)):
                pngs.append(_save(make(run), png_dir / f"{i:02d}_{slug}_{kind}.png"))
                figs.append(_img(pngs[-1]))
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
{_img(pngs[0])}
<div class="runs">{"".join(columns)}</div>
</body></html>
"""
    out_html.write_text(page, encoding="utf-8")
    return pngs


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
    except DashboardError as e:
        print(f"router_dashboard: error: {e}", file=sys.stderr)
        return 2
    pngs = build_dashboard(runs, args.out, args.png_dir)
    print(f"wrote {args.out} and {len(pngs)} PNGs in {pngs[0].parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
