"""DeepseekForCausalLM: the trainable DeepSeek-V2/V3 model with MTP, balance loss and bias update.

Module names follow the Hugging Face checkpoints (`model.layers.<i>.self_attn.kv_b_proj`, ...), MTP
modules included at `model.layers.<num_hidden_layers + k>`; only the routed experts differ (one 3-D
tensor per projection instead of one matrix per expert), see `hf_adapter.py`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from r1pipe.model.checkpoint import load_state, open_checkpoint, save_pretrained
from r1pipe.model.config import DeepseekConfig
from r1pipe.model.hf_adapter import DeepseekStateDictAdapter
from r1pipe.model.layers import (MLA, AttentionContext, LatentCache, RMSNorm, RotaryEmbedding, SwiGLU,
                                 build_attention_mask, upcast)
from r1pipe.model.moe import MoE


@dataclass
class CausalLMOutput:
    logits: torch.Tensor | None
    hidden_states: torch.Tensor | None = None  # final normed hidden, when asked
    loss: torch.Tensor | None = None
    aux: dict[str, float] = field(default_factory=dict)
    routes: torch.Tensor | None = None  # experts chosen per token [B, T, routed layers, K], when asked


class DecoderLayer(nn.Module):
    def __init__(self, config: DeepseekConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MLA(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MoE(config) if config.is_moe_layer(layer_idx) else SwiGLU(config.hidden_size,
                                                                             config.intermediate_size)

    def forward(self, x: torch.Tensor, ctx: AttentionContext, token_mask: torch.Tensor | None,
                balance_loss: bool, route: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """-> hidden, balance loss (MoE, when asked), expert loads (MoE), experts chosen (MoE; `route`
        replays a recorded choice, see `Gate.forward`)."""
        x = x + self.self_attn(self.input_layernorm(x), ctx)
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, MoE):
            out, loss, load, indices = self.mlp(h, token_mask, balance_loss, route)
            return x + out, loss, load, indices
        return x + self.mlp(h), None, None, None


class SharedHead(nn.Module):
    """The MTP output norm; the head matrix itself is the main lm_head (`shared_head.head` on disk)."""

    def __init__(self, config: DeepseekConfig):
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class MTPLayer(DecoderLayer):
    """MTP module k: h' = eh_proj([enorm(emb(t_{i+k})); hnorm(h^{k-1}_i)]), one transformer block, then
    the shared head. Embedding and output head are the main model's."""

    def __init__(self, config: DeepseekConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.enorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hnorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        self.shared_head = SharedHead(config)

    def combine(self, token_embedding: torch.Tensor, previous_hidden: torch.Tensor) -> torch.Tensor:
        return self.eh_proj(torch.cat([self.enorm(token_embedding), self.hnorm(previous_hidden)], dim=-1))


class DeepseekModel(nn.Module):
    def __init__(self, config: DeepseekConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        n = config.num_hidden_layers
        self.layers = nn.ModuleList(
            [DecoderLayer(config, i) for i in range(n)]
            + [MTPLayer(config, n + k) for k in range(config.num_nextn_predict_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)


class DeepseekForCausalLM(nn.Module):
    def __init__(self, config: DeepseekConfig):
        super().__init__()
        self.config = config
        self.model = DeepseekModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.gradient_checkpointing = False
        if self.lm_head.weight.device.type != "meta":
            self.init_weights()

    # ---- structure -----------------------------------------------------------------------------
    @property
    def decoder_layers(self) -> list[DecoderLayer]:
        return list(self.model.layers[: self.config.num_hidden_layers])

    @property
    def mtp_layers(self) -> list[MTPLayer]:
        return list(self.model.layers[self.config.num_hidden_layers:])

    def moe_layers(self) -> dict[int, MoE]:
        return {i: layer.mlp for i, layer in enumerate(self.model.layers) if isinstance(layer.mlp, MoE)}

    def routed_layers(self) -> list[int]:
        """The decoder layers (MTP modules excluded) whose expert choices `forward` records and replays,
        in the order of the routes tensor's layer dimension."""
        return [i for i in range(self.config.num_hidden_layers) if self.config.is_moe_layer(i)]

    @torch.no_grad()
    def init_weights(self) -> None:
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, MoE):
                for p in (module.gate.weight, module.experts.gate_up_proj, module.experts.down_proj):
                    nn.init.normal_(p, std=std)
                if hasattr(module.gate, "e_score_correction_bias"):
                    module.gate.e_score_correction_bias.zero_()

    def compile_moe(self, **compile_kwargs) -> None:
        """torch.compile each MoE layer in place (parameter names unchanged). Fuses the routing, permutation
        and SwiGLU glue around the grouped GEMMs: on an H100 the V2-Lite-shaped layer's forward+backward
        goes from 1.27x to 1.52x of transformers' grouped_mm path (docs/PERFORMANCE.md, section 1)."""
        for moe in self.moe_layers().values():
            moe.compile(**compile_kwargs)

    def gradient_checkpointing_enable(self, **_) -> None:
        """Recompute each decoder layer in backward (expert loads are still counted once)."""
        self.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.gradient_checkpointing = False

    # ---- forward -------------------------------------------------------------------------------
    def attention_context(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                          position_ids: torch.Tensor | None, cache: LatentCache | None) -> AttentionContext:
        """RoPE angles and the mask for padded (attention_mask), packed (position_ids restarting at 0)
        or cached batches; None mask (plain causal, SDPA's fast path) when none of those apply."""
        b, t = input_ids.shape
        device = input_ids.device
        offset = cache.length if cache is not None else 0
        if position_ids is None:
            if attention_mask is not None and cache is None:
                position_ids = (attention_mask.long().cumsum(1) - 1).clamp_min(0)
            else:
                position_ids = torch.arange(offset, offset + t, device=device).expand(b, t)
        new_valid = (torch.ones(b, t, dtype=torch.bool, device=device) if attention_mask is None
                     else attention_mask.bool())
        cos, sin = self.model.rotary_emb(position_ids)
        ctx = AttentionContext(cos, sin, None, position_ids, new_valid, cache)
        if cache is not None:
            if cache.length or attention_mask is not None:  # an empty cache and no padding: plain causal
                ctx.mask = build_attention_mask(cache.key_valid(new_valid), t)
            return ctx
        packed = t > 1 and bool((position_ids[:, 1:] == 0).any())
        if attention_mask is not None or packed:
            doc = (position_ids == 0).long().cumsum(1) if packed else None
            ctx.mask = build_attention_mask(new_valid, t, doc, doc)
        return ctx

    def run_layer(self, layer: DecoderLayer, x, ctx, token_mask, balance_loss, route=None):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(layer, x, ctx, token_mask, balance_loss, route, use_reentrant=False)
        return layer(x, ctx, token_mask, balance_loss, route)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                return_hidden: bool = False, cache: LatentCache | None = None, routes: torch.Tensor | None = None,
                return_routes: bool = False) -> CausalLMOutput:
        """Logits (or final normed hidden states) for input_ids [B, T].

        attention_mask [B, T]: 1 = real token (padding may be on either side). position_ids restarting at
        0 inside a row mark packed documents (no attention across them). labels [B, T] (HF convention:
        shifted inside, -100 ignored) add the loss: CE + MTP loss + balance loss. With `cache`, the
        tokens are appended to it (position_ids then default to the cache offset). labels together with
        return_hidden: the caller computes its own token loss on the hidden states (e.g. GRPO's chunked
        log-probs), so `loss` holds only the auxiliary part, MTP weight x MTP loss + balance loss.

        Routing replay: `routes` [B, T, len(routed_layers()), K] makes each decoder MoE layer use those
        experts for those tokens (-1 rows choose their own); `return_routes` returns the experts every
        decoder MoE layer chose, in that layout (MTP modules always route themselves)."""
        ctx = self.attention_context(input_ids, attention_mask, position_ids, cache)
        training_loss = labels is not None
        balance = training_loss and self.training
        x = self.model.embed_tokens(input_ids)
        balance_losses, loads, chosen = [], {}, []
        # layer -> its slot in the routes tensor; built only when replaying (the decode loop calls this per token)
        slot = {layer: k for k, layer in enumerate(self.routed_layers())} if routes is not None else {}
        for i, layer in enumerate(self.decoder_layers):
            route = routes[:, :, slot[i]] if routes is not None and i in slot else None
            x, bl, load, indices = self.run_layer(layer, x, ctx, attention_mask, balance, route)
            balance_losses.append(bl)
            loads[i] = load
            if return_routes and indices is not None:
                chosen.append(indices)
        hidden = self.model.norm(x)
        routes_out = torch.stack(chosen, 2) if return_routes and chosen else None
        if cache is not None:
            cache.advance(ctx.new_valid)
        if not training_loss:
            self.count_loads(loads)
            return CausalLMOutput(logits=None if return_hidden else self.lm_head(hidden),
                                  hidden_states=hidden if return_hidden else None, routes=routes_out)

        logits = None if return_hidden else self.lm_head(hidden)
        lm_loss = None if return_hidden else F.cross_entropy(
            upcast(logits[:, :-1].flatten(0, 1)), labels[:, 1:].flatten(), ignore_index=-100)
        mtp_losses = []
        previous = hidden
        for k, layer in enumerate(self.mtp_layers, start=1):
            shifted = F.pad(input_ids[:, k:], (0, k), value=0)
            x = layer.combine(self.model.embed_tokens(shifted), previous)
            x, bl, load, _ = self.run_layer(layer, x, ctx, attention_mask, balance)
            balance_losses.append(bl)
            loads[self.config.num_hidden_layers + k - 1] = load
            previous = x
            mtp_logits = self.lm_head(layer.shared_head.norm(x))
            mtp_losses.append(mtp_cross_entropy(mtp_logits, labels, ctx.positions, k))
        self.count_loads(loads)
        balance_losses = [bl for bl in balance_losses if bl is not None]
        loss = lm_loss if lm_loss is not None else hidden.new_zeros((), dtype=torch.float32)
        aux_tensors = {"lm_loss": lm_loss.detach()} if lm_loss is not None else {}
        if mtp_losses:
            mtp_loss = torch.stack(mtp_losses).mean()
            loss = loss + self.config.mtp_loss_weight * mtp_loss
            aux_tensors["mtp_loss"] = mtp_loss.detach()
        if balance_losses:
            balance_loss = torch.stack(balance_losses).sum()
            loss = loss + balance_loss
            aux_tensors["balance_loss"] = balance_loss.detach()
        aux = (dict(zip(aux_tensors, torch.stack(list(aux_tensors.values())).float().tolist(), strict=True))
               if aux_tensors else {})
        aux.update(load_metrics({i: v for i, v in loads.items() if v is not None}))
        return CausalLMOutput(logits=None if return_hidden else logits,
                              hidden_states=hidden if return_hidden else None, loss=loss, aux=aux, routes=routes_out)

    def count_loads(self, loads: dict[int, torch.Tensor | None]) -> None:
        if self.training:
            for i, moe in self.moe_layers().items():
                if loads.get(i) is not None:
                    moe.expert_load += loads[i]

    # ---- training ------------------------------------------------------------------------------
    def update_expert_bias(self) -> dict[str, float]:
        """Aux-loss-free balancing: call after each optimizer step. Moves every V3 gate's correction bias
        by gamma toward uniform load, from the loads counted since the previous call (all-reduced over
        data-parallel ranks). Returns the load metrics of that step."""
        loads = {i: moe.update_bias(self.config.bias_update_speed) for i, moe in self.moe_layers().items()}
        return load_metrics(loads)

    # ---- checkpoints ---------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, directory: str | Path, dtype: torch.dtype = torch.float32,
                        device: torch.device | str = "cpu", keep_fp8: bool = False) -> DeepseekForCausalLM:
        return load_pretrained(directory, dtype=dtype, device=device, keep_fp8=keep_fp8)

    def save_pretrained(self, directory: str | Path, max_shard_size: int | str = "5GB",
                        dtype: torch.dtype | None = None) -> None:
        save_pretrained(self, directory, max_shard_size=max_shard_size, dtype=dtype)

    def hf_named_tensors(self):
        """(HF checkpoint name, tensor) pairs, e.g. to push weights into vLLM."""
        return DeepseekStateDictAdapter(self.config).to_hf(self.state_dict())


def load_pretrained(directory: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                    keep_fp8: bool = False) -> DeepseekForCausalLM:
    """Build the model from `directory`/config.json and load its safetensors weights, checking every
    tensor's presence and shape (errors name the tensor). FP8 weights are dequantized into `dtype`;
    `keep_fp8` also runs the dense linear layers through r1pipe.kernels' FP8Linear (128x128 weight
    blocks re-quantized from the dequantized weights reproduce the stored FP8 values), with the
    embedding, head, gates and eh_proj in high precision as in V3."""
    config, reader = open_checkpoint(directory)
    with torch.device("meta"):
        model = DeepseekForCausalLM(config)
    model.to_empty(device=device)
    model.to(dtype)
    for moe in model.moe_layers().values():
        moe.expert_load.zero_()
    load_state(model, reader)
    if keep_fp8:
        from r1pipe.kernels.linear import convert_to_fp8_linear

        convert_to_fp8_linear(model)
    return model


def mtp_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor, depth: int) -> torch.Tensor:
    """CE of MTP depth k: position i predicts token i+k+1; pairs that cross a packed-document boundary
    (positions not k+1 apart) are ignored."""
    shift = depth + 1
    target = labels[:, shift:]
    same_doc = (positions[:, shift:] - positions[:, :-shift]) == shift
    target = target.masked_fill(~same_doc, -100)
    if not bool((target != -100).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(upcast(logits[:, :-shift].flatten(0, 1)), target.flatten(), ignore_index=-100)


def load_metrics(loads: dict[int, torch.Tensor]) -> dict[str, float]:
    """Expert load per MoE layer as max/mean token count; the worst layer as `expert_load_max_over_mean`."""
    loads = {i: v for i, v in loads.items() if v is not None and v.sum() > 0}
    if not loads:
        return {}
    ratios = torch.stack([v.max() / v.mean() for v in loads.values()]).tolist()
    metrics = {f"expert_load/layer{i}_max_over_mean": r for i, r in zip(loads, ratios, strict=True)}
    metrics["expert_load_max_over_mean"] = max(ratios)
    return metrics


def parameter_counts(config: DeepseekConfig) -> dict[str, int]:
    """Parameters of `config` counted on the meta device: total (main model, without MTP), activated per
    token (shared experts + top-k routed experts, embeddings and head included), and the MTP modules'
    unique parameters (their embedding and head are the main model's) and activated share."""
    with torch.device("meta"):
        model = DeepseekForCausalLM(config)
    n, e, k = config.num_hidden_layers, config.n_routed_experts, config.num_experts_per_tok

    def count(modules, activated):
        total = active = 0
        for module in modules:
            for name, p in module.named_parameters():
                total += p.numel()
                routed = ".experts." in f".{name}" and "shared_experts" not in name
                active += p.numel() * k // e if (activated and routed) else p.numel()
        return total, active

    head = [model.model.embed_tokens, model.model.norm] + ([] if config.tie_word_embeddings else [model.lm_head])
    main_total, main_active = count(model.model.layers[:n], True)
    head_total, _ = count(head, False)
    mtp_total, mtp_active = count(model.model.layers[n:], True)
    return {"total": main_total + head_total, "activated": main_active + head_total,
            "mtp": mtp_total, "mtp_activated": mtp_active}
