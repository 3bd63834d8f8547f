"""The moe-golf model (train_moe.py's GPT) for Hugging Face transformers; scripts/export_hf.py writes this file next
to the weights, so that `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` loads an artifact.

Self-contained (torch and transformers only). In fp32, the exported weights' dtype, it reproduces the logits of
train_moe.py's eager forward; loaded with dtype=torch.bfloat16 it keeps router math and the expert combine in fp32,
as train_moe does under autocast. The model: QK-normed GQA attention with train_moe's RoPE, residual mixes with the
embedding, U-Net skips, relu^2 dense MLPs, and MoE layers routed by softmax, sigmoid or sqrt(softplus) top-k (with a
selection-only bias), by a token-id hash table, or softly over every expert. Generation keeps keys and values in
transformers' Cache; a batch must be unpadded (all rows of one length).

Tensor names in model.safetensors (V vocab, D width, H heads, E experts, K experts per token, F expert hidden):
    model.embed_tokens.weight                         [V, D]   also the output head when tie_word_embeddings
    lm_head.weight                                    [V, D]   untied embeddings only
    model.skip_weights                                [S, D]   U-Net: block num_layers//2 + j adds skip j times the
                                                               output of block num_layers//2 - 1 - j
    model.layers.{i}.resid_mix                        [2, D]   x = mix[0] * x + mix[1] * normed embedding
    model.layers.{i}.attn_scale / mlp_scale           [D]
    model.layers.{i}.self_attn.{q,k,v,o}_proj.weight           k, v: [num_key_value_heads * D/H, D]
    model.layers.{i}.self_attn.q_gain                 [H]
    dense MLP (relu^2):    model.layers.{i}.mlp.up_proj.weight [I, D], mlp.down_proj.weight [D, I]
    MoE router:            mlp.gate.weight [E, D]; mlp.gate.e_score_correction_bias [E] (sigmoid and sqrtsoftplus
                           selection bias); mlp.gate.tid2eid [V, K] int64 (hash-routed layers' expert table)
    MoE shared expert:     mlp.shared_expert.{gate_proj,up_proj,down_proj}.weight (no gate_proj for relu^2),
                           mlp.shared_expert_gate.weight [1, D] (its sigmoid gate)
    routed experts, as config.expert_layout says:
        per-expert  mlp.experts.{e}.gate_proj.weight [F, D], .up_proj.weight [F, D], .down_proj.weight [D, F]
        fused       mlp.experts.gate_up_proj [E, 2F, D] (gate rows first), mlp.experts.down_proj [E, D, F];
                    relu^2 experts: mlp.experts.up_proj [E, F, D] instead of gate_up_proj
        mlx         mlp.switch_mlp.{gate_proj,up_proj}.weight [E, F, D], mlp.switch_mlp.down_proj.weight [E, D, F]
    relu^2 experts have no gate_proj in any layout.
"""
import torch
import torch.nn.functional as F
import transformers
from torch import nn

# transformers 4 passes the cache as `past_key_values`, which this file does not read: generation would go wrong
# without an error, so refuse it at load.
if int(transformers.__version__.split(".")[0]) < 5:
    raise ImportError(f"modeling_moe_golf needs transformers 5 or later; this is {transformers.__version__}")

from transformers import DynamicCache, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

EXPERT_LAYOUTS = ("per-expert", "fused", "mlx")


class MoeGolfConfig(PretrainedConfig):
    model_type = "moe_golf"

    def __init__(self, vocab_size=1024, hidden_size=512, num_hidden_layers=9, num_attention_heads=8,
                 num_key_value_heads=4, intermediate_size=1024, mlp_mode="dense", moe_layers=(), num_experts=16,
                 num_experts_per_tok=2, moe_intermediate_size=256, expert_act="relu2",
                 shared_expert_intermediate_size=0, shared_expert_gate=True, router="softmax", norm_topk_prob=False, hash_layers=0,
                 routed_scaling_factor=1.0, swiglu_limit=0.0, rope_theta=10000.0, final_logit_softcapping=30.0,
                 expert_layout="fused", tie_word_embeddings=True, **kwargs):
        self.vocab_size, self.hidden_size, self.num_hidden_layers = vocab_size, hidden_size, num_hidden_layers
        self.num_attention_heads, self.num_key_value_heads = num_attention_heads, num_key_value_heads
        self.intermediate_size = intermediate_size  # the dense MLPs' hidden size
        self.mlp_mode = mlp_mode  # dense, sparse, shared_routed or soft, as train_moe's MLP_MODE
        self.moe_layers = list(moe_layers)
        self.num_experts, self.num_experts_per_tok = num_experts, num_experts_per_tok
        self.moe_intermediate_size, self.expert_act = moe_intermediate_size, expert_act
        self.shared_expert_intermediate_size = shared_expert_intermediate_size
        self.shared_expert_gate = shared_expert_gate
        self.router, self.norm_topk_prob, self.hash_layers = router, norm_topk_prob, hash_layers
        self.routed_scaling_factor, self.swiglu_limit = routed_scaling_factor, swiglu_limit
        self.rope_theta, self.final_logit_softcapping = rope_theta, final_logit_softcapping
        if expert_layout not in EXPERT_LAYOUTS:
            raise ValueError(f"expert_layout={expert_layout!r}: one of {', '.join(EXPERT_LAYOUTS)}")
        self.expert_layout = expert_layout
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))  # no gain, the dtype's eps: as train_moe


def rotary(x: torch.Tensor, base: float, start: int) -> torch.Tensor:
    """train_moe's RoPE over the last dim of [B, H, T, head_dim], at positions start, start + 1, ..."""
    half = x.size(-1) // 2
    inv_freq = base ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    positions = torch.arange(start, start + x.size(-2), device=x.device, dtype=torch.float32)
    angles = positions[:, None] * inv_freq
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)


def top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """train_moe's top-k (masked argmax passes): the same experts in the same slots, ties included."""
    picks, masked = [], scores
    for _ in range(k):
        picks.append(masked.argmax(dim=-1, keepdim=True))
        masked = masked.scatter(-1, picks[-1], float("-inf"))
    idx = torch.cat(picks, dim=-1)
    return scores.gather(-1, idx), idx


class MoeGolfAttention(nn.Module):
    def __init__(self, config: MoeGolfConfig, layer_idx: int):
        super().__init__()
        self.layer_idx, self.rope_theta = layer_idx, config.rope_theta
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        dim, kv_dim = config.hidden_size, config.num_key_value_heads * self.head_dim
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, kv_dim, bias=False)
        self.v_proj = nn.Linear(dim, kv_dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        self.q_gain = nn.Parameter(torch.ones(config.num_attention_heads))

    def forward(self, x: torch.Tensor, start: int, cache=None) -> torch.Tensor:
        B, T, D = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = rotary(rms_norm(q), self.rope_theta, start) * self.q_gain.to(x.dtype)[:, None, None]
        k = rotary(rms_norm(k), self.rope_theta, start)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        mask = None
        if 1 < T < k.size(2):  # new tokens after cached ones: each sees the cache and the new ones up to itself
            mask = torch.arange(k.size(2), device=x.device) <= torch.arange(start, start + T, device=x.device)[:, None]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=T > 1 and mask is None,
                                           enable_gqa=self.num_kv_heads != self.num_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, D))


def activate(gate: torch.Tensor | None, up: torch.Tensor, limit: float = 0.0) -> torch.Tensor:
    """SwiGLU where there is a gate (clamped as DeepSeek-V4 when limit > 0), relu^2 where there is none."""
    if gate is None:
        return F.relu(up).square()
    if limit:
        gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
    return F.silu(gate) * up


class MoeGolfMLP(nn.Module):
    """A dense MLP (relu^2) or the shared expert (the experts' activation, never clamped, as in train_moe)."""

    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        if act == "swiglu":
            self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        gate = self.gate_proj(x) if hasattr(self, "gate_proj") else None
        return self.down_proj(activate(gate, self.up_proj(x)))


class MoeGolfRouter(nn.Module):
    """(expert ids [N, K], weights [N, K]) per token; soft layers give every expert, weighted by the softmax."""

    def __init__(self, config: MoeGolfConfig, layer_idx: int):
        super().__init__()
        self.kind, self.soft = config.router, config.mlp_mode == "soft"
        self.top_k, self.norm_topk_prob = config.num_experts_per_tok, config.norm_topk_prob
        self.scale = config.routed_scaling_factor
        moe_index = config.moe_layers.index(layer_idx)
        self.hashed = not self.soft and (self.kind == "hash" or moe_index < config.hash_layers)
        if self.soft or self.kind != "hash":
            self.weight = nn.Parameter(torch.zeros(config.num_experts, config.hidden_size))
        if not self.soft and not self.hashed and self.kind in ("sigmoid", "sqrtsoftplus"):
            self.register_buffer("e_score_correction_bias", torch.zeros(config.num_experts))
        if self.hashed:
            self.register_buffer("tid2eid", torch.zeros(config.vocab_size, self.top_k, dtype=torch.long))

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        if self.kind == "softmax":
            return logits.softmax(dim=-1)
        return logits.sigmoid() if self.kind == "sigmoid" else F.softplus(logits).sqrt()

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kind == "hash":
            idx = self.tid2eid[input_ids]
            return idx, torch.full(idx.shape, 1.0 / self.top_k, device=x.device)
        logits = x.float() @ self.weight.float().T
        if self.soft:
            gates = logits.softmax(dim=-1)
            return torch.arange(gates.size(-1), device=x.device).expand_as(gates), gates
        scores = self.scores(logits)
        if self.hashed:  # the table picks, the router's scores weigh
            idx = self.tid2eid[input_ids]
            weights = scores.gather(-1, idx)
        elif self.kind == "softmax":
            weights, idx = top_k(scores, self.top_k)
        else:  # choose by score + bias, weigh by the unbiased score
            _, idx = top_k(scores + self.e_score_correction_bias, self.top_k)
            weights = scores.gather(-1, idx)
        if self.norm_topk_prob or self.hashed or self.kind == "sqrtsoftplus":
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return idx, weights * self.scale


class SwitchLinear(nn.Module):
    """One projection of every expert, [E, out, in]: mlx-lm's switch_mlp banks."""

    def __init__(self, num_experts: int, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_experts, out_features, in_features))


class ExpertLinears(nn.Module):
    def __init__(self, dim: int, hidden: int, swiglu: bool):
        super().__init__()
        if swiglu:
            self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)


class PerExpertBank(nn.ModuleList):
    def __init__(self, num_experts: int, dim: int, hidden: int, swiglu: bool):
        super().__init__(ExpertLinears(dim, hidden, swiglu) for _ in range(num_experts))

    def banks(self):
        gate = torch.stack([e.gate_proj.weight for e in self]) if hasattr(self[0], "gate_proj") else None
        return gate, torch.stack([e.up_proj.weight for e in self]), torch.stack([e.down_proj.weight for e in self])


class FusedBank(nn.Module):
    def __init__(self, num_experts: int, dim: int, hidden: int, swiglu: bool):
        super().__init__()
        if swiglu:
            self.gate_up_proj = nn.Parameter(torch.zeros(num_experts, 2 * hidden, dim))
        else:
            self.up_proj = nn.Parameter(torch.zeros(num_experts, hidden, dim))
        self.down_proj = nn.Parameter(torch.zeros(num_experts, dim, hidden))

    def banks(self):
        if hasattr(self, "gate_up_proj"):
            gate, up = self.gate_up_proj.chunk(2, dim=1)
            return gate, up, self.down_proj
        return None, self.up_proj, self.down_proj


class MlxBank(nn.Module):
    def __init__(self, num_experts: int, dim: int, hidden: int, swiglu: bool):
        super().__init__()
        if swiglu:
            self.gate_proj = SwitchLinear(num_experts, dim, hidden)
        self.up_proj = SwitchLinear(num_experts, dim, hidden)
        self.down_proj = SwitchLinear(num_experts, hidden, dim)

    def banks(self):
        gate = self.gate_proj.weight if hasattr(self, "gate_proj") else None
        return gate, self.up_proj.weight, self.down_proj.weight


BANKS = {"per-expert": ("experts", PerExpertBank), "fused": ("experts", FusedBank), "mlx": ("switch_mlp", MlxBank)}


class MoeGolfSparseMoeBlock(nn.Module):
    def __init__(self, config: MoeGolfConfig, layer_idx: int):
        super().__init__()
        self.limit = config.swiglu_limit
        self.gate = MoeGolfRouter(config, layer_idx)
        self.bank_name, bank = BANKS[config.expert_layout]
        self.add_module(self.bank_name, bank(config.num_experts, config.hidden_size, config.moe_intermediate_size,
                                             config.expert_act == "swiglu"))
        if config.mlp_mode == "shared_routed":
            self.shared_expert = MoeGolfMLP(config.hidden_size, config.shared_expert_intermediate_size, config.expert_act)
            if config.shared_expert_gate:
                self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.size(-1))
        idx, weights = self.gate(flat, input_ids.reshape(-1))
        gate, up, down = getattr(self, self.bank_name).banks()
        y = torch.zeros(flat.shape, dtype=torch.float32, device=x.device)
        for e in idx.unique().tolist():
            rows, slots = (idx == e).nonzero(as_tuple=True)
            h = flat[rows]
            hidden = activate(None if gate is None else h @ gate[e].T, h @ up[e].T, self.limit)
            y.index_add_(0, rows, ((hidden * weights[rows, slots, None]).to(down.dtype) @ down[e].T).float())
        if hasattr(self, "shared_expert"):
            shared = self.shared_expert(flat)
            if hasattr(self, "shared_expert_gate"):
                shared = shared.float() * torch.sigmoid(flat.float() @ self.shared_expert_gate.weight.float().T)
            y = y + shared
        return y.to(x.dtype).view_as(x)


class MoeGolfDecoderLayer(nn.Module):
    def __init__(self, config: MoeGolfConfig, layer_idx: int):
        super().__init__()
        dim = config.hidden_size
        self.self_attn = MoeGolfAttention(config, layer_idx)
        if config.mlp_mode != "dense" and layer_idx in config.moe_layers:
            self.mlp = MoeGolfSparseMoeBlock(config, layer_idx)
        else:
            self.mlp = MoeGolfMLP(dim, config.intermediate_size, "relu2")
        self.attn_scale = nn.Parameter(torch.ones(dim))
        self.mlp_scale = nn.Parameter(torch.ones(dim))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(dim), torch.zeros(dim))))

    def forward(self, x, x0, input_ids, start, cache=None):
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        x = x + self.attn_scale.to(x.dtype) * self.self_attn(rms_norm(x), start, cache)
        return x + self.mlp_scale.to(x.dtype) * self.mlp(rms_norm(x), input_ids)


class MoeGolfPreTrainedModel(PreTrainedModel):
    config_class = MoeGolfConfig
    base_model_prefix = "model"
    _no_split_modules = ["MoeGolfDecoderLayer"]


class MoeGolfModel(MoeGolfPreTrainedModel):
    def __init__(self, config: MoeGolfConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(MoeGolfDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.num_encoder = config.num_hidden_layers // 2
        skips = min(self.num_encoder, config.num_hidden_layers - self.num_encoder)
        self.skip_weights = nn.Parameter(torch.ones(skips, config.hidden_size))
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, cache=None, use_cache=None, **kwargs):
        if input_ids is None:
            raise ValueError("MoeGolfModel needs input_ids: hash-routed experts are chosen by token id")
        if attention_mask is not None and attention_mask.ndim == 2 and not bool(attention_mask.all()):
            raise ValueError("MoeGolfModel does not support padded batches; generate one sequence (or rows of one "
                             "length) at a time")
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        start = cache.get_seq_length() if cache is not None else 0
        x = x0 = rms_norm(self.embed_tokens(input_ids))
        skips = []
        for i, layer in enumerate(self.layers):
            if i >= self.num_encoder and skips:
                x = x + self.skip_weights[i - self.num_encoder].to(x.dtype) * skips.pop()
            x = layer(x, x0, input_ids, start, cache)
            if i < self.num_encoder:
                skips.append(x)
        return BaseModelOutputWithPast(last_hidden_state=rms_norm(x), cache=cache)


class MoeGolfForCausalLM(MoeGolfPreTrainedModel, GenerationMixin):
    def __init__(self, config: MoeGolfConfig):
        super().__init__(config)
        self.model = MoeGolfModel(config)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids=None, attention_mask=None, cache=None, use_cache=None, labels=None, **kwargs):
        out = self.model(input_ids, attention_mask=attention_mask, cache=cache, use_cache=use_cache)
        head = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(out.last_hidden_state, head.to(out.last_hidden_state.dtype)).float()
        cap = self.config.final_logit_softcapping
        if cap > 0:
            logits = cap * torch.tanh(logits / cap)
        loss = None
        if labels is not None:  # labels are the input ids, shifted here as in every transformers causal LM
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache)


__all__ = ["MoeGolfConfig", "MoeGolfForCausalLM", "MoeGolfModel", "MoeGolfPreTrainedModel"]
