"""Training data: `datasets` sources with column mapping and mixtures, chat/R1 formatting, SFT masks, packing.

    rows, stats = build_sft_rows(cfg.data, tokenizer, seed)        # or build_pretrain_rows
    stream = BatchStream(rows, batch_size, seed, rank, world_size, pad_id, packed)
    micro_batches = stream.next_step(micro_batch_size)            # this rank's share of one step
    stream.state_dict() / stream.load_state_dict(state)           # data position for resume

Record fields after column mapping: pretrain reads `text`; SFT reads either `messages` (a list of
{role, content}) or `prompt` + `completion` with optional `reasoning` and `system`. A `reasoning`
column makes the assistant turn R1-formatted: `<think>\\n{reasoning}\\n</think>\\n{completion}`.

Rows carry `input_ids`, `labels` (-100 where no loss: prompts, padding, the first token of each
packed document) and `position_ids` that restart at 0 for every packed document, so attention
never crosses documents: our V3 model splits attention on position restarts, and transformers'
sdpa/eager/flash paths do the same when `attention_mask` is None and `position_ids` are packed
(transformers.masking_utils.find_packed_sequence_indices).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, model_validator

from r1pipe.chat import ChatFormat, ChatTemplate, SystemPrompt, ThinkPrefill, render_prompt, to_messages
from r1pipe.config import RecipeError, Section, split_evenly
from r1pipe.seeds import EpochOrder

TEXT_FIELDS = ("text",)
CHAT_FIELDS = ("messages", "prompt", "completion", "reasoning", "system")
_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}
DATA_FILE_SUFFIXES = (*_FILE_BUILDERS, ".gz")  # what names a local data file (also gzipped)


# ----------------------------------------------------------------------------------------------
# Recipe sections


class SourceSection(Section):
    """One dataset of a mixture."""

    path: str = Field(
        description="Local .jsonl/.json/.parquet/.csv/.txt file, a directory (save_to_disk or data files), "
        "or a Hugging Face hub dataset id."
    )
    name: str | None = Field(None, description="Hub dataset configuration name.")
    split: str = Field("train", description="Split to read (local files have only 'train').")
    weight: float = Field(
        1.0, gt=0, description="Sampling weight in the mixture (normalised; sampling stops once every source "
        "has been seen once)."
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Rename source columns to record fields, e.g. {question: prompt, answer: completion}.",
    )
    max_rows: int | None = Field(None, gt=0, description="Use only the first N rows.")


class DataSection(Section, ChatFormat):
    """Where the training text comes from and how it becomes token rows."""

    sources: list[SourceSection] = Field(min_length=1, description="Datasets, mixed by weight.")
    max_length: int = Field(1024, gt=1, description="Tokens per row; longer SFT examples are truncated.")
    packing: bool = Field(True, description="Pack several documents per row (no attention across them).")
    shuffle: bool = Field(True, description="Shuffle rows each epoch (seeded by run.seed).")
    chat_template: ChatTemplate = None
    system_prompt: SystemPrompt = None
    think_prefill: ThinkPrefill = False
    eval_rows: int = Field(0, ge=0, description="Hold out this many rows for a validation loss.")
    num_proc: int = Field(1, ge=1, description="Worker processes for tokenization (datasets.map).")

    @model_validator(mode="after")
    def _template_readable(self):
        if self.chat_template and self.chat_template.endswith(".jinja") and not Path(self.chat_template).is_file():
            raise ValueError(f"chat template file not found: {self.chat_template}")
        return self


# ----------------------------------------------------------------------------------------------
# Loading and mixing


def load_source(source: SourceSection, index: int, fields: tuple[str, ...]):
    """Load one source with `datasets`, rename its columns and keep only record fields."""
    import datasets

    key = f"data.sources.{index}"
    path = Path(source.path)
    try:
        if path.is_file():
            builder = _FILE_BUILDERS.get("." + path.name.removesuffix(".gz").rsplit(".", 1)[-1])
            if builder is None:
                raise RecipeError(f"{key}.path: {path}: unknown file type (use .jsonl, .json, .parquet, .csv, .txt)")
            dataset = datasets.load_dataset(builder, data_files=str(path), split="train")
        elif path.is_dir() and (path / "dataset_info.json").is_file():
            dataset = datasets.load_from_disk(str(path))
            if isinstance(dataset, datasets.DatasetDict):
                dataset = dataset[source.split]
        else:
            dataset = datasets.load_dataset(source.path, source.name, split=source.split)
    except RecipeError:
        raise
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as err:
        first = _first_bad_json_line(path) or (str(err).strip().splitlines()[0] if str(err).strip()
                                               else type(err).__name__)
        raise RecipeError(f"{key}.path: cannot load {source.path!r}: {first}") from None
    missing = [column for column in source.columns if column not in dataset.column_names]
    if missing:
        raise RecipeError(
            f"{key}.columns: {missing[0]!r} is not a column of {source.path} (columns: {', '.join(dataset.column_names)})"
        )
    dataset = dataset.rename_columns({k: v for k, v in source.columns.items() if k != v})
    kept = [f for f in fields if f in dataset.column_names]
    if not kept:
        raise RecipeError(
            f"{key}: {source.path} has none of the fields {', '.join(fields)} (columns: "
            f"{', '.join(dataset.column_names)}); map them with data.sources.{index}.columns"
        )
    dataset = dataset.select_columns(kept)
    if source.max_rows is not None:
        dataset = dataset.select(range(min(source.max_rows, len(dataset))))
    return dataset


def load_mixture(data: DataSection, fields: tuple[str, ...], seed: int):
    """All sources, mixed by weight with `datasets.interleave_datasets` (one source: as is)."""
    import datasets

    parts = [load_source(source, i, fields) for i, source in enumerate(data.sources)]
    if len(parts) == 1:
        return parts[0]
    columns = set(parts[0].column_names)
    for i, part in enumerate(parts[1:], 1):
        if set(part.column_names) != columns:
            raise RecipeError(
                f"data.sources.{i}: fields {sorted(part.column_names)} differ from source 0's {sorted(columns)}"
            )
    total = sum(s.weight for s in data.sources)
    return datasets.interleave_datasets(
        parts,
        probabilities=[s.weight / total for s in data.sources],
        seed=seed,
        stopping_strategy="all_exhausted",
    )


# ----------------------------------------------------------------------------------------------
# Tokenization


def tokenize_chat(tokenizer, messages: list[dict], max_length: int, think_prefill: bool = False) -> dict:
    """Token ids of a conversation with labels on assistant tokens only (-100 elsewhere).

    The assistant spans are found as character ranges (each assistant turn's rendering minus the
    rendering of the conversation before it with the generation prompt), then mapped to tokens
    through the fast tokenizer's offsets: this works for any template and never tokenizes pieces
    separately (which would change BPE merges at the seams). An earlier assistant turn that the
    template rewrites once later turns follow (R1 templates drop earlier reasoning) stays context.
    """
    assistant_turns = [i for i, message in enumerate(messages) if message.get("role") == "assistant"]
    if not assistant_turns:
        raise ValueError("no assistant message to learn from")
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i in assistant_turns:
        before = render_prompt(tokenizer, messages[:i], think_prefill)
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if upto.startswith(before) and full.startswith(upto):
            spans.append((len(before), len(upto)))
        elif i == assistant_turns[-1]:
            raise ValueError(
                "the chat template does not render the last assistant turn after its prompt"
                + (" (with think_prefill the assistant text must start with '<think>')" if think_prefill else "")
            )
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoded["input_ids"]
    labels = [
        token if any(start <= begin < end for start, end in spans) else -100
        for token, (begin, _) in zip(ids, encoded["offset_mapping"], strict=True)
    ]
    truncated = max(0, len(ids) - max_length)
    return {"input_ids": ids[:max_length], "labels": labels[:max_length], "truncated_tokens": truncated}


def tokenize_text(tokenizer, text: str, max_length: int | None = None) -> list[dict]:
    """Raw text + EOS as a next-token document, or pieces of at most `max_length` tokens."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    size = max_length or len(ids)
    return [
        {"input_ids": ids[i : i + size], "labels": ids[i : i + size], "truncated_tokens": 0}
        for i in range(0, len(ids), size)
    ]


# ----------------------------------------------------------------------------------------------
# Rows: packing or one example per row


def pack(examples: list[dict], max_length: int, pad_id: int, split_documents: bool = False) -> list[dict]:
    """Greedy sequential packing into rows of exactly `max_length` tokens.

    Position ids restart at 0 for each document, so the model's attention stays inside documents;
    the first label of every document is -100 (its previous token belongs to another document).
    A trailing pad segment gets its own positions and no loss. With `split_documents` (pretraining)
    a document that does not fit fills the row and continues in the next one, so rows have no padding.
    """
    rows, current = [], {"input_ids": [], "labels": [], "position_ids": []}

    def close():
        fill = max_length - len(current["input_ids"])
        current["input_ids"] += [pad_id] * fill
        current["labels"] += [-100] * fill
        current["position_ids"] += list(range(fill))
        rows.append(current)

    for example in examples:
        ids, labels = list(example["input_ids"]), list(example["labels"])
        while ids:
            room = max_length - len(current["input_ids"])
            if len(ids) > room and (split_documents or not current["input_ids"]):
                take = room
            elif len(ids) > room:
                take = 0
            else:
                take = len(ids)
            current["input_ids"] += ids[:take]
            current["labels"] += ([-100] + labels[1:take]) if take else []
            current["position_ids"] += list(range(take))
            ids, labels = ids[take:], labels[take:]
            if ids or len(current["input_ids"]) == max_length:
                close()
                current = {"input_ids": [], "labels": [], "position_ids": []}
    if current["input_ids"]:
        close()
    return rows


def _unpacked(example: dict) -> dict:
    n = len(example["input_ids"])
    return {"input_ids": example["input_ids"], "labels": example["labels"], "position_ids": list(range(n))}


def _rows_and_stats(
    examples: list[dict], data: DataSection, pad_id: int, split_documents: bool = False
) -> tuple[list[dict], dict]:
    truncated = [e["truncated_tokens"] for e in examples]
    learnable = [e for e in examples if any(label != -100 for label in e["labels"][1:])]
    dropped, examples = len(examples) - len(learnable), learnable
    tokens = sum(len(e["input_ids"]) for e in examples)
    if data.packing:
        rows = pack(examples, data.max_length, pad_id, split_documents)
    else:
        rows = [_unpacked(e) for e in examples]
    loss_tokens = sum(sum(label != -100 for label in row["labels"]) for row in rows)
    slots = len(rows) * data.max_length if data.packing else tokens
    stats = {
        "data/examples": len(truncated),
        "data/rows": len(rows),
        "data/tokens": tokens,
        "data/loss_tokens": loss_tokens,
        "data/truncated_examples": sum(1 for t in truncated if t > 0),
        "data/truncated_tokens": sum(truncated),
        "data/dropped_no_loss": dropped,
        "data/packing_efficiency": tokens / max(slots, 1),
    }
    return rows, stats


def _tokenize_all(dataset, data: DataSection, seed: int, tokenize: Callable[[dict], list[dict]]) -> list[dict]:
    """Shuffle, then tokenize every record with `datasets.map` (`data.num_proc` workers).

    `tokenize(record)` returns the record's examples; a bad record becomes a RecipeError naming
    its row (the index after shuffling) and a preview of it.
    """
    if data.shuffle:
        dataset = dataset.shuffle(seed=seed)

    def tokenize_batch(batch: dict, indices: list[int]) -> dict:
        out = {"input_ids": [], "labels": [], "truncated_tokens": []}
        for offset, index in enumerate(indices):
            record = {key: values[offset] for key, values in batch.items()}
            try:
                examples = tokenize(record)
            except (ValueError, KeyError, TypeError, AttributeError) as err:
                raise RecipeError(f"data: row {index} ({str(record)[:80]}...): {err}") from None
            for example in examples:
                for key in out:
                    out[key].append(example[key])
        return out

    mapped = dataset.map(
        tokenize_batch,
        with_indices=True,
        batched=True,
        remove_columns=dataset.column_names,
        num_proc=data.num_proc if data.num_proc > 1 else None,
        load_from_cache_file=False,
        desc="tokenizing",
    )
    return mapped.to_list()


def build_pretrain_rows(data: DataSection, tokenizer, seed: int) -> tuple[list[dict], dict]:
    """Raw `text` -> next-token rows; documents are split across rows, never truncated."""
    dataset = load_mixture(data, TEXT_FIELDS, seed)
    piece = None if data.packing else data.max_length

    def tokenize(record: dict) -> list[dict]:
        if not isinstance(record.get("text"), str):
            raise TypeError(f"field 'text' must be a string, got {type(record.get('text')).__name__}")
        return tokenize_text(tokenizer, record["text"], piece)

    examples = _tokenize_all(dataset, data, seed, tokenize)
    return _rows_and_stats(examples, data, tokenizer.pad_token_id, split_documents=True)


def build_sft_rows(data: DataSection, tokenizer, seed: int) -> tuple[list[dict], dict]:
    """Chat records -> rows with loss on assistant tokens only; truncation counted."""
    data.install_template(tokenizer)
    dataset = load_mixture(data, CHAT_FIELDS, seed)
    if "messages" not in dataset.column_names and not {"prompt", "completion"} <= set(dataset.column_names):
        raise RecipeError(
            f"data: SFT needs a 'messages' field or 'prompt' and 'completion' fields (have: "
            f"{', '.join(dataset.column_names)}); map them with data.sources.N.columns"
        )

    def tokenize(record: dict) -> list[dict]:
        messages = to_messages(record, data.system_prompt)
        return [tokenize_chat(tokenizer, messages, data.max_length, data.think_prefill)]

    examples = _tokenize_all(dataset, data, seed, tokenize)
    return _rows_and_stats(examples, data, tokenizer.pad_token_id)


def split_eval(rows: list[dict], eval_rows: int) -> tuple[list[dict], list[dict]]:
    """Hold out the last `eval_rows` rows (rows are already shuffled) for a validation loss."""
    if eval_rows >= len(rows):
        raise RecipeError(f"data.eval_rows: {eval_rows} leaves no training rows (have {len(rows)})")
    return rows[: len(rows) - eval_rows], rows[len(rows) - eval_rows :]


# ----------------------------------------------------------------------------------------------
# Batches


def collate(rows: list[dict], pad_id: int) -> dict[str, Any]:
    """Stack rows into tensors; rows of unequal length are right-padded with an attention mask.

    Packed rows (all the same length) get no attention mask: position ids alone separate documents.
    Padding continues its row's positions, so it is never mistaken for the start of a packed document.
    """
    longest = max(len(r["input_ids"]) for r in rows)
    batch = {"input_ids": [], "labels": [], "position_ids": [], "attention_mask": []}
    for row in rows:
        fill = longest - len(row["input_ids"])
        batch["input_ids"].append(row["input_ids"] + [pad_id] * fill)
        batch["labels"].append(list(row["labels"]) + [-100] * fill)
        last = row["position_ids"][-1]
        batch["position_ids"].append(row["position_ids"] + list(range(last + 1, last + 1 + fill)))
        batch["attention_mask"].append([1] * len(row["input_ids"]) + [0] * fill)
    out = {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
    if all(len(r["input_ids"]) == longest for r in rows):
        del out["attention_mask"]
    out["num_loss_tokens"] = int((out["labels"][:, 1:] != -100).sum())
    return out


class BatchStream:
    """Deterministic epoch-shuffled order over rows; its position is one integer (rows consumed).

    Every rank walks the same global order and takes its slice of each step, so the rows of a
    step do not depend on the number of ranks (a 2-GPU run sees the data of the 1-GPU run).
    """

    def __init__(self, rows: list[dict], batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 pad_id: int = 0, shuffle: bool = True):
        if not rows:
            raise RecipeError("data: no training rows")
        self.per_rank = split_evenly(batch_size, world_size,
                                     f"train.batch_size: {batch_size} is not divisible by {world_size} ranks")
        self.rows, self.batch_size, self.rank, self.pad_id = rows, batch_size, rank, pad_id
        self.consumed = 0
        self.order = EpochOrder(len(rows), seed, shuffle)

    @property
    def epoch(self) -> float:
        return self.consumed / len(self.rows)

    def next_step(self, micro_batch_size: int) -> list[dict]:
        """This rank's micro batches for the next optimizer step."""
        start = self.consumed + self.rank * self.per_rank
        mine = [self.rows[self.order[p]] for p in range(start, start + self.per_rank)]
        self.consumed += self.batch_size
        return [collate(mine[i : i + micro_batch_size], self.pad_id) for i in range(0, self.per_rank, micro_batch_size)]

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "rows": len(self.rows)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("rows") != len(self.rows):
            raise RecipeError(
                f"resume: the checkpoint's data had {state.get('rows')} rows, the recipe now gives {len(self.rows)}"
            )
        self.consumed = int(state["consumed"])


def _first_bad_json_line(path: Path) -> str | None:
    """For a JSON Lines file that `datasets` refused: the first line that is not a JSON object (its
    error names no row)."""
    if not path.is_file() or not path.name.removesuffix(".gz").endswith(".jsonl"):
        return None
    import gzip
    import json

    with (gzip.open if path.name.endswith(".gz") else open)(path, "rt", encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                return f"line {number} is not valid JSON ({err.msg})"
            if not isinstance(record, dict):
                return f"line {number} is not a JSON object"
    return None
