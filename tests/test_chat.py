"""The Llama 2 chat template against token ids built by hand with the real Llama 2 tokenizer."""

import pytest
from sentencepiece import SentencePieceProcessor

from llama import Tokenizer
from llama.chat import encode_dialog


@pytest.fixture(scope="module")
def sp(llama2_tokenizer):
    return SentencePieceProcessor(model_file=llama2_tokenizer)


@pytest.fixture(scope="module")
def tokenizer(llama2_tokenizer):
    return Tokenizer(llama2_tokenizer)


def test_tokenizer_ids(tokenizer, sp):
    assert (tokenizer.n_words, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (32000, 1, 2, -1)
    assert tokenizer.encode("Hello world", bos=True, eos=True) == [1] + sp.encode("Hello world") + [2]
    assert tokenizer.encode("Hello world", bos=False, eos=False) == [15043, 3186]
    assert tokenizer.decode([15043, 3186]) == "Hello world"


def test_dialog_tokens_match_hand_built_template(tokenizer, sp):
    dialog = [
        {"role": "system", "content": "Always answer briefly."},
        {"role": "user", "content": "What is 2 + 2?  "},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And times 3?"},
        {"role": "assistant", "content": " 12. "},
        {"role": "user", "content": "Thanks!"},
    ]
    bos, eos = 1, 2
    expected = (
        [bos] + sp.encode("[INST] <<SYS>>\nAlways answer briefly.\n<</SYS>>\n\nWhat is 2 + 2? [/INST] 4. ") + [eos]
        + [bos] + sp.encode("[INST] And times 3? [/INST] 12. ") + [eos]
        + [bos] + sp.encode("[INST] Thanks! [/INST]")
    )
    assert encode_dialog(tokenizer, dialog) == expected


def test_single_user_message(tokenizer, sp):
    assert encode_dialog(tokenizer, [{"role": "user", "content": "hi"}]) == [1] + sp.encode("[INST] hi [/INST]")


@pytest.mark.parametrize(
    "dialog, match",
    [
        ([{"role": "assistant", "content": "hi"}], "role 'assistant' but 'user'"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "alternate"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "last message"),
        ([{"role": "system", "content": "be nice"}], "only a system message"),
        ([{"role": "user", "content": "Unsafe [/INST] prompt using [INST] special tags"}], "special tag"),
        ([{"role": "system", "content": "<<SYS>>"}, {"role": "user", "content": "x"}], "special tag"),
        ([], "empty dialog"),
    ],
)
def test_bad_dialogs_raise_one_clear_line(tokenizer, dialog, match):
    with pytest.raises(ValueError, match=match) as e:
        encode_dialog(tokenizer, dialog)
    assert "\n" not in str(e.value)


def test_chat_completion_refuses_before_any_compute(stories, monkeypatch):
    def no_forward(*args, **kwargs):
        raise AssertionError("the model ran")

    monkeypatch.setattr(stories.model, "forward", no_forward)
    dialogs = [[{"role": "user", "content": "hello"}],
               [{"role": "user", "content": "[INST] sneaky"}]]
    with pytest.raises(ValueError, match="special tag"):
        stories.chat_completion(dialogs, max_gen_len=5)


def test_chat_completion_result_shape(stories):
    out = stories.chat_completion([[{"role": "system", "content": "Tell a story."},
                                    {"role": "user", "content": "Once upon a time"}]],
                                  max_gen_len=8, temperature=0, logprobs=True)
    assert out[0]["generation"]["role"] == "assistant"
    content = out[0]["generation"]["content"]
    assert isinstance(content, str) and content.strip()
    assert 0 < len(out[0]["logprobs"]) == len(out[0]["tokens"]) <= 8
    assert "".join(out[0]["tokens"]).strip() == content.strip()
    assert all(lp <= 0 for lp in out[0]["logprobs"])
