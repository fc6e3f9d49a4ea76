"""GGUF files: llama.cpp's own files give llama.cpp's text, k-quants give the logits of the gguf
package's own dequantization (through transformers), and package <-> GGUF round trips."""

import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from conftest import FP32_ORDER, REPO, models_path
from llama import Llama
from llama.checkpoint import load_checkpoint
from llama.convert import convert
from llama.quant import dequantize_int4

PROMPT = "Once upon a time"
FLOAT_FILES = ["stories260K-f32", "stories260K-f16", "stories260K-h192-f32", "stories260K-h192-f16"]
QUANT_FILES = ["stories260K-h192-q8_0", "stories260K-h192-q5_0", "stories260K-h192-q4_1", "stories260K-h192-q4_0"]
K_QUANTS = ["rand256-q6_k", "rand256-q5_k_m", "rand256-q4_k_m", "rand256-q3_k_m", "rand256-q2_k"]


def gguf(name: str) -> str:
    return models_path("tiny-gguf", f"{name}.gguf")


def build(path: str, tokenizer: str | None = None, **kw) -> Llama:
    return Llama.build(path, tokenizer, max_seq_len=256, max_batch_size=1, device="cpu", dtype="float32", **kw)


def llama_cpp_text(name: str) -> str:
    return open(models_path("tiny-gguf", "llama.cpp-output", f"{name}.txt")).read().removesuffix("\n")


def agreeing_prefix() -> dict[str, int]:
    """{file: characters} that a float reference shares with llama.cpp, from the folder's README."""
    readme = open(models_path("tiny-gguf", "README.md")).read()
    found = {f"stories260K-h192-{q}": int(n) for q, n in re.findall(r"(q\d_\d) (?:all|the first) (\d+)", readme)}
    assert set(found) == set(QUANT_FILES), found
    return found


def complete(llama: Llama) -> str:
    out = llama.text_completion([PROMPT], max_gen_len=120, temperature=0)
    return PROMPT + out[0]["generation"]


# ---------------------------------------------------------------- llama.cpp's files and text


@pytest.mark.parametrize("name", FLOAT_FILES)
def test_float_files_give_llama_cpp_text_with_the_embedded_tokenizer(name):
    llama = build(gguf(name))  # no tokenizer file: the one in the GGUF
    assert llama.tokenizer.path == gguf(name)
    assert complete(llama) == llama_cpp_text(name)


@pytest.mark.parametrize("name", QUANT_FILES)
def test_quantized_files_agree_with_llama_cpp_as_far_as_a_float_reference_does(name):
    n = agreeing_prefix()[name]
    text = complete(build(gguf(name)))
    assert text[:n] == llama_cpp_text(name)[:n]


def test_q4_files_load_as_int4_and_run_on_the_int4_kernels():
    from llama.cpu_layers import AtenInt4Linear, KernelInt4x8Linear

    q4_0 = build(gguf("stories260K-h192-q4_0")).model
    layer = q4_0.layers[0].attention.wq
    # Q4_0 keeps its fp16 scales, which llama.kernels reads as they are, rows interleaved by 8.
    assert isinstance(layer, KernelInt4x8Linear) and layer.group_size == 32 and layer.scales.dtype == torch.float16
    # Q4_1's zero m + 8d needs fp32: PyTorch's int4 kernel takes those.
    layer = build(gguf("stories260K-h192-q4_1")).model.layers[0].attention.wq
    assert isinstance(layer, AtenInt4Linear) and layer.group_size == 32 and layer.scales.dtype == torch.float32
    assert q4_0.tok_embeddings.weight.dtype == torch.float32  # a Q8_0 embedding, dequantized


@pytest.mark.parametrize("name", ["stories260K-h192-q4_0", "stories260K-h192-q4_1"])
def test_q4_nibbles_move_without_changing_a_weight(name):
    """The int4 tensors equal the gguf package's own dequantization (Q4_1: up to fp32 rounding)."""
    from gguf import GGUFReader, quants

    from llama.formats.gguf import meta_name

    _, sd = load_checkpoint(gguf(name))
    for t in GGUFReader(gguf(name)).tensors:
        if t.tensor_type.name not in ("Q4_0", "Q4_1"):
            continue
        key = meta_name(t.name, gguf(name))
        prefix = key[: -len("weight")]
        ours = dequantize_int4(sd[key], sd[prefix + "scales"], sd[prefix + "zeros"])
        theirs = torch.from_numpy(quants.dequantize(t.data, t.tensor_type))
        torch.testing.assert_close(ours, theirs, atol=1e-6 if name.endswith("q4_1") else 0, rtol=0)


def test_q4_rank_slices_are_dequantized_slices():
    """Under model parallel, Q4_0 tensors are dequantized and sliced like every other type."""
    _, whole = load_checkpoint(gguf("stories260K-h192-q4_0"))
    for rank in range(2):
        _, part = load_checkpoint(gguf("stories260K-h192-q4_0"), rank, 2)
        for key, dim in (("layers.0.attention.wq.weight", 0), ("layers.0.feed_forward.w2.weight", 1)):
            prefix = key[: -len("weight")]
            full = dequantize_int4(whole[key], whole[prefix + "scales"], whole[prefix + "zeros"])
            size = full.shape[dim] // 2
            assert torch.equal(part[key], full.narrow(dim, rank * size, size)), (rank, key)


# ---------------------------------------------------------------- k-quants against transformers


def transformers_logits(path: str, tokens: list[int]) -> torch.Tensor:
    """Logits of transformers' Llama whose weights are the gguf package's dequantization."""
    from gguf import GGUFReader, quants
    from transformers import LlamaConfig, LlamaForCausalLM

    from llama.formats.gguf import meta_name, read_gguf_args
    from llama.formats.hf import hf_key, to_rotate_half

    args = read_gguf_args(path)
    config = LlamaConfig(hidden_size=args.dim, num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
                         num_key_value_heads=args.kv_heads, intermediate_size=args.hidden_dim,
                         vocab_size=args.vocab_size, rms_norm_eps=args.norm_eps, rope_theta=args.rope_theta,
                         max_position_embeddings=args.max_seq_len, tie_word_embeddings=args.tie_word_embeddings)
    model = LlamaForCausalLM(config).eval()
    weights = {}
    for t in GGUFReader(path).tensors:
        w = torch.from_numpy(np.array(quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
        key = meta_name(t.name, path)
        heads = {"attention.wq.weight": args.n_heads, "attention.wk.weight": args.kv_heads}.get(key.split(".", 2)[-1])
        weights[hf_key(key)] = w if heads is None else to_rotate_half(w, heads)
    model.load_state_dict(weights, strict=True)
    with torch.inference_mode():
        return model(torch.tensor([tokens])).logits[0]


@pytest.mark.parametrize("name", ["rand256-f32"] + K_QUANTS)
def test_k_quants_give_the_logits_of_the_gguf_packages_dequantization(name):
    tokens = [1] + [(37 * i + 11) % 512 for i in range(63)]
    llama = build(gguf(name))
    with torch.inference_mode():
        ours = llama.model(torch.tensor([tokens]), 0)[0]
    torch.testing.assert_close(ours, transformers_logits(gguf(name), tokens), atol=1e-4, rtol=0)


# ---------------------------------------------------------------- round trips


@pytest.fixture(scope="module")
def stories_meta(stories_tokenizer) -> Llama:
    return build(models_path("stories260K-meta"), stories_tokenizer)


def logits(llama: Llama, text: str = "Once upon a time there was a little girl named Lily") -> torch.Tensor:
    with torch.inference_mode():
        return llama.model(torch.tensor([llama.tokenizer.encode(text, bos=True, eos=False)]), 0)[0]


def test_f32_round_trip_gives_identical_logits(tmp_path, stories_tokenizer, stories_meta):
    out = tmp_path / "stories.gguf"
    convert(models_path("stories260K-meta"), str(out), to="gguf", tokenizer_path=stories_tokenizer, outtype="f32")
    assert torch.equal(logits(build(str(out))), logits(stories_meta))
    back = tmp_path / "back"
    assert sorted(convert(str(out), str(back), to="meta")) == ["consolidated.00.pth", "params.json", "tokenizer.model"]
    assert torch.equal(logits(build(str(back))), logits(stories_meta))


def q8_0(w: torch.Tensor) -> torch.Tensor:
    """Q8_0 written independently: per block of 32, d = max|w| / 127 (stored fp16), q = round(w / d)."""
    blocks = w.float().reshape(-1, 32)  # (blocks, 32)
    d = blocks.abs().amax(dim=1, keepdim=True) / 127
    q = torch.where(d > 0, blocks / d, torch.zeros_like(blocks))
    q = torch.sign(q) * torch.floor(q.abs() + 0.5)  # round half away from zero
    return (q * d.half().float()).reshape(w.shape)


def test_q8_0_round_trip_gives_the_greedy_tokens_of_q8_0_weights(tmp_path, stories_tokenizer):
    out = tmp_path / "stories-q8_0.gguf"
    convert(models_path("stories260K-meta"), str(out), to="gguf", tokenizer_path=stories_tokenizer, outtype="q8_0")
    read = build(str(out))
    expected = build(models_path("stories260K-meta"), stories_tokenizer)
    for w in expected.model.state_dict().values():
        if w.dim() == 2 and w.shape[1] % 32 == 0:
            w.copy_(q8_0(w))
        elif w.dim() == 2:  # rows of 172 (w2) are written as f16
            w.copy_(w.half().float())
    torch.testing.assert_close(logits(read), logits(expected), **FP32_ORDER)
    assert read.generate([[1]], max_gen_len=200, temperature=0)[0] == \
        expected.generate([[1]], max_gen_len=200, temperature=0)[0]


def test_quantized_gguf_converts_to_hugging_face_dequantized(tmp_path):
    dst = tmp_path / "hf"
    convert(gguf("stories260K-h192-q4_0"), str(dst), to="hf")
    config = json.loads((dst / "config.json").read_text())
    assert config["intermediate_size"] == 192 and config["tie_word_embeddings"]
    text = complete(build(str(dst)))  # the dequantized weights, through the float path
    n = agreeing_prefix()["stories260K-h192-q4_0"]
    assert text[:n] == llama_cpp_text("stories260K-h192-q4_0")[:n]


# ---------------------------------------------------------------- memory


MEASURE = textwrap.dedent("""
    import json, sys
    from llama import Llama, kernels
    from llama.tokenizer import Tokenizer

    def rss_kb(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1])

    # The baseline is the process with its libraries loaded: the kernels, and PyTorch's meta-device
    # machinery that the build's estimates use (its first use loads ~60 MB of Python modules).
    kernels.available()
    from llama.memory import param_count
    from llama.model import ModelArgs
    param_count(ModelArgs(dim=64, n_layers=1, n_heads=1, vocab_size=32), 32)
    before = rss_kb("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
    if sys.argv[2] == "tokenizer":
        tokenizer = Tokenizer(sys.argv[1])
        print(json.dumps({"before_kb": before, "peak_kb": rss_kb("VmHWM"), "after_kb": rss_kb("VmRSS")}))
        sys.exit()
    llama = Llama.build(sys.argv[1], max_seq_len=64, max_batch_size=1, device="cpu", dtype="float32")
    built = rss_kb("VmHWM")
    tokens, _ = llama.generate([[1, 450, 4123]], max_gen_len=4, temperature=0)
    print(json.dumps({"before_kb": before, "peak_kb": built, "n": len(tokens[0]),
                      "layer": type(llama.model.layers[0].feed_forward.w1).__name__}))
""")


def measure(path, what: str) -> dict:
    out = subprocess.run([sys.executable, "-c", MEASURE, str(path), what], cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_q4_0_file(path, llama2_tokenizer) -> int:
    """A 110M-shape (stories110M: dim 768, 12 layers, vocab 32000) Q4_0 GGUF of random weights,
    written with the gguf writer: every matrix Q4_0, norms F32."""
    from gguf import GGMLQuantizationType, GGUFWriter, quants

    from llama.formats.gguf_write import _add_metadata, _tensors
    from llama.gguf_vocab import add_vocab
    from llama.model import ModelArgs, Transformer
    from llama.tokenizer import Tokenizer

    args = ModelArgs(dim=768, n_layers=12, n_heads=12, vocab_size=32000, multiple_of=256, max_seq_len=1024)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(args).state_dict().items()}
    sd = {k: torch.empty(s) for k, s in shapes.items()}
    writer = GGUFWriter(str(path), "llama")
    _add_metadata(writer, args, "f32", "random-110M")
    add_vocab(writer, Tokenizer(llama2_tokenizer))
    rng = np.random.default_rng(0)
    for name, t in _tensors(args, sd):
        w = rng.standard_normal(tuple(t.shape), dtype=np.float32) * 0.02
        if t.dim() == 1:
            writer.add_tensor(name, np.ones(t.shape, dtype=np.float32))
        else:
            writer.add_tensor(name, quants.quantize(w, GGMLQuantizationType.Q4_0), raw_dtype=GGMLQuantizationType.Q4_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return os.path.getsize(path)


def test_q4_0_load_grows_rss_by_less_than_1_3_file_sizes(tmp_path, llama2_tokenizer):
    """No fp32 copy: the build's peak growth, less what its tokenizer keeps (a sentencepiece model
    of 32,000 pieces read from the file's metadata, the same whatever the weights), stays under
    1.3x the file. Measured: 1.16-1.18x without the tokenizer, which keeps 17-18 MiB (1.41x with it)."""
    path = tmp_path / "random-110M-q4_0.gguf"
    size = write_q4_0_file(path, llama2_tokenizer)
    tok = measure(path, "tokenizer")
    m = measure(path, "build")
    assert m["n"] == 4 and m["layer"] == "KernelInt4x8Linear"
    growth = (m["peak_kb"] - m["before_kb"]) * 1024
    tokenizer = (tok["after_kb"] - tok["before_kb"]) * 1024
    print(f"q4_0 file {size / 2**20:.1f} MiB; build +{growth / 2**20:.1f} MiB ({growth / size:.2f}x), of which "
          f"the tokenizer keeps {tokenizer / 2**20:.1f} MiB ({(growth - tokenizer) / size:.2f}x without it)")
    assert growth - tokenizer < 1.3 * size
    assert tokenizer < 32 * 2**20  # a vocabulary of 32,000 words (measured 17-18 MiB), not a copy of weights


# ---------------------------------------------------------------- the command line and errors


def test_llama_complete_prints_llama_cpp_text():
    out = subprocess.run(["llama", "complete", "--ckpt_dir", gguf("stories260K-f32"), "--max_gen_len", "120",
                          "--temperature", "0", PROMPT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.removesuffix("\n") == llama_cpp_text("stories260K-f32")


def write_gguf_file(path, arch: str = "llama", tensor_type=None, vocab: bool = True) -> str:
    """A small GGUF file copied from stories260K-f32.gguf's metadata and tensors, with changes."""
    from gguf import GGML_QUANT_SIZES, GGUFReader, GGUFValueType, GGUFWriter

    source = GGUFReader(gguf("stories260K-f32"))
    writer = GGUFWriter(str(path), arch)
    for key, f in source.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or (not vocab and key.startswith("tokenizer.")):
            continue
        value_type = f.types[0]
        if value_type == GGUFValueType.ARRAY:
            writer.add_array(key, f.contents())
        else:
            writer.add_key_value(key, f.contents(), value_type)
    for t in source.tensors:
        data = np.array(t.data)
        if tensor_type is not None and t.name == "blk.0.attn_q.weight":
            block, size = GGML_QUANT_SIZES[tensor_type]
            writer.add_tensor(t.name, np.zeros((64, 64 // block * size), dtype=np.uint8), raw_dtype=tensor_type)
        else:
            writer.add_tensor(t.name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def error_of(path: str, **kw) -> str:
    with pytest.raises(ValueError) as e:
        build(path, **kw)
    message = str(e.value)
    assert "\n" not in message and len(message) < 400, message
    return message


def test_other_architectures_are_refused_in_one_line(tmp_path):
    path = write_gguf_file(tmp_path / "qwen.gguf", arch="qwen2")
    message = error_of(path, tokenizer=models_path("stories260K", "tok512.model"))
    assert "general.architecture is 'qwen2'" in message and "llama" in message


def test_a_tensor_type_nothing_can_read_is_named(tmp_path):
    from gguf import GGMLQuantizationType

    path = write_gguf_file(tmp_path / "q8_1.gguf", tensor_type=GGMLQuantizationType.Q8_1)
    message = error_of(path)
    assert "blk.0.attn_q.weight" in message and "Q8_1" in message


def test_a_truncated_file_is_named(tmp_path):
    data = open(gguf("stories260K-f32"), "rb").read()
    for cut in (1000, len(data) - 5000):
        path = tmp_path / f"cut{cut}.gguf"
        path.write_bytes(data[:cut])
        message = error_of(str(path))
        assert "truncated" in message and str(path) in message


def test_a_gguf_without_a_tokenizer_asks_for_one(tmp_path):
    path = write_gguf_file(tmp_path / "novocab.gguf", vocab=False)
    assert "--tokenizer_path" in error_of(path)
    llama = build(path, tokenizer=models_path("stories260K", "tok512.model"))  # one given: it runs
    assert complete(llama) == llama_cpp_text("stories260K-f32")
