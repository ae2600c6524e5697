"""One policy interface for our DeepSeek model and Hugging Face dense causal LMs (Qwen2, Llama, ...), so
every stage treats them alike: final hidden states, chunked per-token log-probs, the LM training loss,
the after-step hook (V3 expert-bias update) and saving."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint

from r1pipe.model.config import DeepseekConfig, preset_names
from r1pipe.model.hf_adapter import MODEL_TYPES
from r1pipe.model.layers import build_attention_mask, upcast
from r1pipe.model.modeling import DeepseekForCausalLM


# logits in one log-prob block when the caller leaves the size to us (2**25: 64 MiB in bf16, 128 MiB in fp32)
LOGITS_PER_CHUNK = 2**25
# the rows TRL's fused function projects at once (trl.kernels.chunked_logprob.TOKEN_CHUNK_SIZE)
FUSED_TOKEN_ROWS = 4096


class PolicyError(ValueError):
    """A model path or preset that cannot be loaded as a policy (one-line message)."""


def chunk_logprobs(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor, temperature: float,
                   with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(target) (and entropy) for hidden [B, C, H] through the output layer `head` (H -> V), in fp32.

    The head is called as a module, never read as a weight: under DeepSpeed ZeRO-3 a parameter is
    an empty placeholder outside its module's forward, which gathers it (and reduces its gradient)."""
    logp = (upcast(head(hidden)) / temperature).log_softmax(-1)
    token = logp.gather(-1, targets[..., None])[..., 0]
    entropy = -(logp.exp() * logp).sum(-1) if with_entropy else None
    return token, entropy


def fusable_head(head: torch.nn.Module) -> bool:
    """Whether `fused_logprobs` may read the head's weight directly: a plain nn.Linear whose weight is whole.
    Not a LoRA-wrapped head (the adapter is in its forward) nor a DeepSpeed ZeRO-3 partition (`ds_id`:
    empty outside the module's forward); those go through `chunk_logprobs`, which calls the module."""
    return type(head) is torch.nn.Linear and not hasattr(head.weight, "ds_id")


def fused_logprobs(hidden: torch.Tensor, head: torch.nn.Linear, targets: torch.Tensor, temperature: float,
                   with_entropy: bool, logits_per_block: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`chunk_logprobs` for N rows (hidden [N, H], targets [N]) with TRL's fused chunked log-prob function
    (trl.kernels.ChunkedLogProbFunction): the projection runs in [rows, vocab-tile] blocks folded into online
    log-sum-exp (and entropy) statistics, backward recomputes each block and accumulates the weight gradient
    in fp32. Against a checkpointed chunk loop it casts the weight and accumulates its gradient once per
    block rather than once per token chunk, and holds no fp32 [chunk, V] log-softmax or entropy terms."""
    from trl.kernels import ChunkedLogProbFunction

    tile = max(1024, logits_per_block // max(1, min(hidden.shape[0], FUSED_TOKEN_ROWS)))
    outputs = ("entropy",) if with_entropy else ()
    logp, entropy, *_ = ChunkedLogProbFunction.apply(hidden, head.weight, head.bias, targets, temperature, tile,
                                                     None, 1.0, outputs)
    return logp, entropy


def dense_mask(attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None) -> torch.Tensor | None:
    """For HF models: packed rows (position_ids restarting at 0) get an explicit [B, 1, T, T] block-causal
    mask, since transformers' SDPA/eager paths otherwise attend across documents."""
    if position_ids is None or position_ids.shape[1] < 2 or not bool((position_ids[:, 1:] == 0).any()):
        return attention_mask
    valid = (torch.ones_like(position_ids, dtype=torch.bool) if attention_mask is None
             else attention_mask.bool())
    doc = (position_ids == 0).long().cumsum(1)
    return build_attention_mask(valid, position_ids.shape[1], doc, doc)


@dataclass
class TokenScores:
    """One forward's per-token results for the trainer: log-probs [B, T-1] of input_ids[:, 1:], entropy
    (when asked), and for our V3 model the auxiliary loss with its metrics and the experts each token was
    routed to [B, T, MoE layers, K] (when asked)."""

    logp: torch.Tensor
    entropy: torch.Tensor | None
    aux_loss: torch.Tensor | None
    aux_metrics: dict[str, float]
    routes: torch.Tensor | None = None


class Policy:
    """A causal LM behind the small interface the stages use. `module` may be replaced by a wrapper
    (PEFT, DeepSpeed) that exposes the same model through `get_base_model()` or `.module`."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    @property
    def model(self) -> torch.nn.Module:
        """The causal LM itself under PEFT/DeepSpeed wrappers (adapters stay injected in its layers)."""
        m = self.module
        while True:
            if hasattr(m, "get_base_model"):
                m = m.get_base_model()
            elif hasattr(m, "module") and isinstance(m.module, torch.nn.Module):
                m = m.module
            else:
                return m

    @property
    def is_deepseek(self) -> bool:
        return isinstance(self.model, DeepseekForCausalLM)

    def output_layer(self) -> torch.nn.Module:
        """The vocabulary projection (hidden -> logits) as a module; see `chunk_logprobs` for why a module."""
        return self.model.lm_head if self.is_deepseek else self.model.get_output_embeddings()

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Final normed hidden states [B, T, H] (no vocabulary projection)."""
        return self.hidden_states_and_aux(input_ids, attention_mask, position_ids)[0]

    def hidden_states_and_aux(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                              position_ids: torch.Tensor | None = None, aux_labels: torch.Tensor | None = None,
                              routes: torch.Tensor | None = None, return_routes: bool = False
                              ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, float], torch.Tensor | None]:
        """Hidden states, plus -- for our model given `aux_labels` -- the V3 auxiliary training loss on them
        (MTP weight x MTP loss + balance loss) and its metrics, from the same forward, and the experts of
        every decoder MoE layer (`routes` replays given ones, `return_routes` returns them; see
        DeepseekForCausalLM.forward). (hidden, None, {}, None) for dense models.

        The forward is a call of `module`, wrappers included: DeepSpeed's engine does its per-micro-batch
        bookkeeping in its own forward (under ZeRO-3 gradients accumulate wrongly without it). A dense
        model's forward computes the logits of the last position only (`logits_to_keep=1`)."""
        if self.is_deepseek:
            out = self.module(input_ids, attention_mask=attention_mask, position_ids=position_ids, labels=aux_labels,
                              return_hidden=True, routes=routes, return_routes=return_routes)
            return out.hidden_states, out.loss, out.aux or {}, out.routes
        if routes is not None or return_routes:
            raise PolicyError("routing replay needs a DeepSeek MoE policy; this one is dense")
        out = self.module(input_ids=input_ids, attention_mask=dense_mask(attention_mask, position_ids),
                          position_ids=position_ids, output_hidden_states=True, logits_to_keep=1, use_cache=False)
        return out.hidden_states[-1], None, {}, None

    def token_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                       position_ids: torch.Tensor | None = None, chunk_size: int = 1024, temperature: float = 1.0,
                       return_entropy: bool = False):
        """[B, T-1] log-probs of input_ids[:, 1:] (and per-token entropy when asked), projected onto the
        vocabulary in blocks of at most `chunk_size` x V logits (`fused_logprobs`, or for wrapped heads
        `chunk_logprobs` over `chunk_size` positions at a time), each recomputed in backward: never a
        [B, T, V] tensor."""
        scores = self.token_logprobs_and_aux(input_ids, attention_mask, position_ids, chunk_size, temperature,
                                             return_entropy)
        return (scores.logp, scores.entropy) if return_entropy else scores.logp

    def token_logprobs_and_aux(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                               position_ids: torch.Tensor | None = None, chunk_size: int = 1024,
                               temperature: float = 1.0, return_entropy: bool = False,
                               aux_labels: torch.Tensor | None = None, only: torch.Tensor | None = None,
                               routes: torch.Tensor | None = None, return_routes: bool = False) -> TokenScores:
        """`token_logprobs` with everything else the same forward gives (`TokenScores`): with `aux_labels`, a
        V3 policy's MTP and balance losses; `routes` / `return_routes` replay or return its expert choices
        (see `hidden_states_and_aux`).

        `only` (bool [B, T-1]) restricts the vocabulary projection to those positions (GRPO: the
        completion tokens; prompts are often most of a sequence), every other position gets 0. `chunk_size`
        (0: as many tokens as make `LOGITS_PER_CHUNK` logits) bounds the logits projected at once."""
        hidden, aux_loss, aux_metrics, chosen = self.hidden_states_and_aux(input_ids, attention_mask, position_ids,
                                                                           aux_labels, routes, return_routes)
        hidden, targets = hidden[:, :-1], input_ids[:, 1:]
        chunk_size = chunk_size if chunk_size > 0 else max(16, LOGITS_PER_CHUNK // self.model.config.vocab_size)
        if only is not None:
            hidden, targets = hidden[only].unsqueeze(0), targets[only].unsqueeze(0)
        head = self.output_layer()
        if fusable_head(head):
            rows = hidden.shape[:2]
            logp, entropy = fused_logprobs(hidden.flatten(0, 1), head, targets.flatten(), temperature, return_entropy,
                                           chunk_size * self.model.config.vocab_size)
            logp, entropy = logp.view(rows), (entropy.view(rows) if return_entropy else None)
            return self._scores(logp, entropy, only, aux_loss, aux_metrics, chosen)
        logps, entropies = [], []
        for start in range(0, hidden.shape[1], chunk_size):
            args = (hidden[:, start:start + chunk_size], head, targets[:, start:start + chunk_size], temperature,
                    return_entropy)
            if torch.is_grad_enabled() and hidden.requires_grad:
                logp, entropy = checkpoint(chunk_logprobs, *args, use_reentrant=False)
            else:
                logp, entropy = chunk_logprobs(*args)
            logps.append(logp)
            entropies.append(entropy)
        logp = torch.cat(logps, 1)
        entropy = torch.cat(entropies, 1) if return_entropy else None
        return self._scores(logp, entropy, only, aux_loss, aux_metrics, chosen)

    @staticmethod
    def _scores(logp, entropy, only, aux_loss, aux_metrics, chosen) -> TokenScores:
        """TokenScores with the `only` positions' values put back in place ([1, N] -> [B, T-1], 0 elsewhere)."""
        if only is not None:
            place = lambda values: values.new_zeros(only.shape).masked_scatter(only, values[0])
            logp, entropy = place(logp), (place(entropy) if entropy is not None else None)
        return TokenScores(logp, entropy, aux_loss, aux_metrics, chosen)

    def train_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        """Next-token CE on batch["labels"] (-100 ignored; HF convention, shifted inside) plus, for our
        model, the MTP and balance losses. -> (loss, metrics)."""
        for key in ("input_ids", "labels"):
            if key not in batch:
                raise PolicyError(f"train_loss: batch has no '{key}' (keys: {sorted(batch)})")
        kwargs = {k: batch.get(k) for k in ("attention_mask", "position_ids")}
        if self.is_deepseek:
            out = self.module(batch["input_ids"], labels=batch["labels"], **kwargs)
            return out.loss, {"loss": float(out.loss.detach()), **out.aux}
        kwargs["attention_mask"] = dense_mask(kwargs["attention_mask"], kwargs["position_ids"])
        out = self.module(input_ids=batch["input_ids"], labels=batch["labels"], **kwargs)
        return out.loss, {"loss": float(out.loss.detach())}

    def after_optimizer_step(self) -> dict[str, float]:
        """V3: aux-loss-free expert-bias update from this step's loads (returns load metrics); dense: no-op."""
        return self.model.update_expert_bias() if self.is_deepseek else {}

    def save_pretrained(self, directory: str | Path) -> None:
        self.module.save_pretrained(str(directory))


def load_policy(path_or_preset: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                **config_overrides) -> Policy:
    """A checkpoint directory (ours/DeepSeek HF, or any HF causal LM) or a DeepSeek preset name (fresh
    weights from the current torch seed; `config_overrides` such as vocab_size apply to presets)."""
    path = Path(path_or_preset)
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.is_file():
            raise PolicyError(f"{path}: no config.json (not a model directory)")
        try:
            model_type = json.loads(config_file.read_text()).get("model_type")
        except json.JSONDecodeError as e:
            raise PolicyError(f"{config_file}: not valid JSON ({e})") from None
        if model_type in MODEL_TYPES:
            return Policy(DeepseekForCausalLM.from_pretrained(path, dtype=dtype, device=device))
        from transformers import AutoModelForCausalLM

        try:
            module = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        except (OSError, ValueError, KeyError) as e:
            raise PolicyError(f"{path}: transformers cannot load it as a causal LM ({str(e).splitlines()[0]})") from None
        return Policy(module.to(device))
    if str(path_or_preset) in preset_names():
        config = DeepseekConfig.preset(str(path_or_preset))
        if config_overrides:
            config = config.replace(**config_overrides)
        return Policy(DeepseekForCausalLM(config).to(device=device, dtype=dtype))
    raise PolicyError(f"model path {str(path_or_preset)!r}: neither a model directory nor a preset "
                      f"({', '.join(preset_names())})")
