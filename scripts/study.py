"""The MoE-against-dense study on one GPU: shards, equal-wallclock runs per configuration and seed, results table.

    python scripts/study.py prepare                       # shards + vocab-1024 tokenizer from ../shared/data, once
    python scripts/study.py run [--only dense_base sparse_softmax] [--seeds 1337 42] [--wallclock 65]
    python scripts/study.py commands                      # every run's command line, nothing run
    python scripts/study.py table [--out docs/study_results.md]

Protocol: validation is the FineWeb sample's first 400 documents, training the rest of it plus the extra corpora;
every run gets the same MAX_WALLCLOCK_SECONDS (compile warm-up excluded, as in the trainer) and the same global
batch, scaled from the challenge's 8-GPU 524,288 tokens for one GPU. Runs are sequential, so each has the GPU to
itself; `run` skips a run whose log already holds a final_roundtrip line, so an interrupted study resumes. The
table reads logs/study_<config>_s<seed>.jsonl: roundtrip val_bpb (mean and spread over seeds), pre-export (EMA)
val_bpb, the quantization gap, artifact bytes and status, steps, ms/step, passes over the training tokens, and the
worst layer's MaxVio and dead experts at the last router report.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from make_record import RecordError, pre_export_bpb, read_events

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"
DATA_PATH = "data/datasets/study_sp1024"
TOKENIZER_PATH = "data/tokenizers/study_1024_bpe.model"
PREPARE = [sys.executable, "-m", "data.prepare", "--input", str(SHARED / "fineweb_legal_sample.jsonl.zst"),
           *sorted(str(p) for p in (SHARED / "extra").glob("*.jsonl.zst")), "--val-docs", "400",
           "--output", DATA_PATH, "--tokenizer-out", TOKENIZER_PATH, "--vocab-size", "1024"]

# Settings every run shares. A quarter of the challenge's global batch, in 2 micro-batches of 64 sequences: the
# challenge's per-GPU micro-batch. 8 micro-batches of 16 sequences ran dense at two thirds of the tokens/s, and MoE
# at 1.55x dense.
# The MLP and export knobs are pinned to the trainer's defaults when the study ran (dense, 8-bit attention, 6-bit
# MLPs), which it then replaced with its winner: every configuration stays the run it was.
PROTOCOL = dict(DATA_PATH=DATA_PATH, TOKENIZER_PATH=TOKENIZER_PATH, TRAIN_BATCH_TOKENS="131072", GRAD_ACCUM_STEPS="2",
                WARMUP_STEPS="10", VAL_LOSS_EVERY="0", TRAIN_LOG_EVERY="50", MUON_MOMENTUM_WARMUP_STEPS="100",
                QUANT_FIT_SHARE="1")  # runs before 2026-12-07 scored the fit on every calibration token
# The record stack's techniques off, as they were before the third study made four of them defaults: every earlier
# configuration, and the third study's baselines, stay the runs they were.
TECHNIQUES_OFF = dict(MLP_ACT="relu2", EXPERT_ACT="relu2", ROPE_DIMS="0", XSA_LAST_N="0", LN_SCALE="0", SMEAR_GATE="0",
                      BIGRAM_BUCKETS="0", ATTN_GATE="0", PARALLEL_LAYERS="none", RECUR_LAYERS="none", MUON_WD="0",
                      MUON_EQ_R="0", MUON_POLAR_EXPRESS="0", MIN_LR="0", LQER_RANK="0", QK_GAIN_INIT="1.5")
COMMON = dict(PROTOCOL, **TECHNIQUES_OFF, MLP_MODE="dense", MOE_LAYERS="all", EXPERT_HIDDEN="0",
              QUANT_ATTN_BITS="8", QUANT_MLP_BITS="6", QUANT_EXPERT_BITS="6", QUANT_METHOD="rtn", QUANT_CLIP_SIGMAS="0",
              NUM_EXPERTS="8", QUANT_FIT="0")
WARMDOWN_AT_65S = 250  # WARMDOWN_ITERS at 65 s, scaled with the wallclock (and 40% of a fixed-step run)
# Each configuration: the trainer's env vars on top of COMMON. Every one must end OK on the artifact line: under the
# cap, bytes spent on experts a token does not use come out of attention's bits and the experts' width.
MOE_FIT = dict(QUANT_ATTN_BITS="6", QUANT_MLP_BITS="5", QUANT_EXPERT_BITS="5")
CONFIGS = {
    "dense_base": {},
    "dense_wide": dict(MLP_MULT="3", QUANT_ATTN_BITS="6", QUANT_MLP_BITS="5"),
    "sparse_softmax": dict(MLP_MODE="sparse", ROUTER="softmax", EXPERT_HIDDEN="192", **MOE_FIT),
    "sparse_sigmoid": dict(MLP_MODE="sparse", ROUTER="sigmoid", EXPERT_HIDDEN="192", **MOE_FIT),
    "sparse_hash": dict(MLP_MODE="sparse", ROUTER="hash", EXPERT_HIDDEN="192", **MOE_FIT),
    "shared_routed": dict(MLP_MODE="shared_routed", SHARED_HIDDEN="512", EXPERT_HIDDEN="128", **MOE_FIT),
    "soft": dict(MLP_MODE="soft"),
    # Variants, chosen from the pipeline check (MoE saw fewer tokens with a third fewer active parameters): another
    # dense shape at the MoE's byte budget; the same expert bytes in 4 coarser experts (more active, larger matmuls);
    # experts in every other layer only, dense MLPs between.
    "dense_deep": dict(NUM_LAYERS="11", QUANT_ATTN_BITS="6", QUANT_MLP_BITS="5"),
    "sparse_e4": dict(MLP_MODE="sparse", ROUTER="softmax", NUM_EXPERTS="4", EXPERT_HIDDEN="384", **MOE_FIT),
    "moe_alternate": dict(MLP_MODE="sparse", ROUTER="softmax", MOE_LAYERS="1,3,5,7", EXPERT_HIDDEN="256", **MOE_FIT),
    # The calibrated export (docs/study.md, second study): GPTQ, its calibration reserved from the 65 s, the fp32
    # weights saved so that scripts/export_sweep.py compares exports of one model. The baseline and the default MoE,
    # then a MoE that spends the cap: twice the experts at the same active FLOPs, bits fitted to the cap.
    "dense_gptq": dict(QUANT_METHOD="gptq", SAVE_FP32="1"),
    "moe_gptq": dict(MLP_MODE="sparse", ROUTER="softmax", MOE_LAYERS="1,3,5,7", EXPERT_HIDDEN="256", **MOE_FIT,
                     QUANT_METHOD="gptq", SAVE_FP32="1"),
    "moe16_fit": dict(MLP_MODE="sparse", ROUTER="softmax", MOE_LAYERS="1,3,5,7", EXPERT_HIDDEN="256", NUM_EXPERTS="16",
                      QUANT_METHOD="gptq", QUANT_FIT="1", SAVE_FP32="1"),
}
DENSE_BASELINE = dict(TECHNIQUES_OFF, MLP_MODE="dense", QUANT_FIT="0", QUANT_ATTN_BITS="8", QUANT_MLP_BITS="6")
MOE_DEFAULT = dict(TECHNIQUES_OFF, MLP_MODE="sparse", MOE_LAYERS="odd", NUM_EXPERTS="16", TOP_K="2", EXPERT_HIDDEN="256",
                   ROUTER="softmax", QUANT_FIT="1")
TECHNIQUES = {
    "leaky": dict(MLP_ACT="leaky_relu2", EXPERT_ACT="leaky_relu2"),
    "rope16_ln": dict(ROPE_DIMS="16", LN_SCALE="1"),
    "xsa4": dict(XSA_LAST_N="4"),
    "smear_bigram": dict(SMEAR_GATE="1", BIGRAM_BUCKETS="2048", BIGRAM_DIM="128"),
    "attn_gate": dict(ATTN_GATE="1"),
    "muon_wd": dict(MUON_WD="0.04"),
    "muon_wd09": dict(MUON_WD="0.09"),  # the later records' value (reference §7.6: 0.085-0.095)
    "muon_eqr_polar": dict(MUON_EQ_R="1", MUON_POLAR_EXPRESS="1"),
    "min_lr": dict(MIN_LR="0.1"),
    "parallel": dict(PARALLEL_LAYERS="5-8"),
    "recur": dict(RECUR_LAYERS="3-5", RECUR_LOOPS="1", RECUR_START_FRAC="0.35"),
    "qk525": dict(QK_GAIN_INIT="5.25"),
    "lqer": dict(LQER_RANK="4", LQER_TENSORS="3"),
}
EVERY_TECHNIQUE = {k: v for settings in TECHNIQUES.values() for k, v in settings.items()}
FINAL = {k: v for name in ("leaky", "xsa4", "muon_eqr_polar", "muon_wd") for k, v in TECHNIQUES[name].items()}
NO_RECURRENCE = {**EVERY_TECHNIQUE, "RECUR_LAYERS": "none"}
DENSE_FINAL, MOE_FINAL = {**DENSE_BASELINE, **FINAL}, {**MOE_DEFAULT, **FINAL}
# the MoE finalist with the trainer's cheaper fit: its options scored on a quarter of the calibration tokens
MOE_FINAL_FIT25 = {**MOE_FINAL, "QUANT_FIT_SHARE": "0.25"}
THIRD = {"s3_dense": DENSE_BASELINE, "s3_moe": MOE_DEFAULT,
         **{f"s3_dense_{name}": {**DENSE_BASELINE, **settings} for name, settings in TECHNIQUES.items()},
         **{f"s3_moe_{name}": {**MOE_DEFAULT, **settings} for name, settings in TECHNIQUES.items()},
         "s3_dense_all": {**DENSE_BASELINE, **EVERY_TECHNIQUE}, "s3_dense_all_norecur": {**DENSE_BASELINE, **NO_RECURRENCE},
         "s3_moe_all": {**MOE_DEFAULT, **EVERY_TECHNIQUE}, "s3_moe_all_norecur": {**MOE_DEFAULT, **NO_RECURRENCE},
         # the screen's two best techniques, at equal wallclock
         "s3_dense_best": {**DENSE_BASELINE, **TECHNIQUES["leaky"], **TECHNIQUES["xsa4"]},
         "s3_moe_best": {**MOE_DEFAULT, **TECHNIQUES["leaky"], **TECHNIQUES["xsa4"]},
         # the finalists: every technique that won its 250-step screen
         "s3_dense_final": DENSE_FINAL, "s3_moe_final": MOE_FINAL, "s3_moe_final_fit25": MOE_FINAL_FIT25,
         # the finalists with one more technique each (the second screen's candidates)
         **{f"{finalist}_{name}": {**settings, **TECHNIQUES[name]} for name in ("min_lr", "muon_wd09")
            for finalist, settings in (("s3_dense_final", DENSE_FINAL), ("s3_moe_final_fit25", MOE_FINAL_FIT25))}}
ALL = {**CONFIGS, **THIRD}
SEEDS = (1337, 42)


def run_id(config: str, seed: int) -> str:
    return f"study_{config}_s{seed}"


def run_env(config: str, seed: int, wallclock: float, steps: int = 0) -> dict:
    """A run's settings: for `wallclock` seconds, or for a fixed number of `steps` with no cap (screening runs, which may
    share a GPU: at equal steps contention costs time, not quality)."""
    settings = {**PROTOCOL, **THIRD[config]} if config in THIRD else {**COMMON, **CONFIGS[config]}
    if steps:
        length, suffix = dict(ITERATIONS=str(steps), MAX_WALLCLOCK_SECONDS="0", WARMDOWN_ITERS=str(round(0.4 * steps))), f"_n{steps}"
    else:
        length = dict(MAX_WALLCLOCK_SECONDS=str(wallclock), WARMDOWN_ITERS=str(round(WARMDOWN_AT_65S * wallclock / 65)))
        suffix = "" if config not in THIRD or wallclock == 65 else f"_t{wallclock:g}"
    return {**settings, **length, "SEED": str(seed), "RUN_ID": run_id(config, seed) + suffix}


def command_line(env: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in env.items()) + " python train_moe.py"


def run_row(path: Path) -> dict | None:
    """One finished run's figures, or None if it never reached its roundtrip score."""
    last = read_events(path)
    if "final_roundtrip" not in last:
        return None
    pre = pre_export_bpb(last)
    routers = last["router_final"]
    return dict(roundtrip=last["final_roundtrip"]["val_bpb"], pre_export=pre,
                gap=last["final_roundtrip"]["val_bpb"] - pre, bytes=last["artifact"]["artifact_bytes"],
                status=last["artifact"]["status"], steps=last["train_done"]["steps"],
                ms_per_step=last["train_done"]["step_avg_ms"], passes=last["train_done"]["data_passes"],
                slack_ms=last["train_done"].get("cap_slack_ms"),
                maxvio=max((r["maxvio"] for r in routers), default=None),
                dead=max((r["dead"] for r in routers), default=None))


def past_cap(row: dict) -> bool:
    """Trained past its wallclock (loop and calibration): equal clocks are the study's premise, and a record that runs
    past 600 s is void. A 65 s MoE run once ended 76 ms past (docs/study.md)."""
    return row["slack_ms"] is not None and row["slack_ms"] < 0


def summarize(rows: list[dict]) -> dict:
    """Mean over seeds of every figure; spread = max - min of the roundtrip val_bpb."""
    scores = [r["roundtrip"] for r in rows]
    mean = {k: statistics.fmean(r[k] for r in rows) for k in ("roundtrip", "pre_export", "gap", "bytes", "steps",
                                                             "ms_per_step", "passes")}
    worst = [r for r in rows if r["maxvio"] is not None]
    return dict(mean, seeds=len(rows), past_cap=sum(past_cap(r) for r in rows), spread=max(scores) - min(scores),
                status="OK" if all(r["status"] == "OK" for r in rows) else "OVER",
                maxvio=max((r["maxvio"] for r in worst), default=None), dead=max((r["dead"] for r in worst), default=None))


def finished_runs(logs: Path, configs=CONFIGS) -> dict[str, dict[str, dict]]:
    """{config and run length (s3_dense, s3_dense_n300, s3_dense_t180): {run id: figures}} of the finished runs, in
    configuration and seed-file order."""
    found = {}
    for config in configs:
        for path in sorted(logs.glob(f"study_{config}_s*.jsonl")):
            match = re.fullmatch(rf"study_{config}_s\d+(_n\d+|_t[\d.]+)?", path.stem)
            if match and (row := run_row(path)):
                found.setdefault(config + (match.group(1) or ""), {})[path.stem] = row
    return found


def runs_table(logs: Path, configs=CONFIGS) -> str:
    """One line per finished run: the step time varies from run to run on a shared GPU, and at equal wallclock the
    steps it leaves decide much of the score."""
    lines = ["| run | steps | ms/step | passes | cap slack ms | pre-export | roundtrip val_bpb |", "|---|---|---|---|---|---|---|"]
    for runs in finished_runs(logs, configs).values():
        for run, r in runs.items():
            slack = "-" if r["slack_ms"] is None else f"{r['slack_ms']:,}" + (" (past the cap)" if past_cap(r) else "")
            lines.append(f"| {run} | {r['steps']} | {r['ms_per_step']:.1f} | {r['passes']:.2f} | {slack} | "
                         f"{r['pre_export']:.4f} | {r['roundtrip']:.4f} |")
    return "\n".join(lines)


def results_table(logs: Path, configs=CONFIGS) -> str:
    header = ("| config | seeds | roundtrip val_bpb | spread | pre-export | quant gap | artifact bytes | steps | ms/step "
              "| passes | worst MaxVio | worst dead |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [header]
    summaries = {config: summarize(list(runs.values())) for config, runs in finished_runs(logs, configs).items()}
    for config, s in sorted(summaries.items(), key=lambda kv: kv[1]["roundtrip"]):
        router = f"{s['maxvio']:.2f} | {s['dead']}" if s["maxvio"] is not None else "- | -"
        seeds = f"{s['seeds']}" + (f" ({s['past_cap']} past the cap)" if s["past_cap"] else "")
        lines.append(f"| {config} | {seeds} | {s['roundtrip']:.4f} | {s['spread']:.4f} | {s['pre_export']:.4f} | "
                     f"{s['gap']:+.4f} | {s['bytes']:,.0f} {s['status']} | {s['steps']:.0f} | {s['ms_per_step']:.1f} | "
                     f"{s['passes']:.2f} | {router} |")
    return "\n".join(lines)


def launch(queue: list[dict], parallel: int) -> None:
    """Each run's trainer, at most `parallel` at a time (each's output then in logs/<RUN_ID>.out); one that fails is
    reported and the rest go on. Each run prints its own lines (a progress line at least every 30 s); these count them."""
    running, seconds = [], []

    def reap(keep: int):
        while len(running) > keep:
            for item in running:
                env, process, start = item
                if process.poll() is not None:
                    running.remove(item)
                    seconds.append(time.monotonic() - start)
                    if process.returncode:
                        print(f"study failed:{env['RUN_ID']} exit:{process.returncode}", flush=True)
                    break
            else:
                time.sleep(1)

    for n, env in enumerate(queue, 1):
        reap(parallel - 1)
        eta = f" eta_s:{statistics.fmean(seconds) * (len(queue) - n + 1) / parallel:.0f}" if seconds else ""
        print(f"study run:{env['RUN_ID']} n:{n}/{len(queue)}{eta}", flush=True)
        out = open(Path("logs") / f"{env['RUN_ID']}.out", "w") if parallel > 1 else None
        running.append((env, subprocess.Popen([sys.executable, "train_moe.py"], env={**os.environ, **env}, stdout=out,
                                              stderr=subprocess.STDOUT if out else None), time.monotonic()))
    reap(0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("prepare", "run", "commands", "table"))
    parser.add_argument("--only", nargs="+", choices=sorted(ALL), default=list(CONFIGS), metavar="CONFIG",
                        help=f"configurations (default: the first study's): {', '.join(ALL)}")
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS), help="default: %(default)s")
    # Dense stepped at 121-122 ms on one H100 (docs/study.md): 65 s is 1.33 passes over the 52.9M training tokens,
    # leaving room under 2 for a step up to a third faster.
    parser.add_argument("--wallclock", type=float, default=65.0, help="MAX_WALLCLOCK_SECONDS of every run")
    parser.add_argument("--steps", type=int, default=0, help="screening: this many steps, no wallclock cap")
    # Each run holds its own ~13 GB at the study's shape: 4 at a time fit an 80 GB H100, 6 ran out of memory.
    parser.add_argument("--parallel", type=int, default=1, help="screening (--steps): runs sharing the GPU at once")
    parser.add_argument("--out", default="", help="table: also write it to this markdown file")
    args = parser.parse_args(argv)
    if args.parallel > 1 and not args.steps:
        parser.error("--parallel needs --steps: runs at equal wallclock need the GPU to themselves")
    os.chdir(REPO)
    if args.action == "prepare":
        return subprocess.run(PREPARE).returncode
    if args.action == "table":
        chosen = {c: ALL[c] for c in args.only}
        try:
            table = results_table(Path("logs"), chosen) + "\n\n" + runs_table(Path("logs"), chosen)
        except RecordError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(table)
        if args.out:
            Path(args.out).write_text(table + "\n")
        return 0
    if args.action == "run" and not Path(DATA_PATH).is_dir():
        parser.error(f"{DATA_PATH}: no shards; run `python scripts/study.py prepare` first")
    # Seed by seed, so that a study cut short still has one run of every configuration.
    runs, queue = [(seed, config) for seed in args.seeds for config in args.only], []
    for n, (seed, config) in enumerate(runs, 1):
        env = run_env(config, seed, args.wallclock, args.steps)
        log = Path("logs") / f"{env['RUN_ID']}.jsonl"
        if args.action == "commands":
            print(command_line(env))
        elif log.is_file() and run_row(log):
            print(f"study skip:{env['RUN_ID']} n:{n}/{len(runs)} (finished)", flush=True)
        else:
            queue.append(env)
    Path("logs").mkdir(exist_ok=True)
    launch(queue, args.parallel)
    return 0


if __name__ == "__main__":
    sys.exit(main())
