"""Captions: where an image's caption comes from, per-step caption variations, token ids. (The other files
beside images, the per-folder and per-image training settings, are data/settings.py's.)

An image's caption is the first of these that exists (EveryDream2's rules):
  1. `<stem>.txt`, then `<stem>.caption`: the whole file, stripped;
  2. `<stem>.yaml` / `<stem>.yml` / `<stem>.json`: `main_prompt` followed by its `tags` (strings, or
     `{"tag": ...}` entries; tag weights are not used), else `caption`;
  3. the file name up to the first `_` (`a red car_03.jpg` -> `a red car`).
Text files may be UTF-8 with or without a BOM and with CRLF line ends.

Captions become token ids in one place, `tokenize_captions`, for training rows and validation batches alike; a
token that stands for several vectors (an embedding's, diffusers' convention) is spelled out there first.
Reading captions imports no torch (the preflight and `--dry_run` scan with it).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from common.files import parse_problem

if TYPE_CHECKING:
    import torch
    from transformers import CLIPTokenizer

TEXT_SIDECARS = (".txt", ".caption")
STRUCTURED_SIDECARS = (".yaml", ".yml", ".json")

class CaptionError(ValueError):
    """A caption or settings file exists but cannot be used; the message names the file and the fix."""


def read_text(path: Path) -> str:
    # utf-8-sig drops a BOM (Windows Notepad writes one); strip() drops CRLF and trailing newlines
    try:
        return path.read_text(encoding="utf-8-sig").strip()
    except UnicodeDecodeError as err:
        raise CaptionError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8.") from None


def parse_structured(path: Path) -> object:
    """The yaml or json document of `path`; CaptionError when it is not valid."""
    text = read_text(path)
    try:
        return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise CaptionError(f"{path} is not valid {path.suffix[1:]} ({parse_problem(err)}); correct it, or delete "
                           "the file.") from None


def caption_from_structured(path: Path) -> str:
    """`main_prompt` + `tags`, else `caption`, from a yaml or json sidecar."""
    data = parse_structured(path)
    if not isinstance(data, dict):
        raise CaptionError(f"{path} must hold a mapping with main_prompt/tags or caption, found {type(data).__name__}.")
    parts: list[str] = []
    if data.get("main_prompt"):
        parts.append(str(data["main_prompt"]).strip())
    for tag in data.get("tags") or []:
        tag = tag.get("tag") if isinstance(tag, dict) else tag
        if tag:
            parts.append(str(tag).strip())
    if parts:
        return ", ".join(parts)
    if data.get("caption"):
        return str(data["caption"]).strip()
    raise CaptionError(f"{path} has none of main_prompt, tags or caption; add one, or delete the file.")


def caption_from_filename(image_path: Path) -> str:
    return image_path.stem.split("_")[0].strip()


def read_caption(image_path: Path) -> str:
    """The caption of `image_path` by the rules in this module's docstring."""
    for suffix in TEXT_SIDECARS:
        sidecar = image_path.with_suffix(suffix)
        if sidecar.is_file():
            # a caption is one line of text; line breaks (CRLF or LF) inside it are spaces
            return " ".join(line.strip() for line in read_text(sidecar).splitlines() if line.strip())
    for suffix in STRUCTURED_SIDECARS:
        sidecar = image_path.with_suffix(suffix)
        if sidecar.is_file():
            return caption_from_structured(sidecar)
    return caption_from_filename(image_path)


def shuffle_tags(caption: str, keep_tags: int, rng: random.Random) -> str:
    """Keep the first comma chunk (the main prompt) and the next `keep_tags` tags; shuffle the rest.

    Booru-style tag captions have no word order worth learning; shuffling stops the model tying a concept to a
    position in the 77-token window (EveryDream2's shuffle_tags).
    """
    chunks = [c.strip() for c in caption.split(",") if c.strip()]
    fixed, rest = chunks[: 1 + keep_tags], chunks[1 + keep_tags :]
    rng.shuffle(rest)
    return ", ".join(fixed + rest)


def tokenize_captions(tokenizer: CLIPTokenizer, captions: list[str]) -> torch.Tensor:
    """(len(captions), model_max_length) token ids: each caption padded to the text encoder's window (77 for
    CLIP), or cut to it, so a batch's rows stack into one tensor; multi-vector tokens spelled out."""
    groups = token_groups(tokenizer)
    return tokenizer(
        [spell_out_vectors(caption, groups) for caption in captions], padding="max_length", truncation=True,
        max_length=tokenizer.model_max_length, return_tensors="pt"
    ).input_ids


def token_groups(tokenizer: CLIPTokenizer) -> dict[str, list[str]]:
    """Each token added to the tokenizer with the tokens of its vectors, by diffusers' convention (what its
    `load_textual_inversion` adds): T with T_1 ... T_{n-1} also added stands for all n; any other added token for
    itself. T -> [T, T_1, ...]."""
    added = tokenizer.get_added_vocab()
    groups = {}
    for token in added:
        names = [token]
        while f"{token}_{len(names)}" in added:
            names.append(f"{token}_{len(names)}")
        groups[token] = names
    return groups


def spell_out_vectors(text: str, groups: dict[str, list[str]]) -> str:
    """`text` with each multi-vector token T written as its n tokens "T T_1 ... T_{n-1}", found as the tokenizer
    finds added tokens: anywhere, in any case and spacing, the longest of those starting at one place (so neither
    a written T_1 nor a longer token that starts with T is spelled out again)."""
    if not any(len(names) > 1 for names in groups.values()):
        return text
    ordered = sorted(groups, key=len, reverse=True)
    pattern = "|".join(r"\s+".join(re.escape(word) for word in token.split()) for token in ordered)
    lowered = {token.lower(): token for token in groups}

    def spelled(match: re.Match) -> str:
        token = lowered.get(" ".join(match.group(0).lower().split()))
        return " ".join(groups[token]) if token is not None and len(groups[token]) > 1 else match.group(0)

    return re.sub(pattern, spelled, text, flags=re.IGNORECASE)
