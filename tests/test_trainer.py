"""train_moe.py: shards, val_bpb, export, config errors, EMA, --help, progress lines, and whole runs on 1 and 2 CPU
processes."""
import hashlib
import json
import math
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import sentencepiece as spm
import torch

import train_moe as tm
from conftest import ONE_MICRO_BATCH, REPO, on_gloo_ranks, run_trainer, tiny_env
from data.shards import write_shard

sys.path.insert(0, str(REPO / "scripts"))
import settings_help  # noqa: E402


def events(run_dir, run_id):
    lines = (run_dir / "logs" / f"{run_id}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def only(evs, name):
    found = [e for e in evs if e["event"] == name]
    assert len(found) == 1, f"expected one {name} event, got {len(found)}"
    return found[0]


# ---------------------------------------------------------------- shards

def test_shard_roundtrip(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 65536, size=5000)
    write_shard(tmp_path / "s.bin", tokens)
    loaded = tm.load_data_shard(tmp_path / "s.bin")
    assert loaded.dtype == torch.uint16
    assert np.array_equal(loaded.numpy(), tokens)
    assert (tmp_path / "s.bin").stat().st_size == 1024 + 2 * 5000


@pytest.mark.parametrize("word,value,message", [(0, 1234, "magic"), (1, 2, "version"), (2, 4999, "promises")])
def test_shard_rejects_bad_header(tmp_path, word, value, message):
    path = tmp_path / "s.bin"
    write_shard(path, np.arange(5000))
    raw = bytearray(path.read_bytes())
    raw[4 * word : 4 * word + 4] = np.int32(value).tobytes()
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=message):
        tm.load_data_shard(path)


def test_shard_rejects_truncated_file(tmp_path):
    path = tmp_path / "s.bin"
    write_shard(path, np.arange(5000))
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(ValueError, match="promises 5000 tokens"):
        tm.load_data_shard(path)


# ---------------------------------------------------------------- val_bpb

@pytest.fixture(scope="module")
def dummy_prefix_tokenizer(tiny_data, tmp_path_factory):
    """Like the project's tokenizer but with add_dummy_prefix: a document's first piece then starts with U+2581,
    which decoding drops, so it must not be counted after BOS: the boundary rule of the byte tables."""
    prefix = tmp_path_factory.mktemp("dummy") / "tok"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(tiny_data["documents"][8:]), model_prefix=str(prefix), model_type="bpe",
        vocab_size=tiny_data["vocab_size"], byte_fallback=True, add_dummy_prefix=True, hard_vocab_limit=False,
        character_coverage=0.999, pad_id=0, bos_id=1, eos_id=2, unk_id=3, max_sentence_length=1 << 30, minloglevel=2)
    return f"{prefix}.model"


@pytest.mark.parametrize("which", ["project", "dummy_prefix"])
def test_byte_tables_match_decoded_utf8(tiny_data, dummy_prefix_tokenizer, which):
    model_file = str(tiny_data["tokenizer_path"]) if which == "project" else dummy_prefix_tokenizer
    sp = spm.SentencePieceProcessor(model_file=model_file)
    tables = tm.build_byte_tables(sp, "cpu")
    documents = tiny_data["documents"][:20] + ["naïve café — 東京 😀 ünïcödé", "Ünïcode first; then   spaces"]
    byte_pieces_seen = 0
    for doc in documents:
        ids = sp.encode(doc)
        byte_pieces_seen += sum(sp.is_byte(i) for i in ids)
        stream = torch.tensor([sp.bos_id()] + ids)
        counted = tm.target_bytes(stream[:-1], stream[1:], tables).sum().item()
        assert counted == len(sp.decode(ids).encode("utf-8")), doc[:60]
    assert byte_pieces_seen > 0, "the check must cover byte-fallback pieces"


def test_evaluate_matches_hand_computation(tiny_data):
    """With a constant per-token loss c, val_loss = c and val_bpb = c/ln2 * tokens/bytes, where bytes is the
    UTF-8 length of the decoded documents: the definition the tables must reproduce over several windows."""
    sp = spm.SentencePieceProcessor(model_file=str(tiny_data["tokenizer_path"]))
    seq_len = 32
    docs = tiny_data["documents"][:3] + ["naïve café — 東京 😀"]
    stream = [t for doc in docs for t in [sp.bos_id()] + sp.encode(doc)]
    # A last document of single letters, one token each, makes the stream exactly whole windows plus one.
    letters = (-len(stream)) % seq_len + seq_len
    docs.append(" ".join(["a"] * letters))
    stream += [sp.bos_id()] + sp.encode(docs[-1])
    assert (len(stream) - 1) % seq_len == 0
    val = torch.tensor(stream, dtype=torch.int32)
    cfg = tm.Hyperparameters({"TRAIN_SEQ_LEN": str(seq_len), "VAL_BATCH_SIZE": "64", "TRAIN_BATCH_TOKENS": "256"})
    c = 2.5
    tables = tm.build_byte_tables(sp, "cpu")
    loss, bpb = tm.evaluate(lambda x, y: torch.full(y.shape, c), val, tables, cfg, torch.device("cpu"), 0)
    nbytes = sum(len(sp.decode(sp.encode(doc)).encode("utf-8")) for doc in docs)
    assert loss == pytest.approx(c, rel=1e-12)
    assert bpb == pytest.approx(c / math.log(2) * (len(stream) - 1) / nbytes, rel=1e-12)


@pytest.mark.parametrize("targets,seq_len,stride", [(1024, 128, 0), (1024, 128, 64), (1000, 128, 48), (128, 128, 16), (777, 64, 1)])
def test_eval_windows_score_every_target_once(targets, seq_len, stride):
    starts, scored = tm.eval_windows(targets, seq_len, stride)
    counts = torch.zeros(targets, dtype=torch.int64)
    for start, n in zip(starts.tolist(), scored.tolist()):
        assert 0 <= start and start + seq_len <= targets and 1 <= n <= seq_len
        counts[start + seq_len - n : start + seq_len] += 1
        if start > 0:  # every scored position after the first window sees at least seq_len - stride of context
            assert seq_len - n >= seq_len - (stride or seq_len)
    assert torch.equal(counts, torch.ones(targets, dtype=torch.int64))


def test_sliding_stride_equal_to_seq_len_is_the_non_overlapping_eval(tiny_data):
    sp = spm.SentencePieceProcessor(model_file=str(tiny_data["tokenizer_path"]))
    cfg = tm.Hyperparameters(tiny_env(tiny_data))
    torch.manual_seed(0)
    model = tm.GPT(cfg)
    for p in model.parameters():  # zero-initialised projections would make every window's loss identical
        p.data.normal_(0, 0.05)
    val = tm.load_val_tokens(cfg)
    tables = tm.build_byte_tables(sp, "cpu")
    cpu = torch.device("cpu")
    plain = tm.evaluate(model.token_losses, val, tables, cfg, cpu, 0)
    assert tm.evaluate(model.token_losses, val, tables, cfg, cpu, cfg.train_seq_len) == pytest.approx(plain, rel=1e-9)
    sliding = tm.evaluate(model.token_losses, val, tables, cfg, cpu, 16)
    assert sliding[0] != pytest.approx(plain[0], rel=1e-6)  # more context changes the losses


# ---------------------------------------------------------------- export

@pytest.mark.parametrize("bits,max_rel_rms", [(8, 0.008), (7, 0.016), (6, 0.03), (5, 0.06), (4, 0.12)])
def test_quantize_error_bounds(bits, max_rel_rms):
    w = torch.randn(64, 512, generator=torch.Generator().manual_seed(bits))
    q, scale = tm.quantize_matrix(w, bits, clip_sigmas=0.0)
    qmax = 2 ** (bits - 1) - 1
    assert q.dtype == torch.int8 and scale.dtype == torch.float16
    assert q.abs().max().item() <= qmax
    recon = q.float() * scale.float()[:, None]
    rel_rms = ((recon - w).square().mean() / w.square().mean()).sqrt().item()
    assert rel_rms < max_rel_rms
    # Inside the clip range the error is at most half a step; the search never loses to plain absmax.
    inside = w.abs() <= qmax * scale.float()[:, None]
    assert ((recon - w).abs() <= scale.float()[:, None] / 2 + 1e-6)[inside].all()
    absmax_scale = (w.abs().amax(1) / qmax).half().float()
    absmax_err = ((torch.round(w / absmax_scale[:, None]).clamp(-qmax, qmax) * absmax_scale[:, None] - w).square().sum(1))
    assert ((recon - w).square().sum(1) <= absmax_err + 1e-9).all()


def test_clip_search_clips_outliers_at_low_bits():
    w = torch.randn(8, 512, generator=torch.Generator().manual_seed(0))
    w[:, 0] = 40.0  # one huge outlier per row
    q, scale = tm.quantize_matrix(w, 5, clip_sigmas=0.0)
    assert (scale.float() < 40.0 / 15 * 0.99).all()


@pytest.mark.parametrize("clip_sigmas", [2.5, 4.0, 8.0])
def test_sigma_clip_sets_the_step_from_the_row_std(clip_sigmas):
    w = torch.randn(32, 512, generator=torch.Generator().manual_seed(1)) * torch.linspace(0.01, 2, 32)[:, None]
    q, scale = tm.quantize_matrix(w, 6, clip_sigmas)
    torch.testing.assert_close(scale.float(), (w.std(1) * clip_sigmas / 31).half().float())
    clipped = (q.abs() == 31).float().mean().item()
    assert clipped == pytest.approx(2 * torch.distributions.Normal(0, 1).cdf(torch.tensor(-clip_sigmas)).item(), abs=0.005)


def test_wider_clips_buy_fewer_bytes():
    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(2))
    sizes = [len(tm.pack_artifact(*tm.quantize_state({"blocks.0.mlp.fc.weight": w}, tm.rounded_levels(
        {"blocks.0.mlp.fc.weight": w}, {"mlp": 6}, k)))) for k in (3.0, 6.0, 12.0)]
    assert sizes[0] > sizes[1] > sizes[2]
    # One more std of clip at 6 bits costs log2(6/3) = 1 bit per weight less: 16 KB of these 131,072 weights.
    assert sizes[0] - sizes[1] == pytest.approx(256 * 512 / 8, rel=0.1)


def test_values_past_fp16_are_stored_in_fp32():
    state = {"blocks.0.attn_scale": torch.tensor([1.0, 1e6]), "blocks.0.mlp.fc.weight": torch.randn(4, 8) * 1e9}
    header, arrays = tm.quantize_state(state, tm.rounded_levels(state, {"mlp": 5}, 0.0))
    assert arrays["blocks.0.attn_scale"].dtype == np.float32 and arrays["blocks.0.mlp.fc.weight.scale"].dtype == np.float32
    loaded = tm.read_artifact(tm.pack_artifact(header, arrays))[1]
    assert torch.isfinite(loaded["blocks.0.mlp.fc.weight"]).all()
    assert loaded["blocks.0.attn_scale"][1].item() == 1e6
    assert torch.allclose(loaded["blocks.0.mlp.fc.weight"], state["blocks.0.mlp.fc.weight"], rtol=0.15, atol=0.1 * 1e9)


def test_artifact_roundtrip_and_byte_accounting(tmp_path):
    torch.manual_seed(0)
    state = {
        "tok_emb.weight": torch.randn(100, 32),
        "blocks.0.attn.q.weight": torch.randn(32, 32),
        "blocks.0.mlp.fc.weight": torch.randn(64, 32),
        "blocks.0.attn_scale": torch.rand(32),
        "blocks.0.resid_mix": torch.rand(2, 32),
    }
    bits = {"embed": 8, "attn": 6, "mlp": 5}
    header, arrays = tm.quantize_state(state, tm.rounded_levels(state, bits, 0.0))
    assert {k: v.get("bits") for k, v in header.items()} == {
        "tok_emb.weight": 8, "blocks.0.attn.q.weight": 6, "blocks.0.mlp.fc.weight": 5,
        "blocks.0.attn_scale": None, "blocks.0.resid_mix": None}
    blob = tm.pack_artifact(header, arrays)
    path = tmp_path / "a" / "model.zst"
    tm.write_artifact(path, blob)
    assert path.stat().st_size == len(blob) and not list(path.parent.glob("*.tmp"))
    loaded = tm.read_artifact(path.read_bytes())[1]
    assert set(loaded) == set(state)
    for name, t in state.items():
        if header[name]["kind"] == "int":
            expected = arrays[name].astype(np.float32) * arrays[name + ".scale"].astype(np.float32)[:, None]
            assert torch.equal(loaded[name], torch.from_numpy(expected))
        else:
            assert torch.equal(loaded[name], t.half().float())
    with pytest.raises(Exception):
        tm.read_artifact(blob[: len(blob) // 2])


# ---------------------------------------------------------------- config errors

@pytest.mark.parametrize("overrides,variable", [
    ({"MLP_MODE": "moe"}, "MLP_MODE"),
    ({"NUM_LAYERS": "nine"}, "NUM_LAYERS"),
    ({"NUM_LAYERS": "0"}, "NUM_LAYERS"),
    ({"MATRIX_LR": "nan"}, "MATRIX_LR"),
    ({"EMA_DECAY": "1.5"}, "EMA_DECAY"),
    ({"QUANT_MLP_BITS": "3"}, "QUANT_MLP_BITS"),
    ({"BETA2": "1"}, "BETA2"),
    ({"ADAM_EPS": "0"}, "ADAM_EPS"),
    ({"QK_GAIN_INIT": "1e300"}, "QK_GAIN_INIT"),
    ({"MODEL_DIM": "1000000000000"}, "MODEL_DIM"),
    ({"MODEL_DIM": "16384", "NUM_LAYERS": "256", "NUM_HEADS": "128", "NUM_KV_HEADS": "128"}, "MODEL_DIM"),  # ~3 TB
    ({"RUN_ID": "../../x"}, "RUN_ID"),
    ({"QUANT_CLIP_SIGMAS": "-1"}, "QUANT_CLIP_SIGMAS"),
    ({"QUANT_FIT": "1", "CALIBRATION_TOKENS": "10"}, "CALIBRATION_TOKENS"),
    ({"MODEL_DIM": "65"}, "MODEL_DIM"),
    ({"NUM_KV_HEADS": "3"}, "NUM_HEADS"),
    ({"TRAIN_BATCH_TOKENS": "4000"}, "TRAIN_BATCH_TOKENS"),
    ({"GRAD_ACCUM_STEPS": "0"}, "GRAD_ACCUM_STEPS"),
    ({"GRAD_ACCUM_STEPS": "3"}, "TRAIN_BATCH_TOKENS"),  # 64 sequences do not split into 3 micro-batches
    ({"EVAL_STRIDE": "65"}, "EVAL_STRIDE"),
    ({"DATA_PATH": "/nonexistent/shards"}, "DATA_PATH"),
    ({"TOKENIZER_PATH": "/nonexistent/tok.model"}, "TOKENIZER_PATH"),
    ({"VOCAB_SIZE": "1024"}, "VOCAB_SIZE"),
])
def test_config_errors_name_the_variable(tiny_data, overrides, variable):
    with pytest.raises(tm.ConfigError, match=rf"^{variable}="):
        tm.Hyperparameters(tiny_env(tiny_data, **overrides)).check_inputs()


def test_grad_accum_steps_sets_the_micro_batch(tiny_data):
    cfg = tm.Hyperparameters(tiny_env(tiny_data, GRAD_ACCUM_STEPS=2))
    loader = tm.DistributedTokenLoader(cfg, torch.device("cpu"))
    x, y = loader.next_batch()
    assert cfg.grad_accum_steps == 2 and x.shape == y.shape == (32, 64)  # 4096 tokens / 2 micro-batches / 64
    assert torch.equal(x.flatten()[1:], y.flatten()[:-1])
    assert tm.Hyperparameters(tiny_env(tiny_data)).grad_accum_steps == 8


def test_corrupt_shard_is_a_config_error(tiny_data, tmp_path):
    for shard in tiny_data["data_path"].iterdir():
        (tmp_path / shard.name).write_bytes(shard.read_bytes())
    victim = tmp_path / "fineweb_train_000000.bin"
    victim.write_bytes(victim.read_bytes()[:-10])
    with pytest.raises(tm.ConfigError, match=r"^DATA_PATH=.*fineweb_train_000000.bin"):
        tm.Hyperparameters(tiny_env(tiny_data, DATA_PATH=tmp_path)).check_inputs()


def test_config_error_exits_with_one_line_before_any_work(tiny_data, tmp_path):
    result = run_trainer(tmp_path, tiny_env(tiny_data, NUM_HEADS="3"), timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "config_error: MODEL_DIM=64: must be divisible by NUM_HEADS=3"]
    assert not (tmp_path / "logs").exists()


# ---------------------------------------------------------------- optimizer and EMA

def test_newton_schulz_orthogonalizes_batched():
    g = torch.randn(3, 48, 96, generator=torch.Generator().manual_seed(0))
    out = tm.newton_schulz(g, steps=5).float()
    singular = torch.linalg.svdvals(out)
    assert singular.min() > 0.5 and singular.max() < 1.3
    assert torch.allclose(out[1], tm.newton_schulz(g[1], steps=5).float())
    tall = tm.newton_schulz(g[0].T, steps=5).float()
    assert torch.allclose(tall, out[0].T)


MUON_SHAPES = [(48, 24), (24, 48), (48, 24), (3, 16, 8), (16, 16), (48, 24), (3, 16, 8)]


def muon_grad(i, step, shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1000 * step + i))


def muon_reference(shapes, steps, lr=0.05, momentum=0.9):
    """Muon matrix by matrix: buf = m*buf + g; p -= lr * NS(g + m*buf) * sqrt(max(1, rows/cols))."""
    params = [torch.randn(*s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(shapes)]
    buffers = [torch.zeros_like(p) for p in params]
    for step in range(steps):
        for i, (p, buf) in enumerate(zip(params, buffers)):
            grad = muon_grad(i, step, p.shape)
            buf.mul_(momentum).add_(grad)
            update = tm.newton_schulz(grad + momentum * buf, 5) * max(1.0, p.size(-2) / p.size(-1)) ** 0.5
            p.sub_(lr * update.float())
    return params


def muon_run(shapes, steps):
    params = [torch.nn.Parameter(torch.randn(*s, generator=torch.Generator().manual_seed(i))) for i, s in enumerate(shapes)]
    opt = tm.Muon(params, lr=0.05, momentum=0.9, backend_steps=5)
    for step in range(steps):
        for i, p in enumerate(params):
            p.grad = muon_grad(i, step, p.shape)
        opt.step()
    return [p.detach() for p in params]


def test_muon_batched_by_shape_matches_matrix_by_matrix():
    for got, want in zip(muon_run(MUON_SHAPES, 3), muon_reference(MUON_SHAPES, 3)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def rank_muon(rank):
    return muon_run(MUON_SHAPES, 3)


def test_muon_split_across_two_ranks_matches_one_process(tmp_path):
    rank0, rank1 = on_gloo_ranks(rank_muon, tmp_path)
    for a, b, want in zip(rank0, rank1, muon_run(MUON_SHAPES, 3)):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("iterations,loop_ms,step,elapsed_ms,scale,eta_s", [
    (30, 600_000, 25, 2500, 0.5, 0.5),  # iterations end first
    (30, 600_000, 10, 1000, 1.0, 2.0),
    (20000, 10_000, 95, 9500, 0.5, 0.5),  # the loop's share of the cap ends first
    (20000, 10_000, 100, 10000, 0.0, 0.0),
    (30, math.inf, 28, 1e9, 0.2, 2 * 1e9 / 28 / 1000),  # no cap
])
def test_warmdown_ends_at_whichever_limit_comes_first(iterations, loop_ms, step, elapsed_ms, scale, eta_s):
    cfg = tm.Hyperparameters({"WARMDOWN_ITERS": "10", "ITERATIONS": str(iterations)})
    assert tm.lr_scale(cfg, step, elapsed_ms, loop_ms) == pytest.approx(scale)
    assert tm.eta_seconds(cfg, step, elapsed_ms, loop_ms) == pytest.approx(eta_s)


def test_expert_size_follows_the_width():
    assert [tm.Hyperparameters({"MODEL_DIM": d, "NUM_HEADS": "4"}).expert_hidden for d in ("512", "128", "72")] == [256, 64, 32]


def test_progress_bar_goes_to_a_terminal_only(tiny_data, tmp_path):
    """Under a pseudo-terminal the run draws a step bar on stderr; the log file holds only the lines."""
    import fcntl
    import pty
    import struct
    import termios

    env = tiny_env(tiny_data, RUN_ID="tty", ITERATIONS=12, TRAIN_LOG_EVERY=100)
    parent, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a new pseudo-terminal is 0 columns wide
    run = subprocess.Popen([sys.executable, str(REPO / "train_moe.py")], cwd=tmp_path, stdout=subprocess.PIPE, stderr=child,
                           env={**os.environ, **env, "OMP_NUM_THREADS": "1"})
    os.close(child)
    screen = b""
    while True:  # read as it is drawn: a full pseudo-terminal would block the run; EIO once it has closed
        try:
            chunk = os.read(parent, 1 << 16)
        except OSError:
            break
        if not chunk:
            break
        screen += chunk
    os.close(parent)
    stdout = run.stdout.read().decode()
    assert run.wait(timeout=120) == 0 and "12/12" in screen.decode(errors="replace") and b"step/s" in screen
    assert "step/s" not in (tmp_path / "logs" / "tty.txt").read_text() and "step/s" not in stdout


def test_ema_update_follows_the_ramped_decay():
    model = torch.nn.Linear(3, 2)
    ema = tm.EMA(model, decay=0.5)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update()  # t=0: decay min(0.5, 1/10) = 0.1
    assert torch.allclose(ema.shadow[0], 0.1 * start + 0.9 * (start + 1))
    previous = ema.shadow[0].clone()
    for t in range(1, 12):  # the ramp 2/11, 3/12, ... until it reaches the 0.5 cap at t=8
        with torch.no_grad():
            model.weight.add_(1.0)
        ema.update()
        d = min(0.5, (1 + t) / (10 + t))
        assert torch.allclose(ema.shadow[0], d * previous + (1 - d) * model.weight.detach())
        previous = ema.shadow[0].clone()
    ema.copy_to(model)
    assert torch.equal(model.weight.detach(), ema.shadow[0])


# ---------------------------------------------------------------- compile

@pytest.mark.parametrize("env, device, distributed, expected", [
    ({}, "cuda", False, True),
    ({}, "cuda", True, False),  # torchrun, even with one process: DDP with graphs is not measured
    ({}, "cpu", False, False),
    ({"COMPILE": "0"}, "cuda", False, False),  # graphs are compile's reduce-overhead mode
    ({"CUDA_GRAPHS": "0"}, "cuda", False, False),
])
def test_cuda_graphs_only_for_a_compiled_step_on_a_gpu_without_torchrun(env, device, distributed, expected):
    assert tm.step_graphs(tm.Hyperparameters(env), torch.device(device), distributed) is expected


def test_train_step_compiles_fullgraph_without_recompiles(tiny_data):
    import torch._dynamo

    torch._dynamo.reset()
    cfg = tm.Hyperparameters(tiny_env(tiny_data))
    torch.manual_seed(0)
    model = tm.GPT(cfg)
    step = torch.compile(model, fullgraph=True, dynamic=False)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed in range(3):
            ids = torch.randint(0, cfg.vocab_size, (2, cfg.train_seq_len), generator=torch.Generator().manual_seed(seed))
            loss = step(ids[:, :-1].contiguous(), ids[:, 1:].contiguous())
            loss.backward()
            assert torch.isfinite(loss)
    eager = model(ids[:, :-1].contiguous(), ids[:, 1:].contiguous())
    assert eager.item() == pytest.approx(loss.item(), rel=1e-4)


# ---------------------------------------------------------------- whole runs

def test_tiny_run_learns_exports_and_roundtrips(tiny_data, tmp_path):
    env = tiny_env(tiny_data, RUN_ID="tiny", ITERATIONS=40, VAL_LOSS_EVERY=20, WARMUP_STEPS=2, WANDB=1,
                   WANDB_MODE="offline", WANDB_DIR=tmp_path, WANDB_SILENT="true")
    result = run_trainer(tmp_path, env)
    assert result.returncode == 0, result.stderr[-3000:]
    evs = events(tmp_path, "tiny")
    train = [e for e in evs if e["event"] == "train"]
    assert train[-1]["train_loss"] < train[0]["train_loss"] - 1.0
    vals = [e for e in evs if e["event"] == "val"]
    assert [v["step"] for v in vals] == [0, 20]
    ema, rt, raw = only(evs, "final_ema"), only(evs, "final_roundtrip"), only(evs, "final_raw")
    assert ema["val_bpb"] < vals[0]["val_bpb"] - 0.5
    assert raw["val_bpb"] < vals[0]["val_bpb"] - 0.5
    # Default bits (MLP int6, the rest int8): the exported model scores within 0.01 bpb of its source weights.
    assert abs(rt["val_bpb"] - ema["val_bpb"]) < 0.01
    art = only(evs, "artifact")
    assert art["code_bytes"] == len(tm.pack_code((REPO / "train_moe.py").read_bytes()))
    assert art["model_bytes"] == (tmp_path / art["path"]).stat().st_size
    assert art["artifact_bytes"] == art["code_bytes"] + art["model_bytes"]
    assert art["status"] == "OK" and art["limit"] == 16_000_000
    log_text = (tmp_path / "logs" / "tiny.txt").read_text()
    assert log_text.startswith((REPO / "train_moe.py").read_text())
    assert only(evs, "model")["expert_kernel"] == "none"  # a dense run has no experts to name a kernel for
    assert "config mlp_mode:dense" in log_text and f"torch {torch.__version__}" in log_text
    # On screen: the metrics and the launch command, not the source nor the 80 settings; no bar off a terminal.
    assert "config mlp_mode" not in result.stdout and "config launch:" in result.stdout and "step/s" not in result.stderr
    assert "less than the current step" not in result.stderr + result.stdout  # wandb took every step
    assert only(evs, "train_done")["peak_memory_mib"] > 0 and train[-1]["eta_s"] == 0
    assert f"final_roundtrip val_loss:{rt['val_loss']:.8f} val_bpb:{rt['val_bpb']:.8f}" in result.stdout
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    # The first lines name the files, the last one the artifact, its bytes and the official score.
    lines = result.stdout.splitlines()
    assert lines[0].startswith("config launch:") and lines[1] == ("paths text_log:logs/tiny.txt json_log:logs/tiny.jsonl "
                                                                  "artifact:artifacts/tiny.moe")
    assert lines[-1] == (f"result artifact:artifacts/tiny.moe artifact_bytes:{art['artifact_bytes']} status:OK "
                         f"roundtrip_val_bpb:{rt['val_bpb']:.8f}")
    assert [e["event"] for e in evs if e["event"].endswith("_start")] == [
        "train_start", "export_start", "final_raw_start", "final_ema_start", "final_roundtrip_start"]  # eager: no warm-up
    umask = os.umask(0)
    os.umask(umask)
    for path in (tmp_path / "logs" / "tiny.txt", tmp_path / "logs" / "tiny.jsonl", tmp_path / art["path"]):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    # The artifact records its tokenizer: its path as the run read it and the hash of the file, not its bytes.
    settings, _ = tm.read_artifact((tmp_path / art["path"]).read_bytes())
    assert settings["TOKENIZER_PATH"] == str(tiny_data["tokenizer_path"])
    assert settings["TOKENIZER_SHA256"] == hashlib.sha256(tiny_data["tokenizer_path"].read_bytes()).hexdigest()


def test_two_processes_match_one_and_warmup_is_rolled_back(tiny_data, tmp_path):
    """Compiled, the warm-up runs and is rolled back: the same losses as no warm-up. Eager, it is skipped."""
    common = dict(ITERATIONS=6, TRAIN_LOG_EVERY=1, VAL_LOSS_EVERY=3, EMA_DECAY=0)
    runs = {
        "one": (1, tiny_env(tiny_data, RUN_ID="one", WARMUP_STEPS=2, COMPILE=1, **common)),
        "two": (2, tiny_env(tiny_data, RUN_ID="two", WARMUP_STEPS=2, **common,
                            ARTIFACT_LIMIT_BYTES=len(tm.pack_code((REPO / "train_moe.py").read_bytes())) + 1000)),
        "nowarm": (1, tiny_env(tiny_data, RUN_ID="nowarm", WARMUP_STEPS=0, COMPILE=1, **common)),
    }
    results = {}
    for run_id, (nproc, env) in runs.items():
        result = run_trainer(tmp_path, env, nproc=nproc)
        if run_id == "two":  # over its cap: rank 0 exits 4 after scoring, and torchrun reports the failure
            assert result.returncode == 1 and "error: artifact" in result.stderr and "exitcode  : 4" in result.stderr
        else:
            assert result.returncode == 0, result.stderr[-3000:]
        results[run_id] = events(tmp_path, run_id)

    def losses(run_id, event, key):
        return [e[key] for e in results[run_id] if e["event"] == event]

    assert only(results["two"], "model")["grad_accum_steps"] == 4
    assert losses("one", "train", "train_loss") == pytest.approx(losses("two", "train", "train_loss"), abs=2e-3)
    assert losses("one", "val", "val_loss") == pytest.approx(losses("two", "val", "val_loss"), abs=2e-3)
    # The two compiled runs agree to float32 rounding, not bitwise, and six steps grow it: 1e-7 here, 1.05e-5 once on CI.
    # Two steps not rolled back would move the losses by 0.1+, so 1e-3 still catches them.
    assert losses("one", "train", "train_loss") == pytest.approx(losses("nowarm", "train", "train_loss"), abs=1e-3)
    assert only(results["one"], "warmup")["steps"] == 2 and not losses("two", "warmup", "steps")
    assert only(results["two"], "artifact")["status"] == "OVER"
    assert only(results["two"], "final_roundtrip")["val_bpb"] == pytest.approx(
        only(results["one"], "final_roundtrip")["val_bpb"], abs=5e-3)


def test_a_run_stopped_by_its_cap_logs_a_train_line_at_its_last_step(tiny_data, tmp_path):
    # 3 s of one-micro-batch steps: dozens, well past the 10 logged at the start.
    env = tiny_env(tiny_data, RUN_ID="capped", ITERATIONS=10**6, MAX_WALLCLOCK_SECONDS=3, TRAIN_LOG_EVERY=10**6,
                   WARMDOWN_ITERS=0, **ONE_MICRO_BATCH)
    result = run_trainer(tmp_path, env)
    assert result.returncode == 0, result.stderr[-3000:]
    evs = events(tmp_path, "capped")
    done = only(evs, "train_done")
    steps = [e["step"] for e in evs if e["event"] == "train"]
    assert done["stopped_by"] == "wallclock" and steps[-1] == done["steps"] and steps[:10] == list(range(1, 11))
    assert [e["step"] for e in evs if e["event"] == "router_summary"] == [] and len(steps) == 10 + (done["steps"] > 10)


# ---------------------------------------------------------------- --help, progress lines

def test_help_prints_every_setting_with_its_default_and_meaning():
    result = subprocess.run([sys.executable, str(REPO / "train_moe.py"), "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and result.stderr == ""
    defaults = settings_help.setting_defaults()
    assert len(defaults) > 70 and defaults["ITERATIONS"] == "20000" and defaults["MLP_MODE"] == "sparse"
    meanings = settings_help.setting_meanings((REPO / "docs" / "configuration.md").read_text())
    assert sorted(meanings) == sorted(defaults)  # a row for every setting the trainer reads, none for another name
    text = result.stdout
    for name, default in defaults.items():
        doc_default, meaning = meanings[name]
        shown = default or f"({doc_default})"
        first_words = " ".join(meaning.replace("`", "").split()[:3])
        assert re.search(rf"^  {name}={re.escape(shown)}  {re.escape(first_words)}", text, re.M), name
        if " " not in doc_default and not re.search("[A-Z]", doc_default) and "," not in doc_default:
            literal = doc_default.strip("`")  # the docs' default, where it is one value, is the trainer's
            assert (float(literal) == float(default)) if re.fullmatch(r"[\d.e+-]+", literal) else literal == default, name


def test_arguments_are_refused_with_one_line_naming_them(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "train_moe.py"), "--iterations", "3"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == "" and list(tmp_path.iterdir()) == []
    assert result.stderr == ("config_error: --iterations 3: train_moe.py takes no arguments; its settings are environment "
                             "variables (python train_moe.py --help lists them)\n")


def test_a_silent_stage_gets_a_progress_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "logs").mkdir()
    log = tm.RunLog(SimpleNamespace(run_id="quiet", wandb=0), True, tmp_path / "logs" / "quiet.txt", tmp_path / "logs" / "quiet.jsonl")
    try:
        log.begin("export", method="rtn")
        log.beat(log.last_line + tm.PROGRESS_SECONDS - 1)  # not yet
        log.done = 7
        log.beat(log.last_line + tm.PROGRESS_SECONDS)
        log.beat(log.last_line + 1)  # the progress line counts as a line
    finally:
        log.close()
    lines = (tmp_path / "logs" / "quiet.txt").read_text().splitlines()
    assert lines[0] == "export_start method:rtn" and len(lines) == 2
    assert re.fullmatch(rf"progress stage:export elapsed_s:{tm.PROGRESS_SECONDS} done:7", lines[1]), lines[1]
    assert capsys.readouterr().out.splitlines() == lines
