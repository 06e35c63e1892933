"""Fine-tune a diffusion or flow model on a reward. The same command three ways:

    accelerate launch train.py [--config NAME|PATH] [key=value ...]             (a clone of the repository)
    accelerate launch -m sb_finetune.train [--config NAME|PATH] [key=value ...]  (an install)
    sb-finetune [--config NAME|PATH] [key=value ...]                            (one process)

--config takes a YAML path or a built-in config by name (default: digits); --print-config shows the resolved config,
each value with where it came from, and exits.
"""

from __future__ import annotations

import argparse
import faulthandler
import sys

from .config import ConfigError, builtin_configs, describe, first_line, resolve_config

DEFAULT_CONFIG = "digits"  # the built-in default: the shipped digits DDPM and classifier


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sb-finetune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=DEFAULT_CONFIG,
                        help=f"YAML experiment: a path, or a built-in by name ({', '.join(builtin_configs())}); "
                             f"default {DEFAULT_CONFIG}")
    parser.add_argument("--resume", help="'latest' or a checkpoint folder")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (every field, with where its value came from) and exit")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-4 output.dir=outputs/x")
    args = parser.parse_intermixed_args(argv)  # overrides before and after --config / --resume alike
    try:
        resolved = resolve_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(describe(resolved))
        return 0
    cfg = resolved.config
    for note in resolved.notes:
        print(f"note: {note}", file=sys.stderr)
    from .rewards import RewardBuildError  # noqa: I001  (after the config: `--help` and config errors stay fast)
    from .trainer import train

    try:
        result = train(cfg, resume=args.resume)
    except RewardBuildError as err:
        print(f"error: {err}{_kwargs_origin(resolved)}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"error: {_lost_peer(err, cfg) or err}", file=sys.stderr)
        return 2
    print(f"done: {result['steps']} steps ({result['skipped']} skipped); adapter in {cfg.output.dir}")
    return 0


def _kwargs_origin(resolved) -> str:
    """Where the reward's arguments came from, and how to clear them."""
    if not resolved.config.reward.kwargs:
        return ""
    return f" (reward.kwargs set by {resolved.sources['reward.kwargs']}; clear them with reward.kwargs={{}})"


def _lost_peer(err: Exception, cfg) -> str | None:
    """A failed collective said as what it means for the user (the backend's own words in brackets), else None."""
    import torch.distributed as dist

    said = first_line(err)
    backend = any(word in said for word in ("gloo", "NCCL", "c10d", "Connection closed", "Connection reset"))
    if not (dist.is_available() and dist.is_initialized() and (isinstance(err, dist.DistError) or backend)):
        return None
    return (f"another process died, hung or was stopped: a collective failed or waited past distributed.timeout_s="
            f"{cfg.distributed.timeout_s} s ({said}). Complete checkpoints under {cfg.output.dir}/checkpoints are kept: "
            f"`--resume latest` continues from the newest")


def cli() -> None:
    """The console script and `python -m sb_finetune.train`."""
    faulthandler.enable()  # a hard crash (a kernel's segfault, a collective's abort) still prints where, per process
    sys.exit(main())


if __name__ == "__main__":
    cli()
