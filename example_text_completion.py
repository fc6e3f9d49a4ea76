"""Complete text prompts with a Llama checkpoint (Meta's flags, plus device/dtype and your own prompts).

    python example_text_completion.py --ckpt_dir llama-2-7b/ --tokenizer_path tokenizer.model
    torchrun --nproc_per_node 2 example_text_completion.py --ckpt_dir llama-2-13b/ ...
    python example_text_completion.py --ckpt_dir Llama-2-7b-hf/      # tokenizer.model beside it
    python example_text_completion.py --ckpt_dir stories15M.bin --tokenizer_path tokenizer.model
    python example_text_completion.py --ckpt_dir Llama3.2-1B/        # Llama 3.x: the same flags

--ckpt_dir takes a Meta or Hugging Face directory or a llama2.c .bin file; --tokenizer_path
defaults to the tokenizer.model (else tokenizer.json) beside it.
"""

from llama import flags
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


def parser() -> flags.Parser:
    p = flags.Parser(description="Print a completion of each prompt (Meta's demo prompts unless --prompts is "
                     "given). Flags are checked before anything loads.")
    flags.generation_flags(p, max_seq_len=128, max_batch_size=4, max_gen_len=64)
    p.add_argument("--prompts", action=flags.ListValue, help='one prompt, or a list: \'["a", "b"]\'')
    p.add_argument("--stream", action="store_true", help="print each completion as it is generated")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    generator, options = flags.start(args)
    prompts = DEMO_PROMPTS if args.prompts is None else args.prompts
    if args.stream:
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
    flags.run(main)
