"""Meta's Llama inference API, faithful to its checkpoints and runnable anywhere.

The names below are imported when first used, so `python -m llama.memory` (or any other
module run as a command) does not import the whole package first.
"""

import importlib

_EXPORTS = {
    "ChatPrediction": "llama.generation",
    "CompletionPrediction": "llama.generation",
    "Dialog": "llama.chat",
    "Llama": "llama.generation",
    "Message": "llama.chat",
    "ModelArgs": "llama.model",
    "Tokenizer": "llama.tokenizer",
    "Transformer": "llama.model",
    "sample_top_p": "llama.sampling",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'llama' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
