"""A real CLIP tokenizer built offline from open_clip's BPE file (shipped with the world).

The world ships the built folder, so loading it never needs open_clip; this builder is only
used by `world train`. open_clip is not imported (it needs torchvision): only its data file
is read.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
from pathlib import Path

MAX_LENGTH = 77


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _bpe_file() -> Path:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("building the CLIP tokenizer needs open_clip_torch's BPE file "
                                "(pip install --no-deps open_clip_torch)")
    return Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"


def build_clip_tokenizer(out_dir: str | os.PathLike):
    """Write a CLIPTokenizer folder (vocab.json, merges.txt, configs; 77 positions) and return it."""
    from transformers import CLIPTokenizer

    lines = gzip.open(_bpe_file()).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408, len(vocab)
    tok = CLIPTokenizer(vocab={v: i for i, v in enumerate(vocab)}, merges=merges,
                        model_max_length=MAX_LENGTH, bos_token="<|startoftext|>",
                        eos_token="<|endoftext|>", unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.save_pretrained(str(out_dir))
    return tok
