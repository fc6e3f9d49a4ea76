"""generate / text_completion on the real stories260K: golden text, logprobs, echo, ragged batches."""

import subprocess
import sys

import torch

from conftest import REPO, models_path

PROMPTS = ["Once upon a time", "The cat", "Lily and Ben went to the park. They saw a big", "One day", "Tom"]


def encode_all(llama, prompts):
    return [llama.tokenizer.encode(p, bos=True, eos=False) for p in prompts]


def teacher_forced_logprobs(llama, tokens: list[int]) -> list[float]:
    """log p(token i | tokens < i) from one full forward, for i >= 1."""
    with torch.inference_mode():
        logits = llama.model(torch.tensor([tokens]), 0)[0]  # (s, vocab)
    lp = torch.log_softmax(logits[:-1], dim=-1)
    return lp.gather(-1, torch.tensor(tokens[1:])[:, None])[:, 0].tolist()


def test_greedy_from_bos_equals_reference(stories, reference_text):
    out = stories.text_completion([""], temperature=0, max_gen_len=200)
    assert out[0]["generation"] == reference_text
    tokens, _ = stories.generate([[stories.tokenizer.bos_id]], max_gen_len=200, temperature=0)
    assert len(tokens[0]) == 200


def test_example_cli_prints_reference(reference_text, stories_tokenizer):
    cmd = [sys.executable, "example_text_completion.py", "--ckpt_dir", models_path("stories260K-meta"),
           "--tokenizer_path", stories_tokenizer, "--temperature", "0", "--max_seq_len", "512",
           "--max_gen_len", "200", "--prompts", "", "--stop_token_ids", "1", "--device", "cpu",
           "--dtype", "float32"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"> {reference_text}\n" in out.stdout


def test_example_cli_passes_quantize(reference_text, stories_tokenizer):
    cmd = [sys.executable, "example_text_completion.py", "--ckpt_dir", models_path("stories260K-meta"),
           "--tokenizer_path", stories_tokenizer, "--temperature", "0", "--max_seq_len", "128",
           "--max_gen_len", "40", "--prompts", "", "--device", "cpu", "--dtype", "float32",
           "--quantize", "int8", "--memory_limit", "4GB"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    generated = out.stdout.split("> ", 1)[1].split("\n\n====")[0]
    assert len(generated) > 100 and reference_text.startswith(generated)


def test_generated_logprobs_equal_teacher_forced(stories):
    prompts = encode_all(stories, PROMPTS[:2])
    tokens, lps = stories.generate(prompts, max_gen_len=30, temperature=0.8, top_p=0.95,
                                   logprobs=True, seed=3)
    for prompt, gen, lp in zip(prompts, tokens, lps):
        assert len(gen) == len(lp) > 0
        expected = teacher_forced_logprobs(stories, prompt + gen)[len(prompt) - 1 :]
        torch.testing.assert_close(torch.tensor(lp), torch.tensor(expected), atol=1e-4, rtol=0)


def test_echo_returns_prompt_with_shifted_logprobs(stories):
    prompt = encode_all(stories, ["Lily and Ben went to the park."])[0]
    tokens, lps = stories.generate([prompt], max_gen_len=10, temperature=0, logprobs=True, echo=True)
    assert tokens[0][: len(prompt)] == prompt and len(tokens[0]) == len(prompt) + 10
    assert lps[0][0] == 0.0  # the first token has no logprob, as in Meta's
    expected = teacher_forced_logprobs(stories, tokens[0])
    torch.testing.assert_close(torch.tensor(lps[0][1:]), torch.tensor(expected), atol=1e-4, rtol=0)


def test_scoring_without_generation_is_shifted(stories):
    """echo + max_gen_len=0 (Meta's no-generation branch scored token i with the wrong position)."""
    prompts = encode_all(stories, ["The dog ran to the tree.", "Tom had a red ball."])
    tokens, lps = stories.generate(prompts, max_gen_len=0, logprobs=True, echo=True)
    assert tokens == prompts
    for p, lp in zip(prompts, lps):
        assert lp[0] == 0.0 and len(lp) == len(p)
        torch.testing.assert_close(torch.tensor(lp[1:]), torch.tensor(teacher_forced_logprobs(stories, p)),
                                   atol=1e-4, rtol=0)
    # A prompt that fills the cache can still be scored.
    full = [stories.tokenizer.bos_id] + prompts[0][1:] * 200
    tokens, lps = stories.generate([full[:512]], max_gen_len=0, logprobs=True, echo=True)
    assert len(lps[0]) == 512


def test_ragged_batch_equals_each_prompt_alone(stories):
    prompts = encode_all(stories, PROMPTS)
    assert len({len(p) for p in prompts}) >= 4
    batch_tokens, batch_lps = stories.generate(prompts, max_gen_len=40, temperature=0, logprobs=True)
    for p, tokens, lps in zip(prompts, batch_tokens, batch_lps):
        alone_tokens, alone_lps = stories.generate([p], max_gen_len=40, temperature=0, logprobs=True)
        assert tokens == alone_tokens[0]
        torch.testing.assert_close(torch.tensor(lps), torch.tensor(alone_lps[0]), atol=1e-4, rtol=0)


def test_max_gen_len_is_per_prompt(stories):
    prompts = encode_all(stories, ["A", PROMPTS[2]])
    tokens, _ = stories.generate(prompts, max_gen_len=7, temperature=0)
    assert [len(t) for t in tokens] == [7, 7]


def test_batch_larger_than_max_batch_size_runs_in_chunks(stories_tokenizer, stories):
    from llama import Llama

    small = Llama.build(models_path("stories260K-meta"), stories_tokenizer, max_seq_len=128,
                        max_batch_size=2, device="cpu", dtype="float32")
    prompts = encode_all(small, PROMPTS + ["Sue", "Max saw"])
    tokens, _ = small.generate(prompts, max_gen_len=12, temperature=0)
    expected, _ = stories.generate(prompts, max_gen_len=12, temperature=0)
    assert len(tokens) == 7 and tokens == expected


def test_stop_token_freezes_only_that_row(stories):
    prompts = encode_all(stories, PROMPTS[:3])
    free, _ = stories.generate(prompts, max_gen_len=30, temperature=0)
    stop_id = free[0][5]  # a token row 0 produces early
    stopped, _ = stories.generate(prompts, max_gen_len=30, temperature=0, stop_token_ids=[stop_id])
    for row_free, row_stopped in zip(free, stopped):
        cut = row_free.index(stop_id) if stop_id in row_free else len(row_free)
        assert row_stopped == row_free[:cut]
    assert len(stopped[0]) == 5


def test_echo_keeps_eos_inside_prompt(stories):
    """Meta's echo output was cut at the first EOS even when it was part of the prompt."""
    tok = stories.tokenizer
    prompt = tok.encode("Tom had a ball.", bos=True, eos=True) + tok.encode("He", bos=True, eos=False)
    tokens, _ = stories.generate([prompt], max_gen_len=5, temperature=0, echo=True)
    assert tokens[0][: len(prompt)] == prompt and len(tokens[0]) == len(prompt) + 5


def test_sampling_is_seeded_per_call(stories):
    prompts = encode_all(stories, ["Once upon a time"])
    a, _ = stories.generate(prompts, max_gen_len=30, temperature=1.0, seed=7)
    b, _ = stories.generate(prompts, max_gen_len=30, temperature=1.0, seed=7)
    c, _ = stories.generate(prompts, max_gen_len=30, temperature=1.0, seed=8)
    assert a == b and a != c


def test_completion_prediction_shape(stories):
    out = stories.text_completion(["Once upon a time"], max_gen_len=5, temperature=0, logprobs=True)
    assert set(out[0]) == {"generation", "tokens", "logprobs"}
    assert len(out[0]["tokens"]) == len(out[0]["logprobs"]) == 5
    # Token strings keep their spaces (Meta's per-token decode dropped them).
    assert "".join(out[0]["tokens"]) == out[0]["generation"]


def test_compiled_model_gives_reference_text(stories_tokenizer, reference_text):
    """compile=True (torch.compile, C++ wrapper on CPU) decodes the same greedy story."""
    from llama import Llama

    llama = Llama.build(models_path("stories260K-meta"), stories_tokenizer, max_seq_len=256,
                        max_batch_size=2, device="cpu", dtype="float32", compile=True)
    out = llama.text_completion(["", ""], temperature=0, max_gen_len=200)
    assert [o["generation"] for o in out] == [reference_text] * 2
