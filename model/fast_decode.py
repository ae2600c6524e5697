"""Fast batched sampling for Hugging Face dense decoders (Llama, Qwen2, Qwen3): the native engine's hot path.

What makes it fast, the way gpt-fast and vLLM are:
- a static KV cache, allocated once per batch shape and reused across calls, so every decode step has
  the same shapes and addresses;
- on CUDA the one-token decode step is captured in a CUDA graph (one launch per token instead of
  hundreds of small kernels), one graph per batch size;
- sampling, log-probs, stop checks and the output buffers stay on the device: the host reads them every
  `sync_every` tokens, not every token;
- as rows finish, the live ones are compacted into a smaller batch (a power of two), so the batch does
  not idle behind its longest completion.

Written by hand rather than through `transformers`' generate: that one reads the finished flags on the
host every token, cannot drop finished rows, and its static cache's interface changes between minor
versions. The step calls the model's own submodules (projections, norms, MLP, rotary embedding), so it
decodes the trainer's live weights, LoRA adapters included, with no copy and no weight push.
"""
from __future__ import annotations

import contextlib

import torch

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")


def supports(model) -> bool:
    """Whether `model` is a dense HF decoder this path implements (full attention in every layer)."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in SUPPORTED_MODEL_TYPES or getattr(config, "use_sliding_window", False):
        return False
    return all(kind == "full_attention" for kind in (getattr(config, "layer_types", None) or ["full_attention"]))


def next_power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


class StaticDecoder:
    """The model's layers over a preallocated cache: keys/values [layers, B, KV heads, L, head dim] and
    `valid` [B, L] (False for left padding and unwritten columns). All rows share the column index, each
    row has its own rotary position. `forward(n, ...)` runs the first n rows."""

    def __init__(self, model, batch: int, max_len: int, dtype: torch.dtype, device: torch.device):
        config = model.config
        self.model, self.inner = model, model.model
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.group = self.heads // self.kv_heads  # query heads per KV head
        self.batch, self.max_len, self.dtype = batch, max_len, dtype
        shape = (config.num_hidden_layers, batch, self.kv_heads, max_len, self.head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.columns = torch.arange(max_len, device=device)
        self.weights = weight_pointers(model)
        # q * cos + rotate_half(q) * sin, shared by Llama, Qwen2 and Qwen3
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        self.rotate = apply_rotary_pos_emb

    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def forward(self, rows: slice, ids: torch.Tensor, positions: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        """Write `ids` [n, T] (rotary `positions` [n, T]) of cache rows `rows` into cache columns `columns` [T]
        and return the logits of the last one [n, V]. A query at column c sees the valid columns <= c, and
        itself (so a padding query never sees nothing)."""
        x = self.inner.embed_tokens(ids)
        cos, sin = self.inner.rotary_emb(x, positions)
        n, length = ids.shape
        earlier = self.columns[None, :] <= columns[:, None]  # [T, L]
        visible = (self.valid[rows, None, :] & earlier) | (self.columns[None, :] == columns[:, None])  # [n, T, L]
        # the same for every layer: per KV head, its query heads' rows [n, 1, group * T, L]
        masked = ~visible[:, None, None].expand(n, 1, self.group, length, self.max_len).reshape(
            n, 1, self.group * length, self.max_len)
        for index, layer in enumerate(self.inner.layers):
            h = layer.input_layernorm(x)
            x = x + self._attention(index, rows, layer.self_attn, h, cos, sin, columns, masked)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.model.lm_head(self.inner.norm(x[:, -1])).float()

    def prefill(self, ids: torch.Tensor, valid: torch.Tensor, score_budget: int = 2**26) -> torch.Tensor:
        """Left-padded prompts [B, W] into columns 0..W-1 -> logits of their last tokens [B, V]. In row chunks
        whose attention scores stay near `score_budget` elements (the [rows, heads, W, L] fp32 block)."""
        batch, width = ids.shape
        self.valid[:, :width] = valid
        positions = (valid.long().cumsum(1) - 1).clamp_min(0)
        chunk = max(1, score_budget // (self.heads * width * self.max_len))
        return torch.cat([self.forward(slice(start, start + chunk), ids[start:start + chunk],
                                       positions[start:start + chunk], self.columns[:width])
                          for start in range(0, batch, chunk)])

    def _attention(self, index, rows, attn, h, cos, sin, columns, masked) -> torch.Tensor:
        """Grouped-query attention over the cache: softmax(q k^T * scale, -inf where `masked`) v, the query
        heads of each KV head batched together so the cache is read once and never repeated."""
        n, length = h.shape[:2]
        q = attn.q_proj(h).view(n, length, self.heads, self.head_dim)
        k = attn.k_proj(h).view(n, length, self.kv_heads, self.head_dim)
        v = attn.v_proj(h).view(n, length, self.kv_heads, self.head_dim)
        if hasattr(attn, "q_norm"):  # Qwen3: RMSNorm on each head's query and key
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = self.rotate(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        keys, values = self.keys[index, rows], self.values[index, rows]
        keys.index_copy_(2, columns, k.to(self.dtype))
        values.index_copy_(2, columns, v.transpose(1, 2).to(self.dtype))
        q = q.reshape(n, self.kv_heads, self.group * length, self.head_dim).to(self.dtype)
        scores = (q @ keys.transpose(-1, -2)).float() * attn.scaling  # [n, KV, group * T, L]
        probs = scores.masked_fill(masked, float("-inf")).softmax(-1).to(self.dtype)
        out = (probs @ values).view(n, self.heads, length, self.head_dim).transpose(1, 2)
        return attn.o_proj(out.reshape(n, length, self.heads * self.head_dim))

    def compact(self, keep: torch.Tensor) -> None:
        """Move rows `keep` (slot indices) to the front of the cache, in that order."""
        m = keep.shape[0]
        self.keys[:, :m] = self.keys[:, keep]
        self.values[:, :m] = self.values[:, keep]
        self.valid[:m] = self.valid[keep]


def weight_pointers(model) -> tuple[int, ...]:
    """Where the weights live: a captured graph reads these addresses, so it is reusable while they hold."""
    return tuple(p.data_ptr() for p in model.parameters())


class GraphedStep:
    """The one-token decode step for n rows, replayed from a CUDA graph on CUDA (eager elsewhere), reading
    its inputs from fixed buffers."""

    def __init__(self, decoder: StaticDecoder, autocast_dtype: torch.dtype | None):
        device = decoder.valid.device
        self.decoder, self.autocast_dtype = decoder, autocast_dtype
        self.token = torch.zeros(decoder.batch, dtype=torch.long, device=device)
        self.position = torch.zeros(decoder.batch, dtype=torch.long, device=device)
        self.column = torch.zeros(1, dtype=torch.long, device=device)
        self.use_graphs = device.type == "cuda"
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None

    def _autocast(self):
        """Autocast as the caller has it, without its weight-cast cache (a graph must recompute the casts)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.decoder.valid.device.type, dtype=self.autocast_dtype, cache_enabled=False)

    def _eager(self, n: int) -> torch.Tensor:
        with self._autocast():
            return self.decoder.forward(slice(0, n), self.token[:n, None], self.position[:n, None], self.column)

    def __call__(self, n: int, token: torch.Tensor, position: torch.Tensor, column: int) -> torch.Tensor:
        self.token[:n].copy_(token)
        self.position[:n].copy_(position)
        self.column.fill_(column)
        self.decoder.valid[:n, column] = True
        if not self.use_graphs:
            return self._eager(n)
        if n not in self.graphs:
            self.graphs[n] = self._capture(n)
        graph, logits = self.graphs[n]
        graph.replay()
        return logits

    def _capture(self, n: int):
        """Warm up on a side stream (as torch.cuda.graphs asks), then capture. The warm-up writes the same
        cache column the replay will, with the same inputs, so it changes nothing."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._eager(n)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self._eager(n)
        self.pool = graph.pool()
        return graph, logits


class DecodeWorkspace:
    """Keeps the last static cache and its graphs between generate calls (a GRPO run samples the same
    batch shape every step). Reused while the batch size matches, the cache is long enough and the
    weights have not moved; otherwise rebuilt."""

    def __init__(self):
        self.step: GraphedStep | None = None

    def get(self, model, batch: int, max_len: int, dtype: torch.dtype, autocast_dtype, device) -> GraphedStep:
        step = self.step
        if (step is None or step.decoder.batch != batch or step.decoder.max_len < max_len
                or step.decoder.dtype != dtype or step.autocast_dtype != autocast_dtype
                or step.decoder.model is not model or step.decoder.weights != weight_pointers(model)):
            self.step = None  # free the old cache before allocating the new one
            decoder = StaticDecoder(model, batch, -(-max_len // 64) * 64, dtype, device)
            step = self.step = GraphedStep(decoder, autocast_dtype)
        step.decoder.valid.zero_()
        return step

    def release(self) -> None:
        self.step = None


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    if device.type in ("cuda", "cpu") and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


class DeviceEmitter:
    """Completion tokens and log-probs per row, kept on the device: [rows, max_new + 1] buffers (the last
    column takes the writes of rows already finished), counts and finished flags."""

    def __init__(self, batch: int, max_new_tokens: int, stops: set[int], device):
        self.tokens = torch.zeros(batch, max_new_tokens + 1, dtype=torch.long, device=device)
        self.logprobs = torch.zeros(batch, max_new_tokens + 1, dtype=torch.float, device=device)
        self.count = torch.zeros(batch, dtype=torch.long, device=device)
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)
        self.stops = torch.tensor(sorted(stops), dtype=torch.long, device=device)
        self.max_new_tokens = max_new_tokens

    def emit(self, rows: torch.Tensor, token: torch.Tensor, logprob: torch.Tensor,
             mask: torch.Tensor | None = None) -> None:
        """Append `token`/`logprob` [n] to `rows` [n] that are not finished (and where `mask` holds)."""
        live = ~self.finished[rows] if mask is None else ~self.finished[rows] & mask
        column = torch.where(live, self.count[rows], self.max_new_tokens)
        self.tokens[rows, column] = token
        self.logprobs[rows, column] = logprob
        count = self.count[rows] + live
        self.count[rows] = count
        stop = torch.isin(token, self.stops) | (count >= self.max_new_tokens)
        self.finished[rows] = self.finished[rows] | (live & stop)

    def done(self, step: int, every: int = 16) -> bool:
        """Every `every` steps, whether all rows have finished (the one host sync of a decode loop)."""
        return step % every == every - 1 and bool(self.finished.all())

    def results(self) -> tuple[list[list[int]], list[list[float]], list[bool]]:
        counts = self.count.tolist()
        tokens = [row[:c] for row, c in zip(self.tokens.tolist(), counts, strict=True)]
        logprobs = [row[:c] for row, c in zip(self.logprobs.tolist(), counts, strict=True)]
        stops = set(self.stops.tolist())
        return tokens, logprobs, [not (t and t[-1] in stops) for t in tokens]


@torch.no_grad()
def generate_static(model, ids: torch.Tensor, valid: torch.Tensor, max_new_tokens: int, sampler, stops: set[int],
                    workspace: DecodeWorkspace | None = None, sync_every: int = 16):
    """Sample after left-padded prompts `ids`/`valid` [B, W]. -> (tokens, logprobs, truncated, cache bytes).

    `sampler` draws tokens and scores them (model.generate.Sampler); every `sync_every` tokens the host checks whether all
    rows are done and compacts the batch when the live rows fit in half of it."""
    device = ids.device
    batch, width = ids.shape
    autocast_dtype = _autocast_dtype(device)
    dtype = autocast_dtype or next(model.parameters()).dtype
    step = (workspace or DecodeWorkspace()).get(model, batch, width + max_new_tokens, dtype, autocast_dtype, device)
    decoder = step.decoder
    logits = decoder.prefill(ids, valid)
    emitter = DeviceEmitter(batch, max_new_tokens, stops, device)
    slots = torch.arange(batch, device=device)  # slot -> row of the batch
    token = sampler.sample(sampler.probs(logits))
    emitter.emit(slots, token, sampler.logprob(logits, token))
    position, n = valid.long().sum(1), batch  # the next token's rotary position
    for offset in range(max_new_tokens - 1):
        if offset % sync_every == sync_every - 1:
            live = int((~emitter.finished[slots]).sum())
            if live == 0:
                break
            if next_power_of_two(live) <= n // 2:
                n = next_power_of_two(live)
                keep = torch.argsort(emitter.finished[slots].int(), stable=True)[:n]
                slots, token, position = slots[keep], token[keep], position[keep]
                decoder.compact(keep)
        logits = step(n, token, position, width + offset)
        token = sampler.sample(sampler.probs(logits))
        emitter.emit(slots, token, sampler.logprob(logits, token))
        position = position + 1
    tokens, logprobs, truncated = emitter.results()
    return tokens, logprobs, truncated, decoder.nbytes()


__all__ = ["DecodeWorkspace", "DeviceEmitter", "StaticDecoder", "generate_static", "supports"]
