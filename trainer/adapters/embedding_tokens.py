"""Which tokens embedding mode trains (`embedding_token`, or `embedding_config`: EveryDream2's
textual_inversion.json), what no token may be, and whether the captions write them (the preflight's check).
Imports no torch: the preflight reads it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from common.files import read_json_object
from trainer.config.schema import MAX_EMBEDDING_VECTORS
from trainer.errors import UserError

# characters no file name may hold on Windows or Linux
_UNSAFE = re.compile(r'[<>:"/\\|?*\x00-\x1f]')


@dataclass(frozen=True)
class EmbeddingToken:
    token: str  # as the captions write it (CLIP reads text lower-cased: any case)
    initializer: str  # the words whose token vectors the new ones start from
    vectors: int = 1

    def names(self) -> list[str]:
        """The tokens of its vectors as the tokenizer holds them: itself, then diffusers' T_1 ... T_{n-1}, lower-cased
        as CLIP reads text (diffusers' pipelines look the tokens they read up by name)."""
        token = self.token.lower()
        return [token] + [f"{token}_{i}" for i in range(1, self.vectors)]


def configured_tokens(cfg) -> tuple[EmbeddingToken, ...]:
    """The tokens a config trains: embedding_config's list, or embedding_token's one; () outside embedding mode.
    Raises UserError with every problem of the tokens (token_problems)."""
    if cfg.embedding_config is not None:
        return read_token_file(Path(cfg.embedding_config))
    if cfg.embedding_token is None:
        return ()
    token = EmbeddingToken(cfg.embedding_token.strip(), cfg.embedding_init, cfg.embedding_vectors)
    problems = token_problems((token,))
    if problems:
        raise UserError(f"embedding_token: {'; '.join(problems)}.")
    return (token,)


def token_problems(tokens: tuple[EmbeddingToken, ...]) -> list[str]:
    """What no token may be: a name that breaks its captions or its file, or one file for two tokens."""
    problems = []
    for token in tokens:
        name = token.token
        if "," in name:
            problems.append(f"{name!r} holds a comma, at which captions are split into tags; name it without one")
        if token.vectors > 1 and re.search(r"_\d+$", name):
            problems.append(f"{name!r} ends in _<number>, which diffusers' convention reads as another token's extra "
                            f"vector; with {token.vectors} vectors name it otherwise, such as {name.replace('_', '-')!r}")
        if len(file_name(name).encode()) + len(".safetensors") > 255:
            problems.append(f"{name[:40]!r}... is {len(name.encode())} bytes long: its file name would be over the 255 "
                            "bytes file systems allow; name it with a shorter word")
    by_file: dict[str, list[str]] = {}
    for token in tokens:
        by_file.setdefault(bundle_name(token.token).lower(), []).append(token.token)
    problems += [f"{' and '.join(map(repr, names))} would be saved under one file name ({file_name(names[0])!r}); name "
                 "them so that they differ in letters or digits" for names in by_file.values() if len(names) > 1]
    return problems


def file_name(token: str) -> str:
    """The file stem a token is saved under, which AUTOMATIC1111 and ComfyUI take as its name: the token, with
    characters that no file name may hold replaced by '_'."""
    return _UNSAFE.sub("_", token).strip(". ") or "embedding"


def bundle_name(token: str) -> str:
    """A token's name inside a LoRA file: its file name without dots (AUTOMATIC1111 splits the key at them)."""
    return file_name(token).replace(".", "_")


def read_token_file(path: Path) -> tuple[EmbeddingToken, ...]:
    """EveryDream2's textual_inversion.json: {"tokens": [{"token", "initializer", "vector_length" (default 1)}]}; its
    "documentation" is not read. Every problem of the file in one UserError."""
    data, problem = read_json_object(path)
    if data is None:
        raise UserError(f"embedding_config {path}: {problem} Expected EveryDream2's textual_inversion.json: "
                        '{"tokens": [{"token": "sks-dog", "initializer": "dog", "vector_length": 1}]}.')
    entries = data.get("tokens")
    if not isinstance(entries, list) or not entries:
        raise UserError(f"embedding_config {path}: no \"tokens\" list; expected one entry per token, such as "
                        '{"token": "sks-dog", "initializer": "dog", "vector_length": 1}.')
    tokens, problems = [], []
    for index, entry in enumerate(entries, 1):
        token, problem = _token_entry(entry)
        if problem:
            problems.append(f"tokens entry {index}: {problem}")
        elif token.token.lower() in {t.token.lower() for t in tokens}:
            problems.append(f"tokens entry {index}: {token.token!r} is named twice")
        else:
            tokens.append(token)
    problems += token_problems(tuple(tokens))
    if problems:
        raise UserError(f"embedding_config {path}: " + "; ".join(problems) + ".")
    return tuple(tokens)


def _token_entry(entry) -> tuple[EmbeddingToken | None, str | None]:
    if not isinstance(entry, dict):
        return None, f"got {entry!r}, expected an object with token and initializer"
    token, initializer, vectors = entry.get("token"), entry.get("initializer"), entry.get("vector_length", 1)
    if not isinstance(token, str) or not token.strip():
        return None, "its \"token\" must be the word the captions use, such as \"sks-dog\""
    if not isinstance(initializer, str) or not initializer.strip():
        return None, f"{token!r} needs an \"initializer\": words close to its meaning, such as \"dog\""
    if not isinstance(vectors, int) or isinstance(vectors, bool) or not 1 <= vectors <= MAX_EMBEDDING_VECTORS:
        return None, f"{token!r} has vector_length {vectors!r}, expected a whole number from 1 to {MAX_EMBEDDING_VECTORS}"
    return EmbeddingToken(token.strip(), initializer, vectors), None


# ---------------------------------------------------------------- the tokenizer and the captions


def checked_tokens(cfg, scan, validation: dict, notices: list[str]) -> tuple[EmbeddingToken, ...]:
    """The preflight's tokens to train (embedding_config's, or embedding_token's): each written in some caption of
    `scan` (the training images; `validation`: the held-out sets), since a token no caption writes would never
    train; a word of the vocabulary only with one vector; captions that its vectors make too long for the text
    encoder's window, said in `notices`. Read with SD's own vocabulary (the same for SD1 and SD2), before any
    model loads. Raises UserError with every problem."""
    from convert.tokenizer import clip_tokenizer
    from data.captions import spell_out_vectors, token_groups

    tokens = configured_tokens(cfg)
    if cfg.embedding_config is not None:
        notices.append(f"embedding_config {cfg.embedding_config}: training " + ", ".join(
            f"'{t.token}' ({t.vectors} vector{'s' if t.vectors > 1 else ''}, from '{t.initializer}')" for t in tokens)
            + "; each starts from its initializer's token embeddings.")
    tokenizer = clip_tokenizer()
    words = [t for t in tokens if vocabulary_word(tokenizer, t) is not None]
    problems = [word_with_vectors(t) for t in words if t.vectors > 1]
    items = scan.items if scan else []
    unnamed = unnamed_tokens(tokens, [item.caption for item in items]) if scan else []
    if unnamed:
        held = sum(len(v) for v in validation.values())
        problems.append(f"embedding token{'s' if len(unnamed) > 1 else ''} {', '.join(map(repr, unnamed))} "
                        f"{'is' if len(unnamed) == 1 else 'are'} written in no training caption of data_root "
                        f"{cfg.data_root} ({len(items)} images{f', {held} more held out for validation' if held else ''})"
                        ", so it would never train. Write the token into the captions of the images that show its "
                        "concept (e.g. 'a photo of sks-dog'), or name the word those captions already use")
    if problems:
        raise UserError("; ".join(problems) + ".")
    tokenizer.add_tokens([name for t in tokens if t not in words for name in t.names()])
    groups = token_groups(tokenizer)
    cut = [item for item in items if named_tokens(item.caption, tokens) and len(tokenizer(
        spell_out_vectors(item.caption, groups)).input_ids) > tokenizer.model_max_length]
    if cut:
        notices.append(f"{len(cut)} caption{'s' if len(cut) > 1 else ''} naming an embedding's token "
                       f"{'are' if len(cut) > 1 else 'is'} longer than the text encoder's {tokenizer.model_max_length}"
                       f"-token window once its vectors are spelled out (e.g. {cut[0].path.name}): the end is cut, and "
                       "a vector cut off does not train there. Shorten them, or train fewer embedding_vectors.")
    return tokens




def vocabulary_word(tokenizer, token: EmbeddingToken) -> int | None:
    """The id of a token the tokenizer already reads as one word of its vocabulary (it trains in place), else None."""
    known = tokenizer(token.token, add_special_tokens=False).input_ids
    return known[0] if len(known) == 1 and token.names()[0] not in tokenizer.get_added_vocab() else None


def word_with_vectors(token: EmbeddingToken) -> str:
    return (f"embedding token {token.token!r} is a word the tokenizer already has: it can train in its own row with 1 "
            f"vector (as EveryDream2's plugin trains it), not {token.vectors}. Set its vector count to 1, or name a new "
            f"token such as '<{token.token}>'.")




def named_tokens(caption: str, tokens: tuple[EmbeddingToken, ...]) -> set[str]:
    """The tokens a caption writes, found as the tokenizer finds its added tokens: anywhere, in any case and
    spacing, the longest where two start at one place ("hat*" is not "hat")."""
    return {tokens[int(match.lastgroup[1:])].token for match in _pattern(tokens).finditer(caption)}


def unnamed_tokens(tokens: tuple[EmbeddingToken, ...], captions: list[str]) -> list[str]:
    """The tokens that no caption writes: they would never train."""
    named = set().union(*(named_tokens(caption, tokens) for caption in captions)) if captions else set()
    return [t.token for t in tokens if t.token not in named]


def _pattern(tokens: tuple[EmbeddingToken, ...]) -> re.Pattern:
    ordered = sorted(range(len(tokens)), key=lambda i: -len(tokens[i].token))
    return re.compile("|".join(f"(?P<t{i}>{written(tokens[i].token)})" for i in ordered), flags=re.IGNORECASE)


def written(token: str) -> str:
    """A regular expression of `token` as a caption may write it: any case (with IGNORECASE), any spacing."""
    return r"\s+".join(re.escape(word) for word in token.split())
