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
from pathlib import Path
from typing import Callable

from huggingface_hub import hf_hub_download
from huggingface_hub.errors import (HTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled, RemoteEntryNotFoundError,
                                    RepositoryNotFoundError, RevisionNotFoundError)
from huggingface_hub.utils import disable_progress_bars
from tqdm import tqdm

from data.shards import ShardError, read_shard_header, shard_name

REPO_ID = "willdepueoai/parameter-golf"
REMOTE_ROOT = "datasets"  # the export lives in this folder of the dataset repo; its contents map onto the output root
DEFAULT_TRAIN_SHARDS = 80  # the challenge's default: 8B tokens, more than one 10-minute run on 8xH100 consumes
STAGING = ".download"  # fetched files wait here, beside their final place, until verified

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
    dataset = next((d for d in manifest["datasets"] if d["name"] == name), None)
    if dataset is None:
        published = ", ".join(d["name"] for d in manifest["datasets"])
        raise DownloadError(f"{REPO_ID}/{REMOTE_ROOT}/manifest.json has no dataset {name} (published: {published})")
    stats = dataset["stats"]
    if train_shards > stats["files_train"]:
        raise DownloadError(f"{name} has only {stats['files_train']} train shards, {train_shards} requested")
    tokenizer = next(t for t in manifest["tokenizers"] if t["name"] == dataset["tokenizer_name"])
    return ([f"datasets/{name}/{shard_name('val', i)}" for i in range(stats["files_val"])]
            + [f"datasets/{name}/{shard_name('train', i)}" for i in range(train_shards)]
            + [tokenizer[key] for key in ("model_path", "vocab_path", "path") if tokenizer.get(key)])


def download(variant: str = "sp1024", train_shards: int = DEFAULT_TRAIN_SHARDS, output_root: str | Path = "data",
             fetch: Fetch = fetch_from_hub) -> list[Path]:
    """Fetch what is missing or corrupt under output_root; returns the files that were fetched."""
    output_root = Path(output_root)
    # The manifest says how many val shards there are and where the tokenizer lives; kept so reruns stay offline.
    ensure("manifest.json", output_root, fetch)
    manifest = json.loads((output_root / "manifest.json").read_text(encoding="utf-8"))
    fetched, fetched_bytes = [], 0
    with tqdm(plan(manifest, variant, train_shards), unit="file", desc=f"fineweb10B_{variant}") as bar:
        for rel_path in bar:
            if ensure(rel_path, output_root, fetch):
                fetched.append(output_root / rel_path)
                fetched_bytes += fetched[-1].stat().st_size
                bar.set_postfix_str(f"{fetched_bytes / 1e9:.2f} GB fetched")
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
    if args.train_shards < 0:
        parser.error("--train-shards must be >= 0")
    disable_progress_bars()  # one bar over the files instead of the hub client's bar per file
    try:
        fetched = download(args.variant, args.train_shards, args.output_root)
    except DownloadError as e:
        sys.exit(f"error: {e}")
    print(f"fetched {len(fetched)} files into {args.output_root}")


if __name__ == "__main__":
    main()
