"""The attention's parts at the trainer's shape, one micro-batch forward and backward, side by side in one process:
each SDPA backend with grouped KV heads passed as they are or repeated, and q, k and v as three projections or one.

    python scripts/bench_attention.py                      # the trainer's default shape (env vars as the trainer's)
    NUM_KV_HEADS=8 python scripts/bench_attention.py --iters 50 --json attn.json

Issue 28's H100 figures (docs/performance.md, from this script's prototype) are why the trainer runs q, k and v as one
matmul. A backend this machine lacks is a row that says so."""
import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_moe  # noqa: E402

BACKENDS = (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)


def timed(fn, iters: int, device) -> float:
    """Median ms of `iters` calls after 3 untimed ones."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        train_moe.synchronize(device)
        start = time.perf_counter()
        fn()
        train_moe.synchronize(device)
        times.append(1000 * (time.perf_counter() - start))
    return sorted(times)[len(times) // 2]


def rows(cfg: train_moe.Hyperparameters, device, iters: int) -> list[dict]:
    """(part, ms or the reason it did not run) per variant, on one micro-batch of the trainer's batch."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    batch = cfg.train_batch_tokens // (cfg.world_size * cfg.grad_accum_steps) // cfg.train_seq_len
    heads, kv_heads, head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.model_dim // cfg.num_heads
    g = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, grad=True):
        return torch.randn(*shape, device=device, dtype=dtype, generator=g).requires_grad_(grad)

    q, k, v = randn(batch, heads, cfg.train_seq_len, head_dim), *(randn(batch, kv_heads, cfg.train_seq_len, head_dim) for _ in "kv")
    out_grad = randn(batch, heads, cfg.train_seq_len, head_dim, grad=False)
    result = []
    for backend in BACKENDS:
        for grouped in (True, False):
            def attention():
                keys, values = (k, v) if grouped else (k.repeat_interleave(heads // kv_heads, 1), v.repeat_interleave(heads // kv_heads, 1))
                with sdpa_kernel([backend]):
                    F.scaled_dot_product_attention(q, keys, values, is_causal=True, enable_gqa=grouped).backward(out_grad)
            name = f"sdpa {backend.name.lower()}, kv heads {'grouped' if grouped else 'repeated'}"
            try:
                result.append(dict(part=name, ms=timed(attention, iters, device)))
            except RuntimeError as e:  # "No available kernel": this backend does not take these inputs here
                result.append(dict(part=name, ms=None, reason=str(e).splitlines()[0][:80]))
    x = randn(batch * cfg.train_seq_len, cfg.model_dim)
    kv_dim = kv_heads * head_dim
    weights = [torch.randn(n, cfg.model_dim, device=device, generator=g).requires_grad_() for n in (cfg.model_dim, kv_dim, kv_dim)]
    proj_grad = randn(batch * cfg.train_seq_len, cfg.model_dim + 2 * kv_dim, grad=False)

    def three():
        outs = [x @ w.to(dtype).T for w in weights]
        torch.autograd.backward(outs, list(proj_grad.split([cfg.model_dim, kv_dim, kv_dim], 1)))

    def one():
        (x @ torch.cat(weights).to(dtype).T).backward(proj_grad)

    result += [dict(part="q, k, v: three projections", ms=timed(three, iters, device)),
               dict(part="q, k, v: one projection", ms=timed(one, iters, device))]
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=30, help="timed calls per row")
    parser.add_argument("--json", default="", help="where the rows go, as well")
    args = parser.parse_args(argv)
    try:
        cfg = train_moe.Hyperparameters()
    except train_moe.ConfigError as e:
        print(f"config_error: {e}", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    table = rows(cfg, device, args.iters)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device:{name} torch:{torch.__version__} micro-batch:{cfg.train_batch_tokens // (cfg.world_size * cfg.grad_accum_steps)} "
          f"tokens, forward and backward")
    print(f"{'part':<44} {'ms':>8}")
    for r in table:
        print(f"{r['part']:<44} {r['ms']:>8.3f}" if r["ms"] is not None else f"{r['part']:<44} {'-':>8}  {r['reason']}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(device=name, torch=torch.__version__, rows=table), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
