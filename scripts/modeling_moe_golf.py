"""The moe-golf model (train_moe.py's GPT) for Hugging Face transformers; scripts/export_hf.py writes this file next
to the weights, so that `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` loads an artifact.

Self-contained (torch and transformers only). In fp32, the exported weights' dtype, it reproduces the logits of
train_moe.py's eager forward; loaded with dtype=torch.bfloat16 it keeps router math and the expert combine in fp32,
as train_moe does under autocast. The model: QK-normed GQA attention with train_moe's RoPE, residual mixes with the
embedding, U-Net skips, relu^2 dense MLPs, and MoE layers routed by softmax, sigmoid or sqrt(softplus) top-k (with a
selection-only bias), by a token-id hash table, or softly over every expert. Generation keeps keys and values in
transformers' DynamicCache; a batch must be unpadded (all rows of one length).

train_moe's model techniques, each off unless its config key says (train_moe's setting in brackets):
    mlp_act, expert_act   leaky_relu2: LeakyReLU(0.5)^2 instead of relu^2 [MLP_ACT, EXPERT_ACT]
    rotary_dim            RoPE on the first rotary_dim dims of each head only; 0: all [ROPE_DIMS]
    xsa_layers            attention output less its component along the token's own value (XSA) [XSA_LAST_N]
    ln_scale              block i's two norms times 1/sqrt(i + 1) [LN_SCALE]
    smear_gate            the embedding plus a gated share of the previous token's, never across bos_token_id
                          [SMEAR_GATE, BOS_ID]
    bigram_buckets, _dim  the embedding plus a projected vector of the hashed (previous, current) token pair; a
                          sequence's first token and every bos_token_id take the last bucket
                          [BIGRAM_BUCKETS, BIGRAM_DIM]
    attn_gate             each head's output times sigmoid(its row of W . x[:12]) [ATTN_GATE]
    parallel_layers       attention and MLP read the same input (GPT-J) [PARALLEL_LAYERS]
    recur_layers, _loops  depth recurrence: the span of blocks runs recur_loops more times, the U-Net halves and skips
                          following the longer order [RECUR_LAYERS, RECUR_LOOPS]
With smear_gate or a bigram table the cache also keeps the token ids (one extra layer after the attention layers), and
with recurrence each run of a block has a cache layer of its own: the model adds those layers to a DynamicCache made
from the config.

Tensor names in model.safetensors (V vocab, D width, H heads, E experts, K experts per token, F expert hidden):
    model.embed_tokens.weight                         [V, D]   also the output head when tie_word_embeddings
    lm_head.weight                                    [V, D]   untied embeddings only
    model.skip_weights                                [S, D]   U-Net, over the run order of L blocks (L =
                                                               num_layers without recurrence): the block run at
                                                               L//2 + j adds skip j times the output of run L//2 - 1 - j
    model.smear_gate.weight [12], model.smear_gate.lam [1]      smear_gate
    model.bigram.embed.weight [buckets, bigram_dim], model.bigram.proj.weight [D, bigram_dim], model.bigram.scale []
    model.layers.{i}.self_attn.output_gate.weight     [H, 12]  attn_gate
    model.layers.{i}.resid_mix                        [2, D]   x = mix[0] * x + mix[1] * normed embedding
    model.layers.{i}.attn_scale / mlp_scale           [D]
    model.layers.{i}.self_attn.{q,k,v,o}_proj.weight           k, v: [num_key_value_heads * D/H, D]
    model.layers.{i}.self_attn.q_gain                 [H]
    dense MLP (mlp_act):   model.layers.{i}.mlp.up_proj.weight [I, D], mlp.down_proj.weight [D, I]
    MoE router:            mlp.gate.weight [E, D]; mlp.gate.e_score_correction_bias [E] (sigmoid and sqrtsoftplus
                           selection bias); mlp.gate.tid2eid [V, K] int64 (hash-routed layers' expert table)
    MoE shared expert:     mlp.shared_expert.{gate_proj,up_proj,down_proj}.weight (no gate_proj for relu^2),
                           mlp.shared_expert_gate.weight [1, D] (its sigmoid gate)
    routed experts, as config.expert_layout says:
        per-expert  mlp.experts.{e}.gate_proj.weight [F, D], .up_proj.weight [F, D], .down_proj.weight [D, F]
        fused       mlp.experts.gate_up_proj [E, 2F, D] (gate rows first), mlp.experts.down_proj [E, D, F];
                    relu^2 experts: mlp.experts.up_proj [E, F, D] instead of gate_up_proj
        mlx         mlp.switch_mlp.{gate_proj,up_proj}.weight [E, F, D], mlp.switch_mlp.down_proj.weight [E, D, F]
    relu^2 (and leaky_relu2) experts have no gate_proj in any layout.
"""
import math

import torch
import torch.nn.functional as F
import transformers
from torch import nn

# transformers 4 passes the cache as `past_key_values`, which this file does not read: generation would go wrong
# without an error, so refuse it at load.
if int(transformers.__version__.split(".")[0]) < 5:
    raise ImportError(f"modeling_moe_golf needs transformers 5 or later; this is {transformers.__version__}")

from transformers import DynamicCache, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import DynamicLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

EXPERT_LAYOUTS = ("per-expert", "fused", "mlx")
GATE_INPUTS = 12  # channels of the input that smear_gate and attn_gate read, as train_moe


class MoeGolfConfig(PretrainedConfig):
    model_type = "moe_golf"

    def __init__(self, vocab_size=1024, hidden_size=512, num_hidden_layers=9, num_attention_heads=8,
                 num_key_value_heads=4, intermediate_size=1024, mlp_mode="dense", moe_layers=(), num_experts=16,
                 num_experts_per_tok=2, moe_intermediate_size=256, expert_act="relu2",
                 shared_expert_intermediate_size=0, shared_expert_gate=True, router="softmax", norm_topk_prob=False, hash_layers=0,
                 routed_scaling_factor=1.0, swiglu_limit=0.0, rope_theta=10000.0, final_logit_softcapping=30.0,
                 expert_layout="fused", tie_word_embeddings=True, mlp_act="relu2", rotary_dim=0, xsa_layers=(),
                 ln_scale=False, smear_gate=False, bos_token_id=1, bigram_buckets=0, bigram_dim=128, attn_gate=False,
                 parallel_layers=(), recur_layers=(), recur_loops=1, **kwargs):
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
        self.mlp_act, self.rotary_dim, self.xsa_layers = mlp_act, rotary_dim, list(xsa_layers)
        self.ln_scale, self.smear_gate, self.bos_token_id = ln_scale, smear_gate, bos_token_id
        self.bigram_buckets, self.bigram_dim, self.attn_gate = bigram_buckets, bigram_dim, attn_gate
        self.parallel_layers, self.recur_layers = list(parallel_layers), list(recur_layers)
        self.recur_loops = recur_loops
        if self.recur_layers and self.recur_layers != list(range(self.recur_layers[0], self.recur_layers[-1] + 1)):
            raise ValueError(f"recur_layers={self.recur_layers}: one span of consecutive layers")
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))  # no gain, the dtype's eps: as train_moe


def rotary(x: torch.Tensor, base: float, start: int, dims: int = 0) -> torch.Tensor:
    """train_moe's RoPE over the first `dims` (0: all) of the last dim of [B, H, T, head_dim], at positions start,
    start + 1, ...; the other dims pass unchanged."""
    half = (dims or x.size(-1)) // 2
    inv_freq = base ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    positions = torch.arange(start, start + x.size(-2), device=x.device, dtype=torch.float32)
    angles = positions[:, None] * inv_freq
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin, rest), dim=-1)


def exclusive(y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """XSA: each head's output y [B, H, T, D] less its component along the token's own value v [B, Hkv, T, D]."""
    b, h, t, d = y.shape
    grouped, vn = y.view(b, v.size(1), h // v.size(1), t, d), F.normalize(v, dim=-1)[:, :, None]
    return (grouped - (grouped * vn).sum(-1, keepdim=True) * vn).view(b, h, t, d)


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
        self.layer_idx, self.rope_theta, self.rotary_dim = layer_idx, config.rope_theta, config.rotary_dim
        self.xsa = layer_idx in config.xsa_layers
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        dim, kv_dim = config.hidden_size, config.num_key_value_heads * self.head_dim
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, kv_dim, bias=False)
        self.v_proj = nn.Linear(dim, kv_dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)
        self.q_gain = nn.Parameter(torch.ones(config.num_attention_heads))
        if config.attn_gate:
            self.output_gate = nn.Linear(GATE_INPUTS, config.num_attention_heads, bias=False)

    def forward(self, x: torch.Tensor, start: int, cache=None, slot: int | None = None) -> torch.Tensor:
        """slot: the cache layer (this block's index, or its run's under recurrence)."""
        B, T, D = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = rotary(rms_norm(q), self.rope_theta, start, self.rotary_dim) * self.q_gain.to(x.dtype)[:, None, None]
        k = rotary(rms_norm(k), self.rope_theta, start, self.rotary_dim)
        own = v  # the new tokens' values, which XSA removes from their outputs
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx if slot is None else slot)
        mask = None
        if 1 < T < k.size(2):  # new tokens after cached ones: each sees the cache and the new ones up to itself
            mask = torch.arange(k.size(2), device=x.device) <= torch.arange(start, start + T, device=x.device)[:, None]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=T > 1 and mask is None,
                                           enable_gqa=self.num_kv_heads != self.num_heads)
        if self.xsa:
            y = exclusive(y, own)
        if hasattr(self, "output_gate"):
            gate = torch.sigmoid(x[..., :GATE_INPUTS] @ self.output_gate.weight.to(x.dtype).T)  # [B, T, H]
            y = y * gate.transpose(1, 2)[..., None]
        return self.o_proj(y.transpose(1, 2).reshape(B, T, D))


def activate(gate: torch.Tensor | None, up: torch.Tensor, limit: float = 0.0, act: str = "relu2") -> torch.Tensor:
    """SwiGLU where there is a gate (clamped as DeepSeek-V4 when limit > 0); where there is none, relu^2, or
    LeakyReLU(0.5)^2 for act leaky_relu2."""
    if gate is None:
        return F.leaky_relu(up, 0.5).square() if act == "leaky_relu2" else F.relu(up).square()
    if limit:
        gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
    return F.silu(gate) * up


class MoeGolfMLP(nn.Module):
    """A dense MLP (mlp_act) or the shared expert (the experts' activation, never clamped, as in train_moe)."""

    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.act = act
        if act == "swiglu":
            self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        gate = self.gate_proj(x) if hasattr(self, "gate_proj") else None
        return self.down_proj(activate(gate, self.up_proj(x), act=self.act))


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
        self.limit, self.act = config.swiglu_limit, config.expert_act
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
            hidden = activate(None if gate is None else h @ gate[e].T, h @ up[e].T, self.limit, self.act)
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
            self.mlp = MoeGolfMLP(dim, config.intermediate_size, config.mlp_act)
        self.attn_scale = nn.Parameter(torch.ones(dim))
        self.mlp_scale = nn.Parameter(torch.ones(dim))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(dim), torch.zeros(dim))))
        self.norm_scale = 1 / math.sqrt(layer_idx + 1) if config.ln_scale else 1.0
        self.parallel = layer_idx in config.parallel_layers

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x) * self.norm_scale if self.norm_scale != 1.0 else rms_norm(x)

    def forward(self, x, x0, input_ids, start, cache=None, slot=None):
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        attn = self.attn_scale.to(x.dtype) * self.self_attn(self.norm(x), start, cache, slot)
        y = self.mlp(self.norm(x) if self.parallel else self.norm(x + attn), input_ids)
        return x + attn + self.mlp_scale.to(x.dtype) * y


class MoeGolfSmearGate(nn.Module):
    """x_t + lam * sigmoid(weight . x_t[:12]) * x_{t-1}, zero where token t is bos_token_id (a document starts)."""

    def __init__(self, bos_token_id: int):
        super().__init__()
        self.bos_token_id = bos_token_id
        self.weight = nn.Parameter(torch.zeros(GATE_INPUTS))
        self.lam = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(x[..., :GATE_INPUTS] @ self.weight.to(x.dtype))
        gate = self.lam.to(x.dtype) * gate * (ids != self.bos_token_id)
        return x + gate[..., None] * F.pad(x[:, :-1], (0, 0, 1, 0))


class MoeGolfBigramHash(nn.Module):
    """scale * proj(embed[hash(previous id, id)]); the first token of `ids` and every bos_token_id take the last
    bucket."""

    def __init__(self, config: MoeGolfConfig):
        super().__init__()
        self.bos_token_id = config.bos_token_id
        self.embed = nn.Embedding(config.bigram_buckets, config.bigram_dim)
        self.proj = nn.Linear(config.bigram_dim, config.hidden_size, bias=False)
        self.scale = nn.Parameter(torch.tensor(0.0))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        last, previous = self.embed.num_embeddings - 1, F.pad(ids[:, :-1], (1, 0), value=-1)
        bucket = torch.bitwise_xor(36313 * ids, 27191 * previous) % last
        bucket = torch.where((previous < 0) | (ids == self.bos_token_id), last, bucket)
        return self.scale.to(self.proj.weight.dtype) * self.proj(self.embed(bucket))


def layer_order(config: MoeGolfConfig) -> list[int]:
    """The blocks in the order the forward runs them: the recur_layers span recur_loops more times."""
    n, span = config.num_hidden_layers, config.recur_layers
    if not span:
        return list(range(n))
    first, last = span[0], span[-1] + 1
    return [*range(last), *list(range(first, last)) * config.recur_loops, *range(last, n)]


class MoeGolfPreTrainedModel(PreTrainedModel):
    config_class = MoeGolfConfig
    base_model_prefix = "model"
    _no_split_modules = ["MoeGolfDecoderLayer"]


class MoeGolfModel(MoeGolfPreTrainedModel):
    def __init__(self, config: MoeGolfConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        if config.bigram_buckets:
            self.bigram = MoeGolfBigramHash(config)
        if config.smear_gate:
            self.smear_gate = MoeGolfSmearGate(config.bos_token_id)
        self.layers = nn.ModuleList(MoeGolfDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.order = layer_order(config)
        self.num_encoder = len(self.order) // 2
        skips = min(self.num_encoder, len(self.order) - self.num_encoder)
        self.skip_weights = nn.Parameter(torch.ones(skips, config.hidden_size))
        # Cache layers: one per block run, then the token ids where the embedding reads the previous token.
        self.keeps_ids = bool(config.smear_gate or config.bigram_buckets)
        self.cache_layers = len(self.order) + self.keeps_ids
        self.post_init()

    def embed(self, input_ids: torch.Tensor, previous: torch.Tensor | None = None) -> torch.Tensor:
        """The blocks' input before its norm: token embedding, bigram vector, smear. previous: the ids before
        input_ids (the last two the cache kept); only input_ids' positions come back."""
        ids = input_ids if previous is None else torch.cat((previous, input_ids), dim=1)
        x = self.embed_tokens(ids)
        if hasattr(self, "bigram"):
            x = x + self.bigram(ids).to(x.dtype)
        if hasattr(self, "smear_gate"):
            x = self.smear_gate(x, ids)
        return x if previous is None else x[:, previous.size(1):]

    def previous_ids(self, input_ids: torch.Tensor, cache) -> torch.Tensor | None:
        """Keeps input_ids in the cache's ids layer; returns the two ids before them (fewer at the start), or None
        without a cache."""
        if cache is None or not self.keeps_ids:
            return None
        ids = input_ids[:, None, :, None]
        kept, _ = cache.update(ids, ids, self.cache_layers - 1)
        return kept[:, 0, : -ids.size(2), 0][:, -2:]

    def forward(self, input_ids=None, attention_mask=None, cache=None, use_cache=None, **kwargs):
        if input_ids is None:
            raise ValueError("MoeGolfModel needs input_ids: hash-routed experts are chosen by token id")
        if attention_mask is not None and attention_mask.ndim == 2 and not bool(attention_mask.all()):
            raise ValueError("MoeGolfModel does not support padded batches; generate one sequence (or rows of one "
                             "length) at a time")
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        start = cache.get_seq_length() if cache is not None else 0
        if cache is not None and self.cache_layers > self.config.num_hidden_layers:
            # A DynamicCache made from the config has num_hidden_layers layers: add the block reruns' and the ids'.
            cache.layers.extend(DynamicLayer() for _ in range(self.cache_layers - len(cache.layers)))
        x = x0 = rms_norm(self.embed(input_ids, self.previous_ids(input_ids, cache)))
        skips = []
        for i, block in enumerate(self.order):
            if i >= self.num_encoder and skips:
                x = x + self.skip_weights[i - self.num_encoder].to(x.dtype) * skips.pop()
            x = self.layers[block](x, x0, input_ids, start, cache, i)
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
