"""Run by test_trainer under `accelerate launch --multi_gpu --num_processes 2`: train, then dump this rank's LoRA."""

import sys

from accelerate import PartialState
from safetensors.torch import save_file

from sb_finetune.config import load_config
from sb_finetune.trainer import train

if __name__ == "__main__":
    config, out_dir = sys.argv[1], sys.argv[2]
    result = train(load_config(config, [f"output.dir={out_dir}", *sys.argv[3:]]))
    state = PartialState()  # after train(): the trainer's Accelerator set the process group up
    save_file({k: v.contiguous() for k, v in result["lora"].items()},
              f"{out_dir}/rank{state.process_index}_of_{state.num_processes}.safetensors")
