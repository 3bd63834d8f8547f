r"""Turn any text into Parameter Golf shards with a SentencePiece tokenizer.

Inputs are local .json/.jsonl/.txt/.parquet files (optionally .zst or .gz compressed; a .txt holds one
document per line, per paragraph or per file, as --txt-documents says) or Hugging Face dataset names (NAME or
NAME:CONFIG, streamed), read in the order given.
The first --val-docs documents form the val split; the rest, shuffled by --seed, form the train split.
Either train a tokenizer with the challenge's recipe on the train documents (--tokenizer-out) or reuse one
(--tokenizer). Each document is its BOS id followed by its tokens; no EOS. A bad input or argument ends the run
with one `error:` line and exit status 1, leaving any earlier shards and tokenizer as they were.

    python -m data.prepare --input corpus.jsonl.zst more/*.jsonl.zst --val-docs 400 \
        --output data/datasets/mytext_sp1024 --tokenizer-out data/tokenizers/mytext_1024_bpe.model
"""
import argparse
import gzip
import json
import os
import re
import shutil
import sys
import tempfile
import zlib
from collections import deque
from collections.abc import Iterable, Iterator
from itertools import islice
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pyarrow
import pyarrow.parquet as pq
import sentencepiece as spm
import zstandard

from data.progress import progress
from data.shards import MAX_SHARD_TOKENS, shard_name, write_shard

SPECIAL_IDS = {"pad": 0, "bos": 1, "eos": 2, "unk": 3}
MAX_VOCAB = 2**16  # shards store uint16 ids
BYTE_PIECES = 256
MIN_VOCAB = len(SPECIAL_IDS) + BYTE_PIECES + 1  # SentencePiece also needs a piece per character of the text
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".txt": "text", ".parquet": "parquet"}
COMPRESSIONS = {".zst", ".gz"}
HUB_NAME = re.compile(r"[\w.-]+/[\w.-]+(:[\w.-]+)?")
BATCH_DOCS = 256
TXT_DOCUMENTS = ("line", "paragraph", "file")  # what one document of a .txt input is; "line" is the default
READ_BYTES = 1 << 20


class PrepareError(Exception):
    """A bad input or argument; main reports it as one `error:` line."""


def train_tokenizer(documents: Iterable[str], model_path: Path, vocab_size: int) -> Path:
    """Train the challenge's SentencePiece BPE recipe; writes model_path and the .vocab beside it."""
    model_path = Path(model_path)
    if model_path.suffix != ".model":
        raise PrepareError(f"tokenizer path {model_path} must end in .model")
    _check_vocab_size(vocab_size)
    model_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(documents), model_prefix=str(model_path.with_suffix("")),
            model_type="bpe", vocab_size=vocab_size, byte_fallback=True, split_digits=True,
            normalization_rule_name="nmt_nfkc", add_dummy_prefix=False, character_coverage=0.999,
            hard_vocab_limit=False, **{f"{name}_id": i for name, i in SPECIAL_IDS.items()},
            # Documents are the training sentences; the default limit (4192 bytes) would silently drop long ones.
            max_sentence_length=1 << 30, minloglevel=1)
    except RuntimeError as e:  # SentencePiece's only way to report a failure
        needed = re.search(r"smaller than required_chars\. \d+ vs (\d+)", str(e))
        if needed:
            raise PrepareError(f"vocab size {vocab_size} is too small for this text: its characters need pieces "
                               f"too, so at least {needed[1]}") from None
        raise PrepareError(f"SentencePiece could not train a tokenizer: {e}") from None
    return model_path


def write_splits(documents: Iterable[str], output_dir: Path, tokenizer_path: Path, val_documents: int,
                 seed: int = 1337, shard_tokens: int = MAX_SHARD_TOKENS, workers: int = 1) -> dict:
    """Tokenize, split (first val_documents = val, the rest shuffled = train), write shards; return stats."""
    _load_tokenizer(tokenizer_path)  # fail on a bad tokenizer before any work
    _check_split_args(val_documents, shard_tokens)
    total = len(documents) if hasattr(documents, "__len__") else None
    splits = {"val": [], "train": []}  # per document: (tokens, utf8 bytes, byte-fallback tokens)
    for tokens, doc_bytes, fallback in progress(_encode(documents, tokenizer_path, workers), total=total,
                                                desc="tokenizing", unit="doc", unit_scale=True):
        split = "val" if len(splits["val"]) < val_documents else "train"
        splits[split].append((tokens, doc_bytes, fallback))
    _check_split_sizes(len(splits["val"]) + len(splits["train"]), val_documents)
    train = splits["train"]
    splits["train"] = [train[i] for i in _train_order(len(train), seed)]

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    # The old shards are replaced only once every new one is written, so a failed write leaves them intact.
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=output_dir))
    try:
        summary = {}
        for split, docs in splits.items():
            stream = np.concatenate([tokens for tokens, _, _ in docs])
            starts = range(0, len(stream), shard_tokens)
            for index, start in enumerate(starts):
                write_shard(staging / shard_name(split, index), stream[start:start + shard_tokens])
            doc_bytes = sum(b for _, b, _ in docs)
            # bos_share: each document costs one BOS token, so many short documents (a .txt read per line)
            # spend a visible share of the tokens on BOS.
            summary[split] = {"documents": len(docs), "tokens": len(stream), "bos_share": len(docs) / len(stream),
                              "bytes": doc_bytes, "bytes_per_token": doc_bytes / len(stream),
                              "byte_fallback_share": sum(f for _, _, f in docs) / len(stream), "shards": len(starts)}
        for stale in output_dir.glob("fineweb_*_*.bin"):  # a smaller rerun must not leave old shards behind
            stale.unlink()
        for shard in staging.iterdir():
            os.replace(shard, output_dir / shard.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return summary


def summary_lines(summary: dict) -> list[str]:
    return [f"split:{split} documents:{stats['documents']} tokens:{stats['tokens']} "
            f"bos_share:{stats['bos_share']:.5f} bytes:{stats['bytes']} "
            f"bytes_per_token:{stats['bytes_per_token']:.3f} byte_fallback_share:{stats['byte_fallback_share']:.5f} "
            f"shards:{stats['shards']}" for split, stats in summary.items()]


def _load_tokenizer(path: Path) -> spm.SentencePieceProcessor:
    if not Path(path).exists():
        raise PrepareError(f"tokenizer {path} not found")
    if not Path(path).is_file():
        raise PrepareError(f"tokenizer {path} is not a file")
    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except RuntimeError as e:
        raise PrepareError(f"tokenizer {path} is not a SentencePiece model ({e})") from None
    ids = {name: getattr(sp, f"{name}_id")() for name in SPECIAL_IDS}
    if ids != SPECIAL_IDS:
        raise PrepareError(f"tokenizer {path} has ids {ids}; the challenge needs {SPECIAL_IDS}")
    if sp.vocab_size() > MAX_VOCAB:
        raise PrepareError(f"tokenizer {path} has {sp.vocab_size()} pieces; uint16 shards hold at most {MAX_VOCAB}")
    return sp


def _check_vocab_size(vocab_size: int) -> None:
    if vocab_size > MAX_VOCAB:
        raise PrepareError(f"vocab size {vocab_size} does not fit the uint16 shards (max {MAX_VOCAB})")
    if vocab_size < MIN_VOCAB:
        raise PrepareError(f"vocab size {vocab_size} is below the minimum {MIN_VOCAB}: the {len(SPECIAL_IDS)} "
                           f"special and {BYTE_PIECES} byte pieces take {MIN_VOCAB - 1} ids, and each character "
                           "of the text needs one more")


def _check_split_args(val_documents: int, shard_tokens: int) -> None:
    if val_documents < 1:
        raise PrepareError(f"the val split needs at least 1 document, got {val_documents}")
    if not 1 <= shard_tokens <= MAX_SHARD_TOKENS:
        raise PrepareError(f"shard size must be 1..{MAX_SHARD_TOKENS} tokens, got {shard_tokens}")


def _check_split_sizes(documents: int, val_documents: int) -> None:
    if documents <= val_documents:
        raise PrepareError(f"{documents} documents leave nothing for train after {val_documents} val documents")


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
                raise PrepareError(f"input {name}: unsupported file type; use {', '.join(FILE_BUILDERS)} (+ .zst/.gz)")
        elif path.exists():
            raise PrepareError(f"input {name} is not a file; pass the files themselves, e.g. {name}/*.jsonl.zst")
        elif _file_builder(path) or not HUB_NAME.fullmatch(name):
            raise PrepareError(f"input file {name} not found (a hub dataset is given as NAME or NAME:CONFIG)")


def _file_builder(path: Path) -> str | None:
    return FILE_BUILDERS.get(_inner_suffix(path))


def _inner_suffix(path: Path) -> str:
    """The suffix under a compression suffix: .jsonl for corpus.jsonl.zst."""
    suffixes = path.suffixes[:-1] if path.suffixes[-1:] and path.suffixes[-1] in COMPRESSIONS else path.suffixes
    return suffixes[-1] if suffixes else ""


def _read_documents(inputs: list[str], text_column: str, txt_documents: str = "line") -> Iterator[str]:
    """Yield the non-blank texts of every input in order, streamed."""
    for name in inputs:
        path = Path(name)
        rows = _file_rows(path, text_column, txt_documents) if path.is_file() else _hub_rows(name, text_column)
        count = 0
        for where, text in rows:
            if not isinstance(text, str):
                raise PrepareError(f"input {name} {where}: {text_column!r} is {_show(text)}, not a string")
            if not text.isascii() and (surrogate := re.search("[\ud800-\udfff]", text)):  # JSON's "\ud800"
                raise PrepareError(f"input {name} {where}: {text_column!r} holds a lone surrogate "
                                   f"({surrogate[0].encode('unicode_escape').decode()}), which is no text")
            if text and not text.isspace():
                count += 1
                yield text
        if count == 0:
            raise PrepareError(f"input {name} holds no documents")


def _file_rows(path: Path, text_column: str, txt_documents: str = "line") -> Iterator[tuple[str, object]]:
    """(where, text) per record of a local file: a .txt document (see _txt_documents), a JSON Lines object, a
    parquet row."""
    try:
        with open(path, "rb") as file:
            chunks = _decompressed(file, path.suffix)
            if _file_builder(path) == "parquet":  # needs random access, so a compressed one is read into memory
                source = path if path.suffix not in COMPRESSIONS else pyarrow.BufferReader(b"".join(chunks))
                yield from _parquet_rows(pq.ParquetFile(source), text_column, f"input {path}")
                return
            if _inner_suffix(path) == ".json":  # one JSON array of objects, as Hugging Face exports write, or JSON Lines
                data = b"".join(chunks)
                if data.lstrip()[:1] == b"[":
                    yield from _json_array_rows(data, text_column, f"input {path}")
                    return
                chunks = [data]
            lines = _decoded_lines(chunks, path)
            if _file_builder(path) == "text":
                yield from _txt_documents(lines, txt_documents)
                return
            for number, line in lines:
                if line.strip():
                    yield f"line {number}", _json_text(line, text_column, f"input {path} line {number}")
    except (OSError, EOFError, zlib.error, zstandard.ZstdError, pyarrow.ArrowException) as e:
        raise PrepareError(f"input {path} cannot be read: {_first_line(e)}") from None


def _decoded_lines(chunks: Iterable[bytes], path: Path) -> Iterator[tuple[int, str]]:
    """(number, text) per line, without its line end (LF or CRLF)."""
    for number, line in enumerate(_lines(chunks), 1):
        try:
            yield number, line.decode("utf-8").removesuffix("\r")
        except UnicodeDecodeError as e:
            raise PrepareError(f"input {path} line {number}: not UTF-8 text ({e.reason})") from None


def _txt_documents(lines: Iterable[tuple[int, str]], mode: str) -> Iterator[tuple[str, str]]:
    """(where, text) per document of a .txt: each line; each paragraph (the lines between blank or whitespace-only
    lines, joined by newlines); or the whole file less its leading and trailing blank lines."""
    if mode == "line":
        for number, line in lines:
            yield f"line {number}", line
    elif mode == "file":  # the one mode that holds a whole file's text in memory
        text = [line for _, line in lines]
        blank = [not line.strip() for line in text]
        if False in blank:  # else the file holds no document
            first, end = blank.index(False), len(blank) - blank[::-1].index(False)
            yield f"lines {first + 1}-{end}", "\n".join(text[first:end])
    else:  # paragraph: only one paragraph at a time is in memory
        paragraph = []
        for number, line in lines:
            if line.strip():
                paragraph.append(line)
            elif paragraph:
                yield f"lines {number - len(paragraph)}-{number - 1}", "\n".join(paragraph)
                paragraph = []
        if paragraph:
            yield f"lines {number - len(paragraph) + 1}-{number}", "\n".join(paragraph)


def _decompressed(file, suffix: str) -> Iterator[bytes]:
    if suffix == ".zst":
        yield from _zstd_chunks(file)
        return
    if suffix == ".gz":
        file = gzip.GzipFile(fileobj=file)
    while chunk := file.read(READ_BYTES):
        yield chunk


def _zstd_chunks(file) -> Iterator[bytes]:
    """Frame after frame; a file cut inside a frame is an error (zstandard's stream reader would just stop)."""
    decompressor, frame = zstandard.ZstdDecompressor(), None
    while data := file.read(READ_BYTES):
        while data:
            frame = frame or decompressor.decompressobj()
            yield frame.decompress(data)
            data, frame = (frame.unused_data, None) if frame.eof else (b"", frame)
    if frame is not None:
        raise EOFError("the zstd data is truncated")


def _lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    pending = []
    for chunk in chunks:
        *complete, rest = chunk.split(b"\n")
        if complete:
            yield b"".join([*pending, complete[0]])
            yield from complete[1:]
            pending = []
        pending.append(rest)
    if any(pending):
        yield b"".join(pending)


def _json_text(line: str, text_column: str, where: str) -> object:
    try:
        row = json.loads(line)
    except ValueError as e:
        raise PrepareError(f"{where}: not JSON ({e})") from None
    return _row_text(row, text_column, where)


def _json_array_rows(data: bytes, text_column: str, where: str) -> Iterator[tuple[str, object]]:
    try:
        rows = json.loads(data)
    except ValueError as e:
        raise PrepareError(f"{where}: not JSON ({e})") from None
    if not isinstance(rows, list):
        raise PrepareError(f"{where}: a JSON array of objects or JSON Lines expected")
    for number, row in enumerate(rows, 1):
        yield f"item {number}", _row_text(row, text_column, f"{where} item {number}")


def _row_text(row: object, text_column: str, where: str) -> object:
    if not isinstance(row, dict):
        raise PrepareError(f"{where}: {_show(row)} is not a JSON object (JSON Lines hold one object per line)")
    if text_column not in row:
        raise PrepareError(f"{where} has no column {text_column!r} (columns: {', '.join(row)})")
    return row[text_column]


def _parquet_rows(parquet: pq.ParquetFile, text_column: str, where: str) -> Iterator[tuple[str, object]]:
    if text_column not in parquet.schema_arrow.names:
        raise PrepareError(f"{where} has no column {text_column!r} (columns: {', '.join(parquet.schema_arrow.names)})")
    number = 0
    for batch in parquet.iter_batches(columns=[text_column]):
        for text in batch.column(0).to_pylist():
            number += 1
            yield f"row {number}", text


def _hub_rows(name: str, text_column: str) -> Iterator[tuple[str, object]]:
    import datasets  # slow import, needed for hub inputs only
    from huggingface_hub.utils import logging as hf_logging

    # Their retry warnings and error logs would add lines to the one that reports a failure.
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    hf_logging.set_verbosity(hf_logging.CRITICAL)
    hub_name, _, config = name.partition(":")
    try:
        for number, row in enumerate(datasets.load_dataset(hub_name, config or None, split="train", streaming=True), 1):
            if text_column not in row:
                raise PrepareError(f"input {name} has no column {text_column!r} (columns: {', '.join(row)})")
            yield f"row {number}", row[text_column]
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as e:
        raise PrepareError(f"input {name} cannot be read: {_first_line(e)}") from None


def _show(value: object) -> str:
    return json.dumps(value, default=repr)[:40]


def _first_line(error: Exception) -> str:
    return (str(error).splitlines() or [type(error).__name__])[0]


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
    parser.add_argument("--txt-documents", choices=TXT_DOCUMENTS, default="line",
                        help="what one document of a .txt input is: a line (default), a paragraph (split at blank "
                        "lines; each document costs a BOS token, so use it for plays and books) or the whole file")
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
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                        else os.cpu_count(), help="tokenizing processes (default: the cores this process may use)")
    parser.add_argument("--overwrite", action="store_true", help="replace the shards (and tokenizer) already there")
    args = parser.parse_args(argv)
    try:
        _check_args(args)
        tokenizer_path, summary = _prepare(args)
    except (PrepareError, OSError) as error:
        sys.exit("error: " + " ".join(str(error).split()))  # one line, whatever the message holds
    vocab_size = spm.SentencePieceProcessor(model_file=str(tokenizer_path)).vocab_size()
    print(f"tokenizer:{tokenizer_path} vocab_size:{vocab_size} output:{args.output}")
    print("\n".join(summary_lines(summary)))


def _check_args(args: argparse.Namespace) -> None:
    """Everything that can be checked before the slow reading and tokenizing."""
    if args.output.exists() and not args.output.is_dir():
        raise PrepareError(f"--output {args.output} is not a folder")
    if args.output.exists() and any(args.output.iterdir()) and not args.overwrite:
        raise PrepareError(f"output folder {args.output} is not empty; pass --overwrite to replace its shards")
    _check_writable(args.output, "--output")
    if args.tokenizer_out:
        if args.tokenizer_out.suffix != ".model":
            raise PrepareError(f"--tokenizer-out {args.tokenizer_out} must end in .model")
        if args.tokenizer_out.is_dir():
            raise PrepareError(f"--tokenizer-out {args.tokenizer_out} is a folder")
        if args.tokenizer_out.exists() and not args.overwrite:
            raise PrepareError(f"tokenizer {args.tokenizer_out} exists; pass --overwrite to replace it")
        _check_writable(args.tokenizer_out, "--tokenizer-out")
        _check_vocab_size(args.vocab_size)
    else:
        _load_tokenizer(args.tokenizer)
    for flag, value, low, high in (("--val-docs", args.val_docs, 1, None), ("--max-docs", args.max_docs, 1, None),
                                   ("--shard-tokens", args.shard_tokens, 1, MAX_SHARD_TOKENS),
                                   ("--tokenizer-train-chars", args.tokenizer_train_chars, 1, None),
                                   ("--seed", args.seed, 0, None)):
        if value is not None and (value < low or high is not None and value > high):
            raise PrepareError(f"{flag} must be at least {low}" + (f" and at most {high}" if high else "")
                               + f", got {value}")
    _check_inputs(args.input)


def _check_writable(path: Path, flag: str) -> None:
    """The nearest existing folder above path must take new entries (path and any missing folders are made there)."""
    folder = next(p for p in path.absolute().parents if p.exists())
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise PrepareError(f"{flag} {path} cannot be written: {folder} is not a writable folder")


def _prepare(args: argparse.Namespace) -> tuple[Path, dict]:
    documents = islice(_read_documents(args.input, args.text_column, args.txt_documents), args.max_docs)
    print(f"prepare:start inputs:{len(args.input)} max_docs:{args.max_docs} output:{args.output} "
          f"tokenizer:{args.tokenizer_out or args.tokenizer} workers:{args.workers}", flush=True)
    if not args.tokenizer_out:
        return args.tokenizer, write_splits(documents, args.output, args.tokenizer, args.val_docs, args.seed,
                                            args.shard_tokens, args.workers)
    # The tokenizer learns from the start of the shuffled train split, so the text must be in memory.
    documents = list(progress(documents, desc="reading", unit="doc", unit_scale=True))
    _check_split_sizes(len(documents), args.val_docs)
    train = documents[args.val_docs:]
    sample = _first_chars((train[i] for i in _train_order(len(train), args.seed)), args.tokenizer_train_chars)
    # Trained under a temporary name, renamed once the shards are written: a failed run leaves no finished-looking
    # tokenizer behind, nor replaces the old one.
    partial = args.tokenizer_out.with_name(f".{args.tokenizer_out.stem}.partial.model")
    try:
        print(f"prepare:tokenizer_training documents:{len(documents)} train_chars:{args.tokenizer_train_chars} "
              f"vocab_size:{args.vocab_size}", flush=True)
        with progress(desc="tokenizer_training", unit="step"):  # one call into SentencePiece: lines off a terminal
            train_tokenizer(sample, partial, args.vocab_size)
        summary = write_splits(documents, args.output, partial, args.val_docs, args.seed, args.shard_tokens,
                               args.workers)
        for suffix in (".model", ".vocab"):
            os.replace(partial.with_suffix(suffix), args.tokenizer_out.with_suffix(suffix))
    finally:
        for suffix in (".model", ".vocab"):
            partial.with_suffix(suffix).unlink(missing_ok=True)
    return args.tokenizer_out, summary


if __name__ == "__main__":
    main()
