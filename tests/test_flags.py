"""Every command checks its flags before any work: exit 2 and a line about the flag, not the checkpoint."""

import importlib.util

import pytest

from conftest import REPO
from llama import cli, convert, memory, quantize


def example(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture
def broken_ckpt(tmp_path):
    """A folder that would fail to load: a message about it means the flags were not checked first."""
    (tmp_path / "params.json").write_text("{not json")
    return str(tmp_path)


def commands(ckpt: str) -> dict:
    return {
        "example_text_completion": (example("example_text_completion"), ["--ckpt_dir", ckpt]),
        "example_chat_completion": (example("example_chat_completion"), ["--ckpt_dir", ckpt]),
        "llama complete": (cli._main, ["complete", "--ckpt_dir", ckpt, "hi"]),
        "llama chat": (cli._main, ["chat", "--ckpt_dir", ckpt]),
        "llama download": (cli._main, ["download", "stories260K"]),
        "llama convert": (convert.main, [ckpt, ckpt + "-out"]),
        "python -m llama.memory": (memory.main, ["--ckpt_dir", ckpt]),
        "python -m llama.quantize": (quantize.main, [ckpt, ckpt + "-out"]),
    }


@pytest.mark.parametrize("name", sorted(commands("x")))
def test_unknown_flag_and_stray_word_exit_2_before_any_work(name, broken_ckpt, capsys):
    main, argv = commands(broken_ckpt)[name]
    extras = [["--max_new_tokens", "5"]]
    if name != "llama download":  # its positionals are the models to download
        extras.append(["stray", "words"])
    for extra in extras:
        with pytest.raises(SystemExit) as stop:
            main(argv + extra)
        assert stop.value.code == 2, name
        err = capsys.readouterr().err
        assert "unrecognized arguments" in err and extra[0] in err, err
        assert "params.json" not in err and "not valid JSON" not in err


def test_misspelled_flag_gets_a_suggestion(capsys):
    with pytest.raises(SystemExit):
        cli._main(["complete", "--ckpt_dir", "x", "hi", "--max_gen_le", "5"])
    assert "did you mean --max_gen_len?" in capsys.readouterr().err


def test_wrong_type_and_choice_exit_2(capsys):
    for argv in (["complete", "--ckpt_dir", "x", "--temperature", "hot"],
                 ["complete", "--ckpt_dir", "x", "--quantize", "int3"]):
        with pytest.raises(SystemExit) as stop:
            cli._main(argv)
        assert stop.value.code == 2
    assert "invalid choice: 'int3'" in capsys.readouterr().err


def test_list_flags_take_a_list_or_repeat():
    p = cli.parser().commands["complete"]
    args = p.parse_args(["--ckpt_dir", "x", "--stop_token_ids", "1", "--stop_token_ids", "[2, 3]",
                         "--stop", '["The end", "Bye"]'])
    assert args.stop_token_ids == [1, 2, 3] and args.stop == ["The end", "Bye"]
    main = example("example_text_completion")
    with pytest.raises(SystemExit):
        main(["--ckpt_dir", "x", "--stop_token_ids", "one"])


def test_llama_without_a_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as stop:
        cli._main([])
    assert stop.value.code == 2 and "usage: llama" in capsys.readouterr().err
