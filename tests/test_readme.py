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
