"""FP8Linear (forward + FP8 backward), the in-place Linear swap, and FP8 export on CPU."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from r1pipe.kernels import (
    QUANTIZATION_CONFIG,
    FP8InputError,
    FP8Linear,
    convert_to_fp8_linear,
    quantize_state_dict_fp8,
    refresh_fp8_weights,
    weight_dequant,
    weight_quant,
)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("shape,in_f,out_f", [((2, 5), 200, 300), ((1,), 128, 64), ((3, 70), 256, 130)])
def test_fp8_linear_forward_and_grads_track_float64(shape, in_f, out_f):
    torch.manual_seed(0)
    linear = nn.Linear(in_f, out_f)
    fp8 = FP8Linear.from_linear(linear)
    assert fp8.weight is linear.weight and fp8.bias is linear.bias
    x = torch.randn(*shape, in_f, requires_grad=True)
    upstream = torch.randn(*shape, out_f)
    (fp8(x) * upstream).sum().backward()
    got = fp8(x).detach(), x.grad.clone(), linear.weight.grad.clone(), linear.bias.grad.clone()

    x64 = x.detach().double().requires_grad_()
    w64, b64 = linear.weight.detach().double().requires_grad_(), linear.bias.detach().double().requires_grad_()
    out64 = nn.functional.linear(x64, w64, b64)
    (out64 * upstream.double()).sum().backward()
    # each GEMM sees two e4m3 operands (3 mantissa bits): a few percent relative error
    for name, value, exact in zip(("out", "grad_x", "grad_w", "grad_b"), got,
                                  (out64, x64.grad, w64.grad, b64.grad), strict=True):
        assert rel_err(value, exact) < 0.06, name
    assert got[2].dtype == linear.weight.dtype


def test_fp8_linear_master_weight_dtype_and_no_bias():
    torch.manual_seed(1)
    layer = FP8Linear(128, 256, bias=False)
    x = torch.randn(4, 128, dtype=torch.bfloat16, requires_grad=True)
    out = layer(x)
    assert out.dtype == torch.bfloat16 and layer.weight.dtype == torch.float32
    out.float().square().sum().backward()
    assert layer.weight.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    assert torch.isfinite(layer.weight.grad).all()


def test_fp8_linear_requantizes_only_after_the_weight_changes():
    layer = FP8Linear(128, 64, bias=False)
    first = layer.quantized_weight()
    assert layer.quantized_weight() is first and first[2] is None  # no W^T unless asked for
    with_t = layer.quantized_weight(transpose=True)
    assert torch.equal(with_t[1], first[1]) and layer.quantized_weight() is with_t
    assert torch.equal(with_t[3], with_t[1].t())
    with torch.no_grad():
        layer.weight.mul_(2)
    second = layer.quantized_weight()
    assert second is not with_t and torch.equal(second[1], first[1] * 2)


@pytest.mark.parametrize("fused", [True, False])
def test_fp8_linear_requantizes_after_every_optimizer_step(fused):
    """Fused AdamW writes the weight without bumping its version: the optimizer-step count must
    still invalidate the cached FP8 copy, or training would keep multiplying by the first weights."""
    torch.manual_seed(4)
    layer = FP8Linear(128, 64, bias=False)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.5, fused=fused)
    x = torch.randn(8, 128)
    layer(x).square().sum().backward()
    before = layer.quantized_weight()[0].float()
    optimizer.step()
    after = layer.quantized_weight()
    fresh = weight_quant(layer.weight.detach())
    assert not torch.equal(after[0].float(), before)
    assert torch.equal(after[0].float(), fresh[0].float()) and torch.equal(after[1], fresh[1])


def test_refresh_fp8_weights_after_a_data_edit():
    model = nn.Sequential(FP8Linear(128, 64, bias=False))
    layer = model[0]
    first = layer.quantized_weight()
    layer.weight.data.mul_(2)  # .data: the version counter does not move
    assert layer.quantized_weight() is first
    refresh_fp8_weights(model)
    assert torch.equal(layer.quantized_weight()[1], first[1] * 2)


@pytest.mark.parametrize("x_grad,w_grad", [(True, False), (False, True), (True, True)])
def test_fp8_linear_computes_only_the_gradients_asked_for(x_grad, w_grad):
    """A frozen weight (dgrad only) or an input without grad (wgrad only) takes its own path."""
    torch.manual_seed(3)
    layer = FP8Linear(256, 130, bias=False)
    layer.weight.requires_grad_(w_grad)
    x = torch.randn(2, 70, 256, requires_grad=x_grad)
    upstream = torch.randn(2, 70, 130)
    (layer(x) * upstream).sum().backward()
    assert (layer.quantized_weight()[2] is not None) == x_grad  # W^T quantized only for an input gradient
    x64, w64 = x.detach().double().requires_grad_(), layer.weight.detach().double().requires_grad_()
    (nn.functional.linear(x64, w64) * upstream.double()).sum().backward()
    assert (x.grad is not None) == x_grad and (layer.weight.grad is not None) == w_grad
    if x_grad:
        assert rel_err(x.grad, x64.grad) < 0.06
    if w_grad:
        assert rel_err(layer.weight.grad, w64.grad) < 0.06


def test_fp8_linear_keeps_its_input_in_fp8_for_backward():
    """The weight gradient's x^T is saved quantized (1 byte per element), not x itself."""
    layer = FP8Linear(256, 128, bias=False)
    x = torch.randn(300, 256, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x)
    assert not any(t.dtype == torch.float32 and t.numel() == x.numel() for t in saved)
    assert any(t.dtype == torch.float8_e4m3fn and t.shape == (256, 300) for t in saved)


class TinyMoEBlock(nn.Module):
    """Names as in DeepSeek-V3 so the V3 skip list applies."""

    def __init__(self, dim: int = 128, vocab: int = 256):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, dim)
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.input_layernorm = nn.RMSNorm(dim)
        self.mlp = nn.ModuleDict({"gate": nn.Linear(dim, 4, bias=False),
                                  "gate_proj": nn.Linear(dim, 2 * dim, bias=False),
                                  "down_proj": nn.Linear(2 * dim, dim, bias=False)})
        self.eh_proj = nn.Linear(2 * dim, dim, bias=False)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens):
        h = self.input_layernorm(self.embed_tokens(tokens))
        h = h + self.q_proj(h)
        h = h + self.mlp["down_proj"](nn.functional.silu(self.mlp["gate_proj"](h)))
        return self.lm_head(h)


def test_convert_to_fp8_linear_keeps_v3_high_precision_modules():
    model = TinyMoEBlock()
    weights = {name: p for name, p in model.named_parameters()}
    converted = convert_to_fp8_linear(model)
    assert sorted(converted) == ["mlp.down_proj", "mlp.gate_proj", "q_proj"]
    assert type(model.mlp["gate"]) is nn.Linear and type(model.lm_head) is nn.Linear
    assert type(model.eh_proj) is nn.Linear and isinstance(model.q_proj, FP8Linear)
    assert all(p is weights[name] for name, p in model.named_parameters())


def test_fp8_model_trains_like_fp32_on_gsm8k_bytes(shared_data):
    """A tiny byte-level LM on real GSM8K questions: the FP8 copy's loss follows the fp32 one."""
    rows = [json.loads(line)["question"] for line in (shared_data / "gsm8k_train.jsonl").open()][:64]
    text = "\n".join(rows).encode("ascii", "replace")
    data = torch.tensor(list(text[: 64 * 33]), dtype=torch.long).view(64, 33)

    def train(fp8: bool) -> list[float]:
        torch.manual_seed(0)
        model = TinyMoEBlock(dim=64, vocab=128)
        if fp8:
            convert_to_fp8_linear(model)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses = []
        for step in range(25):
            batch = data[(step * 8) % 64:(step * 8) % 64 + 8]
            loss = nn.functional.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    ref, fp8 = train(False), train(True)
    assert fp8[-1] < 0.7 * fp8[0]
    assert abs(sum(fp8[-5:]) - sum(ref[-5:])) / sum(ref[-5:]) < 0.05


def test_quantize_state_dict_fp8_released_format(tmp_path):
    torch.manual_seed(2)
    state = {
        "model.embed_tokens.weight": torch.randn(100, 64),
        "model.layers.0.self_attn.q_a_proj.weight": torch.randn(200, 64) * 0.02,
        "model.layers.0.mlp.gate.weight": torch.randn(8, 64),
        "model.layers.0.mlp.gate.e_score_correction_bias": torch.zeros(8),
        "model.layers.0.mlp.experts.3.down_proj.weight": torch.randn(64, 300),
        "model.layers.0.input_layernorm.weight": torch.ones(64),
        "model.layers.1.eh_proj.weight": torch.randn(64, 128),
        "model.layers.1.shared_head.head.weight": torch.randn(100, 64),
        "lm_head.weight": torch.randn(100, 64),
    }
    out, config = quantize_state_dict_fp8(state)
    assert config == QUANTIZATION_CONFIG
    quantized = {"model.layers.0.self_attn.q_a_proj.weight", "model.layers.0.mlp.experts.3.down_proj.weight"}
    assert set(out) == set(state) | {f"{k}_scale_inv" for k in quantized}
    for key, tensor in state.items():
        if key in quantized:
            assert out[key].dtype == torch.float8_e4m3fn
            scale = out[f"{key}_scale_inv"]
            assert scale.dtype == torch.float32 and scale.shape == (-(-tensor.shape[0] // 128), -(-tensor.shape[1] // 128))
            assert rel_err(weight_dequant(out[key], scale, dtype=torch.float32), tensor) < 0.05
        else:
            assert out[key] is tensor
    save_file(out, tmp_path / "model.safetensors")
    loaded = load_file(tmp_path / "model.safetensors")
    assert loaded["model.layers.0.self_attn.q_a_proj.weight"].dtype == torch.float8_e4m3fn
    with pytest.raises(FP8InputError, match="q_a_proj.weight is already FP8-quantized"):
        quantize_state_dict_fp8(out)
