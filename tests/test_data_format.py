"""Data: sources and mixtures, R1 chat formatting, assistant-only labels, packing, the batch stream."""

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from r1pipe.config import RecipeError
from r1pipe.chat import r1_response, render_prompt, to_messages
from r1pipe.data import (
    BatchStream,
    DataSection,
    SourceSection,
    build_pretrain_rows,
    build_sft_rows,
    collate,
    load_mixture,
    pack,
    tokenize_chat,
)
from r1pipe.demo.tokenizer import build_tokenizer

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def gsm8k_rows(shared_data, n):
    with open(shared_data / "gsm8k_train.jsonl") as handle:
        return [json.loads(next(handle)) for _ in range(n)]


@pytest.fixture(scope="module")
def bpe_tokenizer(shared_data):
    """A byte-level BPE trained on real GSM8K text: merges cross the template's seams."""
    texts = [r["question"] + "\n" + r["answer"] for r in gsm8k_rows(shared_data, 300)]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    core.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    from tokenizers import decoders

    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = CHATML
    return tok


def learned_text(tokenizer, example):
    return tokenizer.decode([t for t, label in zip(example["input_ids"], example["labels"], strict=True) if label != -100])


def test_r1_format_and_prefill(bpe_tokenizer):
    record = {"prompt": "What is 2+3?", "reasoning": " 2 plus 3 is 5. ", "completion": "\\boxed{5}"}
    messages = to_messages(record, system_prompt="Think first.")
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    assert messages[-1]["content"] == "<think>\n2 plus 3 is 5.\n</think>\n\\boxed{5}"
    prompt = render_prompt(bpe_tokenizer, messages[:-1], think_prefill=True)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n")
    example = tokenize_chat(bpe_tokenizer, messages, max_length=512, think_prefill=True)
    # Prefilled '<think>\n' is prompt; the model learns the reasoning, the answer and the end token.
    assert learned_text(bpe_tokenizer, example) == "2 plus 3 is 5.\n</think>\n\\boxed{5}<|im_end|>\n"
    assert r1_response("a", "b") == "<think>\na\n</think>\nb"


def test_prompt_tokens_masked_on_real_rows(bpe_tokenizer, shared_data):
    for row in gsm8k_rows(shared_data, 20):
        messages = to_messages({"prompt": row["question"], "completion": row["answer"]})
        example = tokenize_chat(bpe_tokenizer, messages, max_length=4096)
        ids, labels = example["input_ids"], example["labels"]
        assert bpe_tokenizer.decode(ids) == bpe_tokenizer.apply_chat_template(messages, tokenize=False)
        assert learned_text(bpe_tokenizer, example) == row["answer"] + "<|im_end|>\n"
        first = next(i for i, label in enumerate(labels) if label != -100)
        assert all(label == -100 for label in labels[:first])
        assert question_in(bpe_tokenizer.decode(ids[:first]), row["question"])


def question_in(text, question):
    return question in text and "<|im_start|>assistant\n" in text


def test_multi_turn_learns_every_assistant_turn(bpe_tokenizer):
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Add 1 and 1."},
        {"role": "assistant", "content": "2"},
    ]
    example = tokenize_chat(bpe_tokenizer, messages, max_length=512)
    assert learned_text(bpe_tokenizer, example) == "Hello.<|im_end|>\n2<|im_end|>\n"


def test_demo_cold_start_with_prefill_and_r1_multi_turn(shared_data):
    """Repository data in the R1 format: with think_prefill the prompt ends in '<think>\n'; an earlier
    turn whose reasoning the R1 template drops is context, the last turn is learned."""
    tok = build_tokenizer()
    first = json.loads((Path(__file__).resolve().parents[1] / "recipes/demo/data/cold_start.jsonl").open().readline())
    messages = to_messages(first)
    example = tokenize_chat(tok, messages, max_length=1024, think_prefill=True)
    assert learned_text(tok, example) == first["completion"].removeprefix("<think>\n") + "<|end|>"
    chat = [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": r1_response("1 and 1", "2")},
            {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": r1_response("2 and 2", "4")}]
    example = tokenize_chat(tok, chat, max_length=1024)
    assert learned_text(tok, example) == r1_response("2 and 2", "4") + "<|end|>"
    assert "1 and 1" not in tok.decode(example["input_ids"])


def test_truncation_counted_and_unlearnable_rows_dropped(shared_data, tmp_path):
    tok = build_tokenizer()
    data = DataSection(
        sources=[SourceSection(path=str(shared_data / "gsm8k_train.jsonl"),
                               columns={"question": "prompt", "answer": "completion"}, max_rows=40)],
        max_length=400, packing=False,
    )
    rows, stats = build_sft_rows(data, tok, seed=0)
    texts = [tok.apply_chat_template(to_messages({"prompt": r["question"], "completion": r["answer"]}),
                                     tokenize=False) for r in gsm8k_rows(shared_data, 40)]
    lengths = [len(tok(text, add_special_tokens=False)["input_ids"]) for text in texts]
    assert 0 < stats["data/truncated_examples"] == sum(n > 400 for n in lengths) < 40
    assert stats["data/truncated_tokens"] == sum(max(0, n - 400) for n in lengths)
    assert stats["data/examples"] == 40
    assert stats["data/rows"] == 40 - stats["data/dropped_no_loss"]
    assert all(len(r["input_ids"]) <= 400 for r in rows)
    assert all(any(label != -100 for label in r["labels"][1:]) for r in rows)


def test_pack_restarts_positions_and_masks_document_starts():
    docs = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4, 5], "labels": [4, 5]},
            {"input_ids": [6, 7, 8, 9], "labels": [6, 7, 8, 9]}]
    rows = pack(docs, max_length=6, pad_id=0)
    assert [r["input_ids"] for r in rows] == [[1, 2, 3, 4, 5, 0], [6, 7, 8, 9, 0, 0]]
    assert [r["position_ids"] for r in rows] == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]]
    assert [r["labels"] for r in rows] == [[-100, 2, 3, -100, 5, -100], [-100, 7, 8, 9, -100, -100]]
    split = pack(docs, max_length=4, pad_id=0, split_documents=True)
    assert [r["input_ids"] for r in split] == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 0, 0, 0]]
    assert [r["position_ids"] for r in split] == [[0, 1, 2, 0], [0, 0, 1, 2], [0, 0, 1, 2]]


def test_pretrain_rows_from_real_text(shared_data):
    tok = build_tokenizer()
    data = DataSection(sources=[SourceSection(path=str(shared_data / "math500.jsonl"),
                                              columns={"problem": "text"}, max_rows=30)], max_length=128)
    rows, stats = build_pretrain_rows(data, tok, seed=0)
    assert stats["data/packing_efficiency"] > 0.98 and stats["data/truncated_tokens"] == 0
    assert all(len(r["input_ids"]) == 128 for r in rows)
    assert sum(r["input_ids"].count(tok.eos_token_id) for r in rows) == 30


def test_collate_pads_unequal_rows_with_mask():
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "position_ids": [0, 1, 2]},
            {"input_ids": [8, 9], "labels": [8, 9], "position_ids": [0, 1]}]
    batch = collate(rows, pad_id=0)
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 1, 2]]
    assert batch["labels"][1].tolist() == [8, 9, -100]
    assert batch["num_loss_tokens"] == 3
    packed = collate([rows[0], rows[0]], pad_id=0)
    assert "attention_mask" not in packed and torch.equal(packed["position_ids"][0], torch.tensor([0, 1, 2]))


def test_batch_stream_is_rank_independent_and_resumable():
    rows = [{"input_ids": [i], "labels": [i], "position_ids": [0]} for i in range(10)]

    def steps(stream, n):
        return [torch.cat([b["input_ids"] for b in stream.next_step(2)]).flatten().tolist() for _ in range(n)]

    single = steps(BatchStream(rows, 4, seed=3), 6)
    ranks = [steps(BatchStream(rows, 4, seed=3, rank=r, world_size=2), 6) for r in range(2)]
    assert [a + b for a, b in zip(*ranks, strict=True)] == single
    assert sorted(sum(single[:2], []) + single[2][:2]) == list(range(10))  # one epoch = a permutation
    stream = BatchStream(rows, 4, seed=3)
    steps(stream, 2)
    resumed = BatchStream(rows, 4, seed=3)
    resumed.load_state_dict(stream.state_dict())
    assert steps(resumed, 4) == single[2:]


def test_mixture_weights_and_column_errors(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps({"body": f"a{i}"}) + "\n" for i in range(300)))
    b.write_text("".join(json.dumps({"body": f"b{i}"}) + "\n" for i in range(100)))
    data = DataSection(sources=[SourceSection(path=str(a), weight=3, columns={"body": "text"}),
                                SourceSection(path=str(b), weight=1, columns={"body": "text"})])
    mixed = load_mixture(data, ("text",), seed=0)
    first = [r["text"][0] for r in mixed.select(range(200))]
    assert 0.65 < first.count("a") / 200 < 0.85
    bad = DataSection(sources=[SourceSection(path=str(a), columns={"question": "prompt"})])
    with pytest.raises(RecipeError, match=r"data.sources.0.columns: 'question' is not a column of .*a.jsonl"):
        load_mixture(bad, ("text",), seed=0)
    unmapped = DataSection(sources=[SourceSection(path=str(a))])
    with pytest.raises(RecipeError, match=r"data.sources.0: .* has none of the fields text"):
        load_mixture(unmapped, ("text",), seed=0)
    missing = DataSection(sources=[SourceSection(path=str(tmp_path / "nope.jsonl"))])
    with pytest.raises(RecipeError, match="data.sources.0.path: cannot load"):
        load_mixture(missing, ("text",), seed=0)
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"body": "fine"}) + '\n{"body": "cut off\n')
    with pytest.raises(RecipeError, match=r"data.sources.0.path: cannot load .*broken.jsonl': line 2 is not valid JSON"):
        load_mixture(DataSection(sources=[SourceSection(path=str(broken))]), ("text",), seed=0)


def test_template_errors_name_the_row(tmp_path):
    tok = build_tokenizer()
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps({"prompt": "hi", "completion": "yo"}) + "\n" +
                    json.dumps({"prompt": "no answer", "completion": None}) + "\n")
    data = DataSection(sources=[SourceSection(path=str(path))], shuffle=False)
    with pytest.raises(RecipeError, match=r"data: row 1 .*no assistant message"):
        build_sft_rows(data, tok, seed=0)
