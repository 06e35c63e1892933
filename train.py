"""Fine-tune a diffusion/flow model on a reward:  accelerate launch train.py --config configs/X.yaml [key=value ...]"""

import argparse
import faulthandler
import sys

from sb_finetune.config import ConfigError, load_config

DEFAULT_CONFIG = "configs/digits.yaml"  # the built-in default: the shipped digits DDPM and classifier


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default=DEFAULT_CONFIG, help=f"YAML experiment (default {DEFAULT_CONFIG})")
    parser.add_argument("--resume", help="'latest' or a checkpoint folder")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-4 output.dir=outputs/x")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from sb_finetune.trainer import train

    try:
        result = train(cfg, resume=args.resume)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"done: {result['steps']} steps ({result['skipped']} skipped); adapter in {cfg.output.dir}")
    return 0


if __name__ == "__main__":
    faulthandler.enable()  # a hard crash (a kernel's segfault, a collective's abort) still prints where, per process
    sys.exit(main())
