"""The Llama 3 tokenizer (tiktoken tokenizer.model and tokenizer.json) against Meta's reference
tokenizer from llama-models, on the real Llama 3 tokenizer.model."""

import pytest

from llama import Tokenizer
from llama.tokenizer import tokenizer_kind

CORPUS = [
    "",
    "Hello world",
    " leading and trailing spaces  ",
    "def add(a, b):\r\n\treturn a + b  # sum\r\n",
    'print(f"{x!r:>10}")  \n\n\n  if __name__ == "__main__": main()',
    "日本語の文章と中文句子，한국어 문장도 있습니다。",
    "emoji: 🦙🔥👩‍👩‍👧 and flags 🇫🇷",
    "accents: café, naïve, Ångström, ñandú, Ærø, crème brûlée",
    "numbers 1234567 3.14159 -42 1e-5 0x1F",
    "CRLF line\r\nnext line\r\n\r\nlast",
    "tabs\t\tand\u00a0non-breaking\u2003spaces",
    "I'm sure they'll say it's what we'd've done",
    "<|eot_id|> <|begin_of_text|><|start_header_id|>system<|end_header_id|>",
    "<|reserved_special_token_7|> and <|python_tag|>x",
    "a" * 30_000,  # one run longer than Meta's 25,000-character limit
    " " * 60_000 + "b" * 300_000 + "\n",  # long whitespace and non-whitespace runs
    ("word " * 90_000) + "end",  # longer than 400,000 characters: encoded in windows
]


def test_ids_and_kind(tok, llama3_reference_tokenizer):
    ref = llama3_reference_tokenizer
    assert tok.kind == "tiktoken"
    assert (tok.n_words, tok.bos_id, tok.eos_id, tok.pad_id) == (ref.n_words, ref.bos_id, ref.eos_id, ref.pad_id)
    assert (tok.n_words, tok.bos_id, tok.eos_id) == (128256, 128000, 128001)
    assert tok.stop_tokens == ref.stop_tokens  # EOS, <|eom_id|>, <|eot_id|>
    assert tok.special_tokens == ref.special_tokens


@pytest.mark.parametrize("i", range(len(CORPUS)))
def test_encode_equals_meta_reference(tok, llama3_reference_tokenizer, i):
    s = CORPUS[i]
    for bos in (False, True):
        for eos in (False, True):
            assert tok.encode(s, bos=bos, eos=eos) == llama3_reference_tokenizer.encode(s, bos=bos, eos=eos)
    assert tok.decode(tok.encode(s, bos=False, eos=False)) == s


def test_special_token_text_is_plain_text(tok):
    ids = tok.encode("<|eot_id|>", bos=False, eos=False)
    assert tok.special_tokens["<|eot_id|>"] not in ids and len(ids) > 1
    assert tok.decode([tok.special_tokens["<|eot_id|>"]]) == "<|eot_id|>"


def test_tokenizer_json_from_transformers_converter_gives_the_same_ids(tok, tok_json):
    assert tok_json.kind == "tokenizer.json"
    assert (tok_json.n_words, tok_json.bos_id, tok_json.eos_id, tok_json.pad_id, tok_json.stop_tokens) == \
        (tok.n_words, tok.bos_id, tok.eos_id, tok.pad_id, tok.stop_tokens)
    assert tok_json.special_tokens == tok.special_tokens
    for s in CORPUS:
        ids = tok.encode(s, bos=True, eos=True)
        assert tok_json.encode(s, bos=True, eos=True) == ids, s[:40]
        assert tok_json.decode(ids[1:-1]) == s


def test_kinds_are_found_from_contents(tmp_path, llama3_tokenizer, llama3_tokenizer_json, llama2_tokenizer):
    for src, kind in [(llama3_tokenizer, "tiktoken"), (llama3_tokenizer_json, "tokenizer.json"),
                      (llama2_tokenizer, "sentencepiece")]:
        renamed = tmp_path / f"{kind}.bin"  # the name says nothing
        renamed.write_bytes(open(src, "rb").read())
        assert tokenizer_kind(str(renamed)) == kind
        assert Tokenizer(str(renamed)).kind == kind
    assert Tokenizer(llama2_tokenizer).stop_tokens == [2]


@pytest.mark.parametrize("content, match", [
    (b"not a tokenizer at all", "not a sentencepiece model.*tiktoken"),
    (b"IQ== 0\nIg== one\n", "line 2 is not 'base64-token rank'"),
    (b'{"version": "1.0", "model": 3}', "not a tokenizer.json"),
])
def test_bad_files_are_one_clear_line(tmp_path, content, match):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=match) as e:
        Tokenizer(str(path))
    assert "\n" not in str(e.value) and str(path) in str(e.value)
