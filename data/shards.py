"""The Parameter Golf token shard format, shared by the data scripts.

A shard is 256 little-endian int32 header words ([0] magic, [1] version, [2] token count, the rest zero)
followed by the tokens as little-endian uint16. train_moe.py carries its own reader because it must stay a
single file; this module is the writer and the checker the data scripts use.
"""
import os
from pathlib import Path

import numpy as np

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_WORDS = 256
HEADER_BYTES = HEADER_WORDS * 4
MAX_SHARD_TOKENS = 10**8


class ShardError(ValueError):
    pass


def shard_name(split: str, index: int) -> str:
    return f"fineweb_{split}_{index:06d}.bin"


def write_shard(path: str | Path, tokens: np.ndarray) -> None:
    """Write tokens as one shard, through a temporary file so a crash never leaves a plausible half shard."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or len(tokens) > MAX_SHARD_TOKENS:
        raise ShardError(f"{path}: a shard holds a 1-D array of at most {MAX_SHARD_TOKENS} tokens, got shape {tokens.shape}")
    if len(tokens) and (tokens.min() < 0 or tokens.max() >= 2**16):
        raise ShardError(f"{path}: token ids must fit in uint16")
    header = np.zeros(HEADER_WORDS, dtype="<i4")
    header[:3] = (SHARD_MAGIC, SHARD_VERSION, len(tokens))
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype("<u2").tobytes())
    os.replace(tmp, path)


def read_shard_header(path: str | Path) -> int:
    """Return the token count after checking magic, version and exact file size; ShardError names the fault."""
    path = Path(path)
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ShardError(f"{path}: {size} bytes is shorter than the {HEADER_BYTES}-byte header")
    header = np.fromfile(path, dtype="<i4", count=HEADER_WORDS)
    if header[0] != SHARD_MAGIC:
        raise ShardError(f"{path}: magic {header[0]} != {SHARD_MAGIC}")
    if header[1] != SHARD_VERSION:
        raise ShardError(f"{path}: version {header[1]} != {SHARD_VERSION}")
    count = int(header[2])
    if size != HEADER_BYTES + 2 * count:
        raise ShardError(f"{path}: size {size} != {HEADER_BYTES} + 2 * {count} tokens in the header")
    return count


def read_shard(path: str | Path) -> np.ndarray:
    count = read_shard_header(path)
    return np.fromfile(path, dtype="<u2", count=count, offset=HEADER_BYTES)
