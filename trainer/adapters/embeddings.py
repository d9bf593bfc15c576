"""Embedding mode (`embedding_token` or `embedding_config`): new token vectors trained on a frozen model (textual
inversion; beside a LoRA, pivotal tuning). Which tokens are `embedding_tokens.py`'s; the files a save writes are
`embedding_file.py`'s.

- **Tokens.** Each token, as the captions write it, gets `vectors` rows. A token new to the vocabulary is added to
  the tokenizer, with T_1 ... T_{n-1} for its further vectors: diffusers' convention (`load_textual_inversion`), by
  which a prompt's T stands for all n (data/captions.py spells them out, in training captions and this project's
  prompts alike; diffusers' own pipelines do it themselves). A token the tokenizer already reads as one word (EveryDream2's example trains "cane") trains
  that word's own row, with one vector, as EveryDream2's plugin does.
- **Rows.** The text encoder's token table stays as it was loaded, frozen; `TrainedRows` stands in front of it: a
  trained id's lookup returns its trained row (an fp32 master), every other id the table's. The rows are the only
  trained parameters of the text encoder (beside its LoRA adapters, in pivotal tuning with lora_text_encoder), and
  nothing else of the model changes.
- **Starting values.** The token embeddings of the initializer's words, cycled over the vectors (kohya's and
  AUTOMATIC1111's way; EveryDream2's plugin started from the text encoder's output states instead).
"""

from __future__ import annotations

import torch

from trainer.adapters.embedding_tokens import EmbeddingToken, vocabulary_word, word_with_vectors
from trainer.errors import UserError

ROWS = "trained_rows"  # the parameter's name: state-dict keys end in `token_embedding.trained_rows`


class TrainedRows(torch.nn.Module):
    """The text encoder's token table with some rows trained: a lookup of one of `ids` returns its row of
    `trained_rows` (fp32, cast to the table's dtype), any other id the frozen table's own row. Ids past the table
    (tokens added to the tokenizer) exist only here. The table keeps its parameter name (`weight`), so the text
    encoder's state-dict keys are those of the base."""

    def __init__(self, table: torch.nn.Embedding, ids: list[int], rows: torch.Tensor,
                 tokens: dict[str, list[int]], in_place: list[str]):
        super().__init__()
        self.weight = table.weight
        self.register_buffer("ids", torch.tensor(ids, dtype=torch.long, device=table.weight.device),
                             persistent=False)
        self.trained_rows = torch.nn.Parameter(rows.detach().to(table.weight.device, torch.float32).clone())
        self.tokens = tokens  # token -> its vectors' ids, in order
        self.in_place = in_place  # tokens that are words of the vocabulary, trained in their own row

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        found = torch.nn.functional.embedding(input_ids.clamp(max=self.weight.shape[0] - 1), self.weight)
        hits = input_ids.unsqueeze(-1) == self.ids
        trained = self.trained_rows.to(found.dtype)[hits.int().argmax(-1)]
        return torch.where(hits.any(-1, keepdim=True), trained, found)

    def vectors(self) -> dict[str, torch.Tensor]:
        """Each token's trained vectors, [vectors, width], detached on the CPU in fp32."""
        position = {int(i): n for n, i in enumerate(self.ids.tolist())}
        rows = self.trained_rows.detach().float().cpu()
        return {token: rows[[position[i] for i in ids]].clone() for token, ids in self.tokens.items()}

    def describe(self) -> str:
        parts = [f"'{token}' ({len(ids)} vector{'s' if len(ids) > 1 else ''}"
                 f"{', its own row: a word the tokenizer has' if token in self.in_place else ''})"
                 for token, ids in self.tokens.items()]
        return (f"Embeddings: {', '.join(parts)}, {self.trained_rows.numel()} trainable values; the text encoder's "
                "own weights stay frozen.")


def add_embeddings(text_encoder: torch.nn.Module, tokenizer, tokens: tuple[EmbeddingToken, ...]) -> TrainedRows:
    """Add `tokens` to the tokenizer (in place) and put their rows, started from each initializer, in front of the
    text encoder's token table. Returns the rows' module."""
    table = text_encoder.get_input_embeddings()
    starts = [_starting_rows(tokenizer, table, token) for token in tokens]  # read before any token is added
    ids: dict[str, list[int]] = {}
    in_place = []
    for token in tokens:
        ids[token.token] = _token_ids(tokenizer, token, table.num_embeddings)
        if ids[token.token][0] < table.num_embeddings:
            in_place.append(token.token)
    rows = TrainedRows(table, [i for group in ids.values() for i in group], torch.cat(starts), ids, in_place)
    text_encoder.set_input_embeddings(rows)
    return rows


def _token_ids(tokenizer, token: EmbeddingToken, table_size: int) -> list[int]:
    """The ids of a token's vectors: a word the tokenizer already reads as one token keeps its id (one vector);
    any other token and its T_i are added as new tokens."""
    known = vocabulary_word(tokenizer, token)
    if known is not None:
        if token.vectors > 1:
            raise UserError(word_with_vectors(token))
        return [known]
    names = token.names()
    taken = [name for name in names if name in tokenizer.get_added_vocab()]
    if taken:
        raise UserError(f"embedding token {token.token!r}: the tokenizer already has {', '.join(taken)} as added "
                        "tokens (another embedding in this run, or one saved into the base model); name another token.")
    tokenizer.add_tokens(names)
    ids = tokenizer.convert_tokens_to_ids(names)
    if min(ids) < table_size:
        raise UserError(f"embedding token {token.token!r} could not be added as a new token (the tokenizer mapped it "
                        "onto a piece of its vocabulary); name another token, such as one in <angle brackets>.")
    return ids


def _starting_rows(tokenizer, table: torch.nn.Embedding, token: EmbeddingToken) -> torch.Tensor:
    ids = tokenizer(token.initializer, add_special_tokens=False).input_ids
    if not ids or max(ids) >= table.num_embeddings:
        what = "has no tokens" if not ids else "names tokens added to the tokenizer, not words of the model's own"
        raise UserError(f"embedding token {token.token!r}: its initializer {token.initializer!r} {what}; give words "
                        "close to its meaning, such as 'dog'.")
    return table.weight.detach()[[ids[i % len(ids)] for i in range(token.vectors)]].float()


def trained_rows(text_encoder: torch.nn.Module) -> TrainedRows | None:
    """The run's embedding rows, when its text encoder has them."""
    table = text_encoder.get_input_embeddings()
    return table if isinstance(table, TrainedRows) else None


def is_rows_key(key: str) -> bool:
    return key.endswith(ROWS)
