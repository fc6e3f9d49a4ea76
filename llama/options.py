"""The options of a build and of generation, declared once.

`Llama.build` and the generation methods take their options through `takes_options`, which
gives each method Meta's positional order for the options Meta has and makes every other option
keyword-only; the CLIs and the examples make their flags from the same fields (`llama.flags`).
"""

import dataclasses
import functools
import inspect
import math
from dataclasses import dataclass, field

from llama.quant import DEFAULT_GROUP_SIZE, MODES

REQUIRED = inspect.Parameter.empty  # a takes_options default that makes the parameter required


def option(default, help: str, **flag):
    """A dataclass field with the help text its CLI flag shows (and argparse settings, if any)."""
    return field(default=default, metadata={"help": help, **flag})


@dataclass(frozen=True)
class BuildOptions:
    """What `Llama.build` takes."""

    ckpt_dir: str = option(None, "a Meta or Hugging Face checkpoint directory, or a llama2.c .bin or .gguf file")
    tokenizer_path: str | None = option(None, "the tokenizer.model or tokenizer.json; by default the one "
                                         "beside the checkpoint")
    max_seq_len: int = option(512, "longest prompt + generation the KV cache holds", type=int)
    max_batch_size: int = option(8, "rows decoded together; larger batches run in chunks", type=int)
    model_parallel_size: int | None = option(None, "model-parallel ranks; by default torchrun's WORLD_SIZE",
                                             type=int)
    seed: int = option(1, "seed of the sampler, the same on every rank", type=int)
    device: str = option("auto", "auto (the local rank's CUDA GPU, then MPS, then CPU), cpu, cuda, cuda:N or mps")
    dtype: str = option("auto", "auto, float32, float16 or bfloat16 (activations, and weights not quantized)")
    quantize: str | None = option(None, "int8 (per output channel) or int4 (groups of --group_size inputs): "
                                  "weight-only quantization while loading", choices=MODES)
    group_size: int = option(DEFAULT_GROUP_SIZE, "int4 group size (32 keeps small models closer to float)",
                             type=int)
    compile: bool = option(False, "run the model through torch.compile")
    threads: int | None = option(None, "CPU threads; by default the cores other processes leave idle "
                                 "(OMP_NUM_THREADS when set)", type=int)
    memory_limit: str | int | None = option(None, "check the build against this size (e.g. 12GB) instead "
                                            "of the free memory")

    def __post_init__(self):
        _check_int(self, "max_seq_len", 1)
        _check_int(self, "max_batch_size", 1)
        _check_int(self, "group_size", 2)
        if self.model_parallel_size is not None:
            _check_int(self, "model_parallel_size", 1)
        if self.threads is not None:
            _check_int(self, "threads", 1)
        _check_int(self, "seed")
        if self.quantize is not None and self.quantize not in MODES:
            raise ValueError(f"unknown quantize={self.quantize!r}; pass quantize='int8', 'int4' or None")


@dataclass(frozen=True)
class GenerationOptions:
    """How tokens are generated; what the generation methods take besides their prompts."""

    temperature: float = option(0.6, "0 for greedy decoding", type=float)
    top_p: float = option(0.9, "nucleus sampling: sample from the smallest set of tokens with this mass",
                          type=float)
    max_gen_len: int | None = option(None, "most tokens to generate; by default up to max_seq_len", type=int)
    logprobs: bool = option(False, "return the log-probability of every generated token")
    echo: bool = option(False, "include the prompt (and its logprobs) in the result")
    stop: tuple[str, ...] = option((), "strings that end a row's text (left out of it)", list=str)
    stop_token_ids: tuple[int, ...] = option((), "token ids that end a row besides EOS (stories models: 1)",
                                             list=int)
    seed: int | None = option(None, "seed of this call's sampler", type=int)

    def __post_init__(self):
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature={self.temperature!r} must be a finite number >= 0 (0: greedy)")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0 <= self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p!r} must be a number from 0 to 1")
        if self.max_gen_len is not None:
            _check_int(self, "max_gen_len", 0)
        if self.seed is not None:
            _check_int(self, "seed")
        stop = [self.stop] if isinstance(self.stop, str) else self.stop or ()
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
            raise TypeError(f"stop={self.stop!r} must be a string or a list of strings")
        ids = [self.stop_token_ids] if isinstance(self.stop_token_ids, int) else self.stop_token_ids or ()
        if not isinstance(ids, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise TypeError(f"stop_token_ids={self.stop_token_ids!r} must be a list of token ids (ints)")
        object.__setattr__(self, "stop", tuple(s for s in stop if s))
        object.__setattr__(self, "stop_token_ids", tuple(ids))


def _check_int(options, name: str, minimum: int | None = None) -> None:
    value = getattr(options, name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}={value!r} must be an integer")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}={value} must be >= {minimum}")


def takes_options(cls, positional: tuple[str, ...], keyword: tuple[str, ...], **defaults):
    """Decorator: the function takes its own leading parameters, then the `positional` fields of
    the options dataclass `cls` in that order, then the `keyword` fields keyword-only; its body
    receives them as one validated `cls` instance in its parameter `options`. `defaults` overrides
    field defaults. The wrapper's signature and docstring list every option."""
    fields = {f.name: f for f in dataclasses.fields(cls)}

    def param(name, kind):
        return inspect.Parameter(name, kind, default=defaults.get(name, fields[name].default),
                                 annotation=fields[name].type)

    def decorate(fn):
        own = [p for p in inspect.signature(fn).parameters.values() if p.name != "options"]
        params = own + [param(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in positional] \
            + [param(n, inspect.Parameter.KEYWORD_ONLY) for n in keyword]
        signature = inspect.Signature(params, return_annotation=inspect.signature(fn).return_annotation)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            values = dict(bound.arguments)
            options = cls(**{n: values.pop(n) for n in (*positional, *keyword)})
            return fn(**values, options=options)

        wrapper.__signature__ = signature
        lines = [f"    {n}: {fields[n].metadata['help']}" for n in (*positional, *keyword)]
        wrapper.__doc__ = (fn.__doc__ or "").rstrip() + "\n\nOptions:\n" + "\n".join(lines) + "\n"
        return wrapper

    return decorate
