"""Run by test_trainer under `accelerate launch --multi_gpu --num_processes 2`: train, then dump this rank's LoRA
and counts. Also offers a reward that goes NaN on one rank only."""

import json
import os
import sys

from accelerate import PartialState
from safetensors.torch import save_file

from sb_finetune.config import load_config
from sb_finetune.rewards import load_reward, register_reward
from sb_finetune.trainer import train

_calls = {"n": 0}
_brightness = load_reward("brightness")


@register_reward("nan_on_rank1_second_call")
def _nan_on_rank1_second_call(images, prompts):
    """Brightness, but NaN on process 1's second call only: the other rank sees a finite loss that step."""
    _calls["n"] += 1
    value = _brightness(images, prompts)
    return value * float("nan") if _calls["n"] == 2 and os.environ.get("RANK") == "1" else value


if __name__ == "__main__":
    config, out_dir = sys.argv[1], sys.argv[2]
    result = train(load_config(config, [f"output.dir={out_dir}", *sys.argv[3:]]))
    state = PartialState()  # after train(): the trainer's Accelerator set the process group up
    name = f"{out_dir}/rank{state.process_index}_of_{state.num_processes}"
    save_file({k: v.contiguous() for k, v in result["lora"].items()}, f"{name}.safetensors")
    with open(f"{name}.json", "w") as f:
        json.dump({"steps": result["steps"], "skipped": result["skipped"]}, f)
