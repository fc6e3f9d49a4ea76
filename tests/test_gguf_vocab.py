"""The tokenizer embedded in GGUF files (llama.gguf_vocab): llama.cpp's own stories260K GGUF read
against tok512.model, and the Llama 2 / Llama 3 tokenizers written with add_vocab and read back."""

import random
import re

import gguf
import pytest
from sentencepiece import SentencePieceProcessor

import llama.tokenizer
from conftest import models_path
from llama.bpe import LLAMA3_PATTERN, llama3_special_tokens
from llama.formats.gguf import is_gguf
from llama.gguf_vocab import add_vocab, bpe_merges, byte_chars, pb, pb_fields, read_vocab, tokenizer_file
from llama.tokenizer import Tokenizer

CORPUS = [
    "Once upon a time, there was a little girl named Lily. She liked to play outside.",
    "Hello, world! How's it going?", "line one\nline two\n\nline four\n", "\n", "", "x", "tab\there\t",
    "digits 0 7 42 1234567890 3.14159 -12e3 2024-01-31", "punctuation: ;:,.!?()[]{}<>'\"@#$%^&*_+=|\\/~`",
    "héllo wörld café naïve Ωmega ∑ ∞ ≠", "日本語のテキスト 中文 한국어", "emoji 🙂👍🏽🚀 and 👨‍👩‍👧 family",
    "<s> </s> <unk> [INST] literal", "a" * 300, "\u00a0no-break\u2003em space",
]
# Runs of spaces, and spaces at the ends: what sentencepiece's remove_extra_whitespaces changes.
SPACE_RUNS = ["  two leading", "trailing  ", "a   b", " ", "   ", "a  \n  b", " x", "end. "]
CODE = 'def f(x):\n    return x ** 2  # square\n\nfor i in range(10):\n\tprint(f"{i}: {f(i)}")\r\n'
LLAMA3_EXTRA = [
    CODE, "I'm you're we've they'll she'd IT'S DON'T", "123456789012345678901234567890 and 1,000,000.5",
    "    four spaces\n\n\n   \t  mixed \r\n", "<|begin_of_text|><|eot_id|> are plain text here",
    " việc nghiệp lardan", "\n\n\n\n", "   ", "x" + " " * 40 + "y",
]
STORIES_GGUF = ("tiny-gguf", "stories260K-f32.gguf")


def write_gguf(path, fill) -> str:
    """A GGUF file with no tensors and the metadata fill(writer) adds."""
    writer = gguf.GGUFWriter(str(path), "llama")
    fill(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def kv(reader, key, default=None):
    field = reader.fields.get("tokenizer.ggml." + key)
    return default if field is None else field.contents()


def collapse(s: str) -> str:
    """s as sentencepiece's remove_extra_whitespaces leaves it: no runs of spaces, none at the ends."""
    return re.sub(" +", " ", s).strip(" ")


def pieces_text(sp) -> str:
    """Every ordinary piece of a sentencepiece model, in one text: a corpus that uses them all."""
    return "".join(sp.id_to_piece(i).replace("▁", " ") for i in range(sp.vocab_size())
                   if not (sp.is_control(i) or sp.is_byte(i) or sp.is_unknown(i)))


def assert_same_sp(model, ref: SentencePieceProcessor, texts) -> None:
    for s in texts:
        assert model.encode(s) == ref.encode(s), s
        assert model.decode(model.encode(s)) == ref.decode(ref.encode(s)), s


def wrap(backend, path, monkeypatch) -> Tokenizer:
    """llama.tokenizer.Tokenizer over the backend, as Tokenizer(gguf path) will make it."""
    monkeypatch.setattr(llama.tokenizer, "open_model", lambda _: backend)
    return Tokenizer(path)


def test_is_gguf(stories_tokenizer, tmp_path):
    assert is_gguf(models_path(*STORIES_GGUF))
    assert not is_gguf(stories_tokenizer)
    assert not is_gguf(tmp_path / "missing.gguf")
    (tmp_path / "short").write_bytes(b"GG")
    assert not is_gguf(tmp_path / "short")


def test_protobuf_fields_round_trip(stories_tokenizer):
    """pb / pb_fields rebuild tok512.model byte for byte (fields in order, floats exact)."""
    data = open(stories_tokenizer, "rb").read()
    assert b"".join(pb(n, v) for n, v in pb_fields(data)) == data
    assert pb(43, -1) == b"\xd8\x02" + b"\xff" * 9 + b"\x01"  # field 43, int32 -1: a 10-byte varint
    assert pb_fields(pb(43, -1) + pb(2, 0.5) + pb(1, "▁a")) == [(43, 2**64 - 1), (2, 0.5), (1, "▁a".encode())]


def test_stories_gguf_vocab_encodes_like_tok512(stories_tokenizer):
    """llama.cpp's converter wrote tok512.model into this GGUF: the same pieces, scores and types,
    and the same ids and text, except where tok512.model's remove_extra_whitespaces (which GGUF
    does not record) collapses spaces."""
    vocab, ref = read_vocab(models_path(*STORIES_GGUF)), SentencePieceProcessor(model_file=stories_tokenizer)
    assert (vocab.kind, vocab.n_words, vocab.ids, vocab.special_tokens) == ("sentencepiece", 512, (1, 2, -1, []), {})
    sp = vocab.model
    for i in range(512):
        assert (sp.id_to_piece(i), sp.get_score(i)) == (ref.id_to_piece(i), ref.get_score(i))
        assert [sp.is_unknown(i), sp.is_control(i), sp.is_byte(i)] == [ref.is_unknown(i), ref.is_control(i),
                                                                        ref.is_byte(i)]
    assert_same_sp(vocab, ref, [collapse(s) for s in CORPUS + SPACE_RUNS + [CODE, pieces_text(ref)]])
    assert "<0xE6>" in [vocab.id_to_piece(i) for i in vocab.encode("日本")]  # byte fallback
    # tok512.model collapses space runs; with that one flag turned off it encodes like the GGUF.
    top = pb_fields(open(stories_tokenizer, "rb").read())
    assert dict(pb_fields(dict(top)[3])).get(4, 1) == 1  # remove_extra_whitespaces: unset, so on
    keep = SentencePieceProcessor(model_proto=b"".join(pb(n, v + pb(4, False) if n == 3 else v) for n, v in top))
    for s in SPACE_RUNS:
        assert vocab.encode(s) != ref.encode(s), s
    assert_same_sp(vocab, keep, SPACE_RUNS + [CODE])
    # tok512.model's unknown surface is sentencepiece's default written as escaped text.
    assert (ref.decode([0]), vocab.decode([0])) == (" \\342\\201\\207 ", " ⁇ ")


def test_sentencepiece_add_vocab_like_llama_cpp(stories_tokenizer, tmp_path):
    """add_vocab lays tok512.model out as llama.cpp did, plus the flags that make it read back exact."""
    path = write_gguf(tmp_path / "tok512.gguf", lambda w: add_vocab(w, Tokenizer(stories_tokenizer)))
    ours, theirs = gguf.GGUFReader(path), gguf.GGUFReader(models_path(*STORIES_GGUF))
    for key in ("model", "pre", "tokens", "scores", "token_type", "bos_token_id", "eos_token_id"):
        assert kv(ours, key) == kv(theirs, key), key
    assert [kv(ours, k) for k in ("unknown_token_id", "add_bos_token", "add_eos_token", "padding_token_id",
                                  "remove_extra_whitespaces", "add_space_prefix")] == [0, True, False, None, True, None]
    ref = SentencePieceProcessor(model_file=stories_tokenizer)
    assert_same_sp(read_vocab(path, ours), ref, CORPUS + SPACE_RUNS + [CODE, pieces_text(ref)])


def test_sentencepiece_normalizer_flags_round_trip(stories_tokenizer, tmp_path):
    """A tokenizer.model without the dummy space prefix and keeping space runs: add_vocab records
    add_space_prefix False (and no remove_extra_whitespaces), and it reads back exact."""
    top = pb_fields(open(stories_tokenizer, "rb").read())
    model = tmp_path / "tokenizer.model"
    model.write_bytes(b"".join(pb(n, v + pb(3, False) + pb(4, False) if n == 3 else v) for n, v in top))
    ref = SentencePieceProcessor(model_file=str(model))
    assert ref.encode("x") != SentencePieceProcessor(model_file=stories_tokenizer).encode("x")  # no "▁x" now
    reader = gguf.GGUFReader(write_gguf(tmp_path / "flags.gguf", lambda w: add_vocab(w, Tokenizer(str(model)))))
    assert (kv(reader, "add_space_prefix"), kv(reader, "remove_extra_whitespaces")) == (False, None)
    assert_same_sp(read_vocab(tmp_path / "flags.gguf", reader), ref, CORPUS + SPACE_RUNS + [CODE])


def test_llama2_round_trip(llama2_tokenizer, tmp_path, monkeypatch):
    """Llama 2's tokenizer.model -> GGUF -> the same ids; tokenizer_file gives a tokenizer.model back."""
    original = Tokenizer(llama2_tokenizer)
    path = write_gguf(tmp_path / "llama2.gguf", lambda w: add_vocab(w, original))
    reader = gguf.GGUFReader(path)
    assert (kv(reader, "model"), kv(reader, "pre"), len(kv(reader, "tokens"))) == ("llama", "default", 32000)
    assert kv(reader, "remove_extra_whitespaces") is None and kv(reader, "add_space_prefix") is None
    vocab, ref = read_vocab(path, reader), original.sp_model
    assert (vocab.n_words, vocab.ids) == (32000, (1, 2, -1, []))
    assert [vocab.model.get_score(i) for i in range(32000)] == [ref.get_score(i) for i in range(32000)]
    texts = CORPUS + SPACE_RUNS + LLAMA3_EXTRA + [pieces_text(ref)]
    assert_same_sp(vocab, ref, texts)
    name, data = tokenizer_file(vocab)
    assert name == "tokenizer.model"
    assert_same_sp(SentencePieceProcessor(model_proto=data), ref, texts)
    wrapped = wrap(vocab, path, monkeypatch)
    assert (wrapped.kind, wrapped.stop_tokens, wrapped.encode("Hi", bos=True, eos=True)) == \
        ("sentencepiece", [2], [1] + ref.encode("Hi") + [2])


# ---------------------------------------------------------------------------- Llama 3


@pytest.fixture(scope="module")
def llama3_gguf(tmp_path_factory, tok):
    """(Tokenizer of Meta's tokenizer.model, GGUFReader of it written by add_vocab, read_vocab of that).
    Reading takes most of this file's time: gguf.GGUFReader spends ~40 us on each of 256k strings."""
    path = write_gguf(tmp_path_factory.mktemp("gguf") / "llama3.gguf", lambda w: add_vocab(w, tok))
    reader = gguf.GGUFReader(path)
    return tok, reader, read_vocab(path, reader)


def test_llama3_gguf_layout(llama3_gguf):
    _, reader, _ = llama3_gguf
    assert (kv(reader, "model"), kv(reader, "pre")) == ("gpt2", "llama-bpe")
    tokens, types = kv(reader, "tokens"), kv(reader, "token_type")
    assert len(tokens) == len(types) == 128256
    assert types == [gguf.TokenType.NORMAL] * 128000 + [gguf.TokenType.CONTROL] * 256
    assert tokens[:3] == ["!", '"', "#"] and tokens[128000] == "<|begin_of_text|>"
    assert tokens[220] == "Ġ" and tokens[198] == "Ċ"  # " " and "\n" in GPT-2's byte strings
    ids = [kv(reader, k) for k in ("bos_token_id", "eos_token_id", "eom_token_id", "eot_token_id", "add_bos_token")]
    assert ids == [128000, 128001, 128008, 128009, True]


def test_llama3_encodes_like_tiktoken(llama3_gguf, llama3_reference_tokenizer, monkeypatch):
    tok, _, vocab = llama3_gguf
    assert (vocab.kind, vocab.n_words, vocab.ids) == ("tiktoken", 128256, (128000, 128001, 128004, [128008, 128009]))
    assert vocab.special_tokens == tok.special_tokens == llama3_reference_tokenizer.special_tokens
    texts = CORPUS + SPACE_RUNS + LLAMA3_EXTRA
    for s in texts:
        ids = vocab.encode(s)
        assert ids == tok.encode(s, bos=False, eos=False) == llama3_reference_tokenizer.encode(s, bos=False, eos=False)
        assert vocab.decode(ids) == s
    assert [vocab.id_to_piece(i) for i in (0, 220, 128009)] == ["!", " ", "<|eot_id|>"]
    wrapped = wrap(vocab, tok.path, monkeypatch)
    assert wrapped.stop_tokens == [128001, 128008, 128009]
    assert wrapped.encode("Hi", True, False) == [128000, *tok.encode("Hi", False, False)]


def test_llama3_merges(llama3_gguf):
    """The merges make tokens in id order from two tokens, and a merges-list BPE (the tokenizers
    library, with ignore_merges as llama.cpp's llama-bpe) encodes with them like tiktoken."""
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    tok, reader, vocab = llama3_gguf
    tokens, merges = kv(reader, "tokens")[:128000], kv(reader, "merges")
    index = {t: i for i, t in enumerate(tokens)}
    made = [index[m.replace(" ", "")] for m in merges]
    assert made == sorted(set(made)) and made[0] >= 256  # one merge per token, in id order, no single byte
    assert 0.99 * (128000 - 256) < len(merges) < 128000 - 256  # all but Llama 3's tokens BPE never reaches
    parts = [[index[p] for p in m.split(" ")] for m in merges]
    older = sum(max(left, right) < whole for (left, right), whole in zip(parts, made))
    assert older > 0.99 * len(merges)  # not all: Llama 3's vocabulary is not that of one BPE training
    bpe = HFTokenizer(models.BPE(index, [tuple(m.split(" ")) for m in merges], ignore_merges=True))
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_PATTERN), "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    pieces = [vocab.decode([i]) for i in random.Random(1).sample(range(128000), 40000)]
    text = "".join(pieces) + "\n".join(CORPUS + SPACE_RUNS + LLAMA3_EXTRA)
    assert bpe.encode(text, add_special_tokens=False).ids == vocab.encode(text)


def test_llama3_tokenizer_file(llama3_gguf, llama3_tokenizer, tmp_path):
    """tokenizer_file gives back Meta's tokenizer.model byte for byte."""
    tok, _, vocab = llama3_gguf
    name, data = tokenizer_file(vocab)
    assert name == "tokenizer.model" and data == open(llama3_tokenizer, "rb").read()
    (tmp_path / name).write_bytes(data)
    back = Tokenizer(str(tmp_path / name))
    for s in CORPUS + LLAMA3_EXTRA:
        assert back.encode(s, bos=True, eos=False) == tok.encode(s, bos=True, eos=False)


def test_tokenizer_json_add_vocab(llama3_gguf, tmp_path):
    """A small Llama 3-style tokenizer.json (Llama 3's first 3,000 tokens, its merges, Meta's special
    tokens) -> GGUF -> the same ids as the tokenizers library on the file."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    tok, _, _ = llama3_gguf
    n, chars = 3000, byte_chars()
    ranks = {tok.model.decode_single_token_bytes(i): i for i in range(n)}
    vocab = {"".join(chars[b] for b in t): i for t, i in ranks.items()}
    merges = [tuple("".join(chars[b] for b in part) for part in merge) for merge in bpe_merges(ranks)]
    hf = HFTokenizer(models.BPE(vocab, merges, ignore_merges=True))
    hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_PATTERN), "isolated"),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(s, special=True) for s in llama3_special_tokens(n)])
    hf.save(str(tmp_path / "tokenizer.json"))
    original = Tokenizer(str(tmp_path / "tokenizer.json"))
    assert original.kind == "tokenizer.json" and original.stop_tokens == [n + 1, n + 8, n + 9]
    back = read_vocab(write_gguf(tmp_path / "json.gguf", lambda w: add_vocab(w, original)))
    assert (back.kind, back.n_words, back.ids) == ("tiktoken", n + 256, (n, n + 1, n + 4, [n + 8, n + 9]))
    for s in CORPUS + SPACE_RUNS + LLAMA3_EXTRA:
        assert back.encode(s) == original.encode(s, bos=False, eos=False), s
        assert back.decode(back.encode(s)) == s
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.save(str(tmp_path / "other.json"))
    with pytest.raises(ValueError, match="only a tokenizer.json with Llama 3's byte-level BPE"):
        add_vocab(gguf.GGUFWriter(None, "llama"), Tokenizer(str(tmp_path / "other.json")))


# ---------------------------------------------------------------------------- errors


def tiny_bpe(merges):
    """A gpt2/llama-bpe vocabulary of five tokens and the given merges."""
    def fill(writer):
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("llama-bpe")
        writer.add_token_list(["a", "b", "c", "ab", "bc", "<|begin_of_text|>", "<|end_of_text|>"])
        writer.add_token_types([1] * 5 + [3, 3])
        writer.add_token_merges(merges)
    return fill


def test_errors(tmp_path):
    def model(name, pre="default"):
        def fill(writer):
            writer.add_tokenizer_model(name)
            writer.add_tokenizer_pre(pre)
            writer.add_token_list(["<unk>", "a"])
        return fill

    bert = write_gguf(tmp_path / "bert.gguf", model("bert"))
    with pytest.raises(ValueError, match=r"bert\.gguf.*tokenizer\.ggml\.model is 'bert'; supported: 'llama'"):
        read_vocab(bert)
    with pytest.raises(ValueError, match=r"tokenizer\.ggml\.pre is 'qwen2'"):
        read_vocab(write_gguf(tmp_path / "qwen.gguf", model("gpt2", "qwen2")))
    with pytest.raises(ValueError, match=r"none\.gguf' has no embedded tokenizer.*pass --tokenizer_path"):
        read_vocab(write_gguf(tmp_path / "none.gguf", lambda w: w.add_name("no vocabulary")))
    with pytest.raises(ValueError, match="no unknown token"):
        read_vocab(write_gguf(tmp_path / "nounk.gguf", model("llama")))
    with pytest.raises(ValueError, match=r"merges\[1\] 'a b' does not make a token in id order"):
        read_vocab(write_gguf(tmp_path / "order.gguf", tiny_bpe(["b c", "a b"])))
    tiny = read_vocab(write_gguf(tmp_path / "tiny.gguf", tiny_bpe(["a b", "b c"])))
    assert tiny.encode("abc") == [3, 2] and tiny.encode("bcb") == [4, 1] and tiny.ids == (5, 6, -1, [])
    with pytest.raises(ValueError, match="not Meta's Llama 3 layout"):
        tokenizer_file(tiny)
