"""The tokenizer embedded in a GGUF file's `tokenizer.ggml.*` metadata: read and write.

  "llama"               sentencepiece pieces/scores/types: rebuilt as a sentencepiece BPE ModelProto
                        with Llama 2's normalizer (kind "sentencepiece")
  "gpt2" + "llama-bpe"  Llama 3's byte-level BPE (GPT-2 byte strings, merges): a tiktoken Encoding
                        with Meta's pattern and ids as ranks (kind "tiktoken")

Ids as ranks: tiktoken merges the adjacent pair whose concatenation ranks lowest, a merges list the
listed pair of lowest index: the same when merges come in the order of the ids of the tokens they
make (see `bpe_merges`), which `read_vocab` checks and `add_vocab` writes. Llama 3's 588 tokens BPE
never reaches come out only as a whole pre-token (tiktoken's shortcut; llama.cpp's ignore_merges).

sentencepiece's remove_extra_whitespaces has a GGUF key that llama.cpp's converter never writes, so
it is off unless written (as in Llama 2 and llama.cpp): stories260K's tok512.model, which has it on,
encodes space runs unlike its GGUF. `add_vocab` writes it where it is on. The protobuf wire format
is read and written here (no protobuf package).
"""

import base64
import json
import struct

from llama.bpe import LLAMA3_PATTERN, TiktokenModel, llama3_special_tokens
from llama.formats.gguf import read_whole
from llama.tokenizer import SentencePieceModel  # llama.tokenizer imports this module only when it reads a GGUF

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # gguf.TokenType = sentencepiece's
LLAMA3_PRE = ("llama-bpe", "llama3", "llama-v3")  # llama.cpp's names of Llama 3's pre-tokenizer
SUPPORTED = "'llama' (sentencepiece) and 'gpt2' with tokenizer.ggml.pre 'llama-bpe' (Llama 3)"
K = "tokenizer.ggml."


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int32/int64: ten bytes of two's complement
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes(out + bytes([n]))


def pb(num: int, value) -> bytes:
    """One protobuf field: int or bool (varint), float (fixed32), str or bytes (length-delimited)."""
    if isinstance(value, float):
        return _varint(num << 3 | 5) + struct.pack("<f", value)
    if isinstance(value, int):
        return _varint(num << 3) + _varint(value)
    data = value.encode() if isinstance(value, str) else value
    return _varint(num << 3 | 2) + _varint(len(data)) + data


def pb_fields(buf: bytes) -> list[tuple[int, object]]:
    """(field number, value) of a protobuf message: int (varint), float (fixed32) or bytes."""
    out, i = [], 0
    while i < len(buf):
        key, i = _read_varint(buf, i)
        wire = key & 7
        if wire == 0:
            value, i = _read_varint(buf, i)
        elif wire == 2:
            n, i = _read_varint(buf, i)
            value, i = bytes(buf[i : i + n]), i + n
        elif wire == 5:
            value, i = struct.unpack_from("<f", buf, i)[0], i + 4
        else:  # 64-bit and group fields: none in sentencepiece's messages
            raise ValueError(f"protobuf wire type {wire} at byte {i}: not a sentencepiece model")
        out.append((key >> 3, value))
    return out


def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
    n = shift = 0
    while buf[i] & 0x80:
        n, i, shift = n | (buf[i] & 0x7F) << shift, i + 1, shift + 7
    return n | buf[i] << shift, i + 1


def byte_chars() -> list[str]:
    """GPT-2's bytes-to-unicode map: printable Latin-1 bytes stand for themselves, the other 68
    bytes for chr(256), chr(257), ... in byte order."""
    keep = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


# ---------------------------------------------------------------------------- reading

class GGUFSentencePiece(SentencePieceModel):
    """A sentencepiece model rebuilt from a GGUF's "llama" vocabulary (kind "sentencepiece")."""

    def __init__(self, proto: bytes, stops=()):
        from sentencepiece import SentencePieceProcessor

        self.model = SentencePieceProcessor(model_proto=proto)
        self.n_words = self.model.vocab_size()
        self.special_tokens: dict[str, int] = {}
        eos = self.model.eos_id()
        self.ids = (self.model.bos_id(), eos, self.model.pad_id(), [s for s in dict.fromkeys(stops) if s != eos])


class GGUFTiktoken(TiktokenModel):
    """A tiktoken Encoding from a GGUF's Llama 3 vocabulary (kind "tiktoken"); `ranks` = ids."""

    def __init__(self, ranks: dict[bytes, int], special_tokens: dict[str, int], ids):
        import tiktoken

        self.ranks, self.special_tokens, self.ids = ranks, special_tokens, ids
        self.model = tiktoken.Encoding(name="llama3-gguf", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                                       special_tokens=special_tokens)
        self.n_words = len(ranks) + len(special_tokens)


def read_vocab(path, reader=None):
    """The tokenizer backend (GGUFSentencePiece or GGUFTiktoken) of the GGUF file at path;
    `reader`: the file's gguf.GGUFReader if it is open already."""
    path, reader = str(path), reader if reader is not None else read_whole(str(path))

    def get(key, default=None):
        field = reader.fields.get(K + key)
        return default if field is None else field.contents()

    model, pre = get("model"), get("pre")
    if model is None:
        raise ValueError(f"{path!r} has no embedded tokenizer (no {K}model); pass --tokenizer_path")
    if model == "llama":
        return _read_sentencepiece(path, get)
    if model == "gpt2" and pre in LLAMA3_PRE:
        return _read_llama3(path, get)
    key, value = ("pre", pre) if model == "gpt2" else ("model", model)
    raise ValueError(f"{path!r}: {K}{key} is {value!r}; supported: {SUPPORTED}; pass --tokenizer_path")


def _stops(get) -> list[int]:
    return [i for i in (get("eom_token_id"), get("eot_token_id")) if i is not None]


def _read_sentencepiece(path, get) -> GGUFSentencePiece:
    """A sentencepiece BPE ModelProto with the GGUF's pieces and Llama 2's normalizer."""
    tokens = get("tokens")
    scores, types = get("scores", [0.0] * len(tokens)), list(get("token_type", [NORMAL] * len(tokens)))
    unk = get("unknown_token_id", types.index(UNKNOWN) if UNKNOWN in types else None)
    if unk is None:
        raise ValueError(f"{path!r}: the 'llama' vocabulary has no unknown token (sentencepiece needs one); "
                         "pass --tokenizer_path")
    types[unk] = UNKNOWN
    # ModelProto: pieces 1 (piece 1, score 2, type 3: NORMAL left out), trainer_spec 2, normalizer_spec 3
    pieces = b"".join(pb(1, pb(1, tok) + pb(2, float(score)) + (pb(3, t) if t != NORMAL else b""))
                      for tok, score, t in zip(tokens, scores, types))
    # TrainerSpec: model_type 3 (BPE: 2), vocab_size 4, byte_fallback 35, unk/bos/eos/pad ids 40-43, pieces 45-48
    trainer = pb(3, 2) + pb(4, len(tokens)) + (pb(35, True) if BYTE in types else b"")
    for n, i in enumerate((unk, get("bos_token_id"), get("eos_token_id"), get("padding_token_id"))):
        trainer += pb(40 + n, -1 if i is None else i) + (pb(45 + n, tokens[i]) if i is not None else b"")
    # NormalizerSpec: name, precompiled_charsmap, add_dummy_prefix, remove_extra_whitespaces, escape_whitespaces
    normalizer = b"".join(pb(n, v) for n, v in enumerate(("identity", bytes(get("precompiled_charsmap", [])),
                          bool(get("add_space_prefix", True)), bool(get("remove_extra_whitespaces", False)), True), 1))
    try:
        return GGUFSentencePiece(pieces + pb(2, trainer) + pb(3, normalizer), _stops(get))
    except RuntimeError as e:
        raise ValueError(f"{path!r}: sentencepiece rejects the embedded vocabulary ({e}); "
                         "pass --tokenizer_path") from None


def _read_llama3(path, get) -> GGUFTiktoken:
    """Ranks = ids of the NORMAL tokens; every other token is special (Meta's <|...|> tokens)."""
    tokens = get("tokens")
    types = get("token_type", [NORMAL] * len(tokens))
    inverse = {c: b for b, c in enumerate(byte_chars())}
    try:
        ranks = {bytes(inverse[c] for c in tokens[i]): i for i, t in enumerate(types) if t == NORMAL}
    except KeyError as e:
        raise ValueError(f"{path!r}: a token has {e.args[0]!r}, which is not in GPT-2's byte map; the GGUF "
                         "vocabulary is damaged: convert the model again") from None
    special = {tokens[i]: i for i, t in enumerate(types) if t != NORMAL}
    _check_merges(path, get("merges", []), {tok: i for i, tok in enumerate(tokens)})
    bos = get("bos_token_id", special.get("<|begin_of_text|>"))
    eos = get("eos_token_id", special.get("<|end_of_text|>"))
    if bos is None or eos is None:
        raise ValueError(f"{path!r} names no BOS/EOS token ({K}bos_token_id); pass --tokenizer_path")
    stops = _stops(get) or [special[s] for s in ("<|eom_id|>", "<|eot_id|>") if s in special]
    pad = get("padding_token_id", special.get("<|finetune_right_pad_id|>", -1))
    return GGUFTiktoken(ranks, special, (bos, eos, pad, [s for s in dict.fromkeys(stops) if s != eos]))


def _check_merges(path, merges: list[str], ids: dict[str, int]) -> None:
    """Every merge makes a token, from two tokens, in the order of the made tokens' ids."""
    last = 0
    for n, merge in enumerate(merges):
        left, _, right = merge.partition(" ")
        made = ids.get(left + right, -1)
        if made < last or left not in ids or right not in ids:
            raise ValueError(f"{path!r}: {K}merges[{n}] {merge!r} does not make a token in id order, so ids "
                             "are not BPE ranks as in Llama 3; pass --tokenizer_path")
        last = made


# ---------------------------------------------------------------------------- writing

def _ranks(backend) -> dict[bytes, int]:
    """{token bytes: id} of a tiktoken backend's ordinary tokens."""
    if hasattr(backend, "ranks"):
        return backend.ranks
    special = set(backend.special_tokens.values())
    decode = backend.model.decode_single_token_bytes
    return {decode(i): i for i in range(backend.n_words) if i not in special}


def tokenizer_file(tokenizer) -> tuple[str, bytes]:
    """(file name, bytes) of a standalone tokenizer file equal to a sentencepiece or tiktoken backend
    (or Tokenizer): a serialized sentencepiece ModelProto, or Meta's tiktoken lines."""
    backend = getattr(tokenizer, "backend", tokenizer)
    if backend.kind == "sentencepiece":
        return "tokenizer.model", backend.model.serialized_model_proto()
    if backend.kind != "tiktoken":
        raise ValueError(f"no tokenizer.model for a {backend.kind} tokenizer; copy its file instead")
    ranks = _ranks(backend)
    if sorted(ranks.values()) != list(range(len(ranks))) or \
            backend.special_tokens != llama3_special_tokens(len(ranks)):
        raise ValueError("the vocabulary's ids or special tokens are not Meta's Llama 3 layout, which a tiktoken "
                         "tokenizer.model implies; keep the GGUF file as the tokenizer")
    lines = sorted(ranks.items(), key=lambda kv: kv[1])
    return "tokenizer.model", b"".join(base64.b64encode(tok) + b" %d\n" % i for tok, i in lines)


def add_vocab(writer, tokenizer) -> None:
    """Write a Tokenizer's (or backend's) vocabulary into a gguf.GGUFWriter as llama.cpp's converter
    lays it out: "llama" for sentencepiece, "gpt2"/"llama-bpe" with merges for Llama 3."""
    backend = getattr(tokenizer, "backend", tokenizer)
    if backend.kind == "sentencepiece":
        _add_sentencepiece(writer, backend)
    elif backend.kind == "tiktoken":
        _add_llama3(writer, backend, _llama3_vocab(backend))
    else:
        _add_llama3(writer, backend, _json_vocab(backend))


def _add_sentencepiece(writer, backend) -> None:
    sp = backend.model
    proto = pb_fields(sp.serialized_model_proto())
    types = [dict(pb_fields(v)).get(3, NORMAL) for n, v in proto if n == 1]  # as sentencepiece stores them
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([sp.id_to_piece(i) for i in range(len(types))])
    writer.add_token_scores([sp.get_score(i) for i in range(len(types))])
    writer.add_token_types(types)
    bos, eos, pad, _ = backend.ids
    writer.add_bos_token_id(bos)
    writer.add_eos_token_id(eos)
    writer.add_unk_token_id(sp.unk_id())
    if pad >= 0:
        writer.add_pad_token_id(pad)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    # Only where they differ from llama.cpp's defaults (a space prefix, whitespace kept as it is).
    normalizer = dict(pb_fields(dict(proto).get(3, b"")))
    if not normalizer.get(3, True):
        writer.add_add_space_prefix(False)
    if normalizer.get(4, True):
        writer.add_remove_extra_whitespaces(True)
    if normalizer.get(2):
        writer.add_precompiled_charsmap(normalizer[2])


def _llama3_vocab(backend) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) of a tiktoken backend."""
    ranks, chars = _ranks(backend), byte_chars()
    by_id = {i: "".join(chars[b] for b in tok) for tok, i in ranks.items()}
    by_id.update({i: name for name, i in backend.special_tokens.items()})
    if sorted(by_id) != list(range(backend.n_words)):
        raise ValueError(f"the tiktoken vocabulary's {backend.n_words} ids have gaps; GGUF needs ids 0..n-1")
    special = set(backend.special_tokens.values())
    types = [CONTROL if i in special else NORMAL for i in range(backend.n_words)]
    merges = [f"{''.join(chars[b] for b in left)} {''.join(chars[b] for b in right)}"
              for left, right in bpe_merges(ranks)]
    return [by_id[i] for i in range(backend.n_words)], types, merges


def _json_vocab(backend) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) of a tokenizer.json with Llama 3's byte-level BPE."""
    spec = json.loads(backend.model.to_str())
    model, pre = spec["model"], json.dumps(spec.get("pre_tokenizer"))
    if (model.get("type") != "BPE" or model.get("byte_fallback") or not model.get("ignore_merges")
            or spec.get("normalizer") or json.dumps(LLAMA3_PATTERN) not in pre or "ByteLevel" not in pre):
        raise ValueError("only a tokenizer.json with Llama 3's byte-level BPE (its pattern, ignore_merges, no "
                         "normalizer) goes into GGUF here; convert the model with llama.cpp's converter")
    by_id = {i: tok for tok, i in model["vocab"].items()}
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    by_id.update({i: t["content"] for i, t in added.items()})
    if sorted(by_id) != list(range(len(by_id))):
        raise ValueError(f"the tokenizer.json's {len(by_id)} ids have gaps; GGUF needs ids 0..n-1")
    types = [NORMAL if i not in added else CONTROL if added[i]["special"] else USER_DEFINED
             for i in range(len(by_id))]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return [by_id[i] for i in range(len(by_id))], types, merges


def _add_llama3(writer, backend, vocab) -> None:
    tokens, types, merges = vocab
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("llama-bpe")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    bos, eos, _, stops = backend.ids
    writer.add_bos_token_id(bos)
    writer.add_eos_token_id(eos)
    adders = {"<|eot_id|>": writer.add_eot_token_id, "<|eom_id|>": writer.add_eom_token_id}
    for stop in stops:
        if tokens[stop] in adders:
            adders[tokens[stop]](stop)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)


def bpe_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """For each token of 2+ bytes, in rank order, the two parts tiktoken's BPE merges into it when it
    encodes the token's bytes alone: in any text it is made by that merge (merges inside its span
    never depend on what is outside), so these merges, in this order, encode like the ranks. A token
    BPE never reaches (its bytes end in 3+ parts) has none."""
    merges = (_last_merge(token, ranks) for token in sorted(ranks, key=ranks.get) if len(token) > 1)
    return [merge for merge in merges if merge is not None]


def _last_merge(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes] | None:
    """tiktoken's BPE on token's bytes (the lowest-ranked pair first, leftmost on ties), up to two parts."""
    none = 1 << 62  # the rank of a pair that makes no token
    parts = [token[i : i + 1] for i in range(len(token))]
    pair = [ranks.get(a + b, none) for a, b in zip(parts, parts[1:])]
    while len(parts) > 2:
        best = min(pair)
        if best == none:
            return None
        i = pair.index(best)
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
        del pair[i]
        if i < len(pair):
            pair[i] = ranks.get(parts[i] + parts[i + 1], none)
        if i > 0:
            pair[i - 1] = ranks.get(parts[i - 1] + parts[i], none)
    return parts[0], parts[1]
