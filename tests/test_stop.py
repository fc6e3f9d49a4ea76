"""Stop strings and stop token ids: a row ends at the first stop, the others go on."""

import pytest

from llama.streaming import as_stop_list, cut_at_stop, held_back

PROMPTS = ["", "Lily and Tom"]


def test_stop_string_ends_row_and_others_continue(stories, reference_text):
    free = stories.text_completion(PROMPTS, temperature=0, max_gen_len=60, logprobs=True)
    stopped = stories.text_completion(PROMPTS, temperature=0, max_gen_len=60, logprobs=True, stop=["girl"])
    assert "girl" not in free[1]["generation"]
    # Row 0 ends at the first "girl", which the text leaves out.
    assert stopped[0]["generation"] == reference_text[: reference_text.index("girl")]
    tokens = stopped[0]["tokens"]
    assert "girl" in "".join(tokens) and "girl" not in "".join(tokens[:-1])  # generation stopped there
    assert len(tokens) < len(free[0]["tokens"])
    # Row 1 never meets the stop string and generates exactly as without it.
    assert stopped[1] == free[1]


def test_first_of_several_stop_strings(stories, reference_text):
    out = stories.text_completion([""], temperature=0, max_gen_len=200, stop=["ball", "Lily"])
    assert out[0]["generation"] == reference_text[: reference_text.index("Lily")]


def test_stop_token_ids_per_row(stories):
    prompts = [[1], [1, 365]]
    free, _ = stories.generate(prompts, max_gen_len=40, temperature=0)
    stop_id = free[0][10]  # a token row 0 generates; each row stops before its first one
    out, _ = stories.generate(prompts, max_gen_len=40, temperature=0, stop_token_ids=[stop_id])
    for row, full in zip(out, free):
        assert row == (full[: full.index(stop_id)] if stop_id in full else full)
    assert len(out[0]) <= 10


def test_stream_with_stop_matches(stories, reference_text):
    stop = ["red ball"]
    pieces = list(stories.stream_text_completion("", temperature=0, max_gen_len=200, stop=stop))
    assert "".join(pieces) == stories.text_completion([""], temperature=0, max_gen_len=200, stop=stop)[0]["generation"]
    assert "".join(pieces) == reference_text[: reference_text.index("red ball")]
    assert not any("red" in p for p in pieces)  # the held-back prefix of the stop never leaks


def test_chat_completion_stop(stories):
    dialog = [{"role": "user", "content": "Tell me a story"}]
    free = stories.chat_completion([dialog], temperature=0, max_gen_len=60)[0]["generation"]["content"]
    word = free.split()[3]
    out = stories.chat_completion([dialog], temperature=0, max_gen_len=60, stop=word)[0]
    assert out["generation"]["content"] == free[: free.index(word)]


def test_stop_helpers():
    assert cut_at_stop("a cat sat", ["sat", "cat"]) == ("a ", True)
    assert cut_at_stop("a cat sat", ["dog"]) == ("a cat sat", False)
    assert held_back("the end of ca", ["cat"]) == 2
    assert held_back("abc\ufffd\ufffd", ["zz"]) == 2
    assert held_back("abc", []) == 0
    with pytest.raises(ValueError, match="non-empty"):
        as_stop_list(["ok", ""])


def test_stop_strings_across_batch_chunks(stories):
    prompts = [f"Once upon a time, {name}" for name in ["Lily", "Tom", "Ben", "Sue", "Max"]] * 2  # 10 > batch 8
    batched = stories.text_completion(prompts, temperature=0, max_gen_len=40, stop=["park", "."])
    for prompt, out in zip(prompts[:5], batched[:5]):
        assert out == stories.text_completion([prompt], temperature=0, max_gen_len=40, stop=["park", "."])[0]
    assert batched[:5] == batched[5:]
    assert all("." not in o["generation"] and "park" not in o["generation"] for o in batched)
