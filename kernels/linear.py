"""FP8 linear layer for training and inference, and the in-place swap of a model's Linear layers.

Forward and both backward GEMMs run in FP8 with the DeepSeek-V3 tiling (technical report,
section 3.3): the three GEMMs of a linear layer share one blockwise-scaled kernel.
  forward  y  = x  @ W^T : x in 1x128 tiles (per token), W in 128x128 blocks.
  dgrad    dx = dy @ W   : dy in 1x128 tiles, W^T in 128x128 blocks (W's blocks transposed: same
                           scales and fp8 values, quantized straight from the transposed view, which
                           is cheaper on the GPU than transposing the fp8 copy).
  wgrad    dW = dy^T @ x : dy^T and x^T both in 1x128 tiles along the token dimension, quantized
                           straight from the transposed views (no copies on the GPU).
The forward already quantizes x^T and keeps it for the weight gradient: 1 byte per element
instead of x's 2 or 4. W^T is quantized with W, once per weight update.
Accumulation is fp32 in every GEMM. The parameters are the master weights in the module's own
dtype (fp32 or bf16); they are re-quantized from the master copy after every change, and the
weight gradient comes back in the master dtype. Gates, norms, embeddings and output heads stay in
high precision, as in V3 (`DEFAULT_SKIP`).
"""
from collections.abc import Iterable
from fnmatch import fnmatch

import torch
from r1pipe.kernels.fp8 import act_quant, fp8_gemm, weight_quant
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

# Module names (fnmatch patterns on the dotted name) that V3 keeps in high precision: the
# embedding, output head (and MTP's shared head), the MoE router and MTP's eh_proj.
DEFAULT_SKIP = ("*embed_tokens", "*lm_head", "*shared_head.head", "gate", "*.gate", "*eh_proj")


def is_skipped(module_name: str, skip: Iterable[str]) -> bool:
    return any(fnmatch(module_name, pattern) for pattern in skip)


# Bumped after every torch.optim optimizer step in this process. A weight's in-place version alone
# cannot tell that it changed: fused AdamW (`fused=True`) and DeepSpeed's optimizers write the
# parameters without bumping it, and a cached FP8 copy would then stay stale for the rest of training.
_optimizer_steps = 0


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


register_optimizer_step_post_hook(_count_optimizer_step)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class _FP8LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor,
                wt_fp8: torch.Tensor | None, wt_scale: torch.Tensor | None, out_dtype: torch.dtype):
        x2 = x.reshape(-1, x.shape[-1])
        x_fp8, x_scale = act_quant(x2)
        if ctx.needs_input_grad[1]:  # the weight gradient needs x along the tokens: kept in fp8
            ctx.save_for_backward(wt_fp8, wt_scale, *act_quant(x2.t()))
        else:
            ctx.save_for_backward(wt_fp8, wt_scale)
        ctx.weight_dtype = weight.dtype
        ctx.x_dtype = x.dtype
        return fp8_gemm(x_fp8, x_scale, w_fp8, w_scale, out_dtype).unflatten(0, x.shape[:-1])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        wt_fp8, wt_scale, *xt = ctx.saved_tensors
        dy = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = fp8_gemm(*act_quant(dy), wt_fp8, wt_scale, ctx.x_dtype).unflatten(0, grad_out.shape[:-1])
        if ctx.needs_input_grad[1]:
            grad_w = fp8_gemm(*act_quant(dy.t()), *xt, ctx.weight_dtype)
        return grad_x, grad_w, None, None, None, None, None


class FP8Linear(nn.Linear):
    """nn.Linear whose three GEMMs run in FP8 (V3 block tiling); parameters stay the master weights.

    Same parameters, state-dict keys and init as nn.Linear. The bias is added in the output dtype.
    The quantized weight (and W^T, when an input gradient will be needed) is cached until the master
    weight changes: another tensor or storage, an in-place version, or any optimizer step in the
    process. Inference, repeated forwards (MTP, gradient accumulation) and the backward pass thus
    quantize it once per update; training keeps two fp8 copies of each weight (1 byte per parameter
    each) beside the master weights. After editing weights through `.data` (which none of those
    checks sees), call `refresh_fp8_weights`. While a CUDA graph is captured nothing is cached, so
    every replay quantizes the weight as it is at replay time.
    """

    # (weight, data_ptr, version, optimizer steps, (w_fp8, scale_inv, wt_fp8, wt_scale_inv))
    _fp8_weight: tuple | None = None

    def quantized_weight(self, transpose: bool = False) -> tuple:
        """(w_fp8, scale_inv, wt_fp8, wt_scale_inv); the last two are None unless `transpose` asked
        for them (or an earlier call did, for this version of the weight)."""
        w = self.weight
        capturing = w.is_cuda and torch.cuda.is_current_stream_capturing()
        cached = self._fp8_weight
        state = (w.data_ptr(), w._version, _optimizer_steps)
        if (not capturing and cached is not None and cached[0] is w and cached[1:4] == state
                and (cached[4][2] is not None or not transpose)):
            return cached[4]
        quantized = weight_quant(w.detach())
        quantized += weight_quant(w.detach().t()) if transpose else (None, None)
        if not capturing:
            self._fp8_weight = (w, *state, quantized)
        return quantized

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_grad = torch.is_grad_enabled() and x.requires_grad  # then the backward multiplies by W^T
        out = _FP8LinearFunction.apply(x, self.weight, *self.quantized_weight(input_grad), _compute_dtype(x))
        return out if self.bias is None else out + self.bias.to(out.dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "FP8Linear":
        """An FP8Linear that shares `linear`'s parameters (optimizer state stays valid)."""
        fp8 = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        fp8.weight = linear.weight
        fp8.bias = linear.bias
        return fp8


def fp8_linear_targets(model: nn.Module, skip: Iterable[str] = DEFAULT_SKIP) -> list[tuple[str, nn.Linear]]:
    """(dotted name, module) of every plain nn.Linear of `model` whose name matches no `skip` pattern:
    the layers `convert_to_fp8_linear` swaps (and `r1pipe plan` counts)."""
    skip = tuple(skip)
    return [(name, module) for name, module in model.named_modules()
            if type(module) is nn.Linear and not is_skipped(name, skip)]


def convert_to_fp8_linear(model: nn.Module, skip: Iterable[str] = DEFAULT_SKIP) -> list[str]:
    """Replace every plain nn.Linear of `model` in place by an FP8Linear sharing its parameters,
    except modules whose dotted name matches a `skip` pattern. Returns the converted names."""
    targets = fp8_linear_targets(model, skip)
    for name, module in targets:
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, FP8Linear.from_linear(module))
    return [name for name, _ in targets]


def refresh_fp8_weights(model: nn.Module) -> None:
    """Make every FP8Linear in `model` re-quantize its weight at its next forward: needed after
    in-place edits through `.data` (PEFT's adapter merge, EMA updates, hand-made edits), which
    leave a tensor's version counter as it was."""
    for module in model.modules():
        if isinstance(module, FP8Linear):
            module._fp8_weight = None
