"""Download the Parameter Golf challenge's published FineWeb shards and tokenizer from the Hugging Face hub.

For one tokenizer variant: the whole val split, the first N train shards and the tokenizer files, mirrored from
the repo's `datasets/` folder into the layout the trainer reads by default:

    data/manifest.json
    data/datasets/fineweb10B_sp1024/fineweb_{val,train}_NNNNNN.bin
    data/tokenizers/fineweb_1024_bpe.{model,vocab}

Run from the repo root; running it again resumes (complete files are kept, truncated or corrupt shards refetched):

    python -m data.download                      # sp1024, 80 train shards (8B tokens, about 16 GB)
    python -m data.download --train-shards 1     # enough for a smoke run
"""
import argparse
import json
import os
import shutil
import sys
from pathlib import Path, PurePosixPath
from typing import Callable

from huggingface_hub import hf_hub_download
from huggingface_hub.errors import (HTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled, RemoteEntryNotFoundError,
                                    RepositoryNotFoundError, RevisionNotFoundError)
from huggingface_hub.utils import disable_progress_bars, logging as hf_logging

from data.progress import progress
from data.shards import MAX_SHARD_TOKENS, ShardError, read_shard_header, shard_name

REPO_ID = "willdepueoai/parameter-golf"
REMOTE_ROOT = "datasets"  # the export lives in this folder of the dataset repo; its contents map onto the output root
DEFAULT_TRAIN_SHARDS = 80  # the challenge's default: 8B tokens, more than one 10-minute run on 8xH100 consumes
STAGING = ".download"  # fetched files wait here, beside their final place, until verified
MANIFEST = f"{REPO_ID}/{REMOTE_ROOT}/manifest.json"
KINDS = {list: "a list", dict: "an object", str: "a string", int: "a count (an integer >= 0)"}

Fetch = Callable[[str, Path], Path]  # (path in the repo, local dir) -> the file, written at local dir / path in the repo


class DownloadError(RuntimeError):
    pass


def fetch_from_hub(repo_path: str, local_dir: Path) -> Path:
    """Download one file of the dataset repo; the hub's failures become a DownloadError naming the repo and file."""
    where = f"{REPO_ID}/{repo_path}"
    try:
        return Path(hf_hub_download(REPO_ID, repo_path, repo_type="dataset", local_dir=local_dir))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        raise DownloadError(f"cannot reach the Hugging Face hub to fetch {where} (offline or no connection)") from None
    except (RepositoryNotFoundError, RevisionNotFoundError, RemoteEntryNotFoundError):
        raise DownloadError(f"{where} does not exist on the Hugging Face hub (or is not public)") from None
    except (OSError, HTTPError) as e:  # HTTPError: the hub client's transport failures, e.g. a connection lost mid-file
        first_line = (str(e).splitlines() or [type(e).__name__])[0]
        raise DownloadError(f"fetching {where} failed: {first_line}") from None


def fault(path: Path) -> str | None:
    """Why a file is unusable, or None: a shard needs a valid header and exact size, the manifest must parse."""
    try:
        if path.suffix == ".bin":
            read_shard_header(path)
        elif path.suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"))
    except (ShardError, ValueError) as e:
        return str(e)
    return None


def ensure(rel_path: str, output_root: Path, fetch: Fetch) -> bool:
    """Make output_root/rel_path a complete copy of the repo's file; returns whether it had to be fetched."""
    final = output_root / rel_path
    if final.is_file() and fault(final) is None:
        return False
    repo_path = f"{REMOTE_ROOT}/{rel_path}"
    for _ in range(2):  # a second try covers a transfer that went wrong; a file bad twice is bad in the repo
        staged = fetch(repo_path, output_root / STAGING)
        problem = fault(staged)
        if problem is None:
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged, final)
            return True
        staged.unlink()
    raise DownloadError(f"{REPO_ID}/{repo_path} is corrupt (fetched twice): {problem}")


def plan(manifest: dict, variant: str, train_shards: int) -> list[str]:
    """The files of one variant, relative to the remote root, in the order the challenge fetches them."""
    name = f"fineweb10B_{variant}"
    datasets, tokenizers = _field(manifest, "datasets", list), _field(manifest, "tokenizers", list)
    # Only the entries this variant uses must be complete; the others are never read.
    published = [d.get("name") if isinstance(d, dict) else None for d in datasets]
    if name not in published:
        listed = ", ".join(str(n) for n in published if n is not None)
        raise DownloadError(f"{MANIFEST} has no dataset {name} (published: {listed or 'none'})")
    index = published.index(name)
    dataset, at = datasets[index], f"datasets[{index}]"
    stats = _field(dataset, "stats", dict, at)
    files_val, files_train = (_field(stats, key, int, f"{at}.stats") for key in ("files_val", "files_train"))
    if train_shards > files_train:
        raise DownloadError(f"{name} has only {files_train} train shards, {train_shards} requested")
    tokenizer_name = _field(dataset, "tokenizer_name", str, at)
    names = [t.get("name") if isinstance(t, dict) else None for t in tokenizers]
    if tokenizer_name not in names:
        raise DownloadError(f"{MANIFEST}: {at}.tokenizer_name {tokenizer_name!r} is not among its tokenizers")
    index = names.index(tokenizer_name)
    tokenizer, at = tokenizers[index], f"tokenizers[{index}]"
    tokenizer_files = [_field(tokenizer, key, str, at) for key in ("model_path", "vocab_path", "path")
                       if tokenizer.get(key)]
    for rel_path in tokenizer_files:
        # The path is joined to the output root: it must stay inside it.
        if PurePosixPath(rel_path).is_absolute() or ".." in PurePosixPath(rel_path).parts:
            raise DownloadError(f"{MANIFEST}: {at} path {rel_path!r} is not a path inside the repo folder")
    return ([f"datasets/{name}/{shard_name('val', i)}" for i in range(files_val)]
            + [f"datasets/{name}/{shard_name('train', i)}" for i in range(train_shards)] + tokenizer_files)


def _field(entry, key: str, kind: type, at: str = ""):
    """entry[key], which must be of kind; anything else is a DownloadError naming the manifest field."""
    if not isinstance(entry, dict):
        raise DownloadError(f"{MANIFEST}: {at or 'the manifest'} is {json.dumps(entry)[:40]}, not an object")
    where = f"{at}.{key}" if at else key
    value = entry.get(key)
    if key not in entry:
        raise DownloadError(f"{MANIFEST}: {where} is missing")
    if isinstance(value, bool) or not isinstance(value, kind) or (kind is int and value < 0):
        raise DownloadError(f"{MANIFEST}: {where} is {json.dumps(value)[:40]}, not {KINDS[kind]}")
    return value


def download(variant: str = "sp1024", train_shards: int = DEFAULT_TRAIN_SHARDS, output_root: str | Path = "data",
             fetch: Fetch = fetch_from_hub) -> list[Path]:
    """Fetch what is missing or corrupt under output_root; returns the files that were fetched."""
    output_root = Path(output_root)
    # The manifest says how many val shards there are and where the tokenizer lives; kept so reruns stay offline.
    ensure("manifest.json", output_root, fetch)
    manifest = json.loads((output_root / "manifest.json").read_text(encoding="utf-8"))
    fetched, fetched_bytes = [], 0
    files = plan(manifest, variant, train_shards)
    shards = sum(f.endswith(".bin") for f in files)
    # A shard is at most MAX_SHARD_TOKENS uint16 tokens: 0.2 GB.
    print(f"download:start files:{len(files)} shards:{shards} at_most_gb:{shards * 2 * MAX_SHARD_TOKENS / 1e9:.1f} "
          f"into:{output_root}", flush=True)
    with progress(files, unit="file", desc=f"fineweb10B_{variant}") as bar:
        for rel_path in bar:
            if ensure(rel_path, output_root, fetch):
                fetched.append(output_root / rel_path)
                fetched_bytes += fetched[-1].stat().st_size
                bar.set_postfix_str(f"fetched_gb:{fetched_bytes / 1e9:.2f}")
    # Only now: after an interruption the staging folder holds the hub client's partial files, which it resumes.
    shutil.rmtree(output_root / STAGING, ignore_errors=True)
    return fetched


def main() -> None:
    parser = argparse.ArgumentParser(description="Download the challenge's FineWeb shards and tokenizer.")
    parser.add_argument("--variant", default="sp1024", help="tokenizer family as named in the repo (default sp1024)")
    parser.add_argument("--train-shards", type=int, default=DEFAULT_TRAIN_SHARDS,
                        help=f"first N train shards of 10^8 tokens each (default {DEFAULT_TRAIN_SHARDS})")
    parser.add_argument("--output-root", type=Path, default=Path("data"), help="mirror of the repo's datasets/ folder")
    args = parser.parse_args()
    disable_progress_bars()  # one bar over the files instead of the hub client's bar per file
    hf_logging.set_verbosity_error()  # its retry warnings would bury the one line that reports a failure
    try:
        if args.train_shards < 0:
            raise DownloadError(f"--train-shards must be >= 0, got {args.train_shards}")
        root = args.output_root.absolute()
        existing = next(p for p in (root, *root.parents) if p.exists())  # the rest is created there
        if not existing.is_dir() or not os.access(existing, os.W_OK):
            raise DownloadError(f"--output-root {args.output_root}: {existing} is not a writable folder")
        fetched = download(args.variant, args.train_shards, args.output_root)
    except (DownloadError, OSError) as e:  # OSError: the local disk, e.g. a folder that cannot be created
        sys.exit("error: " + " ".join(str(e).split()))  # one line, whatever the message holds
    print(f"fetched {len(fetched)} files into {args.output_root}")


if __name__ == "__main__":
    main()
