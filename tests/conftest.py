"""Shared fixtures: a tiny corpus, tokenizer and shards made by the project's own pipeline, once per session."""
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data.default_corpus import stdlib_documents  # noqa: E402
from data.prepare import train_tokenizer, write_splits  # noqa: E402

# One intra-op thread in the test process and the ranks it spawns (which import this file), as run_trainer gives each
# trainer: the tests' tensors are tiny, and two threads on 2 cores shared with another process wait on each other.
torch.set_num_threads(1)

TINY_VOCAB = 384  # 4 specials + 256 byte pieces + 124 merges: small, and byte fallback is exercised


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict:
    """Shards of 160 standard-library documents (8 val) and a byte-fallback tokenizer trained on them."""
    root = tmp_path_factory.mktemp("tiny_data")
    documents = stdlib_documents()[:160]
    tokenizer = train_tokenizer(documents[8:], root / "tok.model", TINY_VOCAB)
    write_splits(documents, root / "shards", tokenizer, val_documents=8)
    vocab_size = spm.SentencePieceProcessor(model_file=str(tokenizer)).vocab_size()
    return {"data_path": root / "shards", "tokenizer_path": tokenizer, "vocab_size": vocab_size, "documents": documents}


# The MLP and export knobs as they were before docs/study.md made an MoE the default: the tests of the dense
# model and of each MoE mode set what they test on top of these, so the default can move without changing them.
DENSE = dict(MLP_MODE="dense", MOE_LAYERS="all", EXPERT_HIDDEN="0", QUANT_ATTN_BITS="8", QUANT_MLP_BITS="6",
             QUANT_EXPERT_BITS="6", QUANT_FIT="0")


# One micro-batch a step (the trainer's default is 8 // WORLD_SIZE): the same gradient, in a third of the step time on
# a CPU. For whole runs whose tests are about something else; test_trainer's tiny and two-process runs keep the default.
ONE_MICRO_BATCH = dict(GRAD_ACCUM_STEPS="1")


def tiny_env(tiny_data, **overrides) -> dict:
    """A 2-layer, 64-wide model on the tiny data: seconds per run on a CPU, eager (compile is tested on its own)."""
    env = dict(
        **DENSE,
        DATA_PATH=str(tiny_data["data_path"]), TOKENIZER_PATH=str(tiny_data["tokenizer_path"]),
        VOCAB_SIZE=str(tiny_data["vocab_size"]), NUM_LAYERS="2", MODEL_DIM="64", NUM_HEADS="4", NUM_KV_HEADS="2",
        TRAIN_SEQ_LEN="64", TRAIN_BATCH_TOKENS="4096", VAL_BATCH_SIZE="8192", ITERATIONS="30", WARMUP_STEPS="0",
        WARMDOWN_ITERS="10", MAX_WALLCLOCK_SECONDS="0", VAL_LOSS_EVERY="0", TRAIN_LOG_EVERY="5", COMPILE="0",
        EMA_DECAY="0.9", MATRIX_LR="0.04", SEED="1337",
    )
    env.update({k: str(v) for k, v in overrides.items()})
    return env


@pytest.fixture(scope="session")
def quickstart_run(tiny_data, tmp_path_factory) -> Path:
    """A trained one-MoE-layer run as the README's quick start leaves its folder (logs/quickstart.*,
    artifacts/quickstart.moe), with its fp32 checkpoint (SAVE_FP32=1): the README's commands and export_sweep.py read
    it, each from a copy of its own (copy_run)."""
    root = tmp_path_factory.mktemp("quickstart")
    env = tiny_env(tiny_data, RUN_ID="quickstart", ITERATIONS=40, MLP_MODE="sparse", MOE_LAYERS="1", NUM_EXPERTS=4,
                   EXPERT_HIDDEN=32, SAVE_FP32=1, **ONE_MICRO_BATCH)
    result = run_trainer(root, env)
    assert result.returncode == 0, result.stderr[-3000:]
    return root


def copy_run(run_dir: Path, to: Path) -> Path:
    """A run's logs/ and artifacts/ copied into `to`, for a test that writes beside them."""
    for sub in ("logs", "artifacts"):
        shutil.copytree(run_dir / sub, to / sub)
    return to


def run_trainer(cwd: Path, env: dict, nproc: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run train_moe.py as a user would: plain python for one process, torchrun (gloo) for several."""
    cmd = [sys.executable, str(REPO / "train_moe.py")]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(REPO / "train_moe.py")]
    full_env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    full_env.update(env, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def side_by_side(run, jobs: dict) -> dict:
    """run(*args) for each job's args, as many at once as there are cores (8 at most); the results by job name. For a
    table of cases that each start a process of their own (a tool or the trainer, run as a user runs it, on a folder of
    its own): most of a case's seconds are its interpreter importing torch, one core's work."""
    with ThreadPoolExecutor(max_workers=min(CORES, 8)) as pool:
        futures = {name: pool.submit(run, *args) for name, args in jobs.items()}
        return {name: future.result() for name, future in futures.items()}


def selected(request, test_name: str, cases, param: str = "case") -> list:
    """The cases (values of `param`) of test_name that this session runs: all, or those -k or node ids picked."""
    picked = {item.callspec.params[param] for item in request.session.items
              if getattr(item, "originalname", None) == test_name and item.module is request.module}
    return [case for case in cases if case in picked]


def _gloo_rank(rank, world, fn, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.save(fn(rank), os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def on_gloo_ranks(fn, tmp_path: Path, world: int = 2) -> list:
    """fn(rank) in `world` spawned processes joined by a gloo process group; what each returned, by rank.
    fn must be a module-level function (spawn pickles it by name)."""
    mp.spawn(_gloo_rank, args=(world, fn, str(tmp_path / "init"), str(tmp_path)), nprocs=world)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
