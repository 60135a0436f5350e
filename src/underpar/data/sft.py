"""SFT encoding with a tokenizer's chat template (loss on the assistant response only),
batching with right padding, and sequence packing with per-example position ids and a
block-diagonal causal mask.

Packing and attention isolation: a packed row holds several examples. Restarting
`position_ids` at 0 per example gives each its own RoPE positions, and the label of each
example's first token is -100 (it would be predicted from the previous example's last
token). Attention must also stay inside each example; with transformers 5 (checked on 5.17
and 5.23, Llama, CPU, tests/test_tasks.py) either of these does it:
- `position_ids` with `attention_mask=None` AND `use_cache=False`: transformers detects the
  restarts and builds the block-diagonal mask itself (sdpa and eager). With the default
  use_cache=True the model makes a cache, skips the detection and attends across examples.
  flash_attention_2 (GPU only) uses the same `position_ids` for its varlen kernels;
- `attention_mask=packed_attention_mask(position_ids, dtype=<model dtype>)`, an additive 4D
  float mask, passed through unchanged (sdpa and eager);
- the boolean 4D mask (`dtype=None`) works with sdpa only: eager attention adds the mask to
  the scores, so True/False would become +1/+0 instead of masking.
Passing a 2D all-ones `attention_mask` together with packed `position_ids` silently lets
examples attend to each other: pass the 4D mask or None.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from underpar.errors import DataError

if TYPE_CHECKING:
    from underpar.data.tasks import Example, Task

IGNORE_INDEX = -100  # the label Hugging Face's causal-LM loss skips


# ---------------------------------------------------------------- encoding

def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def _token_ids(tokenizer, text: str) -> list[int]:
    # The template text already holds any BOS it wants; do not add another.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def prompt_ids(tokenizer: Any, messages: list[dict]) -> list[int]:
    """Token ids of a chat prompt ending in the assistant's generation prompt."""
    return _token_ids(tokenizer, _render(tokenizer, messages, True))


def response_span(tokenizer: Any, prompt_messages: list[dict], response: str) -> tuple[list[int], int, int, bool]:
    """Token ids of the whole conversation and the [start, end) span to train on: from the
    first token after the generation prompt through the last special token of the reply (the
    end-of-turn token, e.g. <|im_end|>; a newline the template puts after it is not trained).
    The flag says whether the prompt's ids were an exact prefix of the conversation's ids."""
    prompt = prompt_ids(tokenizer, prompt_messages)
    messages = [*prompt_messages, {"role": "assistant", "content": response}]
    full_ids = _token_ids(tokenizer, _render(tokenizer, messages, False))
    exact = full_ids[:len(prompt)] == prompt
    if exact:
        start = len(prompt)
    else:
        # Some templates render a finished assistant turn differently from the generation
        # prompt (e.g. they insert or drop a think block), or a tokenizer merges across the
        # boundary: train from the first token where the two token sequences differ.
        start = 0
        while start < min(len(prompt), len(full_ids)) and prompt[start] == full_ids[start]:
            start += 1
    special = set(tokenizer.all_special_ids)
    # The *last* special token: responses may contain special tokens themselves (s1K's
    # "<|im_start|>think"), the end-of-turn token closes the reply.
    ends = [i for i in range(start, len(full_ids)) if full_ids[i] in special]
    end = ends[-1] + 1 if ends else len(full_ids)
    return full_ids, start, end, exact


def encode_sft(tokenizer: Any, example: Example, task: Task, max_length: int) -> dict | None:
    """`input_ids` of the chat-formatted prompt + response and `labels` that are -100 on every
    prompt/template token, the response tokens (and the end-of-turn token) elsewhere. Cut to
    `max_length`; None when no response token survives the cut."""
    ids, start, end, _ = response_span(tokenizer, task.prompt_messages(example),
                                       task.sft_response(example))
    labels = [IGNORE_INDEX] * start + ids[start:end] + [IGNORE_INDEX] * (len(ids) - end)
    ids, labels = ids[:max_length], labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return {"input_ids": ids, "labels": labels}


def encode_sft_examples(tokenizer: Any, examples: Sequence[Example], task: Task, max_length: int) -> tuple[list[dict], int]:
    """`encode_sft` over examples; returns the encoded ones and how many were dropped because
    their prompt filled `max_length`."""
    encoded = [encode_sft(tokenizer, example, task, max_length) for example in examples]
    kept = [e for e in encoded if e is not None]
    return kept, len(encoded) - len(kept)


# ---------------------------------------------------------------- batching

def collate(examples: list[dict], pad_id: int, pad_to_multiple: int | None = None) -> dict[str, torch.Tensor]:
    """Right-padded LongTensors `input_ids`, `attention_mask` (1 = token, 0 = pad), `labels`
    (-100 on pads), and `position_ids` when the examples carry them (packed rows)."""
    if not examples:
        raise DataError("collate got no examples")
    length = max(len(e["input_ids"]) for e in examples)
    if pad_to_multiple:
        length = -(-length // pad_to_multiple) * pad_to_multiple
    batch = len(examples)
    input_ids = torch.full((batch, length), pad_id, dtype=torch.long)
    labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((batch, length), dtype=torch.long)
    with_positions = all("position_ids" in e for e in examples)
    position_ids = torch.arange(length).repeat(batch, 1)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        input_ids[row, :n] = torch.tensor(example["input_ids"])
        labels[row, :n] = torch.tensor(example["labels"])
        attention_mask[row, :n] = torch.tensor(example.get("attention_mask", [1] * n))
        if with_positions:
            position_ids[row, :n] = torch.tensor(example["position_ids"])
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if with_positions:
        out["position_ids"] = position_ids
    return out


def pack(encoded: list[dict], seq_len: int, pad_id: int = 0) -> list[dict]:
    """Pack encoded examples, in order, into rows of exactly `seq_len` tokens (a new row
    starts when the next example does not fit; the last row is padded). Each row has
    `input_ids`, `labels`, `position_ids` (restarting at 0 per example; the padding forms its
    own run) and `attention_mask` (0 on padding). The label of every example's first token
    is -100: Hugging Face shifts labels, so labels[i] is predicted at position i-1, which
    belongs to the previous example."""
    rows: list[dict] = []
    current: list[dict] = []

    def close() -> None:
        row = {"input_ids": [], "labels": [], "position_ids": [], "attention_mask": []}
        for example in current:
            n = len(example["input_ids"])
            row["input_ids"] += example["input_ids"]
            row["labels"] += [IGNORE_INDEX] + example["labels"][1:]
            row["position_ids"] += list(range(n))
            row["attention_mask"] += [1] * n
        pad = seq_len - len(row["input_ids"])
        row["input_ids"] += [pad_id] * pad
        row["labels"] += [IGNORE_INDEX] * pad
        row["position_ids"] += list(range(pad))
        row["attention_mask"] += [0] * pad
        rows.append(row)

    used = 0
    for example in encoded:
        n = len(example["input_ids"])
        if n > seq_len:
            raise DataError(f"an encoded example has {n} tokens, more than seq_len={seq_len}; "
                            "encode with max_length <= seq_len")
        if current and used + n > seq_len:
            close()
            current, used = [], 0
        current.append(example)
        used += n
    if current:
        close()
    return rows


def packed_attention_mask(position_ids: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Block-diagonal causal mask (B, 1, T, T) for packed rows, a new block wherever
    `position_ids` restarts at 0. Boolean (True = may attend) when `dtype` is None, else
    additive: 0 where allowed and the dtype's minimum elsewhere (what eager attention needs)."""
    if position_ids.dim() == 1:
        position_ids = position_ids[None]
    segment = torch.cumsum(position_ids == 0, dim=-1)  # (B, T)
    length = position_ids.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril()
    mask = (segment[:, :, None] == segment[:, None, :]) & causal
    mask = mask[:, None]
    if dtype is None:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
