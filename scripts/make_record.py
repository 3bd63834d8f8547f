"""Build a Parameter Golf record folder from finished train_moe.py runs (one per seed).

    python scripts/make_record.py --runs logs/seed1.txt logs/seed2.txt logs/seed3.txt \
        --track track_10min_16mb --name "Sparse MoE 8x top-2" --author "Ada" --github-id ada \
        --blurb "..." [--baseline-loss 2.07 2.06 2.08] [--baseline-bpb 1.224 1.223 1.225]

Writes records/<track>/<YYYY-MM-DD>_<name>/ (relative to the current directory, normally the repo root) with
train_moe.py exactly as run (taken from the logs, never from the working tree), each seed's .txt and .jsonl log,
README.md and submission.json. Refuses runs that are unfinished, failed, over the size cap, over the track's time
limit, whose logs are not train_moe.py's or hold a missing, mistyped or non-finite figure, or whose sources or
settings differ, with one `error:` line and exit status 1; never overwrites a record nor leaves a half-written one.
"""
import argparse
import json
import math
import re
import shutil
import statistics
import sys
import time
from pathlib import Path

SEPARATOR = b"=" * 100
CAP_BYTES = 16_000_000
TRACK_LIMIT_MS = {"track_10min_16mb": 600_000, "track_non_record_16mb": None}
# Settings that may differ between the seeds of one record; everything else must match.
PER_RUN_CONFIG = ("run_id", "seed", "launch")
# The figures a record reads, per event. json.loads takes NaN and Infinity, so each is checked to be finite.
FIGURES = {
    "artifact": {"code_bytes": int, "model_bytes": int, "artifact_bytes": int, "status": str, "path": str},
    "model": {"params": int, "active_params": int},
    "train_done": {"steps": int, "train_time_ms": float, "step_avg_ms": float},
    "final_raw": {"val_loss": float, "val_bpb": float},
    "final_ema": {"val_loss": float, "val_bpb": float},
    "final_roundtrip": {"val_loss": float, "val_bpb": float},
}
ROUTER_FIGURES = {"layer": int, "max_over_mean": float, "dead": int, "load": list}
FINISHED = [event for event in FIGURES if event != "final_ema"]  # final_ema only when the run kept an EMA
KINDS = {int: "an integer >= 0", float: "a finite number >= 0", str: "a string", list: "a list of finite numbers >= 0"}


class RecordError(Exception):
    """A run, log or argument that cannot make (or pass as) a record; main reports it as one `error:` line."""


def split_log(text_log: bytes) -> tuple[bytes, str, dict]:
    """The embedded source, the environment report and the `config` settings of a logs/<RUN_ID>.txt.

    The log is: source + "\\n" (the logger adds one), a line of 100 '=', the environment report, another such
    line, then config and metric lines. The source may itself hold such a line, so the trainer's two are the
    last two."""
    lines = text_log.split(b"\n")
    marks = [i for i, line in enumerate(lines) if line == SEPARATOR]
    if len(marks) < 2:
        raise RecordError("no '=' separator lines: not a train_moe.py log")
    first, second = marks[-2], marks[-1]
    # The logger's own newline ends the last source line, so joining the lines before the separator gives the
    # source byte for byte (with its final newline, if it had one).
    source = b"\n".join(lines[:first])
    try:
        environment = b"\n".join(lines[first + 1:second]).decode("utf-8")
        config = {}
        for line in lines[second + 1:]:
            if line.startswith(b"config "):
                key, _, value = line[len(b"config "):].decode("utf-8").partition(":")
                config[key] = value
    except UnicodeDecodeError as e:
        raise RecordError(f"not UTF-8 text after the source ({e.reason}): not a train_moe.py log") from None
    return source, environment, config


def read_log(text_path: Path) -> tuple[bytes, str, dict]:
    """split_log of a file, with its settings checked; a RecordError names the file."""
    try:
        source, environment, config = split_log(text_path.read_bytes())
        check_config(config, environment)
    except OSError as e:
        raise RecordError(f"{text_path}: cannot be read ({e.strerror})") from None
    except RecordError as e:
        raise RecordError(f"{text_path}: {e}") from None
    return source, environment, config


def check_config(config: dict, environment: str) -> None:
    needed = ["seed", "world_size", "mlp_mode", "launch"]
    if config.get("mlp_mode") != "dense":
        needed += ["router", "num_experts", "top_k", "moe_layers"]
    for key in needed:
        if key not in config:
            raise RecordError(f"no 'config {key}:' line: not a finished train_moe.py log")
        if key in ("seed", "world_size", "num_experts", "top_k") and not re.fullmatch(r"-?\d+", config[key]):
            raise RecordError(f"config {key}:{config[key]} is not an integer")
    if not re.search(r"torch \S+", environment):
        raise RecordError("no torch version in the environment report: not a train_moe.py log")


def read_events(jsonl_path: Path) -> dict:
    """Events of a logs/<RUN_ID>.jsonl by name; the last one wins, except `router`, whose last report per MoE layer
    is kept under "router_final" as a list ordered by layer. A line that is no event is a RecordError."""
    try:
        text = jsonl_path.read_bytes().decode("utf-8")
    except OSError as e:
        raise RecordError(f"{jsonl_path}: cannot be read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise RecordError(f"{jsonl_path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    events, last_router = {}, {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            raise RecordError(f"{jsonl_path}:{number}: not JSON ({e})") from None
        if not isinstance(record, dict) or not isinstance(record.get("event"), str):
            raise RecordError(f"{jsonl_path}:{number}: not a train_moe.py event (a JSON object with an 'event' name)")
        if record["event"] == "router":
            check_figures(record, {"layer": int}, f"{jsonl_path}:{number}: router")
            last_router[record["layer"]] = record
        else:
            events[record["event"]] = record
    events["router_final"] = [last_router[layer] for layer in sorted(last_router)]
    return events


def check_events(events: dict, jsonl_path: Path) -> None:
    """Refuse a run that did not finish, or any figure a record reads that is missing, mistyped or not finite."""
    missing = [event for event in FINISHED if event not in events]
    if missing:
        raise RecordError(f"{jsonl_path}: no {', '.join(missing)} event: the run did not finish")
    for event, fields in FIGURES.items():  # artifact first: a failed run is reported as such, not by its NaN score
        if event in events:
            check_figures(events[event], fields, f"{jsonl_path}: {event}")
        if event == "artifact" and events[event]["status"] not in ("OK", "OVER"):  # OVER: the caller weighs the size
            raise RecordError(f"{jsonl_path}: artifact status {events[event]['status']!r}: the run failed")
    for router in events["router_final"]:
        check_figures(router, ROUTER_FIGURES, f"{jsonl_path}: router layer {router['layer']}")


def check_figures(record: dict, fields: dict, where: str) -> None:
    for field, kind in fields.items():
        if field not in record:
            raise RecordError(f"{where} has no {field}")
        if not fits(record[field], kind):
            raise RecordError(f"{where} {field} is {json.dumps(record[field])[:60]}, not {KINDS[kind]}")


def fits(value, kind: type) -> bool:
    if kind is str:
        return isinstance(value, str)
    if kind is list:
        return isinstance(value, list) and all(fits(x, float) for x in value)
    # bool is an int in Python, but true is no count; the bound also refuses NaN, infinities and ints no float holds.
    return (not isinstance(value, bool) and isinstance(value, int if kind is int else (int, float))
            and 0 <= value <= sys.float_info.max)


def run_paths(run: str) -> tuple[Path, Path]:
    """A run given as logs/<RUN_ID>.txt (or .jsonl) or as a bare RUN_ID."""
    path = Path(run) if run.endswith((".txt", ".jsonl")) else Path("logs") / f"{run}.txt"
    return path.with_suffix(".txt"), path.with_suffix(".jsonl")


def load_run(run: str, track: str) -> dict:
    text_path, jsonl_path = run_paths(run)
    for path in (text_path, jsonl_path):
        if not path.is_file():
            raise RecordError(f"{run}: {path} {'is not a file' if path.exists() else 'not found'}")
    source, environment, config = read_log(text_path)
    events = read_events(jsonl_path)
    check_events(events, jsonl_path)
    artifact = events["artifact"]
    if artifact["status"] == "OVER" or artifact["artifact_bytes"] > CAP_BYTES:
        raise RecordError(f"{run}: artifact {artifact['artifact_bytes']:,} bytes is over the {CAP_BYTES:,}-byte cap")
    # A size claimed by the log must be the size of what the run wrote, if it is still here to look at.
    artifact_path = Path(artifact["path"])
    if artifact_path.is_file() and artifact_path.stat().st_size != artifact["model_bytes"]:
        raise RecordError(f"{run}: {artifact_path} is {artifact_path.stat().st_size} bytes, "
                          f"the log says {artifact['model_bytes']}")
    limit_ms = TRACK_LIMIT_MS[track]
    if limit_ms is not None and events["train_done"]["train_time_ms"] > limit_ms:
        raise RecordError(f"{run}: trained {events['train_done']['train_time_ms']} ms, over {track}'s {limit_ms} ms")
    return {"text_path": text_path, "jsonl_path": jsonl_path, "source": source, "environment": environment,
            "config": config, "events": events, "seed": int(config["seed"])}


def pre_export_bpb(events: dict) -> float:
    """The last score before export: of the EMA weights when the run kept an EMA, else of the raw weights."""
    return events.get("final_ema", events["final_raw"])["val_bpb"]


def hardware(environment: str, world_size: str) -> str:
    gpu = re.search(r"^cuda \S+ gpu (.+)$", environment, re.M)
    return f"{world_size}x {gpu.group(1)}" if gpu else f"{world_size}x CPU"


def student_t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with df degrees of freedom, through the regularized incomplete beta function:
    P(|T| > t) = I_x(df/2, 1/2) with x = df / (df + t^2)."""
    tail = 0.5 * incomplete_beta(df / (df + t * t), df / 2, 0.5)
    return tail if t >= 0 else 1 - tail


def incomplete_beta(x: float, a: float, b: float) -> float:
    """Regularized incomplete beta I_x(a, b) by its continued fraction (Numerical Recipes, betacf), using the
    symmetry I_x(a, b) = 1 - I_{1-x}(b, a) where the fraction converges slowly."""
    if x <= 0 or x >= 1:
        return max(0.0, min(1.0, x))
    if x > (a + 1) / (a + b + 2):
        return 1 - incomplete_beta(1 - x, b, a)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(1 - x)) / a
    tiny = 1e-300
    c, d = 1.0, 1 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 300):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1 + numerator * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1) < 1e-15:
            break
    return front * result


def welch_p_value(ours: list[float], baseline: list[float]) -> float:
    """One-sided Welch t-test, H1: mean(ours) < mean(baseline). Needs at least 2 values on each side."""
    var_ours, var_base = statistics.variance(ours) / len(ours), statistics.variance(baseline) / len(baseline)
    diff = statistics.fmean(baseline) - statistics.fmean(ours)
    if var_ours + var_base == 0:
        return 0.0 if diff > 0 else 1.0
    t = diff / math.sqrt(var_ours + var_base)
    df = (var_ours + var_base) ** 2 / (var_ours ** 2 / (len(ours) - 1) + var_base ** 2 / (len(baseline) - 1))
    return student_t_sf(t, df)


def submission(runs: list[dict], args, code_bytes: int) -> dict:
    first = runs[0]
    config, model = first["config"], first["events"]["model"]
    losses = [r["events"]["final_roundtrip"]["val_loss"] for r in runs]
    bpbs = [r["events"]["final_roundtrip"]["val_bpb"] for r in runs]
    result = {
        "author": args.author, "github_id": args.github_id, "name": args.name, "blurb": args.blurb,
        "date": time.strftime("%Y-%m-%d"), "track": args.track,
        "val_loss": statistics.fmean(losses), "val_bpb": statistics.fmean(bpbs),
        # Every seed's artifact must fit, so the record claims the largest.
        "bytes_total": max(r["events"]["artifact"]["artifact_bytes"] for r in runs), "bytes_code": code_bytes,
        "seeds": [r["seed"] for r in runs],
        "seed_results": {str(r["seed"]): {
            "val_loss": r["events"]["final_roundtrip"]["val_loss"], "val_bpb": r["events"]["final_roundtrip"]["val_bpb"],
            "artifact_bytes": r["events"]["artifact"]["artifact_bytes"], "steps": r["events"]["train_done"]["steps"],
            "step_avg_ms": r["events"]["train_done"]["step_avg_ms"]} for r in runs},
        "val_bpb_std": statistics.stdev(bpbs) if len(runs) > 1 else None,
        "pre_quant_val_bpb": statistics.fmean(pre_export_bpb(r["events"]) for r in runs),
        "hardware": hardware(first["environment"], config["world_size"]),
        "pytorch_version": re.search(r"torch (\S+)", first["environment"]).group(1),
        "mlp_mode": config["mlp_mode"],
    }
    if config["mlp_mode"] != "dense":
        # soft computes every expert under a softmax gate; TOP_K and ROUTER do not apply to it.
        soft = config["mlp_mode"] == "soft"
        result.update(router="softmax" if soft else config["router"], num_experts=int(config["num_experts"]),
                      top_k=int(config["num_experts"]) if soft else int(config["top_k"]),
                      active_params=model["active_params"], total_params=model["params"])
    if args.baseline_loss:
        result["baseline_val_loss"] = statistics.fmean(args.baseline_loss)
        result["improvement_nats"] = result["baseline_val_loss"] - result["val_loss"]
        if len(args.baseline_loss) > 1 and len(runs) > 1:
            result["p_value"] = welch_p_value(losses, args.baseline_loss)
    if args.baseline_bpb:
        result["baseline_val_bpb"] = statistics.fmean(args.baseline_bpb)
        result["improvement_bpb"] = result["baseline_val_bpb"] - result["val_bpb"]
    return result


def readme(runs: list[dict], sub: dict) -> str:
    config = runs[0]["config"]
    lines = [f"# {sub['name']}", "", sub["blurb"], "",
             f"Track `{sub['track']}`, {sub['hardware']}, PyTorch {sub['pytorch_version']}, {sub['date']}, "
             f"by {sub['author']} (@{sub['github_id']}).", "",
             f"**val_bpb {sub['val_bpb']:.8f}** (val_loss {sub['val_loss']:.8f} nats), mean of {len(runs)} seed(s)"
             + (f", std {sub['val_bpb_std']:.8f}" if sub["val_bpb_std"] is not None else "")
             + f"; artifact at most {sub['bytes_total']:,} bytes ({sub['bytes_code']:,} of them the script).", ""]
    if "improvement_nats" in sub:
        lines += [f"Against a baseline of mean val_loss {sub['baseline_val_loss']:.8f}: {sub['improvement_nats']:.5f} nats better"
                  + (f", one-sided Welch t-test p = {sub['p_value']:.3g}." if "p_value" in sub else "."), ""]
    lines += ["## Launch", "", "Each seed was run as (from its `config launch:` line):", "", "```bash"]
    lines += [r["config"]["launch"] for r in runs]
    lines += ["```", "", "## Results", "",
              "| seed | val_loss | val_bpb | pre-export val_bpb | artifact bytes | steps | ms/step | train time (s) |",
              "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        ev = r["events"]
        lines.append(f"| {r['seed']} | {ev['final_roundtrip']['val_loss']:.8f} | {ev['final_roundtrip']['val_bpb']:.8f} | "
                     f"{pre_export_bpb(ev):.8f} | {ev['artifact']['artifact_bytes']:,} | {ev['train_done']['steps']} | "
                     f"{ev['train_done']['step_avg_ms']:.2f} | {ev['train_done']['train_time_ms'] / 1000:.1f} |")
    if "num_experts" in sub:
        lines += ["", "## Mixture of experts", "",
                  f"Mode `{sub['mlp_mode']}`, router `{sub['router']}`, {sub['num_experts']} experts, top-{sub['top_k']}, "
                  f"MoE layers {config['moe_layers']}; {sub['active_params']:,} parameters active per token of "
                  f"{sub['total_params']:,}.", "",
                  "Expert load over the last logged window of training (share of routed tokens per expert):", "",
                  "| seed | layer | max / mean | dead experts | load |", "|---|---|---|---|---|"]
        for r in runs:
            for layer in r["events"]["router_final"]:
                lines.append(f"| {r['seed']} | {layer['layer']} | {layer['max_over_mean']:.3f} | {layer['dead']} | "
                             + " ".join(f"{x:.3f}" for x in layer["load"]) + " |")
    lines += ["", "## Configuration", "", "```"]
    lines += [f"{k}:{v}" for k, v in config.items() if k not in PER_RUN_CONFIG]
    lines += ["```", "", "Files: `train_moe.py` exactly as run (byte-identical to the source at the top of each log), "
              "and each seed's `<RUN_ID>.txt` / `<RUN_ID>.jsonl` log.", ""]
    return "\n".join(lines)


def make_record(args: argparse.Namespace) -> tuple[Path, dict]:
    for flag, values in (("--baseline-loss", args.baseline_loss), ("--baseline-bpb", args.baseline_bpb)):
        if not all(map(math.isfinite, values or [])):
            raise RecordError(f"{flag} {' '.join(map(str, values))}: every value must be a finite number")
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", args.name).strip("_")
    if not slug:
        raise RecordError(f"--name {args.name!r} has no letter or digit to name the record folder")
    runs = [load_run(run, args.track) for run in args.runs]
    runs.sort(key=lambda r: r["seed"])
    if len({r["seed"] for r in runs}) != len(runs):
        raise RecordError("the same seed is given twice")
    first = runs[0]
    for r in runs[1:]:
        if r["source"] != first["source"]:
            raise RecordError(f"{r['text_path']} and {first['text_path']} ran different train_moe.py sources")
        differing = [k for k in set(r["config"]) | set(first["config"])
                     if k not in PER_RUN_CONFIG and r["config"].get(k) != first["config"].get(k)]
        if differing:
            raise RecordError(f"{r['text_path']} and {first['text_path']} differ in {', '.join(sorted(differing))}")

    sub = submission(runs, args, len(first["source"]))
    folder = Path("records") / args.track / f"{sub['date']}_{slug}"
    if folder.exists():
        raise RecordError(f"{folder} already exists; not overwriting a record")
    logs = [path for r in runs for path in (r["text_path"], r["jsonl_path"])]
    if len({path.name for path in logs}) != len(logs):
        raise RecordError(f"two runs' logs have the same file name: {', '.join(map(str, logs))}")
    files = {"train_moe.py": first["source"], "submission.json": (json.dumps(sub, indent=2) + "\n").encode(),
             "README.md": readme(runs, sub).encode(), **{path.name: path.read_bytes() for path in logs}}
    # Written under a temporary name and renamed when complete, so a failure never leaves a half record.
    partial = folder.with_name(f".{folder.name}.partial")
    partial.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(partial, ignore_errors=True)  # left by a run that was killed
    try:
        partial.mkdir()
        for name, data in files.items():
            (partial / name).write_bytes(data)
        partial.rename(folder)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return folder, sub


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", required=True, help="logs/<RUN_ID>.txt paths or RUN_IDs, one per seed")
    parser.add_argument("--track", required=True, choices=sorted(TRACK_LIMIT_MS))
    parser.add_argument("--name", required=True, help="record name; also names the folder")
    parser.add_argument("--author", required=True)
    parser.add_argument("--github-id", required=True)
    parser.add_argument("--blurb", required=True, help="one or two sentences: what and why")
    parser.add_argument("--baseline-loss", type=float, nargs="+", help="per-seed val_loss of the record to beat")
    parser.add_argument("--baseline-bpb", type=float, nargs="+", help="per-seed val_bpb of the record to beat")
    args = parser.parse_args()
    try:
        folder, sub = make_record(args)
    except (RecordError, OSError) as e:  # OSError: the record folder could not be written
        sys.exit("error: " + " ".join(str(e).split()))  # one line, whatever the message holds
    print(f"wrote {folder}: val_bpb {sub['val_bpb']:.8f} over seeds {sub['seeds']}, {sub['bytes_total']:,} bytes")


if __name__ == "__main__":
    main()
