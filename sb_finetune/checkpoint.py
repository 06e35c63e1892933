"""Checkpoints that survive a kill at any moment, and a resume that runs no code from them.

`checkpoints/checkpoint_<step>` appears only complete: every process writes into `.partial-checkpoint_<step>`,
and the main process renames it into place once all have finished (a rename is atomic). A folder holds the LoRA in
diffusers' format, `config.yaml`, `trainer_state.json` (the step counters, JSON), an estimator's own state where it
keeps one (`estimator_state_<process>.safetensors`: base_pool's pool) and accelerate's optimizer, schedule and
per-process RNG files, which accelerate reads with `torch.load(weights_only=True)`. Nothing is
unpickled with code: counters are never registered with accelerate (it loads those with `weights_only=False`).

`--resume latest` takes the newest checkpoint that every process can read whole, naming any newer one it skips and
why; `--resume PATH` to a damaged one stops with one line. Reading whole means: each file of the folder parses
(safetensors, JSON, YAML, and torch files under `weights_only=True`) and the files a resume needs are there.
"""

from __future__ import annotations

import json
import os
import shutil

from .config import first_line
from .control import ADAPTER_FILE

STATE_FILE = "trainer_state.json"
PARTIAL = ".partial-"
# what a resume reads besides the adapter: accelerate's names (one RNG file per process)
NEEDED = (ADAPTER_FILE, STATE_FILE, "optimizer.bin", "scheduler.bin")


def estimator_file(process_index: int) -> str:
    return f"estimator_state_{process_index}.safetensors"


def save_estimator(folder: str, process_index: int, estimator) -> None:
    """This process's estimator state (tensors), where the estimator keeps one (`state_dict`), as safetensors."""
    state = estimator.state_dict() if hasattr(estimator, "state_dict") else {}
    if state:
        from safetensors.torch import save_file

        save_file({k: v.detach().cpu() for k, v in state.items()}, os.path.join(folder, estimator_file(process_index)))


def load_estimator(folder: str, process_index: int, estimator) -> bool:
    """Load this process's saved estimator state into `estimator`; False where the checkpoint holds none for it
    (a stateless estimator, a checkpoint from before, or a process that was not there)."""
    path = os.path.join(folder, estimator_file(process_index))
    if not (hasattr(estimator, "load_state_dict") and os.path.exists(path)):
        return False
    from safetensors.torch import load_file

    estimator.load_state_dict(load_file(path))
    return True


def folder_of(out_dir: str) -> str:
    return os.path.join(out_dir, "checkpoints")


def write_state(folder: str, step: int, skipped: int) -> None:
    with open(os.path.join(folder, STATE_FILE), "w") as f:
        json.dump({"step": step, "skipped": skipped}, f)


def read_state(folder: str) -> tuple[int, int]:
    """(step, skipped) of a checkpoint."""
    with open(os.path.join(folder, STATE_FILE)) as f:
        state = json.load(f)
    return int(state["step"]), int(state["skipped"])


def save(accelerator, out_dir: str, step: int, keep_last: int) -> str:
    """accelerate's `save_state` (its pre-hook writes the adapter, config and counters) into a partial folder, renamed
    into place when every process is done; then only the newest `keep_last` complete checkpoints are kept."""
    root = folder_of(out_dir)
    final = os.path.join(root, f"checkpoint_{step}")
    partial = os.path.join(root, PARTIAL + os.path.basename(final))
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)  # a kill in an earlier save of this step
    accelerator.wait_for_everyone()
    accelerator.save_state(partial)
    accelerator.wait_for_everyone()  # every process's RNG file is written
    if accelerator.is_main_process:
        if os.path.exists(final):  # this step saved by an earlier run (resumed from before it): superseded
            os.replace(final, partial + ".old")
        os.replace(partial, final)
        for old in (complete(root)[:-keep_last] if keep_last > 0 else []):
            shutil.rmtree(os.path.join(root, old))
        for name in os.listdir(root):  # leftovers of saves a kill interrupted
            if name.startswith(PARTIAL):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def complete(root: str) -> list[str]:
    """Names of the complete checkpoints under `root`, oldest first (by step)."""
    if not os.path.isdir(root):
        return []
    names = [n for n in os.listdir(root) if n.startswith("checkpoint_") and n[11:].isdigit()]
    return sorted(names, key=lambda n: int(n[11:]))


def problem(folder: str, process_index: int) -> str | None:
    """Why this process cannot resume from `folder`, in a few words, or None when every file reads whole."""
    if not os.path.isdir(folder):
        return "no such checkpoint folder"
    files = set(os.listdir(folder))
    rng = f"random_states_{process_index}.pkl"
    for name in (*NEEDED, rng):
        if name not in files:
            if name == STATE_FILE and "custom_checkpoint_0.pkl" in files:
                return (f"{STATE_FILE} is missing: an older sb-finetune pickled the step counters, and resume does not "
                        f"unpickle code")
            return f"{name} is missing"
    for name in sorted(files):
        path = os.path.join(folder, name)
        others = (name.startswith("random_states_") and name != rng) or (
            name.startswith("estimator_state_") and name != estimator_file(process_index))
        if os.path.isdir(path) or others:
            continue  # another process's RNG or estimator state is that process's to check
        try:
            _read(path)
        except Exception as err:  # noqa: BLE001 (any parse failure makes the checkpoint unusable)
            return f"{name} is unreadable ({type(err).__name__}: {first_line(err)[:120]})"
    return None


def _read(path: str) -> None:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        load_file(path)
    elif path.endswith(".json"):
        with open(path) as f:
            json.load(f)
        if path.endswith(STATE_FILE):
            read_state(os.path.dirname(path))
    elif path.endswith((".yaml", ".yml")):
        import yaml

        with open(path) as f:
            yaml.safe_load(f)
    elif path.endswith((".bin", ".pkl", ".pt")):
        from accelerate.utils import load  # torch.load(weights_only=True), numpy's RNG arrays allowed

        load(path, map_location="cpu")


def choose(accelerator, out_dir: str, resume: str) -> str:
    """The checkpoint to resume from, agreed by every process: `resume` itself (a folder), or for 'latest' the newest
    one all processes read whole. Raises ValueError / FileNotFoundError with one line when there is none."""
    if resume != "latest":
        bad = _first_problem(accelerator, resume)
        if bad:
            raise ValueError(f"--resume {resume}: {bad}; nothing was loaded")
        return resume
    root = folder_of(out_dir)
    names = complete(root)
    if not names:
        partial = [n for n in (os.listdir(root) if os.path.isdir(root) else []) if n.startswith(PARTIAL)]
        raise FileNotFoundError(f"--resume latest: no complete checkpoint under {root}"
                                + (f" (only {partial[0]}, which a stopped run left unfinished)" if partial else ""))
    for name in reversed(names):
        path = os.path.join(root, name)
        bad = _first_problem(accelerator, path)
        if bad is None:
            return path
        accelerator.print(f"--resume latest: skipping {path}: {bad}")
    raise ValueError(f"--resume latest: none of the {len(names)} checkpoints under {root} can be read (see above)")


def _first_problem(accelerator, folder: str) -> str | None:
    """The first problem any process finds with `folder` (named with the process when there are several)."""
    mine = problem(folder, accelerator.process_index)
    if accelerator.num_processes == 1:
        return mine
    from accelerate.utils import gather_object

    seen = [(rank, p) for rank, p in enumerate(gather_object([mine])) if p]
    return f"{seen[0][1]} (process {seen[0][0]})" if seen else None
