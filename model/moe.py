"""DeepSeekMoE: shared + routed SwiGLU experts, the V3 sigmoid gate with correction bias and the V2
softmax gate (both with group-limited top-k), routed scaling, the sequence-wise balance loss and the
auxiliary-loss-free bias update. Routed experts run as two grouped GEMMs over expert-sorted tokens."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from r1pipe.model.config import DeepseekConfig
from r1pipe.model.layers import SwiGLU, upcast


def group_limited_topk(choice_scores: torch.Tensor, top_k: int, n_group: int, topk_group: int,
                       group_score: str) -> torch.Tensor:
    """Indices [N, top_k] of the best experts by `choice_scores` [N, E], taken only from the `topk_group`
    best of `n_group` contiguous expert groups. A group scores as the sum of its top-2 ("top2_sum", V3)
    or its max ("max", V2)."""
    if n_group <= 1 or topk_group >= n_group:
        return choice_scores.topk(top_k, dim=-1, sorted=False).indices
    grouped = choice_scores.unflatten(-1, (n_group, -1))
    if group_score == "top2_sum":
        scores_of_group = grouped.topk(2, dim=-1).values.sum(-1)
    else:
        scores_of_group = grouped.amax(-1)
    keep_group = scores_of_group.topk(topk_group, dim=-1, sorted=False).indices
    group_mask = torch.zeros_like(scores_of_group, dtype=torch.bool).scatter_(1, keep_group, True)
    masked = grouped.masked_fill(~group_mask[..., None], float("-inf")).flatten(-2)
    return masked.topk(top_k, dim=-1, sorted=False).indices


class Gate(nn.Module):
    """Router. V3 (noaux_tc): s = sigmoid(x W^T), select top-k of s + bias within the best groups,
    weights from s alone. V2: s = softmax(x W^T), greedy or group-limited. Both: optional renormalisation
    over the selected experts, then x routed_scaling_factor. Scores are computed in (at least) fp32."""

    def __init__(self, config: DeepseekConfig):
        super().__init__()
        self.top_k, self.n_group, self.topk_group = config.num_experts_per_tok, config.n_group, config.topk_group
        self.topk_method, self.scoring_func = config.topk_method, config.scoring_func
        self.norm_topk_prob, self.routed_scaling_factor = config.norm_topk_prob, config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        if self.topk_method == "noaux_tc":
            self.register_buffer("e_score_correction_bias", torch.zeros(config.n_routed_experts))

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        logits = F.linear(upcast(x), upcast(self.weight))
        return logits.sigmoid() if self.scoring_func == "sigmoid" else logits.softmax(dim=-1)

    def forward(self, x: torch.Tensor, route: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, H] -> routing weights [N, K] (fp32), expert indices [N, K], scores [N, E].

        `route` [N, K] replays a recorded expert selection (routing replay, Ma et al. 2025): rows >= 0
        use those experts, rows of -1 choose their own. The weights still come from the live scores of
        the chosen experts (renormalised and scaled as usual), so the router keeps its gradient."""
        scores = self.scores(x)
        indices = self.select(scores)
        if route is not None:
            indices = torch.where(route[:, :1] >= 0, route.to(indices.dtype), indices)
        weights = scores.gather(1, indices)
        if self.norm_topk_prob and self.top_k > 1:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.routed_scaling_factor, indices, scores

    def select(self, scores: torch.Tensor) -> torch.Tensor:
        """The top-k experts [N, K] by score (V3: score + correction bias), within the best groups."""
        if self.topk_method == "noaux_tc":
            return group_limited_topk(scores.detach() + self.e_score_correction_bias, self.top_k,
                                      self.n_group, self.topk_group, "top2_sum")
        if self.topk_method == "group_limited_greedy":
            return group_limited_topk(scores.detach(), self.top_k, self.n_group, self.topk_group, "max")
        return group_limited_topk(scores.detach(), self.top_k, 1, 1, "max")


def grouped_mm(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Rows of x (sorted by expert, `counts[e]` rows for expert e) times weight[e]^T, weight [E, out, in].

    CUDA bf16: torch._grouped_mm (one kernel for all experts); fp32 master weights are cast to bf16
    first, as autocast does for a matmul (autocast does not cover _grouped_mm, which takes bf16 only).
    Elsewhere (CPU, fp32/fp64 tests): the rows are scattered into a zero-padded [E, max_count, in]
    batch for one torch.bmm, since torch._grouped_mm has no CPU backward here."""
    aligned = x.shape[1] % 8 == 0 and weight.shape[1] % 8 == 0  # _grouped_mm wants 16-byte row strides
    if x.is_cuda and x.dtype == torch.bfloat16 and aligned and hasattr(torch, "_grouped_mm"):
        offsets = counts.cumsum(0).to(torch.int32)
        return torch._grouped_mm(x, weight.to(x.dtype).transpose(-2, -1), offs=offsets)
    num_experts = weight.shape[0]
    expert_of_row = torch.repeat_interleave(torch.arange(num_experts, device=x.device), counts)
    starts = counts.cumsum(0) - counts
    slot = torch.arange(x.shape[0], device=x.device) - starts[expert_of_row]
    padded = x.new_zeros(num_experts, int(counts.max()) if x.shape[0] else 0, x.shape[1])
    padded[expert_of_row, slot] = x
    return torch.bmm(padded, weight.transpose(1, 2))[expert_of_row, slot]


class RoutedExperts(nn.Module):
    """All routed experts' weights as two 3-D tensors (HF layout: gate_up_proj [E, 2I, H] with gate
    rows first, down_proj [E, H, I])."""

    def __init__(self, config: DeepseekConfig):
        super().__init__()
        e, h, i = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h))
        self.down_proj = nn.Parameter(torch.empty(e, h, i))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, H], weights/indices [N, K] -> sum_k weights[:, k] * expert_{indices[:, k]}(x), and the
        rows per expert [E].

        Static shapes, no host sync and no atomics: the K copies of each token are permuted into expert
        order with index_copy (its backward is a gather), and un-permuted the same way; the weighted
        sum over the K experts is one batched [1, K] x [K, H] product per token."""
        n, k = indices.shape
        flat = indices.flatten()
        order = flat.argsort(stable=True)  # sorted row j holds (token, slot) row order[j]
        position = torch.empty_like(order).scatter_(0, order, torch.arange(n * k, device=x.device))
        counts = torch.zeros(self.gate_up_proj.shape[0], dtype=torch.long, device=x.device)
        counts.scatter_add_(0, flat, torch.ones_like(flat))
        copies = x[:, None, :].expand(n, k, x.shape[1]).reshape(n * k, x.shape[1])
        x_sorted = torch.empty_like(copies).index_copy(0, position, copies)
        gate, up = grouped_mm(x_sorted, self.gate_up_proj, counts).chunk(2, dim=-1)
        out_sorted = grouped_mm(F.silu(gate) * up, self.down_proj, counts)
        out = torch.empty_like(out_sorted).index_copy(0, order, out_sorted).view(n, k, -1)
        combined = torch.bmm(weights[:, None, :].to(out.dtype), out)[:, 0]
        return combined.to(x.dtype), counts


def sequence_balance_loss(scores: torch.Tensor, indices: torch.Tensor, token_mask: torch.Tensor | None,
                          top_k: int) -> torch.Tensor:
    """Complementary sequence-wise balance loss without alpha: mean over sequences of
    sum_i f_i P_i, f_i = E/(K T) * #tokens of the sequence routed to i, P_i = mean_t s_i,t / sum_j s_j,t.
    scores [B, T, E], indices [B, T, K], token_mask [B, T] (padding excluded) or None."""
    num_experts = scores.shape[-1]
    mask = torch.ones(scores.shape[:2], device=scores.device) if token_mask is None else token_mask.float()
    tokens = mask.sum(1).clamp_min(1)
    routed = torch.zeros_like(scores).scatter_(-1, indices, 1.0) * mask[..., None]
    f = routed.sum(1) * num_experts / (top_k * tokens[:, None])
    normed = scores / scores.sum(-1, keepdim=True)
    p = (normed * mask[..., None]).sum(1) / tokens[:, None]
    return (f * p).sum(-1).mean()


class MoE(nn.Module):
    """Shared experts + routed experts."""

    def __init__(self, config: DeepseekConfig):
        super().__init__()
        self.top_k, self.alpha = config.num_experts_per_tok, config.aux_loss_alpha
        self.gate = Gate(config)
        self.experts = RoutedExperts(config)
        self.shared_experts = (SwiGLU(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
                               if config.n_shared_experts else None)
        # tokens per expert since the last bias update (the model adds each training forward's loads)
        self.register_buffer("expert_load", torch.zeros(config.n_routed_experts), persistent=False)

    def _apply(self, fn, recurse=True):
        """Keep the correction bias and the loads in fp32 under .to(bf16): gamma-sized steps and counts
        above 256 vanish in bf16."""
        super()._apply(fn, recurse)
        self.expert_load = self.expert_load.float()
        if hasattr(self.gate, "e_score_correction_bias"):
            self.gate.e_score_correction_bias = self.gate.e_score_correction_bias.float()
        return self

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None, balance_loss: bool = False,
                route: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """-> output, balance loss (alpha included; None unless asked), tokens per expert [E] (padding
        excluded), the experts chosen per token [..., K]. Loads are returned, not accumulated here, so
        activation recomputation cannot count a batch twice. `route` [..., K]: a selection to replay
        (see `Gate.forward`); the loads and the balance loss count the experts actually used."""
        flat = x.flatten(0, -2)
        weights, indices, scores = self.gate(flat, None if route is None else route.flatten(0, -2))
        out, counts = self.experts(flat, weights, indices)
        out = out.view(x.shape)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        with torch.no_grad():
            if token_mask is None:
                load = counts.float()
            else:
                real = token_mask.flatten().bool()[:, None].expand_as(indices)
                load = torch.zeros_like(self.expert_load).index_add_(0, indices.flatten(), real.flatten().float())
        loss = None
        if balance_loss and self.alpha > 0:
            loss = self.alpha * sequence_balance_loss(scores.view(*x.shape[:-1], -1),
                                                      indices.view(*x.shape[:-1], -1), token_mask, self.top_k)
        return out, loss, load, indices.view(*x.shape[:-1], -1)

    @torch.no_grad()
    def update_bias(self, gamma: float) -> torch.Tensor:
        """Auxiliary-loss-free balancing: b_i += gamma * sign(mean load - load_i) from the loads counted
        since the last call, summed over data-parallel ranks so every rank applies the same update.
        Returns the loads used."""
        load = self.expert_load.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(load)
        if hasattr(self.gate, "e_score_correction_bias") and load.sum() > 0:
            bias = self.gate.e_score_correction_bias
            bias += gamma * torch.sign(load.mean() - load).to(bias.dtype)
        self.expert_load.zero_()
        return load
