"""The CLIP BPE tokenizer, built offline from the vocabulary the project ships.

Stable Diffusion 1.x and 2.x both tokenize with OpenAI's CLIP BPE (49408 tokens). The merges file
`assets/bpe_simple_vocab_16e6.txt.gz` is OpenAI CLIP's own (MIT licensed, the same file PyPI's
open_clip_torch ships); shipping it means conversion and the tiny demo never touch the network.
Hugging Face's vocabulary is derived from it exactly as `openai/CLIP`'s `SimpleTokenizer` does:
256 byte characters, the same with `</w>`, the first 48894 merges, then the two special tokens.
"""

from __future__ import annotations

import functools
import gzip
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the constants below are read by the dry run, which must not import transformers
    from transformers import CLIPTokenizer

BPE_VOCAB_PATH = Path(__file__).parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
CLIP_VOCAB_SIZE = 49408
CLIP_MAX_LENGTH = 77
# 49408 = 2 * 256 byte tokens + merges + 2 specials
_NUM_MERGES = CLIP_VOCAB_SIZE - 2 * 256 - 2


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode table (order matters: it fixes token ids)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


@functools.lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Token -> id table and merge list, identical to the `openai/clip-vit-large-patch14` tokenizer files."""
    lines = gzip.open(BPE_VOCAB_PATH).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]  # line 0 is a version header
    byte_chars = list(_bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    tokens += ["".join(merge) for merge in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    assert len(tokens) == CLIP_VOCAB_SIZE, len(tokens)
    return {token: i for i, token in enumerate(tokens)}, merges


def clip_tokenizer(pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """The CLIP tokenizer SD uses. SD1 pads with `<|endoftext|>`; SD2 (OpenCLIP) repos pad with `!`."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges()
    return CLIPTokenizer(
        vocab=dict(vocab), merges=list(merges), pad_token=pad_token, model_max_length=CLIP_MAX_LENGTH
    )
