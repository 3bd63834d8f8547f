"""Turn any text into Parameter Golf shards with a SentencePiece tokenizer.

Inputs are local .json/.jsonl/.txt/.parquet files (optionally .zst or .gz compressed; a .txt holds one
document per line) or Hugging Face dataset names (NAME or NAME:CONFIG, streamed), read in the order given.
The first --val-docs documents form the val split; the rest, shuffled by --seed, form the train split.
Either train a tokenizer with the challenge's recipe on the train documents (--tokenizer-out) or reuse one
(--tokenizer). Each document is its BOS id followed by its tokens; no EOS.

    python -m data.prepare --input corpus.jsonl.zst more/*.jsonl.zst --val-docs 400 \
        --output data/datasets/mytext_sp1024 --tokenizer-out data/tokenizers/mytext_1024_bpe.model
"""
import argparse
import os
import re
import sys
from collections import deque
from collections.abc import Iterable, Iterator
from itertools import islice
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import sentencepiece as spm
from tqdm import tqdm

from data.shards import MAX_SHARD_TOKENS, shard_name, write_shard

SPECIAL_IDS = {"pad": 0, "bos": 1, "eos": 2, "unk": 3}
MAX_VOCAB = 2**16  # shards store uint16 ids
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".txt": "text", ".parquet": "parquet"}
COMPRESSIONS = {".zst", ".gz"}
HUB_NAME = re.compile(r"[\w.-]+/[\w.-]+(:[\w.-]+)?")
BATCH_DOCS = 256


def train_tokenizer(documents: Iterable[str], model_path: Path, vocab_size: int) -> Path:
    """Train the challenge's SentencePiece BPE recipe; writes model_path and the .vocab beside it."""
    model_path = Path(model_path)
    if model_path.suffix != ".model":
        raise ValueError(f"tokenizer path {model_path} must end in .model")
    if vocab_size > MAX_VOCAB:
        raise ValueError(f"vocab size {vocab_size} does not fit the uint16 shards (max {MAX_VOCAB})")
    model_path.parent.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(documents), model_prefix=str(model_path.with_suffix("")),
        model_type="bpe", vocab_size=vocab_size, byte_fallback=True, split_digits=True,
        normalization_rule_name="nmt_nfkc", add_dummy_prefix=False, character_coverage=0.999,
        hard_vocab_limit=False, **{f"{name}_id": i for name, i in SPECIAL_IDS.items()},
        # Documents are the training sentences; the default limit (4192 bytes) would silently drop long ones.
        max_sentence_length=1 << 30, minloglevel=1)
    return model_path


def write_splits(documents: Iterable[str], output_dir: Path, tokenizer_path: Path, val_documents: int,
                 seed: int = 1337, shard_tokens: int = MAX_SHARD_TOKENS, workers: int = 1) -> dict:
    """Tokenize, split (first val_documents = val, the rest shuffled = train), write shards; return stats."""
    _load_tokenizer(tokenizer_path)  # fail on a bad tokenizer before any work
    if val_documents < 1:
        raise ValueError(f"the val split needs at least 1 document, got {val_documents}")
    if not 1 <= shard_tokens <= MAX_SHARD_TOKENS:
        raise ValueError(f"shard size must be 1..{MAX_SHARD_TOKENS} tokens, got {shard_tokens}")
    total = len(documents) if hasattr(documents, "__len__") else None
    splits = {"val": [], "train": []}  # per document: (tokens, utf8 bytes, byte-fallback tokens)
    for tokens, doc_bytes, fallback in tqdm(_encode(documents, tokenizer_path, workers), total=total,
                                            desc="tokenizing", unit="doc", unit_scale=True):
        split = "val" if len(splits["val"]) < val_documents else "train"
        splits[split].append((tokens, doc_bytes, fallback))
    _check_split_sizes(len(splits["val"]) + len(splits["train"]), val_documents)
    train = splits["train"]
    splits["train"] = [train[i] for i in _train_order(len(train), seed)]

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for stale in output_dir.glob("fineweb_*_*.bin"):  # a smaller rerun must not leave old shards behind
        stale.unlink()
    summary = {}
    for split, docs in splits.items():
        stream = np.concatenate([tokens for tokens, _, _ in docs])
        starts = range(0, len(stream), shard_tokens)
        for index, start in enumerate(starts):
            write_shard(output_dir / shard_name(split, index), stream[start:start + shard_tokens])
        doc_bytes = sum(b for _, b, _ in docs)
        summary[split] = {"documents": len(docs), "tokens": len(stream), "bytes": doc_bytes,
                          "bytes_per_token": doc_bytes / len(stream),
                          "byte_fallback_share": sum(f for _, _, f in docs) / len(stream), "shards": len(starts)}
    return summary


def summary_lines(summary: dict) -> list[str]:
    return [f"split:{split} documents:{stats['documents']} tokens:{stats['tokens']} bytes:{stats['bytes']} "
            f"bytes_per_token:{stats['bytes_per_token']:.3f} byte_fallback_share:{stats['byte_fallback_share']:.5f} "
            f"shards:{stats['shards']}" for split, stats in summary.items()]


def _load_tokenizer(path: Path) -> spm.SentencePieceProcessor:
    if not Path(path).is_file():
        raise FileNotFoundError(f"tokenizer {path} not found")
    sp = spm.SentencePieceProcessor(model_file=str(path))
    ids = {name: getattr(sp, f"{name}_id")() for name in SPECIAL_IDS}
    if ids != SPECIAL_IDS:
        raise ValueError(f"tokenizer {path} has ids {ids}; the challenge needs {SPECIAL_IDS}")
    if sp.vocab_size() > MAX_VOCAB:
        raise ValueError(f"tokenizer {path} has {sp.vocab_size()} pieces; uint16 shards hold at most {MAX_VOCAB}")
    return sp


def _check_split_sizes(documents: int, val_documents: int) -> None:
    if documents <= val_documents:
        raise ValueError(f"{documents} documents leave nothing for train after {val_documents} val documents")


def _train_order(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(count)


_worker_tokenizer: spm.SentencePieceProcessor | None = None
_worker_is_byte: np.ndarray | None = None


def _init_worker(tokenizer_path: Path) -> None:
    global _worker_tokenizer, _worker_is_byte
    _worker_tokenizer = _load_tokenizer(tokenizer_path)
    _worker_is_byte = np.array([_worker_tokenizer.is_byte(i) for i in range(_worker_tokenizer.vocab_size())])


def _encode_batch(texts: list[str]) -> list[tuple[np.ndarray, int, int]]:
    bos = SPECIAL_IDS["bos"]
    encoded = _worker_tokenizer.encode(texts, num_threads=1)  # --workers alone sets the parallelism
    result = []
    for text, ids in zip(texts, encoded):
        tokens = np.array([bos, *ids], dtype=np.uint16)
        result.append((tokens, len(text.encode("utf-8")), int(_worker_is_byte[tokens].sum())))
    return result


def _encode(documents: Iterable[str], tokenizer_path: Path, workers: int) -> Iterator[tuple[np.ndarray, int, int]]:
    """Encode in input order; only a few batches per worker are in flight, so streamed text is never all in memory."""
    documents = iter(documents)
    batches = iter(lambda: list(islice(documents, BATCH_DOCS)), [])
    if workers <= 1:
        _init_worker(tokenizer_path)
        for batch in batches:
            yield from _encode_batch(batch)
        return
    with get_context("spawn").Pool(workers, _init_worker, (tokenizer_path,)) as pool:
        pending = deque()
        for batch in batches:
            pending.append(pool.apply_async(_encode_batch, (batch,)))
            if len(pending) > 4 * workers:
                yield from pending.popleft().get()
        while pending:
            yield from pending.popleft().get()


def _check_inputs(inputs: list[str]) -> None:
    for name in inputs:
        path = Path(name)
        if path.is_file():
            if not _file_builder(path):
                raise ValueError(f"input {name}: unsupported file type; use {', '.join(FILE_BUILDERS)} (+ .zst/.gz)")
        elif path.exists():
            raise ValueError(f"input {name} is not a file; pass the files themselves, e.g. {name}/*.jsonl.zst")
        elif _file_builder(path) or not HUB_NAME.fullmatch(name):
            raise FileNotFoundError(f"input file {name} not found (a hub dataset is given as NAME or NAME:CONFIG)")


def _file_builder(path: Path) -> str | None:
    suffixes = path.suffixes[:-1] if path.suffixes[-1:] and path.suffixes[-1] in COMPRESSIONS else path.suffixes
    return FILE_BUILDERS.get(suffixes[-1]) if suffixes else None


def _read_documents(inputs: list[str], text_column: str) -> Iterator[str]:
    """Yield the non-blank texts of every input in order; files and hub datasets share one streaming reader."""
    from datasets import load_dataset  # slow import, and spawned workers never need it

    for name in inputs:
        path = Path(name)
        if path.is_file():
            rows = load_dataset(_file_builder(path), data_files=str(path), split="train", streaming=True)
        else:
            hub_name, _, config = name.partition(":")
            rows = load_dataset(hub_name, config or None, split="train", streaming=True)
        count = 0
        for row in rows:
            if text_column not in row:
                raise ValueError(f"input {name} has no column {text_column!r} (columns: {', '.join(row)})")
            text = row[text_column]
            if text and not text.isspace():
                count += 1
                yield text
        if count == 0:
            raise ValueError(f"input {name} holds no documents")


def _first_chars(documents: Iterable[str], chars: int) -> Iterator[str]:
    for text in documents:
        if chars <= 0:
            return
        chars -= len(text)
        yield text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", nargs="+", required=True, help="files (.json .jsonl .txt .parquet, +.zst/.gz) "
                        "or Hugging Face datasets NAME[:CONFIG]; the first one listed supplies the val documents")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--output", type=Path, required=True, help="folder for the shards")
    tokenizer = parser.add_mutually_exclusive_group(required=True)
    tokenizer.add_argument("--tokenizer", type=Path, help="reuse this SentencePiece .model")
    tokenizer.add_argument("--tokenizer-out", type=Path, help="train a tokenizer and write it here (NAME.model)")
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--tokenizer-train-chars", type=int, default=10_000_000,
                        help="characters of train text the tokenizer is trained on")
    parser.add_argument("--val-docs", type=int, required=True, help="the first N documents form the val split")
    parser.add_argument("--max-docs", type=int, help="stop reading after this many documents (for hub datasets)")
    parser.add_argument("--seed", type=int, default=1337, help="shuffles the train split")
    parser.add_argument("--shard-tokens", type=int, default=MAX_SHARD_TOKENS)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--overwrite", action="store_true", help="replace the shards (and tokenizer) already there")
    args = parser.parse_args(argv)

    try:
        if args.output.exists() and any(args.output.iterdir()) and not args.overwrite:
            raise ValueError(f"output folder {args.output} is not empty; pass --overwrite to replace its shards")
        if args.tokenizer_out and args.tokenizer_out.suffix != ".model":
            raise ValueError(f"--tokenizer-out {args.tokenizer_out} must end in .model")
        if args.tokenizer_out and args.tokenizer_out.exists() and not args.overwrite:
            raise ValueError(f"tokenizer {args.tokenizer_out} exists; pass --overwrite to replace it")
        if args.val_docs < 1:
            raise ValueError(f"--val-docs must be at least 1, got {args.val_docs}")
        if args.vocab_size > MAX_VOCAB:
            raise ValueError(f"--vocab-size {args.vocab_size} does not fit uint16 shards (max {MAX_VOCAB})")
        _check_inputs(args.input)
        if args.tokenizer:
            _load_tokenizer(args.tokenizer)
        documents = islice(_read_documents(args.input, args.text_column), args.max_docs)
        tokenizer_path = args.tokenizer
        if args.tokenizer_out:
            # The tokenizer learns from the start of the shuffled train split, so the text must be in memory.
            documents = list(tqdm(documents, desc="reading", unit="doc", unit_scale=True))
            _check_split_sizes(len(documents), args.val_docs)
            train = documents[args.val_docs:]
            sample = _first_chars((train[i] for i in _train_order(len(train), args.seed)), args.tokenizer_train_chars)
            tokenizer_path = train_tokenizer(sample, args.tokenizer_out, args.vocab_size)
        summary = write_splits(documents, args.output, tokenizer_path, args.val_docs, args.seed,
                               args.shard_tokens, args.workers)
    except (OSError, ValueError) as error:
        sys.exit(f"prepare: error: {error}")
    vocab_size = spm.SentencePieceProcessor(model_file=str(tokenizer_path)).vocab_size()
    print(f"tokenizer:{tokenizer_path} vocab_size:{vocab_size} output:{args.output}")
    print("\n".join(summary_lines(summary)))


if __name__ == "__main__":
    main()
