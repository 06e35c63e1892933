"""A reward scored by a server (`python -m sb_finetune.rewards.server`): `reward.name=http://host:port/score`.

Each call posts the batch (images and prompts, safetensors: no pickle) and reads one float per image back. A request
that times out, is refused or answers 5xx is retried `retries` times with doubling waits; what still fails, a 4xx,
or a wrong number of scores gives NaN scores and `last_error`, one line saying what happened: the trainer skips that
step with the line, weights untouched, and stops after a few in a row (as for a NaN reward). Not differentiable.
"""

from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.request

import torch
from torch import Tensor

from .registry import Reward


class HTTPReward(Reward):
    differentiable = False

    def __init__(self, url: str, timeout: float = 60.0, retries: int = 3, backoff: float = 0.5):
        super().__init__()
        self.url, self.timeout, self.retries, self.backoff = url, float(timeout), int(retries), float(backoff)
        self.name = url
        self.last_error: str | None = None

    def check(self) -> None:
        """Ask the server's /health once (the trainer does, before the model loads): a ValueError in one line if
        nothing answers there, so a run does not start only to skip its steps."""
        health = self.url.rsplit("/", 1)[0] + "/health" if self.url.rstrip("/").endswith("/score") else self.url
        try:
            with urllib.request.urlopen(health, timeout=min(self.timeout, 10.0)) as response:
                json.loads(response.read())
        except Exception as err:  # noqa: BLE001  (refused, timed out, not our server: the same advice)
            reason = getattr(err, "reason", err)
            raise ValueError(f"reward server {self.url} does not answer at {health} ({reason}); start it with "
                             f"`python -m sb_finetune.rewards.server --reward NAME --port PORT`") from None

    def forward(self, images: Tensor, prompts: list[str]) -> Tensor:
        from .server import encode_request

        body = encode_request(images, prompts)
        scores, self.last_error = self._post(body, images.shape[0])
        if scores is None:
            return torch.full((images.shape[0],), math.nan, device=images.device)
        return torch.tensor(scores, dtype=torch.float32, device=images.device)

    def _post(self, body: bytes, batch: int) -> tuple[list[float] | None, str | None]:
        problem = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url, data=body, method="POST",
                                             headers={"Content-Type": "application/octet-stream"})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    raw = response.read()
                break
            except urllib.error.HTTPError as err:
                problem = f"status {err.code}: {_error_text(err)}"
                if err.code < 500:  # the request is wrong: asking again gives the same answer
                    return None, f"reward server {self.url} answered {problem}"
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as err:
                reason = getattr(err, "reason", err)
                problem = "timed out" if isinstance(reason, TimeoutError) or "timed out" in str(reason) else \
                    "connection refused" if isinstance(reason, ConnectionRefusedError) else str(reason)
        else:
            return None, f"reward server {self.url}: {problem} ({self.retries + 1} tries); is it running?"
        try:
            answer = json.loads(raw)
        except ValueError:
            return None, f"reward server {self.url} answered something that is not JSON: {raw[:80]!r}"
        scores = answer.get("scores") if isinstance(answer, dict) else None
        if not isinstance(scores, list) or len(scores) != batch:
            got = f"{len(scores)} scores" if isinstance(scores, list) else f"no 'scores' list ({str(answer)[:80]})"
            return None, f"reward server {self.url} returned {got} for {batch} images"
        try:
            return [float(v) for v in scores], None
        except (TypeError, ValueError):
            return None, f"reward server {self.url} returned scores that are not numbers: {str(scores)[:80]}"


def _error_text(err: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(err.read()).get("error", ""))[:300]
    except Exception:  # noqa: BLE001
        return err.reason
