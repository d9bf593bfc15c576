"""Which tokens embedding mode trains (`embedding_token`, or `embedding_config`: EveryDream2's
textual_inversion.json), and whether the captions write them. Imports no torch: the preflight reads it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from common.files import read_json_object
from trainer.config.schema import MAX_EMBEDDING_VECTORS
from trainer.errors import UserError


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
    """The tokens a config trains: embedding_config's list, or embedding_token's one; () outside embedding mode."""
    if cfg.embedding_config is not None:
        return read_token_file(Path(cfg.embedding_config))
    if cfg.embedding_token is None:
        return ()
    return (EmbeddingToken(cfg.embedding_token.strip(), cfg.embedding_init, cfg.embedding_vectors),)


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


# ---------------------------------------------------------------- the captions name the tokens


def names_token(caption: str, token: str) -> bool:
    """Whether a caption writes `token` as a word of its own (any case, any spacing inside it)."""
    words = r"\s+".join(re.escape(word) for word in token.split())
    return re.search(rf"(?<!\w){words}(?!\w)", caption, flags=re.IGNORECASE) is not None


def unnamed_tokens(tokens: tuple[EmbeddingToken, ...], captions: list[str]) -> list[str]:
    """The tokens that no caption writes: they would never train."""
    return [t.token for t in tokens if not any(names_token(caption, t.token) for caption in captions)]
