"""Llama 3 under model parallel: kv heads split or copied over 1-16 ranks (checked in one process,
rank by rank), and torchrun with 2 gloo processes == one process on the Llama 3 checkpoints."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, random_llama_weights
from llama.checkpoint import load_checkpoint
from llama.convert import convert
from llama.model import ModelArgs, Transformer
from llama.parallel import shard_model
from llama.weights import load_weights

# Greedy tokens compared: each step reads the 128,256 x 256 output matrix (fp32), ~10-50 ms here.
N_TOKENS = 64
# 16 query heads sharing 8 kv heads (70B's and 8B's ratio), tiny width.
KV8 = {"dim": 256, "n_layers": 1, "n_heads": 16, "n_kv_heads": 8, "multiple_of": 64, "norm_eps": 1e-05,
       "rope_theta": 500000.0, "use_scaled_rope": True, "vocab_size": 96}


@pytest.fixture(scope="module")
def kv8(tmp_path_factory):
    """KV8 in Meta's layout with one shard, and the same converted to 16 shards (kv heads copied)."""
    path = tmp_path_factory.mktemp("kv8") / "one"
    path.mkdir()
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(ModelArgs(**KV8)).state_dict().items()}
    torch.save(random_llama_weights(shapes, seed=2), path / "consolidated.00.pth")
    (path / "params.json").write_text(json.dumps(KV8))
    convert(str(path), str(path.parent / "mp16"), to="meta", model_parallel_size=16)
    return str(path), str(path.parent / "mp16")


def rank_model(ckpt: str, rank: int, world: int) -> Transformer:
    args, state_dict = load_checkpoint(ckpt, rank, world)
    args = ModelArgs(**{**vars(args), "max_seq_len": 32, "max_batch_size": 1})
    with torch.device("meta"):
        model = shard_model(Transformer(args), world)
    load_weights(model, state_dict, torch.device("cpu"), torch.float32, ckpt)  # strict keys and shapes
    model.setup_caches(1, 32)
    return model


def attention_output(model: Transformer, x: torch.Tensor) -> torch.Tensor:
    """The first layer's attention output (this rank's partial sum) for x (1, s, dim) at position 0."""
    pos, kv_len, mask = model._span(0, 1, x.shape[1], x.device)
    cos, sin = model.rope[:, : x.shape[1], None]  # (2, s, 1, d)
    layer = model.layers[0]
    return layer.attention(layer.attention_norm(x), pos, cos, sin, mask, kv_len)


@pytest.mark.parametrize("world", [1, 2, 4, 8, 16])
def test_kv_heads_split_or_copied_give_the_full_attention(kv8, world):
    """Ranks' partial attention outputs (what the all-reduce sums) add up to one process's output:
    with 16 ranks each kv head is copied to the two ranks whose query heads use it."""
    one, mp16 = kv8
    x = torch.randn(1, 12, KV8["dim"], generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        full = attention_output(rank_model(one, 0, 1), x)
        for ckpt in (one, mp16):  # read from 1 shard, or from 16 shards holding copies
            models = [rank_model(ckpt, r, world) for r in range(world)]
            assert models[-1].layers[0].attention.n_local_kv_heads == max(1, 8 // world)
            total = sum(attention_output(m, x) for m in models)
            torch.testing.assert_close(total, full, atol=1e-5, rtol=0)  # fp32 sums in another order


def test_kv_copies_on_16_ranks_are_meta_head_of_each_query_group(kv8):
    one, mp16 = kv8
    wk = load_checkpoint(one)[1]["layers.0.attention.wk.weight"]  # (8 heads * 16, dim)
    for rank in range(16):
        mine = load_checkpoint(mp16, rank, 16)[1]["layers.0.attention.wk.weight"]
        # Rank r holds query head r of 16; two query heads share a kv head: kv head r // 2.
        assert torch.equal(mine, wk[(rank // 2) * 16 : (rank // 2 + 1) * 16])
    # The 16-shard checkpoint read back whole equals the original, bit for bit.
    back = load_checkpoint(mp16)[1]
    assert all(torch.equal(back[k], v) for k, v in load_checkpoint(one)[1].items())


@pytest.fixture(scope="module")
def torchrun_llama3(tmp_path_factory, llama3_meta_ckpt, llama32_hf) -> dict:
    out = tmp_path_factory.mktemp("torchrun3") / "results.pt"
    specs = [f"{llama3_meta_ckpt}#{N_TOKENS}", f"{llama32_hf[0]}#{N_TOKENS}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "tests" / "mp_worker.py"), str(out), "-", *specs]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out, weights_only=True)


@pytest.mark.parametrize("which", ["meta", "hf"])
def test_torchrun_two_ranks_equal_one_process(torchrun_llama3, llama3_meta_ckpt, llama32_hf, which):
    """Meta layout: 2 query heads, 1 kv head (copied to both ranks); HF: 4 and 2 (split), tied."""
    sys.path.insert(0, str(REPO / "tests"))
    from mp_worker import run

    path = llama3_meta_ckpt if which == "meta" else llama32_hf[0]
    one, two = run(path, "-", max_gen_len=N_TOKENS), torchrun_llama3[f"{path}#{N_TOKENS}"]
    assert len(two["tokens"]) == N_TOKENS and two["tokens"] == one["tokens"]
    assert two["text"] == one["text"]
    # fp32 logits of two half sums vs one sum: order noise, scaled by these logits' size (up to ~60).
    torch.testing.assert_close(two["logits"], one["logits"], atol=2e-4, rtol=0)
