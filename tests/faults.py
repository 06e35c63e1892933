"""Failures the way real jobs meet them, for the reliability tests.

Rewards, plugged by import path (`reward.name=faults:dies`; tests/ on the path): brightness until process `rank`
(RANK) makes call `call` (the step), where it is SIGKILLed (`dies`) or sleeps past any collective timeout (`hangs`),
having written the time to the file `mark` if given.

`python tests/faults.py MOMENT STEP [train.py arguments]`: train.py, SIGKILLed at one MOMENT of saving checkpoint
STEP: `optimizer` (the adapter, config and counters written, then half of optimizer.bin) or `rename` (every
file written, the folder not yet renamed into place).
"""

import os
import signal
import sys
import time

from sb_finetune.rewards import Reward
from sb_finetune.rewards.simple import Brightness


class _OnCall(Reward):
    def __init__(self, call: int = 3, rank: int = 1, mark: str | None = None):
        super().__init__()
        self.call, self.rank, self.mark, self.calls, self.inner = call, rank, mark, 0, Brightness()

    def forward(self, images, prompts):
        self.calls += 1
        if self.calls == self.call and int(os.environ.get("RANK", "0")) == self.rank:
            if self.mark:  # when it failed, for the test to time the others' exit
                with open(self.mark, "w") as f:
                    f.write(str(time.time()))
            self.fail()
        return self.inner(images, prompts)


class dies(_OnCall):  # noqa: N801 (a factory name, as a user writes it in reward.name)
    def fail(self):
        os.kill(os.getpid(), signal.SIGKILL)


class hangs(_OnCall):  # noqa: N801
    def fail(self):
        time.sleep(600)


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _arm(moment: str, step: int) -> None:
    import accelerate.checkpointing as acc

    from sb_finetune import checkpoint

    target = f"checkpoint_{step}"
    save, replace = acc.save, checkpoint.os.replace

    def killing_save(obj, f, *args, **kwargs):
        if target in str(f) and str(f).endswith("optimizer.bin"):
            if moment == "optimizer":
                save(obj, f, *args, **kwargs)
                size = os.path.getsize(f)
                with open(f, "r+b") as handle:
                    handle.truncate(size // 2)
                _kill()
        return save(obj, f, *args, **kwargs)

    def killing_replace(src, dst):
        if moment == "rename" and os.path.basename(dst) == target:
            _kill()
        return replace(src, dst)

    acc.save = killing_save
    checkpoint.os.replace = killing_replace  # the os module itself: its only caller here is the save


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    _arm(sys.argv[1], int(sys.argv[2]))
    import train

    sys.exit(train.main(sys.argv[3:]))
