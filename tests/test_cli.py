"""The `llama` command after `pip install .`: help for every subcommand, and a streamed completion."""

import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, models_path

SUBCOMMANDS = ["complete", "chat", "download"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """`pip install .` of a copy of the project into a fresh folder; returns (llama script, env)."""
    root = tmp_path_factory.mktemp("install")
    src, target = root / "src", root / "site"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", "tests", "__pycache__", "*.egg-info", "build"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(target), str(src)], check=True, capture_output=True, timeout=180)
    env = {**os.environ, "PYTHONPATH": str(target), "OMP_NUM_THREADS": "1"}
    return str(target / "bin" / "llama"), env


def run(cmd, env, **kwargs):
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd="/", timeout=120, **kwargs)


def test_help_lists_subcommands(installed):
    script, env = installed
    proc = run([script, "--help"], env)
    assert proc.returncode == 0, proc.stderr
    for name in SUBCOMMANDS + ["convert"]:
        assert f"\n    {name} " in proc.stdout, proc.stdout


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_subcommand_help(installed, name):
    script, env = installed
    proc = run([script, name, "--help"], env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: llama {name}") and "--log_level" in proc.stdout


def test_complete_streams_reference_text(installed, reference_text):
    script, env = installed
    proc = run([script, "complete", "--ckpt_dir", models_path("stories260K-meta"), "--tokenizer_path",
                models_path("stories260K", "tok512.model"), "", "--temperature", "0",
                "--max_gen_len", "200", "--device", "cpu"], env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == reference_text + "\n"


def test_user_error_is_one_line(installed, tmp_path):
    script, env = installed
    proc = run([script, "complete", "--ckpt_dir", str(tmp_path / "missing"), "hi"], env)
    assert proc.returncode != 0
    assert proc.stderr.strip().startswith("error:") and "Traceback" not in proc.stderr


def test_optional_commands_are_delegated(tmp_path, monkeypatch, capsys):
    from llama import cli

    (tmp_path / "fake_convert.py").write_text(
        "import sys\n\nif __name__ == '__main__':\n    print('converted', *sys.argv[1:])\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(cli, "OPTIONAL_COMMANDS", {"convert": "fake_convert", "bench": "no_such_module"})
    monkeypatch.setattr(sys, "argv", ["llama"])
    cli.main(["convert", "model_dir", "--size", "2"])
    assert capsys.readouterr().out == "converted model_dir --size 2\n"
    with pytest.raises(SystemExit, match="llama bench is not available"):
        cli.main(["bench"])
