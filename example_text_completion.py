"""Complete text prompts with a Llama checkpoint (Meta's flags, plus device/dtype and your own prompts).

    python example_text_completion.py --ckpt_dir llama-2-7b/ --tokenizer_path tokenizer.model
    torchrun --nproc_per_node 2 example_text_completion.py --ckpt_dir llama-2-13b/ ...
    python example_text_completion.py --ckpt_dir Llama-2-7b-hf/      # tokenizer.model beside it
    python example_text_completion.py --ckpt_dir stories15M.bin --tokenizer_path tokenizer.model

--ckpt_dir takes a Meta or Hugging Face directory or a llama2.c .bin file; --tokenizer_path
defaults to the tokenizer.model beside it.
"""

import fire

from llama import Llama
from llama.parallel import rank

DEMO_PROMPTS = [
    # For these prompts, the expected answer is the natural continuation of the prompt
    "I believe the meaning of life is",
    "Simply put, the theory of relativity states that ",
    """A brief message congratulating the team on the launch:

        Hi everyone,

        I just """,
    # Few shot prompt (providing a few examples before asking model to complete more);
    """Translate English to French:

        sea otter => loutre de mer
        peppermint => menthe poivrée
        plush girafe => girafe peluche
        cheese =>""",
]


def as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def main(
    ckpt_dir: str,
    tokenizer_path: str | None = None,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_seq_len: int = 128,
    max_gen_len: int = 64,
    max_batch_size: int = 4,
    device: str = "auto",
    dtype: str = "auto",
    quantize: str | None = None,
    compile: bool = False,
    memory_limit: str | None = None,
    prompts: str | list[str] | None = None,
    stop_token_ids: int | list[int] | None = None,
    seed: int = 1,
    stop: str | list[str] | None = None,
    stream: bool = False,
):
    """Print a completion of each prompt (Meta's demo prompts unless --prompts is given).

    --prompts takes one string or a list ('["a", "b"]'); --stop_token_ids adds stop tokens
    to EOS (stories models end a story with BOS: --stop_token_ids 1); --stop ends a completion
    at a string. --quantize int8|int4, --compile and --memory_limit 12GB are passed to
    Llama.build. --stream prints each completion as it is generated, one prompt at a time.
    """
    generator = Llama.build(
        ckpt_dir=ckpt_dir,
        tokenizer_path=tokenizer_path,
        max_seq_len=max_seq_len,
        max_batch_size=max_batch_size,
        seed=seed,
        device=device,
        dtype=dtype,
        quantize=quantize,
        compile=compile,
        memory_limit=memory_limit,
    )
    prompts = DEMO_PROMPTS if prompts is None else [str(p) for p in as_list(prompts)]
    options = dict(max_gen_len=max_gen_len, temperature=temperature, top_p=top_p, stop=stop,
                   stop_token_ids=[int(t) for t in as_list(stop_token_ids)])
    if stream:
        for prompt in prompts:
            pieces = generator.stream_text_completion(prompt, **options)
            if rank() == 0:
                print(prompt)
                print("> ", end="", flush=True)
            for piece in pieces:
                if rank() == 0:
                    print(piece, end="", flush=True)
            if rank() == 0:
                print("\n\n==================================\n")
        return
    results = generator.text_completion(prompts, **options)
    if rank() != 0:
        return
    for prompt, result in zip(prompts, results):
        print(prompt)
        print(f"> {result['generation']}")
        print("\n==================================\n")


if __name__ == "__main__":
    fire.Fire(main)
