"""One MoE layer's expert GEMMs, each alone, against the dense MLP's six matmuls: where the experts' extra time goes,
per routing skew and per chunk count of the weight gradients' cuts.

    python scripts/bench_experts.py                                   # sparse's experts: 16 of 512, top-2
    python scripts/bench_experts.py --hidden 256 --skews 1 5 --chunks 0 16 64 --json experts.json

One micro-batch of one layer at the trainer's default shape (--tokens 65,536 of --dim 512, top-2). Routing is drawn
with the busiest expert at each --skews multiple of a fair share (bench_step's random tokens through untrained
routers give 5-7x; the study's trained routers 1.1-1.3x, docs/study.md). Each GEMM runs --iters times; on a GPU its
time is its kernels' device time from the profiler (the host's launch cost left out), on a CPU wall time. Rows: the
dense MLP (fc and proj: forward, input and weight gradients); the experts through QuACK where it runs (sm90 with
quack-kernels: the first GEMM with the gather and the activation fused, the second, the backward's fused activation
gradient, the input gradient, and per chunk count the two weight gradients over ExpertBank's cuts plus their
per-expert sum); the same GEMMs through torch._grouped_mm on rows gathered beforehand. Each weight gradient, summed
per expert, is compared with the uncut per-expert product: a wrong cut shows as an error, not as a speed.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_moe  # noqa: E402

quack = train_moe.quack  # None without quack-kernels; the tests put a CPU stand-in here


def skew_error(busiest: float, experts: int) -> str | None:
    """Why top-2 routing cannot put `busiest` times a fair share on one expert, or None where it can."""
    if not 1 <= busiest <= experts / 2:
        return f"busiest={busiest}: top-2 over {experts} experts allows 1 to {experts / 2} times a fair share"
    return None


def routed(tokens: int, experts: int, busiest: float, generator: torch.Generator) -> torch.Tensor:
    """[tokens, 2] distinct experts; expert 0 takes `busiest` times a fair share of the slots (in expectation),
    the others share the rest evenly: the first pick is expert 0 with probability p, else uniform over the
    others, and the second is uniform over the experts the first did not pick."""
    if error := skew_error(busiest, experts):
        raise ValueError(error)
    fair = 2 / experts  # expert 0's share of tokens at balance
    p = (busiest * fair - 1 / (experts - 1)) / (1 - 1 / (experts - 1))
    device = generator.device
    first = torch.where(torch.rand(tokens, device=device, generator=generator) < p, 0,
                        torch.randint(1, experts, (tokens,), device=device, generator=generator))
    second = (first + torch.randint(1, experts, (tokens,), device=device, generator=generator)) % experts
    return torch.stack([first, second], dim=1)


def timed_ms(fn, iters: int, device: torch.device) -> float:
    """Milliseconds a call: kernel time on a GPU, wall time on a CPU (after two untimed calls: QuACK tunes there)."""
    for _ in range(2):
        fn()
    if device.type != "cuda":
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        return 1000 * (time.perf_counter() - start) / iters
    torch.cuda.synchronize(device)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize(device)
    return sum(e.self_device_time_total for e in prof.key_averages()) / iters / 1000


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-30)).item()


def dense_rows(x, grad, hidden: int, iters: int) -> list[dict]:
    """The dense MLP's six matmuls at hidden units `hidden` (the trainer's 2 x dim)."""
    g = torch.Generator(device=x.device).manual_seed(1)
    fc = torch.randn(hidden, x.size(1), device=x.device, generator=g).to(x.dtype) / x.size(1) ** 0.5
    proj = torch.randn(x.size(1), hidden, device=x.device, generator=g).to(x.dtype) / hidden ** 0.5
    h = x @ fc.T
    calls = {"fc forward": lambda: x @ fc.T, "proj forward": lambda: h @ proj.T, "proj input grad": lambda: grad @ proj,
             "proj weight grad": lambda: grad.T @ h, "fc input grad": lambda: h @ fc, "fc weight grad": lambda: h.T @ x}
    return [dict(path="dense", gemm=name, ms=timed_ms(fn, iters, x.device)) for name, fn in calls.items()]


def expert_rows(x, grad, experts: int, hidden: int, busiest: float, chunks: list[int], act: str, iters: int) -> list[dict]:
    """The experts' GEMMs at one routing skew: QuACK's (where it runs) and torch._grouped_mm's."""
    device, dtype, (n, d) = x.device, x.dtype, x.shape
    g = torch.Generator(device=device).manual_seed(2)
    w_in = (torch.randn(experts, hidden, d, device=device, generator=g) / d**0.5).to(dtype)
    w_out = (torch.randn(experts, d, hidden, device=device, generator=g) / hidden**0.5).to(dtype)
    idx = routed(n, experts, busiest, g)
    weights = torch.rand(n, 2, device=device, generator=g)
    order = torch.argsort(idx.flatten().to(torch.uint8), stable=True)
    counts = torch.bincount(idx.flatten(), minlength=experts)
    token = (order // 2).to(torch.int32)  # the row of x each expert-sorted slot reads
    x_sorted, grad_sorted = x[token], grad[token]
    offsets = counts.cumsum(0).to(torch.int32)
    bounds = F.pad(offsets, (1, 0))
    base = dict(busiest=(counts.max() / counts.float().mean()).item())
    rows = []

    def add(path: str, gemm: str, fn, chunk=None, check=None):
        rows.append(dict(base, path=path, gemm=gemm, chunks=chunk, ms=timed_ms(fn, iters, device),
                         error=None if check is None else relative_error(*check())))

    pre = torch._grouped_mm(x_sorted, w_in.mT, offs=offsets)
    hid = train_moe.activate(pre.float(), act).to(dtype)
    add("torch", "first, rows gathered before", lambda: torch._grouped_mm(x_sorted, w_in.mT, offs=offsets))
    add("torch", "second", lambda: torch._grouped_mm(hid, w_out.mT, offs=offsets))
    want_w_out = torch._grouped_mm(grad_sorted.mT, hid, offs=offsets)  # [E, D, F], uncut: the reference
    for c in chunks:
        _, cuts, cut_expert = train_moe.expert_groups(counts, c)
        add("torch", "weight grad (w_out), cut", lambda cuts=cuts: torch._grouped_mm(grad_sorted.mT, hid, offs=cuts), c,
            lambda cuts=cuts, ce=cut_expert: (train_moe.sum_per_expert(
                torch._grouped_mm(grad_sorted.mT, hid, offs=cuts).float(), ce, experts), want_w_out))
    if quack is None:
        return rows
    quack_act = train_moe.QUACK_ACTIVATIONS[act]
    wsorted = weights.flatten()[order]
    preact, hidden_q = quack.gemm_act(x, w_in.mT, activation=quack_act, cu_seqlens_m=bounds, A_idx=token)
    grad_pre, weighted, _ = quack.gemm_dact(grad, w_out, preact, activation=quack_act, colvec_scale=wsorted,
                                            colvec_reduce=True, cu_seqlens_m=bounds, A_idx=token)
    add("quack", "first, gather + activation", lambda: quack.gemm_act(x, w_in.mT, activation=quack_act,
                                                                        cu_seqlens_m=bounds, A_idx=token))
    add("quack", "second", lambda: quack.gemm(hidden_q, w_out.mT, cu_seqlens_m=bounds))
    add("quack", "backward: gather + activation grad", lambda: quack.gemm_dact(
        grad, w_out, preact, activation=quack_act, colvec_scale=wsorted, colvec_reduce=True, cu_seqlens_m=bounds,
        A_idx=token))
    add("quack", "input grad", lambda: quack.gemm(grad_pre, w_in, cu_seqlens_m=bounds))
    want_in = torch._grouped_mm(x_sorted.mT, grad_pre, offs=offsets)  # [E, D, F]
    want_out = torch._grouped_mm(grad_sorted.mT, weighted, offs=offsets)
    for c in chunks:
        _, cuts, cut_expert = train_moe.expert_groups(counts, c)
        cut_bounds = F.pad(cuts, (1, 0))

        def cut(rows_t, b, cb=cut_bounds):
            return quack.gemm(rows_t.T, b, cu_seqlens_k=cb, A_idx=token, out_dtype=torch.float32)

        sums = cut(x, grad_pre)
        add("quack", "weight grad (w_in), cut", lambda: cut(x, grad_pre), c,
            lambda ce=cut_expert: (train_moe.sum_per_expert(cut(x, grad_pre), ce, experts), want_in))
        add("quack", "weight grad (w_out), cut", lambda: cut(grad, weighted), c,
            lambda ce=cut_expert: (train_moe.sum_per_expert(cut(grad, weighted), ce, experts), want_out))
        add("quack", "per-expert sum of the cuts", lambda s=sums, ce=cut_expert: train_moe.sum_per_expert(s, ce, experts), c)
    return rows


def layer_totals(rows: list[dict]) -> list[dict]:
    """Per skew and chunk count: QuACK's whole layer (both weight gradients and their two sums) against the dense MLP."""
    dense = sum(r["ms"] for r in rows if r["path"] == "dense")
    totals = []
    for busiest in dict.fromkeys(r["busiest"] for r in rows if r["path"] == "quack"):
        quack_rows = [r for r in rows if r["path"] == "quack" and r["busiest"] == busiest]
        fixed = sum(r["ms"] for r in quack_rows if r["chunks"] is None)
        for c in dict.fromkeys(r["chunks"] for r in quack_rows if r["chunks"] is not None):
            cut = [r for r in quack_rows if r["chunks"] == c]
            ms = fixed + sum(r["ms"] * (2 if r["gemm"].startswith("per-expert") else 1) for r in cut)
            totals.append(dict(busiest=busiest, chunks=c, ms=ms, vs_dense=ms / dense))
    return totals


def format_table(rows: list[dict], totals: list[dict]) -> str:
    lines = [f"{'path':<6} {'gemm':<36} {'busiest':>7} {'chunks':>6} {'ms':>8} {'error':>9}", "-" * 77]
    for r in rows:
        busiest = "-" if "busiest" not in r else f"{r['busiest']:.2f}"
        chunks = "-" if r.get("chunks") is None else r["chunks"]
        error = "-" if r.get("error") is None else f"{r['error']:.1e}"
        lines.append(f"{r['path']:<6} {r['gemm']:<36} {busiest:>7} {chunks:>6} {r['ms']:>8.3f} {error:>9}")
    dense = sum(r["ms"] for r in rows if r["path"] == "dense")
    lines += ["", f"dense MLP, six matmuls: {dense:.3f} ms"]
    lines += [f"QuACK layer at busiest {t['busiest']:.2f}, chunks {t['chunks']}: {t['ms']:.3f} ms ({t['vs_dense']:.2f}x dense)"
              for t in totals]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=65536, help="one micro-batch's tokens")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=512, help="each expert's; the dense MLP's is 2 x dim")
    parser.add_argument("--act", default="relu2", choices=sorted(set(train_moe.QUACK_ACTIVATIONS) - {"swiglu"}))
    parser.add_argument("--skews", type=float, nargs="+", default=[1.0, 2.0, 5.0], help="busiest expert / fair share")
    parser.add_argument("--chunks", type=int, nargs="+", default=[0, 16, 32, 64], help="row chunks of the weight "
                        "gradients' cuts (the trainer's: 4 x experts)")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--json", default="", help="where the rows go")
    args = parser.parse_args(argv)
    for busiest in args.skews:
        if error := skew_error(busiest, args.experts):
            parser.error(error)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(args.tokens, args.dim, device=device, generator=g).to(dtype)
    grad = torch.randn(args.tokens, args.dim, device=device, generator=g).to(dtype)
    rows = dense_rows(x, grad, 2 * args.dim, args.iters)
    for busiest in args.skews:
        rows += expert_rows(x, grad, args.experts, args.hidden, busiest, args.chunks, args.act, args.iters)
    totals = layer_totals(rows)
    print(format_table(rows, totals))
    if args.json:
        gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        Path(args.json).write_text(json.dumps(dict(meta=dict(gpu=gpu, args=vars(args)), rows=rows, totals=totals), indent=1))


if __name__ == "__main__":
    main()
