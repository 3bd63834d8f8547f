"""Compressors on an artifact's own quantized levels: bytes, pack and unpack seconds, side by side.

    python scripts/compress_bench.py artifacts/<RUN_ID>.moe [...] [--json bench.json] [--threads 16]
    python scripts/compress_bench.py ... --fp32 artifacts/<RUN_ID>.fp32.pt    # also the challenge's int8 on those weights

Each artifact is decompressed to its payload (the JSON header and the arrays: integer levels, fp16 scales, float
tensors), laid out again (`header_order`: every array in the header's order, as the trainer wrote them before brotli;
`grouped`: every level array first, then the other arrays byte-shuffled, each byte of a value in its own plane;
`grouped_cols`: the same with each level matrix stored by columns; `bits_cols`: those grouped by bits too, the
trainer's layout; `grouped_rows_by_scale`: each matrix's rows in the order of their scales, which a reader recovers
from the scales themselves) and compressed with each codec in chunks packed in parallel. Every result is
decompressed and checked against its input: a row that fails says so, and the exit status is 1 (pyppmd 1.3.1's
PPMd fails its own round trip on some inputs: one 4 MiB chunk of a dense artifact raised "Corrupted input data").
The order-0 entropy of the levels is printed as the floor that coders of independent symbols approach.

--fp32 quantizes the run's weights (SAVE_FP32=1) as the challenge's train_gpt.py does for its int8 + zlib export
(rows clipped at the 99.99984th percentile of |w|, the step max(clip / 127, 1/127)) and as train_moe.py's 8-bit
round-to-nearest does, to compare bytes per parameter on the same weights.
"""
import argparse
import bz2
import io
import json
import lzma
import math
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import brotli
import numpy as np
import pyppmd
import torch
import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_moe as tm  # noqa: E402

# Bytes per independently compressed chunk, so that packing runs on every core: zstd in the trainer's 1 MiB frames
# (its entropy tables are per frame: 4 MiB frames came 4% larger), the adaptive coders in 4 MiB.
CHUNK = {"zstd22": 1 << 20}
DEFAULT_CHUNK = 4 << 20
LZMA_IID = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME, "lc": 0, "lp": 0, "pb": 0}]
LZMA_9E = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]
# name: (compress one chunk, decompress one chunk)
CODECS = {
    "zstd22": (lambda b: zstandard.ZstdCompressor(level=22).compress(b),
               lambda b: zstandard.ZstdDecompressor().decompress(b)),
    "lzma9e": (lambda b: lzma.compress(b, format=lzma.FORMAT_RAW, filters=LZMA_9E),
               lambda b: lzma.decompress(b, format=lzma.FORMAT_RAW, filters=LZMA_9E)),
    "lzma9e_lc0": (lambda b: lzma.compress(b, format=lzma.FORMAT_RAW, filters=LZMA_IID),
                   lambda b: lzma.decompress(b, format=lzma.FORMAT_RAW, filters=LZMA_IID)),
    "brotli11": (lambda b: brotli.compress(b, quality=11, lgwin=24), brotli.decompress),
    "ppmd_o2": (lambda b: pyppmd.compress(b, max_order=2, mem_size=64 << 20, variant="I"),
                lambda b: pyppmd.decompress(b, max_order=2, mem_size=64 << 20, variant="I")),
    "bz2_9": (lambda b: bz2.compress(b, 9), bz2.decompress),
}


def byte_planes(a: np.ndarray) -> bytes:
    """A multi-byte array's bytes, all first bytes of its values, then all second bytes, ..."""
    return np.ascontiguousarray(a).view(np.uint8).reshape(-1, a.dtype.itemsize).T.tobytes()


def layouts(meta: dict, arrays: dict[str, np.ndarray], raw: bytes) -> dict[str, bytes]:
    header = json.dumps(meta, separators=(",", ":")).encode()
    names = list(meta["tensors"])  # the header's order, each tensor then its own arrays
    arrays = {n: arrays[n] for n in sorted(arrays, key=lambda n: (names.index(n.split(".scale")[0].split(".lqer")[0]), n))}
    levels = {n: a for n, a in arrays.items() if a.dtype == np.int8}
    rest = b"".join(byte_planes(a) for n, a in arrays.items() if a.dtype != np.int8)

    def by_scale(name, a):
        scale = arrays[name + ".scale"].astype(np.float32).reshape(-1)
        return a.reshape(len(scale), -1)[np.argsort(scale, kind="stable")]

    def columns(a):
        return np.ascontiguousarray(a.reshape(-1, a.shape[-1]).T).tobytes()

    return {
        "header_order": header + b"".join(np.ascontiguousarray(a).tobytes() for a in arrays.values()),
        "grouped": header + b"".join(a.tobytes() for a in levels.values()) + rest,
        "grouped_cols": header + b"".join(columns(a) for a in levels.values()) + rest,
        "bits_cols": raw,
        "grouped_rows_by_scale": header + b"".join(by_scale(n, a).tobytes() for n, a in levels.items()) + rest,
    }


def entropy_bytes(arrays: dict[str, np.ndarray]) -> float:
    """Order-0 entropy of each level array, summed, in bytes."""
    return sum(tm.entropy_bytes(torch.from_numpy(a.copy())) for a in arrays.values() if a.dtype == np.int8)


def measure(data: bytes, codec: str, threads: int) -> dict:
    compress, decompress = CODECS[codec]
    size = CHUNK.get(codec, DEFAULT_CHUNK)
    chunks = [data[i : i + size] for i in range(0, len(data), size)]
    with ThreadPoolExecutor(threads) as pool:
        start = time.perf_counter()
        packed = list(pool.map(compress, chunks))
        pack_s = time.perf_counter() - start
        start = time.perf_counter()
        try:
            unpacked = b"".join(pool.map(decompress, packed))
        except Exception as e:  # a codec's own error type: pyppmd raises ValueError on a stream it wrote itself
            unpacked = f"{type(e).__name__}: {e}"
        unpack_s = time.perf_counter() - start
    failed = None if unpacked == data else "does not give back its input" + (f" ({unpacked})" if isinstance(unpacked, str) else "")
    return dict(bytes=sum(map(len, packed)), pack_s=pack_s, unpack_s=unpack_s, failed=failed)


def bench(path: Path, codecs: list[str], threads: int) -> list[dict]:
    blob = path.read_bytes()
    raw = tm.unseal(tm.decompress(blob))
    meta, arrays = tm.payload_arrays(raw)
    rows = [dict(artifact=path.name, layout="trainer", codec="as written", bytes=len(blob), pack_s=None, unpack_s=None,
                 failed=None),
            dict(artifact=path.name, layout="levels", codec="order-0 entropy", bytes=round(entropy_bytes(arrays)),
                 pack_s=None, unpack_s=None, failed=None)]
    for layout, data in layouts(meta, arrays, raw).items():
        for codec in codecs:
            rows.append(dict(artifact=path.name, layout=layout, codec=codec, **measure(data, codec, threads)))
            print("bench " + " ".join(f"{k}:{v}" for k, v in rows[-1].items()), flush=True)
    return rows


def challenge_int8(state: dict[str, torch.Tensor]) -> dict:
    """Bytes of train_gpt.py's int8 export of these weights (its per-row clip, its step floor of 1/127, tensors of up to
    65,536 values kept as fp16), without the floor, and of train_moe.py's 8-bit rounding, each as raw levels and fp16
    scales under zlib-9 (the challenge's) and the trainer's compressor."""
    out = {}
    for name, floor in (("challenge_int8", 1 / 127), ("challenge_int8_no_floor", 0.0), ("train_moe_int8", None)):
        parts, rows, floored, params = [], 0, 0, 0
        for key, t in state.items():
            t = t.float()
            params += t.numel()
            if t.ndim != 2 or t.numel() <= 65_536 or (floor is None and not tm.is_quantized(key, t)):
                parts.append(t.half().numpy().tobytes())
                continue
            if floor is None:
                q, scale = tm.quantize_matrix(t, 8, 0.0)
            else:
                clip = torch.quantile(t.abs(), 0.9999984, dim=1)
                scale = (clip / 127).clamp_min(floor)
                q = torch.clamp(torch.round(torch.clamp(t, -clip[:, None], clip[:, None]) / scale[:, None]), -127, 127)
                floored += int((clip / 127 < floor).sum())
            rows += t.shape[0]
            parts += [q.to(torch.int8).numpy().tobytes(), scale.half().numpy().tobytes()]
        raw = b"".join(parts)
        out[name] = dict(zlib9=len(zlib.compress(raw, 9)), trainer=len(tm.compress(raw)), params=params,
                         rows=rows, rows_at_floor=floored)
        print(f"bench {name} " + " ".join(f"{k}:{v}" for k, v in out[name].items()), flush=True)
    return out


def table(rows: list[dict]) -> str:
    lines = ["| artifact | layout | codec | bytes | vs the trainer's | pack s | unpack s |", "|---|---|---|---|---|---|---|"]
    base = {r["artifact"]: r["bytes"] for r in rows if r["layout"] == "trainer"}
    for r in rows:
        ratio = f"{100 * (r['bytes'] / base[r['artifact']] - 1):+.2f}%" if r["artifact"] in base else ""
        times = [f"{r[k]:.2f}" if r[k] is not None else "" for k in ("pack_s", "unpack_s")]
        if r["failed"]:
            times[1] = f"round trip failed: {r['failed']}"
        lines.append(f"| {r['artifact']} | {r['layout']} | {r['codec']} | {r['bytes']:,} | {ratio} | {' | '.join(times)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifacts", nargs="+", type=Path)
    parser.add_argument("--codecs", nargs="+", choices=sorted(CODECS), default=list(CODECS))
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--fp32", type=Path, help="a SAVE_FP32=1 checkpoint: also the challenge's int8 on its weights")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    try:
        rows = [row for path in args.artifacts for row in bench(path, args.codecs, args.threads)]
        result = {"rows": rows}
        if args.fp32:
            result["int8"] = challenge_int8(torch.load(args.fp32, map_location="cpu")["state"])
    except (ValueError, OSError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(table(rows))
    failed = [f"{r['artifact']} {r['layout']} {r['codec']}" for r in rows if r["failed"]]
    if failed:
        print(f"error: {len(failed)} round trip(s) did not give back their input: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
