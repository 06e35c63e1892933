"""The built-in default: a DDPM and a classifier trained on scikit-learn's handwritten digits, shipped with the package.

Reproduce the shipped weights (CPU, a few minutes; seeds fixed):

    python -m sb_finetune.digits base         # → sb_finetune/assets/digits/ddpm/ (diffusers DDPMPipeline folder)
    python -m sb_finetune.digits classifier   # → sb_finetune/assets/digits/classifier.safetensors

Images: the 8×8 digits (0..16) upsampled bilinearly to 16×16, scaled to [-1, 1], one channel.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

ASSETS = os.path.join(os.path.dirname(__file__), "assets", "digits")
BASE_DIR = os.path.join(ASSETS, "ddpm")
CLASSIFIER_FILE = os.path.join(ASSETS, "classifier.safetensors")
SIZE = 16


def load_digits_tensor() -> tuple[torch.Tensor, torch.Tensor]:
    """(images [1797, 1, 16, 16] in [-1, 1], labels [1797])."""
    from ._deps import require

    data = require("sklearn.datasets").load_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return x * 2 - 1, torch.tensor(data.target, dtype=torch.long)


def base_unet():
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=SIZE, in_channels=1, out_channels=1, block_out_channels=(32, 64), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=8, attention_head_dim=16)


def train_base(out_dir: str = BASE_DIR, iterations: int = 3000, batch: int = 64, lr: float = 2e-3, seed: int = 0) -> None:
    """ε-prediction DDPM on the digits (random ±1 px shifts as augmentation), EMA weights saved."""
    from diffusers import DDPMPipeline, DDPMScheduler

    torch.manual_seed(seed)
    x, _ = load_digits_tensor()
    unet = base_unet()
    ema = base_unet()
    ema.load_state_dict(unet.state_dict())
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True, timestep_spacing="trailing")
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=iterations, pct_start=0.05)
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for it in range(iterations):
        idx = torch.randint(len(x), (batch,), generator=g)
        x0 = _shift(x[idx], g)
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, 1000, (batch,), generator=g)
        loss = F.mse_loss(unet(scheduler.add_noise(x0, noise, t), t).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - 0.999)
        if it % 500 == 0 or it == iterations - 1:
            print(f"base {it:5d}/{iterations}  loss {loss.item():.4f}  {time.time() - t0:.0f}s", flush=True)
    DDPMPipeline(unet=ema, scheduler=scheduler).save_pretrained(out_dir, safe_serialization=True)


def _shift(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random translation by up to 1 pixel (edge padding), per image."""
    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
    dx, dy = torch.randint(0, 3, (2, x.shape[0]), generator=g)
    return torch.stack([padded[i, :, dy[i]:dy[i] + SIZE, dx[i]:dx[i] + SIZE] for i in range(x.shape[0])])


class DigitClassifier(torch.nn.Module):
    """A small CNN on 16×16 gray digits in [-1, 1] → 10 logits."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(1, 32, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.SiLU(),
            torch.nn.AvgPool2d(2), torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.SiLU(), torch.nn.AvgPool2d(2),
            torch.nn.Flatten(), torch.nn.Linear(64 * 4 * 4, 128), torch.nn.SiLU(), torch.nn.Linear(128, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[:-1](x)


def train_classifier(path: str = CLASSIFIER_FILE, epochs: int = 30, seed: int = 0) -> float:
    """Train on 80% (shifts + light noise as augmentation, so generated samples are in-distribution); returns
    held-out accuracy."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    x, y = load_digits_tensor()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    train_idx, test_idx = perm[: int(0.8 * len(x))], perm[int(0.8 * len(x)):]
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        order = train_idx[torch.randperm(len(train_idx), generator=g)]
        for i in range(0, len(order), 64):
            b = order[i:i + 64]
            xb = _shift(x[b], g) + 0.1 * torch.randn(x[b].shape, generator=g)
            loss = F.cross_entropy(model(xb), y[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        accuracy = float((model(x[test_idx]).argmax(1) == y[test_idx]).float().mean())
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file(model.state_dict(), path, metadata={"held_out_accuracy": f"{accuracy:.4f}"})
    print(f"classifier: held-out accuracy {accuracy:.4f} → {path}")
    return accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["base", "classifier"])
    parser.add_argument("--iterations", type=int, default=3000)
    args = parser.parse_args()
    if args.what == "base":
        train_base(iterations=args.iterations)
    else:
        train_classifier()


if __name__ == "__main__":
    main()
