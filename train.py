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
        print(f"error: {_lost_peer(err, cfg) or err}", file=sys.stderr)
        return 2
    print(f"done: {result['steps']} steps ({result['skipped']} skipped); adapter in {cfg.output.dir}")
    return 0


def _lost_peer(err: Exception, cfg) -> str | None:
    """A failed collective said as what it means for the user (the backend's own words in brackets), else None."""
    import torch.distributed as dist

    said = (str(err).strip().splitlines() or [""])[0]
    backend = any(word in said for word in ("gloo", "NCCL", "c10d", "Connection closed", "Connection reset"))
    if not (dist.is_available() and dist.is_initialized() and (isinstance(err, dist.DistError) or backend)):
        return None
    return (f"another process died, hung or was stopped: a collective failed or waited past distributed.timeout_s="
            f"{cfg.distributed.timeout_s} s ({said}). Complete checkpoints under {cfg.output.dir}/checkpoints are kept: "
            f"`--resume latest` continues from the newest")


if __name__ == "__main__":
    faulthandler.enable()  # a hard crash (a kernel's segfault, a collective's abort) still prints where, per process
    sys.exit(main())
