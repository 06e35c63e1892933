"""Run by the tests under `accelerate launch --multi_gpu --num_processes 2`: one training run after another in the same
two processes and process group (one launch pays the imports once), each run then dumping this rank's LoRA and counts
into its folder. Also offers a reward that goes NaN on one rank only.

    two_rank_worker.py CONFIG RUNS_JSON      RUNS_JSON: [{"dir": ..., "overrides": [...]}, ...]

A run that raises writes its traceback to `<dir>/error_rank<i>.txt` and the next run starts; the tests read it."""

import json
import os
import sys
import traceback

import torch.distributed as dist
from accelerate.state import PartialState
from safetensors.torch import save_file

from sb_finetune.config import load_config
from sb_finetune.rewards import load_reward, register_reward
from sb_finetune.trainer import train

_calls = {"n": 0}
_brightness = load_reward("brightness")


@register_reward("nan_on_rank1_second_call")
def _nan_on_rank1_second_call(images, prompts):
    """Brightness, but NaN on process 1's second call of a run only: the other rank sees a finite loss that step."""
    _calls["n"] += 1
    value = _brightness(images, prompts)
    return value * float("nan") if _calls["n"] == 2 and os.environ.get("RANK") == "1" else value


def _run(config: str, out_dir: str, overrides: list[str]) -> None:
    _calls["n"] = 0
    result = train(load_config(config, [f"output.dir={out_dir}", *overrides]))
    state = PartialState()  # the process group the trainer's Accelerator joined: 1 process if it trained alone
    name = f"{out_dir}/rank{state.process_index}_of_{state.num_processes}"
    save_file({k: v.contiguous() for k, v in result["lora"].items()}, f"{name}.safetensors")
    with open(f"{name}.json", "w") as f:
        json.dump({"steps": result["steps"], "skipped": result["skipped"]}, f)


if __name__ == "__main__":
    config, runs = sys.argv[1], json.loads(open(sys.argv[2]).read())
    # train() ends with accelerate's end_training, which destroys the process group; the runs share one, torn down last
    PartialState.destroy_process_group = lambda self, group=None: None
    for run in runs:
        try:
            _run(config, run["dir"], run["overrides"])
        except Exception:
            os.makedirs(run["dir"], exist_ok=True)
            with open(os.path.join(run["dir"], f"error_rank{os.environ['RANK']}.txt"), "w") as f:
                f.write(traceback.format_exc())
    if dist.is_initialized():
        dist.destroy_process_group()
