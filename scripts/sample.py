"""Generate text from a moe-golf artifact, printed as it is produced.

    python scripts/sample.py artifacts/<RUN_ID>.moe --prompt "The history of" [--tokens 200] [--temperature 0.8]
        [--seed 0] [--tokenizer PATH]

The artifact's own model (train_moe.py's GPT on the dequantized weights, CPU, fp32) with a KV cache: each new token
costs one position of attention instead of the whole sequence again. The prompt starts a document, as every
training document does (after BOS), and generation stops early where the model starts the next one (emits BOS).
Temperature 0 picks the likeliest token (greedy); above 0 it samples, reproducibly for a --seed. Past the run's
TRAIN_SEQ_LEN the model sees positions it never trained on. The tokenizer is the one the artifact records (its name
and SHA-256), found beside the artifact or at the path the run used, or --tokenizer; one with another hash is refused.
"""
import argparse
import contextlib
import hashlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import sentencepiece as spm
import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import train_moe as tm  # noqa: E402


def load_artifact(path: Path) -> tuple[tm.Hyperparameters, dict[str, torch.Tensor]]:
    """The model an artifact holds: its settings (as Hyperparameters) and its dequantized weights."""
    try:
        settings, state = tm.read_artifact(Path(path).read_bytes())
        if not settings:
            raise ValueError("the artifact has no model settings to rebuild its model from")
        cfg = tm.Hyperparameters(settings)
    except ValueError as e:  # tm.ConfigError too: settings this train_moe.py cannot build
        raise ValueError(f"{path}: {e}") from None
    cfg.model_settings = settings  # as packed: the model's settings and its tokenizer's record
    return cfg, state


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_tokenizer(artifact: Path, cfg: tm.Hyperparameters, given: Path | None = None) -> tuple[Path, spm.SentencePieceProcessor]:
    """The tokenizer the artifact's model was trained with: `given`, else the file its record names, beside the
    artifact or at the path the run used (as given, then from the repo root). With a record, its SHA-256 must match;
    an older artifact without one takes `given` or the TOKENIZER_PATH default, checked by its size only."""
    recorded, path = cfg.model_settings.get("TOKENIZER_SHA256"), Path(cfg.tokenizer_path)
    candidates = list(dict.fromkeys([given] if given else [artifact.parent / path.name, path, REPO / path] if recorded else [path]))
    found = [p for p in candidates if p.is_file()]
    if not found:
        raise ValueError(f"{', '.join(map(str, candidates))}: no such tokenizer; pass the run's with --tokenizer")
    if recorded:
        matching = [p for p in found if sha256(p) == recorded]
        if not matching:
            raise ValueError(f"{found[0]}: SHA-256 {sha256(found[0])[:12]}..., but {artifact} was trained with {path.name} "
                             f"of SHA-256 {recorded[:12]}...; pass that tokenizer with --tokenizer")
        found = matching
    try:
        sp = spm.SentencePieceProcessor(model_file=str(found[0]))
    except (RuntimeError, OSError) as e:
        raise ValueError(f"{found[0]}: not a SentencePiece model ({e})") from None
    if sp.vocab_size() != cfg.vocab_size:
        raise ValueError(f"{found[0]}: {sp.vocab_size()} pieces, but the model has VOCAB_SIZE={cfg.vocab_size}")
    return found[0], sp


def load_model(path: Path) -> tuple[tm.Hyperparameters, tm.GPT]:
    """The artifact's model in eval mode; every way a file can fail to be one is a ValueError naming it."""
    if not Path(path).is_file():
        raise ValueError(f"{path}: no such artifact")
    cfg, state = load_artifact(path)
    model = tm.GPT(cfg)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{path}: its tensors do not fit train_moe.py's model for its settings "
                         f"({str(e).splitlines()[1].strip()})") from None
    return cfg, model.eval()


class CachedAttention(nn.Module):
    """tm.Attention (its weights) over the new positions only (the prompt, then one token per call), attending to the
    keys and values kept from earlier calls. Attention is the only part of the model that mixes positions, so with it swapped in, GPT.logits of the
    new tokens alone is the forward of the whole sequence at those positions."""

    def __init__(self, attn: tm.Attention):
        super().__init__()
        self.attn, self.keys, self.values = attn, None, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.attn
        B, T, D = x.shape
        start = 0 if self.keys is None else self.keys.size(2)
        if start and T > 1:
            raise ValueError("CachedAttention continues one token at a time after the prompt")
        q = a.q(x).view(B, T, a.num_heads, a.head_dim).transpose(1, 2)
        k = a.k(x).view(B, T, a.num_kv_heads, a.head_dim).transpose(1, 2)
        v = a.v(x).view(B, T, a.num_kv_heads, a.head_dim).transpose(1, 2)
        tables = (a.rope_cos, a.rope_sin)  # TRAIN_SEQ_LEN positions made once; rotary makes longer ones itself
        q = tm.rotary(tm.rms_norm(q), a.rope_base, start, a.rope_dims, tables) * a.q_gain.to(x.dtype)[:, None, None]
        k = tm.rotary(tm.rms_norm(k), a.rope_base, start, a.rope_dims, tables)
        self.keys = k if self.keys is None else torch.cat([self.keys, k], dim=2)
        self.values = v if self.values is None else torch.cat([self.values, v], dim=2)
        y = F.scaled_dot_product_attention(q, self.keys, self.values, is_causal=T > 1, enable_gqa=a.num_kv_heads != a.num_heads)
        return a.output(y, v, x)


@contextlib.contextmanager
def kv_cache(model: tm.GPT):
    """While open, model.logits(ids) continues the sequence fed so far instead of starting a new one."""
    originals = [block.attn for block in model.blocks]
    for block in model.blocks:
        block.attn = CachedAttention(block.attn)
    try:
        yield model
    finally:
        for block, attn in zip(model.blocks, originals):
            block.attn = attn


@torch.no_grad()
def generate(model: tm.GPT, prompt: list[int], max_tokens: int, temperature: float = 0.0, seed: int = 0,
             stop: int | None = None) -> Iterator[int]:
    """Up to max_tokens ids after `prompt`, one at a time; ends before `stop`. SmearGate and BigramHash read the token
    before, and depth recurrence runs blocks twice: those models recompute the whole sequence for each token (slower,
    the same text) instead of continuing a cache."""
    generator = torch.Generator().manual_seed(seed)
    cached = not (hasattr(model, "smear") or hasattr(model, "bigram") or model.orders[0] != model.orders[1])
    with kv_cache(model) if cached else contextlib.nullcontext():
        ids = torch.tensor([prompt])
        for _ in range(max_tokens):
            logits = model.logits(ids)[0][0, -1]
            if temperature == 0:
                token = int(logits.argmax())
            else:  # float64, less the max: a tiny temperature (1e-300) sends the rest to -inf, not to inf - inf
                scaled = (logits.double() - logits.max()) / temperature
                token = int(torch.multinomial(scaled.softmax(-1), 1, generator=generator))
            if token == stop:
                return
            yield token
            ids = torch.tensor([[token]]) if cached else torch.cat([ids, torch.tensor([[token]])], dim=1)


def text_pieces(sp: spm.SentencePieceProcessor, prompt: list[int], tokens: Iterator[int]) -> Iterator[str]:
    """The text each token adds. Decoded with everything before it (a piece's leading space depends on its place);
    held back while it ends inside a character whose bytes are still coming (byte-fallback pieces)."""
    ids, shown = list(prompt), sp.decode(prompt)
    for token in tokens:
        ids.append(token)
        text = sp.decode(ids)
        if not text.endswith("\ufffd") and text.startswith(shown):
            yield text[len(shown):]
            shown = text
    text = sp.decode(ids)
    if text.startswith(shown) and text != shown:
        yield text[len(shown):]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", type=Path, help="artifacts/<RUN_ID>.moe written by train_moe.py")
    parser.add_argument("--prompt", required=True, help="the text to continue")
    parser.add_argument("--tokens", type=int, default=200, help="how many tokens to generate at most")
    parser.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    parser.add_argument("--seed", type=int, default=0, help="0 to 2**64 - 1")
    parser.add_argument("--tokenizer", type=Path, help="the run's SentencePiece model (default: the one the artifact "
                        "records, found beside it or where the run read it)")
    args = parser.parse_args(argv)
    try:
        if not args.prompt:
            raise ValueError("--prompt is empty; give some text to continue")
        if args.tokens < 1:
            raise ValueError(f"--tokens {args.tokens}: generate at least 1")
        if not args.temperature >= 0 or args.temperature == float("inf"):
            raise ValueError(f"--temperature {args.temperature}: a finite number >= 0")
        if not 0 <= args.seed < 2**64:  # what torch's generator takes
            raise ValueError(f"--seed {args.seed}: an integer from 0 to 2**64 - 1")
        try:
            args.prompt.encode("utf-8")
        except UnicodeEncodeError:  # argv bytes that are not UTF-8 arrive as lone surrogates
            raise ValueError("--prompt holds bytes that are not UTF-8 text") from None
        cfg, model = load_model(args.artifact)
        _, sp = load_tokenizer(args.artifact, cfg, args.tokenizer)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    bos = sp.bos_id() if sp.bos_id() >= 0 else None
    prompt = ([bos] if bos is not None else []) + sp.encode(args.prompt)
    try:
        print(sp.decode(prompt), end="", flush=True)
        for piece in text_pieces(sp, prompt, generate(model, prompt, args.tokens, args.temperature, args.seed, stop=bos)):
            print(piece, end="", flush=True)
        print(flush=True)
    except OSError as e:  # stdout on a full disk
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the text still buffered goes nowhere at exit
        print(f"error: stdout: {e.strerror}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
