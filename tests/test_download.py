"""data/download.py against a dataset repo laid out in tmp_path: through the injectable fetch, and end to end
through the real Hugging Face client pointed (HF_ENDPOINT) at a local HTTP server that serves that folder."""
import hashlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from data.download import REPO_ID, DownloadError, download
from data.shards import read_shard, write_shard

REPO_ROOT = Path(__file__).resolve().parents[1]
DATASET = "datasets/fineweb10B_sp1024"
VAL = [f"{DATASET}/fineweb_val_{i:06d}.bin" for i in range(2)]
TRAIN = [f"{DATASET}/fineweb_train_{i:06d}.bin" for i in range(3)]
TOKENIZER = ["tokenizers/fineweb_1024_bpe.model", "tokenizers/fineweb_1024_bpe.vocab"]


@pytest.fixture
def repo(tmp_path) -> Path:
    """The repo's datasets/ folder: 2 val and 3 train shards with distinct tokens, a tokenizer, the manifest."""
    root = tmp_path / "hub" / "datasets"
    (root / DATASET).mkdir(parents=True)
    (root / "tokenizers").mkdir()
    for i, rel in enumerate(VAL + TRAIN):
        write_shard(root / rel, np.arange(100 * i, 100 * i + 50 + i))
    for rel in TOKENIZER:
        (root / rel).write_bytes(b"tokenizer bytes of " + rel.encode())
    manifest = {
        "datasets": [{"name": "fineweb10B_sp1024", "tokenizer_name": "sp_bpe_1024",
                      "stats": {"files_val": len(VAL), "files_train": len(TRAIN)}}],
        "tokenizers": [{"name": "sp_bpe_1024", "model_path": TOKENIZER[0], "vocab_path": TOKENIZER[1]}],
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


class LocalHub:
    """A fetch that copies out of the repo folder, as hf_hub_download(local_dir=...) would, and counts calls."""

    def __init__(self, repo_root: Path):
        self.hub_root, self.calls = repo_root.parent, []

    def __call__(self, repo_path: str, local_dir: Path) -> Path:
        self.calls.append(repo_path)
        dest = Path(local_dir) / repo_path
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.hub_root / repo_path, dest)
        return dest


def files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def corrupt_magic(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[0] ^= 0xFF
    path.write_bytes(bytes(data))


def test_download_mirrors_the_repo(repo, tmp_path):
    out, hub = tmp_path / "out", LocalHub(repo)
    fetched = download("sp1024", 3, out, fetch=hub)
    expected = ["manifest.json"] + VAL + TRAIN + TOKENIZER
    assert files_under(out) == set(expected)  # the staging folder is gone too
    assert hub.calls == [f"datasets/{rel}" for rel in expected]  # val count came from the fetched manifest
    assert fetched == [out / rel for rel in expected[1:]]
    for rel in expected:
        assert (out / rel).read_bytes() == (repo / rel).read_bytes()
    assert read_shard(out / TRAIN[2]).tolist() == list(range(400, 454))


def test_train_shards_limit(repo, tmp_path):
    out, hub = tmp_path / "out", LocalHub(repo)
    download("sp1024", 1, out, fetch=hub)
    assert files_under(out) == {"manifest.json", *VAL, TRAIN[0], *TOKENIZER}
    assert not any("train_000001" in call for call in hub.calls)
    with pytest.raises(DownloadError, match="only 3 train shards, 4 requested"):
        download("sp1024", 4, out, fetch=hub)
    with pytest.raises(DownloadError, match="no dataset fineweb10B_sp4096"):
        download("sp4096", 1, out, fetch=hub)


def test_second_run_fetches_nothing(repo, tmp_path):
    out = tmp_path / "out"
    download("sp1024", 3, out, fetch=LocalHub(repo))
    hub = LocalHub(repo)
    assert download("sp1024", 3, out, fetch=hub) == []
    assert hub.calls == []


def test_truncated_or_corrupt_local_shards_are_refetched(repo, tmp_path):
    out = tmp_path / "out"
    download("sp1024", 3, out, fetch=LocalHub(repo))
    truncated, corrupt = out / TRAIN[1], out / VAL[0]
    truncated.write_bytes(truncated.read_bytes()[:1100])
    corrupt_magic(corrupt)
    hub = LocalHub(repo)
    assert download("sp1024", 3, out, fetch=hub) == [corrupt, truncated]
    assert hub.calls == [f"datasets/{VAL[0]}", f"datasets/{TRAIN[1]}"]
    assert truncated.read_bytes() == (repo / TRAIN[1]).read_bytes()
    assert corrupt.read_bytes() == (repo / VAL[0]).read_bytes()


def test_shard_corrupt_in_the_repo_is_fetched_twice_then_reported(repo, tmp_path):
    out, hub = tmp_path / "out", LocalHub(repo)
    corrupt_magic(repo / TRAIN[1])
    with pytest.raises(DownloadError, match=r"fineweb_train_000001\.bin is corrupt \(fetched twice\): .*magic"):
        download("sp1024", 3, out, fetch=hub)
    assert hub.calls.count(f"datasets/{TRAIN[1]}") == 2
    assert not (out / TRAIN[1]).exists()
    assert not [p for p in (out / ".download").rglob("*.bin")]
    assert (out / TRAIN[0]).exists()  # what came before is kept for the next run


@pytest.fixture
def endpoint(repo):
    """A local stand-in for huggingface.co serving the repo folder; yields (url, list of requested repo paths)."""
    prefix, requests = f"/datasets/{REPO_ID}/resolve/main/", []

    class Handler(http.server.BaseHTTPRequestHandler):
        def respond(self, with_body: bool):
            repo_path = self.path.removeprefix(prefix)
            requests.append(repo_path)
            file = repo.parent / repo_path
            if not self.path.startswith(prefix) or not file.is_file():
                self.send_response(404)
                self.send_header("X-Error-Code", "EntryNotFound")  # how the hub tells a missing file
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            data = file.read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
            self.send_header("X-Repo-Commit", "0" * 40)
            self.end_headers()
            if with_body:
                self.wfile.write(data)

        def do_HEAD(self):
            self.respond(False)

        def do_GET(self):
            self.respond(True)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", requests
    server.shutdown()
    server.server_close()


def run_cli(out: Path, tmp_path: Path, **env) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")} | {
        "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_DISABLE_TELEMETRY": "1", "NO_PROXY": "127.0.0.1", **env}
    return subprocess.run([sys.executable, "-m", "data.download", "--train-shards", "2", "--output-root", str(out)],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)


def test_cli_with_the_real_hub_client(repo, tmp_path, endpoint):
    url, requests = endpoint
    out = tmp_path / "out"
    result = run_cli(out, tmp_path, HF_ENDPOINT=url)
    assert result.returncode == 0, result.stderr
    expected = ["manifest.json"] + VAL + TRAIN[:2] + TOKENIZER
    # Off a terminal: what it will fetch first, then (for a long download) progress lines, then what it did.
    assert result.stdout.splitlines() == [f"download:start files:{len(expected) - 1} shards:{len(VAL) + 2} "
                                          f"at_most_gb:{(len(VAL) + 2) * 0.2:.1f} into:{out}",
                                          f"fetched {len(expected) - 1} files into {out}"]
    assert files_under(out) == set(expected)
    for rel in expected:
        assert (out / rel).read_bytes() == (repo / rel).read_bytes()
    requests.clear()
    assert run_cli(out, tmp_path, HF_ENDPOINT=url).returncode == 0
    assert requests == []


def test_cli_reports_a_shard_corrupt_in_the_repo(repo, tmp_path, endpoint):
    corrupt_magic(repo / TRAIN[0])
    out = tmp_path / "out"
    result = run_cli(out, tmp_path, HF_ENDPOINT=endpoint[0])
    assert result.returncode == 1 and len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith(f"error: {REPO_ID}/datasets/{TRAIN[0]} is corrupt (fetched twice): ")
    assert not (out / TRAIN[0]).exists()


def test_cli_reports_a_file_missing_from_the_repo(repo, tmp_path, endpoint):
    (repo / TOKENIZER[1]).unlink()
    result = run_cli(tmp_path / "out", tmp_path, HF_ENDPOINT=endpoint[0])
    assert result.returncode == 1
    assert result.stderr == (
        f"error: {REPO_ID}/datasets/{TOKENIZER[1]} does not exist on the Hugging Face hub (or is not public)\n")


def test_cli_reports_an_unreachable_hub(tmp_path):
    out = tmp_path / "out"
    result = run_cli(out, tmp_path, HF_HUB_OFFLINE="1")
    assert result.returncode == 1
    assert result.stderr == (f"error: cannot reach the Hugging Face hub to fetch {REPO_ID}/datasets/manifest.json"
                             " (offline or no connection)\n")
    assert not (out / "manifest.json").exists()
