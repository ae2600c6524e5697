"""Export any model's Linear weights in the released DeepSeek-V3 FP8 format (served by vLLM).

Each quantized `<module>.weight` becomes float8_e4m3fn [N, K] plus `<module>.weight_scale_inv`
fp32 [ceil(N/128), ceil(K/128)]; `config.json` gets `QUANTIZATION_CONFIG`. Embeddings, output
heads, MoE gates and everything that is not a >=2-D `.weight` (norms, biases, the gate's
correction bias) are left as they are.
"""
from collections.abc import Iterable, Mapping

import torch
from r1pipe.kernels.fp8 import FP8InputError, weight_quant
from r1pipe.kernels.linear import DEFAULT_SKIP, is_skipped

QUANTIZATION_CONFIG = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "weight_block_size": [128, 128],
}


def quantize_state_dict_fp8(state_dict: Mapping[str, torch.Tensor], skip: Iterable[str] = DEFAULT_SKIP,
                            block: int = 128) -> tuple[dict[str, torch.Tensor], dict]:
    """Return (state dict with FP8 weights and `*.weight_scale_inv`, `quantization_config` dict).

    `skip` holds fnmatch patterns on module names (the key without `.weight`) to keep in high
    precision; 3-D `.weight` tensors (fused experts [E, N, K]) get one scale grid per expert.
    """
    skip = tuple(skip)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if key.endswith("_scale_inv") or tensor.dtype == torch.float8_e4m3fn:
            raise FP8InputError(f"quantize_state_dict_fp8: {key} is already FP8-quantized")
        module = key.removesuffix(".weight")
        if (key.endswith(".weight") and tensor.dim() >= 2 and tensor.is_floating_point()
                and not is_skipped(module, skip)):
            out[key], out[f"{key}_scale_inv"] = weight_quant(tensor, block)
        else:
            out[key] = tensor
    config = dict(QUANTIZATION_CONFIG, weight_block_size=[block, block])
    return out, config
