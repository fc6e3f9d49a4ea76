"""llama.options: Meta's positional order, keyword-only extras, and validation before any work."""

import inspect
import math

import pytest

from llama import Llama
from llama.options import GenerationOptions

META_ORDER = {
    # Meta's signatures (llama/generation.py of Meta's Llama 2 repository), after self.
    "generate": ["prompt_tokens", "max_gen_len", "temperature", "top_p", "logprobs", "echo"],
    "text_completion": ["prompts", "temperature", "top_p", "max_gen_len", "logprobs", "echo"],
    "chat_completion": ["dialogs", "temperature", "top_p", "max_gen_len", "logprobs"],
}


@pytest.mark.parametrize("method", sorted(META_ORDER))
def test_meta_positional_order_then_keyword_only(method):
    params = list(inspect.signature(getattr(Llama, method)).parameters.values())[1:]
    positional = [p.name for p in params if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    assert positional == META_ORDER[method]
    extras = [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]
    assert len(positional) + len(extras) == len(params) and "seed" in extras


def test_build_keeps_meta_order():
    params = list(inspect.signature(Llama.build).parameters.values())
    positional = [p.name for p in params if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    assert positional == ["ckpt_dir", "tokenizer_path", "max_seq_len", "max_batch_size", "model_parallel_size", "seed"]
    assert params[0].default is inspect.Parameter.empty  # ckpt_dir is required


def test_positional_call_equals_keyword_call(stories):
    prompt = [stories.tokenizer.encode("Once upon a time", bos=True, eos=False)]
    by_position = stories.generate(prompt, 12, 0.0, 0.9, True, False)
    by_keyword = stories.generate(prompt, max_gen_len=12, temperature=0.0, logprobs=True)
    assert by_position == by_keyword and len(by_position[0][0]) == 12


@pytest.mark.parametrize("kwargs, error, name", [
    (dict(temperature=-1.0), ValueError, "temperature"),
    (dict(temperature=math.nan), ValueError, "temperature"),
    (dict(top_p=1.5), ValueError, "top_p"),
    (dict(max_gen_len=-1), ValueError, "max_gen_len"),
    (dict(max_gen_len=2.5), TypeError, "max_gen_len"),
    (dict(seed=1.5), TypeError, "seed"),
    (dict(stop=123), TypeError, "stop"),
    (dict(stop_token_ids=[2.7]), TypeError, "stop_token_ids"),
])
def test_bad_options_are_refused_before_any_forward(stories, monkeypatch, kwargs, error, name):
    def no_forward(*args, **kw):
        raise AssertionError("the model ran before the options were checked")

    monkeypatch.setattr(stories.model, "forward", no_forward)
    with pytest.raises(error, match=name) as e:
        stories.text_completion(["Once"], **kwargs)
    assert "\n" not in str(e.value)


def test_a_string_is_not_a_list_of_prompts(stories):
    with pytest.raises(TypeError, match=r"\[prompt\]"):
        stories.text_completion("Once")


def test_bad_build_option_is_refused_before_reading_files(tmp_path):
    with pytest.raises(ValueError, match="max_seq_len=0"):
        Llama.build(str(tmp_path / "does-not-exist"), max_seq_len=0)
    with pytest.raises(ValueError, match="quantize='int3'"):
        Llama.build(str(tmp_path / "does-not-exist"), quantize="int3")


def test_options_normalise_stop_lists():
    o = GenerationOptions(stop="The end", stop_token_ids=1)
    assert o.stop == ("The end",) and o.stop_token_ids == (1,)
    assert GenerationOptions(stop=["", "x"]).stop == ("x",)


def test_text_that_is_not_unicode_is_a_clear_error(stories):
    with pytest.raises(ValueError, match="lone surrogate '\\\\ud800' at character 4"):
        stories.text_completion(["Once\ud800 upon"], max_gen_len=4)
    with pytest.raises(TypeError, match="prompts must be a list of strings"):
        stories.text_completion([b"Once"], max_gen_len=4)
