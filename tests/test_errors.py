"""Bad input gives one clear line that names what to change, never a bare assert or tensor error."""

import json
import shutil

import pytest
import torch

from conftest import models_path
from llama import Llama
from llama.checkpoint import load_checkpoint


def build(ckpt, tokenizer, **kwargs):
    args = dict(max_seq_len=64, max_batch_size=2, device="cpu", dtype="float32")
    return Llama.build(str(ckpt), str(tokenizer), **{**args, **kwargs})


def one_clear_line(excinfo, *words):
    message = str(excinfo.value)
    assert not isinstance(excinfo.value, AssertionError)
    assert "\n" not in message, message
    for word in words:
        assert word in message, message


def test_missing_ckpt_dir(tmp_path, stories_tokenizer):
    with pytest.raises(FileNotFoundError) as e:
        build(tmp_path / "nope", stories_tokenizer)
    one_clear_line(e, "does not exist", "--ckpt_dir")


def test_empty_ckpt_dir(tmp_path, stories_tokenizer):
    with pytest.raises(FileNotFoundError) as e:
        build(tmp_path, stories_tokenizer)
    one_clear_line(e, "empty", "--ckpt_dir")


def test_ckpt_dir_without_params_json(tmp_path, stories_tokenizer):
    shutil.copy(models_path("stories260K-meta", "consolidated.00.pth"), tmp_path)
    with pytest.raises(FileNotFoundError) as e:
        build(tmp_path, stories_tokenizer)
    one_clear_line(e, "params.json")


def test_params_json_with_unknown_key_is_logged_and_loads(tmp_path, stories_tokenizer, caplog):
    shutil.copy(models_path("stories260K-meta", "consolidated.00.pth"), tmp_path)
    params = json.loads(open(models_path("stories260K-meta", "params.json")).read())
    (tmp_path / "params.json").write_text(json.dumps({**params, "some_future_key": {"group_size": 32}}))
    build(tmp_path, stories_tokenizer)
    assert "ignored unknown key(s) some_future_key" in caplog.text


def test_params_json_with_a_bad_value_names_file_key_and_value(tmp_path, stories_tokenizer):
    shutil.copy(models_path("stories260K-meta", "consolidated.00.pth"), tmp_path)
    params = json.loads(open(models_path("stories260K-meta", "params.json")).read())
    (tmp_path / "params.json").write_text(json.dumps({**params, "n_heads": "8"}))
    with pytest.raises(ValueError) as e:
        build(tmp_path, stories_tokenizer)
    one_clear_line(e, "params.json: n_heads is '8'; it must be an integer")


def test_params_json_that_does_not_match_weights(tmp_path, stories_tokenizer):
    shutil.copy(models_path("stories260K-meta", "consolidated.00.pth"), tmp_path)
    params = json.loads(open(models_path("stories260K-meta", "params.json")).read())
    (tmp_path / "params.json").write_text(json.dumps({**params, "n_layers": 6}))
    with pytest.raises(ValueError) as e:
        build(tmp_path, stories_tokenizer)
    one_clear_line(e, "missing keys", "layers.5.")


def test_unexpected_keys_are_named(tmp_path, stories_tokenizer):
    sd = torch.load(models_path("stories260K-meta", "consolidated.00.pth"), weights_only=True)
    sd["layers.0.attention.bias"] = torch.zeros(3)
    torch.save(sd, tmp_path / "consolidated.00.pth")
    shutil.copy(models_path("stories260K-meta", "params.json"), tmp_path)
    with pytest.raises(ValueError) as e:
        build(tmp_path, stories_tokenizer)
    one_clear_line(e, "unexpected keys", "layers.0.attention.bias")


def test_heads_not_divisible_by_model_parallel_size():
    with pytest.raises(ValueError) as e:
        load_checkpoint(models_path("stories260K-meta-mp2"), rank=0, world_size=3)
    one_clear_line(e, "divisible", "--nproc_per_node")


def test_model_parallel_size_different_from_world_size(stories_tokenizer):
    with pytest.raises(ValueError) as e:
        build(models_path("stories260K-meta-mp2"), stories_tokenizer, model_parallel_size=2)
    one_clear_line(e, "model_parallel_size=2", "--nproc_per_node")


def test_prompt_longer_than_max_seq_len(stories_tokenizer):
    llama = build(models_path("stories260K-meta"), stories_tokenizer, max_seq_len=16)
    with pytest.raises(ValueError) as e:
        llama.generate([[1] + [300] * 20], max_gen_len=4)
    one_clear_line(e, "21 tokens", "--max_seq_len")
    with pytest.raises(ValueError) as e:  # exactly max_seq_len leaves no room for a new token
        llama.generate([[1] * 16], max_gen_len=4)
    one_clear_line(e, "--max_seq_len")
    with pytest.raises(ValueError) as e:
        llama.generate([[]], max_gen_len=4)
    one_clear_line(e, "no tokens")


def test_tokenizer_with_other_vocabulary(llama2_tokenizer):
    with pytest.raises(ValueError) as e:
        build(models_path("stories260K-meta"), llama2_tokenizer)
    one_clear_line(e, "32000", "512", "--tokenizer_path")


def test_missing_tokenizer(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        build(models_path("stories260K-meta"), tmp_path / "tokenizer.model")
    one_clear_line(e, "--tokenizer_path")


@pytest.mark.parametrize("kwargs, words", [
    ({"device": "tpu"}, ["tpu", "--device"]),
    ({"device": "cuda:7"}, ["--device"]),
    ({"dtype": "int3"}, ["int3", "--dtype"]),
])
def test_unknown_device_or_dtype(stories_tokenizer, kwargs, words):
    with pytest.raises(ValueError) as e:
        build(models_path("stories260K-meta"), stories_tokenizer, **kwargs)
    one_clear_line(e, *words)


def test_missing_shard_is_named_as_such(tmp_path, stories_tokenizer):
    for name in ("params.json", "consolidated.00.pth"):  # consolidated.01.pth of two is missing
        shutil.copy(models_path("stories260K-meta-mp2", name), tmp_path)
    with pytest.raises(ValueError) as e:
        build(tmp_path, stories_tokenizer)
    one_clear_line(e, "a shard file is probably missing")
