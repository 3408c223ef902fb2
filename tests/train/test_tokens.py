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


def test_length_grouped_batches_cover_every_example_once():
    lengths = [(i * 37) % 100 + 1 for i in range(250)]
    batches = tokens.length_grouped_batches(lengths, 8, seed=3)
    assert sorted(i for b in batches for i in b) == list(range(250))
    assert tokens.length_grouped_batches(lengths, 8, seed=3) == batches
