"""moe-golf trainer: a Parameter Golf language model in one file (16,000,000-byte artifact, val_bpb on FineWeb).

Launch:  RUN_ID=x DATA_PATH=... torchrun --standalone --nproc_per_node=8 train_moe.py   (or: python train_moe.py)
Every knob is an environment variable read once at start (`python train_moe.py --help`; docs/configuration.md). Bad
values or data stop the run with one `config_error:` line (exit 2) before any file is touched or anything compiled; a
loss gone non-finite ends it with `error:` and exit 3, an artifact over the cap with exit 4 after it is scored, Ctrl-C
or SIGTERM with 130 or 143. A run's files take their final names only once it has succeeded (docs/integrity.md).
"""
from __future__ import annotations

import signal

# A signal during the imports is kept for main to raise: raised mid-import it gave a traceback (SIGTERM: nothing).
STOPPED_IMPORTING = []
if __name__ == "__main__":
    for _signal in (signal.SIGINT, signal.SIGTERM):
        signal.signal(_signal, lambda signum, frame: STOPPED_IMPORTING.append(signum))

import ast
import contextlib
import copy
import difflib
import fcntl
import glob
import hashlib
import importlib.metadata
import importlib.util
import inspect
import io
import itertools
import json
import math
import netrc
import os
import platform
import re
import resource
import shlex
import subprocess
import sys
import threading
import time
import traceback
import urllib.parse
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

# Passive OpenMP waits: a quick-start step on 2 busy cores took 2.9-3.2 s, spinning 11.7-15.8 s (idle: 1.7, 1.1-1.25 s).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import numpy as np
import sentencepiece as spm
import torch
import torch._inductor.config
import torch.distributed as dist
import torch.nn.functional as F
import brotli
import pyppmd
from torch import Tensor, nn
from tqdm import tqdm
from torch.nn.parallel import DistributedDataParallel as DDP

try:  # QuACK (requirements-gpu.txt): Hopper grouped GEMMs for the experts; absent on CPU machines
    from quack import activation as quack_activation, gemm_interface as quack
    from cutlass.cutlass_dsl import dsl_user_op

    @dsl_user_op
    def leaky_relu_sq(x, *, loc=None, ip=None):
        """LeakyReLU(0.5)^2 for QuACK's epilogues, which have relu^2 but not it: ((x + relu(x)) / 2)^2."""
        if isinstance(x, tuple):
            return tuple(leaky_relu_sq(v, loc=loc, ip=ip) for v in x)
        y = 0.5 * (x + quack_activation.relu(x, loc=loc, ip=ip))
        return y * y

    @dsl_user_op
    def dleaky_relu_sq(x, dout, *, loc=None, ip=None):
        """(its gradient, the forward), as QuACK's dact functions return them: 2x above 0, x/2 below."""
        if isinstance(x, tuple):
            pairs = [dleaky_relu_sq(v, d, loc=loc, ip=ip) for v, d in zip(x, dout)]
            return tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)
        relu = quack_activation.relu(x, loc=loc, ip=ip)
        y = 0.5 * (x + relu)
        return dout * (0.5 * x + 1.5 * relu), y * y

    # QuACK's epilogue tables, not its public interface (quack-kernels 0.6.5).
    quack_activation.act_fn_map["leaky_relu_sq"] = leaky_relu_sq
    quack_activation.dact_fn_map["leaky_relu_sq"] = dleaky_relu_sq
    QUACK_IMPORT_ERROR = ""
except Exception as e:  # ImportError, or a CUTLASS DSL that finds no CUDA toolkit it can load
    quack, QUACK_IMPORT_ERROR = None, f"{type(e).__name__}: {e}"

# -----------------------------------------------------------------------------
# HYPERPARAMETERS
# -----------------------------------------------------------------------------

MLP_MODES = ("dense", "sparse", "shared_routed", "soft")
ROUTERS = ("softmax", "sigmoid", "sqrtsoftplus", "hash")
ACTIVATIONS = ("relu2", "leaky_relu2", "swiglu")  # of MLPs and experts (swiglu: experts only)
QUANT_BITS = (4, 5, 6, 7, 8)
# Read outside Hyperparameters: not misspellings of a setting.
OTHER_SETTINGS = ("WANDB_PROJECT",)
# The trainer as a record ships it: a script that decompresses this source and runs it, as the records' code wrappers
# (PR #1412: 78,688 code bytes to 23,095). This file at 146,610 bytes: PPMd order 16 34,740, bz2-9 39,691, brotli-11
# 39,753, lzma-9e 41,300; a latin-1 literal escapes 2% where base85 adds 25%.
CODE_HEAD = b"#coding:latin-1\nimport pyppmd\nexec(compile(pyppmd.decompress("
CODE_TAIL = re.compile(rb"\.encode\('latin-1'\),max_order=(\d+)\),'train_moe\.py','exec'\)\)\n\Z")
LITERAL_ESCAPES = str.maketrans({"\\": "\\\\", "'": "\\'", "\n": "\\n", "\r": "\\r"})


def pack_code(source: bytes) -> bytes:
    """The script at the highest PPMd order from 16 that gives `source` back: pyppmd 1.3.1 gives back another text, or
    raises, for about 2% of this file's rotations at order 16 (10 of 600), and each of those round-trips at 15 or 14."""
    for order in range(16, 1, -1):
        packed = pyppmd.compress(source, max_order=order)
        with contextlib.suppress(ValueError):
            if pyppmd.decompress(packed, max_order=order) == source:
                break
    else:
        raise ValueError("PPMd gives back no order's source")
    text = packed.decode("latin-1").translate(LITERAL_ESCAPES)
    text = re.sub("\x00(?![0-7])", r"\\0", text).replace("\x00", r"\000")  # no NUL byte may stand in a source file
    return CODE_HEAD + f"'{text}'".encode("latin-1") + f".encode('latin-1'),max_order={order}),'train_moe.py','exec'))\n".encode()


def unpack_code(script: bytes) -> bytes:
    """The source a pack_code script holds; any other file is its own source."""
    tail = CODE_TAIL.search(script)
    if script.startswith(CODE_HEAD) and tail:
        try:
            literal = ast.literal_eval(script[len(CODE_HEAD) : tail.start()].decode("latin-1"))
        except SyntaxError as e:
            raise ValueError(f"the packed source is not a string literal ({e.msg})") from None
        if not isinstance(literal, str):
            raise ValueError("the packed source is not a string literal")
        return pyppmd.decompress(literal.encode("latin-1"), max_order=int(tail[1]))
    return script


SOURCE = unpack_code(Path(__file__).read_bytes())  # what the log embeds; pack_code(SOURCE) counts against the cap


class ConfigError(ValueError):
    pass


class RunFailed(RuntimeError):
    """A run that must not look finished: one `error:` line and this exit status (3 non-finite, 4 over the cap)."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class Interrupted(KeyboardInterrupt):  # SIGINT or SIGTERM; a KeyboardInterrupt, so no `except Exception` swallows it
    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.status = 128 + signum


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class EnvReader:
    """Typed, range-checked reads of environment variables; every failure names the variable."""

    def __init__(self, env):
        self.env, self.given, self.names, self.texts = env, {}, set(), {}

    def text(self, name, default):
        self.names.add(name)
        if name in self.env:
            self.given[name] = self.env[name]
        self.texts[name] = self.env.get(name, str(default)).strip()
        return self.texts[name]

    def integer(self, name, default, lo=None, hi=None):
        raw = self.text(name, default)
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"{name}={raw!r}: expected an integer{_range_text(lo, hi)}") from None
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise ConfigError(f"{name}={raw!r}: expected an integer{_range_text(lo, hi)}")
        return value

    def number(self, name, default, lo=None, hi=None, above=None, below=None):
        """A finite float in [lo, hi]; `above`/`below` are exclusive bounds (Adam's betas below 1, eps above 0)."""
        raw = self.text(name, default)
        allowed = _range_text(lo, hi, above, below)
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{name}={raw!r}: expected a number{allowed}") from None
        if (not math.isfinite(value) or (lo is not None and value < lo) or (hi is not None and value > hi)
                or (above is not None and value <= above) or (below is not None and value >= below)):
            raise ConfigError(f"{name}={raw!r}: expected a finite number{allowed}")
        return value

    def choice(self, name, default, allowed):
        raw = self.text(name, default)
        if raw not in [str(a) for a in allowed]:
            raise ConfigError(f"{name}={raw!r}: allowed values are {', '.join(str(a) for a in allowed)}")
        return type(allowed[0])(raw)

    def flag(self, name, default):
        return bool(self.choice(name, default, (0, 1)))

    def misspelt(self) -> list[str]:
        """Settings-like names in the environment that are not settings but nearly spell one (MLP_MDOE)."""
        warnings = []
        for name in sorted(self.env):
            if re.fullmatch(r"[A-Z][A-Z0-9_]*", name) and name not in self.names and name not in OTHER_SETTINGS:
                if close := difflib.get_close_matches(name, self.names, n=1, cutoff=0.85):
                    warnings.append(f"{name} is not a setting and is ignored; did you mean {close[0]}?")
        return warnings


def _round8(x: float) -> int:
    return max(8, int(x) // 8 * 8)


def parse_layers(name: str, spec: str, num_layers: int) -> tuple[int, ...]:
    """A set of blocks: "all", "none", "odd" (1, 3, 5, ...), or indices and ranges such as "1,3,5-8" (0-based, inclusive)."""
    if spec in ("all", "none"):
        return tuple(range(num_layers)) if spec == "all" else ()
    if spec == "odd":
        if num_layers < 2:
            raise ConfigError(f"{name}=odd: NUM_LAYERS={num_layers} has no odd layer; use all or 0")
        return tuple(range(1, num_layers, 2))
    ranges = [re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part) for part in spec.split(",")]
    if not all(ranges) or any(r[2] and int(r[2]) < int(r[1]) for r in ranges):  # "1-" was read as 1, "3-1" as nothing
        raise ConfigError(f"{name}={spec!r}: expected all, none, odd, or layer indices and ranges like 1,3,5-8")
    if max(int(r[2] or r[1]) for r in ranges) >= num_layers:
        raise ConfigError(f"{name}={spec!r}: layers must lie in [0, NUM_LAYERS-1={num_layers - 1}]")
    return tuple(sorted({layer for r in ranges for layer in range(int(r[1]), int(r[2] or r[1]) + 1)}))


def check_wandb(cfg) -> None:
    """WANDB=1 needs wandb and credentials (WANDB_API_KEY, `wandb login`) or WANDB_MODE=offline, checked up front."""
    if cfg.wandb and importlib.util.find_spec("wandb") is None:
        raise ConfigError("WANDB=1: wandb is not installed (pip install wandb)")
    env, host = os.environ, urllib.parse.urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    with contextlib.suppress(OSError, netrc.NetrcParseError):  # no netrc file, or not one netrc reads
        if not cfg.wandb or env.get("WANDB_MODE") in ("offline", "disabled") or env.get("WANDB_API_KEY") or \
                netrc.netrc(env.get("NETRC")).authenticators(host):
            return
    raise ConfigError(f"WANDB=1: no wandb credentials for {host}; set WANDB_API_KEY, run `wandb login`, or WANDB_MODE=offline")


def _range_text(lo=None, hi=None, above=None, below=None):
    low = f"[{lo}" if lo is not None else (f"({above}" if above is not None else None)
    high = f"{hi}]" if hi is not None else (f"{below})" if below is not None else None)
    if low and high:
        return f" in {low}, {high}"
    if low:
        return f" >= {lo}" if lo is not None else f" > {above}"
    return f" <= {hi}" if hi is not None else (f" < {below}" if below is not None else "")


class Hyperparameters:
    def __init__(self, env=os.environ):
        get = EnvReader(env)
        # Run and data: names and defaults as the challenge's train_gpt.py. Bounds are wide but finite: what passes runs
        self.run_id = get.text("RUN_ID", "")
        if self.run_id and not re.fullmatch(r"[A-Za-z0-9._-]{1,200}", self.run_id):
            raise ConfigError(f"RUN_ID={self.run_id!r}: up to 200 letters, digits, '.', '_' and '-' (it names files)")
        self.data_path = get.text("DATA_PATH", "./data/datasets/fineweb10B_sp1024")
        self.tokenizer_path = get.text("TOKENIZER_PATH", "./data/tokenizers/fineweb_1024_bpe.model")
        self.seed = get.integer("SEED", 1337, 0, 2**31 - 1)
        self.iterations = get.integer("ITERATIONS", 20000, 1, 10**9)
        self.warmup_steps = get.integer("WARMUP_STEPS", 20, 0, 10**5)
        self.warmdown_iters = get.integer("WARMDOWN_ITERS", 1200, 0, 10**9)
        self.max_wallclock_seconds = get.number("MAX_WALLCLOCK_SECONDS", 600, 0, 10**7)
        self.train_batch_tokens = get.integer("TRAIN_BATCH_TOKENS", 524288, 1, 2**30)
        self.train_seq_len = get.integer("TRAIN_SEQ_LEN", 1024, 2, 2**16)
        self.train_log_every = get.integer("TRAIN_LOG_EVERY", 200, 1)
        self.val_loss_every = get.integer("VAL_LOSS_EVERY", 1000, 0)
        self.val_batch_size = get.integer("VAL_BATCH_SIZE", 524288, 1, 2**30)
        self.eval_stride = get.integer("EVAL_STRIDE", 0, 0)
        self.compile = get.flag("COMPILE", 1)
        # The compiled step replayed as CUDA graphs (torch.compile's reduce-overhead), on one GPU: QuACK's host dispatch
        # (0.25-0.47 ms a call) left an H100 idle 10.7 ms a step in the default MoE and 24.5 in sparse, 7.8 in dense.
        # Replayed, the default's step went from 1.045x dense to 1.034x and sparse's from 1.21-1.25x to 1.20x.
        self.cuda_graphs = get.flag("CUDA_GRAPHS", 1)
        # auto: QuACK's expert GEMMs where they run (sm90 and the package), else torch._grouped_mm, the CPU and
        # reference path. Not a model setting: both compute the same model.
        self.expert_kernel = get.choice("EXPERT_KERNEL", "auto", ("auto", "quack", "torch"))
        self.wandb = get.flag("WANDB", 0)
        # Model.
        model_start = len(get.texts)
        self.vocab_size = get.integer("VOCAB_SIZE", 1024, 2, 65536)
        self.num_layers = get.integer("NUM_LAYERS", 9, 1, 256)
        self.model_dim = get.integer("MODEL_DIM", 512, 2, 2**16)
        self.num_heads = get.integer("NUM_HEADS", 8, 1, 1024)
        self.num_kv_heads = get.integer("NUM_KV_HEADS", 4, 1, 1024)
        # docs/study.md's winner: 16 experts of 256, top-2, every other block, bits fitted to the cap: 0.018-0.022
        # val_bpb under the dense baseline (8 experts at 6/5/5 bits: 0.007).
        self.mlp_mode = get.choice("MLP_MODE", "sparse", MLP_MODES)
        self.mlp_mult = get.integer("MLP_MULT", 2, 1, 64)
        # LeakyReLU(0.5)² in every MLP, XSA on the last 4 blocks, MuonEq-R with Polar Express and Muon weight decay 0.04:
        # the third study's finalists, two seeds each on H100s: dense 0.019 better at 65 s, the MoE on them 0.014
        # better than that dense at 65 s and 0.017 at 180 s (docs/study.md).
        self.mlp_act = get.choice("MLP_ACT", "leaky_relu2", ACTIVATIONS[:2])  # of the dense MLPs
        # Mixture of experts (MLP_MODE other than dense). Sizes of 0 mean "the dense MLP's active FLOPs".
        self.moe_layers = parse_layers("MOE_LAYERS", get.text("MOE_LAYERS", "odd"), self.num_layers)
        self.num_experts = get.integer("NUM_EXPERTS", 16, 2, 256)
        self.top_k = get.integer("TOP_K", 2, 1, 256)
        self.expert_hidden = get.integer("EXPERT_HIDDEN", _round8(self.model_dim / 2), 0, 2**16)  # 256 at 512 wide
        self.expert_act = get.choice("EXPERT_ACT", "leaky_relu2", ACTIVATIONS)
        self.shared_hidden = get.integer("SHARED_HIDDEN", 0, 0, 2**16)
        self.shared_gate = get.flag("SHARED_GATE", 1)
        self.router = get.choice("ROUTER", "softmax", ROUTERS)
        self.norm_topk_prob = get.flag("NORM_TOPK_PROB", 0)  # sqrtsoftplus always normalizes, as DeepSeek-V4
        # DeepSeek-V4: the first HASH_LAYERS MoE layers choose experts by token id but weigh them by ROUTER's scores;
        # every score-weighted router's weights are multiplied by ROUTE_SCALE (V4's 284B config: 1.5).
        self.hash_layers = get.integer("HASH_LAYERS", 0, 0, 256)
        self.route_scale = get.number("ROUTE_SCALE", 1.0, above=0.0, hi=100.0)
        self.swiglu_limit = get.number("SWIGLU_LIMIT", 0.0, 0.0, 1e4)  # 0: off; V4 clamps expert SwiGLUs at 10
        self.moe_aux_coef = get.number("MOE_AUX_COEF", 0.01, 0.0, 100.0)
        self.router_z_coef = get.number("ROUTER_Z_COEF", 0.001, 0.0, 100.0)
        self.router_bias_rate = get.number("ROUTER_BIAS_RATE", 0.001, 0.0, 1.0)
        self.router_alert_min_load = get.number("ROUTER_ALERT_MIN_LOAD", 0.1, 0.0, 1.0)  # least-used expert / fair load
        self.router_alert_patience = get.integer("ROUTER_ALERT_PATIENCE", 50, 0)  # steps under it before alerting
        self.tie_embeddings = get.flag("TIE_EMBEDDINGS", 1)
        self.rope_base = get.number("ROPE_BASE", 10000.0, 1.0, 1e9)
        self.logit_softcap = get.number("LOGIT_SOFTCAP", 30.0, 0.0, 1e4)
        self.qk_gain_init = get.number("QK_GAIN_INIT", 1.5, 0.0, 100.0)
        self.tied_embed_init_std = get.number("TIED_EMBED_INIT_STD", 0.005, 0.0, 10.0)
        # The record stack's model techniques (../shared/docs/reference.md 7; each is credited where it is built).
        self.rope_dims = get.integer("ROPE_DIMS", 0, 0, 2**16)  # rotary on the first N dims of each head; 0: all
        self.xsa_last_n = get.integer("XSA_LAST_N", min(4, self.num_layers), 0, 256)
        self.ln_scale = get.flag("LN_SCALE", 0)
        self.smear_gate = get.flag("SMEAR_GATE", 0)
        self.bos_id = get.integer("BOS_ID", 1, 0, 65535)  # where a document starts: SMEAR_GATE and BIGRAM don't cross it
        self.bigram_buckets = get.integer("BIGRAM_BUCKETS", 0, 0, 2**20)  # 0: no BigramHash embedding
        self.bigram_dim = get.integer("BIGRAM_DIM", 128, 1, 2**16)
        self.attn_gate = get.flag("ATTN_GATE", 0)
        self.parallel_layers = parse_layers("PARALLEL_LAYERS", get.text("PARALLEL_LAYERS", "none"), self.num_layers)
        self.recur_layers = parse_layers("RECUR_LAYERS", get.text("RECUR_LAYERS", "none"), self.num_layers)
        self.recur_loops = get.integer("RECUR_LOOPS", 1, 1, 16)
        # What rebuilds this model from its artifact, defaults included (they may change): SEED makes the hash tables.
        self.model_settings = {"SEED": get.texts["SEED"], **dict(list(get.texts.items())[model_start:])}
        # Optimizer. LRs are unbounded: a run they diverge stops at its first non-finite loss.
        self.embed_lr = get.number("EMBED_LR", 0.6, 0.0)
        self.head_lr = get.number("HEAD_LR", 0.008, 0.0)
        self.tied_embed_lr = get.number("TIED_EMBED_LR", 0.05, 0.0)
        self.matrix_lr = get.number("MATRIX_LR", 0.04, 0.0)
        self.scalar_lr = get.number("SCALAR_LR", 0.04, 0.0)
        self.router_lr = get.number("ROUTER_LR", 0.001, 0.0)
        self.muon_momentum = get.number("MUON_MOMENTUM", 0.95, 0.0, 1.0)
        self.muon_backend_steps = get.integer("MUON_BACKEND_STEPS", 5, 1, 100)
        self.muon_momentum_warmup_start = get.number("MUON_MOMENTUM_WARMUP_START", 0.85, 0.0, 1.0)
        self.muon_momentum_warmup_steps = get.integer("MUON_MOMENTUM_WARMUP_STEPS", 500, 0)
        self.beta1 = get.number("BETA1", 0.9, 0.0, below=1.0)
        self.beta2 = get.number("BETA2", 0.95, 0.0, below=1.0)
        self.adam_eps = get.number("ADAM_EPS", 1e-8, above=0.0, hi=1.0)  # 0 divides 0 by 0 where a gradient is 0
        self.grad_clip_norm = get.number("GRAD_CLIP_NORM", 0.0, 0.0)
        self.ema_decay = get.number("EMA_DECAY", 0.997, 0.0, below=1.0)
        self.muon_wd = get.number("MUON_WD", 0.04, 0.0, 10.0)
        self.muon_eq_r = get.flag("MUON_EQ_R", 1)
        self.muon_polar_express = get.flag("MUON_POLAR_EXPRESS", 1)
        self.min_lr = get.number("MIN_LR", 0.0, 0.0, 1.0)  # floor of the warmdown's LR scale
        self.recur_start_frac = get.number("RECUR_START_FRAC", 0.35, 0.0, below=1.0)  # of training, as the warmdown counts
        # Export.
        self.quant_embed_bits = get.choice("QUANT_EMBED_BITS", 8, QUANT_BITS)
        self.quant_attn_bits = get.choice("QUANT_ATTN_BITS", 6, QUANT_BITS)
        self.quant_mlp_bits = get.choice("QUANT_MLP_BITS", 5, QUANT_BITS)
        self.quant_expert_bits = get.choice("QUANT_EXPERT_BITS", 5, QUANT_BITS)
        self.quant_bits = {"embed": self.quant_embed_bits, "attn": self.quant_attn_bits, "mlp": self.quant_mlp_bits,
                           "experts": self.quant_expert_bits}  # per category, with QUANT_FIT=0
        self.artifact_limit_bytes = get.integer("ARTIFACT_LIMIT_BYTES", 16_000_000, 1)
        self.quant_method = get.choice("QUANT_METHOD", "gptq" if torch.cuda.is_available() else "rtn", ("gptq", "rtn"))
        self.quant_clip_sigmas = get.number("QUANT_CLIP_SIGMAS", 0.0, 0.0, 64.0)
        self.quant_fit = get.flag("QUANT_FIT", 1)  # QUANT_*_BITS apply with QUANT_FIT=0
        self.quant_fit_margin_bytes = get.integer("QUANT_FIT_MARGIN_BYTES", 50_000, 0)
        # The calibration sequences' share the fit scores its options on. A quarter, on a 65 s H100 MoE run: 37 more steps
        # (fit 1.4 s, not 4.1), the same gap (0.0011), 0.015 better; at 180 s a gap of 0.0027 against 0.0016 (one run).
        self.quant_fit_share = get.number("QUANT_FIT_SHARE", 0.25, above=0.0, hi=1.0)
        self.gptq_damp = get.number("GPTQ_DAMP", 0.01, above=0.0, hi=10.0)
        self.lqer_rank = get.integer("LQER_RANK", 0, 0, 64)  # 0: no low-rank correction of the quantization error
        self.lqer_tensors = get.integer("LQER_TENSORS", 3, 1, 1024)
        self.calibration_tokens = get.integer("CALIBRATION_TOKENS", 131072, 1, 2**24)
        self.save_fp32 = get.flag("SAVE_FP32", 0)
        self.calibrates = self.quant_method == "gptq" or bool(self.quant_fit)  # on training batches, in training time
        # Set by torchrun. WORLD_SIZE x GRAD_ACCUM micro-batches, as the baseline: 1-8 GPUs see the same batches. One
        # GPU with a smaller batch wants fewer, fuller ones: 16K-token ones left an H100 a third idle.
        self.world_size = get.integer("WORLD_SIZE", 1, 1, 8)
        self.rank = get.integer("RANK", 0, 0, self.world_size - 1)
        self.local_rank = get.integer("LOCAL_RANK", 0, 0, self.world_size - 1)
        self.grad_accum_steps = get.integer("GRAD_ACCUM_STEPS", 8 // self.world_size, 1, 2**16)
        if self.world_size > 1 and not all(k in env for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")):
            raise ConfigError(f"WORLD_SIZE={self.world_size}: set by torchrun with RANK, LOCAL_RANK, MASTER_ADDR and "
                              f"MASTER_PORT; launch with torchrun --standalone --nproc_per_node={self.world_size}")
        # The command that reproduces this run: every knob that was set, then the launcher.
        self.settings = {k: v for k, v in get.given.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
        knobs = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.settings.items())
        launcher = "python" if "RANK" not in env else f"torchrun --standalone --nproc_per_node={self.world_size}"
        self.launch = f"{knobs} {launcher} train_moe.py".strip()
        self.warnings = get.misspelt()
        self._check_shapes()
        self._check_moe()
        if self.calibrates and self.calibration_tokens < self.train_seq_len:
            raise ConfigError(f"CALIBRATION_TOKENS={self.calibration_tokens}: at least one sequence, TRAIN_SEQ_LEN={self.train_seq_len}")
        self._resolve_expert_kernel()

    def _check_shapes(self):
        if self.model_dim % self.num_heads:
            raise ConfigError(f"MODEL_DIM={self.model_dim}: must be divisible by NUM_HEADS={self.num_heads}")
        if (self.model_dim // self.num_heads) % 2:
            raise ConfigError(f"MODEL_DIM={self.model_dim}: MODEL_DIM/NUM_HEADS must be even for RoPE")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"NUM_HEADS={self.num_heads}: must be divisible by NUM_KV_HEADS={self.num_kv_heads}")
        micro = self.world_size * self.grad_accum_steps * self.train_seq_len
        if self.train_batch_tokens % micro:
            raise ConfigError(f"TRAIN_BATCH_TOKENS={self.train_batch_tokens}: must be a multiple of WORLD_SIZE x "
                              f"GRAD_ACCUM_STEPS x TRAIN_SEQ_LEN = {self.world_size} x {self.grad_accum_steps} x "
                              f"{self.train_seq_len} = {micro}")
        if self.val_batch_size < self.world_size * self.train_seq_len:
            raise ConfigError(f"VAL_BATCH_SIZE={self.val_batch_size}: must be at least WORLD_SIZE x TRAIN_SEQ_LEN = "
                              f"{self.world_size * self.train_seq_len}")
        if self.eval_stride > self.train_seq_len:
            raise ConfigError(f"EVAL_STRIDE={self.eval_stride}: must be in [0, TRAIN_SEQ_LEN={self.train_seq_len}]")
        head_dim = self.model_dim // self.num_heads
        if self.rope_dims % 2 or self.rope_dims > head_dim:
            raise ConfigError(f"ROPE_DIMS={self.rope_dims}: an even number of dims up to the head's {head_dim} (0: all)")
        if self.xsa_last_n > self.num_layers:
            raise ConfigError(f"XSA_LAST_N={self.xsa_last_n}: more than NUM_LAYERS={self.num_layers}")
        if (self.smear_gate or self.attn_gate) and self.model_dim < GATE_INPUTS:
            raise ConfigError(f"MODEL_DIM={self.model_dim}: SMEAR_GATE and ATTN_GATE read {GATE_INPUTS} channels")
        if self.bigram_buckets == 1:
            raise ConfigError("BIGRAM_BUCKETS=1: at least 2 (one is the bucket of a document's first token), or 0")
        span = self.recur_layers
        if span and (span != tuple(range(span[0], span[-1] + 1)) or span[-1] == self.num_layers - 1):
            raise ConfigError(f"RECUR_LAYERS={','.join(map(str, span))}: one span of consecutive layers before the last, like 3-5")

    def _check_moe(self):
        if self.mlp_mode == "dense":
            return
        if not self.moe_layers:
            raise ConfigError(f"MOE_LAYERS=none: MLP_MODE={self.mlp_mode} needs at least one MoE layer (or MLP_MODE=dense)")
        dense_hidden = self.mlp_mult * self.model_dim
        if self.top_k > self.num_experts:
            raise ConfigError(f"TOP_K={self.top_k}: must be at most NUM_EXPERTS={self.num_experts}")
        if self.mlp_mode == "soft" and self.router != "softmax":
            raise ConfigError(f"ROUTER={self.router}: MLP_MODE=soft gates every expert with a softmax; only softmax applies")
        if self.hash_layers and (self.router == "hash" or self.mlp_mode == "soft"):
            raise ConfigError(f"HASH_LAYERS={self.hash_layers}: its layers weigh the hashed experts by router scores; "
                              f"ROUTER={self.router} MLP_MODE={self.mlp_mode} has none (use ROUTER=hash for all-hash routing)")
        if self.hash_layers > len(self.moe_layers):
            raise ConfigError(f"HASH_LAYERS={self.hash_layers}: more than the {len(self.moe_layers)} MoE layers of MOE_LAYERS")
        if self.swiglu_limit and self.expert_act != "swiglu":
            raise ConfigError(f"SWIGLU_LIMIT={self.swiglu_limit:g}: clamps SwiGLU experts; EXPERT_ACT={self.expert_act}")
        normalized = [n for n, on in (("NORM_TOPK_PROB=1", self.norm_topk_prob), ("ROUTER=sqrtsoftplus", self.router == "sqrtsoftplus"),
                                      (f"HASH_LAYERS={self.hash_layers}", self.hash_layers)) if on]
        if self.top_k == 1 and normalized and self.mlp_mode != "soft" and self.router != "hash":
            raise ConfigError(f"{normalized[0]}: with TOP_K=1 every normalized weight becomes 1 and the LM loss gives the "
                              f"router no gradient; use TOP_K=2 (or NORM_TOPK_PROB=0: Switch keeps the raw probability)")
        # SwiGLU has three matrices to relu^2's two: 2/3 of the hidden size costs the same FLOPs.
        scale = 2 / 3 if self.expert_act == "swiglu" else 1.0
        if self.mlp_mode == "shared_routed" and not self.shared_hidden:
            self.shared_hidden = _round8(dense_hidden // 2 * scale)
        if not self.expert_hidden:
            routed = dense_hidden - (self.shared_hidden / scale if self.mlp_mode == "shared_routed" else 0)
            per_expert = routed / (self.num_experts if self.mlp_mode == "soft" else self.top_k)
            self.expert_hidden = _round8(per_expert * scale)
        # Grouped matmuls need 16-byte row strides: multiples of 8 bf16 values.
        for name in ("model_dim", "expert_hidden", "shared_hidden"):
            if getattr(self, name) % 8:
                raise ConfigError(f"{name.upper()}={getattr(self, name)}: must be a multiple of 8 for the expert matmuls")

    def _resolve_expert_kernel(self):
        unusable = ("needs a CUDA GPU of compute capability 9.0 (Hopper)" if not torch.cuda.is_available()
                    or torch.cuda.get_device_capability() != (9, 0) else
                    f"needs the quack-kernels package (pip install -r requirements-gpu.txt): {QUACK_IMPORT_ERROR}"
                    if quack is None else "QuACK's SwiGLU has no clamp for SWIGLU_LIMIT" if self.swiglu_limit else "")
        if self.expert_kernel == "quack" and unusable:
            raise ConfigError(f"EXPERT_KERNEL=quack: {unusable}")
        self.expert_kernel = "torch" if unusable or self.expert_kernel == "torch" else "quack"

    def check_inputs(self) -> tuple[spm.SentencePieceProcessor, Tensor]:
        """What can fail before training, before any file is touched: data, tokenizer, folders, memory -> (sp, val)."""
        for split in ("train", "val"):
            files = sorted(glob.glob(os.path.join(self.data_path, f"fineweb_{split}_*.bin")))
            if not files:
                raise ConfigError(f"DATA_PATH={self.data_path!r}: no fineweb_{split}_*.bin shards there")
            for file in files:
                try:
                    read_shard_header(file)
                except (ValueError, OSError) as e:  # OSError: a folder named like a shard, an unreadable file
                    reason = e if isinstance(e, ValueError) else f"{file}: {e.strerror}"
                    raise ConfigError(f"DATA_PATH={self.data_path!r}: {reason}") from None
            if split == "train":  # later shards are checked as training reaches them
                check_token_range(load_data_shard(files[0]), self.vocab_size, files[0])
        if not os.path.isfile(self.tokenizer_path):
            raise ConfigError(f"TOKENIZER_PATH={self.tokenizer_path!r}: no such file")
        try:
            sp = spm.SentencePieceProcessor(model_file=self.tokenizer_path)
        except Exception as e:  # sentencepiece raises bare RuntimeError/OSError on a bad model file
            raise ConfigError(f"TOKENIZER_PATH={self.tokenizer_path!r}: not a SentencePiece model ({e})") from None
        if sp.vocab_size() != self.vocab_size:
            raise ConfigError(f"VOCAB_SIZE={self.vocab_size}: the tokenizer {self.tokenizer_path} has "
                              f"{sp.vocab_size()} pieces")
        if (self.smear_gate or self.bigram_buckets) and sp.bos_id() != self.bos_id:
            raise ConfigError(f"BOS_ID={self.bos_id}: the tokenizer's BOS, which starts every document, is {sp.bos_id()}")
        # The artifact records its tokenizer's path and hash: the tools find it and refuse another.
        self.model_settings.update(TOKENIZER_PATH=self.tokenizer_path,
                                   TOKENIZER_SHA256=hashlib.sha256(Path(self.tokenizer_path).read_bytes()).hexdigest())
        val_tokens = load_val_tokens(self)
        for folder in ("logs", "artifacts"):
            path = Path(folder)
            if (path.exists() and not path.is_dir()) or not os.access(path if path.exists() else ".", os.W_OK | os.X_OK):
                raise ConfigError(f"RUN_ID={self.run_id!r}: {path.resolve()} is not a writable folder for this run's files")
        code_bytes = len(pack_code(SOURCE))
        if self.artifact_limit_bytes <= code_bytes:
            raise ConfigError(f"ARTIFACT_LIMIT_BYTES={self.artifact_limit_bytes}: the packed trainer alone is {code_bytes} bytes")
        if self.quant_fit and self.artifact_limit_bytes <= code_bytes + self.quant_fit_margin_bytes:
            raise ConfigError(f"QUANT_FIT_MARGIN_BYTES={self.quant_fit_margin_bytes}: with the packed trainer's {code_bytes} "
                              f"bytes it leaves no room for the model under ARTIFACT_LIMIT_BYTES={self.artifact_limit_bytes}")
        if torch.cuda.is_available() and self.local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK={self.local_rank}: this machine has {torch.cuda.device_count()} GPUs")
        self._check_memory()
        return sp, val_tokens

    def _check_memory(self):
        """Weights, gradients, optimizer state and EMA (~20 bytes per parameter) must fit the device."""
        with torch.device("meta"):
            params = sum(p.numel() for p in GPT(self).parameters())
        if torch.cuda.is_available():
            device, capacity = torch.cuda.get_device_name(self.local_rank), torch.cuda.get_device_properties(self.local_rank).total_memory
        else:
            device, capacity = "this machine's memory", os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        if 20 * params > capacity:
            raise ConfigError(f"MODEL_DIM={self.model_dim}: this model has {params:,} parameters; their weights, gradients "
                              f"and optimizer state need ~{20 * params / 2**30:,.0f} GiB, more than the "
                              f"{capacity / 2**30:,.0f} GiB of {device}")


# -----------------------------------------------------------------------------
# OPTIMIZER: Muon for block matrices, Adam for the rest
# -----------------------------------------------------------------------------

# Polar Express (2026-04-23 PolarNS_MinLR record): a quintic per iteration, fitted to reach the polar factor in 5.
POLAR_EXPRESS = ((8.156554524902461, -22.48329292557795, 15.878769915207462),
                 (4.042929935166739, -2.808917465908714, 0.5000178451051316),
                 (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
                 (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
                 (2.3465413258596377, -1.7097828382687081, 0.42323551169305323))


def newton_schulz(grad: Tensor, steps: int, polar_express: bool = False, eps: float = 1e-7) -> Tensor:
    """Nearest semi-orthogonal matrix (batched), roughly: a quintic pushing singular values into [0.7, 1.2] fast."""
    coefficients = POLAR_EXPRESS[:steps] if polar_express else ((3.4445, -4.7750, 2.0315),) * steps
    x = grad.bfloat16()
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)
    for a, b, c in coefficients:
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if tall else x


class Muon(torch.optim.Optimizer):
    """Nesterov momentum, then orthogonalised updates: a batch per shape, split over ranks, shared by an all-reduce."""

    def __init__(self, params, lr: float, momentum: float, backend_steps: int, weight_decay: float = 0.0,
                 row_norm: bool = False, polar_express: bool = False):
        super().__init__(params, dict(lr=lr, momentum=momentum, backend_steps=backend_steps, weight_decay=weight_decay,
                                      row_norm=row_norm, polar_express=polar_express))

    @torch.no_grad()
    def step(self):
        distributed = dist.is_available() and dist.is_initialized()
        world, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
        for group in self.param_groups:
            params, momentum = group["params"], group["momentum"]
            starts = [0, *itertools.accumulate(p.numel() for p in params)]
            updates = torch.zeros(starts[-1], device=params[0].device, dtype=torch.float32)
            # One batch per shape: matrix by matrix, the step waited ~50 ms on kernel launches with the GPU idle.
            by_shape = {}
            for i, p in enumerate(params):
                if p.grad is not None:
                    by_shape.setdefault(p.shape, []).append(i)
            for shape, indices in by_shape.items():
                mine = indices[rank::world]
                if not mine:
                    continue
                grads = [params[i].grad for i in mine]
                buffers = [self.state[params[i]].setdefault("momentum_buffer", torch.zeros_like(params[i])) for i in mine]
                torch._foreach_mul_(buffers, momentum)
                torch._foreach_add_(buffers, grads)
                batch = torch.stack(torch._foreach_add(grads, buffers, alpha=momentum))
                if group["row_norm"]:  # MuonEq-R (2026-04-03 MuonEqR record, ~-0.001): each row to unit norm first
                    batch = batch / batch.norm(dim=-1, keepdim=True).clamp_min(1e-7)
                batch = newton_schulz(batch, group["backend_steps"], group["polar_express"])
                # Orthogonal updates of tall matrices have small entries; rescale so all layers move alike.
                batch = batch * max(1.0, shape[-2] / shape[-1]) ** 0.5
                for i, update in zip(mine, batch):
                    updates[starts[i] : starts[i + 1]] = update.flatten()
            if distributed:
                dist.all_reduce(updates)
            if group["weight_decay"]:  # decoupled, at the scheduled LR (2026-03-20 Int6SG record; 0.095 by 04-27 LQER)
                torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
            torch._foreach_add_(params, [updates[starts[i] : starts[i + 1]].view_as(p) for i, p in enumerate(params)], alpha=-group["lr"])


# -----------------------------------------------------------------------------
# METRIC: val_bpb as the challenge computes it
# -----------------------------------------------------------------------------

def build_byte_tables(sp: spm.SentencePieceProcessor, device) -> tuple[Tensor, Tensor, Tensor]:
    """Per token id: UTF-8 bytes less a leading U+2581, whether it had one, whether it is a boundary (no space owed)."""
    n = sp.vocab_size()
    base_bytes = np.zeros(n, dtype=np.int16)
    has_space = np.zeros(n, dtype=np.bool_)
    is_boundary = np.ones(n, dtype=np.bool_)
    for i in range(n):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        is_boundary[i] = False
        if sp.is_byte(i):
            base_bytes[i] = 1
            continue
        piece = sp.id_to_piece(i)
        if piece.startswith("\u2581"):
            has_space[i] = True
            piece = piece[1:]
        base_bytes[i] = len(piece.encode("utf-8"))
    return (torch.tensor(base_bytes, dtype=torch.int64, device=device),
            torch.tensor(has_space, device=device), torch.tensor(is_boundary, device=device))


def target_bytes(x: Tensor, y: Tensor, tables) -> Tensor:
    base_bytes, has_space, is_boundary = tables
    return base_bytes[y] + (has_space[y] & ~is_boundary[x]).long()


def eval_windows(num_targets: int, seq_len: int, stride: int) -> tuple[Tensor, Tensor]:
    """Window starts and how many last positions each scores: every target once, with what context the stride gives."""
    stride = stride or seq_len
    starts = list(range(0, num_targets - seq_len + 1, stride))
    if starts[-1] != num_targets - seq_len:
        starts.append(num_targets - seq_len)
    starts = torch.tensor(starts)
    scored = torch.cat([torch.tensor([seq_len]), starts.diff()])
    return starts, scored


@torch.no_grad()
def evaluate(token_losses, val_tokens: Tensor, tables, cfg: Hyperparameters, device, stride: int):
    """Return (val_loss in nats per token, val_bpb) over the whole val split, sums in float64 across ranks."""
    seq_len = cfg.train_seq_len
    starts, scored = eval_windows(val_tokens.numel() - 1, seq_len, stride)
    lo = len(starts) * cfg.rank // cfg.world_size
    hi = len(starts) * (cfg.rank + 1) // cfg.world_size
    batch = max(1, min(cfg.val_batch_size // (cfg.world_size * seq_len), hi - lo))
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss nats, tokens, bytes
    positions = torch.arange(seq_len)
    for i in range(lo, hi, batch):
        # The last batch repeats its final window with nothing scored: one shape, so one compiled graph.
        wanted = torch.arange(i, i + batch)
        windows = wanted.clamp_max(hi - 1)
        idx = starts[windows, None] + positions
        x = val_tokens[idx].to(device=device, dtype=torch.int64, non_blocking=True)
        y = val_tokens[idx + 1].to(device=device, dtype=torch.int64, non_blocking=True)
        scored_here = torch.where(wanted < hi, scored[windows], 0)
        mask = (positions >= seq_len - scored_here[:, None]).to(device)
        with autocast(device):
            losses = token_losses(x, y).float()
        sums[0] += (losses * mask).sum(dtype=torch.float64)
        sums[1] += mask.sum()
        sums[2] += (target_bytes(x, y, tables) * mask).sum(dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums)
    loss_sum, tokens, nbytes = sums.tolist()
    val_loss = loss_sum / tokens
    return val_loss, val_loss / math.log(2) * tokens / nbytes


# -----------------------------------------------------------------------------
# EXPORT: per-row quantization by tensor category, brotli, and the 16 MB check
# -----------------------------------------------------------------------------

# MOEGOLF2: the content carries its SHA-256. MOEGOLF1 artifacts had none: a flipped byte changed the weights unnoticed.
ARTIFACT_MAGIC, UNCHECKED_MAGIC = b"MOEGOLF2", b"MOEGOLF1"
CLIP_FRACTIONS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6)
QUANTIZED = ("embed", "attn", "mlp", "experts")  # the categories stored as integers, each with its QUANT_*_BITS


def tensor_category(name: str) -> str:
    """The role of a state-dict entry: it picks the optimizer (Muon for attn/mlp/experts) and the export bits."""
    if name in ("tok_emb.weight", "lm_head.weight", "bigram.table"):
        return "embed"
    if name == "bigram.proj.weight":
        return "mlp"
    if ".mlp.experts." in name:
        return "experts"
    if name.endswith((".mlp.router", ".mlp.router_bias", ".mlp.shared_gate")):
        return "router"  # quantizing routers flips routing decisions: always kept in 16 bits or more
    if ".attn." in name and name.endswith(".weight"):
        return "attn"
    if ".mlp." in name and name.endswith(".weight"):
        return "mlp"
    return "control"  # norms' gains, residual mixes, skip weights: tiny, and the model is sensitive to them


def quant_group(name: str) -> str:
    """QUANT_FIT's unit: a category, each block's experts apart (a step of all expert bits was 1.9 MB of 15 MB)."""
    category = tensor_category(name)
    return f"experts.{name.split('.')[1]}" if category == "experts" else category


def group_bits(bits: dict[str, int], name: str) -> int:
    """A tensor's bits: its group's where QUANT_FIT chose them, else its category's."""
    return bits.get(quant_group(name), bits.get(tensor_category(name)))


def is_quantized(name: str, t: Tensor) -> bool:
    return tensor_category(name) in QUANTIZED and t.ndim >= 2


def stored_float(name: str, t: Tensor) -> Tensor:
    """fp16; fp32 where that overflows (a diverging gain once did) and for the balancing bias's ~1e-3 steps."""
    half = t.half()
    return t.float() if name.endswith("router_bias") or not torch.isfinite(half).all() else half


def row_scales(w: Tensor, bits: int, clip_sigmas: float) -> Tensor:
    """Each row's quantization step, in its storage dtype. clip_sigmas > 0: clipped at that many row stds (a row packs
    to ~bits + log2(std / clip) per weight: a wider clip buys bytes for a little error); 0: the fraction of max |w|
    with the least squared error, blind to bytes (before SDClip)."""
    qmax = 2 ** (bits - 1) - 1
    if clip_sigmas > 0:
        step = w.std(dim=1) * clip_sigmas / qmax
        return step.clamp_min(2**-24).to(stored_float("", step).dtype)
    row_max = w.abs().amax(dim=1)
    dtype = stored_float("", row_max).dtype
    best_err, best = torch.full_like(row_max, float("inf")), torch.zeros_like(row_max, dtype=dtype)
    for fraction in CLIP_FRACTIONS:
        # Rounded to its storage dtype first: the error measured is the artifact's.
        scale = (row_max * fraction / qmax).clamp_min(2**-24).to(dtype)
        err = (round_to_grid(w, scale, qmax) * scale.float()[:, None] - w).square().sum(dim=1)
        better = err < best_err
        best_err, best = torch.where(better, err, best_err), torch.where(better, scale, best)
    return best


def round_to_grid(w: Tensor, scale: Tensor, qmax: int) -> Tensor:
    return torch.clamp(torch.round(w / scale.float()[..., None]), -qmax, qmax)


def gptq(w: Tensor, hessian: Tensor, scale: Tensor, qmax: int, block: int = 128) -> Tensor:
    """GPTQ (Frantar et al. 2022), batched: w [B, rows, cols], damped hessian [B, cols, cols], scale [B, rows] -> levels
    [B, rows, cols]. Columns round one by one, largest Hessian diagonal first, each one's error pushed onto the rest."""
    b, rows, cols = w.shape
    order = torch.argsort(hessian.diagonal(dim1=-2, dim2=-1), dim=-1, descending=True)
    w = w.gather(-1, order[:, None, :].expand(b, rows, cols)).clone()
    h = hessian.gather(-1, order[:, None, :].expand(b, cols, cols)).gather(-2, order[:, :, None].expand(b, cols, cols))
    # float64: in fp32 the factor of a well-damped Hessian still failed on an H200 (leading minor 423 of 512).
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h.double())), upper=True).float()
    q, step = torch.empty_like(w), scale[..., None].float()
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        errors = torch.empty(b, rows, i2 - i1, device=w.device)
        for i in range(i1, i2):
            column = w[..., i : i + 1]
            q[..., i : i + 1] = round_to_grid(column, scale, qmax)
            error = (column - q[..., i : i + 1] * step) / u[:, None, i, i : i + 1]
            w[..., i:i2] -= error * u[:, None, i, i:i2]
            errors[..., i - i1 : i - i1 + 1] = error
        w[..., i2:] -= errors @ u[:, i1:i2, i2:]
    return torch.empty_like(q).scatter_(-1, order[:, None, :].expand(b, rows, cols), q)


def quantize_matrix(w: Tensor, bits: int, clip_sigmas: float, hessian: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """w [rows, cols] or bank [E, rows, cols] -> (int8 levels, row scales); GPTQ with a Hessian [1 or E, cols, cols]."""
    qmax = 2 ** (bits - 1) - 1
    flat = w.detach().float().reshape(-1, w.shape[-1])
    scale = row_scales(flat, bits, clip_sigmas)
    if hessian is None:
        q = round_to_grid(flat, scale, qmax)
    else:
        groups = hessian.shape[0]
        q = gptq(flat.view(groups, -1, flat.shape[-1]), hessian, scale.view(groups, -1), qmax).view_as(flat)
    return q.to(torch.int8), scale


def dequantize(q: Tensor, scale: Tensor, shape) -> Tensor:
    return (q.float() * scale.float()[:, None]).reshape(shape)


# Packed as below, the default MoE's levels came 0.4% under their order-0 entropy (the columns' own spreads are
# context brotli uses); zstd-22's frames had come 2.7-4.0% above it. QUANT_FIT estimates with this; the bytes decide.
PACKED_OVER_ENTROPY = 1.0


def entropy_bytes(q: Tensor) -> float:
    """Order-0 entropy of integer levels, in bytes: close to what they pack to."""
    counts = torch.bincount(q.flatten().long() + 128).float()
    p = counts[counts > 0] / q.numel()
    return float(-(p * p.log2()).sum()) * q.numel() / 8


def fit_bits(options: dict[str, dict[int, tuple[float, float]]], budget: float) -> dict[str, int] | None:
    """options: {group: {bits: (bytes, loss increase)}} -> the bits per group with the least loss whose bytes fit the
    budget (ties: fewer bytes), or None. Exact: it keeps the Pareto frontier group by group, not 5**groups."""
    frontier = [(0.0, 0.0, {})]
    for group, choices in options.items():
        grown = sorted(((size + s, loss + d, {**bits, group: b}) for size, loss, bits in frontier
                        for b, (s, d) in choices.items() if size + s <= budget), key=lambda e: e[:2])
        frontier = []
        for entry in grown:
            if not frontier or entry[1] < frontier[-1][1]:
                frontier.append(entry)
    return min(frontier, key=lambda e: e[:2][::-1])[2] if frontier else None


def quantize_state(state: dict[str, Tensor], levels: dict[str, tuple[int, Tensor, Tensor]],
                   corrections: dict[str, tuple[Tensor, ...]] | None = None) -> tuple[dict, dict[str, np.ndarray]]:
    """(JSON-able header, named arrays): `levels` ({name: (bits, levels, scales)}) with `corrections`, then floats."""
    header, arrays = {}, {}
    for name, t in state.items():
        t = t.detach().cpu()
        if name in levels:
            bits, q, scale = levels[name]
            header[name] = {"kind": "int", "bits": bits, "shape": list(t.shape)}
            arrays[name], arrays[name + ".scale"] = q.cpu().numpy(), scale.cpu().numpy()
            if name in (corrections or {}):
                header[name]["lqer"] = len(corrections[name][0])
                for part, a in zip((".lqer_a", ".lqer_a.scale", ".lqer_b", ".lqer_b.scale"), corrections[name]):
                    arrays[name + part] = a.cpu().numpy()
        else:
            header[name] = {"kind": "float", "shape": list(t.shape)}
            arrays[name] = stored_float(name, t).numpy()
    return header, arrays


LQER_BITS = 4


def lqer_corrections(state: dict[str, Tensor], levels: dict, rank: int, count: int) -> dict[str, tuple[Tensor, ...]]:
    """LQER (PR #1797: ~0.009 of int6's quantization cost back for ~30 KB): the best rank-`rank` A^T B of the error of
    the `count` worst quantized tensors, A and B at 4 bits: (levels of A, scales, levels of B, scales)."""
    errors = {}
    for name, (_, q, scale) in levels.items():
        w = state[name].detach().float().reshape(-1, state[name].shape[-1])
        errors[name] = w - dequantize(q, scale, w.shape).to(w.device)
    corrections = {}
    for name in sorted(errors, key=lambda n: -float(errors[n].norm()))[:count]:
        u, sigma, vh = torch.linalg.svd(errors[name], full_matrices=False)
        a, b = (u[:, :rank] * sigma[:rank]).T, vh[:rank]
        corrections[name] = (*quantize_matrix(a, LQER_BITS, 0.0), *quantize_matrix(b, LQER_BITS, 0.0))
    return corrections


def lqer_bytes(state: dict[str, Tensor], rank: int, count: int) -> int:
    """At most what lqer_corrections adds to the artifact, a byte a level."""
    sizes = sorted((t.numel() // t.shape[-1] + t.shape[-1] for n, t in state.items() if is_quantized(n, t)), reverse=True)
    return sum(rank * (size + 4) for size in sizes[:count]) if rank else 0


def rounded_levels(state: dict[str, Tensor], bits: dict[str, int], clip_sigmas: float) -> dict[str, tuple[int, Tensor, Tensor]]:
    return {name: (group_bits(bits, name), *quantize_matrix(t, group_bits(bits, name), clip_sigmas))
            for name, t in state.items() if is_quantized(name, t)}


# On the default MoE's artifact (scripts/compress_bench.py, 15.5 MB of 4-8-bit levels) brotli-11 over this layout came
# 3.0% under zstd-22 frames of the arrays in header order (15,070,282 against 15,536,520 bytes); lzma-9e 3.0% over,
# PPMd no under. Chunks of 4 MiB are packed in parallel: ~9 s on 16 cores.
PACK_CHUNK_BYTES = 4 << 20


def pack_artifact(header: dict, arrays: dict[str, np.ndarray], model_settings: dict[str, str] | None = None) -> bytes:
    """Compressed and sealed: header length, JSON header (tensors, arrays' layout, model settings), then the raw arrays:
    levels first, by bits, each matrix by columns (GPTQ gives each its own spread), then the others byte plane by byte
    plane. Not torch.save: no pickle or zip padding to compress."""
    levels = sorted((n for n, a in arrays.items() if a.dtype == np.int8),
                    key=lambda n: LQER_BITS if ".lqer_" in n else header[n]["bits"])
    order = levels + [n for n in arrays if n not in levels]
    layout = {name: {"dtype": arrays[name].dtype.str, "shape": list(arrays[name].shape)} for name in order}
    meta = json.dumps({"tensors": header, "arrays": layout, "model": model_settings or {}}, separators=(",", ":")).encode()
    body = b"".join(np.ascontiguousarray(arrays[n].T if arrays[n].dtype == np.int8 else arrays[n]).view(np.uint8)
                    .reshape(-1, arrays[n].dtype.itemsize).T.tobytes() for n in order)
    return compress(seal(len(meta).to_bytes(4, "little") + meta + body))


def compress(raw: bytes) -> bytes:
    """4-byte chunk count, 4-byte size of each brotli-11 chunk, the chunks."""
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        chunks = list(pool.map(lambda i: brotli.compress(raw[i : i + PACK_CHUNK_BYTES], quality=11, lgwin=24),
                               range(0, len(raw), PACK_CHUNK_BYTES)))
    return b"".join([len(chunks).to_bytes(4, "little"), *(len(c).to_bytes(4, "little") for c in chunks), *chunks])


def decompress(blob: bytes) -> bytes:
    count = int.from_bytes(blob[:4], "little")
    if len(blob) < 8 or len(blob) < 4 + 4 * count:
        raise ValueError(f"corrupt, or not a moe-golf artifact: {len(blob)} bytes, too few for a chunk table of {count}")
    ends = list(itertools.accumulate((int.from_bytes(blob[4 + 4 * i : 8 + 4 * i], "little") for i in range(count)),
                                     initial=4 + 4 * count))
    if ends[-1] > len(blob):
        raise ValueError(f"corrupt: truncated ({len(blob)} bytes where its chunk table says {ends[-1]})")
    if ends[-1] < len(blob):
        raise ValueError(f"corrupt, or not a moe-golf artifact: {len(blob) - ends[-1]} bytes past its last chunk")
    try:
        return b"".join(brotli.decompress(blob[a:b]) for a, b in zip(ends, ends[1:]))
    except brotli.error as e:
        raise ValueError(f"corrupt, or not a moe-golf artifact: it does not decompress ({e})") from None


# The hash is of the content: a changed compressed byte fails to decompress or changes the content.
def seal(content: bytes) -> bytes:
    return ARTIFACT_MAGIC + hashlib.sha256(content).digest() + content


def unseal(raw: bytes) -> bytes:
    """The content of a sealed artifact, once its SHA-256 matches: a changed byte is refused, not loaded as a model."""
    if raw[:8] == UNCHECKED_MAGIC:
        raise ValueError("written before artifacts carried a checksum (MOEGOLF1), so it cannot be checked for "
                         "corruption and is not read; retrain to get a checked artifact")
    if raw[:8] != ARTIFACT_MAGIC:
        raise ValueError("corrupt, or not a moe-golf artifact (it does not start with MOEGOLF2)")
    if hashlib.sha256(raw[40:]).digest() != raw[8:40]:
        raise ValueError("corrupt: its content does not match the SHA-256 it was written with")
    return raw[40:]


def payload_arrays(content: bytes) -> tuple[dict, dict[str, np.ndarray]]:
    """An artifact's unsealed content -> (its JSON header, its arrays by name)."""
    n = int.from_bytes(content[:4], "little")
    meta = json.loads(content[4 : 4 + n])
    arrays, offset = {}, 4 + n
    for name, spec in meta["arrays"].items():
        dtype, shape = np.dtype(spec["dtype"]), spec["shape"]
        count = math.prod(shape)
        planes = np.frombuffer(content, np.uint8, count * dtype.itemsize, offset)
        values = planes.reshape(dtype.itemsize, count).T.copy().view(dtype).reshape(-1)
        arrays[name] = values.reshape(shape[::-1]).T if dtype == np.int8 else values.reshape(shape)
        offset += count * dtype.itemsize
    if offset != len(content):
        raise ValueError(f"the body is {len(content) - offset} bytes longer than the header says")
    return meta, arrays


def read_artifact(blob: bytes) -> tuple[dict[str, str], dict[str, Tensor]]:
    """(its model settings, the dequantized state dict); bytes that are not a checked artifact raise ValueError."""
    raw = unseal(decompress(blob))
    try:  # the hash matched, so only a writer other than pack_artifact gets here
        meta, arrays = payload_arrays(raw)
        state = {}
        for name, spec in meta["tensors"].items():
            a = torch.from_numpy(arrays[name].copy())
            if spec["kind"] == "int":
                a = dequantize(a, torch.from_numpy(arrays[name + ".scale"].copy()), spec["shape"])
                if spec.get("lqer"):
                    factor_a, factor_b = (dequantize(torch.from_numpy(arrays[f"{name}.lqer_{f}"].copy()),
                                                     torch.from_numpy(arrays[f"{name}.lqer_{f}.scale"].copy()),
                                                     arrays[f"{name}.lqer_{f}"].shape) for f in "ab")
                    a = a + (factor_a.T @ factor_b).reshape(spec["shape"])
            state[name] = a.float().reshape(spec["shape"])
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta["model"].items()):
            raise ValueError("its model settings are not names and values")
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as e:
        raise ValueError(f"its header does not describe its content ({type(e).__name__}: {e})") from None
    return meta["model"], state


def write_artifact(path: Path, blob: bytes) -> None:
    """Through a temporary file: a crash mid-write never leaves what looks like a finished artifact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_bytes(blob)
        os.replace(tmp, path)
    except OSError as e:  # a full disk; a failed write names no file
        raise OSError(e.errno, e.strerror, e.filename or str(tmp)) from None
    finally:
        tmp.unlink(missing_ok=True)  # nothing half-written stays, after a full disk or a signal alike


# -----------------------------------------------------------------------------
# DATA: the challenge's shards
# -----------------------------------------------------------------------------

SHARD_MAGIC, SHARD_VERSION, SHARD_HEADER_BYTES = 20240520, 1, 256 * 4


def read_shard_header(path) -> int:
    size = os.path.getsize(path)
    header = np.fromfile(path, dtype="<i4", count=256)
    if size < SHARD_HEADER_BYTES or header[0] != SHARD_MAGIC:
        raise ValueError(f"{path}: not a shard (magic {header[0] if len(header) else None} != {SHARD_MAGIC})")
    if header[1] != SHARD_VERSION:
        raise ValueError(f"{path}: shard version {header[1]} != {SHARD_VERSION}")
    if size != SHARD_HEADER_BYTES + 2 * int(header[2]):
        raise ValueError(f"{path}: {size} bytes, but its header promises {header[2]} tokens")
    if header[2] <= 0:  # a stream of empty shards would wait forever for its next token
        raise ValueError(f"{path}: holds no tokens")
    return int(header[2])


def load_data_shard(path) -> Tensor:
    count = read_shard_header(path)
    return torch.from_numpy(np.fromfile(path, dtype="<u2", count=count, offset=SHARD_HEADER_BYTES))


def load_val_tokens(cfg: Hyperparameters) -> Tensor:
    files = sorted(glob.glob(os.path.join(cfg.data_path, "fineweb_val_*.bin")))
    tokens = torch.cat([load_data_shard(f) for f in files])
    check_token_range(tokens, cfg.vocab_size, "the val split")
    usable = (tokens.numel() - 1) // cfg.train_seq_len * cfg.train_seq_len
    if usable <= 0:
        raise ConfigError(f"DATA_PATH={cfg.data_path!r}: val split has {tokens.numel()} tokens, needs > TRAIN_SEQ_LEN")
    return tokens[: usable + 1].to(torch.int32)


def check_token_range(tokens: Tensor, vocab_size: int, what: str) -> None:
    top = int(tokens.numpy().max()) if tokens.numel() else -1  # numpy: torch has no max for uint16
    if top >= vocab_size:
        raise ConfigError(f"VOCAB_SIZE={vocab_size}: {what} holds token id {top}")


class TokenStream:
    """Train shards in name order, read sequentially and wrapped around; counts passes over the data."""

    def __init__(self, files: list[str], vocab_size: int):
        self.files, self.vocab_size = files, vocab_size
        self.file_index, self.tokens_read = 0, 0
        self.total_tokens = sum(read_shard_header(f) for f in files)
        self.tokens, self.pos = self._load(0), 0

    def _load(self, i):
        tokens = load_data_shard(self.files[i])
        check_token_range(tokens, self.vocab_size, self.files[i])
        return tokens

    def take(self, n: int) -> Tensor:
        parts = []
        while n > 0:
            if self.pos == self.tokens.numel():
                self.file_index = (self.file_index + 1) % len(self.files)
                self.tokens, self.pos = self._load(self.file_index), 0
            k = min(n, self.tokens.numel() - self.pos)
            parts.append(self.tokens[self.pos : self.pos + k])
            self.pos, n, self.tokens_read = self.pos + k, n - k, self.tokens_read + k
        return torch.cat(parts)


class DistributedTokenLoader:
    """One contiguous span per rank per micro-step: the same token sequence for any world size."""

    def __init__(self, cfg: Hyperparameters, device):
        files = sorted(glob.glob(os.path.join(cfg.data_path, "fineweb_train_*.bin")))
        self.stream, self.cfg, self.device = TokenStream(files, cfg.vocab_size), cfg, device

    def next_batch(self) -> tuple[Tensor, Tensor]:
        cfg = self.cfg
        local = cfg.train_batch_tokens // (cfg.world_size * cfg.grad_accum_steps)
        chunk = self.stream.take((local + 1) * cfg.world_size)
        span = chunk[cfg.rank * (local + 1) : (cfg.rank + 1) * (local + 1)].to(torch.int64)
        x = span[:-1].view(-1, cfg.train_seq_len).to(self.device, non_blocking=True)
        y = span[1:].view(-1, cfg.train_seq_len).to(self.device, non_blocking=True)
        return x, y


# -----------------------------------------------------------------------------
# MODEL
# -----------------------------------------------------------------------------

class CastedLinear(nn.Linear):
    """fp32 master weight, cast to the activation dtype at each matmul."""

    def __init__(self, in_features: int, out_features: int, zero_init: bool = False):
        super().__init__(in_features, out_features, bias=False)
        if zero_init:
            nn.init.zeros_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.to(x.dtype))


def rms_norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


def rotary_tables(base: float, half: int, length: int, device=None) -> tuple[Tensor, Tensor]:
    """fp32 cos and sin of positions [0, length) at `half` frequencies."""
    inv_freq = base ** (-torch.arange(half, device=device, dtype=torch.float32) / half)
    angles = torch.arange(length, device=device, dtype=torch.float32)[:, None] * inv_freq
    return angles.cos(), angles.sin()


def rotary(x: Tensor, base: float, start: int = 0, dims: int = 0, tables: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """RoPE on the first `dims` (0: all) of each head [B, H, T, head_dim], from position `start` (a sampling cache).
    Partial RoPE: 16 of 64 dims in the 2026-03-21 PartialRoPE record (-0.0023 with LN_SCALE). `tables`: rotary_tables
    made once. Computed in the step, on an H100 the fused kernels holding RoPE took 36.3 ms a dense step, train_gpt.py's
    (tables made once) 20.7 (docs/performance.md)."""
    half, end = (dims or x.size(-1)) // 2, start + x.size(-2)
    if tables is None or len(tables[0]) < end:
        tables = rotary_tables(base, half, end, x.device)
    cos, sin = (t[start:end].to(x.dtype) for t in tables)
    x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin, rest), dim=-1)


GATE_INPUTS = 12  # channels of the block input that SMEAR_GATE and ATTN_GATE read, as the records' gates


def exclusive(y: Tensor, v: Tensor) -> Tensor:
    """XSA (2026-03-20 EfficientPartialXSA record, ~-0.002): each head's output y [B, H, T, D] less its component along
    the token's own value v [B, Hkv, T, D] (the query heads of one KV head share it, by broadcasting)."""
    b, h, t, d = y.shape
    grouped, vn = y.view(b, v.size(1), h // v.size(1), t, d), F.normalize(v, dim=-1)[:, :, None]
    return (grouped - (grouped * vn).sum(-1, keepdim=True) * vn).view(b, h, t, d)


class Attention(nn.Module):
    def __init__(self, cfg: Hyperparameters, layer: int):
        super().__init__()
        self.num_heads, self.num_kv_heads = cfg.num_heads, cfg.num_kv_heads
        self.head_dim, self.rope_base, self.rope_dims = cfg.model_dim // cfg.num_heads, cfg.rope_base, cfg.rope_dims
        self.xsa = layer >= cfg.num_layers - cfg.xsa_last_n
        kv_dim = cfg.num_kv_heads * self.head_dim
        self.q = CastedLinear(cfg.model_dim, cfg.model_dim)
        self.k = CastedLinear(cfg.model_dim, kv_dim)
        self.v = CastedLinear(cfg.model_dim, kv_dim)
        self.out = CastedLinear(cfg.model_dim, cfg.model_dim, zero_init=True)
        self.q_gain = nn.Parameter(torch.full((cfg.num_heads,), cfg.qk_gain_init))
        cos, sin = rotary_tables(cfg.rope_base, (cfg.rope_dims or self.head_dim) // 2, cfg.train_seq_len)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        if cfg.attn_gate:  # sparse output gate (2026-04-23 PolarNS_MinLR record): sigmoid(W x[:12]) per head, 0.5 at init
            self.gate = nn.Parameter(torch.zeros(cfg.num_heads, GATE_INPUTS))

    def forward(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        # q, k and v as one matmul: on an H100 0.40 ms forward and backward where three took 0.69 (a block's micro-batch).
        weight = torch.cat([self.q.weight, self.k.weight, self.v.weight]).to(x.dtype)
        q, k, v = F.linear(x, weight).split([D, self.k.out_features, self.v.out_features], dim=-1)
        q = q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        # QK-norm fixes the logit scale; the learnable per-head gain then sets attention sharpness.
        tables = (self.rope_cos, self.rope_sin)
        q = rotary(rms_norm(q), self.rope_base, dims=self.rope_dims, tables=tables) * self.q_gain.to(x.dtype)[:, None, None]
        k = rotary(rms_norm(k), self.rope_base, dims=self.rope_dims, tables=tables)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.num_kv_heads != self.num_heads)
        return self.output(y, v, x)

    def output(self, y: Tensor, v: Tensor, x: Tensor) -> Tensor:
        """Heads [B, H, T, D] through XSA, the gate and the projection."""
        if self.xsa:
            y = exclusive(y, v)
        if hasattr(self, "gate"):
            y = y * torch.sigmoid(x[..., :GATE_INPUTS] @ self.gate.to(x.dtype).T).transpose(1, 2)[..., None]
        return self.out(y.transpose(1, 2).flatten(2))


def activate(h: Tensor, act: str, limit: float = 0.0) -> Tensor:
    if act == "swiglu":  # rows hold [gate; up], gate first as in the fused Hugging Face layout
        gate, up = h.chunk(2, dim=-1)
        if limit:  # SWIGLU_LIMIT, DeepSeek-V4's experts: the gate clamped above, up both sides
            gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
        return F.silu(gate) * up
    if act == "leaky_relu2":  # LeakyReLU(0.5)^2 (2026-03-23 LeakyReLU record: -0.0021 in its own ablation)
        return F.leaky_relu(h, 0.5).square()
    return F.relu(h).square()


class FeedForward(nn.Module):
    """The dense MLP, also shared_routed's shared expert. Returns (output, aux loss), as every MLP slot."""

    def __init__(self, dim: int, hidden: int, act: str = "relu2"):
        super().__init__()
        self.act = act
        self.fc = CastedLinear(dim, 2 * hidden if act == "swiglu" else hidden)
        self.proj = CastedLinear(hidden, dim, zero_init=True)

    def forward(self, x: Tensor, ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.proj(activate(self.fc(x), self.act)), x.new_zeros((), dtype=torch.float32)


def matmul_dtype(x: Tensor) -> torch.dtype:
    """bf16 under autocast (grouped matmuls aren't autocast ops) or compiled (bf16 only); eager CPU: fp32, exact."""
    return torch.bfloat16 if torch.is_autocast_enabled(x.device.type) or torch.compiler.is_compiling() else x.dtype


class Permute(torch.autograd.Function):
    """x[perm] whose backward gathers by the inverse permutation, not autograd's scatter-add: no atomics."""

    @staticmethod
    def forward(ctx, x: Tensor, perm: Tensor, inverse: Tensor) -> Tensor:
        ctx.save_for_backward(inverse)
        return x[perm]

    @staticmethod
    def backward(ctx, grad: Tensor):
        (inverse,) = ctx.saved_tensors
        return grad[inverse], None, None


def sum_per_expert(per_group: Tensor, cut_expert: Tensor, experts: int) -> Tensor:
    """[groups, ...] -> [experts, ...], each expert's groups summed. By a matmul with a one-hot [experts, groups], not
    index_add_'s atomic adds into an fp32 copy: on an H100, sparse in every block 391.5-391.8 -> 388.0-389.4 ms/step,
    peak memory 16.9 -> 14.8 GiB (default: equal time, 13.3 -> 12.6 GiB), and the sum's order no longer varies."""
    owner = (cut_expert == torch.arange(experts, device=cut_expert.device)[:, None]).to(per_group.dtype)
    return (owner @ per_group.flatten(1)).view(experts, *per_group.shape[1:])


class GroupedMatmul(torch.autograd.Function):
    """Expert-sorted rows times their expert's weight: x [S, in], w [E, out, in] -> [S, out]. Per expert, the weight
    gradient ran 2-3.5x slower at early training's imbalance than balanced (one overloaded expert serialises it): it is
    computed over groups cut at expert boundaries and fixed row chunks, then summed per expert."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, offsets: Tensor, cuts: Tensor, cut_expert: Tensor) -> Tensor:
        ctx.save_for_backward(x, w, offsets, cuts, cut_expert)
        return torch._grouped_mm(x, w.mT, offs=offsets)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, w, offsets, cuts, cut_expert = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = torch._grouped_mm(grad, w, offs=offsets)
        per_group = torch._grouped_mm(grad.mT, x, offs=cuts)  # [groups, out, in]; an empty group gives zeros
        return grad_x, sum_per_expert(per_group, cut_expert, len(w)), None, None, None


class Fp32Logits(torch.autograd.Function):
    """x @ w.T in fp32 (TF32 on GPUs) under autocast too, whose bf16 rounds near-tied experts' logits together."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor) -> Tensor:
        ctx.save_for_backward(x, w)
        with torch.autocast(x.device.type, enabled=False):
            return x.float() @ w.float().T

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, w = ctx.saved_tensors
        return grad.to(x.dtype) @ w.to(x.dtype), (grad.T.to(x.dtype) @ x).to(w.dtype)


QUACK_ACTIVATIONS = {"relu2": "relu_sq", "leaky_relu2": "leaky_relu_sq", "swiglu": "swiglu"}


class QuackExperts(torch.autograd.Function):
    """ExpertBank.grouped's function through QuACK's grouped GEMMs (sm90): x [N, D], w_in [E, rows, D], w_out
    [E, D, F], weights [N, K] and the expert-sorted slot order -> [N, D] fp32. The first GEMM gathers each slot's
    token row in its loads and writes the activation in its epilogue; the backward's first GEMM gathers the output
    gradient the same way and its epilogue gives the activation's gradient scaled by the routing weight, the
    weighted hidden units (W2's gradient input) and, as a row reduction, each routing weight's gradient. Only the
    slot outputs and the slot input gradients are [N*K, D]; the torch path also permutes its inputs and outputs."""

    @staticmethod
    def forward(ctx, x, w_in, w_out, weights, order, inverse, offsets, cuts, cut_expert, act):
        n, k = weights.shape
        token = (order // k).to(torch.int32)  # the row of x each sorted slot reads
        bounds, cut_bounds = F.pad(offsets, (1, 0)), F.pad(cuts, (1, 0))
        preact, hidden = quack.gemm_act(x, w_in.mT, activation=act, cu_seqlens_m=bounds, A_idx=token)
        y = quack.gemm(hidden, w_out.mT, cu_seqlens_m=bounds)
        ctx.save_for_backward(x, w_in, w_out, weights, order, inverse, preact, token, bounds, cut_bounds, cut_expert)
        ctx.act = act
        # The routing weight scales the slot's output here, in the combine pass that runs anyway: the same product
        # as scaling its hidden units, which the backward does.
        return (y[inverse].view(n, k, -1).float() * weights[..., None]).sum(dim=1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, w_in, w_out, weights, order, inverse, preact, token, bounds, cut_bounds, cut_expert = ctx.saved_tensors
        n, k = weights.shape
        grad = grad.to(x.dtype).contiguous()
        grad_pre, hidden, grad_weights = quack.gemm_dact(
            grad, w_out, preact, activation=ctx.act, colvec_scale=weights.flatten()[order], colvec_reduce=True,
            cu_seqlens_m=bounds, A_idx=token)

        def per_expert(rows: Tensor, b: Tensor) -> Tensor:
            """sum over each expert's slots of rows[token]^T b, cut as GroupedMatmul cuts it: [E, D, b's width]."""
            cut_sums = quack.gemm(rows.T, b, cu_seqlens_k=cut_bounds, A_idx=token, out_dtype=torch.float32)
            return sum_per_expert(cut_sums, cut_expert, len(w_in))

        grad_x = quack.gemm(grad_pre, w_in, cu_seqlens_m=bounds)[inverse].view(n, k, -1).float().sum(dim=1)
        return (grad_x.to(x.dtype), per_expert(x, grad_pre).mT.to(w_in.dtype), per_expert(grad, hidden).to(w_out.dtype),
                grad_weights[inverse].view(n, k), None, None, None, None, None, None)


def expert_groups(counts: Tensor, chunks: int) -> tuple[Tensor, Tensor, Tensor]:
    """Group ends of the expert-sorted rows; the weight gradient's cuts (expert and chunk ends) and their experts."""
    offsets = counts.cumsum(0).to(torch.int32)
    rows = offsets[-1:]
    chunk_ends = torch.arange(1, chunks + 1, device=counts.device, dtype=torch.int32) * rows // chunks
    cuts = torch.cat([offsets, chunk_ends]).sort().values
    starts = torch.cat([cuts.new_zeros(1), cuts[:-1]])
    cut_expert = torch.searchsorted(offsets, starts, right=True).clamp_max(len(counts) - 1)
    return offsets, cuts, cut_expert


class ExpertBank(nn.Module):
    """E experts as two stacked fp32 weights [E, out, in]: Muon and export treat each expert's matrix on its own."""

    def __init__(self, num_experts: int, dim: int, hidden: int, act: str, limit: float = 0.0, kernel: str = "torch"):
        super().__init__()
        self.act, self.limit, self.kernel = act, limit, kernel
        rows = 2 * hidden if act == "swiglu" else hidden
        bound = 1 / math.sqrt(dim)  # nn.Linear's default init, per expert
        self.w_in = nn.Parameter(torch.empty(num_experts, rows, dim).uniform_(-bound, bound))
        self.w_out = nn.Parameter(torch.zeros(num_experts, dim, hidden))

    def forward(self, x: Tensor, weights: Tensor, expert_idx: Tensor | None = None, counts: Tensor | None = None) -> Tensor:
        """Routed (weights, expert_idx [N, K], counts [E]) or soft (gates [N, E]): one entry for calibration's hook."""
        return self.dense(x, weights) if expert_idx is None else self.grouped(x, expert_idx, weights, counts)

    def grouped(self, x: Tensor, expert_idx: Tensor, weights: Tensor, counts: Tensor) -> Tensor:
        """Dropless top-k: x [N, D], expert_idx and weights [N, K] -> the weighted sum of each token's experts, fp32
        [N, D]. Slots are sorted by expert and run through two grouped matmuls (QuACK's in bf16 when EXPERT_KERNEL is
        quack and gradients are on, else torch._grouped_mm); static shapes and no host sync, so it compiles whole."""
        n, k = expert_idx.shape
        # uint8 keys (NUM_EXPERTS <= 256) sort in one radix pass where int64 keys take eight.
        order = torch.argsort(expert_idx.flatten().to(torch.uint8), stable=True)
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(n * k, device=x.device))
        # 4E chunks: on an H100 (8 experts, 131072 slots) 11% faster than 2E, balanced or not too skewed.
        groups = expert_groups(counts, 4 * len(counts))
        dtype = matmul_dtype(x)
        # QuACK's autotuner keys on every tensor's shape. Forwards without gradients (evaluation, calibration) take
        # torch._grouped_mm, which has nothing to tune: GPTQ's stages cut to fewer sequences met new shapes on the
        # clock and tuned there, and a 45 s MoE run on an H100 ended 1.2 s past its cap (cap_slack_ms:-1198).
        if self.kernel == "quack" and dtype == torch.bfloat16 and torch.is_grad_enabled():
            w_in = self.w_in.to(dtype)
            if self.act == "swiglu":  # QuACK pairs gate and up in adjacent columns: [g0, u0, g1, u1, ...]
                w_in = w_in.unflatten(1, (2, -1)).transpose(1, 2).flatten(1, 2)
            return QuackExperts.apply(x.to(dtype), w_in, self.w_out.to(dtype), weights, order, inverse, *groups,
                                      QUACK_ACTIVATIONS[self.act])
        slots = x.to(dtype)[:, None, :].expand(n, k, x.size(-1)).reshape(n * k, -1)
        h = GroupedMatmul.apply(Permute.apply(slots, order, inverse), self.w_in.to(dtype), *groups)
        # Routing weights scale the hidden units before the linear second matmul: no gradient pass over [N*K, D].
        slot_weights = Permute.apply(weights.reshape(-1, 1), order, inverse)
        # .to(dtype): autocast runs the square of relu^2 in fp32, and grouped matmuls take one dtype.
        out = GroupedMatmul.apply((activate(h, self.act, self.limit) * slot_weights).to(dtype), self.w_out.to(dtype), *groups)
        return Permute.apply(out, inverse, order).view(n, k, -1).float().sum(dim=1)

    def dense(self, x: Tensor, gates: Tensor) -> Tensor:
        """Every expert on every token: x [N, D], gates [N, E] -> [N, D], as one wide MLP of hidden E*F."""
        e, rows, d = self.w_in.shape
        dtype = matmul_dtype(x)
        h = x.to(dtype) @ self.w_in.to(dtype).reshape(e * rows, d).T
        h = activate(h.view(-1, e, rows), self.act, self.limit) * gates[..., None]
        return h.to(dtype).flatten(1) @ self.w_out.to(dtype).permute(1, 0, 2).reshape(d, -1).T


def top_k(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """torch.topk as k masked argmaxes: fused reductions, where topk's sort took 210 us a call (N=65536, E=8)."""
    picks, masked = [], scores
    for _ in range(k):
        picks.append(masked.argmax(dim=-1, keepdim=True))
        masked = masked.scatter(-1, picks[-1], float("-inf"))
    idx = torch.cat(picks, dim=-1)
    return scores.gather(-1, idx), idx


def balanced_hash_table(vocab_size: int, num_experts: int, top_k: int, seed: int, layer: int) -> Tensor:
    """[vocab, K] distinct experts per token id, every expert within one of the same count; from the seed, so free."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + layer)
    rank_of_token = torch.randperm(vocab_size, generator=g)
    relabel = torch.randperm(num_experts, generator=g)
    consecutive = (torch.arange(vocab_size)[:, None] * top_k + torch.arange(top_k)) % num_experts
    return relabel[consecutive[rank_of_token]]


class MoEMLP(nn.Module):
    """sparse: top-k routed experts; shared_routed: plus a shared expert; soft: a softmax gate over all. fp32 router."""

    def __init__(self, cfg: Hyperparameters, layer: int):
        super().__init__()
        self.mode, self.router_kind = cfg.mlp_mode, cfg.router
        self.num_experts, self.top_k, self.norm_topk_prob = cfg.num_experts, cfg.top_k, cfg.norm_topk_prob
        self.aux_coef, self.z_coef, self.route_scale = cfg.moe_aux_coef, cfg.router_z_coef, cfg.route_scale
        # HASH_LAYERS: the token-id table picks, the router's scores weigh.
        self.hashed = self.mode != "soft" and (cfg.router == "hash" or layer in cfg.moe_layers[: cfg.hash_layers])
        self.experts = ExpertBank(cfg.num_experts, cfg.model_dim, cfg.expert_hidden, cfg.expert_act, cfg.swiglu_limit,
                                  cfg.expert_kernel)
        if self.mode == "soft" or self.router_kind != "hash":
            self.router = nn.Parameter(torch.randn(cfg.num_experts, cfg.model_dim) * 0.02)
        if self.mode != "soft" and not self.hashed and self.router_kind in ("sigmoid", "sqrtsoftplus"):
            # Selection-only bias, moved by load balancing outside the graph, never by gradients; saved.
            self.register_buffer("router_bias", torch.zeros(cfg.num_experts))
        if self.hashed:
            self.register_buffer("hash_table", balanced_hash_table(cfg.vocab_size, cfg.num_experts, cfg.top_k, cfg.seed, layer), persistent=False)
        if self.mode == "shared_routed":
            self.shared = FeedForward(cfg.model_dim, cfg.shared_hidden, cfg.expert_act)
            if cfg.shared_gate:  # Qwen2-MoE: y = routed + sigmoid(w_s . x) * shared(x)
                self.shared_gate = nn.Parameter(torch.zeros(1, cfg.model_dim))
        # This step's routing, for balancing and telemetry: slots (soft: gate mass) and summed probabilities per
        # expert, then [token entropy sum, tokens, aux, z-loss, calls].
        self.register_buffer("expert_load", torch.zeros(cfg.num_experts), persistent=False)
        self.register_buffer("importance", torch.zeros(cfg.num_experts), persistent=False)
        self.register_buffer("router_sums", torch.zeros(5), persistent=False)

    def scores(self, logits: Tensor) -> Tensor:
        """What ranks and weighs the experts; DeepSeek-V4's sqrt(softplus) grows where sigmoid saturates."""
        if self.router_kind == "softmax":
            return logits.softmax(dim=-1)
        return logits.sigmoid() if self.router_kind == "sigmoid" else F.softplus(logits).sqrt()

    def route(self, x: Tensor, ids: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """x [N, D] -> (expert ids [N, K], fp32 weights [N, K], slots per expert [E], auxiliary loss)."""
        switch = z_loss = probs = x.new_zeros((), dtype=torch.float32)
        if self.router_kind == "hash":
            idx = self.hash_table[ids]
            weights = torch.full(idx.shape, 1.0 / self.top_k, device=x.device)
        else:
            logits = Fp32Logits.apply(x, self.router)
            scores = self.scores(logits)
            if self.hashed:
                idx = self.hash_table[ids]
                weights = scores.gather(-1, idx)
            elif self.router_kind == "softmax":
                weights, idx = top_k(scores, self.top_k)
            else:  # DeepSeek-V3 and V4: choose by score + bias, weigh by the unbiased score
                _, idx = top_k(scores + self.router_bias, self.top_k)
                weights = scores.gather(-1, idx)
            if self.norm_topk_prob or self.hashed or self.router_kind == "sqrtsoftplus":
                weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
            weights = weights * self.route_scale
            probs = scores if self.router_kind == "softmax" else scores / scores.sum(dim=-1, keepdim=True)
        # A compare-and-sum reduction: scatter_add onto E counters serialises on atomics.
        counts = (idx.flatten()[:, None] == torch.arange(self.num_experts, device=x.device)).sum(0, dtype=torch.float32)
        if self.router_kind == "softmax" and not self.hashed:
            # Switch: E * sum_i f_i * P_i with f the slot fractions (summing to 1), so 1 at perfect balance.
            switch = self.aux_coef * self.num_experts * (counts / idx.numel() * probs.mean(0)).sum()
            z_loss = self.z_coef * logits.logsumexp(dim=-1).square().mean()
        self.record_routing(counts, probs, switch, z_loss, len(x))
        return idx, weights, counts, switch + z_loss

    def reset_routing(self) -> None:
        for buffer in (self.expert_load, self.importance, self.router_sums):
            buffer.zero_()

    @torch.no_grad()
    def record_routing(self, load: Tensor, probs: Tensor, switch: Tensor, z_loss: Tensor, tokens: int) -> None:
        self.expert_load += load
        entropy = torch.zeros_like(switch)
        if probs.ndim:  # hash routing has no probabilities
            self.importance += probs.sum(0)
            entropy = -(probs * probs.clamp_min(1e-12).log()).sum()
        self.router_sums += torch.stack([entropy, torch.full_like(switch, tokens), switch, z_loss, torch.ones_like(switch)])

    def forward(self, x: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
        flat = x.reshape(-1, x.size(-1))
        if self.mode == "soft":
            logits = Fp32Logits.apply(flat, self.router)
            gates = logits.softmax(dim=-1)
            z_loss = self.z_coef * logits.logsumexp(dim=-1).square().mean()
            self.record_routing(gates.sum(0), gates, torch.zeros_like(z_loss), z_loss, len(flat))
            y = self.experts(flat, gates)
            return y.to(x.dtype).view_as(x), z_loss
        idx, weights, counts, aux = self.route(flat, ids.reshape(-1))
        y = self.experts(flat, weights, idx, counts)
        if self.mode == "shared_routed":
            shared, _ = self.shared(flat)
            if hasattr(self, "shared_gate"):
                shared = shared.float() * torch.sigmoid(Fp32Logits.apply(flat, self.shared_gate))
            y = y + shared
        return y.to(x.dtype).view_as(x), aux


def build_mlp(cfg: Hyperparameters, layer: int) -> nn.Module:
    """The MLP slot of block `layer`: (x, token ids) -> (output, auxiliary loss)."""
    if cfg.mlp_mode != "dense" and layer in cfg.moe_layers:
        return MoEMLP(cfg, layer)
    return FeedForward(cfg.model_dim, cfg.mlp_mult * cfg.model_dim, cfg.mlp_act)


class Block(nn.Module):
    def __init__(self, cfg: Hyperparameters, layer: int):
        super().__init__()
        dim = cfg.model_dim
        self.attn = Attention(cfg, layer)
        self.mlp = build_mlp(cfg, layer)
        self.attn_scale = nn.Parameter(torch.ones(dim))
        self.mlp_scale = nn.Parameter(torch.ones(dim))
        # Learnable blend of the residual with the normalised embedding.
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(dim), torch.zeros(dim))))
        # LN_SCALE: both norms' outputs times 1/sqrt(layer + 1) (2026-03-21 PartialRoPE record, with partial RoPE).
        self.norm_scale = 1 / math.sqrt(layer + 1) if cfg.ln_scale else 1.0
        # Attention and MLP read the same input, GPT-J style (2026-04-09 3LayerRecur record; -0.0022 in 2026-03-31).
        self.parallel = layer in cfg.parallel_layers

    def norm(self, x: Tensor) -> Tensor:
        return rms_norm(x) * self.norm_scale if self.norm_scale != 1.0 else rms_norm(x)

    def forward(self, x: Tensor, x0: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        attn = self.attn_scale.to(x.dtype) * self.attn(self.norm(x))
        y, aux = self.mlp(self.norm(x) if self.parallel else self.norm(x + attn), ids)
        return x + attn + self.mlp_scale.to(x.dtype) * y, aux


class SmearGate(nn.Module):
    """x_t + lam * sigmoid(w . x_t[:12]) * x_{t-1} on the embeddings, identity at init: the gate of 2026-04-16
    SmearGate_AttentionOutputGate; not across BOS_ID, PR #1797's mask (without it +0.00255 leaked across documents)."""

    def __init__(self, bos_id: int):
        super().__init__()
        self.bos_id = bos_id
        self.w = nn.Parameter(torch.zeros(GATE_INPUTS))
        self.lam = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor, ids: Tensor) -> Tensor:
        gate = self.lam.to(x.dtype) * torch.sigmoid(x[..., :GATE_INPUTS] @ self.w.to(x.dtype)) * (ids != self.bos_id)
        return x + gate[..., None] * F.pad(x[:, :-1], (0, 0, 1, 0))


class BigramHash(nn.Module):
    """scale * proj(table[hash(previous token, token)]), added to the embedding (2026-03-20
    Int6_MLP3x_SmearGate_BigramHash record). A document's first token takes the last bucket. Zero at init."""

    def __init__(self, buckets: int, dim: int, model_dim: int, bos_id: int):
        super().__init__()
        self.bos_id = bos_id
        self.table = nn.Parameter(torch.zeros(buckets, dim))
        self.proj = CastedLinear(dim, model_dim)
        self.scale = nn.Parameter(torch.tensor(0.05))

    def forward(self, ids: Tensor) -> Tensor:
        last, previous = len(self.table) - 1, F.pad(ids[:, :-1], (1, 0), value=-1)
        bucket = torch.bitwise_xor(36313 * ids, 27191 * previous) % last
        bucket = torch.where((previous < 0) | (ids == self.bos_id), last, bucket)
        return self.scale.to(self.proj.weight.dtype) * self.proj(F.embedding(bucket, self.table))


def layer_order(cfg: Hyperparameters, looped: bool) -> list[int]:
    """The blocks in the order the forward runs them: with recurrence on, RECUR_LAYERS once more per RECUR_LOOPS."""
    if not looped or not cfg.recur_layers:
        return list(range(cfg.num_layers))
    first, last = cfg.recur_layers[0], cfg.recur_layers[-1] + 1
    return [*range(last), *list(range(first, last)) * cfg.recur_loops, *range(last, cfg.num_layers)]


class GPT(nn.Module):
    def __init__(self, cfg: Hyperparameters):
        super().__init__()
        self.logit_softcap = cfg.logit_softcap
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.model_dim)
        if cfg.tie_embeddings:
            nn.init.normal_(self.tok_emb.weight, std=cfg.tied_embed_init_std)
        if cfg.bigram_buckets:
            self.bigram = BigramHash(cfg.bigram_buckets, cfg.bigram_dim, cfg.model_dim, cfg.bos_id)
        if cfg.smear_gate:
            self.smear = SmearGate(cfg.bos_id)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        # U-Net skips over the order run. Depth recurrence (RECUR_LAYERS; 2026-04-05 Loop45x2, 2026-04-09 3LayerRecur:
        # ~0.003 in 2026-04-03) reruns a span of blocks; skips follow the longer order (the shorter uses the first).
        self.orders = [layer_order(cfg, False), layer_order(cfg, True)]
        longest = max(self.orders, key=len)
        self.skip_weights = nn.Parameter(torch.ones(min(len(longest) // 2, len(longest) - len(longest) // 2), cfg.model_dim))
        self.lm_head = None if cfg.tie_embeddings else CastedLinear(cfg.model_dim, cfg.vocab_size, zero_init=True)

    def logits(self, ids: Tensor, looped: bool = True) -> tuple[Tensor, Tensor]:
        """looped: with recurrence (the trained model's order; training starts without it until RECUR_START_FRAC)."""
        x = self.tok_emb(ids)
        if hasattr(self, "bigram"):
            x = x + self.bigram(ids).to(x.dtype)
        x = x0 = rms_norm(self.smear(x, ids) if hasattr(self, "smear") else x)
        order = self.orders[1 if looped else 0]
        skips, aux, encoder = [], torch.zeros((), device=ids.device), len(order) // 2
        for i, layer in enumerate(order):
            if i >= encoder and skips:
                x = x + self.skip_weights[i - encoder].to(x.dtype) * skips.pop()
            x, block_aux = self.blocks[layer](x, x0, ids)
            aux = aux + block_aux
            if i < encoder:
                skips.append(x)
        head = self.tok_emb.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(rms_norm(x), head.to(x.dtype)).float()
        if self.logit_softcap > 0:
            logits = self.logit_softcap * torch.tanh(logits / self.logit_softcap)
        return logits, aux

    def forward(self, ids: Tensor, targets: Tensor, looped: bool = True) -> Tensor:
        logits, aux = self.logits(ids, looped)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten()) + aux

    def token_losses(self, ids: Tensor, targets: Tensor, looped: bool = True) -> Tensor:
        logits, _ = self.logits(ids, looped)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)


def muon_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for name, p in model.named_parameters() if tensor_category(name) in ("attn", "mlp", "experts")]


def build_optimizers(model: GPT, cfg: Hyperparameters) -> list[torch.optim.Optimizer]:
    by_category = {}
    for name, p in model.named_parameters():
        by_category.setdefault(tensor_category(name), []).append(p)
    embed_lr = cfg.tied_embed_lr if cfg.tie_embeddings else cfg.embed_lr
    embeddings = [model.tok_emb.weight] + ([model.bigram.table] if hasattr(model, "bigram") else [])
    groups = [dict(params=embeddings, lr=embed_lr), dict(params=by_category["control"], lr=cfg.scalar_lr)]
    if model.lm_head is not None:
        groups.append(dict(params=[model.lm_head.weight], lr=cfg.head_lr))
    if by_category.get("router"):
        groups.append(dict(params=by_category["router"], lr=cfg.router_lr))
    adam = torch.optim.Adam(groups, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, fused=torch.cuda.is_available())
    muon = Muon(muon_params(model), lr=cfg.matrix_lr, momentum=cfg.muon_momentum, backend_steps=cfg.muon_backend_steps,
                weight_decay=cfg.muon_wd, row_norm=cfg.muon_eq_r, polar_express=cfg.muon_polar_express)
    optimizers = [adam, muon]
    for opt in optimizers:
        for group in opt.param_groups:
            group["base_lr"] = group["lr"]
    return optimizers


def parameter_report(model: GPT) -> dict[str, int]:
    """Parameter counts per category, in total and active per token."""
    report = {"total": 0, "active": 0}
    for name, p in model.named_parameters():
        category = tensor_category(name)
        report[category] = report.get(category, 0) + p.numel()
        report["total"] += p.numel()
        report["active"] += p.numel()
    for m in model.modules():
        if isinstance(m, MoEMLP) and m.mode != "soft":
            report["active"] -= sum(p.numel() for p in m.experts.parameters()) * (m.num_experts - m.top_k) // m.num_experts
    return report


@torch.no_grad()
def balance_router_biases(model: nn.Module, rate: float) -> None:
    """DeepSeek-V3's loss-free balancing: b_i += rate * sign(mean load - load_i), centred so the biases don't drift."""
    layers = [m for m in model.modules() if isinstance(m, MoEMLP) and hasattr(m, "router_bias")]
    if not layers or rate == 0:
        return
    loads = torch.stack([m.expert_load for m in layers])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(loads)
    step = rate * torch.sign(loads.mean(dim=-1, keepdim=True) - loads)
    step -= step.mean(dim=-1, keepdim=True)
    for m, delta in zip(layers, step):
        m.router_bias += delta


class EMA:
    """fp32 shadow of the weights; decay min(EMA_DECAY, (1+t)/(10+t)), or short runs would export mostly the init."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay, self.updates = decay, 0
        self.params = list(model.parameters())
        self.shadow = [p.detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self):
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.shadow, [p.float() for p in self.params], 1.0 - decay)
        self.updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module):
        for p, s in zip(model.parameters(), self.shadow):
            p.copy_(s)


def router_stats(load: list[float], importance: list[float], sums: list[float], bias: list[float] | None) -> dict:
    """One layer's collapse telemetry over a window of steps, from its summed buffers (see MoEMLP)."""
    entropy_sum, tokens, switch, z_loss, calls = sums
    total = sum(load) or 1.0
    fractions = [x / total for x in load]
    mean = 1 / len(fractions)
    has_probs = any(importance)
    return dict(
        load=fractions, importance=[x / tokens for x in importance] if has_probs else None,
        load_entropy=-sum(f * math.log(f) for f in fractions if f > 0) / math.log(len(fractions)),  # 1 = balanced
        token_entropy=entropy_sum / tokens if has_probs else None,
        max_over_mean=max(fractions) / mean, min_over_mean=min(fractions) / mean,
        maxvio=max(fractions) / mean - 1, dead=sum(x == 0 for x in load),
        aux=switch / max(calls, 1), z=z_loss / max(calls, 1),
        bias_min=min(bias) if bias else None, bias_max=max(bias) if bias else None)


class RouterTelemetry:
    """Routing statistics summed on the device each step, read when logged. `router_alert` marks, once until it
    recovers, a layer whose least-used expert stayed under ROUTER_ALERT_MIN_LOAD of a fair share for
    ROUTER_ALERT_PATIENCE steps (a random router's first steps are routinely that skewed)."""

    def __init__(self, model: nn.Module, threshold: float, patience: int):
        self.layers = [(i, b.mlp) for i, b in enumerate(model.blocks) if isinstance(b.mlp, MoEMLP)]
        self.threshold, self.patience = threshold, patience
        self.below_since, self.alerted, self.last_report = {}, set(), 0
        self.window = [torch.zeros(2 * m.num_experts + 5, device=m.expert_load.device) for _, m in self.layers]

    def accumulate(self):
        for window, (_, m) in zip(self.window, self.layers):
            window += torch.cat([m.expert_load, m.importance, m.router_sums])

    def report(self, log: "RunLog", step: int):
        if not self.layers:
            return
        windows = torch.stack(self.window)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(windows)
        rows = windows.tolist()
        summary = []
        for (layer, m), row in zip(self.layers, rows):
            e = m.num_experts
            bias = m.router_bias.tolist() if hasattr(m, "router_bias") else None
            stats = router_stats(row[:e], row[e : 2 * e], row[2 * e :], bias)
            log.record("router", step=step, layer=layer, **stats)
            summary.append(stats)
            if stats["min_over_mean"] >= self.threshold:
                self.below_since.pop(layer, None)
                self.alerted.discard(layer)
                continue
            since = self.below_since.setdefault(layer, self.last_report)  # the window is judged as a whole
            if step - since >= self.patience and layer not in self.alerted:
                self.alerted.add(layer)
                log.metrics("router_alert", step=step, layer=layer, below_since=since, min_over_mean=stats["min_over_mean"],
                            dead=stats["dead"], max_over_mean=stats["max_over_mean"])
        self.last_report = step
        log.metrics("router_summary", step=step, **{k: [s[k] for s in summary] for k in ("maxvio", "min_over_mean", "dead", "load_entropy")})
        for window in self.window:
            window.zero_()


# -----------------------------------------------------------------------------
# CALIBRATED EXPORT: GPTQ on the exported model's own inputs, and bits fitted to the cap
# -----------------------------------------------------------------------------

class StopForward(Exception):
    """Raised by a calibration stage's last hook: the blocks after it are not needed."""


class Hessians:
    """Per group (one matrix, or each expert of a bank): the sum of x x^T over the (weighted) inputs it saw."""

    def __init__(self, groups: int, cols: int, device):
        # float64: TF32 sums, off by ~1e-3 of the largest entries, left near-singular Hessians indefinite after damping.
        self.sum = torch.zeros(groups, cols, cols, device=device, dtype=torch.float64)
        self.tokens = torch.zeros(groups, device=device, dtype=torch.float64)
        self.weight = torch.zeros(groups, device=device, dtype=torch.float64)

    def add(self, x: Tensor, group: int = 0, weight: Tensor | None = None):
        """x [..., cols]; weight [rows]: each row's routing weight, which scales the expert's output and its error."""
        x = x.detach().double().reshape(-1, self.sum.shape[-1])
        w = torch.ones(len(x), device=x.device, dtype=x.dtype) if weight is None else weight.detach().double()
        self.sum[group] += (x * w[:, None]).T @ (x * w[:, None])
        self.tokens[group] += len(x)
        self.weight[group] += w.square().sum()

    def damped(self, damp: float) -> Tensor:
        """Mean x x^T plus damp x its mean diagonal plus, for experts seldom chosen, the pooled diagonal x cols /
        (tokens + cols); one that saw no token gets a multiple of the identity (GPTQ rounds to nearest)."""
        cols = self.sum.shape[-1]
        mean = self.sum / self.weight.clamp_min(1e-12)[:, None, None]
        pooled = self.sum.sum(0).diagonal().mean() / self.weight.sum().clamp_min(1e-12)
        lam = damp * mean.diagonal(dim1=-2, dim2=-1).mean(-1) + pooled * cols / (self.tokens + cols)
        lam = torch.where(lam > 0, lam, torch.ones_like(lam))
        return mean + lam[:, None, None] * torch.eye(cols, device=mean.device, dtype=mean.dtype)


def calibration_stages(model: GPT) -> list[list[tuple[str, nn.Module, list[str]]]]:
    """GPTQ stages in forward order, each a list of (input kind, module whose input it is, parameters quantized with
    that input's Hessian): later stages see the quantized earlier ones' outputs, as the exported model will."""
    names = {m: n for n, m in model.named_modules()}

    def linear(*modules, input_of=None):
        """Matrices quantized with the Hessian of one input: that of `input_of`, or of the first module."""
        return [("linear", input_of or modules[0], [f"{names[m]}.weight" for m in modules])]

    tied = model.lm_head is None
    head = [[("head", model.blocks[-1], ["tok_emb.weight" if tied else "lm_head.weight"])]]
    stages = head if tied else []
    for block in model.blocks:
        attn = block.attn  # q, k and v: one matmul of the attention's input (Attention.forward)
        stages += [linear(attn.q, attn.k, attn.v, input_of=attn), linear(attn.out)]
        mlp = block.mlp
        if isinstance(mlp, FeedForward):
            stages += [linear(mlp.fc), linear(mlp.proj)]
        else:
            bank = names[mlp.experts]
            shared = hasattr(mlp, "shared")
            stages += [[("experts_in", mlp.experts, [f"{bank}.w_in"])] + (linear(mlp.shared.fc) if shared else []),
                       [("experts_out", mlp.experts, [f"{bank}.w_out"])] + (linear(mlp.shared.proj) if shared else [])]
    return stages + ([] if tied else head)


def stage_hook(kind: str, hessians: Hessians, last: bool):
    def observe(module, args, output=None):
        if kind == "head":  # the tied head's input: the final norm of the last block's output
            hessians.add(rms_norm(output[0]))
        elif kind == "linear":
            hessians.add(args[0])
        else:
            x, weights, expert_idx = args[0], args[1], args[2] if len(args) > 2 else None
            if expert_idx is None:  # soft: every expert sees every token, weighted by its gate
                expert_idx = torch.arange(weights.shape[1], device=x.device).expand_as(weights)
            for e in range(len(hessians.tokens)):
                rows, slots = (expert_idx == e).nonzero(as_tuple=True)
                xe, ge = x[rows].float(), weights[rows, slots]
                if kind == "experts_out":  # the second matmul's input: the hidden units, scaled by the routing weight
                    xe = activate(xe @ module.w_in[e].float().T, module.act, module.limit)
                hessians.add(xe, e, ge)
        if last:
            raise StopForward

    return observe


class CalibrationBatches(list):
    """Calibration's training batches, each full pass timed: the part of calibration that grows with the tokens."""

    def __init__(self, batches: list[tuple[Tensor, Tensor]], device):
        super().__init__(batches)
        self.device, self.pass_seconds = device, 0.0

    def __iter__(self):
        start = time.perf_counter()
        yield from super().__iter__()
        synchronize(self.device)
        self.pass_seconds += time.perf_counter() - start

    def tokens(self) -> int:
        return sum(x.numel() for x, _ in super().__iter__())


class CalibrationCost(NamedTuple):
    """One calibration phase's time: fixed, and per token; GPTQ's also each stage's share of it."""
    fixed: float
    per_token: float
    stages: tuple[float, ...] = ()

    @staticmethod
    def total(costs) -> "CalibrationCost":
        return CalibrationCost(sum(c.fixed for c in costs), sum(c.per_token for c in costs))

    def predicted(self, tokens: int) -> float:
        return self.fixed + self.per_token * tokens

    def seconds(self, tokens: int) -> float:
        """What is reserved for `tokens`: the predicted time with its margin."""
        return self.predicted(tokens) + CALIBRATION_MARGIN

    def tokens_within(self, seconds: float, most: int, seq_len: int) -> int:
        """Whole sequences, at most `most` tokens, whose time with its margin fits `seconds` (0: not even one)."""
        fits = (seconds - CALIBRATION_MARGIN - self.fixed) / max(self.per_token, 1e-12)
        return most if fits >= most else max(0, int(fits) // seq_len * seq_len)


# Seconds added to a rehearsed time, and held back from every GPTQ stage's plan. With one rehearsal, ten H100 runs' took
# from 24% less than predicted to 8% more; with two, five came within 2%, ending 113-364 ms under their caps.
CALIBRATION_MARGIN = 0.25


def first_sequences(batches: list[tuple[Tensor, Tensor]], sequences: int) -> list[tuple[Tensor, Tensor]]:
    subset = []
    for x, y in batches:
        if sequences > 0:
            subset.append((x[:sequences], y[:sequences]))
            sequences -= len(x)
    return subset


class StageSchedule(NamedTuple):
    """GPTQ's stages against a perf_counter deadline; `cut`: (stage, sequences) cut short."""
    cost: CalibrationCost
    deadline: float
    cut: list

    def tokens(self, stage: int, stages: int, now: float) -> float:
        """Tokens that this stage and each after it can take by the deadline less the margin, at their rehearsed
        shares of the time. A stage's solve grows with its matrices' columns and its forward with its depth: with
        equal shares every stage of a 65 s dense run on an H100 was cut and the last still ended 119 ms past the cap."""
        shares = self.cost.stages if len(self.cost.stages) == stages else (1 / stages,) * stages
        left = (self.deadline - now - CALIBRATION_MARGIN) / max(sum(shares[stage:]), 1e-12)
        return (left - self.cost.fixed) / max(self.cost.per_token, 1e-12)


@torch.no_grad()
def calibrated_levels(model: GPT, cfg: Hyperparameters, batches: list[tuple[Tensor, Tensor]], bits: dict[str, int],
                      schedule: StageSchedule | None = None, stage_seconds: list | None = None) -> dict:
    """GPTQ levels of every quantized tensor, stage by stage, from the Hessians of each matrix's inputs on training
    batches (an expert's: its tokens, by routing weight). `model`, a copy, ends holding what the artifact dequantizes
    to, and routes as the exported model throughout. Behind its `schedule`, a stage takes fewer sequences, or none
    (round to nearest): the wall holds on a machine slower than at the rehearsal. The rehearsal times each stage into
    `stage_seconds`."""
    state = model.state_dict()
    for name, t in state.items():
        if not is_quantized(name, t):
            t.copy_(stored_float(name, t))
    stages, sequences = calibration_stages(model), sum(len(x) for x, _ in batches)
    # What no stage calibrates (an untied embedding, the bigram table and projection) rounds to nearest, first.
    staged = {p for stage in stages for _, _, params in stage for p in params}
    levels = rounded_levels({n: t for n, t in state.items() if is_quantized(n, t) and n not in staged}, bits, cfg.quant_clip_sigmas)
    for name, (_, q, scale) in levels.items():
        state[name].copy_(dequantize(q, scale, state[name].shape))
    for s, stage in enumerate(stages):
        stage_batches, began = batches, time.perf_counter()
        if schedule is not None:
            fits = schedule.tokens(s, len(stages), began)
            if fits < sequences * cfg.train_seq_len:
                taken = max(int(fits) // cfg.train_seq_len, 0)
                stage_batches = first_sequences(batches, taken)
                schedule.cut.append((s, taken))
        watched = []
        for i, (kind, module, params) in enumerate(stage):
            groups = state[params[0]].shape[0] if kind.startswith("experts") else 1
            hessians = Hessians(groups, state[params[0]].shape[-1], batches[0][0].device)
            hook = stage_hook(kind, hessians, last=i == len(stage) - 1)
            handle = module.register_forward_hook(hook) if kind == "head" else module.register_forward_pre_hook(hook)
            watched.append((params, hessians, handle))
        for x, _ in stage_batches:
            try:
                with autocast(x.device):
                    model.logits(x)
            except StopForward:
                pass
        for params, hessians, handle in watched:
            handle.remove()
            b = group_bits(bits, params[0])
            joint = torch.cat([state[p] for p in params]) if len(params) > 1 else state[params[0]]
            hessian = hessians.damped(cfg.gptq_damp) if stage_batches else None  # none: GPTQ would only round
            q, scale = quantize_matrix(joint, b, cfg.quant_clip_sigmas, hessian)
            start = 0
            for p in params:  # split q, k, v back apart by their row counts
                rows = state[p].numel() // state[p].shape[-1]
                levels[p] = (b, q[start : start + rows], scale[start : start + rows])
                state[p].copy_(dequantize(*levels[p][1:], state[p].shape))
                start += rows
        if stage_seconds is not None:
            synchronize(batches[0][0].device)
            stage_seconds.append(time.perf_counter() - began)
    return levels


def levels_bytes(levels: dict) -> dict[str, float]:
    """Estimated compressed bytes per quant group: its levels' entropy plus its raw scales."""
    sizes = {}
    for name, (_, q, scale) in levels.items():
        group = quant_group(name)
        sizes[group] = sizes.get(group, 0.0) + PACKED_OVER_ENTROPY * entropy_bytes(q) + scale.numel() * scale.element_size()
    return sizes


def fit_sequences(batches: list[tuple[Tensor, Tensor]], share: float) -> list[tuple[Tensor, Tensor]]:
    """QUANT_FIT_SHARE of the calibration sequences (one at least): what the fit scores its options on."""
    return first_sequences(batches, max(1, math.ceil(share * sum(len(x) for x, _ in batches))))


@torch.no_grad()
def fit_options(model: GPT, cfg: Hyperparameters, batches: list[tuple[Tensor, Tensor]]) -> dict:
    """QUANT_FIT's options: per quant group and bits, (bytes of its rounded levels, loss increase on `batches` with
    only it rounded to nearest, which GPTQ then lowers); taken as additive over groups."""
    state = model.state_dict()

    def loss() -> float:
        total = 0.0
        for x, y in batches:
            with autocast(x.device):
                total += model.token_losses(x, y).float().mean().item()
        return total / len(batches)

    base, options = loss(), {}
    for group in dict.fromkeys(quant_group(n) for n, t in state.items() if is_quantized(n, t)):
        original = {n: t.clone() for n, t in state.items() if is_quantized(n, t) and quant_group(n) == group}
        options[group] = {}
        for b in QUANT_BITS:
            levels = rounded_levels(original, {group: b}, cfg.quant_clip_sigmas)
            for n, (_, q, scale) in levels.items():
                state[n].copy_(dequantize(q, scale, state[n].shape))
            options[group][b] = (levels_bytes(levels)[group], loss() - base)
        for n, t in original.items():
            state[n].copy_(t)
    return options


def timed_phase(batches: CalibrationBatches, run) -> CalibrationCost:
    """run()'s cost, split into its passes over `batches` and the rest."""
    start, passes = time.perf_counter(), batches.pass_seconds
    run()
    synchronize(batches.device)
    forward = batches.pass_seconds - passes
    return CalibrationCost(time.perf_counter() - start - forward, forward / max(batches.tokens(), 1))


def rehearse_calibration(model: GPT, cfg: Hyperparameters, device) -> tuple[dict[str, CalibrationCost], ...]:
    """Calibration's cost per phase, measured before the clock starts on a copy of the untrained model and the first
    batches. A fixed reserve could not hold it: the default MoE's took 10.3-10.9 s of the 10 s reserved on an H100 at
    65 s, dense's 4.4-6.9 s; on a busy 2-core CPU the quick start's took 106 s. Rehearsed twice, (cold, warm), and the
    warm one predicts: a single rehearsal, which pays the first calls, predicted up to 1.85 s (37%) more than the
    calibration after training took on an H100, seconds the loop could have trained."""
    batches = CalibrationBatches(calibration_batches(cfg, DistributedTokenLoader(cfg, device), cfg.calibration_tokens), device)
    model = copy.deepcopy(model)

    def phases() -> dict[str, CalibrationCost]:
        costs = {}
        if cfg.quant_fit:  # its passes timed on its share, counted per calibration token
            scored = CalibrationBatches(fit_sequences(batches, cfg.quant_fit_share), device)
            cost = timed_phase(scored, lambda: fit_options(model, cfg, scored))
            costs["fit"] = cost._replace(per_token=cost.per_token * scored.tokens() / batches.tokens())
        if cfg.quant_method == "gptq":
            stage_seconds = []
            cost = timed_phase(batches, lambda: calibrated_levels(copy.deepcopy(model), cfg, batches, cfg.quant_bits,
                                                                  stage_seconds=stage_seconds))
            costs["gptq"] = cost._replace(stages=tuple(t / sum(stage_seconds) for t in stage_seconds))
        return costs

    return phases(), phases()


def choose_bits(options: dict, budget: float, cfg: Hyperparameters, log: "RunLog") -> dict[str, int]:
    chosen = fit_bits(options, budget)
    if chosen is None:
        smallest = sum(min(b for b, _ in o.values()) for o in options.values())
        raise RunFailed(f"QUANT_FIT: nothing fits: the smallest bits are estimated at {smallest:,.0f} bytes of weights, "
                        f"over the {budget:,.0f} left under ARTIFACT_LIMIT_BYTES={cfg.artifact_limit_bytes} less the "
                        f"code, the float tensors and QUANT_FIT_MARGIN_BYTES={cfg.quant_fit_margin_bytes}", 4)
    log.metrics("quant_fit", **{f"{g}_bits": b for g, b in chosen.items()}, budget_bytes=round(budget),
                est_bytes=round(sum(options[c][b][0] for c, b in chosen.items())),
                est_loss_increase=sum(options[c][b][1] for c, b in chosen.items()))
    return chosen


# -----------------------------------------------------------------------------
# TRAINING
# -----------------------------------------------------------------------------

def autocast(device):
    return torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# Inductor's mix-order reduction ran at ~15% of memory bandwidth in torch 2.11: 8 ms a micro-step, 16% of a dense step.
torch._inductor.config.triton.mix_order_reduction = False


def init_device(cfg: Hyperparameters) -> tuple[torch.device, bool]:
    """(this rank's device, whether distributed): TF32 on GPUs, a share of the cores on CPUs, torchrun's group."""
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    device = torch.device("cuda", cfg.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1  # a container's
        torch.set_num_threads(max(1, cores // cfg.world_size))
    if distributed:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
    return device, distributed


def compiled(fn, cfg: Hyperparameters, graphs: bool = False):
    mode = "reduce-overhead" if graphs else None
    return torch.compile(fn, dynamic=False, fullgraph=True, mode=mode) if cfg.compile else fn


def step_graphs(cfg: Hyperparameters, device, distributed: bool) -> bool:
    """CUDA graphs for the training step: compiled, on a GPU, without torchrun (DDP with graphs is not measured)."""
    return bool(cfg.cuda_graphs and cfg.compile) and device.type == "cuda" and not distributed


def train_step(cfg: Hyperparameters, model: GPT, train_model: nn.Module, optimizers: list, loader, looped: bool = True) -> Tensor:
    """One optimizer step (train_model: compiled and/or DDP; looped: with recurrence) -> mean loss, no host sync."""
    distributed = isinstance(train_model, DDP)
    graphs = step_graphs(cfg, model.tok_emb.weight.device, distributed)
    if graphs:  # gradients accumulate into .grad made here, not into a graph's output, which the next replay overwrites
        for p in model.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
    for m in model.modules():
        if isinstance(m, MoEMLP):
            m.reset_routing()
    total = torch.zeros((), device=model.tok_emb.weight.device)
    for micro in range(cfg.grad_accum_steps):
        if distributed:
            train_model.require_backward_grad_sync = micro == cfg.grad_accum_steps - 1
        x, y = loader.next_batch()
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with autocast(x.device):
            loss = train_model(x, y, looped)
        (loss / cfg.grad_accum_steps).backward()
        total += loss.detach()
    if cfg.grad_clip_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip_norm)
    for opt in optimizers:
        opt.step()
    model.zero_grad(set_to_none=not graphs)
    balance_router_biases(model, cfg.router_bias_rate)
    return total / cfg.grad_accum_steps


# A long stage (warm-up, export, evaluations) gets a `progress` line after this many silent seconds: never 30 s silent.
PROGRESS_SECONDS = 25


class RunLog:
    """key:value lines to stdout and logs/<RUN_ID>.txt, the same as JSON lines, and optionally wandb; rank 0 only."""

    def __init__(self, cfg: Hyperparameters, master: bool, text_path: Path, json_path: Path):
        self.master, self.wandb, self.step = master, None, 0
        self.lock, self.closing, self.stage, self.done = threading.Lock(), threading.Event(), None, None
        if not master:
            return
        Path("logs").mkdir(exist_ok=True)
        self.text_file = open(text_path, "w", encoding="utf-8")
        self.json_file = open(json_path, "w", encoding="utf-8")
        if cfg.wandb:
            import wandb
            try:
                self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "moe-golf"), name=cfg.run_id, config=vars(cfg))
            except Exception as e:  # wandb's own errors: the server unreachable, the key refused
                raise RunFailed(f"WANDB=1: wandb.init failed ({' '.join(str(e).split())[:300]})", 1) from None
        self.last_line = self.stage_start = time.monotonic()
        self.heartbeat = threading.Thread(target=self._heartbeat, daemon=True)
        self.heartbeat.start()

    def text(self, line: str, echo: bool = True):
        if self.master:
            with self.lock:
                if echo:
                    tqdm.write(line)  # above the progress bar, if one is drawn
                    sys.stdout.flush()
                    self.last_line = time.monotonic()
                self.write(self.text_file, line)

    def begin(self, stage: str, **values):
        """A stage's `<stage>_start` line; its progress lines name it until the next."""
        self.stage, self.stage_start, self.done = stage, time.monotonic(), None
        self.metrics(f"{stage}_start", **values)

    def _heartbeat(self):
        while not self.closing.wait(1.0):
            self.beat(time.monotonic())

    def beat(self, now: float):
        if self.stage and now - self.last_line >= PROGRESS_SECONDS:
            done = "" if self.done is None else f" done:{self.done}"
            self.text(f"progress stage:{self.stage} elapsed_s:{now - self.stage_start:.0f}{done}")

    def metrics(self, event: str, **values):
        """A key:value line in the text log and on stdout, and a JSON line."""
        if self.master:
            self.text(f"{event} " + " ".join(f"{k}:{_show(k, v)}" for k, v in values.items()))
            self.record(event, **values)

    def record(self, event: str, **values):
        """JSON line (and wandb) only: per-expert vectors too long for a text line."""
        if not self.master:
            return
        self.write(self.json_file, json.dumps({"event": event, "time": time.time(), **values}))
        if self.wandb is not None:
            prefix = f"{event}/layer{values['layer']}/" if "layer" in values else f"{event}/"
            numbers = {}
            for k, v in values.items():
                if isinstance(v, list):  # per-expert vectors: one chart line per expert
                    numbers.update({f"{prefix}{k}/{j}": x for j, x in enumerate(v)})
                elif isinstance(v, (int, float)) and k not in ("step", "layer"):
                    numbers[prefix + k] = v
            # wandb refuses a step below its last one: events without a step take the latest.
            self.step = values.get("step", self.step)
            self.wandb.log(numbers, step=self.step)

    @staticmethod
    def write(file, line: str):
        try:
            file.write(line + "\n")
            file.flush()
        except OSError as e:  # a full disk: the run stops now, not after training; a failed flush names no file
            raise OSError(e.errno, e.strerror, file.name) from None

    def close(self):
        if self.master:
            self.closing.set()
            self.heartbeat.join()
            self.text_file.close()
            self.json_file.close()
            if self.wandb is not None:
                self.wandb.finish()


def _show(key: str, value) -> str:
    if isinstance(value, list):
        return ",".join(_show(key, v) for v in value)
    if isinstance(value, float):
        return f"{value:.{8 if key.endswith(('loss', 'bpb')) else 4}f}"
    return str(value)


def environment_report(device) -> str:
    lines = [f"python {platform.python_version()} torch {torch.__version__} numpy {np.__version__} "
             f"sentencepiece {spm.__version__} brotli {brotli.__version__} platform {platform.platform()}"]
    if device.type == "cuda":
        lines.append(f"cuda {torch.version.cuda} gpu {torch.cuda.get_device_name(device)}")
        if quack is not None:
            lines.append(" ".join(f"{d.metadata['Name']} {d.version}" for d in importlib.metadata.distributions()
                                  if d.metadata["Name"] in ("quack-kernels", "nvidia-cutlass-dsl"))
                         or "quack-kernels (a source checkout, no installed package)")
        try:
            lines.append(subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout)
        except (OSError, subprocess.SubprocessError) as e:
            lines.append(f"nvidia-smi unavailable: {e}")
    else:
        lines.append(f"cpu threads {torch.get_num_threads()}")
    return "\n".join(lines)


def lr_scale(cfg: Hyperparameters, step: int, elapsed_ms: float, loop_ms: float) -> float:
    """1 until the warmdown, then linear to 0 at the first limit: ITERATIONS, or the loop's share of the cap (loop_ms,
    inf for none) at the mean step time. (Timed to the cap alone, a run ended by ITERATIONS never decays.)"""
    if cfg.warmdown_iters <= 0:
        return 1.0
    remaining = max(cfg.iterations - step, 0) / cfg.warmdown_iters
    if math.isfinite(loop_ms):
        warmdown_ms = cfg.warmdown_iters * elapsed_ms / max(step, 1)
        remaining = min(remaining, max(loop_ms - elapsed_ms, 0.0) / max(warmdown_ms, 1e-9))
    return max(min(1.0, remaining), cfg.min_lr)  # MIN_LR: 0.10 in the 2026-04-23 PolarNS_MinLR record


def eta_seconds(cfg: Hyperparameters, step: int, elapsed_ms: float, loop_ms: float) -> float:
    """Training time left at the mean step time, to the first limit."""
    return min(max(cfg.iterations - step, 0) * elapsed_ms / max(step, 1), max(loop_ms - elapsed_ms, 0.0)) / 1000


def _interrupt(signum, frame):
    raise Interrupted(signum)


def main():
    report = os.environ.get("RANK", "0") == "0"  # under torchrun every rank stops alike; rank 0 says why
    if sys.argv[1:] in (["--help"], ["-h"]):  # a run does not need the help: it lives in scripts/
        sys.path.insert(0, str(Path(__file__).resolve().parent / "scripts"))
        try:
            from settings_help import settings_help
        except ImportError:  # a record's folder
            print(f"{__doc__.strip()}\n\nSettings: docs/configuration.md of the moe-golf repository.")
        else:
            print(settings_help())
        return
    for sig in STOP_SIGNALS:
        signal.signal(sig, _interrupt)
    try:
        for sig in STOPPED_IMPORTING[:1]:
            signal.raise_signal(sig)
        if sys.argv[1:]:
            raise ConfigError(f"{shlex.join(sys.argv[1:])}: train_moe.py takes no arguments; its settings are environment "
                              "variables (python train_moe.py --help lists them)")
        cfg = Hyperparameters()
        for warning in cfg.warnings if report else []:
            print(f"config_warning: {warning}", file=sys.stderr)
        check_wandb(cfg)
        sp, val_tokens = cfg.check_inputs()
        train(cfg, sp, val_tokens)
    except ConfigError as e:
        if report:
            print(f"config_error: {e}", file=sys.stderr)
        sys.exit(2)
    except (RunFailed, Interrupted, OSError) as e:
        if report:
            print(f"error: {e.filename}: {e.strerror}" if isinstance(e, OSError) else f"error: {e}", file=sys.stderr)
        sys.exit(getattr(e, "status", 1))


def master_decides(value, distributed: bool):
    """Rank 0's value on every rank: export runs on rank 0 only, and every rank must end alike."""
    if distributed:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        value = box[0]
    return value


def calibration_batches(cfg: Hyperparameters, loader: "DistributedTokenLoader", tokens: int) -> list[tuple[Tensor, Tensor]]:
    """`tokens` of the training stream (whole sequences) where training stopped: never the val split."""
    batches, taken = [], 0
    while taken < tokens:
        x, y = loader.next_batch()
        keep = min(len(x), -(-(tokens - taken) // cfg.train_seq_len))
        batches.append((x[:keep], y[:keep]))
        taken += keep * cfg.train_seq_len
    return batches


def export_artifact(model: GPT, cfg: Hyperparameters, loader, code_bytes: int, log: "RunLog",
                    costs: dict[str, CalibrationCost], seconds: float) -> tuple[dict, bytes, float, float]:
    """(bits per category or group, the packed artifact of `model` (a copy), seconds calibrating, seconds packing).
    Calibration gets `seconds` at most: fewer tokens where the rehearsed `costs` say so, or none (QUANT_*_BITS)."""
    bits = cfg.quant_bits
    start, pack_seconds = time.perf_counter(), 0.0

    def seconds_left() -> float:
        return seconds - (time.perf_counter() - start - pack_seconds)

    def pack(levels) -> bytes:
        nonlocal pack_seconds
        t = time.perf_counter()
        corrections = lqer_corrections(model.state_dict(), levels, cfg.lqer_rank, cfg.lqer_tensors) if cfg.lqer_rank else {}
        blob = pack_artifact(*quantize_state(model.state_dict(), levels, corrections), cfg.model_settings)
        pack_seconds += time.perf_counter() - t
        return blob

    def calibrated_seconds() -> float:
        return time.perf_counter() - start - pack_seconds if cfg.calibrates else 0.0

    def cut(phases: tuple[str, ...], most: int) -> int:
        """The tokens the phases can still calibrate on, logged when fewer than `most`."""
        cost = CalibrationCost.total([costs[p] for p in phases if p in costs])
        tokens = cost.tokens_within(seconds_left(), most, cfg.train_seq_len) if math.isfinite(seconds) else most
        if tokens < most:
            log.metrics("calibration_cut", phases="+".join(phases), tokens=tokens, wanted=most,
                        seconds_left=seconds_left(), predicted_s=cost.seconds(most), method="rtn" if not tokens else cfg.quant_method)
        return tokens

    tokens = cut(("fit", "gptq"), cfg.calibration_tokens) if cfg.calibrates else 0
    batches = calibration_batches(cfg, loader, tokens)

    calibrated = {}  # GPTQ's last levels

    def quantize(bits, refit: bool = False):
        """GPTQ on the batches; a refit gets what time is left, which may be fewer. With none, it keeps GPTQ's levels of
        each tensor whose bits it did not change and rounds only the others: a 65 s MoE run on an H100 refit two expert
        groups with no time left and rounded every tensor, a quantization gap of 0.0025 against the other seed's 0.0011."""
        wanted = sum(x.numel() for x, _ in batches) if cfg.quant_method == "gptq" else 0
        gptq_tokens = cut(("gptq",), wanted) if refit and wanted else wanted
        if not gptq_tokens:  # round only what changed bits: rounding all took a 65 s H100 run 76 ms past its cap
            state = model.state_dict()
            kept = {n: calibrated[n] for n in calibrated if calibrated[n][0] == group_bits(bits, n)}
            return {**kept, **rounded_levels({n: t for n, t in state.items() if n not in kept}, bits, cfg.quant_clip_sigmas)}
        schedule = StageSchedule(costs["gptq"], time.perf_counter() + seconds_left(), []) if "gptq" in costs else None
        levels = calibrated_levels(copy.deepcopy(model), cfg, first_sequences(batches, -(-gptq_tokens // cfg.train_seq_len)),
                                   bits, schedule)
        calibrated.update(levels)
        if schedule is not None and schedule.cut:
            log.metrics("calibration_cut", phases="gptq_stages", stages=len(schedule.cut), fewest_tokens=
                        min(n for _, n in schedule.cut) * cfg.train_seq_len, wanted=gptq_tokens, seconds_left=seconds_left())
        return levels

    if not cfg.quant_fit or not tokens:
        return bits, pack(quantize(bits)), calibrated_seconds(), pack_seconds
    floats = quantize_state({n: t for n, t in model.state_dict().items() if not is_quantized(n, t)}, {})
    fixed_bytes = (code_bytes + len(json.dumps(floats[0])) + sum(a.nbytes for a in floats[1].values())
                   + lqer_bytes(model.state_dict(), cfg.lqer_rank, cfg.lqer_tensors))
    budget = cfg.artifact_limit_bytes - cfg.quant_fit_margin_bytes - fixed_bytes
    options = fit_options(model, cfg, fit_sequences(batches, cfg.quant_fit_share))
    for group, choices in options.items():
        for b, (size, loss) in choices.items():
            log.metrics("quant_fit_option", group=group, bits=b, est_bytes=round(size), loss_increase=loss)
    for fit in range(3):
        bits = choose_bits(options, budget, cfg, log)
        levels = quantize(bits, refit=fit > 0)
        blob = pack(levels)
        # The margin is the estimates' room; the packed bytes are exact, so only the cap sends the fit back. A 65 s
        # H100 MoE came 6.7 KB into the margin, 43 KB under the cap, and its refit, with no time left, rounded the
        # embedding to 7 bits: a quantization gap of 0.0024 where the same seed's GPTQ had given 0.0011.
        if code_bytes + len(blob) <= cfg.artifact_limit_bytes:
            return bits, blob, calibrated_seconds(), pack_seconds
        # The sizes are estimates (zstd once landed 384 KB over, docs/study.md): refit with them scaled to the bytes.
        sizes = levels_bytes(levels)
        scale = (code_bytes + len(blob) - fixed_bytes) / sum(sizes.values())
        log.metrics("quant_fit_over", artifact_bytes=code_bytes + len(blob), est_bytes=round(sum(sizes.values()) + fixed_bytes),
                    limit=cfg.artifact_limit_bytes)
        options = {c: {b: (size * scale * sizes[c] / o[bits[c]][0], loss) for b, (size, loss) in o.items()}
                   for c, o in options.items()}
    raise RunFailed(f"QUANT_FIT: the artifact stayed over ARTIFACT_LIMIT_BYTES={cfg.artifact_limit_bytes:,} after 3 fits", 4)


def in_progress(path: Path) -> Path:
    """A run's file until it has succeeded: a failed run never replaces a finished one's."""
    return path.with_name(path.name + ".partial")


@contextlib.contextmanager
def run_lock(path: Path, master: bool, distributed: bool):
    """logs/<RUN_ID>.lock, held by rank 0: two runs of one RUN_ID would write the same files. The OS frees it however
    the run ends. The file stays, with the last pid: removed, a waiting run could lock a file no other sees."""
    lock, refusal = None, None
    if master:
        try:
            path.parent.mkdir(exist_ok=True)
            lock = open(path, "a+")
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            lock.truncate(0)
            lock.write(str(os.getpid()))
            lock.flush()
        except BlockingIOError:
            lock.seek(0)
            refusal = f"process {lock.read() or '(starting)'} is running it (lock {path}); wait, or choose another RUN_ID"
        except OSError as e:  # a full disk
            refusal = f"{path}: {e.strerror}"
    try:
        if refusal := master_decides(refusal, distributed):
            raise ConfigError(f"RUN_ID={path.stem}: {refusal}")
        yield
    finally:
        if lock is not None:
            lock.close()


def settle_files(final: list[Path], succeeded: bool) -> None:
    """Final names on success. A failed run's artifact and checkpoint go; its logs take them unless a run succeeded."""
    logs, finished_before = final[:2], final[2].exists()
    for path in final:
        if succeeded or (path in logs and not finished_before):
            os.replace(in_progress(path), path) if in_progress(path).exists() else path.unlink(missing_ok=True)
        elif path not in logs:
            in_progress(path).unlink(missing_ok=True)


def train(cfg: Hyperparameters, sp: spm.SentencePieceProcessor, val_tokens: Tensor):
    device, distributed = init_device(cfg)
    master = cfg.rank == 0
    # Every rank must agree on the run id: it names the artifact that all ranks read back.
    cfg.run_id = master_decides(cfg.run_id or f"{time.strftime('%Y%m%d_%H%M%S')}_{uuid.uuid4().hex[:6]}", distributed)
    final = [Path("logs") / f"{cfg.run_id}.txt", Path("logs") / f"{cfg.run_id}.jsonl",
             Path("artifacts") / f"{cfg.run_id}.moe", Path("artifacts") / f"{cfg.run_id}.fp32.pt"]
    log, succeeded = None, False
    try:
        with run_lock(Path("logs") / f"{cfg.run_id}.lock", master, distributed):
            try:
                log = RunLog(cfg, master, *map(in_progress, final[:2]))
                run(cfg, sp, val_tokens, device, distributed, log, final[2], final[3])
                succeeded = True
            except (ConfigError, RunFailed, Interrupted, OSError) as e:  # a later shard, a diverged run, a signal: logged
                failure = RunFailed(f"{e.filename}: {e.strerror}", 1) if isinstance(e, OSError) else e
                if log is not None:
                    with contextlib.suppress(OSError):  # a full disk may refuse either log
                        log.record("error", message=str(failure), status=getattr(failure, "status", 2))
                    with contextlib.suppress(OSError):
                        log.text(f"{'config_error' if isinstance(e, ConfigError) else 'error'}: {failure}", echo=False)
                traceback.clear_frames(e.__traceback__)  # frees the DDP model before its process group goes (see run's end)
                raise failure from None
            finally:
                handlers = [signal.signal(sig, signal.SIG_IGN) for sig in STOP_SIGNALS]  # settling is not cut short
                with contextlib.suppress(OSError):
                    if log is not None:
                        log.close()
                if master:
                    settle_files(final, succeeded)
                for sig, handler in zip(STOP_SIGNALS, handlers):
                    signal.signal(sig, handler)
    finally:
        if distributed:
            dist.destroy_process_group()


def run(cfg, sp, val_tokens, device, distributed, log, artifact_path: Path, fp32_path: Path):
    master = cfg.rank == 0
    for text in (SOURCE.decode("utf-8"), "=" * 100, environment_report(device), "=" * 100):  # the source as counted
        log.text(text, echo=False)
    for key, value in vars(cfg).items():
        if key not in ("settings", "model_settings", "warnings"):  # repeats of the launch line and the others
            log.text(f"config {key}:{value}", echo=key == "launch")  # all in the log; on screen, the command
    for warning in cfg.warnings:
        log.text(f"config_warning: {warning}", echo=False)
    log.metrics("paths", text_log=f"logs/{cfg.run_id}.txt", json_log=f"logs/{cfg.run_id}.jsonl", artifact=str(artifact_path))

    torch.manual_seed(cfg.seed)
    tables = build_byte_tables(sp, device)
    model = GPT(cfg).to(device)
    optimizers = build_optimizers(model, cfg)
    train_model = compiled(model, cfg, step_graphs(cfg, device, distributed))
    if distributed:
        # No buffer broadcast each forward: router biases move alike on every rank (torch 2.13 renamed the flag).
        no_sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters else "broadcast_buffers"
        train_model = DDP(train_model, device_ids=[cfg.local_rank] if device.type == "cuda" else None, **{no_sync: False})
    eval_losses = compiled(model.token_losses, cfg)
    params = parameter_report(model)
    grouped = cfg.mlp_mode in ("sparse", "shared_routed")  # dense and soft run no grouped matmul
    log.metrics("model", params=params.pop("total"), active_params=params.pop("active"), **params,
                muon_matrices=len(muon_params(model)), val_tokens=val_tokens.numel() - 1, world_size=cfg.world_size,
                grad_accum_steps=cfg.grad_accum_steps, expert_kernel=cfg.expert_kernel if grouped else "none",
                cuda_graphs=int(step_graphs(cfg, device, distributed)))

    def set_schedule(step: int, scale: float):
        frac = min(step / cfg.muon_momentum_warmup_steps, 1.0) if cfg.muon_momentum_warmup_steps else 1.0
        for group in optimizers[1].param_groups:
            group["momentum"] = (1 - frac) * cfg.muon_momentum_warmup_start + frac * cfg.muon_momentum
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * scale

    # Compile warm-up: real steps build every graph before the clock starts, then roll back (weights, optimizer, data).
    if cfg.warmup_steps > 0 and cfg.compile:  # eager runs have nothing to warm up
        log.begin("warmup", steps=cfg.warmup_steps)
        t0 = time.perf_counter()
        initial_model = copy.deepcopy(model.state_dict())
        initial_opts = [copy.deepcopy(opt.state_dict()) for opt in optimizers]
        warmup_loader = DistributedTokenLoader(cfg, device)
        for i in range(cfg.warmup_steps):  # with recurrence, its graph and the one before it
            set_schedule(0, 1.0)
            train_step(cfg, model, train_model, optimizers, warmup_loader, looped=i % 2 == 1 or not cfg.recur_layers)
        model.load_state_dict(initial_model)
        for opt, state in zip(optimizers, initial_opts):
            opt.load_state_dict(state)
        synchronize(device)
        log.metrics("warmup", steps=cfg.warmup_steps, seconds=time.perf_counter() - t0)

    def check_finite(first_nonfinite: Tensor):
        """One read of the device-side flag, at steps that sync anyway: no extra host sync per step."""
        if distributed:
            dist.all_reduce(first_nonfinite, op=dist.ReduceOp.MAX)
        if first_nonfinite.item():
            raise RunFailed(f"non-finite train loss (first at step {first_nonfinite.item()})", 3)

    # The hard wall: the loop gets what calibration's rehearsed time leaves of the cap (rank 0's measurement, for all).
    cap_ms = 1000 * cfg.max_wallclock_seconds if cfg.max_wallclock_seconds > 0 else math.inf
    costs = {}
    if cfg.calibrates and math.isfinite(cap_ms):
        log.begin("calibration_rehearsal", tokens=cfg.calibration_tokens, quant_fit=int(cfg.quant_fit), method=cfg.quant_method)
        t0 = time.perf_counter()
        cold, costs = master_decides(rehearse_calibration(model, cfg, device) if master else None, distributed)
        reserve_ms = 1000 * CalibrationCost.total(list(costs.values())).seconds(cfg.calibration_tokens)
        cold_s = sum(c.predicted(cfg.calibration_tokens) for c in cold.values())
        phases = {f"{p}_{part}_s": v for p, c in costs.items() for part, v in (("fixed", c.fixed), ("tokens", c.per_token * cfg.calibration_tokens))}
        shares = {"gptq_stage_shares": list(costs["gptq"].stages)} if "gptq" in costs else {}
        log.metrics("calibration_rehearsal", **phases, **shares, tokens=cfg.calibration_tokens, reserve_ms=round(reserve_ms),
                    cold_s=cold_s, seconds=time.perf_counter() - t0)
        if reserve_ms >= cap_ms:
            raise ConfigError(f"MAX_WALLCLOCK_SECONDS={cfg.max_wallclock_seconds:g}: calibration on CALIBRATION_TOKENS="
                              f"{cfg.calibration_tokens} was measured at {reserve_ms / 1000:.1f} s with its margin, which "
                              f"leaves no time to train; lower CALIBRATION_TOKENS, or QUANT_METHOD=rtn QUANT_FIT=0")
        loop_ms = cap_ms - reserve_ms
    else:
        loop_ms = cap_ms

    loader = DistributedTokenLoader(cfg, device)
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    telemetry = RouterTelemetry(model, cfg.router_alert_min_load, cfg.router_alert_patience)
    first_nonfinite = torch.zeros((), dtype=torch.int64, device=device)  # step of the first non-finite loss; 0 = none
    train_ms, step, stop_at = 0.0, 0, None
    looped = not cfg.recur_layers or cfg.recur_start_frac == 0  # depth recurrence switched on
    # A step bar on a terminal only (stderr): never in the logs, nor in redirected output.
    progress = tqdm(total=cfg.iterations, unit="step", leave=False, disable=not (master and sys.stderr.isatty()))
    log.begin("train", iterations=cfg.iterations, loop_seconds=loop_ms / 1000 if math.isfinite(loop_ms) else 0,
              batch_tokens=cfg.train_batch_tokens)
    synchronize(device)
    t0 = time.perf_counter()
    while True:
        last = step == cfg.iterations or (stop_at is not None and step >= stop_at)
        if not last and cfg.val_loss_every and step % cfg.val_loss_every == 0:
            synchronize(device)
            train_ms += 1000 * (time.perf_counter() - t0)
            val_loss, val_bpb = evaluate(lambda x, y: eval_losses(x, y, looped), val_tokens, tables, cfg, device, stride=0)
            log.metrics("val", step=step, val_loss=val_loss, val_bpb=val_bpb, train_time_ms=round(train_ms),
                        step_avg_ms=train_ms / max(step, 1))
            synchronize(device)
            t0 = time.perf_counter()
        if last:
            break
        elapsed_ms = train_ms + 1000 * (time.perf_counter() - t0)
        scale = lr_scale(cfg, step, elapsed_ms, loop_ms)
        set_schedule(step, scale)
        train_loss = train_step(cfg, model, train_model, optimizers, loader, looped)
        telemetry.accumulate()
        if ema is not None:
            ema.update()
        step += 1
        first_nonfinite = torch.where((first_nonfinite == 0) & ~torch.isfinite(train_loss), step, first_nonfinite)
        elapsed_ms = train_ms + 1000 * (time.perf_counter() - t0)
        eta = eta_seconds(cfg, step, elapsed_ms, loop_ms)
        progress.total = step + round(1000 * eta * step / elapsed_ms)
        progress.update()
        log.done = step
        # Stop before a step that would end past the loop's share: at most one step early.
        reached_cap = elapsed_ms + elapsed_ms / step > loop_ms
        loop_next = looped or max(step / cfg.iterations, elapsed_ms / loop_ms) >= cfg.recur_start_frac
        if distributed and math.isfinite(loop_ms):
            # Every rank must stop at the same step, and loop alike, or the next collective deadlocks.
            flags = torch.tensor([int(reached_cap), int(loop_next)], device=device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            reached_cap, loop_next = map(bool, flags.tolist())
        if loop_next and not looped:
            looped = True
            log.metrics("recurrence", step=step, train_time_ms=round(elapsed_ms), layers=len(layer_order(cfg, True)))
        # The last step is always logged: the logs and the dashboard end where the run did.
        if step % cfg.train_log_every == 0 or step <= 10 or step == cfg.iterations or reached_cap:
            check_finite(first_nonfinite)
            if distributed:
                dist.all_reduce(train_loss, op=dist.ReduceOp.AVG)
            log.metrics("train", step=step, train_loss=train_loss.item(), lr_scale=scale, train_time_ms=round(elapsed_ms),
                        step_avg_ms=elapsed_ms / step, tokens_per_s=round(step * cfg.train_batch_tokens / (elapsed_ms / 1000)),
                        eta_s=round(eta))
            telemetry.report(log, step)
        if reached_cap and stop_at is None:
            stop_at = step
    progress.close()
    check_finite(first_nonfinite)

    synchronize(device)
    train_ms += 1000 * (time.perf_counter() - t0)

    export_model = copy.deepcopy(model)
    if ema is not None:
        ema.copy_to(export_model)
    code_bytes = len(pack_code(SOURCE))
    failure, calibration_ms = None, 0.0
    if master:
        log.begin("export", method=cfg.quant_method, quant_fit=int(cfg.quant_fit), calibration_tokens=cfg.calibration_tokens
                  if cfg.calibrates else 0, params=sum(p.numel() for p in export_model.parameters()))
        try:
            nonfinite = [n for n, w in export_model.state_dict().items() if not torch.isfinite(w).all()]
            if nonfinite:
                raise RunFailed(f"non-finite weights before export ({', '.join(nonfinite[:3])})", 3)
            if cfg.save_fp32:
                buffer = io.BytesIO()
                torch.save({"settings": cfg.settings, "state": export_model.state_dict()}, buffer)
                write_artifact(in_progress(fp32_path), buffer.getvalue())
            bits, blob, calibration_seconds, export_seconds = export_artifact(export_model, cfg, loader, code_bytes, log,
                                                                              costs, (cap_ms - train_ms) / 1000)
            write_artifact(in_progress(artifact_path), blob)
            calibration_ms = 1000 * calibration_seconds
            log.metrics("export_bits", **{f"{c}_bits": b for c, b in bits.items()}, method=cfg.quant_method,
                        clip_sigmas=cfg.quant_clip_sigmas, calibration_ms=round(calibration_ms),
                        predicted_ms=round(1000 * sum(c.predicted(cfg.calibration_tokens) for c in costs.values())))
        except (RunFailed, OSError) as e:  # OSError: a full disk
            failure = (str(e), e.status) if isinstance(e, RunFailed) else (f"{e.filename}: {e.strerror}", 1)
    failure = master_decides(failure, distributed)
    if failure:
        raise RunFailed(*failure)
    train_ms += calibration_ms
    stream = loader.stream
    log.metrics("train_done", steps=step, train_time_ms=round(train_ms), step_avg_ms=(train_ms - calibration_ms) / max(step, 1),
                calibration_ms=round(calibration_ms), stopped_by="wallclock" if stop_at is not None else "iterations",
                cap_slack_ms=round(cap_ms - train_ms) if math.isfinite(cap_ms) else None,
                tokens_seen=stream.tokens_read, data_passes=stream.tokens_read / stream.total_tokens,
                peak_memory_mib=round(torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda"
                                      else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))  # Linux: KiB

    def final_eval(name: str, losses_fn) -> dict:
        log.begin(name, windows=len(eval_windows(val_tokens.numel() - 1, cfg.train_seq_len, cfg.eval_stride)[0]),
                  eval_stride=cfg.eval_stride, compile=int(cfg.compile))
        t = time.perf_counter()
        val_loss, val_bpb = evaluate(losses_fn, val_tokens, tables, cfg, device, stride=cfg.eval_stride)
        return dict(val_loss=val_loss, val_bpb=val_bpb, eval_stride=cfg.eval_stride, eval_seconds=time.perf_counter() - t)

    log.metrics("final_raw", **final_eval("final_raw", eval_losses))
    if ema is not None:
        ema.copy_to(model)
        log.metrics("final_ema", **final_eval("final_ema", eval_losses))

    # Score what was written: the roundtrip score is the official one.
    if distributed:
        dist.barrier()
    fresh = GPT(cfg).to(device)
    try:
        fresh.load_state_dict(read_artifact(in_progress(artifact_path).read_bytes())[1])
    except ValueError as e:  # the disk gave back other bytes than were written
        raise RunFailed(f"{in_progress(artifact_path)}: {e}", 1) from None
    roundtrip = final_eval("final_roundtrip", compiled(fresh.token_losses, cfg))
    if master:
        model_bytes = in_progress(artifact_path).stat().st_size
        total = code_bytes + model_bytes
        finite = math.isfinite(roundtrip["val_loss"]) and math.isfinite(roundtrip["val_bpb"])
        status = "FAILED" if not finite else "OK" if total <= cfg.artifact_limit_bytes else "OVER"
        # path: where it will be once the run has succeeded; sha256: what make_record checks.
        log.metrics("artifact", code_bytes=code_bytes, model_bytes=model_bytes, artifact_bytes=total,
                    limit=cfg.artifact_limit_bytes, status=status, path=str(artifact_path), export_seconds=export_seconds,
                    sha256=hashlib.sha256(blob).hexdigest())
        log.metrics("final_roundtrip", **roundtrip)
        log.metrics("result", artifact=str(artifact_path) if status != "FAILED" else "(deleted)", artifact_bytes=total,
                    status=status, roundtrip_val_bpb=roundtrip["val_bpb"])
        failure = {"OK": None, "FAILED": ("the exported model's roundtrip score is not finite", 3),
                   "OVER": (f"artifact {total:,} bytes is over ARTIFACT_LIMIT_BYTES={cfg.artifact_limit_bytes:,}", 4)}[status]
    failure = master_decides(failure, distributed)
    if distributed:
        dist.barrier()  # no rank tears down its connections while another still uses them
        # DDP's reducer goes while its process group exists: freed after it, a gloo rank hung in the destructor about
        # once in 12 two-process CPU runs under load.
        del train_model
    if failure:
        raise RunFailed(*failure)


if __name__ == "__main__":
    main()
