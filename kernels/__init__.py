"""FP8 block quantization (DeepSeek-V3 format): PyTorch references, Triton kernels, FP8 linear, export."""
from r1pipe.kernels.export import QUANTIZATION_CONFIG, quantize_state_dict_fp8
from r1pipe.kernels.fp8 import (
    FP8InputError,
    act_quant,
    fp8_gemm,
    fp8_grouped_gemm,
    weight_dequant,
    weight_quant,
)
from r1pipe.kernels.linear import DEFAULT_SKIP, FP8Linear, convert_to_fp8_linear, refresh_fp8_weights

__all__ = [
    "DEFAULT_SKIP",
    "QUANTIZATION_CONFIG",
    "FP8InputError",
    "FP8Linear",
    "act_quant",
    "convert_to_fp8_linear",
    "fp8_gemm",
    "fp8_grouped_gemm",
    "quantize_state_dict_fp8",
    "refresh_fp8_weights",
    "weight_dequant",
    "weight_quant",
]
