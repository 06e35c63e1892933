"""The CLIP BPE tokenizer built offline from open_clip's bundled merges file (no hub download).

SD's text encoders, OpenAI CLIP, the LAION ViT-H-14 models, HPSv2 and PickScore all share this vocabulary.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import tempfile


@functools.lru_cache(maxsize=1)
def clip_tokenizer_files() -> str:
    """Write vocab.json + merges.txt of the CLIP BPE tokenizer (from open_clip's bundled file); return the folder."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    with gzip.open(default_bpe()) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]  # the slice open_clip uses
    vocab = list(bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder = os.path.join(tempfile.gettempdir(), f"sb_finetune_clip_tokenizer_{os.getpid()}")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({tok: i for i, tok in enumerate(vocab)}, f)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    return folder


def clip_tokenizer():
    """The real CLIP tokenizer, offline.

    Padding convention: HF pads with <|endoftext|> (49407) to 77 tokens, as SD's hub tokenizer does;
    open_clip pads with 0. The two agree on every position where `attention_mask == 1`, i.e.
    `ids.masked_fill(attention_mask == 0, 0) == open_clip.tokenize(text)`. `model_max_length=77` is
    required: without it diffusers overflows computing the max length.
    """
    from transformers import CLIPTokenizer

    folder = clip_tokenizer_files()
    return CLIPTokenizer(
        os.path.join(folder, "vocab.json"),
        os.path.join(folder, "merges.txt"),
        pad_token="<|endoftext|>",
        model_max_length=77,
    )
