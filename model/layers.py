"""Building blocks: RMSNorm, YaRN RoPE on interleaved pairs, MLA attention (naive and absorbed paths),
the latent KV cache and the attention mask for padded, packed and cached batches."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from r1pipe.model.config import DeepseekConfig, yarn_mscale


def upcast(x: torch.Tensor) -> torch.Tensor:
    """At least fp32 for reductions and softmaxes; fp64 stays fp64 (finite-difference checks)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = upcast(x)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_inv_freq(config: DeepseekConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies of the rope dims and the cos/sin factor; YaRN blends interpolated and
    extrapolated frequencies over a linear ramp between the beta_fast/beta_slow correction dims."""
    dim, base = config.qk_rope_head_dim, config.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    yarn = config.yarn
    if yarn is None:
        return inv_freq, 1.0
    factor, original = yarn["factor"], yarn["original_max_position_embeddings"]
    beta_fast, beta_slow = yarn.get("beta_fast") or 32, yarn.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / max(high - low, 0.001)).clamp(0, 1)
    inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
    mscale, mscale_all_dim = yarn.get("mscale"), yarn.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
    else:
        attention_factor = yarn_mscale(factor)
    return inv_freq, attention_factor


class RotaryEmbedding(nn.Module):
    def __init__(self, config: DeepseekConfig):
        super().__init__()
        self.config = config
        inv_freq, self.attention_factor = rope_inv_freq(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _apply(self, fn, recurse=True):
        """Recompute the fp32 frequencies after any move/cast (.to(bf16) would round them, to_empty would
        leave them uninitialised)."""
        super()._apply(fn, recurse)
        self.inv_freq = rope_inv_freq(self.config)[0].to(self.inv_freq.device)
        return self

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [B, T] -> cos, sin [B, T, rope_dim/2] in fp32."""
        angles = position_ids.float()[..., None] * self.inv_freq.float()
        return angles.cos() * self.attention_factor, angles.sin() * self.attention_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = True) -> torch.Tensor:
    """Rotate x [B, T, (H,) D] by position. Pairs are (x0, x1), (x2, x3), ... when interleaved (the DeepSeek
    checkpoints), else (x_i, x_{i+D/2}). The result is written in the half-split layout; q and k share
    it, so q.k is unchanged."""
    if x.dim() == 4:
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    x1, x2 = (x[..., 0::2], x[..., 1::2]) if interleaved else x.chunk(2, dim=-1)
    x1f, x2f = upcast(x1), upcast(x2)
    return torch.cat([x1f * cos - x2f * sin, x2f * cos + x1f * sin], dim=-1).to(x.dtype)


def build_attention_mask(key_valid: torch.Tensor, num_queries: int, key_doc: torch.Tensor | None = None,
                   query_doc: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask [B, 1, T, S] for T queries that are the last T of S keys.

    A query sees keys that are at or before it, valid (not padding, not a rejected draft) and, for
    packed rows, in its own document. Every query also sees itself, so padding rows stay finite."""
    s = key_valid.shape[1]
    q_slot = torch.arange(s - num_queries, s, device=key_valid.device)
    k_slot = torch.arange(s, device=key_valid.device)
    causal = k_slot[None, :] <= q_slot[:, None]
    mask = causal[None] & key_valid[:, None, :]
    if key_doc is not None:
        mask = mask & (query_doc[:, :, None] == key_doc[:, None, :])
    mask = mask | (k_slot[None, :] == q_slot[:, None])[None]
    return mask[:, None]


class LatentCache:
    """The MLA decode cache: per layer only the normed latent c_kv and the rotated k_pe of each token.

    Slots are shared by the batch and only appended; a row's padding and rejected speculative drafts
    are marked invalid instead of removed, so ragged batches need no per-row bookkeeping."""

    def __init__(self, config: DeepseekConfig, batch_size: int, max_len: int, num_layers: int,
                 dtype: torch.dtype, device: torch.device | str, first_layer: int = 0):
        self.first_layer = first_layer  # e.g. num_hidden_layers for a cache of the MTP layers alone
        self.c_kv = torch.zeros(num_layers, batch_size, max_len, config.kv_lora_rank, dtype=dtype, device=device)
        self.k_pe = torch.zeros(num_layers, batch_size, max_len, config.qk_rope_head_dim, dtype=dtype,
                                device=device)
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.valid.shape[1]

    def bytes_per_token_per_layer(self) -> int:
        """(kv_lora_rank + qk_rope_head_dim) x dtype size."""
        return (self.c_kv.shape[-1] + self.k_pe.shape[-1]) * self.c_kv.element_size()

    def nbytes(self) -> int:
        return self.c_kv.numel() * self.c_kv.element_size() + self.k_pe.numel() * self.k_pe.element_size()

    def write(self, layer: int, c_kv: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's latents for `layer`; return all latents so far (incl. this step)."""
        end = self.length + c_kv.shape[1]
        if end > self.max_len:
            raise ValueError(f"LatentCache: {end} tokens exceed the cache length {self.max_len}")
        layer -= self.first_layer
        self.c_kv[layer, :, self.length:end] = c_kv
        self.k_pe[layer, :, self.length:end] = k_pe
        return self.c_kv[layer, :, :end], self.k_pe[layer, :, :end]

    def key_valid(self, new_valid: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.valid[:, :self.length], new_valid], dim=1)

    def advance(self, new_valid: torch.Tensor) -> None:
        end = self.length + new_valid.shape[1]
        self.valid[:, self.length:end] = new_valid
        self.length = end


@dataclass
class AttentionContext:
    """What every attention layer of one forward needs: rope angles, mask, the cache."""

    cos: torch.Tensor
    sin: torch.Tensor
    mask: torch.Tensor | None  # [B, 1, T, S] bool; None: plain causal
    positions: torch.Tensor  # [B, T]
    new_valid: torch.Tensor  # [B, T] bool: which of this step's tokens are real
    cache: LatentCache | None = None


class MLA(nn.Module):
    """Multi-head Latent Attention.

    Training/prefill expand per-head K/V from the latent (`kv_b_proj`); decoding over a cache folds
    kv_b_proj's K part into the query and its V part into the output, so attention runs on the
    cached latent directly (DeepSeek-V2 paper, section 2.1.3)."""

    def __init__(self, config: DeepseekConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.nope_dim, self.rope_dim, self.v_dim = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        self.kv_lora_rank = config.kv_lora_rank
        self.interleaved = config.rope_interleave
        self.softmax_scale = config.softmax_scale
        h, qk = config.hidden_size, config.qk_head_dim
        if config.q_lora_rank is None:
            self.q_proj = nn.Linear(h, self.num_heads * qk, bias=False)
        else:
            self.q_a_proj = nn.Linear(h, config.q_lora_rank, bias=config.attention_bias)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, config.rms_norm_eps)
            self.q_b_proj = nn.Linear(config.q_lora_rank, self.num_heads * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(h, config.kv_lora_rank + self.rope_dim, bias=config.attention_bias)
        self.kv_a_layernorm = RMSNorm(config.kv_lora_rank, config.rms_norm_eps)
        self.kv_b_proj = nn.Linear(config.kv_lora_rank, self.num_heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.v_dim, h, bias=config.attention_bias)

    def query(self, x: torch.Tensor, ctx: AttentionContext) -> tuple[torch.Tensor, torch.Tensor]:
        """-> q_nope [B, T, H, nope], rotated q_pe [B, T, H, rope]."""
        q = self.q_proj(x) if hasattr(self, "q_proj") else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.unflatten(-1, (self.num_heads, self.nope_dim + self.rope_dim))
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        return q_nope, apply_rope(q_pe, ctx.cos, ctx.sin, self.interleaved)

    def latent(self, x: torch.Tensor, ctx: AttentionContext) -> tuple[torch.Tensor, torch.Tensor]:
        """-> normed c_kv [B, T, kv_lora_rank], rotated k_pe [B, T, rope]: all the cache holds."""
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        return self.kv_a_layernorm(c_kv), apply_rope(k_pe, ctx.cos, ctx.sin, self.interleaved)

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        q_nope, q_pe = self.query(x, ctx)
        c_kv, k_pe = self.latent(x, ctx)
        if ctx.cache is not None:
            prefill = ctx.cache.length == 0
            c_kv, k_pe = ctx.cache.write(self.layer_idx, c_kv, k_pe)
            if not prefill:
                return self.o_proj(self.absorbed(q_nope, q_pe, c_kv, k_pe, ctx.mask).flatten(-2))
        return self.o_proj(self.naive(q_nope, q_pe, c_kv, k_pe, ctx.mask).flatten(-2))

    def naive(self, q_nope, q_pe, c_kv, k_pe, mask) -> torch.Tensor:
        """Per-head K/V expanded from the latent; SDPA. -> [B, T, H, v]."""
        kv = self.kv_b_proj(c_kv).unflatten(-1, (self.num_heads, self.nope_dim + self.v_dim))
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_pe[:, :, None, :].expand(-1, -1, self.num_heads, -1)], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
            is_causal=mask is None, scale=self.softmax_scale)
        return out.transpose(1, 2)

    def absorbed(self, q_nope, q_pe, c_kv, k_pe, mask) -> torch.Tensor:
        """score = (q_nope W_uk) . c_kv + q_pe . k_pe; out = (softmax(score) c_kv) W_uv. -> [B, T, H, v]."""
        w = self.kv_b_proj.weight.view(self.num_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        w_uk, w_uv = w[:, :self.nope_dim], w[:, self.nope_dim:]
        q_latent = torch.einsum("bthd,hdr->bthr", q_nope, w_uk)
        scores = (torch.einsum("bthr,bsr->bhts", q_latent, c_kv)
                  + torch.einsum("bthd,bsd->bhts", q_pe, k_pe)) * self.softmax_scale
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = upcast(scores).softmax(dim=-1).to(c_kv.dtype)
        out_latent = torch.einsum("bhts,bsr->bthr", probs, c_kv)
        return torch.einsum("bthr,hdr->bthd", out_latent, w_uv)


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
