"""Runs that survive what real jobs meet: a kill at any moment (checkpoints appear only complete; resume takes the
newest readable one), damaged files, a resume that unpickles no code, runs that would train nothing, a launch that
starts fewer processes than asked, and a process that dies or hangs beside others."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sb_finetune import checkpoint
from sb_finetune.config import ConfigError, load_config

from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
RUN = ["--config", str(ROOT / "configs/smoke.yaml"), "logging.eval_every=0", "optim.steps=4", "optim.lr=1e-2",
       "output.checkpoint_every=1"]


def _cfg(out_dir, *extra):
    return load_config(RUN[1], [f"output.dir={out_dir}", *RUN[2:], *extra])


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted 4-step run every interrupted one must reproduce, bit for bit."""
    from sb_finetune.trainer import train

    return train(_cfg(tmp_path_factory.mktemp("straight")))


def _killed(out_dir, moment: str, step: int, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)])}
    return subprocess.run([sys.executable, str(ROOT / "tests" / "faults.py"), moment, str(step), *RUN,
                           f"output.dir={out_dir}", *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("moment", ["optimizer", "rename", "step"])
def test_a_kill_at_any_moment_leaves_only_complete_checkpoints_and_resume_is_exact(tmp_path, straight, moment, capsys):
    """SIGKILL while checkpoint 2 is written (half-way through optimizer.bin; every file written but the folder not
    yet renamed) or in the middle of step 3: no checkpoint_2 is visible unless complete, and `--resume latest`
    continues from the newest complete one to the adapter the uninterrupted run ends with."""
    from sb_finetune.trainer import train

    if moment == "step":  # the reward SIGKILLs the process on its third call: inside step 3
        proc = _killed(tmp_path, "none", 0, "reward.name=faults:dies", "reward.kwargs={call: 3, rank: 0}")
    else:
        proc = _killed(tmp_path, moment, 2)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    root = tmp_path / "checkpoints"
    assert checkpoint.complete(str(root)) == (["checkpoint_1", "checkpoint_2"] if moment == "step" else ["checkpoint_1"])
    resumed = train(_cfg(tmp_path), resume="latest")
    assert f"resumed from {root / ('checkpoint_2' if moment == 'step' else 'checkpoint_1')}" in capsys.readouterr().out
    assert resumed["steps"] == 4 and len(resumed["history"]) == 4
    for k, v in straight["lora"].items():
        assert torch.equal(v, resumed["lora"][k]), k
    assert checkpoint.complete(str(root)) == ["checkpoint_3", "checkpoint_4"]  # keep_last 2
    assert not [n for n in os.listdir(root) if n.startswith(checkpoint.PARTIAL)]  # the killed save's leftovers went


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    from sb_finetune.trainer import train

    out = tmp_path_factory.mktemp("two")
    train(_cfg(out, "optim.steps=2"))
    return out


def _damage(path: Path, how: str) -> None:
    if how == "missing":
        path.unlink()
    elif how == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:  # garbage
        path.write_bytes(b"\x00\xff{[: not what was written\x00")


KINDS = [("pytorch_lora_weights.safetensors", "truncated"), ("trainer_state.json", "truncated"),
         ("config.yaml", "garbage"), ("sb_finetune.json", "garbage"), ("optimizer.bin", "truncated"),
         ("scheduler.bin", "garbage"), ("random_states_0.pkl", "truncated"), ("optimizer.bin", "missing"),
         ("trainer_state.json", "missing")]


@pytest.mark.parametrize("name,how", KINDS, ids=[f"{n}-{h}" for n, h in KINDS])
def test_a_damaged_newest_checkpoint_is_skipped_by_latest_and_refused_by_path(tmp_path, two_checkpoints, name, how):
    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out)
    newest = out / "checkpoints" / "checkpoint_2"
    _damage(newest / name, how)
    said = []
    one = SimpleNamespace(process_index=0, num_processes=1, print=lambda *a: said.append(" ".join(map(str, a))))
    assert checkpoint.choose(one, str(out), "latest") == str(out / "checkpoints" / "checkpoint_1")
    assert len(said) == 1 and str(newest) in said[0] and name in said[0]
    assert ("missing" if how == "missing" else "unreadable") in said[0]
    with pytest.raises(ValueError, match=rf"--resume {newest}: {name} is .*nothing was loaded"):
        checkpoint.choose(one, str(out), str(newest))
    assert (newest / "config.yaml").exists() or name == "config.yaml"  # nothing already saved is touched


def test_resume_from_a_damaged_newest_trains_on_from_the_one_before(tmp_path, two_checkpoints, capsys):
    """The whole way through the trainer, resume unpickling nothing: every torch.load it makes is weights_only."""
    from sb_finetune.trainer import train

    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out)
    _damage(out / "checkpoints" / "checkpoint_2" / "optimizer.bin", "truncated")
    loads, real_load = [], torch.load

    def recording_load(*args, **kwargs):
        loads.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    torch.load = recording_load
    try:
        result = train(_cfg(out, "optim.steps=3"), resume="latest")
    finally:
        torch.load = real_load
    said = capsys.readouterr().out
    assert "skipping" in said and "optimizer.bin is unreadable" in said and "at step 1" in said
    assert result["steps"] == 3 and len(result["history"]) == 3
    assert len(loads) >= 3 and all(w is True for w in loads), loads  # optimizer, schedule, RNG: never code
    assert not list(out.rglob("*custom_checkpoint*"))  # counters live in JSON


def test_a_checkpoint_with_pickled_counters_is_not_unpickled(tmp_path, two_checkpoints):
    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out)
    old = out / "checkpoints" / "checkpoint_2"
    (old / "trainer_state.json").rename(old / "custom_checkpoint_0.pkl")  # the layout older versions wrote
    assert "resume does not unpickle code" in checkpoint.problem(str(old), 0)


@pytest.mark.parametrize("config,override", [("digits", "sampler.steps=1"), ("smoke", "sampler.eta=0")])
def test_a_chain_without_a_controlled_step_stops_before_training(tmp_path, config, override):
    """The digits DDPM's one step lands on the data (deterministic); η = 0 makes every step deterministic."""
    from sb_finetune.trainer import train

    cfg = load_config(str(ROOT / f"configs/{config}.yaml"), [f"output.dir={tmp_path}", "logging.tracker=none",
                                                            "logging.summary_samples=0", "logging.eval_every=0", override])
    with pytest.raises(ValueError, match="no step of this chain is controlled.*training would change nothing"):
        train(cfg)
    assert not (tmp_path / "pytorch_lora_weights.safetensors").exists()


def test_a_window_without_a_controlled_step_is_a_config_error():
    with pytest.raises(ConfigError, match="objective.window_max.*without a controlled step"):
        load_config(None, ["objective.window_min=0", "objective.window_max=0"])


def _launch(*args: str, port: int, timeout: int = 240) -> tuple[subprocess.CompletedProcess, float]:
    """`accelerate launch ARGS`, and the time it exited."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)])}
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--mixed_precision", "no",
                           "--dynamo_backend", "no", "--num_machines", "1", "--main_process_port", str(port), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return proc, time.time()


def test_cpu_flag_with_two_processes_is_refused_with_the_command_that_works(tmp_path):
    """`accelerate launch --cpu --num_processes 2` starts ONE process; it must not train alone in silence."""
    proc, _ = _launch("--cpu", "--num_processes", "2", "train.py", *RUN, f"output.dir={tmp_path}", port=free_port())
    assert proc.returncode != 0, proc.stderr[-2000:]  # train.py exits 2; the launcher says 1
    assert "started one process" in proc.stderr and "--multi_gpu --num_processes N" in proc.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_a_dying_or_hanging_process_stops_the_other_and_both_resume(tmp_path):
    """Two real processes (gloo). Process 1 is SIGKILLed in step 3: the launcher stops the survivor at once. Process 1
    hangs in step 3: the survivor's collective gives up after distributed.timeout_s and says what happened. Then
    `--resume latest` with both continues from checkpoint 2 to the end."""
    two = ["--multi_gpu", "--num_processes", "2", "train.py", *RUN, f"output.dir={tmp_path}"]
    mark = tmp_path / "failed_at"
    died, died_exit = _launch(*two, "reward.name=faults:dies", f"reward.kwargs.mark={mark}", port=free_port())
    assert died.returncode != 0 and "Signal 9 (SIGKILL) received" in died.stderr, died.stderr[-2000:]
    died_s = died_exit - float(mark.read_text())
    hung, hung_exit = _launch(*two, "reward.name=faults:hangs", f"reward.kwargs.mark={mark}", "distributed.timeout_s=5",
                              port=free_port())
    assert hung.returncode != 0 and "another process died, hung or was stopped" in hung.stderr, hung.stderr[-3000:]
    assert "distributed.timeout_s=5 s" in hung.stderr and "--resume latest" in hung.stderr
    hung_s = hung_exit - float(mark.read_text())
    print(f"from the failure to the launcher's exit: killed rank {died_s:.1f} s, hung rank {hung_s:.1f} s (timeout 5 s)")
    assert died_s < 30 and 5 <= hung_s < 35  # bounded (torch's default wait is 30 minutes)
    assert checkpoint.complete(str(tmp_path / "checkpoints")) == ["checkpoint_1", "checkpoint_2"]
    resumed, _ = _launch(*two, "--resume", "latest", port=free_port())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {tmp_path / 'checkpoints' / 'checkpoint_2'} at step 2" in resumed.stdout + resumed.stderr
    assert checkpoint.read_state(str(tmp_path / "checkpoints" / "checkpoint_4")) == (4, 0)
