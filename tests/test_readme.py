"""The README's set-up and test block is what CI runs, character for character."""

import re

from conftest import REPO


def readme_block() -> str:
    readme = (REPO / "README.md").read_text()
    match = re.search(r"## Set up and test.*?```bash\n(.*?)```", readme, re.S)
    assert match, "README.md has no ```bash block under '## Set up and test'"
    return match.group(1)


def test_ci_runs_the_readme_block_as_written():
    ci = (REPO / ".ci" / "run").read_text()
    match = re.search(r"# --- README: Set up and test ---\n(.*?)# --- end ---\n", ci, re.S)
    assert match, ".ci/run has no README block between its markers"
    assert match.group(1) == readme_block()


def test_readme_block_installs_the_cpu_torch_first():
    lines = readme_block().splitlines()
    assert lines[1].startswith("pip install torch==") and "python -m pytest" in lines[-1]


def test_readme_lists_llama3_commands_that_parse():
    """The Llama 3 block: every `llama` command and example line parses with today's flags, and
    every model id it downloads is one `llama download` knows."""
    import shlex

    import example_chat_completion
    import example_text_completion
    from llama import download
    from llama.cli import parser

    readme = (REPO / "README.md").read_text()
    block = re.search(r"## Llama 3, 3.1 and 3.2.*?```bash\n(.*?)```", readme, re.S).group(1)
    lines = []
    for line in block.splitlines():
        argv = shlex.split(line, comments=True)
        argv = argv[3:] if argv[0] == "torchrun" else argv  # torchrun --nproc_per_node N
        lines.append(argv[1:] if argv[0] == "python" and argv[1].endswith(".py") else argv)
    commands = {argv[0] for argv in lines}
    assert {"llama", "example_chat_completion.py", "example_text_completion.py", "python"} <= commands
    top = parser()
    for argv in lines:
        if argv[0] == "llama":
            args = top.commands[argv[1]].parse_args(argv[2:]) if argv[1] != "convert" else None
            if argv[1] == "download":
                assert set(args.models) <= set(download.LLAMA3_MODELS)
        elif argv[0].startswith("example_"):
            module = example_chat_completion if "chat" in argv[0] else example_text_completion
            module.parser().parse_args(argv[1:])
    assert "llama download Llama3.2-1B-Instruct" in block and "llama chat --ckpt_dir Llama3.2-1B-Instruct/" in block
