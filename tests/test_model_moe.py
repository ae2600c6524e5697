"""DeepSeekMoE routing, grouped expert GEMM, sequence-wise balance loss and the bias update."""
import pytest
import torch
import torch.nn.functional as F

from r1pipe.model import DeepseekConfig
from r1pipe.model.moe import MoE, grouped_mm, group_limited_topk, sequence_balance_loss
from test_model_helpers import single_thread  # noqa: F401  (autouse fixture)


def reference_group_limited(scores, top_k, n_group, topk_group, group_score):
    """Token by token, straight from the definition."""
    n, e = scores.shape
    size = e // n_group
    out = []
    for row in scores.tolist():
        groups = [row[g * size:(g + 1) * size] for g in range(n_group)]
        if group_score == "top2_sum":
            value = [sum(sorted(g, reverse=True)[:2]) for g in groups]
        else:
            value = [max(g) for g in groups]
        kept = sorted(range(n_group), key=lambda g: -value[g])[:topk_group]
        allowed = [i for g in kept for i in range(g * size, (g + 1) * size)]
        out.append(set(sorted(allowed, key=lambda i: -row[i])[:top_k]))
    return out


def test_group_limited_topk_matches_reference():
    torch.manual_seed(0)
    for group_score in ("top2_sum", "max"):
        for n_group, topk_group, top_k in ((8, 4, 8), (4, 1, 2), (8, 3, 6)):
            scores = torch.rand(64, 32, dtype=torch.float64)
            got = group_limited_topk(scores, top_k, n_group, topk_group, group_score)
            assert [set(r) for r in got.tolist()] == reference_group_limited(scores, top_k, n_group, topk_group,
                                                                           group_score)


def tiny_moe(**changes):
    config = DeepseekConfig.preset("nano-v3").replace(**changes)
    torch.manual_seed(0)
    moe = MoE(config).double()
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.3)
    return moe, config


def test_moe_equals_per_token_reference():
    """Gate (bias picks, scores weigh), grouped GEMM and routed scaling against a token-by-token loop."""
    moe, config = tiny_moe()
    moe.gate.e_score_correction_bias.normal_(0, 0.5)
    x = torch.randn(2, 9, config.hidden_size, dtype=torch.float64)
    out, _, load, _ = moe(x)
    flat = x.flatten(0, 1)
    s = torch.sigmoid(flat @ moe.gate.weight.T)
    chosen = reference_group_limited(s + moe.gate.e_score_correction_bias, config.num_experts_per_tok,
                                     config.n_group, config.topk_group, "top2_sum")
    expected = []
    for t, experts in enumerate(chosen):
        experts = sorted(experts)
        weights = s[t, experts] / s[t, experts].sum() * config.routed_scaling_factor
        y = moe.shared_experts(flat[t])
        for w, e in zip(weights, experts, strict=True):
            gate, up = (moe.experts.gate_up_proj[e] @ flat[t]).chunk(2)
            y = y + w * (moe.experts.down_proj[e] @ (F.silu(gate) * up))
        expected.append(y)
    torch.testing.assert_close(out.flatten(0, 1), torch.stack(expected))
    assert load.sum() == 18 * config.num_experts_per_tok


def test_grouped_mm_matches_loop_including_empty_experts():
    torch.manual_seed(0)
    counts = torch.tensor([3, 0, 5, 1])
    x = torch.randn(9, 6)
    w = torch.randn(4, 7, 6)
    expert = torch.repeat_interleave(torch.arange(4), counts)
    expected = torch.stack([w[e] @ x[i] for i, e in enumerate(expert.tolist())])
    torch.testing.assert_close(grouped_mm(x, w, counts), expected)


def test_balance_loss_equals_hand_computation():
    # 1 sequence, 2 tokens, 4 experts, top-2
    scores = torch.tensor([[[0.9, 0.5, 0.1, 0.3], [0.2, 0.8, 0.6, 0.4]]])
    indices = torch.tensor([[[0, 1], [1, 2]]])
    # f_i = E/(K T) * count_i = 4/(2*2) * [1, 2, 1, 0] ; P_i = mean_t s_i,t / sum_j s_j,t
    f = [1.0, 2.0, 1.0, 0.0]
    p = [(0.9 / 1.8 + 0.2 / 2.0) / 2, (0.5 / 1.8 + 0.8 / 2.0) / 2, (0.1 / 1.8 + 0.6 / 2.0) / 2, 0]
    expected = sum(a * b for a, b in zip(f, p, strict=True))
    assert abs(sequence_balance_loss(scores, indices, None, 2).item() - expected) < 1e-6
    # padding tokens do not count
    padded_scores = torch.cat([scores, torch.rand(1, 1, 4)], 1)
    padded_idx = torch.cat([indices, torch.tensor([[[3, 0]]])], 1)
    mask = torch.tensor([[1, 1, 0]])
    assert abs(sequence_balance_loss(padded_scores, padded_idx, mask, 2).item() - expected) < 1e-6


def test_bias_update_moves_skewed_load_toward_uniform():
    moe, config = tiny_moe(bias_update_speed=0.01)
    moe = moe.float()
    torch.manual_seed(1)
    skew = torch.zeros(config.hidden_size)
    skew[0] = 3.0
    x = torch.randn(512, config.hidden_size) * 0.3 + skew  # all tokens share a direction -> skewed routing
    gamma = 0.01

    def imbalance():
        _, _, load, _ = moe(x)
        moe.expert_load += load
        return (load.max() / load.mean()).item()

    start = imbalance()
    for _ in range(150):
        imbalance()
        moe.update_bias(gamma)
    end = imbalance()
    assert start > 2.0 and end < 0.6 * start, (start, end)
    # the bias is fp32 even when the layer is bf16
    assert moe.to(torch.bfloat16).gate.e_score_correction_bias.dtype == torch.float32


def _bias_update_rank(rank: int, world: int, port: int, queue) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    moe, _ = tiny_moe()
    moe = moe.float()
    # each rank sees a different, skewed load: only the sum over ranks decides the update
    moe.expert_load.copy_(torch.tensor([9.0, 1, 1, 1, 1, 1, 1, 1]) if rank == 0 else torch.tensor([0.0, 5, 5, 1, 1, 1, 1, 2]))
    moe.update_bias(0.01)
    queue.put((rank, moe.gate.e_score_correction_bias.tolist()))
    dist.destroy_process_group()


def test_bias_update_is_identical_on_every_data_parallel_rank():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_bias_update_rank, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    # summed loads [9, 6, 6, 2, 2, 2, 2, 3], mean 4: above-mean experts go down by gamma, the rest up
    expected = [-0.01, -0.01, -0.01, 0.01, 0.01, 0.01, 0.01, 0.01]
    assert results[0] == results[1]
    assert results[0] == pytest.approx(expected)


@pytest.mark.gpu
def test_cuda_grouped_mm_matches_padded_path():
    torch.manual_seed(0)
    counts = torch.tensor([300, 0, 500, 224], device="cuda")
    x = torch.randn(1024, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(4, 128, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out = grouped_mm(x, w, counts)
    out.float().square().sum().backward()
    expert = torch.repeat_interleave(torch.arange(4, device="cuda"), counts)
    reference = torch.einsum("nk,nok->no", x.detach().float(), w.detach().float()[expert])
    assert ((out.float() - reference).norm() / reference.norm()) < 1e-2
    assert x.grad is not None and w.grad[1].abs().sum() == 0  # the empty expert gets no gradient
