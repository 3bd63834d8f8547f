"""Training-step benchmark: the trainer's compiled step per MLP mode and router, side by side in one process.

    python scripts/bench_step.py                                   # every mode at the trainer's default shape
    python scripts/bench_step.py --modes dense sparse:sigmoid --steps 30 --json bench.json
    torchrun --standalone --nproc_per_node=2 scripts/bench_step.py --modes dense sparse   # per-GPU under DDP
    python scripts/bench_step.py --modes sparse --profile prof/    # plus a kernel table per mode
    DATA_PATH=... TOKENIZER_PATH=... python scripts/bench_step.py --modes dense --peer ../parameter-golf/train_gpt.py

A mode is MLP_MODE[:ROUTER] (sparse = sparse:softmax), or `default`: the trainer's own MLP (16 half-size
experts in every other block). Shapes and every other knob come from the trainer's env vars (NUM_LAYERS,
MODEL_DIM, TRAIN_BATCH_TOKENS, NUM_EXPERTS, EXPERT_HIDDEN, ...), so the other MoE modes run in every block at
the dense MLP's active FLOPs unless told otherwise. Each mode builds a fresh model and runs
train_moe.train_step, the trainer's own step (every micro-batch, the optimizers, the router biases), on random
tokens. Modes run one after another in one process because timings of identical runs on shared machines drift
by ~15%: only ratios measured together are comparable. Per mode it reports the median step time after warm-up,
tokens/s (per GPU), peak memory, compile time (the first step minus the median), graph breaks, recompiles,
whether a step runs with no host sync (torch.cuda.set_sync_debug_mode), and the ratio to the dense row. A
table on stdout (rank 0) and the same rows as JSON. `--peer PATH` adds a row for the challenge's train_gpt.py
(PATH), run as a subprocess at the same shape on the real shards of DATA_PATH and TOKENIZER_PATH, timed by its
own per-step log.
"""
import argparse
import contextlib
import glob
import json
import logging
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_moe  # noqa: E402

DEFAULT_MODES = ("dense", "sparse:softmax", "sparse:sigmoid", "sparse:hash", "shared_routed:softmax", "soft", "default")
# train_gpt.py's log line of a training step:
# f"step:{step}/{args.iterations} train_loss:{...:.4f} train_time:{...:.0f}ms step_avg:{...:.2f}ms"
PEER_STEP = re.compile(r"step:(\d+)/\d+ train_loss:\S+ train_time:(\d+)ms step_avg:")


class RandomBatches:
    """The trainer's loader interface on uniform random tokens made on the device up front: no host work and
    no data files in the timed steps. Routing on such tokens is close to balanced."""

    def __init__(self, cfg: train_moe.Hyperparameters, device, count: int = 4):
        local = cfg.train_batch_tokens // (cfg.world_size * cfg.grad_accum_steps)
        g = torch.Generator(device=device).manual_seed(cfg.seed + cfg.rank)
        self.batches = [torch.randint(0, cfg.vocab_size, (local // cfg.train_seq_len, cfg.train_seq_len + 1),
                                      device=device, generator=g) for _ in range(count)]
        self.calls = 0

    def next_batch(self):
        batch = self.batches[self.calls % len(self.batches)]
        self.calls += 1
        return batch[:, :-1], batch[:, 1:]


class RecompileCounter(logging.Handler):
    """Counts dynamo's 'Recompiling function' messages (the recompiles log artifact)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def emit(self, record):
        self.count += 1


def watch_recompiles() -> RecompileCounter:
    torch._logging.set_logs(recompiles=True)
    counter = RecompileCounter()
    logging.getLogger("torch._dynamo.guards.__recompiles").addHandler(counter)
    return counter


def mode_env(base: dict, mode: str) -> dict:
    mode, _, kernel = mode.partition("@")
    mlp_mode, _, router = mode.partition(":")
    # Every mode in every block at the dense MLP's active FLOPs, unless the env says otherwise (the trainer's own
    # default, `default`, has half-size experts in every other block).
    env = dict(base) if mode == "default" else {"MOE_LAYERS": "all", "EXPERT_HIDDEN": "0", **base, "MLP_MODE": mlp_mode}
    if router:
        env["ROUTER"] = router
    if kernel:
        env["EXPERT_KERNEL"] = kernel
    return env


def bench_mode(mode: str, base_env: dict, args, device, recompiles: RecompileCounter) -> dict:
    cfg = train_moe.Hyperparameters(mode_env(base_env, mode))
    torch._dynamo.reset()  # a fresh model must compile afresh, not count as a recompile of the previous mode
    torch._dynamo.utils.counters.clear()
    recompiles.count = 0
    torch.manual_seed(cfg.seed)
    model = train_moe.GPT(cfg).to(device)
    optimizers = train_moe.build_optimizers(model, cfg)
    # No fullgraph here: a graph break is counted and reported instead of stopping the benchmark.
    graphs = "reduce-overhead" if train_moe.step_graphs(cfg, device, dist.is_initialized()) else None
    train_model = torch.compile(model, dynamic=False, mode=graphs) if cfg.compile else model
    if dist.is_initialized():
        train_model = DDP(train_model, device_ids=[cfg.local_rank] if device.type == "cuda" else None, broadcast_buffers=False)
    loader = RandomBatches(cfg, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step():
        train_moe.train_step(cfg, model, train_model, optimizers, loader)

    times = []
    for i in range(args.warmup + args.steps):
        train_moe.synchronize(device)
        t = time.perf_counter()
        step()
        train_moe.synchronize(device)
        times.append(time.perf_counter() - t)
    median = statistics.median(times[args.warmup:])
    host_sync = "n/a"
    if device.type == "cuda":
        torch.cuda.set_sync_debug_mode("error")
        try:
            step()
            host_sync = "none"
        except RuntimeError as e:
            host_sync = str(e).splitlines()[0]
        finally:
            torch.cuda.set_sync_debug_mode("default")
        train_moe.synchronize(device)
    if args.profile:
        profile(mode, step, device, Path(args.profile))
    params = train_moe.parameter_report(model)
    # Dispatch cost depends on balance: the worst layer's busiest expert over a fair share, on the last step.
    loads = [m.expert_load for m in model.modules() if isinstance(m, train_moe.MoEMLP)]
    worst = max((l.max() / l.mean()).item() for l in loads) if loads else 1.0
    row = dict(mode=mode, ms_per_step=1000 * median, tokens_per_s_per_gpu=cfg.train_batch_tokens / cfg.world_size / median,
               peak_mem_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0,
               compile_s=times[0] - median, graph_breaks=sum(torch._dynamo.utils.counters["graph_break"].values()),
               recompiles=recompiles.count, host_sync=host_sync, max_over_mean_load=worst, params=params["total"], active_params=params["active"],
               step_times_ms=[1000 * t for t in times[args.warmup:]])
    del model, optimizers, train_model, loader
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def file_label(mode: str) -> str:
    """A mode as a file name's part: sparse:sigmoid@quack -> sparse_sigmoid_quack."""
    return re.sub(r"[^A-Za-z0-9_]", "_", mode)


def profile(mode: str, step, device, out_dir: Path):
    """Kernel table of two steps, by self device time: where the step's time goes."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(2):
            step()
        train_moe.synchronize(device)
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    out_dir.mkdir(parents=True, exist_ok=True)
    if not dist.is_initialized() or dist.get_rank() == 0:
        table = prof.key_averages().table(sort_by=sort, row_limit=45, max_name_column_width=90)
        (out_dir / f"profile_{file_label(mode)}.txt").write_text(table)
        (out_dir / f"kernels_{file_label(mode)}.json").write_text(json.dumps(kernel_times(prof)))


def kernel_times(prof) -> dict[str, float]:
    """Device kernels' ms per step (the profile holds two steps), by kernel name. Not the GPU ranges of annotations
    (ProfilerStep*, Optimizer.step#Muon.step): they span kernels already counted, and doubled the peer's total."""
    times = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and not e.is_user_annotation and e.self_device_time_total > 0:
            times[e.name] = times.get(e.name, 0.0) + e.self_device_time_total / 2000
    return times


# Kernel families, the first whose pattern a kernel's name matches (Inductor names a fused kernel by its ops).
# Attention first: cuDNN's attention kernels are named for their wgmma tiles, and were counted as matmuls. QuACK's
# expert GEMMs are CUTLASS kernels named kernel_cutlass_kernel_quackgemm_...: grouped, not matmul.
FAMILIES = [("attention", r"flash|fmha|attention|sdpa|cudnn"), ("grouped", r"GroupProblemShape|grouped_gemm|quackgemm"),
            ("matmul", r"gemm|nvjet|cutlass|xmma|wgmma|grouped_mm|splitk"),
            ("norm", r"rsqrt|norm"), ("optimizer", r"foreach|adam|lerp|addcmul"), ("copy", r"memcpy|memset|copy|cat_|clone"),
            ("reduction", r"^triton_(red|per)_|reduce|sum|nll|softmax"), ("elementwise", r"^triton_poi_|elementwise|vectorized")]


def family_table(profiles: dict[str, dict[str, float]], step_ms: dict[str, float]) -> str:
    """ms per step of each kernel family (FAMILIES, then `other`) per profiled row: the difference itemised. Then the
    row's timed step and its GPU idle time (the step less its kernels): on an H100 the MoE rows idled 3 (default) and
    17 ms (sparse) a step more than dense, where QuACK's host dispatch (0.25-0.47 ms a call under the profiler, against
    0.06 for a matmul) fell behind the GPU."""
    names = [f for f, _ in FAMILIES] + ["other", "total"]
    sums = {}
    for mode, kernels in profiles.items():
        sums[mode] = dict.fromkeys(names, 0.0)
        for kernel, ms in kernels.items():
            family = next((f for f, pattern in FAMILIES if re.search(pattern, kernel, re.I)), "other")
            sums[mode][family] += ms
            sums[mode]["total"] += ms
    lines = [f"{'kernel ms/step':<14}" + "".join(f"{m:>22}" for m in profiles)]
    lines += [f"{n:<14}" + "".join(f"{sums[m][n]:>22.2f}" for m in profiles) for n in names]
    lines.append(f"{'timed step':<14}" + "".join(f"{step_ms[m]:>22.2f}" for m in profiles))
    lines.append(f"{'GPU idle':<14}" + "".join(f"{step_ms[m] - sums[m]['total']:>22.2f}" for m in profiles))
    return "\n".join(lines)


class PeerError(Exception):
    """The peer cannot run, or did not log the steps it was asked for."""


def peer_env(path: str, env: dict, cfg: train_moe.Hyperparameters, iterations: int) -> dict:
    """train_gpt.py's env: the trainer rows' env at the shape they resolved to, so neither script's defaults can differ."""
    if "RANK" in env:  # the peer would join this process group's rendezvous
        raise PeerError("--peer runs without torchrun: launch the bench with python")
    if not os.path.isfile(path):
        raise PeerError(f"--peer {path}: no such file")
    data = env.get("DATA_PATH", "")
    if not (data and all(glob.glob(os.path.join(data, f"fineweb_{split}_*.bin")) for split in ("train", "val"))):
        raise PeerError(f"--peer needs DATA_PATH, a folder of fineweb_train_*.bin and fineweb_val_*.bin shards "
                        f"(DATA_PATH={data!r})")
    tokenizer = env.get("TOKENIZER_PATH", "")
    if not os.path.isfile(tokenizer):
        raise PeerError(f"--peer needs TOKENIZER_PATH, the shards' SentencePiece model (TOKENIZER_PATH={tokenizer!r})")
    if cfg.grad_accum_steps != 8:
        raise PeerError(f"--peer: train_gpt.py runs 8 micro-batches a step, GRAD_ACCUM_STEPS={cfg.grad_accum_steps} "
                        f"would time another step")
    return {**env, "DATA_PATH": os.path.abspath(data), "TOKENIZER_PATH": os.path.abspath(tokenizer),  # it runs elsewhere
            "TRAIN_BATCH_TOKENS": str(cfg.train_batch_tokens), "TRAIN_SEQ_LEN": str(cfg.train_seq_len),
            "NUM_LAYERS": str(cfg.num_layers), "MODEL_DIM": str(cfg.model_dim), "NUM_HEADS": str(cfg.num_heads),
            "NUM_KV_HEADS": str(cfg.num_kv_heads), "MLP_MULT": str(cfg.mlp_mult), "VOCAB_SIZE": str(cfg.vocab_size),
            # No warm-up of its own (that one compiles, then resets the weights): its first steps compile instead and
            # are dropped as the trainer rows' are. Every step logged, which reads the loss: one host sync per step, as
            # the trainer rows synchronize around theirs. No validation before step 1, no wallclock cap.
            "ITERATIONS": str(iterations), "WARMUP_STEPS": "0", "TRAIN_LOG_EVERY": "1", "VAL_LOSS_EVERY": "0",
            "MAX_WALLCLOCK_SECONDS": "0"}


def parse_peer_steps(text: str) -> list[float]:
    """Each step's ms from train_gpt.py's cumulative train_time, for the consecutive steps from 1 that it logged."""
    cumulative = [0.0]
    for line in text.splitlines():
        step = PEER_STEP.match(line)
        if step:
            if int(step[1]) != len(cumulative):
                break
            cumulative.append(float(step[2]))
    return [b - a for a, b in zip(cumulative, cumulative[1:])]


def time_peer(path: str, env: dict, steps: int, warmup: int) -> dict:
    """Runs the peer (env from peer_env) in a temporary folder, which takes its logs/, and returns its row."""
    iterations = warmup + steps
    command = [sys.executable, "-u", os.path.abspath(path)]  # unbuffered: each step's line arrives as it is logged
    output = []
    with tempfile.TemporaryDirectory() as cwd, subprocess.Popen(
            command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, encoding="utf-8",
            errors="replace", start_new_session=True) as peer:
        try:
            for line in peer.stdout:
                output.append(line)
                step = PEER_STEP.match(line)
                if step and int(step[1]) == iterations:
                    break
        finally:
            # After its last step it validates on the whole val split (VAL_LOSS_EVERY=0 does not skip that one),
            # exports int8+zlib and validates again: a minute or more at full size that nothing here times. Its
            # process group holds its compile workers too, and an interrupted bench must not leave it on the GPU.
            os.killpg(peer.pid, signal.SIGKILL)
    text = "".join(output)
    times = parse_peer_steps(text)
    if len(times) < iterations:
        tail = " | ".join(text.strip().splitlines()[-3:])
        raise PeerError(f"peer {path} exited with status {peer.returncode} after {len(times)} of {iterations} steps; "
                        f"its output ends: {tail}")
    median = statistics.median(times[warmup:])
    params = re.search(r"^model_params:(\d+)$", text, re.M)
    params = int(params[1]) if params else None
    return dict(mode=f"peer:{Path(path).name}", ms_per_step=median,
                tokens_per_s_per_gpu=1000 * int(env["TRAIN_BATCH_TOKENS"]) / median, peak_mem_gib=None,
                compile_s=(times[0] - median) / 1000, graph_breaks=None, recompiles=None, host_sync=None,
                max_over_mean_load=None, params=params, active_params=params, step_times_ms=times[warmup:])


# `python -c PEER_PROFILER PEER TABLE KERNELS SKIP SCRIPTS`: the peer under torch.profiler for two steps after SKIP warm-up steps
# (a step ends where the first optimizer it steps ends its step), its kernel table and kernel times written as profile()
# writes the trainer rows', then an exit before the peer's validation and export.
PEER_PROFILER = """
import json, os, runpy, sys, torch
from torch.optim.optimizer import register_optimizer_step_post_hook
peer, table, kernels, skip, scripts = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
cuda = torch.cuda.is_available()

def write(prof):
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    open(table, "w").write(prof.key_averages().table(sort_by=sort, row_limit=45, max_name_column_width=90))
    sys.path.insert(0, scripts)
    from bench_step import kernel_times
    json.dump(kernel_times(prof), open(kernels, "w"))
    os._exit(0)

activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
prof = torch.profiler.profile(activities=activities, on_trace_ready=write,
                              schedule=torch.profiler.schedule(wait=skip, warmup=1, active=2))
first = []

def stepped(optimizer, args, kwargs):
    first.append(optimizer)
    if optimizer is first[0]:
        prof.step()

register_optimizer_step_post_hook(stepped)
prof.start()
sys.argv = [peer]
runpy.run_path(peer, run_name="__main__")
"""


def profile_peer(path: str, env: dict, skip: int, out: Path):
    """The peer's kernel table of two steps after `skip` (PEER_PROFILER), in a run of its own: the profiler's overhead
    must not reach its timed row."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    kernels = out.with_name("kernels_peer.json")
    command = [sys.executable, "-c", PEER_PROFILER, os.path.abspath(path), str(out.resolve()), str(kernels.resolve()), str(skip),
               str(Path(__file__).resolve().parent)]
    with tempfile.TemporaryDirectory() as cwd, subprocess.Popen(
            command, cwd=cwd, env={**env, "ITERATIONS": str(skip + 4)}, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, encoding="utf-8", errors="replace", start_new_session=True) as peer:
        try:
            text = peer.communicate()[0]
        finally:
            with contextlib.suppress(ProcessLookupError):  # its compile workers, if any outlived it
                os.killpg(peer.pid, signal.SIGKILL)
    if peer.returncode or not out.exists():
        tail = " | ".join(text.strip().splitlines()[-3:])
        raise PeerError(f"peer {path} under the profiler exited with status {peer.returncode} and no kernel table; "
                        f"its output ends: {tail}")


def cell(value, width: int, spec: str = "") -> str:
    """'-' for what a row did not measure (the peer reports only its step times and parameters)."""
    return f"{'-' if value is None else format(value, spec):>{width}}"


def format_table(rows: list[dict]) -> str:
    head = f"{'mode':<22} {'ms/step':>9} {'vs dense':>9} {'tok/s/GPU':>11} {'peak GiB':>9} {'compile s':>10} " \
           f"{'breaks':>6} {'recomp':>6} {'active M':>9} {'total M':>8} {'max load':>8}  host sync"
    lines = [head, "-" * len(head)]
    for r in rows:
        active, total = (None if r[k] is None else r[k] / 1e6 for k in ("active_params", "params"))
        lines.append(" ".join([f"{r['mode']:<22}", cell(r["ms_per_step"], 9, ".1f"), cell(r["vs_dense"], 9, ".3f"),
                               cell(r["tokens_per_s_per_gpu"], 11, ",.0f"), cell(r["peak_mem_gib"], 9, ".2f"),
                               cell(r["compile_s"], 10, ".1f"), cell(r["graph_breaks"], 6), cell(r["recompiles"], 6),
                               cell(active, 9, ".2f"), cell(total, 8, ".2f"), cell(r["max_over_mean_load"], 8, ".2f")])
                     + f"  {r['host_sync'] or '-'}")
    return "\n".join(lines)


def save_rows(rows: list[dict], meta: dict, path: str):
    """Ratios, a progress line and the JSON after every row, so a run cut short still leaves its rows."""
    dense = next((r["ms_per_step"] for r in rows if r["mode"] == "dense"), None)
    for r in rows:
        r["vs_dense"] = r["ms_per_step"] / dense if dense else None
    print(f"bench mode:{rows[-1]['mode']} ms_per_step:{rows[-1]['ms_per_step']:.1f}", flush=True)
    Path(path).write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", default=list(DEFAULT_MODES), help="MLP_MODE[:ROUTER] per row")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (the first one compiles)")
    parser.add_argument("--json", default="bench_step.json", help="where the rows go")
    parser.add_argument("--profile", default="", help="folder for a kernel table per mode (and the peer's, in a run of "
                        "its own)")
    parser.add_argument("--peer", default="", metavar="PATH", help="the challenge's train_gpt.py, timed as one more row "
                        "on the shards of DATA_PATH and TOKENIZER_PATH (one GPU, not under torchrun)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 1:
        parser.error("--steps and --warmup must be at least 1")
    base_env = dict(os.environ)
    try:  # every mode's config must be valid before anything compiles
        for mode in args.modes:
            train_moe.Hyperparameters(mode_env(base_env, mode))
    except train_moe.ConfigError as e:
        parser.error(f"mode {mode}: {e}")

    cfg = train_moe.Hyperparameters(base_env)
    try:
        env_for_peer = peer_env(args.peer, base_env, cfg, args.warmup + args.steps) if args.peer else None
    except PeerError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    device, distributed = train_moe.init_device(cfg)  # as the trainer sets it up: TF32, threads, process group
    master = cfg.rank == 0
    recompiles = watch_recompiles()

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    meta = dict(gpu=gpu, world_size=cfg.world_size, torch=torch.__version__, steps=args.steps, warmup=args.warmup,
                shape=dict(num_layers=cfg.num_layers, model_dim=cfg.model_dim, train_seq_len=cfg.train_seq_len,
                           train_batch_tokens=cfg.train_batch_tokens, grad_accum_steps=cfg.grad_accum_steps),
                command=" ".join(sys.argv))
    rows = []
    for mode in args.modes:
        rows.append(bench_mode(mode, base_env, args, device, recompiles))
        if master:
            save_rows(rows, meta, args.json)
    peer_failure = None
    if env_for_peer:  # last, so its failure costs none of the trainer rows
        try:
            rows.append(time_peer(args.peer, env_for_peer, args.steps, args.warmup))
            save_rows(rows, meta, args.json)
            if args.profile:
                profile_peer(args.peer, env_for_peer, args.warmup, Path(args.profile) / "profile_peer.txt")
        except PeerError as e:
            peer_failure = e
    if master:
        print(f"gpu:{gpu} world_size:{cfg.world_size} torch:{torch.__version__} layers:{cfg.num_layers} dim:{cfg.model_dim} "
              f"seq:{cfg.train_seq_len} batch_tokens:{cfg.train_batch_tokens}")
        print(format_table(rows))
        if args.profile:
            step_ms = {"peer" if r["mode"].startswith("peer:") else r["mode"]: r["ms_per_step"] for r in rows}
            files = {m: Path(args.profile) / f"kernels_{file_label(m)}.json" for m in step_ms}  # a failed peer: none
            profiles = {m: json.loads(f.read_text()) for m, f in files.items() if f.exists()}
            if any(profiles.values()):  # none on a CPU
                print(family_table(profiles, step_ms))
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
    if peer_failure:
        print(f"error: {peer_failure}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
