"""Meta's Llama 2 inference API, faithful to its checkpoints and runnable anywhere."""

from llama.chat import Dialog, Message
from llama.generation import ChatPrediction, CompletionPrediction, Llama
from llama.model import ModelArgs, Transformer
from llama.sampling import sample_top_p
from llama.tokenizer import Tokenizer

__all__ = [
    "ChatPrediction",
    "CompletionPrediction",
    "Dialog",
    "Llama",
    "Message",
    "ModelArgs",
    "Tokenizer",
    "Transformer",
    "sample_top_p",
]
