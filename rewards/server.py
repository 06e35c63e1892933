"""Serve any registered reward over HTTP, so a detector or a VLM judge runs in its own environment or on its own GPU.

    python -m sb_finetune.rewards.server --reward jpeg_compressibility --port 8000
    accelerate launch train.py reward.name=http://127.0.0.1:8000/score objective.estimator=weighted ...

POST /score: the body is a safetensors file holding `images` (float [B, 3, H, W] in [0, 1]) with the prompts as JSON
in its metadata (`prompts`); the answer is JSON {"scores": [B floats], "reward": name}. GET /health says which reward
is served. A bad request gets 400 and a failing reward 500, each with {"error": "..."}. No pickle crosses the wire.
One request at a time (a reward model on one GPU is not thread-safe).
"""

from __future__ import annotations

import argparse
import json
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer

import torch

MAX_BODY_BYTES = 1 << 30


def encode_request(images: torch.Tensor, prompts: list[str]) -> bytes:
    from safetensors.torch import save

    return save({"images": images.detach().float().cpu().contiguous()}, metadata={"prompts": json.dumps(list(prompts))})


def decode_request(body: bytes) -> tuple[torch.Tensor, list[str]]:
    """(images, prompts) from a request body; ValueError naming what is wrong."""
    from safetensors.torch import load

    try:
        images = load(body)["images"]
        header_len = int.from_bytes(body[:8], "little")  # the format: 8-byte header length, a JSON header, the data
        metadata = json.loads(body[8:8 + header_len]).get("__metadata__") or {}
        prompts = json.loads(metadata.get("prompts", "null"))
    except Exception as err:  # noqa: BLE001  (any malformed body: one line back to the client)
        raise ValueError(f"the body is not a safetensors file with 'images' and JSON 'prompts' ({type(err).__name__}: {err})") from None
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got {list(images.shape)}")
    if not isinstance(prompts, list) or len(prompts) != images.shape[0]:
        raise ValueError(f"metadata 'prompts' must be a JSON list of {images.shape[0]} strings")
    return images, [str(p) for p in prompts]


def make_server(reward, host: str = "127.0.0.1", port: int = 0) -> HTTPServer:
    """An HTTPServer scoring with `reward` (a Reward module); port 0 picks a free one (server.server_address)."""

    class Handler(BaseHTTPRequestHandler):
        def _send(self, status: int, payload: dict) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):  # noqa: N802
            if self.path.rstrip("/") == "/health":
                return self._send(200, {"reward": reward.name, "differentiable": bool(reward.differentiable)})
            self._send(404, {"error": f"no such path {self.path}: GET /health, POST /score"})

        def do_POST(self):  # noqa: N802
            if self.path.rstrip("/") != "/score":
                return self._send(404, {"error": f"no such path {self.path}: POST /score"})
            length = int(self.headers.get("Content-Length") or 0)
            if not 0 < length <= MAX_BODY_BYTES:
                return self._send(400, {"error": f"Content-Length {length}: need a body of 1 B to {MAX_BODY_BYTES} B"})
            try:
                images, prompts = decode_request(self.rfile.read(length))
            except ValueError as err:
                return self._send(400, {"error": str(err)})
            try:
                with torch.no_grad():
                    scores = reward(images.to(_device(reward)), prompts)
                scores = [float(v) for v in torch.as_tensor(scores).detach().float().flatten().cpu()]
            except Exception as err:  # noqa: BLE001  (the reward's own failure goes back to the trainer, in one line)
                return self._send(500, {"error": f"reward '{reward.name}' failed: {type(err).__name__}: {err}"})
            self._send(200, {"scores": scores, "reward": reward.name})

        def log_message(self, format, *args):  # quiet: one line per request is noise at training rates
            pass

    return HTTPServer((host, port), Handler)


def _device(reward) -> torch.device:
    p = next(iter(reward.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve a registered reward over HTTP (POST /score).")
    parser.add_argument("--reward", required=True, help="registered name, package.module:factory, or entry point")
    parser.add_argument("--kwargs", default="{}", help="JSON object of the reward's arguments")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    from sb_finetune.rewards import load_reward

    try:
        reward = load_reward(args.reward, **json.loads(args.kwargs)).to(args.device).eval().requires_grad_(False)
    except (ValueError, TypeError) as err:
        sys.exit(f"error: {err}")
    server = make_server(reward, args.host, args.port)
    host, port = server.server_address[:2]
    print(f"serving reward '{reward.name}' at http://{host}:{port}/score", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
