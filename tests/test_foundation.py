"""The package installs under the right names and the tiny-model kit builds real pipelines offline."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sb_finetune import testing

PROMPTS = ["a photo of a cat", "Hello, World!!", "an astronaut riding a horse on mars, 4k", "", "ünïcödé & <tags>"]


def test_packages_import_under_sb_finetune_only(tmp_path):
    code = "import sb_finetune, sb_finetune.pipelines, sb_finetune.rewards, sb_finetune.testing"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)
    for bare in ("rewards", "pipelines"):
        r = subprocess.run([sys.executable, "-c", f"import {bare}"], cwd=tmp_path, capture_output=True)
        assert r.returncode != 0, f"a bare '{bare}' package is importable from outside the repo"


def test_every_subpackage_is_declared_for_installation():
    """pyproject lists the packages explicitly (package-dir maps pipelines/ and rewards/): a new subpackage that is
    not listed imports from the checkout but is missing from a wheel."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    root = Path(__file__).resolve().parents[1]
    setup = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = set()
    for name, folder in setup["package-dir"].items():
        for init in (root / folder).rglob("__init__.py"):
            found.add(".".join([name, *init.parent.relative_to(root / folder).parts]))
    assert found == set(setup["packages"]), f"undeclared: {sorted(found - set(setup['packages']))}"


def test_import_is_light(tmp_path):
    code = "import sys, sb_finetune; heavy = {'diffusers', 'transformers', 'open_clip', 'peft'} & set(sys.modules); print(sorted(heavy))"
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]"


def test_missing_optional_dependency_names_the_extra():
    from sb_finetune._deps import require

    with pytest.raises(ImportError, match=r"pip install"):
        require("sb_finetune_no_such_module")
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *a, **k):
        if name.startswith("sklearn"):
            raise ImportError("no sklearn")
        return real_import(name, *a, **k)

    builtins.__import__ = fake_import
    try:
        sys.modules.pop("sklearn", None)
        with pytest.raises(ImportError, match=r"sb-finetune\[digits\]"):
            require("sklearn")
    finally:
        builtins.__import__ = real_import


@pytest.mark.parametrize("prompt", PROMPTS)
def test_tokenizer_matches_open_clip(prompt):
    import open_clip

    tok = testing.clip_tokenizer()
    enc = tok(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert enc.input_ids.shape == (1, 77)
    # padding convention: HF pads with <|endoftext|>, open_clip with 0; equal where attention_mask == 1
    ids = enc.input_ids.masked_fill(enc.attention_mask == 0, 0)
    assert torch.equal(ids, open_clip.tokenize([prompt]))
    assert len(tok) == 49408


def test_tokenizer_truncates_long_prompts_like_open_clip():
    import open_clip

    prompt = " ".join(["word"] * 200)
    enc = testing.clip_tokenizer()(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert torch.equal(enc.input_ids, open_clip.tokenize([prompt]))


@pytest.mark.parametrize("name", sorted(testing.TINY_PIPELINES))
def test_tiny_pipeline_stock_call(name):
    pipe = testing.TINY_PIPELINES[name]()
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=2, output_type="pt", generator=torch.Generator().manual_seed(0))
    if name == "ddpm":
        out = pipe(batch_size=2, **kw)
        size = testing.LATENT_SIZE
    else:
        out = pipe(prompt=["a cat", "a dog"], **kw)
        size = testing.IMAGE_SIZE
    images = out.images
    assert tuple(images.shape) == (2, 3, size, size)
    assert torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1


@pytest.mark.parametrize("name", sorted(testing.TINY_PIPELINES))
def test_tiny_pipeline_is_deterministic_from_seed(name):
    def weights(seed):
        pipe = testing.TINY_PIPELINES[name](seed=seed)
        return dict((pipe.components.get("unet") or pipe.components["transformer"]).named_parameters())

    sa, sb, sc = weights(3), weights(3), weights(4)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_tiny_sd_round_trips_through_save_pretrained(tmp_path):
    from diffusers import StableDiffusionPipeline

    pipe = testing.tiny_sd_pipeline()
    pipe.save_pretrained(tmp_path)
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").exists()
    again = StableDiffusionPipeline.from_pretrained(tmp_path, safety_checker=None, requires_safety_checker=False)
    kw = dict(prompt="a cat", num_inference_steps=2, output_type="pt")
    x = pipe(**kw, generator=torch.Generator().manual_seed(1)).images
    y = again(**kw, generator=torch.Generator().manual_seed(1)).images
    torch.testing.assert_close(x, y)
