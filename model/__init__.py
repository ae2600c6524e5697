"""DeepSeek-V3 family: config, MLA, DeepSeekMoE, MTP, HF checkpoints, generation, the policy interface."""
from r1pipe.model.config import ConfigError, DeepseekConfig
from r1pipe.model.modeling import CausalLMOutput, DeepseekForCausalLM, parameter_counts

__all__ = ["ConfigError", "CausalLMOutput", "DeepseekConfig", "DeepseekForCausalLM", "parameter_counts"]
