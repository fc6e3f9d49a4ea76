"""Streaming: the text pieces add up to exactly what the non-streamed calls return."""

import json

import pytest
import torch

from llama import Llama, ModelArgs, Tokenizer, Transformer
from llama.streaming import RowText

NON_ASCII = "Zürich 東京 🦙"


def test_stories_greedy_stream_matches_text_completion(stories, reference_text):
    pieces = list(stories.stream_text_completion("", temperature=0, max_gen_len=200))
    full = stories.text_completion([""], temperature=0, max_gen_len=200)[0]["generation"]
    assert "".join(pieces) == full == reference_text
    assert len(pieces) > 100  # it really streamed, token by token


def test_stream_with_echo_matches(stories):
    pieces = list(stories.stream_text_completion("Lily and Tom", temperature=0, max_gen_len=30, echo=True))
    full = stories.text_completion(["Lily and Tom"], temperature=0, max_gen_len=30, echo=True)[0]
    assert "".join(pieces) == full["generation"]
    assert pieces[0].startswith("Lily and Tom")


def test_stream_chat_matches_chat_completion(stories):
    dialog = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Tell me a story"}]
    pieces = list(stories.stream_chat_completion(dialog, temperature=0, max_gen_len=40))
    full = stories.chat_completion([dialog], temperature=0, max_gen_len=40)[0]["generation"]
    assert "".join(pieces) == full["content"]


@pytest.fixture(scope="module")
def random_llama2(tmp_path_factory, llama2_tokenizer):
    """Random weights with the Llama 2 vocabulary, biased towards byte-fallback pieces <0x00>..<0xFF>."""
    ckpt = tmp_path_factory.mktemp("random-llama2")
    params = {"dim": 64, "n_layers": 2, "n_heads": 4, "vocab_size": -1, "multiple_of": 32, "norm_eps": 1e-5}
    (ckpt / "params.json").write_text(json.dumps(params))
    torch.manual_seed(0)
    model = Transformer(ModelArgs(**{**params, "vocab_size": 32000}, max_seq_len=64, max_batch_size=1))
    state = model.state_dict()
    state["output.weight"][3:259] *= 40  # byte pieces get large logits, so UTF-8 gets split
    torch.save(state, ckpt / "consolidated.00.pth")
    return Llama.build(str(ckpt), llama2_tokenizer, max_seq_len=128, max_batch_size=2,
                       device="cpu", dtype="float32")


def test_non_ascii_stream_matches_with_byte_pieces(random_llama2):
    tok = random_llama2.tokenizer
    prompt_ids = tok.encode(NON_ASCII, bos=True, eos=False)
    assert any(tok.id_to_piece(t).startswith("<0x") for t in prompt_ids)  # 🦙 is byte-fallback
    for seed in (1, 2):
        kwargs = dict(temperature=1.0, top_p=1.0, max_gen_len=40, seed=seed)
        for echo in (False, True):
            pieces = list(random_llama2.stream_text_completion(NON_ASCII, echo=echo, **kwargs))
            full = random_llama2.text_completion([NON_ASCII], echo=echo, logprobs=True, **kwargs)[0]
            assert "".join(pieces) == full["generation"]
        tokens, _ = random_llama2.generate([prompt_ids], 40, temperature=1.0, top_p=1.0, seed=seed)
        assert sum(3 <= t < 259 for t in tokens[0]) >= 5  # the sample holds byte pieces <0x00>..<0xFF>
        assert full["generation"].startswith(NON_ASCII)  # echo: the prompt comes first, whole


def test_incomplete_utf8_is_held_back(llama2_tokenizer):
    tok = Tokenizer(llama2_tokenizer)
    ids = tok.encode(NON_ASCII, bos=False, eos=False)
    row = RowText(tok, [])
    pieces = []
    for n in range(1, len(ids) + 1):
        row.update(ids[:n])
        pieces.append(row.delta())
    row.update(ids)
    pieces.append(row.delta(final=True))
    assert "".join(pieces) == tok.decode(ids) == NON_ASCII
    assert not any("\ufffd" in p for p in pieces)
    assert "🦙" in pieces  # the emoji comes out whole, once its 4 bytes are in
