"""Records to token ids and padded batches: what train/data.py's records become for training.

The chat template renders each record; SFT examples get labels on the final response only
(earlier assistant turns in the prompt are context) and reward-model pairs share one prompt.
A prompt too long for `max_seq_len` loses its oldest tokens; a response that does not fit is
never cut: the record is dropped and counted. Text that could never fit is not tokenised
at all (see `fitting_chars`), so a record of many megabytes costs what a short one does.
Batches are right-padded and grouped by length to keep padding small; sequence packing is
left out.
"""
from __future__ import annotations

import random
from collections import Counter
from functools import lru_cache

from core.sampling import pad
from train.data import DataError


# ---- tokenising -----------------------------------------------------------------------------------

# A normalizer (NFC, NFKC) may merge a few code points into one before tokenising.
MERGED_CODE_POINTS = 4


@lru_cache(maxsize=8)
def fitting_chars(tokenizer, max_len: int) -> int:
    """Characters of text that always tokenise to at least `max_len` tokens: no token spans more
    than the vocabulary's longest entry (written in bytes, so at least as long in characters).
    Tokenising costs ~2 us a character here: a 60 MB prompt took 4 minutes before this bound."""
    longest = max(map(len, tokenizer.get_vocab()))
    return max_len * longest * MERGED_CODE_POINTS


def clip_prompt(prompt: list[dict], keep: int) -> list[dict]:
    """The prompt's last `keep` characters of content: older messages go and the oldest kept one
    loses its start. That is at least as many tokens as any prompt keeps (fit_prompt), so only
    text that truncation would drop anyway goes (a word cut here may split differently)."""
    kept: list[dict] = []
    for message in reversed(prompt):
        if keep <= 0:
            break
        content = message["content"]
        kept.append(message if len(content) <= keep else {**message, "content": content[-keep:]})
        keep -= len(content)
    return kept[::-1]


def render(tokenizer, prompt: list[dict], response: str,
           max_len: int | None = None) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) through the chat template; the response ends with the
    end-of-turn token (so the model learns to stop) and drops the template's text after it.
    With `max_len`, a prompt far longer than that many tokens is clipped before tokenising:
    its last `max_len` tokens come out as they would from the whole prompt."""
    if max_len is not None:
        prompt = clip_prompt(prompt, fitting_chars(tokenizer, max_len))
    prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True,
                                               tokenize=True, return_dict=False)
    full_ids = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": response}],
                                             tokenize=True, return_dict=False)
    if full_ids[:len(prompt_ids)] != prompt_ids:
        raise DataError("the model's chat template renders the prompt differently once a "
                        "response follows: use a model whose template is prefix-stable.")
    response_ids = full_ids[len(prompt_ids):]
    end = tokenizer.eos_token_id
    if end in response_ids:
        response_ids = response_ids[:len(response_ids) - response_ids[::-1].index(end)]
    return prompt_ids, response_ids


def fit_prompt(prompt_ids: list[int], longest_response: int, max_seq_len: int):
    """The prompt cut to fit beside the response (oldest tokens go), or None if nothing fits.
    Responses are never cut: a record whose response does not fit is dropped and counted."""
    room = max_seq_len - longest_response
    if room < min(len(prompt_ids), 8):
        return None
    return prompt_ids[-room:] if len(prompt_ids) > room else prompt_ids


def too_long(tokenizer, answer: str, max_seq_len: int) -> bool:
    """Whether `answer` has more than max_seq_len tokens for certain, without tokenising it
    (stripped, for templates that trim their messages)."""
    return len(answer) > fitting_chars(tokenizer, max_seq_len) \
        and len(answer.strip()) > fitting_chars(tokenizer, max_seq_len)


def encode_chat(tokenizer, prompt: list[dict], response: str, max_seq_len: int):
    """(example with input_ids and labels, note) for SFT; example is None when it cannot fit.
    Labels cover the response and its end-of-turn token only."""
    if too_long(tokenizer, response, max_seq_len):
        return None, "responses longer than max_seq_len"
    prompt_ids, response_ids = render(tokenizer, prompt, response, max_seq_len)
    kept = fit_prompt(prompt_ids, len(response_ids), max_seq_len)
    if kept is None:
        return None, "responses longer than max_seq_len"
    note = "truncated prompts" if len(kept) < len(prompt_ids) else None
    return {"input_ids": kept + response_ids, "labels": [-100] * len(kept) + response_ids}, note


def encode_pair(tokenizer, record: dict, max_seq_len: int):
    """(example with chosen_ids and rejected_ids, note) for the reward model; both sequences
    share the same (equally truncated) prompt and end with the end-of-turn token."""
    if any(too_long(tokenizer, record[key], max_seq_len) for key in ("chosen", "rejected")):
        return None, "pairs with an answer longer than max_seq_len"
    prompt_ids, chosen_ids = render(tokenizer, record["prompt"], record["chosen"], max_seq_len)
    _, rejected_ids = render(tokenizer, record["prompt"], record["rejected"], max_seq_len)
    kept = fit_prompt(prompt_ids, max(len(chosen_ids), len(rejected_ids)), max_seq_len)
    if kept is None:
        return None, "pairs with an answer longer than max_seq_len"
    note = "truncated prompts" if len(kept) < len(prompt_ids) else None
    return {"chosen_ids": kept + chosen_ids, "rejected_ids": kept + rejected_ids,
            "prompt_len": len(kept), "source": record.get("source", "")}, note


def encode_all(encode, tokenizer, records: list[dict], max_seq_len: int, log=print) -> list[dict]:
    """Encode every record with `encode` (encode_sft_record or encode_pair), reporting drops."""
    encoded, notes = [], Counter()
    for record in records:
        example, note = encode(tokenizer, record, max_seq_len)
        if note:
            notes[note] += 1
        if example is not None:
            encoded.append(example)
    if notes:
        log("tokenised: " + ", ".join(f"{n} {why}" for why, n in notes.items())
            + f" (of {len(records)}; max_seq_len {max_seq_len})")
    if records and not encoded:
        raise DataError(f"no record fits max_seq_len {max_seq_len}: raise --max-seq-len.")
    return encoded


def encode_sft_record(tokenizer, record: dict, max_seq_len: int):
    return encode_chat(tokenizer, record["prompt"], record["response"], max_seq_len)


# ---- batching -------------------------------------------------------------------------------------

def length_grouped_batches(lengths: list[int], batch_size: int, seed: int) -> list[list[int]]:
    """Shuffled batches of similar length: sort within windows of 50 batches to cut padding."""
    order = list(range(len(lengths)))
    rng = random.Random(seed)
    rng.shuffle(order)
    window = batch_size * 50
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: -lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(examples: list[dict], pad_id: int):
    """SFT batch: input_ids, attention_mask, labels (-100 on prompt and padding)."""
    input_ids, attention_mask = pad([e["input_ids"] for e in examples], pad_id)
    labels, _ = pad([e["labels"] for e in examples], -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def collate_pairs(examples: list[dict], pad_id: int):
    """Reward-model batch of B pairs as 2B rows: the chosen sequences, then the rejected ones."""
    rows = [e["chosen_ids"] for e in examples] + [e["rejected_ids"] for e in examples]
    input_ids, attention_mask = pad(rows, pad_id)
    return {"input_ids": input_ids, "attention_mask": attention_mask}
