"""Every tool ends every bad input with `error:` lines on stderr (one per problem: a single fault gives one line;
make_record and check_record list every problem they find) and exit status 1, without a traceback, and writes
nothing: one table per tool, each case run as a user would (a single fault each), with the folder it runs in
compared byte for byte before and after."""
import argparse
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
import zstandard

import train_moe as tm
from conftest import REPO, selected, side_by_side
from data import prepare
from data.shards import read_shard

sys.path.insert(0, str(REPO / "scripts"))
import hf_layouts  # noqa: E402
import make_record  # noqa: E402
from train_moe import pack_code  # noqa: E402

TOKENIZER = "<the tiny_data tokenizer>"  # stands for that file's bytes in a table, which fixtures cannot reach
DROP = "<drop this field>"
DOCS = [f"document {i}: the router sends every token to two of eight experts, then the loss goes down."
        for i in range(12)]
JSONL = "".join(json.dumps({"text": d}) + "\n" for d in DOCS).encode()
ZST = zstandard.ZstdCompressor().compress(JSONL)
GZ = gzip.compress(JSONL)


def run_tool(args: list, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_HOME": str(cwd / ".hf")}
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


def tree(root: Path) -> dict:
    """Every file (its bytes) and folder (None) under root, to show that a refused run changed nothing."""
    return {p.relative_to(root).as_posix(): p.read_bytes() if p.is_file() else None
            for p in root.rglob("*") if not p.is_relative_to(root / ".hf")}


def assert_refused(result: subprocess.CompletedProcess, fragment: str, one_line: bool = True) -> None:
    lines = result.stderr.splitlines()
    assert result.returncode == 1, result.stderr
    # stdout: nothing, or, for a fault found in the input's text, only the lines that said which stage began
    assert "Traceback" not in result.stderr, result.stderr
    assert all(line.startswith(("prepare:start ", "prepare:tokenizer_training ")) for line in result.stdout.splitlines())
    assert lines and all(line.startswith("error: ") for line in lines), result.stderr
    assert not one_line or len(lines) == 1, result.stderr
    assert any(fragment in line for line in lines), result.stderr


def make_files(root: Path, files: dict, tokenizer: Path | None = None) -> None:
    """name -> bytes, TOKENIZER, or None for a folder."""
    for name, data in files.items():
        path = root / name
        if data is None:
            path.mkdir(parents=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(tokenizer.read_bytes() if data == TOKENIZER else data)


# --- data.prepare ---------------------------------------------------------------------------------------------------

def prepare_args(*inputs, tokenizer=("--tokenizer-out", "tok.model", "--vocab-size", "300"), output="out", extra=()):
    return ["-m", "data.prepare", "--input", *inputs, "--output", output, *tokenizer, "--val-docs", "2",
            "--workers", "1", *extra]


REUSE = ("--tokenizer", "good.model")
EARLIER_OUTPUT = {"out/fineweb_val_000000.bin": b"an earlier run's shard", "tok.model": TOKENIZER}
PREPARE_CASES = {
    "empty file": ({"in.jsonl": b""}, prepare_args("in.jsonl"), "holds no documents"),
    "empty zst": ({"in.jsonl.zst": b""}, prepare_args("in.jsonl.zst"), "holds no documents"),
    "blank lines only": ({"in.txt": b"\n  \n"}, prepare_args("in.txt"), "holds no documents"),
    "vocab below the specials and bytes": ({"in.jsonl": JSONL}, prepare_args("in.jsonl", tokenizer=(
        "--tokenizer-out", "tok.model", "--vocab-size", "100")), "below the minimum 261"),
    "vocab too small for the text": ({"in.jsonl": JSONL}, prepare_args("in.jsonl", tokenizer=(
        "--tokenizer-out", "tok.model", "--vocab-size", "265")), "too small for this text"),
    "vocab over uint16": ({"in.jsonl": JSONL}, prepare_args("in.jsonl", tokenizer=(
        "--tokenizer-out", "tok.model", "--vocab-size", "70000")), "uint16"),
    "tokenizer not sentencepiece": ({"in.jsonl": JSONL, "good.model": JSONL}, prepare_args("in.jsonl", tokenizer=REUSE),
                                    "not a SentencePiece model"),
    "tokenizer is a folder": ({"in.jsonl": JSONL, "good.model": None}, prepare_args("in.jsonl", tokenizer=REUSE),
                              "is not a file"),
    "tokenizer missing": ({"in.jsonl": JSONL}, prepare_args("in.jsonl", tokenizer=REUSE), "not found"),
    "text is a number": ({"in.jsonl": JSONL + b'{"text": 5}\n'}, prepare_args("in.jsonl"),
                         "line 13: 'text' is 5, not a string"),
    "text is null": ({"in.jsonl": b'{"text": null}\n' + JSONL}, prepare_args("in.jsonl"), "'text' is null"),
    "line not an object": ({"in.jsonl": JSONL + b"[1, 2]\n"}, prepare_args("in.jsonl"), "not a JSON object"),
    "line not JSON": ({"in.jsonl": JSONL + b'{"text": "cut\n'}, prepare_args("in.jsonl"), "line 13: not JSON"),
    "json array of numbers": ({"in.json": b"[1, 2]"}, prepare_args("in.json"), "item 1: 1 is not a JSON object"),
    "json array cut short": ({"in.json": b'[{"text": "a"}, '}, prepare_args("in.json"), "in.json: not JSON"),
    "no such column": ({"in.jsonl": JSONL}, prepare_args("in.jsonl", extra=("--text-column", "body")),
                       "no column 'body'"),
    "truncated zst": ({"in.jsonl.zst": ZST[:len(ZST) // 2]}, prepare_args("in.jsonl.zst"), "truncated"),
    "corrupt zst": ({"in.jsonl.zst": b"not zstd" * 8}, prepare_args("in.jsonl.zst"), "in.jsonl.zst cannot be read"),
    "truncated gz": ({"in.jsonl.gz": GZ[:len(GZ) // 2]}, prepare_args("in.jsonl.gz"), "in.jsonl.gz cannot be read"),
    "corrupt gz": ({"in.jsonl.gz": b"not gzip" * 8}, prepare_args("in.jsonl.gz"), "in.jsonl.gz cannot be read"),
    "not utf-8": ({"in.txt": "café\n".encode("latin-1")}, prepare_args("in.txt"), "line 1: not UTF-8"),
    "lone surrogate": ({"in.jsonl": JSONL + b'{"text": "half a pair \\ud83d here"}\n'}, prepare_args("in.jsonl"),
                       "in.jsonl line 13: 'text' holds a lone surrogate (\\ud83d), which is no text"),
    "lone low surrogate in an array": ({"in.json": b'[{"text": "a"}, {"text": "\\udc00"}]'}, prepare_args("in.json"),
                                       "item 2: 'text' holds a lone surrogate (\\udc00)"),
    "corrupt parquet": ({"in.parquet": b"PAR1 and nothing"}, prepare_args("in.parquet"), "in.parquet cannot be read"),
    "unsupported type": ({"in.csv": b"text\nhello\n"}, prepare_args("in.csv"), "unsupported file type"),
    "input is a folder": ({"in": None}, prepare_args("in"), "is not a file"),
    "input missing": ({}, prepare_args("in.jsonl"), "not found"),
    "hub unreachable": ({}, prepare_args("someone/nothing"), "input someone/nothing cannot be read"),
    "too few documents": ({"in.jsonl": JSONL[:JSONL.index(b"\n") + 1]}, prepare_args("in.jsonl"),
                          "leave nothing for train"),
    "output is a file": ({"in.jsonl": JSONL, "out": b"a file"}, prepare_args("in.jsonl"), "is not a folder"),
    "output inside a file": ({"in.jsonl": JSONL, "f": b"a file"}, prepare_args("in.jsonl", output="f/out"),
                             "not a writable folder"),
    "tokenizer-out inside a file": ({"in.jsonl": JSONL, "f": b"a file"}, prepare_args("in.jsonl", tokenizer=(
        "--tokenizer-out", "f/tok.model")), "not a writable folder"),
    "tokenizer-out not .model": ({"in.jsonl": JSONL}, prepare_args("in.jsonl", tokenizer=(
        "--tokenizer-out", "tok.bin")), "must end in .model"),
    "negative seed": ({"in.jsonl": JSONL}, prepare_args("in.jsonl", extra=("--seed", "-1")), "--seed"),
    "zero max-docs": ({"in.jsonl": JSONL}, prepare_args("in.jsonl", extra=("--max-docs", "0")), "--max-docs"),
    "zero shard size": ({"in.jsonl": JSONL}, prepare_args("in.jsonl", extra=("--shard-tokens", "0")), "--shard-tokens"),
    "earlier output, no --overwrite": ({"in.jsonl": JSONL, **EARLIER_OUTPUT}, prepare_args("in.jsonl"), "--overwrite"),
    "earlier output, bad input": ({"in.jsonl.zst": ZST[:-3], **EARLIER_OUTPUT},
                                  prepare_args("in.jsonl.zst", extra=("--overwrite",)), "truncated"),
}


@pytest.mark.parametrize("files, args, fragment", PREPARE_CASES.values(), ids=PREPARE_CASES)
def test_prepare_refuses(files, args, fragment, tmp_path, tiny_data):
    make_files(tmp_path, files, tiny_data["tokenizer_path"])
    before = tree(tmp_path)
    assert_refused(run_tool(args, tmp_path), fragment)
    assert tree(tmp_path) == before


def test_prepare_failed_write_keeps_the_earlier_output(tmp_path, monkeypatch):
    """A write that fails midway (a full disk) leaves the earlier shards and tokenizer, and no partial files."""
    (tmp_path / "first.jsonl").write_bytes(JSONL)
    (tmp_path / "second.jsonl").write_bytes(JSONL.replace(b"router", b"expert"))
    args = ["--output", tmp_path / "out", "--tokenizer-out", tmp_path / "tok.model", "--vocab-size", 300,
            "--val-docs", 2, "--workers", 1, "--shard-tokens", 100, "--overwrite"]
    prepare.main(list(map(str, ["--input", tmp_path / "first.jsonl", *args])))
    before = tree(tmp_path)
    assert len([name for name in before if name.startswith("out/fineweb_train_")]) > 1

    def full_disk_after_one_shard(path, tokens):
        if list(Path(path).parent.glob("*.bin")):
            raise OSError(28, "No space left on device", str(path))
        real_write_shard(path, tokens)

    real_write_shard = prepare.write_shard
    monkeypatch.setattr(prepare, "write_shard", full_disk_after_one_shard)
    with pytest.raises(SystemExit) as exit_info:
        prepare.main(list(map(str, ["--input", tmp_path / "second.jsonl", *args])))
    assert str(exit_info.value.code).startswith("error: ") and "No space left on device" in exit_info.value.code
    assert tree(tmp_path) == before
    assert read_shard(tmp_path / "out/fineweb_val_000000.bin")[0] == 1


# --- scripts/hf_layouts.py -----------------------------------------------------------------------------------------

def exported_folder(config: bytes, weights: bytes | None = None) -> dict:
    """A folder as export_hf.py writes one, but for config.json (and model.safetensors, when given)."""
    if weights is None:
        weights = safetensors.torch.save({"model.embed_tokens.weight": torch.zeros(4, 2)})
    return {"exported/config.json": config, "exported/model.safetensors": weights}


HF_LAYOUTS_CASES = {
    "config a list": (exported_folder(b"[]"), "config.json: not export_hf.py's config (a JSON object whose num_experts"),
    "config not JSON": (exported_folder(b"{oops"), "config.json: not JSON"),
    "config not UTF-8": (exported_folder(b'{"a": "\xff"}'), "config.json: not JSON"),
    "num_experts a string": (exported_folder(b'{"num_experts": "4"}'), "config.json: not export_hf.py's config"),
    "num_experts zero": (exported_folder(b'{"num_experts": 0}'), "config.json: not export_hf.py's config"),
    "weights not safetensors": (exported_folder(b"{}", b"not safetensors"), "model.safetensors: not a safetensors file"),
}


@pytest.mark.parametrize("files, fragment", HF_LAYOUTS_CASES.values(), ids=HF_LAYOUTS_CASES)
def test_hf_layouts_refuses(files, fragment, tmp_path):
    make_files(tmp_path, files)
    before = tree(tmp_path)
    assert_refused(run_tool([REPO / "scripts/hf_layouts.py", "exported", "--to", "mlx", "--out", "new"], tmp_path), fragment)
    assert tree(tmp_path) == before


def test_hf_layouts_on_a_full_disk_leaves_no_folder(tmp_path, monkeypatch, capsys):
    make_files(tmp_path, exported_folder(b"{}"))
    monkeypatch.chdir(tmp_path)
    before = tree(tmp_path)

    def full_disk(state, path, metadata=None):
        Path(path).write_bytes(b"half")
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(hf_layouts, "save_file", full_disk)
    assert hf_layouts.main(["exported", "--to", "mlx", "--out", "new"]) == 1
    assert capsys.readouterr().err.startswith("error: [Errno 28] No space left on device: ")
    assert tree(tmp_path) == before  # no staging folder, no new/


# --- data.download --------------------------------------------------------------------------------------------------

def manifest(dataset=None, tokenizer=None, **top) -> bytes:
    dataset = {"name": "fineweb10B_sp1024", "tokenizer_name": "sp_bpe_1024", "stats": {"files_val": 1, "files_train": 2},
               **(dataset or {})}
    tokenizer = {"name": "sp_bpe_1024", "model_path": "tokenizers/fineweb_1024_bpe.model", **(tokenizer or {})}
    return json.dumps({"datasets": [dataset], "tokenizers": [tokenizer], **top}).encode()


DOWNLOAD_CASES = {
    "manifest a list": (b"[]", "the manifest is [], not an object"),
    "no datasets": (b"{}", "datasets is missing"),
    "datasets not a list": (manifest(datasets=5), "datasets is 5, not a list"),
    "no stats": (manifest({"stats": None}), "datasets[0].stats is null, not an object"),
    "count a string": (manifest({"stats": {"files_val": "1", "files_train": 2}}), 'files_val is "1", not a count'),
    "count NaN": (manifest({"stats": {"files_val": 1, "files_train": float("nan")}}), "files_train is NaN"),
    "count negative": (manifest({"stats": {"files_val": -1, "files_train": 2}}), "files_val is -1"),
    "no tokenizer_name": (manifest({"tokenizer_name": 7}), "tokenizer_name is 7, not a string"),
    "unknown tokenizer": (manifest({"tokenizer_name": "other"}), "'other' is not among its tokenizers"),
    "path not a string": (manifest(tokenizer={"model_path": 5}), "model_path is 5, not a string"),
    "path outside the root": (manifest(tokenizer={"model_path": "../../x"}), "not a path inside the repo folder"),
    "no such variant": (manifest({"name": "fineweb10B_sp4096"}), "no dataset fineweb10B_sp1024"),
}


@pytest.mark.parametrize("content, fragment", DOWNLOAD_CASES.values(), ids=DOWNLOAD_CASES)
def test_download_refuses_a_bad_manifest(content, fragment, tmp_path):
    """The kept manifest (valid JSON, so not fetched again) is what the run plans from: no hub is needed."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data/manifest.json").write_bytes(content)
    before = tree(tmp_path)
    assert_refused(run_tool(["-m", "data.download", "--train-shards", "1"], tmp_path), fragment)
    assert tree(tmp_path) == before


@pytest.mark.parametrize("args", [["-m", "data.download"], ["-m", "data.download", "--output-root", "data/inside"]])
def test_download_refuses_an_output_root_that_cannot_be_a_folder(args, tmp_path):
    (tmp_path / "data").write_bytes(b"a file")
    assert_refused(run_tool(args, tmp_path), f"{tmp_path / 'data'} is not a writable folder")
    assert tree(tmp_path) == {"data": b"a file"}


def test_download_refuses_a_negative_shard_count(tmp_path):
    assert_refused(run_tool(["-m", "data.download", "--train-shards", "-1"], tmp_path), "--train-shards must be >= 0")
    assert tree(tmp_path) == {}


# --- scripts/make_record.py and scripts/check_record.py -------------------------------------------------------------

SOURCE = b"print('train_moe.py as it ran')\n"
NAME = "Bad input"
RECORD = Path("records/track_non_record_16mb") / f"{time.strftime('%Y-%m-%d')}_Bad_input"


def write_run(logs: Path, run_id: str, seed: int) -> None:
    """A finished 2-layer MoE run's two logs, in the trainer's format, with plausible figures."""
    config = {"run_id": run_id, "seed": seed, "mlp_mode": "sparse", "moe_layers": "(0, 1)", "num_experts": 4,
              "top_k": 2, "router": "softmax", "world_size": 1,
              "launch": f"RUN_ID={run_id} SEED={seed} python train_moe.py"}
    text = (SOURCE + b"\n" + b"=" * 100 + b"\npython 3.11.7 torch 2.5.1+cpu\n" + b"=" * 100 + b"\n"
            + "".join(f"config {k}:{v}\n" for k, v in config.items()).encode())
    bpb = 1.5 + seed / 100
    events = [dict(event="model", params=1000, active_params=600),
              *(dict(event="router", step=10, layer=layer, load=[0.25] * 4, max_over_mean=1.0, dead=0)
                for layer in (0, 1)),
              dict(event="train_done", steps=10, train_time_ms=900, step_avg_ms=90.0),
              dict(event="final_raw", val_loss=2.6, val_bpb=bpb - 0.02),
              dict(event="final_ema", val_loss=2.6, val_bpb=bpb - 0.01),
              dict(event="artifact", code_bytes=len(pack_code(SOURCE)), model_bytes=5000,
                   artifact_bytes=5000 + len(pack_code(SOURCE)), status="OK", path=f"artifacts/{run_id}.moe",
                   sha256=hashlib.sha256(run_id.encode()).hexdigest()),
              dict(event="final_roundtrip", val_loss=2.6, val_bpb=bpb)]
    text += "".join(metric_line(e) + "\n" for e in events if e["event"] != "router").encode()  # router: .jsonl only
    (logs / f"{run_id}.txt").write_bytes(text)
    (logs / f"{run_id}.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))


def metric_line(event: dict) -> str:
    """An event as the trainer's text log shows it: `name key:value ...`."""
    return f"{event['event']} " + " ".join(f"{k}:{tm._show(k, v)}" for k, v in event.items() if k not in ("event", "time"))


def tamper(path: Path, event: str, **changes) -> None:
    """Set (or DROP) fields of every `event` line of a .jsonl log alone; NaN and Infinity written as the trainer would."""
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    for line in lines:
        if line["event"] == event:
            line.update(changes)
            for key in [k for k, v in changes.items() if v == DROP]:
                del line[key]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def edit_event(path: Path, event: str, **changes) -> None:
    """tamper, and the same change to the text log's line of the event: the logs of a run that logged these figures."""
    tamper(path, event, **changes)
    record = next((json.loads(line) for line in path.read_text().splitlines() if json.loads(line)["event"] == event), None)
    text_path = path.with_suffix(".txt")
    lines = text_path.read_bytes().split(b"\n")
    start = max(i for i, line in enumerate(lines) if line == b"=" * 100)
    for i in range(start, len(lines)):
        if record is not None and lines[i].startswith(f"{event} ".encode()):
            lines[i] = metric_line(record).encode()
    text_path.write_bytes(b"\n".join(lines))


def drop_event(path: Path, event: str) -> None:
    lines = path.read_text().splitlines()
    path.write_text("".join(line + "\n" for line in lines if json.loads(line)["event"] != event))


def edit_bytes(path: Path, old: bytes, new: bytes) -> None:
    path.write_bytes(path.read_bytes().replace(old, new))


def append(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


def make_record_args(*runs, extra=()) -> list:
    return [REPO / "scripts/make_record.py", "--runs", *runs, "--track", "track_non_record_16mb", "--name", NAME,
            "--author", "Ada", "--github-id", "ada", "--blurb", "A record that must not be made.", *extra]


def write_logs(root: Path) -> Path:
    (root / "logs").mkdir()
    write_run(root / "logs", "r1", 1)
    write_run(root / "logs", "r2", 2)
    return root / "logs"


@pytest.fixture
def logs(tmp_path) -> Path:
    return write_logs(tmp_path)


def test_the_synthetic_runs_make_a_record_that_passes(logs):
    """The baseline of the two tables below: without a fault, both tools accept these logs."""
    cwd = logs.parent
    made = run_tool(make_record_args("r1", "r2"), cwd)
    assert made.returncode == 0 and made.stderr == "", made.stderr
    checked = run_tool([REPO / "scripts/check_record.py", RECORD], cwd)
    assert checked.returncode == 0 and checked.stdout.startswith("OK "), checked.stderr


MAKE_RECORD_CASES = {
    "not a trainer log": (lambda logs: (logs / "r1.txt").write_text("hello\n"), (), "r1.txt: no '=' separator lines"),
    "no torch in the report": (lambda logs: edit_bytes(logs / "r1.txt", b"torch", b"t"), (), "no torch version"),
    "no seed setting": (lambda logs: edit_bytes(logs / "r1.txt", b"config seed:1\n", b""), (), "no 'config seed:' line"),
    "num_experts not a number": (lambda logs: edit_bytes(logs / "r1.txt", b"num_experts:4", b"num_experts:four"), (),
                                 "config num_experts:four is not an integer"),
    "text log not utf-8": (lambda logs: append(logs / "r1.txt", b"config x:\xff\n"), (), "not UTF-8"),
    "corrupt jsonl line": (lambda logs: append(logs / "r1.jsonl", b'{"event": "tra'), (), "r1.jsonl:9: not JSON"),
    "jsonl line not an event": (lambda logs: append(logs / "r1.jsonl", b"[1, 2]\n"), (),
                                "r1.jsonl:9: not a train_moe.py event"),
    "jsonl not utf-8": (lambda logs: append(logs / "r1.jsonl", b"\xff\n"), (), "r1.jsonl: not UTF-8"),
    "unfinished": (lambda logs: drop_event(logs / "r1.jsonl", "final_roundtrip"), (), "no final_roundtrip event"),
    "NaN score": (lambda logs: edit_event(logs / "r1.jsonl", "final_roundtrip", val_bpb=float("nan")), (),
                  "final_roundtrip val_bpb is NaN"),
    "infinite loss": (lambda logs: edit_event(logs / "r2.jsonl", "final_ema", val_loss=float("inf")), (),
                      "final_ema val_loss is Infinity"),
    "NaN time": (lambda logs: edit_event(logs / "r1.jsonl", "train_done", train_time_ms=float("nan")), (),
                 "train_done train_time_ms is NaN"),
    "infinite byte count": (lambda logs: edit_event(logs / "r1.jsonl", "artifact", artifact_bytes=float("inf")), (),
                            "artifact artifact_bytes is Infinity"),
    "steps a string": (lambda logs: edit_event(logs / "r1.jsonl", "train_done", steps="10"), (), 'steps is "10"'),
    "score null": (lambda logs: edit_event(logs / "r1.jsonl", "final_raw", val_bpb=None), (),
                   "final_raw val_bpb is null"),
    "score missing": (lambda logs: edit_event(logs / "r1.jsonl", "final_raw", val_bpb=DROP), (),
                      "final_raw has no val_bpb"),
    "byte count missing": (lambda logs: edit_event(logs / "r1.jsonl", "artifact", model_bytes=DROP), (),
                           "artifact has no model_bytes"),
    "failed export": (lambda logs: (edit_event(logs / "r1.jsonl", "artifact", status="FAILED"),  # as the trainer logs it
                                    edit_event(logs / "r1.jsonl", "final_roundtrip", val_bpb=float("nan"))), (),
                      "r1.jsonl: artifact status 'FAILED': the run failed"),
    "over the cap": (lambda logs: edit_event(logs / "r1.jsonl", "artifact", status="OVER", artifact_bytes=16_000_001,
                                             model_bytes=16_000_001 - len(pack_code(SOURCE))), (), "over the 16,000,000-byte cap"),
    "router layer a string": (lambda logs: append(logs / "r1.jsonl", b'{"event": "router", "layer": "x"}\n'), (),
                              'router layer is "x"'),
    "router load not numbers": (lambda logs: edit_event(logs / "r1.jsonl", "router", load=["abc"]), (),
                                "router layer 0 load is"),
    "run missing": (lambda logs: (logs / "r2.jsonl").unlink(), (), "logs/r2.jsonl not found"),
    "run log a folder": (lambda logs: ((logs / "r2.txt").unlink(), (logs / "r2.txt").mkdir()), (), "is not a file"),
    "NaN baseline": (lambda logs: None, ("--baseline-loss", "nan", "2.0"), "--baseline-loss nan 2.0"),
    "name without letters": (lambda logs: None, ("--name", "!!!"), "--name '!!!'"),
    "same seed twice": (lambda logs: [(logs / f"r2{ext}").write_bytes((logs / f"r1{ext}").read_bytes())
                                      for ext in (".txt", ".jsonl")], (), "same seed"),
    "records is a file": (lambda logs: (logs.parent / "records").write_bytes(b"a file"), (), "records"),
    # The .jsonl against the text log's own lines, and the artifact against its logged size and hash.
    "edited score": (lambda logs: tamper(logs / "r1.jsonl", "final_roundtrip", val_bpb=1.2), (),
                     f"{Path('logs/r1.jsonl')}: final_roundtrip val_bpb is 1.2, but {Path('logs/r1.txt')} logs "
                     "val_bpb:1.51000000"),
    "edited pre-export score": (lambda logs: tamper(logs / "r2.jsonl", "final_ema", val_loss=2.5999), (),
                                "final_ema val_loss is 2.5999, but"),
    "edited raw score": (lambda logs: tamper(logs / "r1.jsonl", "final_raw", val_bpb=1.48000001), (),
                         "final_raw val_bpb is 1.48000001, but"),
    "edited steps": (lambda logs: tamper(logs / "r1.jsonl", "train_done", steps=11), (), "train_done steps is 11, but"),
    "edited time": (lambda logs: tamper(logs / "r1.jsonl", "train_done", train_time_ms=899), (),
                    "train_done train_time_ms is 899, but"),
    "edited parameters": (lambda logs: tamper(logs / "r1.jsonl", "model", active_params=500), (),
                          "model active_params is 500, but"),
    "edited model bytes, no artifact": (lambda logs: tamper(logs / "r1.jsonl", "artifact", model_bytes=100), (),
                                        "artifact model_bytes is 100, but"),
    "edited artifact hash": (lambda logs: tamper(logs / "r1.jsonl", "artifact", sha256="0" * 64), (),
                             "artifact sha256 is \"000"),
    "edited status": (lambda logs: (edit_event(logs / "r1.jsonl", "artifact", status="OVER"),
                                    tamper(logs / "r1.jsonl", "artifact", status="OK")), (), "artifact status is \"OK\""),
    "text log shows another score": (lambda logs: edit_bytes(logs / "r2.txt", b"val_bpb:1.52000000", b"val_bpb:1.42000000"),
                                     (), "final_roundtrip val_bpb is 1.52, but"),
    "text log without the score": (lambda logs: edit_bytes(logs / "r1.txt", b"\nfinal_roundtrip ", b"\nfinal_roundtrip_ "), (),
                                   "has 0 `final_roundtrip` lines"),
    "better score appended": (lambda logs: append(logs / "r1.jsonl", b'{"event": "final_roundtrip", "val_loss": 2.0, '
                                                                      b'"val_bpb": 1.2}\n'), (),
                              "r1.jsonl:9: a second final_roundtrip event (the first is on line 8); a run logs one"),
    "second artifact appended": (lambda logs: append(logs / "r2.jsonl", (logs / "r2.jsonl").read_bytes().splitlines(True)[6]),
                                 (), "r2.jsonl:9: a second artifact event (the first is on line 7)"),
    "better score appended to both": (lambda logs: [append(logs / f"r1{ext}", line) for ext, line in (
        (".jsonl", b'{"event": "final_roundtrip", "val_loss": 2.0, "val_bpb": 1.2}\n'),
        (".txt", b"final_roundtrip val_loss:2.00000000 val_bpb:1.20000000\n"))], (), "a second final_roundtrip event"),
    "better score line in the text log": (lambda logs: append(logs / "r1.txt", b"final_roundtrip val_loss:2.0 val_bpb:1.2\n"),
                                          (), "r1.txt has 2 `final_roundtrip` lines"),
    "error after the scores": (lambda logs: append(logs / "r1.jsonl", b'{"event": "error", "message": "stopped by SIGINT", '
                                                                       b'"status": 130}\n'), (),
                               "r1.jsonl: the run failed: stopped by SIGINT"),
    "no artifact hash (an older log)": (lambda logs: edit_event(logs / "r1.jsonl", "artifact", sha256=DROP), (),
                                        "artifact has no sha256"),
    "artifact hash not a hash": (lambda logs: edit_event(logs / "r1.jsonl", "artifact", sha256="abc"), (),
                                 'artifact sha256 is "abc", not a SHA-256 (64 hex digits)'),
    "bytes that do not add up": (lambda logs: edit_event(logs / "r1.jsonl", "artifact", artifact_bytes=9999), (),
                                 f"artifact_bytes 9999 is not code_bytes {len(pack_code(SOURCE))} + model_bytes 5000"),
    "artifact of another size": (lambda logs: make_files(logs.parent, {"artifacts/r1.moe": b"x" * 4999}), (),
                                 f"{Path('artifacts/r1.moe')} is 4999 bytes, the log says 5000"),
    "another run's artifact": (lambda logs: make_files(logs.parent, {"artifacts/r1.moe": b"x" * 5000}), (),
                               f"{Path('artifacts/r1.moe')} is not this run's artifact: its SHA-256 is "
                               f"{hashlib.sha256(b'x' * 5000).hexdigest()}, the log says "
                               f"{hashlib.sha256(b'r1').hexdigest()}"),
}


@pytest.fixture(scope="module")
def make_record_runs(request, tmp_path_factory) -> dict:
    """Each case this session runs, its fault made in the logs of a folder of its own and make_record run there:
    (its result, the folder before, after). The cases' interpreters run side by side."""
    folders, jobs = {}, {}
    for case in selected(request, "test_make_record_refuses", MAKE_RECORD_CASES):
        fault, extra, _ = MAKE_RECORD_CASES[case]
        cwd = tmp_path_factory.mktemp("make_record")
        fault(write_logs(cwd))
        folders[case] = (cwd, tree(cwd))
        jobs[case] = (make_record_args("r1", "logs/r2.txt", extra=extra), cwd)
    results = side_by_side(run_tool, jobs)
    return {case: (results[case], before, tree(cwd)) for case, (cwd, before) in folders.items()}


@pytest.mark.parametrize("case", MAKE_RECORD_CASES)
def test_make_record_refuses(case, make_record_runs):
    result, before, after = make_record_runs[case]
    assert_refused(result, MAKE_RECORD_CASES[case][2])
    assert after == before


def test_make_record_leaves_no_half_record_when_a_write_fails(logs, monkeypatch):
    """A write that fails once the record folder is being filled (a full disk) leaves no folder, partial or final."""
    monkeypatch.chdir(logs.parent)
    real_write_bytes = Path.write_bytes

    def full_disk_after_two_files(path, data):
        if len(list(path.parent.iterdir())) == 2:
            raise OSError(28, "No space left on device", str(path))
        return real_write_bytes(path, data)

    monkeypatch.setattr(Path, "write_bytes", full_disk_after_two_files)
    args = argparse.Namespace(runs=["r1", "r2"], track="track_non_record_16mb", name=NAME, author="Ada",
                              github_id="ada", blurb="b", baseline_loss=None, baseline_bpb=None)
    with pytest.raises(OSError, match="No space left on device"):
        make_record.make_record(args)
    assert list((logs.parent / RECORD.parent).iterdir()) == []


def submission(content: bytes):
    return lambda folder: (folder / "submission.json").write_bytes(content)


def claims(change):
    """A fault that edits the parsed submission.json in place (NaN and Infinity written as Python's JSON does)."""
    def edit(folder: Path) -> None:
        sub = json.loads((folder / "submission.json").read_text())
        change(sub)
        (folder / "submission.json").write_text(json.dumps(sub))
    return edit


CHECK_RECORD_CASES = {  # fault, fragment, whether it is the only problem
    "submission a list": (submission(b"[]"), "submission.json: holds [], not a JSON object", True),
    "submission a number": (submission(b"5"), "holds 5, not a JSON object", True),
    "submission empty object": (submission(b"{}"), "submission.json: no author", False),
    "submission not utf-8": (submission(b"\xff{}"), "submission.json: not readable JSON", True),
    "submission not json": (submission(b"{oops"), "submission.json: not readable JSON", True),
    "submission a folder": (lambda f: ((f / "submission.json").unlink(), (f / "submission.json").mkdir()),
                            "missing submission.json", True),
    "NaN claim": (claims(lambda s: s.update(val_bpb=float("nan"))), "submission.json: val_bpb is nan, not a finite", True),
    "infinite claim inside seed_results": (claims(lambda s: s["seed_results"]["1"].update(steps=float("inf"))),
                                           "seed_results.1.steps is inf, not a finite number", True),
    "seed_results a list": (claims(lambda s: s.update(seed_results=[])), "seed_results should be a dict", True),
    "seed_results of wrong types": (claims(lambda s: s.update(seed_results={"1": 5, "2": {"val_loss": "x"}})),
                                    "seed 1: val_loss claimed 5", False),
    "seeds not integers": (claims(lambda s: s.update(seeds=[1, "two"])), "seeds should be a list of integers", False),
    "NaN in a log": (lambda f: edit_event(f / "r1.jsonl", "final_roundtrip", val_loss=float("nan")),
                     "r1.jsonl: final_roundtrip val_loss is NaN", False),
    "corrupt log line": (lambda f: append(f / "r2.jsonl", b"{broken\n"), "r2.jsonl:9: not JSON", False),
    "log not utf-8": (lambda f: append(f / "r2.jsonl", b"\xff\n"), "r2.jsonl: not UTF-8", False),
    "text log not a log": (lambda f: (f / "r1.txt").write_text("hello\n"), "r1.txt: no '=' separator lines", False),
    "failed run": (lambda f: edit_event(f / "r1.jsonl", "artifact", status="FAILED"),
                   "r1.jsonl: artifact status 'FAILED'", False),
    "log a folder": (lambda f: ((f / "r3.jsonl").mkdir(), (f / "r3.txt").write_bytes((f / "r1.txt").read_bytes())),
                     "r3.jsonl: cannot be read", True),
    "edited score in a log": (lambda f: tamper(f / "r1.jsonl", "final_roundtrip", val_bpb=1.2),
                              "r1.jsonl: final_roundtrip val_bpb is 1.2, but r1.txt logs val_bpb:1.51000000", False),
    "edited model bytes in a log": (lambda f: tamper(f / "r2.jsonl", "artifact", model_bytes=100),
                                    "r2.jsonl: artifact model_bytes is 100, but r2.txt logs model_bytes:5000", False),
    "better score appended to a log": (lambda f: append(f / "r1.jsonl", b'{"event": "final_roundtrip", "val_loss": 2.0, '
                                                                         b'"val_bpb": 1.2}\n'),
                                       "r1.jsonl:9: a second final_roundtrip event", False),
    "better score line in a text log": (lambda f: append(f / "r2.txt", b"final_roundtrip val_loss:2.0 val_bpb:1.2\n"),
                                        "r2.txt has 2 `final_roundtrip` lines", False),
    "error in a log": (lambda f: append(f / "r2.jsonl", b'{"event": "error", "message": "stopped by SIGTERM", "status": 143}\n'),
                       "r2.jsonl: the run failed: stopped by SIGTERM", False),
}


@pytest.fixture(scope="module")
def record(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("record")
    (root / "logs").mkdir()
    for seed in (1, 2):
        write_run(root / "logs", f"r{seed}", seed)
    assert run_tool(make_record_args("r1", "r2"), root).returncode == 0
    return root / RECORD


@pytest.fixture(scope="module")
def check_record_runs(request, record, tmp_path_factory) -> dict:
    """Each case this session runs, its fault made in a copy of the record in a folder of its own and check_record run
    on it: (its result, the record's path, the folder before, after). The cases' interpreters run side by side."""
    folders, jobs = {}, {}
    for case in selected(request, "test_check_record_reports", CHECK_RECORD_CASES):
        root = tmp_path_factory.mktemp("check_record")
        folder = root / RECORD
        shutil.copytree(record, folder)
        CHECK_RECORD_CASES[case][0](folder)
        folders[case] = (root, folder, tree(root))
        jobs[case] = ([REPO / "scripts/check_record.py", folder], root)
    results = side_by_side(run_tool, jobs)
    return {case: (results[case], folder, before, tree(root)) for case, (root, folder, before) in folders.items()}


@pytest.mark.parametrize("case", CHECK_RECORD_CASES)
def test_check_record_reports(case, check_record_runs):
    _, fragment, one_line = CHECK_RECORD_CASES[case]
    result, folder, before, after = check_record_runs[case]
    assert_refused(result, fragment, one_line)
    assert all(line.startswith(f"error: {folder}: ") for line in result.stderr.splitlines())
    assert after == before


def test_check_record_refuses_a_missing_folder(tmp_path):
    assert_refused(run_tool([REPO / "scripts/check_record.py", tmp_path / "nope"], tmp_path), "nope is not a folder")


# --- scripts/router_dashboard.py ------------------------------------------------------------------------------------

def dashboard_log(*extra: dict) -> bytes:
    events = [{"event": "model", "params": 1000}]
    for step in (10, 20):
        events += [{"event": "train", "step": step, "train_loss": 4.0 - step / 100},
                   {"event": "router", "step": step, "layer": 0, "load": [0.5, 0.5], "token_entropy": None}]
    events.append({"event": "val", "step": 20, "val_loss": 3.5, "val_bpb": 2.0})
    return "".join(json.dumps(e) + "\n" for e in [*events, *extra]).encode()


DASHBOARD_CASES = {
    "load a string": ({"a.jsonl": dashboard_log({"event": "router", "step": 30, "layer": 0, "load": "abc"})}, (),
                      'a.jsonl:7: router event\'s load is "abc"'),
    "load empty": ({"a.jsonl": dashboard_log({"event": "router", "step": 30, "layer": 0, "load": []})}, (), "load is []"),
    "step a string": ({"a.jsonl": dashboard_log({"event": "train", "step": "x", "train_loss": 1.0})}, (),
                      'train event\'s step is "x"'),
    "step a bool": ({"a.jsonl": dashboard_log({"event": "train", "step": True, "train_loss": 1.0})}, (), "step is true"),
    "val_bpb null": ({"a.jsonl": dashboard_log({"event": "val", "step": 30, "val_bpb": None})}, (), "val_bpb is null"),
    "router without layer": ({"a.jsonl": dashboard_log({"event": "router", "step": 30, "load": [1.0]})}, (),
                             "router event has no layer"),
    "alert step a string": ({"a.jsonl": dashboard_log({"event": "router_alert", "step": "x", "layer": 0})}, (),
                            'router_alert event\'s step is "x"'),
    "params a string": ({"a.jsonl": dashboard_log({"event": "model", "params": "many"})}, (), 'params is "many"'),
    "empty log": ({"a.jsonl": b""}, (), "a.jsonl: holds no events"),
    "blank log": ({"a.jsonl": b"\n \n"}, (), "a.jsonl: holds no events"),
    "nothing to plot": ({"a.jsonl": b'{"event": "model", "params": 5}\n{"event": "new"}\n'}, (), "nothing to plot"),
    "not JSON": ({"a.jsonl": dashboard_log() + b'{"event": "tr'}, (), "a.jsonl:7: not valid JSON"),
    "not an event": ({"a.jsonl": dashboard_log() + b"[1]\n"}, (), "a.jsonl:7: not a train_moe.py event"),
    "not utf-8": ({"a.jsonl": dashboard_log() + b'{"event": "x\xff"}\n'}, (), "a.jsonl:7: not valid JSON"),
    "log missing": ({}, (), "a.jsonl: no such file"),
    "log a folder": ({"a.jsonl": None}, (), "a.jsonl: not a file"),
    "out in a missing folder": ({"a.jsonl": dashboard_log()}, ("--out", "nope/d.html"), "nope is not a folder"),
    "out a folder": ({"a.jsonl": dashboard_log(), "d.html": None}, ("--out", "d.html"), "d.html: it is a folder"),
    "png-dir a file": ({"a.jsonl": dashboard_log(), "p": b"a file"}, ("--png-dir", "p"), "p: it is not a folder"),
}


@pytest.mark.parametrize("files, extra, fragment", DASHBOARD_CASES.values(), ids=DASHBOARD_CASES)
def test_dashboard_refuses(files, extra, fragment, tmp_path):
    make_files(tmp_path, {"good.jsonl": dashboard_log(), **files})
    before = tree(tmp_path)
    assert_refused(run_tool([REPO / "scripts/router_dashboard.py", "good.jsonl", "a.jsonl", "--out", "d.html", *extra],
                            tmp_path), fragment)
    assert tree(tmp_path) == before  # no page, no PNG folder


def test_dashboard_plots_a_diverged_run(tmp_path):
    """NaN is what a diverged run logs: a number, plotted as a gap, not a bad input."""
    (tmp_path / "a.jsonl").write_bytes(dashboard_log({"event": "train", "step": 30, "train_loss": float("nan")}))
    result = run_tool([REPO / "scripts/router_dashboard.py", "a.jsonl", "--out", "d.html"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "d.html").is_file() and len(list((tmp_path / "d_png").glob("*.png"))) == 3
