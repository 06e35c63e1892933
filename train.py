"""Fine-tune a diffusion or flow model on a reward, from a clone of the repository:

    accelerate launch train.py [--config NAME|PATH] [--print-config] [key=value ...]

The same as `accelerate launch -m sb_finetune.train` (an install) and the `sb-finetune` command: `sb_finetune/train.py`.
"""

from sb_finetune.train import cli, main  # noqa: F401  (main: the tests' fault injection calls it)

if __name__ == "__main__":
    cli()
