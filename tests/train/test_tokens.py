"""Records to token ids and batches: labels on the response only, prompts cut from the oldest
end, responses never cut, length-grouped batches that cover every example."""
from train import tokens


def test_labels_cover_the_response_and_its_end_of_turn_token_only(default_model):
    from core.models import load_tokenizer

    tokenizer = load_tokenizer(str(default_model))
    prompt = [{"role": "user", "content": "Name a colour."}]
    example, note = tokens.encode_chat(tokenizer, prompt, "Blue.", 512)
    assert note is None
    labelled = [t for t in example["labels"] if t != -100]
    assert tokenizer.decode(labelled) == "Blue.<|im_end|>"
    assert labelled[-1] == tokenizer.eos_token_id
    assert example["input_ids"][-len(labelled):] == labelled
    first = example["labels"].index(labelled[0])
    assert all(t == -100 for t in example["labels"][:first])


def test_truncation_never_cuts_a_response(default_model):
    from core.models import load_tokenizer

    tokenizer = load_tokenizer(str(default_model))
    long_prompt = [{"role": "user", "content": "word " * 300}]
    example, note = tokens.encode_chat(tokenizer, long_prompt, "Short answer.", 64)
    assert note == "truncated prompts" and len(example["input_ids"]) == 64
    assert tokenizer.decode([t for t in example["labels"] if t != -100]) == "Short answer.<|im_end|>"
    dropped, note = tokens.encode_chat(tokenizer, [{"role": "user", "content": "Hi"}], "long " * 100, 64)
    assert dropped is None and note == "responses longer than max_seq_len"


def spy_on_templates(tokenizer, monkeypatch) -> list[int]:
    """The longest message each chat-template call is given, in characters."""
    seen, render = [], tokenizer.apply_chat_template

    def spied(messages, **kwargs):
        seen.append(max(len(m["content"]) for m in messages))
        return render(messages, **kwargs)
    monkeypatch.setattr(tokenizer, "apply_chat_template", spied)
    return seen


def test_a_record_of_megabytes_is_cut_before_it_is_tokenised(default_model, monkeypatch):
    """Probe 5, N4: one 60 MB record with --max-seq-len 32 tokenised for 4 minutes (all of it,
    twice) before truncation kept 32 tokens of it."""
    from core.models import load_tokenizer

    tokenizer = load_tokenizer(str(default_model))
    words = " ".join(f"w{i}" for i in range(200_000))  # 1.4 MB
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": words},
              {"role": "assistant", "content": "Go on."}, {"role": "user", "content": words[-900:]}]
    # before: the whole prompt tokenised, then its last tokens kept beside the response
    whole = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                          return_dict=False)
    _, answer = tokens.render(tokenizer, prompt[-1:], "Blue.")
    seen = spy_on_templates(tokenizer, monkeypatch)
    example, note = tokens.encode_chat(tokenizer, prompt, "Blue.", 32)
    assert note == "truncated prompts"
    assert example["input_ids"] == whole[-(32 - len(answer)):] + answer
    assert seen and max(seen) < 100_000  # what is tokenised is bounded by max_seq_len, not the record
    seen.clear()
    short = [{"role": "user", "content": "Hi"}]
    dropped = tokens.encode_chat(tokenizer, short, words, 32)
    assert dropped == (None, "responses longer than max_seq_len") and not seen
    pair = tokens.encode_pair(tokenizer, {"prompt": short, "chosen": "Yes.", "rejected": words}, 32)
    assert pair == (None, "pairs with an answer longer than max_seq_len") and not seen


def test_length_grouped_batches_cover_every_example_once():
    lengths = [(i * 37) % 100 + 1 for i in range(250)]
    batches = tokens.length_grouped_batches(lengths, 8, seed=3)
    assert sorted(i for b in batches for i in b) == list(range(250))
    assert tokens.length_grouped_batches(lengths, 8, seed=3) == batches
