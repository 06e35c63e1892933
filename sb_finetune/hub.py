"""An adapter folder on disk or on the Hugging Face Hub: check it, describe it (model card), publish it."""

from __future__ import annotations

import functools
import json
import os
import socket
from urllib.parse import urlparse
from urllib.request import getproxies, proxy_bypass

from .control import ADAPTER_FILE, META_FILE

CARD_FILE = "README.md"


@functools.lru_cache(maxsize=1)
def hub_offline() -> bool:
    """True when the Hugging Face Hub cannot be reached: `HF_HUB_OFFLINE` is set, or its endpoint (`HF_ENDPOINT`; the
    proxy configured for it, if any) does not take a TCP connection within 3 s. Checked once a process; hub loads then
    read the local cache only (`local_files_only`), so a file that is not there fails at once, with one sentence,
    instead of after huggingface_hub's five retries and their log lines."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return True
    url = urlparse(constants.ENDPOINT)
    proxy = getproxies().get(url.scheme)
    if proxy and not proxy_bypass(url.hostname or ""):  # behind a proxy, the proxy is what must answer
        url = urlparse(proxy if "://" in proxy else f"http://{proxy}")
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=3).close()
    except OSError:
        return True
    return False


def cache_only(name: str) -> bool:
    """Whether a hub load of `name` must read the local cache alone: a hub id (not a local folder) while the Hub is
    unreachable (`hub_offline`)."""
    return not os.path.isdir(name) and hub_offline()


def download_hint(repo: str, *files: str, local_dir: str) -> str:
    """The command that downloads `repo` (or some of its files) into `local_dir`, in backticks (huggingface_hub's CLI)."""
    return f"`hf download {' '.join((repo, *files))} --local-dir {local_dir}`"


def resolve_adapter_folder(path_or_hub_id: str) -> str:
    """A local folder as is; else a hub repo id, downloaded (or read from the cache) with huggingface_hub."""
    if os.path.isdir(path_or_hub_id):
        return path_or_hub_id
    if os.path.exists(path_or_hub_id) or path_or_hub_id.count("/") != 1:
        raise FileNotFoundError(f"'{path_or_hub_id}' is not an adapter folder (and not a hub repo id 'user/name')")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(path_or_hub_id, local_files_only=hub_offline())
    except Exception as err:  # offline, not cached, no such repo, gated
        raise FileNotFoundError(
            f"cannot get the adapter '{path_or_hub_id}' from the Hugging Face Hub ({type(err).__name__}); download it on a "
            f"machine with network ({download_hint(path_or_hub_id, local_dir='adapters/' + path_or_hub_id.split('/')[-1])}) "
            f"and load that folder") from None


def read_adapter_folder(folder: str, require_metadata: bool = True) -> dict:
    """Check the adapter file (present, readable safetensors) and return the metadata of `sb_finetune.json`
    ({} when absent and not required). Errors name the folder and the problem."""
    weights = os.path.join(folder, ADAPTER_FILE)
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"no adapter in '{folder}': {ADAPTER_FILE} is missing (an sb-finetune output folder holds it "
                                f"beside {META_FILE})")
    try:
        from safetensors import safe_open

        with safe_open(weights, framework="pt") as f:
            if not list(f.keys()):
                raise ValueError("it holds no tensors")
    except Exception as err:
        raise ValueError(f"'{weights}' is not a valid safetensors adapter file ({str(err).splitlines()[0]})") from None
    meta_path = os.path.join(folder, META_FILE)
    if not os.path.isfile(meta_path):
        if require_metadata:
            raise FileNotFoundError(f"'{folder}' has {ADAPTER_FILE} but no {META_FILE}: pass base= (the base model) to say "
                                    f"what it adapts, or load it with the stock `load_lora_weights`")
        return {}
    with open(meta_path) as f:
        return json.load(f)


def write_model_card(folder: str, meta: dict) -> str:
    """README.md with the hub's YAML metadata (base_model, tags, library_name) and how to load the adapter."""
    base = meta.get("base_model") or "unknown"
    reward = meta.get("reward", "a reward")
    sampler = meta.get("sampler", {})
    lines = [
        "---",
        f"base_model: {base}" if not str(base).startswith("tiny:") else "# base_model: a tiny offline test model",
        "library_name: diffusers",
        "tags:", "- sb-finetune", "- lora", "- diffusers", "- reward-fine-tuning", f"- {meta.get('family', 'diffusion')}",
        "---", "",
        f"# LoRA control adapter for {base}", "",
        f"Fine-tuned with sb-finetune on reward `{reward}` with KL weight alpha = {meta.get('alpha')}, "
        f"as stochastic optimal control: the adapter is the control drift of the base sampler "
        f"({sampler.get('steps', '?')} steps, eta = {sampler.get('eta', '?')}), and the target is the base model tilted by "
        f"exp(reward / alpha). Steps trained: {meta.get('steps', '?')}.", "",
        "```python",
        "from sb_finetune.pipelines import load_finetuned",
        "pipe = load_finetuned(\"<this folder or repo id>\")  # base model + adapter + the memoryless sampler",
        "images = pipe(\"a prompt\").images",
        "```", "",
        f"Or with stock diffusers: `DiffusionPipeline.from_pretrained(\"{base}\").load_lora_weights(\"<this folder or repo id>\")`.",
        "",
    ]
    if sampler.get("timesteps"):
        lines += [f"Trained on the timesteps {sampler['timesteps']}: `load_finetuned` samples on them; with stock diffusers "
                  f"pass them as `timesteps=` where the pipeline's `__call__` takes one (DDPMPipeline takes none).", ""]
    path = os.path.join(folder, CARD_FILE)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    return path


def push_to_hub(folder: str, repo_id: str, token: str | None = None, private: bool = False,
                allow_patterns: list[str] | None = None) -> str:
    """Upload the adapter folder (weights, metadata, model card; `allow_patterns` to pick files) to `repo_id`;
    returns the repo URL."""
    read_adapter_folder(folder)
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="sb-finetune adapter", allow_patterns=allow_patterns)
    except Exception as err:
        raise RuntimeError(f"cannot push '{folder}' to the Hugging Face Hub repo '{repo_id}' ({type(err).__name__}: "
                           f"{str(err).splitlines()[0][:160]}); the folder is unchanged, push it later with "
                           f"`hf upload {repo_id} {folder}`") from None
    return str(url)
