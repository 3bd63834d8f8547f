"""Export a moe-golf artifact as a Hugging Face transformers model folder.

    python scripts/export_hf.py artifacts/<RUN_ID>.moe --out hf/<RUN_ID> [--layout fused|per-expert|mlx]
        [--tokenizer PATH]

writes model.safetensors (the dequantized weights, fp32), config.json, generation_config.json, modeling_moe_golf.py
and the run's tokenizer (tokenizer.json, tokenizer_config.json), which load offline:

    AutoTokenizer.from_pretrained("hf/<RUN_ID>", trust_remote_code=True)
    AutoModelForCausalLM.from_pretrained("hf/<RUN_ID>", trust_remote_code=True)

The tokenizer is the one the artifact records (found as scripts/sample.py finds it, or --tokenizer; its SHA-256 must
match), converted for transformers: it encodes as SentencePiece does and starts every text with BOS, as every training
document starts; generate stops where the model starts the next document (emits BOS).

--layout is how the routed experts are stored (names in scripts/hf_layouts.py and modeling_moe_golf.py): fused, one
[E, 2F, D] gate_up_proj bank per layer, as transformers v5; per-expert, one set of Linear weights per expert, as
transformers v4 and most tools; mlx, mlx-lm's switch_mlp banks. Hash-routed layers' tables are written as tensors
(mlp.gate.tid2eid). train_moe's model techniques (MLP_ACT, EXPERT_ACT, ROPE_DIMS, XSA_LAST_N, LN_SCALE, SMEAR_GATE,
BIGRAM_BUCKETS, ATTN_GATE, PARALLEL_LAYERS, RECUR_LAYERS) are config.json keys that modeling_moe_golf.py's docstring
lists; LQER's corrections are in the dequantized weights. Before the folder appears, the written files are loaded back
and must give train_moe's logits on random tokens, and the tokenizer SentencePiece's ids on sample texts: what they
cannot reproduce is refused, with nothing written. So is an --out that exists and is not empty.
"""
import argparse
import json
import re
import shutil
import sys
from pathlib import Path

import sentencepiece as spm
import torch
import transformers
from safetensors.torch import save_file
from tokenizers import processors
from transformers import GenerationConfig, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_moe as tm  # noqa: E402
from hf_layouts import LAYOUTS, check_new_folder, convert, new_folder  # noqa: E402
from modeling_moe_golf import MoeGolfForCausalLM  # noqa: E402
from sample import load_model, load_tokenizer  # noqa: E402

MODELING = Path(__file__).with_name("modeling_moe_golf.py")
# fp32 on both sides; what is left is summation order (~1e-6). A wrong routing weight or a swapped gate is >1e-2.
LOGIT_TOLERANCE = 1e-3
# What the converted tokenizer must encode exactly as SentencePiece: spaces, tabs, newlines, NFKC folding, digits,
# byte fallback.
TOKENIZER_CHECK = ["The history of", "  two  spaces,\ttabs\nand lines  ", "ﬁne ｆｕｌｌ-width 2026-12-03", "5€ 🙂 ü"]
RENAMES = [
    (r"tok_emb\.weight", "model.embed_tokens.weight"),
    (r"lm_head\.weight", "lm_head.weight"),
    (r"skip_weights", "model.skip_weights"),
    (r"smear\.w", "model.smear_gate.weight"),  # SMEAR_GATE
    (r"smear\.lam", "model.smear_gate.lam"),
    (r"bigram\.table", "model.bigram.embed.weight"),  # BIGRAM_BUCKETS
    (r"bigram\.proj\.weight", "model.bigram.proj.weight"),
    (r"bigram\.scale", "model.bigram.scale"),
    (r"blocks\.(\d+)\.(attn_scale|mlp_scale|resid_mix)", r"model.layers.\1.\2"),
    (r"blocks\.(\d+)\.attn\.([qkv])\.weight", r"model.layers.\1.self_attn.\2_proj.weight"),
    (r"blocks\.(\d+)\.attn\.out\.weight", r"model.layers.\1.self_attn.o_proj.weight"),
    (r"blocks\.(\d+)\.attn\.q_gain", r"model.layers.\1.self_attn.q_gain"),
    (r"blocks\.(\d+)\.attn\.gate", r"model.layers.\1.self_attn.output_gate.weight"),  # ATTN_GATE
    (r"blocks\.(\d+)\.mlp\.fc\.weight", r"model.layers.\1.mlp.up_proj.weight"),  # dense MLPs have no gate
    (r"blocks\.(\d+)\.mlp\.proj\.weight", r"model.layers.\1.mlp.down_proj.weight"),
    (r"blocks\.(\d+)\.mlp\.router", r"model.layers.\1.mlp.gate.weight"),
    (r"blocks\.(\d+)\.mlp\.router_bias", r"model.layers.\1.mlp.gate.e_score_correction_bias"),
    (r"blocks\.(\d+)\.mlp\.hash_table", r"model.layers.\1.mlp.gate.tid2eid"),
    (r"blocks\.(\d+)\.mlp\.shared_gate", r"model.layers.\1.mlp.shared_expert_gate.weight"),
    (r"blocks\.(\d+)\.mlp\.shared\.proj\.weight", r"model.layers.\1.mlp.shared_expert.down_proj.weight"),
    (r"blocks\.(\d+)\.mlp\.experts\.w_out", r"model.layers.\1.mlp.experts.down_proj"),
]


def hf_state(model: tm.GPT, cfg: tm.Hyperparameters) -> dict[str, torch.Tensor]:
    """The model's tensors under the modeling file's names, experts fused; hash tables (rebuilt from SEED by
    train_moe, so not in its state dict) included."""
    tensors = {**model.state_dict(), **{n: b for n, b in model.named_buffers() if n.endswith(".mlp.hash_table")}}
    swiglu = cfg.expert_act == "swiglu"
    out = {}
    for name, t in tensors.items():
        t = t.detach().cpu()
        if m := re.fullmatch(r"blocks\.(\d+)\.mlp\.experts\.w_in", name):
            out[f"model.layers.{m[1]}.mlp.experts.{'gate_up_proj' if swiglu else 'up_proj'}"] = t  # rows: [gate; up]
        elif m := re.fullmatch(r"blocks\.(\d+)\.mlp\.shared\.fc\.weight", name):
            shared = f"model.layers.{m[1]}.mlp.shared_expert"
            if swiglu:
                out[f"{shared}.gate_proj.weight"], out[f"{shared}.up_proj.weight"] = t.chunk(2, dim=0)
            else:
                out[f"{shared}.up_proj.weight"] = t
        else:
            for pattern, target in RENAMES:
                if re.fullmatch(pattern, name):
                    out[re.sub(pattern, target, name)] = t
                    break
            else:
                raise ValueError(f"{name}: export_hf.py has no Hugging Face name for this tensor; extend RENAMES and "
                                 "modeling_moe_golf.py together")
    return out


def hf_config(cfg: tm.Hyperparameters, layout: str) -> dict:
    return {
        "architectures": ["MoeGolfForCausalLM"], "model_type": "moe_golf",
        "auto_map": {"AutoConfig": "modeling_moe_golf.MoeGolfConfig",
                     "AutoModelForCausalLM": "modeling_moe_golf.MoeGolfForCausalLM"},
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.model_dim, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "intermediate_size": cfg.mlp_mult * cfg.model_dim, "mlp_mode": cfg.mlp_mode,
        "moe_layers": [] if cfg.mlp_mode == "dense" else list(cfg.moe_layers), "num_experts": cfg.num_experts,
        "num_experts_per_tok": cfg.top_k, "moe_intermediate_size": cfg.expert_hidden, "expert_act": cfg.expert_act,
        "shared_expert_intermediate_size": cfg.shared_hidden, "shared_expert_gate": bool(cfg.shared_gate),
        "router": cfg.router, "norm_topk_prob": bool(cfg.norm_topk_prob), "hash_layers": cfg.hash_layers,
        "routed_scaling_factor": cfg.route_scale, "swiglu_limit": cfg.swiglu_limit, "rope_theta": cfg.rope_base,
        "final_logit_softcapping": cfg.logit_softcap, "expert_layout": layout,
        "tie_word_embeddings": bool(cfg.tie_embeddings), "dtype": "float32",
        # train_moe's model techniques (modeling_moe_golf.py's docstring); their defaults leave the model as before.
        "mlp_act": cfg.mlp_act, "rotary_dim": cfg.rope_dims,
        "xsa_layers": list(range(cfg.num_layers - cfg.xsa_last_n, cfg.num_layers)), "ln_scale": bool(cfg.ln_scale),
        "smear_gate": bool(cfg.smear_gate), "bos_token_id": cfg.bos_id, "bigram_buckets": cfg.bigram_buckets,
        "bigram_dim": cfg.bigram_dim, "attn_gate": bool(cfg.attn_gate), "parallel_layers": list(cfg.parallel_layers),
        "recur_layers": list(cfg.recur_layers), "recur_loops": cfg.recur_loops,
        "train_moe_settings": cfg.model_settings,  # what the artifact was trained with, for the record
    }


@torch.no_grad()
def logit_gap(folder: Path, model: tm.GPT, cfg: tm.Hyperparameters) -> float:
    """Max |logit difference| between train_moe's model and the folder loaded by its modeling file, on random tokens."""
    loaded, info = MoeGolfForCausalLM.from_pretrained(folder, output_loading_info=True)
    problems = [f"{kind.replace('_', ' ')} {', '.join(sorted(map(str, info[kind])))}"
                for kind in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(kind)]
    if problems:
        raise ValueError(f"the exported weights do not fit modeling_moe_golf.py: {'; '.join(problems)}")
    ids = torch.randint(0, cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    expected, _ = model.logits(ids)
    return (loaded.eval()(ids).logits - expected).abs().max().item()


def hf_tokenizer(path: Path, sp: spm.SentencePieceProcessor) -> PreTrainedTokenizerFast:
    """The SentencePiece model as a transformers tokenizer: transformers' converter, which follows the model's own
    normalizer and merges, then BOS before every text, as every training document starts."""
    proto = import_protobuf().ModelProto()
    proto.ParseFromString(path.read_bytes())
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto, {p.piece: i for i, p in enumerate(proto.pieces)}, legacy=False)
    bos = sp.id_to_piece(sp.bos_id())
    backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, sp.bos_id())])
    names = {f"{kind}_token": sp.id_to_piece(i) for kind, i in (("bos", sp.bos_id()), ("eos", sp.eos_id()), ("unk", sp.unk_id()),
                                                                ("pad", sp.pad_id())) if i >= 0}
    return PreTrainedTokenizerFast(tokenizer_object=backend, **names)


def export(artifact: Path, out: Path, layout: str, tokenizer: Path | None = None) -> float:
    """Write the folder; returns the max |logit difference| it was checked with."""
    check_new_folder(out)  # before the work of loading
    cfg, model = load_model(artifact)
    tokenizer, sp = load_tokenizer(artifact, cfg, tokenizer)
    config = hf_config(cfg, layout)
    state = convert(hf_state(model, cfg), layout, cfg.num_experts)
    with new_folder(out) as folder:
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        shutil.copy2(MODELING, folder / MODELING.name)
        hf_tokenizer(tokenizer, sp).save_pretrained(folder)
        # Training documents are BOS + text with no EOS: the model ends a document by starting the next one.
        GenerationConfig(bos_token_id=sp.bos_id(), eos_token_id=sp.bos_id(), pad_token_id=max(sp.pad_id(), 0)).save_pretrained(folder)
        loaded = transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
        wrong = [text for text in TOKENIZER_CHECK if loaded(text)["input_ids"] != [sp.bos_id()] + sp.encode(text)]
        if wrong:
            raise ValueError(f"{tokenizer}: converted for transformers, it encodes {wrong[0]!r} unlike SentencePiece; "
                             "not exported")
        gap = logit_gap(folder, model, cfg)
        if not gap < LOGIT_TOLERANCE:
            raise ValueError(f"{artifact}: the exported model's logits differ from train_moe's by up to {gap:.3g} "
                             f"(> {LOGIT_TOLERANCE:g}); modeling_moe_golf.py does not reproduce this model, "
                             "not exported")
    return gap


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", type=Path, help="artifacts/<RUN_ID>.moe written by train_moe.py")
    parser.add_argument("--out", required=True, type=Path, help="a new (or empty) folder")
    parser.add_argument("--layout", choices=LAYOUTS, default="fused", help="how the routed experts are stored")
    parser.add_argument("--tokenizer", type=Path, help="the run's SentencePiece model (default: the one the artifact "
                        "records, found beside it or where the run read it)")
    args = parser.parse_args(argv)
    transformers.utils.logging.disable_progress_bar()  # the check's "Loading weights" bar, on stderr with the errors
    try:
        gap = export(args.artifact, args.out, args.layout, args.tokenizer)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"exported {args.artifact} to {args.out} (layout {args.layout}; max |logit difference| from train_moe "
          f"{gap:.1e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
