"""The CLIP BPE tokenizer, built offline from the vocabulary open_clip_torch ships.

    tokenizer = build_clip_tokenizer()                    # SD 1.x/2.x, SDXL tokenizer: pads with <|endoftext|>
    tokenizer_2 = build_clip_tokenizer(pad_token="!")     # SDXL tokenizer_2: pads with "!" (id 0)
    batch = encode_prompts(tokenizer, ["a photo of a cat"])
    batch["input_ids"]  # [1, 77] int32: 49406 320 1125 539 320 2368 49407 49407 ...

The vocabulary is rebuilt as OpenAI's conversion did (byte symbols, the same with "</w>", the
48894 merges joined, then <|startoftext|> and <|endoftext|>: 49408 entries), so ids match
open_clip and the released SD tokenizers for ordinary prompts. transformers 5's tokenizer does
no ftfy/HTML clean-up, unlike open_clip's.

Prompts longer than `max_length` tokens raise PromptTooLongError: a truncated prompt would
silently erase (or evaluate) a different concept.

    tokenizer = load_clip_tokenizer("sd-v1-4/tokenizer")   # a saved tokenizer folder

`load_clip_tokenizer` reads a saved folder; a corrupt file (tokenizer.json, vocab.json, ...
that is not JSON) is a TokenizerError naming the file, not an error deep inside transformers.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from hirm_jax.errors import HirmError, InputMissingError
from hirm_jax.fileio import atomic_dir

MAX_LENGTH = 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
NUM_MERGES = 49152 - 256 - 2  # 48894: CLIP's vocabulary is 49408 = 2 * 256 + merges + 2 specials


class PromptTooLongError(HirmError, ValueError):
    """A prompt needs more tokens than the text encoder has positions (`prompt`, its `length`)."""

    def __init__(self, message: str, prompt: Optional[str] = None, length: Optional[int] = None):
        super().__init__(message)
        self.prompt, self.length = prompt, length


class TokenizerError(HirmError, ValueError):
    """A tokenizer folder that is missing, incomplete or corrupt."""


# transformers 5 saves only tokenizer.json; older savers write vocab.json + merges.txt.
TOKENIZER_FILES = ("tokenizer.json", "vocab.json")
TOKENIZER_JSON_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json", "special_tokens_map.json",
                        "added_tokens.json")


def _checked_folder(folder: str | os.PathLike, needs: Sequence[str], kind: str) -> Path:
    """A tokenizer folder that exists, holds one of `needs`, and whose JSON files all parse
    (TokenizerError naming the file and the position)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputMissingError(f"tokenizer folder {folder} does not exist")
    if not any((folder / name).is_file() for name in needs):
        raise TokenizerError(f"{kind} tokenizer folder {folder} has none of {list(needs)}")
    for name in TOKENIZER_JSON_FILES:
        path = folder / name
        if path.is_file():
            try:
                json.loads(path.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as e:
                raise TokenizerError(f"{path} is not valid JSON ({e}): the tokenizer folder is corrupt") from e
    return folder


def _from_pretrained(cls, folder: Path, kind: str):
    try:
        return cls.from_pretrained(str(folder))
    except Exception as e:  # transformers and tokenizers raise many types for a bad folder
        raise TokenizerError(f"cannot load a {kind} tokenizer from {folder}: {type(e).__name__}: {e}") from e


def load_clip_tokenizer(folder: str | os.PathLike):
    """A transformers `CLIPTokenizer` read from a saved folder holding tokenizer.json or
    vocab.json (+ merges.txt); a corrupt or incomplete folder is a TokenizerError naming it."""
    from transformers import CLIPTokenizer

    return _from_pretrained(CLIPTokenizer, _checked_folder(folder, TOKENIZER_FILES, "CLIP"), "CLIP")


def load_t5_tokenizer(folder: str | os.PathLike):
    """A transformers T5 tokenizer read from a saved folder: `T5TokenizerFast` from tokenizer.json,
    else the SentencePiece `T5Tokenizer` from spiece.model (as Flux's tokenizer_2 and SD3's
    tokenizer_3 ship). No BOS; prompts end with </s> (id 1) and are padded with <pad> (id 0)."""
    from transformers import T5Tokenizer, T5TokenizerFast

    folder = _checked_folder(folder, ("tokenizer.json", "spiece.model"), "T5")
    return _from_pretrained(T5TokenizerFast if (folder / "tokenizer.json").is_file() else T5Tokenizer, folder, "T5")


def special_tokens_note(tokenizer) -> str:
    """How a prompt's token count is made up: "with <|startoftext|> and <|endoftext|>" (CLIP), "with </s>" (T5)."""
    bos, eos = getattr(tokenizer, "bos_token", None), getattr(tokenizer, "eos_token", None)
    return " and ".join(t for t in (bos, eos) if t).join(("with ", "")) if (bos or eos) else "with special tokens"


def clip_bpe_path() -> Path:
    """open_clip's `bpe_simple_vocab_16e6.txt.gz`, found without importing open_clip (which needs torchvision)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the CLIP BPE vocabulary comes from open_clip_torch: "
                                "pip install --no-deps open_clip_torch")
    path = Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise FileNotFoundError(f"open_clip_torch is installed but has no {path.name} at {path}")
    return path


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode symbols."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes)))


def clip_vocab_and_merges(bpe_path: Optional[Path] = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    lines = gzip.open(bpe_path or clip_bpe_path()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:NUM_MERGES + 1]]  # line 0 is a version header
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != 49408:
        raise ValueError(f"the CLIP vocabulary must have 49408 entries but has {len(vocab)} (wrong BPE file?)")
    return vocab, merges


def build_clip_tokenizer(out_dir: Optional[str | os.PathLike] = None, pad_token: str = EOS):
    """A transformers `CLIPTokenizer` (model_max_length 77), saved to `out_dir` when given.

    pad_token: "<|endoftext|>" for SD 1.x/2.x and SDXL's tokenizer; "!" for SDXL's tokenizer_2.
    """
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges()
    if pad_token not in vocab:
        raise ValueError(f"pad_token must be a single CLIP token but {pad_token!r} is not in the vocabulary")
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, unk_token=EOS, bos_token=BOS, eos_token=EOS,
                              pad_token=pad_token, model_max_length=MAX_LENGTH)
    if out_dir is not None:
        # model_max_length must be in the saved config, or diffusers pads to a huge length.
        # vocab.json + merges.txt let transformers 4.x's slow CLIPTokenizer read the folder too.
        with atomic_dir(out_dir) as tmp:
            tokenizer.save_pretrained(str(tmp))
            (tmp / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
            (tmp / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return tokenizer


def encode_prompts(tokenizer, prompts: Sequence[str], max_length: int = MAX_LENGTH) -> dict[str, np.ndarray]:
    """Token ids and attention mask ([N, max_length] int32, padded as the tokenizer pads).

    Raises PromptTooLongError naming the prompt and its token count (with BOS and EOS) when
    it does not fit, instead of truncating it.
    """
    if isinstance(prompts, str):
        raise TypeError("prompts must be a sequence of strings, not one string")
    prompts = list(prompts)
    lengths = [len(ids) for ids in tokenizer(prompts, truncation=False, padding=False, verbose=False)["input_ids"]]
    for prompt, n in zip(prompts, lengths):
        if n > max_length:
            raise PromptTooLongError(f"prompt must fit in {max_length} tokens ({special_tokens_note(tokenizer)}) "
                                     f"but has {n}: {prompt!r}", prompt, n)
    batch = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=False, return_tensors="np")
    return dict(input_ids=batch["input_ids"].astype(np.int32), attention_mask=batch["attention_mask"].astype(np.int32))


def prompt_ids(tokenizer, prompts, length: int = 77) -> np.ndarray:
    """[N, length] token ids of prompts given as strings or as id rows (BOS ... EOS and padding:
    what `hirm-jax attack` writes; checked: length, vocabulary)."""
    prompts = list(prompts)
    texts = [p for p in prompts if isinstance(p, str)]
    encoded = iter(encode_prompts(tokenizer, texts, length)["input_ids"] if texts else ())
    rows = []
    for i, prompt in enumerate(prompts):
        row = next(encoded) if isinstance(prompt, str) else np.asarray(prompt, np.int64)
        if row.shape != (length,) or row.min() < 0 or row.max() >= len(tokenizer):
            raise ValueError(f"prompt {i} given as token ids must be {length} ids in [0, {len(tokenizer)}) but has "
                             f"shape {row.shape} and range [{row.min()}, {row.max()}]")
        rows.append(row)
    return np.stack(rows).astype(np.int32) if rows else np.zeros((0, length), np.int32)
