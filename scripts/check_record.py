"""Check a record folder made by make_record.py (or by hand) against its own logs.

    python scripts/check_record.py records/track_10min_16mb/2026-05-01_sparse_moe

Checks: README.md, submission.json, train_gpt.py, train_moe.py and at least one log pair (<RUN_ID>.txt +
<RUN_ID>.jsonl) are present; submission.json has the challenge's fields with the right types; each .jsonl agrees with
its text log (as make_record.py checks); every claimed score and byte count (per seed and mean) equals what the logs
say; train_gpt.py unpacks to the source at the top of every log byte for byte, and train_moe.py is that source; each
artifact, recomputed as len(train_gpt.py) + the log's model_bytes, fits in 16,000,000 bytes; each run trained within
the track's time limit; the runs share their settings (but RUN_ID, SEED and the launch line); the claimed hardware
is the logs'; and, in track_10min_16mb, each run shows the challenge's setting (8 GPUs of the H100 family, the
challenge's sp1024 val split and tokenizer; see make_record.track_problems). Prints every problem to stderr, one
`error:` line each, and exits 1; or prints one OK line.
"""
import argparse
import json
import math
import re
import statistics
import sys
from collections.abc import Iterator
from pathlib import Path

from make_record import (CAP_BYTES, TRACK_LIMIT_MS, RecordError, check_events, config_differences, disagreements,
                         hardware, pre_export_bpb, read_events, read_log, track_problems)
from train_moe import unpack_code

NUMBER, INTEGER, TEXT = "number", "integer", "string"
FIELDS = {"author": TEXT, "github_id": TEXT, "name": TEXT, "blurb": TEXT, "date": TEXT, "track": TEXT,
          "val_loss": NUMBER, "val_bpb": NUMBER, "bytes_total": INTEGER, "bytes_code": INTEGER, "seeds": "list",
          "seed_results": "dict", "pre_quant_val_bpb": NUMBER, "hardware": TEXT, "pytorch_version": TEXT}
SEED_FIELDS = {"val_loss": NUMBER, "val_bpb": NUMBER, "artifact_bytes": INTEGER, "steps": INTEGER, "step_avg_ms": NUMBER}


def has_type(value, kind: str) -> bool:
    # bool is an int in Python, but true is no byte count.
    if isinstance(value, bool):
        return False
    return {NUMBER: isinstance(value, (int, float)), INTEGER: isinstance(value, int), TEXT: isinstance(value, str),
            "list": isinstance(value, list), "dict": isinstance(value, dict)}[kind]


def same(claimed, actual) -> bool:
    """Equal up to float formatting: the claims are JSON floats of the logs' values or of their means."""
    return has_type(claimed, NUMBER) and math.isclose(claimed, actual, rel_tol=1e-9, abs_tol=1e-8)


def check(folder: Path) -> tuple[list[str], dict]:
    problems = []
    for name in ("README.md", "submission.json", "train_gpt.py", "train_moe.py"):
        if not (folder / name).is_file():
            problems.append(f"missing {name}")
    track = folder.resolve().parent.name
    if track not in TRACK_LIMIT_MS:
        problems.append(f"folder is not inside one of records/{{{','.join(sorted(TRACK_LIMIT_MS))}}}")
    shipped = source = readable = None  # the counted script, the source it unpacks to, train_moe.py
    for name in ("train_gpt.py", "train_moe.py"):
        try:
            data = (folder / name).read_bytes() if (folder / name).is_file() else None
        except OSError as e:
            problems.append(f"{name}: cannot be read ({e.strerror})")
            continue
        if name == "train_moe.py":
            readable = data
        elif data is not None:
            shipped = data
            try:
                source = unpack_code(shipped)
            except (ValueError, OSError) as e:  # not a string literal, or PPMd refused what it holds
                problems.append(f"train_gpt.py: its packed source does not unpack ({e})")
            if source == shipped:
                source = None
                problems.append("train_gpt.py is not a packed trainer (the self-extracting script make_record writes)")
    if source is not None and readable is not None and readable != source:
        problems.append("train_moe.py differs from the source train_gpt.py unpacks to")

    # The logs: every <RUN_ID>.jsonl with its <RUN_ID>.txt, by seed.
    runs = {}
    for jsonl_path in sorted(folder.glob("*.jsonl")):
        text_path = jsonl_path.with_suffix(".txt")
        if not text_path.is_file():
            problems.append(f"{jsonl_path.name}: its text log {text_path.name} is missing")
            continue
        name = text_path.name
        log = events = None
        unusable = []  # main names the folder once, so each problem drops it
        try:
            log = read_log(text_path)
        except RecordError as e:
            unusable += [str(problem).removeprefix(f"{folder}/") for problem in e.args]
        if log is not None and source is not None and log[0] != source:
            problems.append(f"{name}: train_gpt.py does not unpack to the source this run logged")
        try:
            events = read_events(jsonl_path)
        except RecordError as e:
            unusable += [str(problem).removeprefix(f"{folder}/") for problem in e.args]
        if events is not None:
            unusable += [problem.removeprefix(f"{folder}/") for problem in check_events(events, jsonl_path)]
        if log is not None and events is not None and not unusable:
            unusable += [problem.replace(f"{folder}/", "") for problem in disagreements(events, text_path, jsonl_path)]
        problems += unusable
        if unusable:
            continue
        _, environment, config = log
        artifact = events["artifact"]
        artifact_bytes = (len(shipped) if shipped is not None else artifact["code_bytes"]) + artifact["model_bytes"]
        if artifact_bytes != artifact["artifact_bytes"]:
            problems.append(f"{name}: artifact recomputes to {artifact_bytes} bytes, the log says {artifact['artifact_bytes']}")
        if artifact_bytes > CAP_BYTES:
            problems.append(f"{name}: artifact {artifact_bytes:,} bytes is over the {CAP_BYTES:,}-byte cap")
        limit_ms = TRACK_LIMIT_MS.get(track)
        if limit_ms is not None and events["train_done"]["train_time_ms"] > limit_ms:
            problems.append(f"{name}: trained {events['train_done']['train_time_ms']} ms, over {track}'s {limit_ms} ms")
        problems += [f"{name}: {problem}" for problem in track_problems(track, environment, config, events)]
        if config["seed"] in runs:
            problems.append(f"{name}: seed {config['seed']} is logged twice")
        runs[config["seed"]] = {"events": events, "artifact_bytes": artifact_bytes, "name": name, "config": config,
                                "hardware": hardware(environment, config["world_size"])}
    logged = sorted(runs.values(), key=lambda r: r["name"])
    for r in logged[1:]:
        differing = config_differences(r, logged[0])
        if differing:
            problems.append(f"{logged[0]['name']} and {r['name']} differ in settings: {differing}")
    if not any(folder.glob("*.jsonl")):
        problems.append("no run log (<RUN_ID>.txt + <RUN_ID>.jsonl)")

    # The claims.
    if not (folder / "submission.json").is_file():
        return problems, {}
    try:
        sub = json.loads((folder / "submission.json").read_bytes().decode("utf-8"))
    except (OSError, ValueError) as e:  # ValueError: not UTF-8, or not JSON
        return problems + [f"submission.json: not readable JSON: {e}"], {}
    if not isinstance(sub, dict):
        return problems + [f"submission.json: holds {json.dumps(sub)[:40]}, not a JSON object"], {}
    # json.loads takes NaN and Infinity; no claim can be checked against them.
    bad_numbers = [f"submission.json: {where} is {str(value)[:40]}, not a finite number" for where, value in non_finite(sub)]
    if bad_numbers:
        return problems + bad_numbers, {}
    for field, kind in FIELDS.items():
        if field not in sub:
            problems.append(f"submission.json: no {field}")
        elif not has_type(sub[field], kind):
            problems.append(f"submission.json: {field} should be a {kind}, is {sub[field]!r}")
    if isinstance(sub.get("seeds"), list) and not all(has_type(seed, INTEGER) for seed in sub["seeds"]):
        problems.append(f"submission.json: seeds should be a list of integers, is {sub['seeds']!r}")
    if not (sub.get("val_bpb_std") is None or has_type(sub["val_bpb_std"], NUMBER)):
        problems.append(f"submission.json: val_bpb_std should be a number or null, is {sub['val_bpb_std']!r}")
    if isinstance(sub.get("date"), str) and not re.fullmatch(r"\d{4}-\d{2}-\d{2}", sub["date"]):
        problems.append(f"submission.json: date {sub['date']!r} is not YYYY-MM-DD")
    if isinstance(sub.get("track"), str) and sub["track"] != track:
        problems.append(f"submission.json: track {sub['track']!r} but the folder is in {track}")
    if shipped is not None and sub.get("bytes_code") != len(shipped):
        problems.append(f"submission.json: bytes_code {sub.get('bytes_code')} but train_gpt.py is {len(shipped)} bytes")
    if has_type(sub.get("bytes_total"), INTEGER) and sub["bytes_total"] > CAP_BYTES:
        problems.append(f"submission.json: bytes_total {sub['bytes_total']:,} is over the {CAP_BYTES:,}-byte cap")
    for r in logged:
        if isinstance(sub.get("hardware"), str) and sub["hardware"] != r["hardware"]:
            problems.append(f"submission.json: hardware claimed {sub['hardware']!r}, {r['name']} ran on {r['hardware']!r}")

    seed_results = sub.get("seed_results") if isinstance(sub.get("seed_results"), dict) else {}
    seeds = sub.get("seeds") if isinstance(sub.get("seeds"), list) else []
    claimed_seeds = set(seed_results) | {str(s) for s in seeds}
    for seed in sorted(claimed_seeds - set(runs)):
        problems.append(f"seed {seed}: claimed, but no finished log of it is in the folder")
    for seed in sorted(set(runs) - claimed_seeds):
        problems.append(f"seed {seed}: logged, but not in submission.json seeds/seed_results")
    for seed in sorted(set(runs) & set(seed_results)):
        claim, events = seed_results[seed], runs[seed]["events"]
        actual = {"val_loss": events["final_roundtrip"]["val_loss"], "val_bpb": events["final_roundtrip"]["val_bpb"],
                  "artifact_bytes": runs[seed]["artifact_bytes"], "steps": events["train_done"]["steps"],
                  "step_avg_ms": events["train_done"]["step_avg_ms"]}
        for field, kind in SEED_FIELDS.items():
            if not isinstance(claim, dict) or not (has_type(claim.get(field), kind) and same(claim[field], actual[field])):
                shown = claim.get(field) if isinstance(claim, dict) else claim
                problems.append(f"seed {seed}: {field} claimed {shown!r}, the log says {actual[field]!r}")

    if runs and set(runs) == claimed_seeds:
        logged = list(runs.values())
        losses = [r["events"]["final_roundtrip"]["val_loss"] for r in logged]
        bpbs = [r["events"]["final_roundtrip"]["val_bpb"] for r in logged]
        means = {"val_loss": statistics.fmean(losses), "val_bpb": statistics.fmean(bpbs),
                 "pre_quant_val_bpb": statistics.fmean(pre_export_bpb(r["events"]) for r in logged),
                 "bytes_total": max(r["artifact_bytes"] for r in logged)}
        if len(logged) > 1:
            means["val_bpb_std"] = statistics.stdev(bpbs)
        for field, actual in means.items():
            if field in sub and not same(sub[field], actual):
                problems.append(f"submission.json: {field} claimed {sub[field]!r}, the logs give {actual!r}")
    return problems, sub


def non_finite(value, where: str = "") -> Iterator[tuple[str, float]]:
    """(field path, value) of every number in a JSON value that is NaN, infinite, or an int too large for a float."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and not abs(value) <= sys.float_info.max:
        yield where, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from non_finite(item, f"{where}.{key}" if where else key)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from non_finite(item, f"{where}[{index}]")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="records/<track>/<date>_<name>")
    folder = parser.parse_args().folder
    if not folder.is_dir():
        sys.exit(f"error: {folder} is not a folder")
    problems, sub = check(folder)
    for problem in problems:
        print("error: " + " ".join(f"{folder}: {problem}".split()), file=sys.stderr)  # one line per problem
    if problems:
        sys.exit(1)
    print(f"OK {folder}: val_bpb {sub['val_bpb']:.8f} (val_loss {sub['val_loss']:.8f}) over seeds {sub['seeds']}, "
          f"{sub['bytes_total']:,} bytes")


if __name__ == "__main__":
    main()
