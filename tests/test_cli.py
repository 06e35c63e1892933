"""The first hour of a new user: built-in configs from any folder, an installed command, the resolved config with
its sources, and reward arguments that do not follow the user to another reward. The commands run in a temporary
folder outside the repository."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sb_finetune.config import COMMAND_LINE, DEFAULT, ConfigError, builtin_configs, describe, load_config, resolve_config

ROOT = Path(__file__).resolve().parents[1]
MY_REWARDS = '''
from sb_finetune.rewards import Reward

class MyReward(Reward):
    def __init__(self, scale):
        super().__init__()
        self.scale = scale

    def forward(self, images, prompts):
        return self.scale * images.mean(dim=(1, 2, 3))

def broken():
    raise RuntimeError("the judge's weights are not in ./judge")
'''


def _cli(*args, cwd, command=(sys.executable, "-m", "sb_finetune.train"), timeout=300):
    env = {**os.environ, "PYTHONPATH": str(cwd), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([*command, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=timeout)


def test_built_in_configs_ship_with_the_package_and_resolve_by_name_from_anywhere(tmp_path, monkeypatch):
    assert {"digits", "smoke", "base", "sd15_aesthetic"} <= set(builtin_configs())
    monkeypatch.chdir(tmp_path)
    for spec in ("smoke", "smoke.yaml", "configs/smoke.yaml"):
        assert load_config(spec).model.pretrained == "tiny:sd"
    cfg = load_config("sd15_aesthetic")  # its prompt file: relative to the YAML, so it is found from here too
    assert os.path.isabs(cfg.prompts.file) and os.path.isfile(cfg.prompts.file)
    with pytest.raises(ConfigError, match="config file not found: nope.*built-in configs, by name: .*digits"):
        load_config("nope")
    (tmp_path / "mine.yaml").write_text("optim:\n  steps: 3\n")
    assert load_config("mine.yaml").optim.steps == 3  # a path is still a path


def test_switching_the_reward_on_the_command_line_leaves_the_file_s_arguments_behind():
    kept = resolve_config("digits", ["reward.kwargs.target=3"])
    assert kept.config.reward.kwargs == {"target": 3} and not kept.notes
    switched = resolve_config("digits", ["reward.name=brightness"])
    assert switched.config.reward.kwargs == {} and "reward.kwargs {'target': 0}" in switched.notes[0]
    assert "were for reward 'digit', not passed to 'brightness'" in switched.notes[0]
    given = resolve_config("digits", ["reward.name=my_rewards:MyReward", "reward.kwargs.scale=2"])
    assert given.config.reward.kwargs == {"scale": 2} and given.sources["reward.kwargs"] == COMMAND_LINE
    mixed = resolve_config("digits", ["reward.mix={brightness: 1.0, contrast: 0.5}"])
    assert mixed.config.reward.kwargs == {} and "the mix" in mixed.notes[0]
    cleared = resolve_config("digits", ["reward.kwargs={}"])  # a value given replaces; it does not merge
    assert cleared.config.reward.kwargs == {} and not cleared.notes
    assert resolve_config("digits", ["reward={name: jpeg_compressibility}"]).config.reward.kwargs == {}


def test_the_resolved_config_names_every_source_and_reads_back(tmp_path):
    resolved = resolve_config("smoke", ["optim.lr=0.01", "reward.kwargs.x=1"])
    text = describe(resolved)
    smoke = resolved.path
    lines = {ln.split(":")[0].strip(): ln for ln in text.splitlines() if ":" in ln and not ln.startswith("#")}
    assert lines["lr"].endswith(f"# {COMMAND_LINE}") and lines["pretrained"].endswith(f"# {smoke}")
    assert lines["seed"].endswith(f"# {DEFAULT}") and lines["kwargs"].endswith(f"# {COMMAND_LINE}")
    assert resolved.sources["model.pretrained"] == smoke and len(resolved.sources) == text.count("  # ")
    (tmp_path / "printed.yaml").write_text(text)
    assert load_config(str(tmp_path / "printed.yaml")) == resolved.config


def test_overrides_may_follow_config_and_resume(capsys):
    """`… --resume latest optim.steps=400`: overrides after an option are overrides too, not 'unrecognized arguments'."""
    from sb_finetune.train import main

    assert main(["optim.steps=3", "--config", "smoke", "optim.lr=0.5", "--resume", "latest", "output.dir=o",
                 "--print-config"]) == 0
    shown = {ln.split(":")[0].strip(): ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("  ")}
    for key, value in (("steps", "3"), ("lr", "0.5"), ("dir", "o")):
        assert shown[key].split("#")[0].split(":", 1)[1].strip() == value and shown[key].endswith(f"# {COMMAND_LINE}")


def test_the_installed_command_prints_the_config_and_trains_from_another_folder(tmp_path):
    script = shutil.which("sb-finetune", path=os.path.dirname(sys.executable))
    assert script, "pip install -e . installs the sb-finetune command"
    shown = _cli("--print-config", "reward.name=brightness", cwd=tmp_path, command=(script,))
    assert shown.returncode == 0, shown.stderr[-800:]
    assert "builtin:digits" in shown.stdout and "# note: reward.kwargs {'target': 0}" in shown.stdout
    shown = _cli("--print-config", cwd=tmp_path, command=(sys.executable, str(ROOT / "train.py")))
    assert shown.returncode == 0 and "pretrained: builtin:digits" in shown.stdout  # the clone's script: the same default
    done = _cli("--config", "smoke", "optim.steps=1", "logging.eval_every=0", "output.dir=out", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-1500:]
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.parametrize("args, said", [
    (["reward.name=my_rewards:MyReward", "reward.kwargs.scale=1", "reward.kwargs.target=0"],
     "error: reward 'my_rewards:MyReward' does not take 'target' (reward.kwargs: {'scale': 1, 'target': 0}) "
     "(reward.kwargs set by command line; clear them with reward.kwargs={})"),
    (["reward.name=my_rewards:MyReward"], "error: reward 'my_rewards:MyReward' needs 'scale': set reward.kwargs.NAME=VALUE"),
    (["reward.name=my_rewards:broken"],
     "error: reward 'my_rewards:broken' failed to build: RuntimeError: the judge's weights are not in ./judge"),
])
def test_a_reward_that_cannot_be_built_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys, args, said):
    from sb_finetune.train import main

    (tmp_path / "my_rewards.py").write_text(MY_REWARDS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_rewards", None)
    assert main(["--config", "smoke", "output.dir=out", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err == said and not (tmp_path / "out").exists()


def test_a_grid_of_one_s_own_is_read_from_the_command_line_and_checked():
    grid = [999, 815, 730, 670, 623, 582, 545, 511, 478, 447, 417, 386, 355, 323, 289, 250, 204, 147, 79, 49]
    assert load_config("digits", [f"sampler.timesteps={grid}".replace(" ", "")]).sampler.timesteps == grid
    cases = {("sampler.timesteps=[900,500]",): "20 \\(sampler.steps\\) distinct timesteps.*got 2",
             ("sampler.steps=2", "sampler.timesteps=[500,900]"): "descending order.*got 2: \\[500, 900\\]",
             ("sampler.timesteps=[900,fast]",): "config key 'sampler.timesteps"}
    for overrides, said in cases.items():
        with pytest.raises(ConfigError, match=said):
            load_config("digits", list(overrides))
    # another step count on the command line leaves the YAML's grid behind, and says so
    other = resolve_config("digits", ["sampler.steps=50"])
    assert other.config.sampler.timesteps is None and other.config.sampler.steps == 50
    assert "sampler.timesteps from" in other.notes[0] and "has 20 steps, not sampler.steps=50" in other.notes[0]
    assert resolve_config("digits", ["sampler.steps=20"]).config.sampler.timesteps[0] == 999  # the same count: kept


def test_another_estimator_on_the_command_line_hears_that_the_file_s_rate_was_chosen_for_its_own():
    # the digits rate (1e-2) is the pathwise estimator's: a user switching estimator keeps it, told so
    switched = resolve_config("digits", ["objective.estimator=adjoint"])
    assert switched.config.optim.lr == 1e-2 and len(switched.notes) == 1
    assert "optim.lr=0.01 from" in switched.notes[0] and "chosen for objective.estimator='pathwise'" in switched.notes[0]
    assert "'adjoint' trains with it" in switched.notes[0]
    for quiet in (["objective.estimator=adjoint", "optim.lr=3e-3"], ["objective.estimator=pathwise"], ["optim.lr=3e-3"]):
        assert not resolve_config("digits", quiet).notes, quiet
    assert not resolve_config(None, ["objective.estimator=adjoint"]).notes  # the schema's own rate was chosen for none


def test_the_word_no_stays_a_word_where_the_schema_takes_text(tmp_path):
    # YAML reads an unquoted `no` as false: `optim.mixed_precision=no`, the documented value, used to stop the run
    # with "'False' is not one of ('no', 'fp16', 'bf16')"
    assert load_config(None, ["optim.mixed_precision=no"]).optim.mixed_precision == "no"
    assert load_config(None, ["model.pretrained=off"]).model.pretrained == "off"  # any text field keeps the word
    assert load_config(None, ["control.merged_forward=no"]).control.merged_forward is False  # a boolean stays one
    assert load_config(None, ["objective.checkpointing=on"]).objective.checkpointing is True
    (tmp_path / "fp32.yaml").write_text("optim:\n  mixed_precision: no\n  batch_size: 4\n")
    assert load_config(str(tmp_path / "fp32.yaml")).optim.mixed_precision == "no"
    (tmp_path / "off.yaml").write_text("model:\n  pretrained: off\n")  # the word is lost: say how to keep it
    with pytest.raises(ConfigError, match="config key 'model.pretrained' in .*off.yaml: YAML reads an unquoted .*quote"):
        load_config(str(tmp_path / "off.yaml"))
    with pytest.raises(ConfigError, match="'optim.mixed_precision': 'fp8' is not one of"):
        load_config(None, ["optim.mixed_precision=fp8"])
    (tmp_path / "flat.yaml").write_text("model: 5\n")  # a section that is not a mapping: still one line naming it
    with pytest.raises(ConfigError, match="config key 'model' in .*flat.yaml: a section of fields"):
        load_config(str(tmp_path / "flat.yaml"))
    (tmp_path / "list.yaml").write_text("- model: {}\n")  # nor is the file (this crashed with a TypeError)
    with pytest.raises(ConfigError, match="list.yaml: a config file is a mapping of sections"):
        load_config(str(tmp_path / "list.yaml"))
