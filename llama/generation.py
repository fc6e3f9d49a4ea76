"""Llama: build a model from a checkpoint, then generate, complete text and chat.

`Llama.build` is the pipeline, one step per line, each a function of the module that owns it:
files -> state dict -> model -> transforms -> loaded, prepared model. The token loop is
`llama.decode`; the options every method takes are declared once in `llama.options`.
"""

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Iterator
from typing import TypedDict

import torch

from llama import parallel
from llama.chat import Dialog, Message, encode_dialog
from llama.checkpoint import find_tokenizer, load_checkpoint, match_vocab, read_args
from llama.decode import Row, StopCheck, check_prompts, decode_batch
from llama.device import resolve_device, resolve_dtype
from llama.memory import param_count, preflight
from llama.model import Transformer
from llama.options import REQUIRED, BuildOptions, GenerationOptions, takes_options
from llama.prepare import compile_model, prepare_for_device
from llama.quant import is_quantized, plan, quantize_state_dict, stored_layers
from llama.quant_layers import quantize_model
from llama.streaming import RowText
from llama.threads import pick_threads
from llama.tokenizer import Tokenizer
from llama.weights import load_weights

log = logging.getLogger(__name__)

# Meta's order for the options Meta's methods have; every other option is keyword-only.
META_BUILD = ("ckpt_dir", "tokenizer_path", "max_seq_len", "max_batch_size", "model_parallel_size", "seed")
EXTRA_BUILD = ("device", "dtype", "quantize", "group_size", "compile", "memory_limit", "threads")
META_OPTIONS = ("temperature", "top_p", "max_gen_len", "logprobs", "echo")
EXTRA_OPTIONS = ("stop", "stop_token_ids", "seed")


class CompletionPrediction(TypedDict, total=False):
    generation: str
    tokens: list[str]  # not required
    logprobs: list[float]  # not required


class ChatPrediction(TypedDict, total=False):
    generation: Message
    tokens: list[str]  # not required
    logprobs: list[float]  # not required


def final(rows_by_step: Iterator[list[Row]]) -> list[Row]:
    """The rows after the last step (runs the generator to its end)."""
    rows: list[Row] = []
    for rows in rows_by_step:  # noqa: B007
        pass
    return rows


class Llama:
    @staticmethod
    @takes_options(BuildOptions, META_BUILD, EXTRA_BUILD, ckpt_dir=REQUIRED)
    def build(options: BuildOptions) -> "Llama":
        """Load a checkpoint and tokenizer and return a ready Llama.

        A build that will not fit the device's free memory (or `memory_limit`) raises ValueError
        before loading, listing settings that would fit. A checkpoint written by
        `python -m llama.quantize` loads as quantized without `quantize`.
        """
        start, o = time.time(), options
        dev = resolve_device(o.device, parallel.local_rank())
        resolve_dtype(o.dtype, dev)  # reject an unknown name before any work
        rank, world = parallel.setup(o.model_parallel_size, dev)
        if dev.type == "cpu":
            pick_threads(o.threads)
        torch.manual_seed(o.seed)
        tokenizer = Tokenizer(o.tokenizer_path or find_tokenizer(o.ckpt_dir))
        dtype = resolve_dtype(o.dtype, dev, param_count(read_args(o.ckpt_dir), tokenizer.n_words))
        args, state_dict = load_checkpoint(o.ckpt_dir, rank, world, dtype=dtype)
        args = dataclasses.replace(match_vocab(args, state_dict, tokenizer), max_seq_len=o.max_seq_len,
                                   max_batch_size=o.max_batch_size)
        stored = is_quantized(state_dict)
        mode, group_size = plan(state_dict, o.quantize, o.group_size, o.ckpt_dir)
        preflight(args, o.max_seq_len, o.max_batch_size, dtype, dev, mode, group_size, world, o.memory_limit)

        with torch.device("meta"):
            model = quantize_model(parallel.shard_model(Transformer(args), world), mode, group_size, dtype,
                                   stored_layers(state_dict) if stored else None)
        if mode and not stored:
            state_dict = quantize_state_dict(state_dict, mode, group_size, dtype, dev)
        load_weights(model, state_dict, dev, dtype, o.ckpt_dir)
        del state_dict
        parallel.add_collectives(prepare_for_device(model))
        model.setup_caches(o.max_batch_size, o.max_seq_len)
        if o.compile:
            compile_model(model, dev)
        log.info("loaded in %.2f s: %s on %s as %s%s", time.time() - start, o.ckpt_dir, dev, dtype,
                 f", {mode} weights" if mode else "")
        return Llama(model, tokenizer)

    def __init__(self, model: Transformer, tokenizer: Tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        self._lock = threading.Lock()  # the KV cache serves one generation at a time
        self._owner: int | None = None  # the thread whose generation holds it

    @contextlib.contextmanager
    def _exclusive(self):
        """Hold the model (its KV cache) for one generation. Other threads wait their turn; a second
        generation in the thread that holds it would wait for itself, so it is an error instead."""
        if self._owner == threading.get_ident():
            raise RuntimeError("a generation from this thread is still open (a stream neither finished nor "
                               "closed); finish it or call its close() before starting another")
        with self._lock:
            self._owner = threading.get_ident()
            try:
                yield
            finally:
                self._owner = None

    @property
    def device(self) -> torch.device:
        return self.model.tok_embeddings.weight.device

    # ------------------------------------------------------------------ tokens

    @torch.inference_mode()
    @takes_options(GenerationOptions, ("max_gen_len", *META_OPTIONS[:2], *META_OPTIONS[3:]), EXTRA_OPTIONS[1:])
    def generate(self, prompt_tokens: list[list[int]],
                 options: GenerationOptions) -> tuple[list[list[int]], list[list[float]] | None]:
        """Generate up to max_gen_len tokens after each prompt.

        Returns (tokens, logprobs) per prompt, as Meta's `generate` does. Generation of a
        row stops at any of the tokenizer's `stop_tokens` (EOS; for Llama 3 also `<|eom_id|>`
        and `<|eot_id|>`) or of `stop_token_ids`, which are not included in the output.
        With `echo`, the prompt tokens (and their logprobs; 0.0 for the first) come first.
        Batches larger than max_batch_size run in chunks.
        """
        rows = final(self.stream_tokens(prompt_tokens, options))
        return [r.tokens for r in rows], ([r.logprobs for r in rows] if options.logprobs else None)

    @torch.inference_mode()
    def stream_tokens(self, prompt_tokens: list[list[int]], options: GenerationOptions,
                      stop_check: StopCheck | None = None) -> Iterator[list[Row]]:
        """Like generate, but yields every row (a `llama.decode.Row`) after each decoding step.

        One generation runs at a time (they share the KV cache): calls from other threads wait;
        in the thread of an open stream, finish or close() it before starting another.

        `stop_check(i, row)`, called after a token is added to row i, returns True to finish
        that row (the token stays); the other rows go on.
        """
        max_seq_len = self.model.max_seq_len
        max_gen_len = max_seq_len - 1 if options.max_gen_len is None else options.max_gen_len
        check_prompts(prompt_tokens, max_gen_len, max_seq_len, self.model.vocab_size)
        longest = max(len(p) for p in prompt_tokens)
        if options.max_gen_len is not None and max_gen_len > max_seq_len - longest:
            log.warning("max_gen_len=%d does not fit max_seq_len=%d after a prompt of %d tokens: at most %d "
                        "tokens are generated there; raise --max_seq_len for more",
                        max_gen_len, max_seq_len, longest, max_seq_len - longest)
        options = dataclasses.replace(options, max_gen_len=max_gen_len)
        generator = None
        if options.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(options.seed)
        stop = {*self.tokenizer.stop_tokens, *options.stop_token_ids} - {-1}
        bs = self.model.max_batch_size
        finished: list[Row] = []
        with self._exclusive():
            for i in range(0, len(prompt_tokens), bs):
                check = None if stop_check is None else (lambda b, r, i=i: stop_check(i + b, r))
                for rows in decode_batch(self.model, prompt_tokens[i : i + bs], options, stop, generator, check):
                    yield finished + rows
                finished = finished + rows

    # ------------------------------------------------------------------ text

    @takes_options(GenerationOptions, META_OPTIONS, EXTRA_OPTIONS)
    def text_completion(self, prompts: list[str], options: GenerationOptions) -> list[CompletionPrediction]:
        """Complete each prompt.

        A row ends at a stop token of the tokenizer, any of `stop_token_ids`, or the first of the
        `stop` strings, which the returned text leaves out; the other rows go on.
        """
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings; for one prompt pass [prompt]")
        if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompts must be a list of strings, not {type(prompts).__name__} "
                            f"{str(prompts)[:40]!r}")
        return self._complete([self.tokenizer.encode(x, bos=True, eos=False) for x in prompts], options)

    @takes_options(GenerationOptions, META_OPTIONS[:4], EXTRA_OPTIONS)
    def chat_completion(self, dialogs: list[Dialog], options: GenerationOptions) -> list[ChatPrediction]:
        """Answer each dialog as the assistant, in the chat format of the tokenizer (Llama 3's
        header format or Llama 2's [INST] template; see `llama.chat.encode_dialog`).

        An answer ends at a stop token (for Llama 3, `<|eot_id|>` or `<|eom_id|>`), which the
        text leaves out; `stop` and `stop_token_ids` end it as in text_completion.
        """
        prompt_tokens = [encode_dialog(self.tokenizer, d) for d in dialogs]  # validates first
        preds = self._complete(prompt_tokens, options)
        return [{**p, "generation": {"role": "assistant", "content": p["generation"]}} for p in preds]

    @takes_options(GenerationOptions, META_OPTIONS[:3], ("echo", *EXTRA_OPTIONS))
    def stream_text_completion(self, prompt: str, options: GenerationOptions) -> Iterator[str]:
        """Yield the completion of one prompt as it is generated, in pieces of text.

        The pieces add up to exactly the text text_completion returns with the same arguments
        (with `echo`, the prompt's text comes first, spaced as the model's tokens decode).
        """
        yield from self._stream_one(self.tokenizer.encode(prompt, bos=True, eos=False), options)

    @takes_options(GenerationOptions, META_OPTIONS[:3], EXTRA_OPTIONS)
    def stream_chat_completion(self, dialog: Dialog, options: GenerationOptions) -> Iterator[str]:
        """Yield the assistant's answer to one dialog as it is generated, in pieces of text.

        The pieces add up to exactly the content chat_completion returns with the same arguments.
        """
        yield from self._stream_one(encode_dialog(self.tokenizer, dialog), options)

    def _row_texts(self, prompt_tokens: list[list[int]], options: GenerationOptions):
        texts = [RowText(self.tokenizer, list(options.stop), len(p) if options.echo else 0) for p in prompt_tokens]
        check = (lambda i, row: texts[i].update(row.tokens)) if options.stop else None
        return texts, check

    def _complete(self, prompt_tokens: list[list[int]], options: GenerationOptions) -> list[dict]:
        texts, check = self._row_texts(prompt_tokens, options)
        rows = final(self.stream_tokens(prompt_tokens, options, stop_check=check))
        preds = []
        for text, row in zip(texts, rows):
            text.update(row.tokens)
            pred = {"generation": text.text}
            if options.logprobs:
                pred["tokens"] = self.tokenizer.decode_pieces(row.tokens)
                pred["logprobs"] = row.logprobs
            preds.append(pred)
        return preds

    def _stream_one(self, tokens: list[int], options: GenerationOptions) -> Iterator[str]:
        """The new text of one prompt's row after every step, when there is any."""
        (text,), check = self._row_texts([tokens], options)
        for (row,) in self.stream_tokens([tokens], options, stop_check=check):
            text.update(row.tokens)
            if delta := text.delta(final=row.done):
                yield delta
