"""State dict -> model: check every key and shape, then assign the tensors on the target device."""

import torch
from torch import nn

from llama.pages import release_pages
from llama.progress import progress


def _describe_keys(keys) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:6]) + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")


def check_state_dict(model: nn.Module, state_dict: dict, source: str) -> None:
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
        got, want = tuple(tensor.shape), tuple(expected[key].shape)
        if got != want:
            split = [g < w and w % g == 0 for g, w in zip(got, want)] if len(got) == len(want) else []
            cause = ("the weights are a fraction of that size along one dimension: a shard file is "
                     "probably missing; check that every consolidated.NN.pth is there" if sum(split) == 1
                     else "the checkpoint's configuration does not match its weights")
            raise ValueError(f"checkpoint {source!r}: {key} has shape {got} but its configuration gives {want}; "
                             f"{cause}")


def move_state_dict(state_dict: dict, device: torch.device, dtype: torch.dtype,
                    keep: dict[str, torch.dtype] | None = None) -> dict:
    """Each floating tensor to device/dtype (the keys of `keep` to their own dtype), one at a time;
    tied tensors stay tied."""
    moved: dict[int, torch.Tensor] = {}
    out = {}
    keep = keep or {}
    for key, t in progress(state_dict.items(), total=len(state_dict), desc="loading", unit="tensor"):
        if id(t) not in moved:
            moved[id(t)] = t.to(device=device, dtype=keep.get(key, dtype) if t.is_floating_point() else t.dtype)
            if moved[id(t)].data_ptr() != t.data_ptr():
                release_pages(t)  # a converted copy: drop the file's pages we just read
        out[key] = moved[id(t)]
    return out


def load_weights(model: nn.Module, state_dict: dict, device: torch.device, dtype: torch.dtype,
                 source: str) -> nn.Module:
    """Check the state dict against a model built on the meta device, then assign its tensors
    (moved to device, floating ones to dtype) in place of the meta ones."""
    check_state_dict(model, state_dict, source)
    # Quantization scales take the dtype the quantized layers were built with.
    keep = {k: t.dtype for k, t in model.state_dict().items() if k.endswith((".scales", ".zeros"))}
    model.load_state_dict(move_state_dict(state_dict, device, dtype, keep), strict=True, assign=True)
    return model.requires_grad_(False).eval()
