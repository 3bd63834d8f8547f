r"""Build a Parameter Golf record folder from finished train_moe.py runs (one per seed).

    python scripts/make_record.py --runs logs/seed1.txt logs/seed2.txt logs/seed3.txt \
        --track track_10min_16mb --name "Sparse MoE 8x top-2" --author "Ada" --github-id ada \
        --blurb "..." [--baseline-loss 2.07 2.06 2.08] [--baseline-bpb 1.224 1.223 1.225]

Writes records/<track>/<YYYY-MM-DD>_<name>/ (relative to the current directory, normally the repo root) with
train_gpt.py, the trainer exactly as run (taken from the logs, never from the working tree) packed into the
self-extracting script whose bytes the artifact counts, the same source readable as train_moe.py (not counted), each
seed's .txt and .jsonl log, README.md and submission.json. Refuses runs that are unfinished, failed, over the size
cap, over the track's time limit, whose logs are not train_moe.py's or hold a missing, mistyped or non-finite figure,
whose .jsonl disagrees with its text log or holds a second final event or an error, whose artifact (if still there)
is not the one logged, whose sources or settings differ, that share a seed, or, on track_10min_16mb, that did not run
the challenge's setting (8 GPUs of the H100 family, the challenge's sp1024 val split and tokenizer). Every problem of
every run is printed as its own `error:` line, then it exits with status 1; it never overwrites a record nor leaves a
half-written one.
"""
import argparse
import hashlib
import json
import math
import re
import shutil
import statistics
import sys
import time
from pathlib import Path, PurePosixPath

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from train_moe import pack_code  # noqa: E402

SEPARATOR = b"=" * 100
CAP_BYTES = 16_000_000
TRACK_LIMIT_MS = {"track_10min_16mb": 600_000, "track_non_record_16mb": None}
# Settings that may differ between the seeds of one record; everything else must match.
PER_RUN_CONFIG = ("run_id", "seed", "launch")
# The figures a record reads, per event. json.loads takes NaN and Infinity, so each is checked to be finite.
FIGURES = {
    "artifact": {"code_bytes": int, "model_bytes": int, "artifact_bytes": int, "status": str, "path": str, "sha256": "sha256"},
    "model": {"params": int, "active_params": int},
    "train_done": {"steps": int, "train_time_ms": float, "step_avg_ms": float},
    "final_raw": {"val_loss": float, "val_bpb": float},
    "final_ema": {"val_loss": float, "val_bpb": float},
    "final_roundtrip": {"val_loss": float, "val_bpb": float},
}
ROUTER_FIGURES = {"layer": int, "max_over_mean": float, "dead": int, "load": list}
FINISHED = [event for event in FIGURES if event != "final_ema"]  # final_ema only when the run kept an EMA
KINDS = {int: "an integer >= 0", float: "a finite number >= 0", str: "a string", list: "a list of finite numbers >= 0",
         "sha256": "a SHA-256 (64 hex digits)"}

# What a run must show on the record track (track_non_record_16mb takes any hardware, data and world size).
RECORD_TRACK = "track_10min_16mb"
RECORD_WORLD_SIZE = 8
# The challenge's machines are 8xH100 SXM, whose torch.cuda.get_device_name() (the `cuda <ver> gpu <name>` line of
# the environment report) is "NVIDIA H100 80GB HBM3". Any H100 passes: "NVIDIA H100" alone or followed by a space and
# a variant ("NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA H100 NVL"). Every other name fails, among them the
# H200, H800, GH200, H20 and A100, and so does a report without a `gpu` line (a CPU run).
H100_NAME = re.compile(r"NVIDIA H100(?: .*)?")
RECORD_VOCAB_SIZE = 1024
RECORD_TOKENIZER = "fineweb_1024_bpe.model"  # the challenge's name for its sp1024 tokenizer (data/download.py)
# The challenge's sp1024 val split (fineweb10B_sp1024/fineweb_val_*.bin), recognised by its token count. The baseline
# train_gpt.py logs `val_loader:shards pattern=... tokens:N` with N = the val split's scored targets, cut to a
# multiple of TRAIN_SEQ_LEN (train_moe.py's `model` event `val_tokens` is the same count). In openai/parameter-golf
# (commit 4908dc4, 2026-05-02) 57 logs under records/track_10min_16mb/ print tokens:62021632, e.g.
# records/track_10min_16mb/2026-03-17_LoRA_TTT/train_v0.txt (TRAIN_SEQ_LEN=1024) and
# records/track_10min_16mb/2026-03-18_LongContextSeq2048/train.log (TRAIN_SEQ_LEN=2048); only the first record,
# 2026-03-17_NaiveBaseline/train.log, prints 63779840, from a pre-release export (its 25-train-shard
# "hf_verify_sp1024" run). 62,021,632 = 60,568 x 1024, so the split's targets (tokens - 1) number 62,021,632 to
# 62,022,655; a third-party 4xH100 note that logs the untrimmed count gives 62,021,845, inside that range.
OFFICIAL_VAL_TOKENS = 62_021_632  # at TRAIN_SEQ_LEN=1024
OFFICIAL_VAL_TARGETS = (OFFICIAL_VAL_TOKENS, OFFICIAL_VAL_TOKENS + 1023)  # the range of tokens - 1 that gives it


class RecordError(Exception):
    """A run, log or argument that cannot make (or pass as) a record. Holds one or more problems (its args); main
    prints each as its own `error:` line."""

    def __str__(self) -> str:
        return "; ".join(map(str, self.args))


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
    """split_log of a file, with its settings checked; a RecordError names the file in each of its problems."""
    try:
        source, environment, config = split_log(text_path.read_bytes())
    except OSError as e:
        raise RecordError(f"{text_path}: cannot be read ({e.strerror})") from None
    except RecordError as e:
        raise RecordError(f"{text_path}: {e}") from None
    problems = config_problems(config, environment)
    if problems:
        raise RecordError(*(f"{text_path}: {problem}" for problem in problems))
    return source, environment, config


def config_problems(config: dict, environment: str) -> list[str]:
    """Every setting a record reads that the log lacks or that is not an integer where one is needed."""
    problems = []
    needed = ["seed", "world_size", "mlp_mode", "launch"]
    if config.get("mlp_mode") != "dense":
        needed += ["router", "num_experts", "top_k", "moe_layers"]
    for key in needed:
        if key not in config:
            problems.append(f"no 'config {key}:' line: not a finished train_moe.py log")
        elif key in ("seed", "world_size", "num_experts", "top_k") and not re.fullmatch(r"-?\d+", config[key]):
            problems.append(f"config {key}:{config[key]} is not an integer")
    if not re.search(r"torch \S+", environment):
        problems.append("no torch version in the environment report: not a train_moe.py log")
    return problems


def read_events(jsonl_path: Path) -> dict:
    """Events of a logs/<RUN_ID>.jsonl by name; the last one wins, except `router`, whose last report per MoE layer
    is kept under "router_final" as a list ordered by layer. A line that is no event is a RecordError, and so is a
    second event of a kind a run logs once (FIGURES'): appended, it would pass for the run's result."""
    try:
        text = jsonl_path.read_bytes().decode("utf-8")
    except OSError as e:
        raise RecordError(f"{jsonl_path}: cannot be read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise RecordError(f"{jsonl_path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    events, last_router, lines = {}, {}, {}
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
            problems = figure_problems(record, {"layer": int}, f"{jsonl_path}:{number}: router")
            if problems:
                raise RecordError(*problems)
            last_router[record["layer"]] = record
        elif record["event"] in FIGURES and record["event"] in lines:
            raise RecordError(f"{jsonl_path}:{number}: a second {record['event']} event (the first is on line "
                              f"{lines[record['event']]}); a run logs one")
        else:
            events[record["event"]], lines[record["event"]] = record, number
    events["router_final"] = [last_router[layer] for layer in sorted(last_router)]
    return events


def check_events(events: dict, jsonl_path: Path) -> list[str]:
    """Why the events cannot make a record, empty when they can: the events of a finished run that are missing, and
    the first figure a record reads that is missing, mistyped or not finite (a log holding one is not trusted
    further, so one bad figure repeated across router layers is one problem)."""
    problems = []
    if "error" in events:  # logged by a run that failed, even after its scores (a signal, an artifact over the cap)
        return [f"{jsonl_path}: the run failed: {str(events['error'].get('message'))[:200]}"]
    missing = [event for event in FINISHED if event not in events]
    if missing:
        problems.append(f"{jsonl_path}: no {', '.join(missing)} event: the run did not finish")
    for event, fields in FIGURES.items():  # artifact first: a failed run is reported as such, not by its NaN scores
        if event not in events:
            continue
        figures = figure_problems(events[event], fields, f"{jsonl_path}: {event}")
        if figures:
            return problems + figures[:1]
        if event == "artifact" and events[event]["status"] not in ("OK", "OVER"):  # OVER: the caller weighs the size
            return problems + [f"{jsonl_path}: artifact status {events[event]['status']!r}: the run failed"]
    for router in events["router_final"]:
        figures = figure_problems(router, ROUTER_FIGURES, f"{jsonl_path}: router layer {router['layer']}")
        if figures:
            return problems + figures[:1]
    return problems


def disagreements(events: dict, text_path: Path, jsonl_path: Path) -> list[str]:
    """Where the .jsonl's figures differ from the text log's own `event key:value` lines (the trainer writes both from
    one value, the text rounded to the digits it shows), or where the text log has no such line or more than one."""
    lines = {}
    for line in text_path.read_bytes().split(SEPARATOR)[-1].decode("utf-8", "replace").splitlines():
        event, _, rest = line.partition(" ")
        if event in FIGURES:
            lines.setdefault(event, []).append(dict(item.partition(":")[::2] for item in rest.split(" ")))
    problems = []
    for event, fields in FIGURES.items():
        if event not in events:
            continue
        if len(lines.get(event, [])) != 1:
            problems.append(f"{text_path} has {len(lines.get(event, []))} `{event}` lines; {jsonl_path} has the event once")
            continue
        shown = lines[event][0]
        for key in sorted(set(shown) | set(fields)):
            if key not in shown or not shows(shown[key], events[event].get(key)):
                problems.append(f"{jsonl_path}: {event} {key} is {json.dumps(events[event].get(key))}, but {text_path} "
                                f"logs {key}:{shown.get(key, '(nothing)')}")
    return problems


def shows(text: str, value) -> bool:
    """Whether a value of the .jsonl is what the text log shows: numbers to the digits shown, the rest exactly."""
    if isinstance(value, list):
        return len(parts := text.split(",")) == len(value) and all(map(shows, parts, value))
    if not isinstance(value, float):
        return text == str(value)
    try:
        decimals = len(text.partition(".")[2])
        return abs(float(text) - value) <= 0.5 * 10.0**-decimals * (1 + 1e-9) or text == str(value)
    except (ValueError, OverflowError):
        return False


def figure_problems(record: dict, fields: dict, where: str) -> list[str]:
    problems = []
    for field, kind in fields.items():
        if field not in record:
            problems.append(f"{where} has no {field}")
        elif not fits(record[field], kind):
            problems.append(f"{where} {field} is {json.dumps(record[field])[:60]}, not {KINDS[kind]}")
    return problems


def fits(value, kind: type | str) -> bool:
    if kind is str:
        return isinstance(value, str)
    if kind == "sha256":
        return isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value) is not None
    if kind is list:
        return isinstance(value, list) and all(fits(x, float) for x in value)
    # bool is an int in Python, but true is no count; the bound also refuses NaN, infinities and ints no float holds.
    return (not isinstance(value, bool) and isinstance(value, int if kind is int else (int, float))
            and 0 <= value <= sys.float_info.max)


def run_paths(run: str) -> tuple[Path, Path]:
    """A run given as logs/<RUN_ID>.txt (or .jsonl) or as a bare RUN_ID."""
    path = Path(run) if run.endswith((".txt", ".jsonl")) else Path("logs") / f"{run}.txt"
    return path.with_suffix(".txt"), path.with_suffix(".jsonl")


def load_run(run: str, track: str) -> tuple[dict | None, list[str]]:
    """A run's logs and every problem that keeps it from `track`. The run is None when its logs cannot be read or
    trusted (then only why is known); otherwise it is returned with its problems, so that the checks across runs
    (seeds, settings, sources) still see it."""
    text_path, jsonl_path = run_paths(run)
    missing = [f"{run}: {path} {'is not a file' if path.exists() else 'not found'}"
               for path in (text_path, jsonl_path) if not path.is_file()]
    if missing:
        return None, missing
    problems, log, events = [], None, None
    try:
        log = read_log(text_path)
    except RecordError as e:
        problems += e.args
    try:
        events = read_events(jsonl_path)
    except RecordError as e:
        problems += e.args
    if events is not None:
        problems += check_events(events, jsonl_path)
    if log is not None and events is not None and not problems:
        problems += disagreements(events, text_path, jsonl_path)
    if problems:
        return None, problems
    source, environment, config = log
    artifact = events["artifact"]
    if artifact["status"] == "OVER" or artifact["artifact_bytes"] > CAP_BYTES:
        problems.append(f"{run}: artifact {artifact['artifact_bytes']:,} bytes is over the {CAP_BYTES:,}-byte cap")
    if artifact["artifact_bytes"] != artifact["code_bytes"] + artifact["model_bytes"]:
        problems.append(f"{run}: artifact_bytes {artifact['artifact_bytes']} is not code_bytes {artifact['code_bytes']} "
                        f"+ model_bytes {artifact['model_bytes']}")
    problems += [f"{run}: {problem}" for problem in artifact_problems(artifact)]
    limit_ms = TRACK_LIMIT_MS[track]
    if limit_ms is not None and events["train_done"]["train_time_ms"] > limit_ms:
        problems.append(f"{run}: trained {events['train_done']['train_time_ms']} ms, over {track}'s {limit_ms} ms")
    problems += [f"{run}: {problem}" for problem in track_problems(track, environment, config, events)]
    return {"run": run, "text_path": text_path, "jsonl_path": jsonl_path, "source": source,
            "environment": environment, "config": config, "events": events, "seed": int(config["seed"])}, problems


def artifact_problems(artifact: dict) -> list[str]:
    """The artifact a log names, if it is still here, must be the one the run wrote: its size and SHA-256 as logged.
    When it is gone, its figures are checked against the text log's (disagreements)."""
    path = Path(artifact["path"])
    if not path.is_file():
        return []
    data = path.read_bytes()
    if len(data) != artifact["model_bytes"]:
        return [f"{path} is {len(data)} bytes, the log says {artifact['model_bytes']}"]
    if hashlib.sha256(data).hexdigest() != artifact["sha256"]:
        return [f"{path} is not this run's artifact: its SHA-256 is {hashlib.sha256(data).hexdigest()}, the log says "
                f"{artifact['sha256']}"]
    return []


def gpu_name(environment: str) -> str | None:
    """The GPU of the environment report's `cuda <version> gpu <name>` line; None for a CPU run."""
    gpu = re.search(r"^cuda \S+ gpu (.+)$", environment, re.M)
    return gpu.group(1).strip() if gpu else None


def track_problems(track: str, environment: str, config: dict, events: dict) -> list[str]:
    """Where a finished run's log does not show the setting `track` requires: on track_10min_16mb, 8 processes on
    H100s, the challenge's tokenizer and its val split. Other tracks take any hardware, data and world size."""
    if track != RECORD_TRACK:
        return []
    problems = []
    world_size = config.get("world_size")
    if world_size != str(RECORD_WORLD_SIZE):
        problems.append(f"world size {world_size}: {track} runs on {RECORD_WORLD_SIZE} GPUs "
                        f"(torchrun --standalone --nproc_per_node={RECORD_WORLD_SIZE})")
    gpu = gpu_name(environment)
    if gpu is None:
        problems.append(f"no GPU in the environment report (no `cuda ... gpu ...` line): a CPU run; "
                        f"{track} runs on {RECORD_WORLD_SIZE}xH100")
    elif not H100_NAME.fullmatch(gpu):
        problems.append(f"GPU {gpu!r} is not an H100: {track} runs on {RECORD_WORLD_SIZE}xH100")
    vocab_size = config.get("vocab_size")
    if vocab_size != str(RECORD_VOCAB_SIZE):
        problems.append(f"vocab size {vocab_size}: the challenge's tokenizer has {RECORD_VOCAB_SIZE} pieces")
    tokenizer = config.get("tokenizer_path")
    if tokenizer is None or PurePosixPath(tokenizer.replace("\\", "/")).name != RECORD_TOKENIZER:
        problems.append(f"tokenizer {tokenizer}: not the challenge's {RECORD_TOKENIZER}")
    val_tokens, seq_len = events["model"].get("val_tokens"), config.get("train_seq_len")
    if not fits(val_tokens, int):
        problems.append(f"model event val_tokens is {json.dumps(val_tokens)[:60]}, not a count of val tokens: "
                        f"the val split cannot be shown to be the challenge's")
    elif seq_len is None or not re.fullmatch(r"\d+", seq_len) or int(seq_len) == 0:
        problems.append(f"config train_seq_len:{seq_len} is not a positive integer: the val split cannot be shown "
                        f"to be the challenge's")
    elif not is_official_val_split(val_tokens, int(seq_len)):
        problems.append(f"val split of {val_tokens:,} scored tokens at TRAIN_SEQ_LEN={seq_len}: not the challenge's "
                        f"fineweb10B_sp1024 val split ({OFFICIAL_VAL_TOKENS:,} at TRAIN_SEQ_LEN=1024)")
    return problems


def is_official_val_split(val_tokens: int, seq_len: int) -> bool:
    """Whether `val_tokens` scored targets at `seq_len` can come from the challenge's val split: the trainer cuts the
    split's targets (tokens - 1, somewhere in OFFICIAL_VAL_TARGETS) down to a multiple of seq_len, so the count must
    be such a multiple with [val_tokens, val_tokens + seq_len) meeting that range. At a seq_len that is a multiple of
    1024 exactly one count passes (62,021,632 at 1024, 2048, 4096 and 8192); at another, each multiple of it that
    some count in that range cuts down to, since the official logs do not pin the split's size closer than that."""
    low, high = OFFICIAL_VAL_TARGETS
    return val_tokens % seq_len == 0 and val_tokens <= high and val_tokens + seq_len > low


def pre_export_bpb(events: dict) -> float:
    """The last score before export: of the EMA weights when the run kept an EMA, else of the raw weights."""
    return events.get("final_ema", events["final_raw"])["val_bpb"]


def hardware(environment: str, world_size: str) -> str:
    return f"{world_size}x {gpu_name(environment) or 'CPU'}"


def welch_p_value(ours: list[float], baseline: list[float]) -> float:
    """One-sided Welch t-test, H1: mean(ours) < mean(baseline), by scipy.stats.ttest_ind(equal_var=False,
    alternative="less"). Needs at least 2 values on each side. When neither side varies there is nothing to test
    (scipy gives NaN, which JSON cannot hold): 0 if ours is lower, else 1."""
    if statistics.variance(ours) == 0 and statistics.variance(baseline) == 0:
        return 0.0 if statistics.fmean(ours) < statistics.fmean(baseline) else 1.0
    from scipy.stats import ttest_ind  # here: check_record.py imports this module and needs no scipy
    return float(ttest_ind(ours, baseline, equal_var=False, alternative="less").pvalue)


def submission(runs: list[dict], args, code_bytes: int, date: str) -> dict:
    first = runs[0]
    config, model = first["config"], first["events"]["model"]
    losses = [r["events"]["final_roundtrip"]["val_loss"] for r in runs]
    bpbs = [r["events"]["final_roundtrip"]["val_bpb"] for r in runs]
    result = {
        "author": args.author, "github_id": args.github_id, "name": args.name, "blurb": args.blurb,
        "date": date, "track": args.track,
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
    lines += ["```", "", "Files: `train_gpt.py`, the trainer exactly as run (it unpacks to the source at the top of each "
              "log, byte for byte) in the self-extracting form whose bytes the artifact counts; `train_moe.py`, the same "
              "source readable (not counted); and each seed's `<RUN_ID>.txt` / `<RUN_ID>.jsonl` log.", ""]
    return "\n".join(lines)


def config_differences(run: dict, first: dict) -> str | None:
    """The settings (other than PER_RUN_CONFIG) in which two runs differ, as `key <first's value> vs <run's value>`."""
    keys = sorted(k for k in set(run["config"]) | set(first["config"])
                  if k not in PER_RUN_CONFIG and run["config"].get(k) != first["config"].get(k))
    if not keys:
        return None
    return ", ".join(f"{k} {first['config'].get(k, '(none)')} vs {run['config'].get(k, '(none)')}" for k in keys)


def across_runs_problems(runs: list[dict]) -> list[str]:
    """Runs (sorted by seed) that cannot be seeds of one record: a seed given twice, settings or sources that differ
    from the first run's. Every such problem, not the first."""
    problems = []
    by_seed = {}
    for r in runs:
        by_seed.setdefault(r["seed"], []).append(str(r["text_path"]))
    for seed, paths in by_seed.items():
        if len(paths) > 1:
            problems.append(f"{', '.join(paths[:-1])} and {paths[-1]} ran the same seed {seed}; give each seed once")
    for r in runs[1:]:
        first = runs[0]
        if r["source"] != first["source"]:
            problems.append(f"{r['text_path']} and {first['text_path']} ran different train_moe.py sources")
        differing = config_differences(r, first)
        if differing:
            problems.append(f"{first['text_path']} and {r['text_path']} differ in settings: {differing}")
    return problems


def make_record(args: argparse.Namespace) -> tuple[Path, dict]:
    """Every problem of the arguments, of each run and across the runs is collected and raised in one RecordError;
    with none, the record is written."""
    problems = []
    for flag, values in (("--baseline-loss", args.baseline_loss), ("--baseline-bpb", args.baseline_bpb)):
        if not all(map(math.isfinite, values or [])):
            problems.append(f"{flag} {' '.join(map(str, values))}: every value must be a finite number")
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", args.name).strip("_")
    if not slug:
        problems.append(f"--name {args.name!r} has no letter or digit to name the record folder")
    loaded = []
    for run in args.runs:
        r, run_problems = load_run(run, args.track)
        problems += run_problems
        if r is not None:
            loaded.append(r)
    runs = sorted(loaded, key=lambda r: r["seed"])
    problems += across_runs_problems(runs)
    date = time.strftime("%Y-%m-%d")
    folder = Path("records") / args.track / f"{date}_{slug}"
    if slug and folder.exists():
        problems.append(f"{folder} already exists; not overwriting a record")
    logs = [path for r in runs for path in (r["text_path"], r["jsonl_path"])]
    if len({path.name for path in logs}) != len(logs):
        problems.append(f"two runs' logs have the same file name: {', '.join(map(str, logs))}")
    if problems:
        raise RecordError(*problems)

    first = runs[0]
    script = pack_code(first["source"])
    for r in runs:  # the bytes each run counted are the script's
        if r["events"]["artifact"]["code_bytes"] != len(script):
            problems.append(f"{r['run']}: counted {r['events']['artifact']['code_bytes']} code bytes, but its source packs "
                            f"to {len(script)}: not a train_moe.py that counts its packed script")
    if problems:
        raise RecordError(*problems)
    sub = submission(runs, args, len(script), date)
    files = {"train_gpt.py": script, "train_moe.py": first["source"], "submission.json": (json.dumps(sub, indent=2) + "\n").encode(),
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
        for problem in e.args if isinstance(e, RecordError) else [e]:
            print("error: " + " ".join(str(problem).split()), file=sys.stderr)  # one line, whatever it holds
        sys.exit(1)
    print(f"wrote {folder}: val_bpb {sub['val_bpb']:.8f} over seeds {sub['seeds']}, {sub['bytes_total']:,} bytes")


if __name__ == "__main__":
    main()
