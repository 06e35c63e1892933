"""The README's own commands and snippets, as a user copies them: a renamed key or an API change fails here, not in
a user's first session."""

import re
import shlex

import torch

from sb_finetune.train import main

from conftest import ROOT

README = (ROOT / "README.md").read_text()
SCRIPTS = ("train.py", "sb_finetune.train", "sb-finetune")


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, re.S)


def _training_commands() -> list[list[str]]:
    """The arguments of every training command in the README's bash blocks (continuation lines joined, `&&` chains
    split, comments dropped)."""
    commands = []
    for block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            for command in line.split("&&"):
                words = shlex.split(command, comments=True)
                script = next((w for w in words if w in SCRIPTS), None)
                if script is not None:
                    commands.append(words[words.index(script) + 1:])
    return commands


def _python_block(starting: str) -> str:
    (block,) = [b for b in _blocks("python") if b.lstrip().startswith(starting)]
    return block


def test_every_training_command_in_the_readme_resolves_its_config(capsys):
    commands = _training_commands()
    assert len(commands) >= 10 and [] in commands  # the parser found them, the bare default among them
    for args in commands:
        assert main([*args, "--print-config"]) == 0, (args, capsys.readouterr().err)


def test_the_readme_s_reward_plugs_in_by_its_import_path(tmp_path, monkeypatch):
    from sb_finetune.rewards import load_reward

    (tmp_path / "my_rewards.py").write_text(_python_block("# my_rewards.py"))
    monkeypatch.syspath_prepend(str(tmp_path))
    reward = load_reward("my_rewards:blueness")
    images = torch.zeros(2, 3, 8, 8)
    images[0, 2], images[1, 0] = 1.0, 1.0  # a blue image, a red one
    scores = reward(images, ["", ""])
    assert scores.shape == (2,) and scores[0] > 0 > scores[1]


def test_the_readme_s_smoke_run_loads_with_its_one_line_loader(tmp_path, monkeypatch):
    """The README's smoke command, then its "Load a result" snippet, in a fresh folder."""
    (smoke,) = [args for args in _training_commands() if "output.dir=outputs/smoke" in args]
    monkeypatch.chdir(tmp_path)
    assert main(smoke) == 0
    exec(_python_block("from sb_finetune.pipelines import load_finetuned"), {})
    assert (tmp_path / "cat.png").stat().st_size > 0
