"""Batched KV-cache generation for ragged prompt batches, the native rollout engine's core.

Prompts are left-padded into one batch; padding and rejected drafts are invalid cache slots (see
`LatentCache`). Our model decodes over the absorbed MLA latent cache; HF dense models (Qwen2, Llama)
go through the same loop with their own `DynamicCache`. With `use_mtp`, the first MTP module drafts one
token per step and the main model verifies it (speculative sampling: greedy output is identical to plain
decoding, sampled output has the same distribution); the acceptance rate is returned.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from r1pipe.model import fast_decode
from r1pipe.model.fast_decode import DecodeWorkspace, DeviceEmitter
from r1pipe.model.layers import LatentCache
from r1pipe.model.modeling import DeepseekForCausalLM


@dataclass
class GenerationResult:
    token_ids: list[list[int]]  # completion tokens per prompt (the stop token included when produced)
    logprobs: list[list[float]]  # log p(token) under the temperature-scaled model distribution (before top-p)
    truncated: list[bool]  # stopped by max_new_tokens rather than a stop token
    acceptance_rate: float | None = None  # MTP drafts accepted / drafts proposed
    cache_bytes: int | None = None  # bytes of the KV cache allocated for this batch
    # with record_routes: per prompt, the experts each token of prompt + completion was routed to in every
    # decoder MoE layer [P + C, layers, K] (int16); -1 for a token never fed to the model (the last one)
    routes: list[torch.Tensor] | None = None


def sampling_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Probabilities to sample from: softmax(logits / T), restricted to the top-p nucleus and renormalised."""
    probs = (logits.float() / temperature).softmax(-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def token_logprob(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    scaled = logits.float() / (temperature if temperature > 0 else 1.0)
    return scaled.log_softmax(-1).gather(-1, tokens[..., None])[..., 0]


class Sampler:
    """Greedy (temperature 0) or seeded temperature/top-p sampling, plus the speculative accept test."""

    def __init__(self, temperature: float, top_p: float, seed: int, device):
        self.temperature, self.top_p = temperature, top_p
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        if self.temperature == 0:
            return F.one_hot(logits.argmax(-1), logits.shape[-1]).float()
        return sampling_probs(logits, self.temperature, self.top_p)

    def logprob(self, logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return token_logprob(logits, tokens, self.temperature)

    def sample(self, probs: torch.Tensor) -> torch.Tensor:
        return torch.multinomial(probs, 1, generator=self.generator)[:, 0]

    def verify(self, draft: torch.Tensor, p: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Speculative sampling (Leviathan et al. 2023): accept draft d ~ q with prob min(1, p(d)/q(d)), else
        sample from max(p - q, 0). -> accepted [B] bool, the token to emit at this position [B]."""
        p_d, q_d = p.gather(1, draft[:, None])[:, 0], q.gather(1, draft[:, None])[:, 0]
        u = torch.rand(draft.shape, generator=self.generator, device=draft.device)
        accepted = u * q_d < p_d
        residual = (p - q).clamp_min(0)
        empty = residual.sum(-1, keepdim=True) <= 0
        residual = torch.where(empty, p, residual)
        resampled = self.sample(residual / residual.sum(-1, keepdim=True))
        return accepted, torch.where(accepted, draft, resampled)


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    valid = torch.zeros(len(prompts), width, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        valid[row, width - len(prompt):] = True
    return ids.to(device), valid.to(device)


class Decoder:
    """One forward over new tokens with a cache: ours (latent cache) or an HF model (DynamicCache).
    `use_cache=False` recomputes the whole sequence every step (the naive reference)."""

    def __init__(self, model, batch: int, max_len: int, use_cache: bool, record_routes: bool = False):
        self.model, self.use_cache = model, use_cache
        self.ours = isinstance(model, DeepseekForCausalLM)
        # (routes [B, T, layers, K], positions [B, T], kept [B, T]) of every forward, for routing replay
        self.route_log: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = [] if record_routes else None
        param = next(model.parameters())
        self.cache = None
        self.history: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        if use_cache and self.ours:
            self.cache = LatentCache(model.config, batch, max_len, model.config.num_hidden_layers, param.dtype,
                                     param.device)
        elif use_cache:
            from transformers import DynamicCache

            self.cache = DynamicCache(config=model.config)
            self.seen_valid = torch.zeros(batch, 0, dtype=torch.bool, device=param.device)

    def forward(self, ids: torch.Tensor, valid: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """-> final normed hidden (ours) or logits (HF) for the new tokens [B, T, .]."""
        if not self.use_cache:
            new = ids.shape[1]
            if self.history is not None:
                ids, valid, positions = (torch.cat([h, x], 1) for h, x in zip(self.history, (ids, valid, positions),
                                                                              strict=True))
            self.history = (ids, valid, positions)
            return self.call(ids, valid, positions)[:, -new:]
        return self.call(ids, valid, positions)

    def call(self, ids, valid, positions):
        if self.ours:
            out = self.model(ids, attention_mask=valid.long(), position_ids=positions, cache=self.cache,
                             return_hidden=True, return_routes=self.route_log is not None)
            if self.route_log is not None:
                self.route_log.append((out.routes, positions, valid.clone()))
            return out.hidden_states
        if self.cache is not None:
            self.seen_valid = torch.cat([self.seen_valid, valid], 1)
            valid = self.seen_valid
        return self.model(input_ids=ids, attention_mask=valid.long(), position_ids=positions,
                          past_key_values=self.cache, use_cache=self.cache is not None).logits

    def routes(self, lengths: list[int]) -> list[torch.Tensor]:
        """Per row, the recorded experts of its first `lengths[row]` sequence positions [length, layers, K]
        (-1 where none was recorded). Later records of a position replace earlier ones (the naive path
        recomputes the whole sequence each step)."""
        first = self.route_log[0][0]
        table = torch.full((first.shape[0], max(lengths), *first.shape[2:]), -1, dtype=torch.int16,
                           device=first.device)
        for routes, positions, kept in self.route_log:
            keep = kept & (positions < table.shape[1])
            rows = torch.arange(routes.shape[0], device=routes.device)[:, None].expand_as(positions)
            table[rows[keep], positions[keep]] = routes[keep].to(torch.int16)
        return [table[row, :length].cpu() for row, length in enumerate(lengths)]

    def logits(self, out: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(out) if self.ours else out

    def invalidate_last(self, keep: torch.Tensor) -> None:
        """Mark the newest slot of the rows where `keep` [B] is False invalid (a rejected draft): in the cache,
        and in the routes. A mask, not row indices, so the host never waits for the verdicts."""
        if self.route_log:
            self.route_log[-1][2][:, -1] &= keep
        if self.use_cache:
            self.cache.valid[:, self.cache.length - 1] &= keep
        else:
            self.history[1][:, -1] &= keep


@torch.no_grad()
def generate(model, prompts: list[list[int]], max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
             eos_token_id: int | list[int] | None = None, seed: int = 0, use_mtp: bool = False,
             use_cache: bool = True, pad_token_id: int = 0, record_routes: bool = False, static_cache: bool = True,
             workspace: DecodeWorkspace | None = None) -> GenerationResult:
    """Sample up to `max_new_tokens` after each prompt (token id lists, any lengths) in one batch.

    HF Llama/Qwen2/Qwen3 models take the fast path of `r1pipe.model.fast_decode` (static cache, CUDA
    graphs, compaction; `workspace` keeps its cache between calls) unless `static_cache=False`, which
    keeps the plain `DynamicCache` loop (bench/native_decode.py compares the two).
    temperature 0 is greedy. `use_mtp` drafts with the first MTP module (our model only). `use_cache=False`
    recomputes the full sequence each step (slow; the reference the cached path is tested against).
    `record_routes` (our model): also return the experts each token was routed to (R3 routing replay)."""
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"generate: need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    ours = isinstance(model, DeepseekForCausalLM)
    if use_mtp and not (ours and model.config.num_nextn_predict_layers > 0):
        raise ValueError("generate: use_mtp needs a DeepseekForCausalLM with num_nextn_predict_layers >= 1")
    if record_routes and not (ours and model.routed_layers()):
        raise ValueError("generate: record_routes needs a DeepseekForCausalLM with MoE layers")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    stops = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    ids, valid = left_pad(prompts, pad_token_id, device)
    sampler = Sampler(temperature, top_p, seed, device)
    if use_cache and static_cache and not ours and fast_decode.supports(model):
        tokens, logprobs, truncated, cache_bytes = fast_decode.generate_static(
            model, ids, valid, max_new_tokens, sampler, stops, workspace)
        model.train(was_training)
        return GenerationResult(tokens, logprobs, truncated, None, cache_bytes)
    batch, width = ids.shape
    positions = (valid.long().cumsum(1) - 1).clamp_min(0)
    max_len = width + (2 if use_mtp else 1) * max_new_tokens + 1
    decoder = Decoder(model, batch, max_len, use_cache, record_routes)
    emitter = DeviceEmitter(batch, max_new_tokens, stops, device)
    rows = torch.arange(batch, device=device)
    out = decoder.forward(ids, valid, positions)
    next_pos = positions[:, -1] + 1
    logits = decoder.logits(out[:, -1])
    token = sampler.sample(sampler.probs(logits))
    emitter.emit(rows, token, sampler.logprob(logits, token))
    if use_mtp:
        acceptance = _speculative_loop(model, decoder, sampler, emitter, ids, valid, positions, out, token, next_pos,
                                       max_len, max_new_tokens)
    else:
        acceptance = None
        for step in range(max_new_tokens - 1):  # every row has max_new_tokens after these, or stopped
            if emitter.done(step):
                break
            out = decoder.forward(token[:, None], torch.ones_like(valid[:, :1]), next_pos[:, None])
            next_pos = next_pos + 1
            logits = decoder.logits(out[:, -1])
            token = sampler.sample(sampler.probs(logits))
            emitter.emit(rows, token, sampler.logprob(logits, token))
    model.train(was_training)
    cache_bytes = decoder.cache.nbytes() if isinstance(decoder.cache, LatentCache) else None
    tokens, logprobs, truncated = emitter.results()
    routes = (decoder.routes([len(p) + len(t) for p, t in zip(prompts, tokens, strict=True)])
              if record_routes else None)
    return GenerationResult(tokens, logprobs, truncated, acceptance, cache_bytes, routes)


def _speculative_loop(model: DeepseekForCausalLM, decoder: Decoder, sampler: Sampler, emitter: DeviceEmitter,
                      ids, valid, positions, hidden, token, next_pos, max_len, max_new_tokens) -> float:
    """MTP draft + main-model verify, two cache slots per step; a rejected draft's slot becomes invalid.
    Each step emits one or two tokens per row, so max_new_tokens - 1 steps always suffice."""
    mtp_layer = model.mtp_layers[0]
    mtp_cache = LatentCache(model.config, ids.shape[0], max_len, 1, hidden.dtype, hidden.device,
                            first_layer=model.config.num_hidden_layers) if decoder.use_cache else None
    mtp_history = []

    def mtp(previous_hidden, next_tokens, new_valid, pos):
        """MTP hidden for positions whose main hidden is `previous_hidden` and next token `next_tokens`."""
        if mtp_cache is None:  # naive reference: recompute the MTP block over everything so far
            mtp_history.append((previous_hidden, next_tokens, new_valid, pos))
            parts = [torch.cat(p, 1) for p in zip(*mtp_history, strict=True)]
            return _mtp_block(model, mtp_layer, *parts, None)[:, -next_tokens.shape[1]:]
        return _mtp_block(model, mtp_layer, previous_hidden, next_tokens, new_valid, pos, mtp_cache)

    def draft_from(mtp_hidden):
        logits = model.lm_head(mtp_layer.shared_head.norm(mtp_hidden))
        q = sampler.probs(logits)
        return sampler.sample(q), q

    rows = torch.arange(ids.shape[0], device=ids.device)
    # prefill the MTP block over the prompt: position i combines h_i with token i+1
    following = torch.cat([ids[:, 1:], token[:, None]], 1)
    draft, q = draft_from(mtp(hidden, following, valid, positions)[:, -1])
    proposed = accepted_total = torch.zeros((), dtype=torch.long, device=ids.device)
    for step in range(max_new_tokens - 1):
        if emitter.done(step):
            break
        step_ids = torch.stack([token, draft], 1)
        step_pos = torch.stack([next_pos, next_pos + 1], 1)
        out = decoder.forward(step_ids, torch.ones_like(step_ids, dtype=torch.bool), step_pos)
        logits = model.lm_head(out)
        p_first = sampler.probs(logits[:, 0])
        accepted, first = sampler.verify(draft, p_first, q)
        second = sampler.sample(sampler.probs(logits[:, 1]))
        active = ~emitter.finished
        proposed = proposed + active.sum()
        accepted_total = accepted_total + (accepted & active).sum()
        emitter.emit(rows, first, sampler.logprob(logits[:, 0], first))
        emitter.emit(rows, second, sampler.logprob(logits[:, 1], second), mask=accepted)
        decoder.invalidate_last(accepted)
        # MTP over the two new slots: (h_a, token after a), (h_b, token after b) -- slot b only if accepted
        mtp_hidden = mtp(out, torch.stack([first, second], 1), torch.stack([torch.ones_like(accepted), accepted], 1),
                         step_pos)
        last = torch.where(accepted, 1, 0)
        draft, q = draft_from(mtp_hidden[rows, last])
        token = torch.where(accepted, second, first)
        next_pos = next_pos + 1 + accepted.long()
    return int(accepted_total) / max(int(proposed), 1)


def _mtp_block(model: DeepseekForCausalLM, layer, previous_hidden, next_tokens, new_valid, positions, cache):
    ctx = model.attention_context(next_tokens, new_valid.long(), positions, cache)
    x = layer.combine(model.model.embed_tokens(next_tokens), previous_hidden)
    x = layer(x, ctx, new_valid.long(), False)[0]
    if cache is not None:
        cache.advance(ctx.new_valid)
    return x
