"""Llama: build a model from a checkpoint, then generate, complete text and chat.

This is the one module that wires the pieces: device, process group, checkpoint, model,
tokenizer, sampling and the chat template.
"""

import logging
import math
import time
from collections.abc import Callable, Iterator
from typing import TypedDict

import torch

from llama import parallel
from llama import quantize as quant
from llama.chat import Dialog, Message, encode_dialog
from llama.checkpoint import find_tokenizer, load_checkpoint
from llama.device import resolve_device, resolve_dtype
from llama.model import Transformer
from llama.progress import progress
from llama.sampling import next_token
from llama.streaming import RowText, as_stop_list
from llama.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class CompletionPrediction(TypedDict, total=False):
    generation: str
    tokens: list[str]  # not required
    logprobs: list[float]  # not required


class ChatPrediction(TypedDict, total=False):
    generation: Message
    tokens: list[str]  # not required
    logprobs: list[float]  # not required


def _describe_keys(keys) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:6]) + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")


def check_state_dict(model: torch.nn.Module, state_dict: dict, source: str) -> None:
    """Raise ValueError naming missing, unexpected or mis-shaped keys."""
    expected = model.state_dict()
    missing = expected.keys() - state_dict.keys()
    unexpected = state_dict.keys() - expected.keys()
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_describe_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_describe_keys(unexpected)}")
        raise ValueError(f"checkpoint {source!r} does not match the model ({'; '.join(parts)})")
    for key, tensor in state_dict.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ValueError(
                f"checkpoint {source!r}: {key} has shape {tuple(tensor.shape)} but params give "
                f"{tuple(expected[key].shape)}; params.json does not match the weights"
            )


def move_state_dict(state_dict: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """Each floating tensor to device/dtype, one at a time; tied tensors stay tied."""
    moved: dict[int, torch.Tensor] = {}
    out = {}
    nbytes = sum(t.numel() * t.element_size() for t in state_dict.values())
    for key, t in progress(state_dict.items(), total=len(state_dict), desc="loading", unit="tensor",
                           show=nbytes > 2**30):
        if id(t) not in moved:
            moved[id(t)] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
            if moved[id(t)].data_ptr() != t.data_ptr():
                quant.release_pages(t)  # a converted copy: drop the file's pages we just read
        out[key] = moved[id(t)]
    return out


def last(iterable):
    """The final item of an iterable (runs a generator to its end)."""
    item = None
    for item in iterable:  # noqa: B007
        pass
    return item


class Llama:
    @staticmethod
    def build(
        ckpt_dir: str,
        tokenizer_path: str | None = None,
        max_seq_len: int = 512,
        max_batch_size: int = 8,
        model_parallel_size: int | None = None,
        seed: int = 1,
        device: str = "auto",
        dtype: str = "auto",
        quantize: str | None = None,
        group_size: int = quant.DEFAULT_GROUP_SIZE,
        compile: bool = False,
        memory_limit: str | int | None = None,
    ) -> "Llama":
        """Load a checkpoint and tokenizer and return a ready Llama.

        Args:
            ckpt_dir: a Meta or Hugging Face checkpoint directory, or a llama2.c .bin file.
            tokenizer_path: the sentencepiece tokenizer.model; by default the one beside the checkpoint.
            max_seq_len: longest prompt + generation the KV cache holds.
            max_batch_size: rows decoded together; larger batches run in chunks.
            model_parallel_size: number of model-parallel ranks; defaults to torchrun's WORLD_SIZE.
            seed: seed of the sampler, the same on every rank.
            device: "auto" (the local rank's CUDA GPU, then MPS, then CPU), or a torch device name.
            dtype: "auto", "float32", "float16" or "bfloat16" (of activations, and of weights
                that are not quantized).
            quantize: None, "int8" (per output channel) or "int4" (groups of group_size inputs):
                weight-only quantization of the linear layers while loading. A checkpoint written
                by `python -m llama.quantize` is loaded as quantized without this.
            group_size: int4 group size.
            compile: run the model through torch.compile.
            memory_limit: bytes or a size like "12GB" to check the build against, instead of
                the device's free memory. A build that will not fit raises ValueError before
                loading, listing settings that would fit.
        """
        start = time.time()
        if max_seq_len < 1 or max_batch_size < 1:
            raise ValueError(f"max_seq_len={max_seq_len} and max_batch_size={max_batch_size} must be >= 1")
        dev = resolve_device(device, parallel.local_rank())
        if isinstance(dtype, str):
            resolve_dtype(dtype, dev)  # reject an unknown name before any work
        quant.check_mode(quantize, group_size)
        rank, world = parallel.setup(model_parallel_size, dev)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        torch.manual_seed(seed)

        tokenizer_path = tokenizer_path or find_tokenizer(ckpt_dir)
        tokenizer = Tokenizer(tokenizer_path)
        args, state_dict = load_checkpoint(ckpt_dir, rank, world)
        n_vocab = state_dict["tok_embeddings.weight"].shape[0] if "tok_embeddings.weight" in state_dict else None
        if args.vocab_size == -1:
            args.vocab_size = n_vocab or tokenizer.n_words
        if tokenizer.n_words != args.vocab_size or (n_vocab and n_vocab != args.vocab_size):
            raise ValueError(
                f"tokenizer {tokenizer_path!r} has {tokenizer.n_words} words but the checkpoint "
                f"has a vocabulary of {n_vocab or args.vocab_size}; pass the tokenizer.model that "
                "came with this checkpoint as --tokenizer_path"
            )
        args.max_seq_len, args.max_batch_size = max_seq_len, max_batch_size
        n_params = sum(t.numel() for t in state_dict.values()) * world
        stored = quant.is_quantized(state_dict)
        if stored and quantize and (quantize != stored or quant.group_size_of(state_dict) != group_size):
            raise ValueError(f"{ckpt_dir!r} is already quantized ({stored}); leave quantize unset")
        mode = stored or quantize
        if stored:
            group_size = quant.group_size_of(state_dict)
        dt = resolve_dtype(dtype, dev, n_params)
        from llama.memory import preflight  # here, so `python -m llama.memory` runs without a warning

        preflight(args, max_seq_len, max_batch_size, dt, dev, mode, group_size, world, memory_limit)

        with torch.device("meta"):
            model = Transformer(args)
            if mode:
                quant.convert_linears(model, mode, group_size, dt)
        if mode and not stored:
            state_dict = quant.quantize_state_dict(state_dict, mode, group_size, dt, dev)
        check_state_dict(model, state_dict, ckpt_dir)
        model.load_state_dict(move_state_dict(state_dict, dev, dt), strict=True, assign=True)
        del state_dict
        quant.prepare_for_device(model)
        model.requires_grad_(False).eval()
        model.setup_caches(max_batch_size, max_seq_len)
        if compile:
            model.static_kv = True
            # Guards on the module's attributes cost ~0.1 ms a step; nothing changes them after build.
            options = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
            if dev.type == "cpu":
                # A C++ wrapper instead of Python around the kernels: stories260K decode step
                # 0.62 -> 0.47 ms on the 2-core test machine.
                options["cpp_wrapper"] = True
            model.compile(mode="reduce-overhead" if dev.type == "cuda" else None, options=options)
        log.info("loaded in %.2f s: %s on %s as %s%s", time.time() - start, ckpt_dir, dev, dt,
                 f", {mode} weights" if mode else "")
        return Llama(model, tokenizer)

    def __init__(self, model: Transformer, tokenizer: Tokenizer):
        self.model = model
        self.tokenizer = tokenizer

    @property
    def device(self) -> torch.device:
        return self.model.tok_embeddings.weight.device

    # ------------------------------------------------------------------ token generation

    @torch.inference_mode()
    def generate(
        self,
        prompt_tokens: list[list[int]],
        max_gen_len: int,
        temperature: float = 0.6,
        top_p: float = 0.9,
        logprobs: bool = False,
        echo: bool = False,
        stop_token_ids: list[int] | None = None,
        seed: int | None = None,
    ) -> tuple[list[list[int]], list[list[float]] | None]:
        """Generate up to max_gen_len tokens after each prompt.

        Returns (tokens, logprobs) per prompt, as Meta's `generate` does. Generation of a
        row stops at EOS or any of `stop_token_ids` (not included in the output).
        With `echo`, the prompt tokens (and their logprobs; 0.0 for the first) come first.
        Batches larger than max_batch_size run in chunks. `seed` seeds this call's sampler.
        """
        rows = last(self.stream_tokens(prompt_tokens, max_gen_len, temperature, top_p,
                                       logprobs, echo, stop_token_ids, seed))
        return [r["tokens"] for r in rows], ([r["logprobs"] for r in rows] if logprobs else None)

    @torch.inference_mode()
    def stream_tokens(
        self,
        prompt_tokens: list[list[int]],
        max_gen_len: int,
        temperature: float = 0.6,
        top_p: float = 0.9,
        logprobs: bool = False,
        echo: bool = False,
        stop_token_ids: list[int] | None = None,
        seed: int | None = None,
        stop_check: Callable[[int, dict], bool] | None = None,
    ) -> Iterator[list[dict]]:
        """Like generate, but yields the state of every row after each decoding step.

        Each row is a dict with "tokens", "logprobs" (as generate returns them) and "done".
        `stop_check(i, row)`, called after a token is added to row i, returns True to finish
        that row (the token stays); the other rows go on.
        """
        self._check_prompts(prompt_tokens, max_gen_len)
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        stop = {self.tokenizer.eos_id, *(stop_token_ids or [])} - {-1}
        bs = self.model.max_batch_size
        finished: list[dict] = []
        for i in range(0, len(prompt_tokens), bs):
            chunk = prompt_tokens[i : i + bs]
            check = None if stop_check is None else (lambda b, r, i=i: stop_check(i + b, r))
            for rows in self._generate_batch(chunk, max_gen_len, temperature, top_p,
                                             logprobs, echo, stop, generator, check):
                yield finished + rows
            finished = finished + rows

    def _check_prompts(self, prompt_tokens: list[list[int]], max_gen_len: int) -> None:
        if not prompt_tokens:
            raise ValueError("no prompts given")
        if max_gen_len < 0:
            raise ValueError(f"max_gen_len={max_gen_len} must be >= 0")
        max_seq_len, vocab = self.model.max_seq_len, self.model.vocab_size
        for i, p in enumerate(prompt_tokens):
            if len(p) == 0:
                raise ValueError(f"prompt {i} has no tokens; encode it with bos=True")
            if len(p) > max_seq_len or (len(p) == max_seq_len and max_gen_len > 0):
                raise ValueError(
                    f"prompt {i} has {len(p)} tokens, which leaves no room to generate within "
                    f"max_seq_len={max_seq_len}; raise --max_seq_len or shorten the prompt"
                )
            bad = [t for t in p if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"prompt {i} has token ids {bad[:5]} outside the vocabulary 0..{vocab - 1}")

    def _generate_batch(self, prompts, max_gen_len, temperature, top_p, logprobs, echo, stop, generator,
                        stop_check=None):
        """Prefill all prompts in one forward, then decode; yields the rows after every step."""
        model, dev = self.model, self.device
        bsz = len(prompts)
        lens = [len(p) for p in prompts]
        budgets = [min(max_gen_len, model.max_seq_len - n) for n in lens]
        # Right-padded prompts; the filler is a valid id that attention never sees (causal mask).
        tokens = torch.zeros((bsz, max(lens)), dtype=torch.long, device=dev)
        for b, p in enumerate(prompts):
            tokens[b, : len(p)] = torch.tensor(p, dtype=torch.long, device=dev)
        last = torch.tensor(lens, device=dev) - 1
        rows = [{"tokens": list(p) if echo else [], "logprobs": [], "done": budgets[b] == 0}
                for b, p in enumerate(prompts)]

        if logprobs and echo:
            logits = model(tokens, 0)  # (b, s, vocab)
            lp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, tokens[:, 1:, None])[..., 0]
            for b, n in enumerate(lens):
                rows[b]["logprobs"] = [0.0] + lp[b, : n - 1].tolist()
            logits = logits[torch.arange(bsz, device=dev), last]  # (b, vocab)
        elif max_gen_len > 0:
            logits = model(tokens, 0, logits_pos=last)[:, 0]  # (b, vocab)

        if all(r["done"] for r in rows):
            yield rows
            return
        n_gen = [0] * bsz
        for _ in range(max(budgets)):
            if not math.isfinite(logits.sum().item()):  # one reduction: 70 us less a step than isfinite().all()
                raise FloatingPointError(
                    f"the model produced NaN/inf logits in {model.tok_embeddings.weight.dtype}; "
                    "try --dtype float32 or bfloat16"
                )
            cur = next_token(logits, temperature, top_p, generator)  # (b,)
            if logprobs:
                lp = torch.log_softmax(logits, dim=-1).gather(-1, cur[:, None])[:, 0].tolist()
            for b, t in enumerate(cur.tolist()):
                r = rows[b]
                if r["done"]:
                    continue
                if t in stop:
                    r["done"] = True
                    continue
                r["tokens"].append(t)
                if logprobs:
                    r["logprobs"].append(lp[b])
                n_gen[b] += 1
                r["done"] = n_gen[b] >= budgets[b] or (stop_check is not None and stop_check(b, r))
            yield rows
            if all(r["done"] for r in rows):
                return
            # A row's newest token goes at len + n_gen - 1. Finished rows are frozen: their
            # (ignored) step rewrites their last prompt slot, which they no longer read.
            step_pos = [n - 1 if r["done"] else n + g - 1 for n, g, r in zip(lens, n_gen, rows)]
            logits = model(cur[:, None], torch.tensor(step_pos, device=dev))[:, 0]  # (b, vocab)

    # ------------------------------------------------------------------ text

    def text_completion(
        self,
        prompts: list[str],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: int | None = None,
        logprobs: bool = False,
        echo: bool = False,
        stop_token_ids: list[int] | None = None,
        seed: int | None = None,
        stop: str | list[str] | None = None,
    ) -> list[CompletionPrediction]:
        """Complete each prompt; max_gen_len defaults to max_seq_len - 1.

        A row ends at EOS, any of `stop_token_ids`, or the first of the `stop` strings, which
        the returned text leaves out; the other rows go on.
        """
        prompt_tokens = [self.tokenizer.encode(x, bos=True, eos=False) for x in prompts]
        return self._complete(prompt_tokens, temperature, top_p, max_gen_len, logprobs, echo,
                              stop_token_ids, seed, stop)

    def chat_completion(
        self,
        dialogs: list[Dialog],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: int | None = None,
        logprobs: bool = False,
        seed: int | None = None,
        stop: str | list[str] | None = None,
        stop_token_ids: list[int] | None = None,
    ) -> list[ChatPrediction]:
        """Answer each dialog as the assistant, using the Llama 2 chat template.

        `stop` and `stop_token_ids` end an answer as in text_completion.
        """
        prompt_tokens = [encode_dialog(self.tokenizer, d) for d in dialogs]  # validates first
        preds = self._complete(prompt_tokens, temperature, top_p, max_gen_len, logprobs, False,
                               stop_token_ids, seed, stop)
        return [{**p, "generation": {"role": "assistant", "content": p["generation"]}} for p in preds]

    def stream_text_completion(
        self,
        prompt: str,
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: int | None = None,
        stop: str | list[str] | None = None,
        stop_token_ids: list[int] | None = None,
        seed: int | None = None,
        echo: bool = False,
    ) -> Iterator[str]:
        """Yield the completion of one prompt as it is generated, in pieces of text.

        The pieces add up to exactly the text text_completion returns with the same arguments
        (with `echo`, the prompt's text comes first, spaced as the model's tokens decode).
        """
        tokens = self.tokenizer.encode(prompt, bos=True, eos=False)
        yield from self._stream_one(tokens, temperature, top_p, max_gen_len, stop, stop_token_ids, seed, echo)

    def stream_chat_completion(
        self,
        dialog: Dialog,
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: int | None = None,
        stop: str | list[str] | None = None,
        stop_token_ids: list[int] | None = None,
        seed: int | None = None,
    ) -> Iterator[str]:
        """Yield the assistant's answer to one dialog as it is generated, in pieces of text.

        The pieces add up to exactly the content chat_completion returns with the same arguments.
        """
        tokens = encode_dialog(self.tokenizer, dialog)
        yield from self._stream_one(tokens, temperature, top_p, max_gen_len, stop, stop_token_ids, seed, False)

    def _row_texts(self, prompt_tokens, echo, stop):
        stop = as_stop_list(stop)
        texts = [RowText(self.tokenizer, stop, len(p) if echo else 0) for p in prompt_tokens]
        check = (lambda i, row: texts[i].update(row["tokens"])) if stop else None
        return texts, check

    def _complete(self, prompt_tokens, temperature, top_p, max_gen_len, logprobs, echo,
                  stop_token_ids, seed, stop) -> list[dict]:
        if max_gen_len is None:
            max_gen_len = self.model.max_seq_len - 1
        texts, check = self._row_texts(prompt_tokens, echo, stop)
        rows = last(self.stream_tokens(prompt_tokens, max_gen_len, temperature, top_p, logprobs,
                                       echo, stop_token_ids, seed, stop_check=check))
        preds = []
        for text, row in zip(texts, rows):
            text.update(row["tokens"])
            pred = {"generation": text.text}
            if logprobs:
                pred["tokens"] = self.tokenizer.decode_pieces(row["tokens"])
                pred["logprobs"] = row["logprobs"]
            preds.append(pred)
        return preds

    def _stream_one(self, tokens, temperature, top_p, max_gen_len, stop, stop_token_ids, seed, echo):
        """The new text of one prompt's row after every step, when there is any."""
        if max_gen_len is None:
            max_gen_len = self.model.max_seq_len - 1
        (text,), check = self._row_texts([tokens], echo, stop)
        for (row,) in self.stream_tokens([tokens], max_gen_len, temperature, top_p, echo=echo,
                                         stop_token_ids=stop_token_ids, seed=seed, stop_check=check):
            text.update(row["tokens"])
            if delta := text.delta(final=row["done"]):
                yield delta
