"""Training-step benchmark: the trainer's compiled step per MLP mode and router, side by side in one process.

    python scripts/bench_step.py                                   # every mode at the trainer's default shape
    python scripts/bench_step.py --modes dense sparse:sigmoid --steps 30 --json bench.json
    torchrun --standalone --nproc_per_node=2 scripts/bench_step.py --modes dense sparse   # per-GPU under DDP
    python scripts/bench_step.py --modes sparse --profile prof/    # plus a kernel table per mode

A mode is MLP_MODE[:ROUTER] (sparse = sparse:softmax), or `default`: the trainer's own MLP (16 half-size
experts in every other block). Shapes and every other knob come from the trainer's env vars (NUM_LAYERS,
MODEL_DIM, TRAIN_BATCH_TOKENS, NUM_EXPERTS, EXPERT_HIDDEN, ...), so the other MoE modes run in every block at
the dense MLP's active FLOPs unless told otherwise. Each mode builds a fresh model and runs
train_moe.train_step, the trainer's own step (every micro-batch, the optimizers, the router biases), on random
tokens. Modes run one after another in one process because timings of identical runs on shared machines drift
by ~15%: only ratios measured together are comparable. Per mode it reports the median step time after warm-up,
tokens/s (per GPU), peak memory, compile time (the first step minus the median), graph breaks, recompiles,
whether a step runs with no host sync (torch.cuda.set_sync_debug_mode), and the ratio to the dense row. A
table on stdout (rank 0) and the same rows as JSON.
"""
import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_moe  # noqa: E402

DEFAULT_MODES = ("dense", "sparse:softmax", "sparse:sigmoid", "sparse:hash", "shared_routed:softmax", "soft", "default")


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
    mlp_mode, _, router = mode.partition(":")
    # Every mode in every block at the dense MLP's active FLOPs, unless the env says otherwise (the trainer's own
    # default, `default`, has half-size experts in every other block).
    env = dict(base) if mode == "default" else {"MOE_LAYERS": "all", "EXPERT_HIDDEN": "0", **base, "MLP_MODE": mlp_mode}
    if router:
        env["ROUTER"] = router
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
    train_model = torch.compile(model, dynamic=False) if cfg.compile else model
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
        (out_dir / f"profile_{mode.replace(':', '_')}.txt").write_text(table)


def format_table(rows: list[dict]) -> str:
    head = f"{'mode':<22} {'ms/step':>9} {'vs dense':>9} {'tok/s/GPU':>11} {'peak GiB':>9} {'compile s':>10} " \
           f"{'breaks':>6} {'recomp':>6} {'active M':>9} {'total M':>8} {'max load':>8}  host sync"
    lines = [head, "-" * len(head)]
    for r in rows:
        ratio = f"{r['vs_dense']:.3f}" if r.get("vs_dense") else "-"
        lines.append(f"{r['mode']:<22} {r['ms_per_step']:>9.1f} {ratio:>9} {r['tokens_per_s_per_gpu']:>11,.0f} "
                     f"{r['peak_mem_gib']:>9.2f} {r['compile_s']:>10.1f} {r['graph_breaks']:>6} {r['recompiles']:>6} "
                     f"{r['active_params'] / 1e6:>9.2f} {r['params'] / 1e6:>8.2f} {r['max_over_mean_load']:>8.2f}  {r['host_sync']}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", default=list(DEFAULT_MODES), help="MLP_MODE[:ROUTER] per row")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (the first one compiles)")
    parser.add_argument("--json", default="bench_step.json", help="where the rows go")
    parser.add_argument("--profile", default="", help="folder for a kernel table per mode")
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
        dense = next((r["ms_per_step"] for r in rows if r["mode"] == "dense"), None)
        for r in rows:
            r["vs_dense"] = r["ms_per_step"] / dense if dense else None
        if master:  # after every mode, so a run cut short still leaves its rows
            print(f"bench mode:{mode} ms_per_step:{rows[-1]['ms_per_step']:.1f}", flush=True)
            Path(args.json).write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    if master:
        print(f"gpu:{gpu} world_size:{cfg.world_size} torch:{torch.__version__} layers:{cfg.num_layers} dim:{cfg.model_dim} "
              f"seq:{cfg.train_seq_len} batch_tokens:{cfg.train_batch_tokens}")
        print(format_table(rows))
    if distributed:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
