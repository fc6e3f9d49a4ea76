"""Memory preflight: the estimate's arithmetic, and a 7B build refused before loading."""

import json

import pytest
import torch

from conftest import models_path
from llama import Llama
from llama.memory import GB, estimate, parse_size, preflight, weight_bytes
from llama.model import ModelArgs

LLAMA2_7B = dict(dim=4096, n_layers=32, n_heads=32, multiple_of=256, norm_eps=1e-5, vocab_size=-1)


def seven_b() -> ModelArgs:
    return ModelArgs(**{**LLAMA2_7B, "vocab_size": 32000})


def test_parse_size():
    assert parse_size("12GB") == 12 * 10**9
    assert parse_size("1.5 GiB") == int(1.5 * 2**30)
    assert parse_size(1000) == 1000
    with pytest.raises(ValueError, match="memory_limit"):
        parse_size("twelve")


def test_7b_weights_and_kv_cache():
    args = seven_b()
    # Llama-2-7B has 6,738,415,616 parameters: 13.48 GB in fp16.
    assert weight_bytes(args, torch.float16) == 6_738_415_616 * 2
    int8 = weight_bytes(args, torch.float16, "int8")
    int4 = weight_bytes(args, torch.float16, "int4", group_size=32)
    assert 6.8 * GB < int8 < 7.0 * GB and 4.0 * GB < int4 < 4.4 * GB
    est = estimate(args, 4096, 1, torch.float16)
    assert est.kv_cache == 2 * 32 * 4096 * 4096 * 2  # 2 GiB at 4096 positions
    # Model parallel splits all but the norms.
    assert abs(weight_bytes(args, torch.float16, world_size=2) * 2 / weight_bytes(args, torch.float16) - 1) < 1e-4


def test_preflight_lists_settings_that_fit():
    args = seven_b()
    with pytest.raises(ValueError) as e:
        preflight(args, 2048, 1, torch.float16, torch.device("cuda"), memory_limit="12GB")
    msg = str(e.value)
    assert "12.00 GB" in msg and "quantize='int8' (" in msg and "quantize='int4' (" in msg
    assert "--nproc_per_node 2" in msg and "\n" not in msg
    # A big cache: quantization alone is not enough, so the advice shrinks the cache too.
    with pytest.raises(ValueError, match="quantize='int8', max_batch_size=1"):
        preflight(args, 4096, 4, torch.float16, torch.device("cpu"), memory_limit="12GB")
    assert preflight(args, 512, 1, torch.float16, torch.device("cpu"), quantize="int8", memory_limit="12GB")


@pytest.fixture(scope="module")
def fake_7b(tmp_path_factory):
    """A 7B-shape Meta checkpoint whose 13.5 GB of data is a hole in a sparse file (no disk, no RAM)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    path = tmp_path_factory.mktemp("fake7b")
    (path / "params.json").write_text(json.dumps(LLAMA2_7B))
    args = seven_b()
    dim, hidden = args.dim, args.ffn_hidden_dim
    with FakeTensorMode():
        sd = {"tok_embeddings.weight": torch.empty(32000, dim, dtype=torch.float16),
              "norm.weight": torch.empty(dim, dtype=torch.float16),
              "output.weight": torch.empty(32000, dim, dtype=torch.float16)}
        for i in range(args.n_layers):
            p = f"layers.{i}."
            for name in ("attention.wq", "attention.wk", "attention.wv", "attention.wo"):
                sd[p + name + ".weight"] = torch.empty(dim, dim, dtype=torch.float16)
            sd[p + "feed_forward.w1.weight"] = torch.empty(hidden, dim, dtype=torch.float16)
            sd[p + "feed_forward.w3.weight"] = torch.empty(hidden, dim, dtype=torch.float16)
            sd[p + "feed_forward.w2.weight"] = torch.empty(dim, hidden, dtype=torch.float16)
            sd[p + "attention_norm.weight"] = torch.empty(dim, dtype=torch.float16)
            sd[p + "ffn_norm.weight"] = torch.empty(dim, dtype=torch.float16)
    with torch.serialization.skip_data(materialize_fake_tensors=True):
        torch.save(sd, path / "consolidated.00.pth")
    return str(path)


def test_7b_fp16_build_refused_at_12gb_before_loading(fake_7b, monkeypatch):
    import llama.generation as generation

    def never(*args, **kwargs):
        raise AssertionError("the build read weights before refusing")

    # Every step of the build that reads weight data.
    monkeypatch.setattr(generation, "quantize_state_dict", never)
    monkeypatch.setattr(generation, "load_weights", never)
    with pytest.raises(ValueError, match="quantize='int8'.*quantize='int4'"):
        Llama.build(fake_7b, models_path("llama2-tokenizer", "tokenizer.model"), max_seq_len=2048,
                    max_batch_size=1, device="cpu", dtype="float16", memory_limit="12GB")


@pytest.mark.parametrize("form", ["stories260K-hf", "stories260K/stories260K.bin", "stories260K-meta"])
def test_memory_command_reads_every_format(form, capsys):
    from llama.memory import main

    main(["--ckpt_dir", models_path(*form.split("/")), "--max_seq_len", "256", "--dtype", "float32"])
    out = capsys.readouterr().out
    assert "float32" in out and "-> fits" in out


def test_memory_command_reports_a_quantized_checkpoint_as_quantized(tmp_path, capsys):
    from llama.memory import main
    from llama.quantize import save_quantized

    save_quantized(models_path("stories260K-meta"), str(tmp_path / "q"), "int8", dtype="float32")
    main(["--ckpt_dir", str(tmp_path / "q"), "--max_seq_len", "256", "--dtype", "float32"])
    assert "int8" in capsys.readouterr().out.splitlines()[0]
    with pytest.raises(SystemExit) as stop:
        main(["--ckpt_dir", str(tmp_path / "q"), "--memory_limit", "1MB"])
    assert stop.value.code == 1
    assert "does NOT fit" in capsys.readouterr().out


# Meta's params.json of Llama 3.1-8B, and Hugging Face's config.json of Llama 3.2-1B (tied).
LLAMA31_8B = {"dim": 4096, "ffn_dim_multiplier": 1.3, "multiple_of": 1024, "n_heads": 32, "n_kv_heads": 8,
              "n_layers": 32, "norm_eps": 1e-05, "rope_theta": 500000.0, "use_scaled_rope": True, "vocab_size": 128256}
LLAMA32_1B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
              "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
              "head_dim": 64, "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "tie_word_embeddings": True,
              "vocab_size": 128256, "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                                        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                        "original_max_position_embeddings": 8192}}


@pytest.mark.parametrize("name, parameters", [("params.json", 8_030_261_248), ("config.json", 1_235_814_400)])
def test_memory_command_on_llama3_shapes_without_weights(tmp_path, capsys, name, parameters):
    """Published parameter counts (8B with its own output matrix, 1B with the tied one) x 2 bytes."""
    (tmp_path / name).write_text(json.dumps(LLAMA31_8B if name == "params.json" else LLAMA32_1B))
    from llama.memory import main

    main(["--ckpt_dir", str(tmp_path), "--max_seq_len", "8192", "--dtype", "bfloat16", "--memory_limit", "1TB"])
    line = capsys.readouterr().out.splitlines()[0]
    weights = float(line.split("weights ")[1].split(" GB")[0]) * GB
    assert abs(weights / (parameters * 2) - 1) < 0.02, line
    # 8 kv heads x 128 (8B) or 64 (1B) dims, K and V, every layer, 8192 positions, bf16.
    kv = 2 * (32 * 8 * 128 if name == "params.json" else 16 * 8 * 64) * 8192 * 2
    assert f"KV cache {kv / GB:.2f} GB" in line


def test_llama31_8b_refused_at_12gb_lists_int8():
    args = ModelArgs.from_params(LLAMA31_8B)
    with pytest.raises(ValueError, match="quantize='int8' \\(") as e:
        preflight(args, 2048, 1, torch.bfloat16, torch.device("cuda"), memory_limit="12GB")
    assert "--nproc_per_node 2" in str(e.value)  # 8 kv heads split over 2 GPUs
