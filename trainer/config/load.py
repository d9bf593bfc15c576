"""The config's one merge path: defaults -> json file (`--config`, else ./train.json) -> `--key value` on the command
line, each value coerced to the field's type, then validated once. Every problem is collected and reported together
(exit status 2), so a user fixes their config in one round trip.

Like the schema, this imports nothing heavy: config errors answer fast.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.files import read_json_object
from trainer.config import everydream2 as ed2
from trainer.config.checks import validate
from trainer.config.schema import DEFAULT_CONFIG_FILE, FIELD_TYPES, FIELDS, TrainConfig, embedding_mode
from trainer.config.values import (
    BadValue,
    cli_value,
    coerce_cli,
    coerce_json,
    expected_value,
    is_optional,
    shown,
    strip_optional,
)
from trainer.errors import bulleted

REPO_ROOT = Path(__file__).resolve().parents[2]


class ConfigError(Exception):
    """The configuration has problems; `problems` lists each one as a full sentence. `rest` is the config with
    every key that has a problem at its default (None when the json file itself could not be read), and
    `bad_keys` those keys: the preflight checks `rest` so that its problems come in the same round."""

    def __init__(self, problems: list[str], rest: TrainConfig | None = None, bad_keys: frozenset[str] = frozenset()):
        self.problems, self.rest, self.bad_keys = problems, rest, bad_keys
        count = f"{len(problems)} problem{'s' if len(problems) > 1 else ''}"
        super().__init__(f"{count} in the configuration:\n" + bulleted(problems))


@dataclass
class LoadedConfig:
    config: TrainConfig
    sources: dict[str, str]  # key -> where its value came from ("default", a json path, "command line")
    notices: list[str]  # translations, to say before the run starts
    warnings: list[str] = field(default_factory=list)  # EveryDream2 keys read but not used


# ---------------------------------------------------------------- values


def _found_beside(value: Any, source: str) -> str:
    """For a relative path from a json file that is not found here but is beside that file (EveryDream2's
    train.json names its optimizer.json so): where relative paths start, and the two ways to go on."""
    if not isinstance(value, str) or source in ("default", "command line") or Path(value).is_absolute():
        return ""
    beside = Path(source).parent / value
    if not beside.exists():
        return ""
    return (f" Relative paths start at the current folder, {Path.cwd()}, and {value} is beside {source}: run "
            f"from {Path(source).parent.resolve()}, or give its full path {beside.resolve()}.")


# ---------------------------------------------------------------- sources


def _closest_key(key: str) -> str:
    known = [*FIELDS, *ed2.KNOWN_KEYS]  # a typo of an ED2 key is still a typo
    match = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f"; did you mean '{match[0]}'?" if match else "; run 'python train.py --help' for the valid keys."


def parse_cli(argv: list[str]) -> tuple[dict[str, str | None], list[str]]:
    """`--key value`, `--key=value` and bare `--flag` into {key: text or None (bare flag)}, plus problems."""
    values: dict[str, str | None] = {}
    problems: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        i += 1
        if not token.startswith("--") or token == "--":
            problems.append(f"unexpected command-line argument {token!r}; options look like --key value.")
            continue
        key, has_equals, text = token[2:].partition("=")
        key = key.replace("-", "_")
        if has_equals:
            values[key] = text
        elif i < len(argv) and not argv[i].startswith("--"):
            values[key] = argv[i]
            i += 1
        else:
            values[key] = None
    return values, problems


def _read_json(path: Path) -> tuple[dict[str, Any], list[str]]:
    data, problem = read_json_object(path)
    if data is not None:
        return data, []
    fix = "Pass --config with the path of a json file of settings." if not path.exists() else \
        "Correct it, or pass --config with another json file of settings."
    return {}, [f"config: {problem} {fix}"]


def default_config_path() -> Path:
    """./train.json when there is one, else the train.json shipped beside train.py."""
    local = Path(DEFAULT_CONFIG_FILE)
    return local if local.is_file() else REPO_ROOT / DEFAULT_CONFIG_FILE


# ---------------------------------------------------------------- merge


@dataclass
class _Merge:
    """The values merged so far, where each came from, and what merging said."""

    values: dict[str, Any] = field(default_factory=lambda: {name: f.default for name, f in FIELDS.items()})
    sources: dict[str, str] = field(default_factory=lambda: {name: "default" for name in FIELDS})
    problems: list[str] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)
    not_honoured: set[str] = field(default_factory=set)
    bad_keys: set[str] = field(default_factory=set)  # keys of ours whose given value has a problem
    null_notices: dict[str, str] = field(default_factory=dict)  # said only if no later source sets the key
    unet_frozen_in: str | None = None  # where EveryDream2's disable_unet_training true was given
    plugins_in: str | None = None  # where EveryDream2's textual-inversion plugin was named

    def embedding_problems(self, config: TrainConfig) -> list[str]:
        """EveryDream2's way of asking for textual inversion (its plugin, with the UNet frozen) against ours: an
        embedding trains alone, or beside a LoRA, never beside a full fine-tune of the UNet."""
        if self.unet_frozen_in and not (embedding_mode(config) and not config.lora_rank):
            return [f"{ed2.UNET_FROZEN}: true (from {self.unet_frozen_in}), an EveryDream2 key not supported here: "
                    f"{ed2.REFUSED_WHEN_SET[ed2.UNET_FROZEN]}."]
        if self.plugins_in and self.sources["embedding_config"] == self.plugins_in and not self.unet_frozen_in \
                and not config.lora_rank:
            return [f"plugins: EveryDream2's textual-inversion plugin (from {self.plugins_in}) with the UNet "
                    "training: here embeddings train alone (textual inversion) or beside a LoRA (pivotal tuning), "
                    "never beside a full fine-tune. Set disable_unet_training true, as the plugin's notes advise for "
                    "textual inversion, or lora_rank (such as 16) for pivotal tuning."]
        return []

    def layer(self, raw: dict[str, Any], source: str, from_cli: bool) -> None:
        """Merge one source. EveryDream2's translated keys go first, so that a key of ours given in the same
        source wins over a translation (`attn_type` beside the old `disable_xformers`)."""
        for key, given in raw.items():
            if key in ed2.TRANSLATIONS:
                self._translate(key, given, source, from_cli)
        for key, given in raw.items():
            if from_cli and (key in ed2.REFUSED_WHEN_SET or key in ed2.NOT_HONOURED):
                given = cli_value(given)
            if key == ed2.UNET_FROZEN and ed2.is_set(key, given):
                self.unet_frozen_in = source  # allowed only for embeddings alone: judged once all is merged
            elif key in ed2.REFUSED_WHEN_SET and ed2.is_set(key, given):
                self.problems.append(f"{key}: {shown(given)} (from {source}), an EveryDream2 key not supported here: "
                                     f"{ed2.REFUSED_WHEN_SET[key]}.")
            elif key in ed2.NOT_HONOURED and ed2.is_set(key, given):
                self.not_honoured.add(key)
            elif key in ed2.REFUSED_WHEN_SET or key in ed2.NOT_HONOURED:
                pass  # EveryDream2's default: it asks for nothing
            elif key not in FIELDS and key not in ed2.TRANSLATIONS:
                self.problems.append(f"{key}: unknown key (from {source}){_closest_key(key)}")
            elif key in FIELDS:
                self._set(key, given, source, from_cli)

    def _translate(self, key: str, given: Any, source: str, from_cli: bool) -> None:
        tp, translation = ed2.TRANSLATIONS[key]
        if given is None and not from_cli:
            self.notices.append(f"{key}: null in {source} (EveryDream2 key) changes nothing.")
            return
        if from_cli and tp is list:  # `--plugins name`, or a json list
            given = cli_value(given) if isinstance(cli_value(given), list) else [given]
        try:
            value = True if given is None and tp is bool else (coerce_cli(tp, given) if from_cli else coerce_json(tp, given))
        except (BadValue, TypeError):
            self.problems.append(f"{key}: got {shown(given)} (from {source}); expected {expected_value(tp)}.")
            return
        if key == "plugins":
            self.plugins_in = source if ed2.TEXTUAL_INVERSION_PLUGIN in value else None
            if ed2.other_plugins(value):
                self.not_honoured.add("plugins")
        for ours, translated in translation(value).items():
            self.values[ours], self.sources[ours] = translated, source
            self.notices.append(f"{key}: {shown(value)} (EveryDream2 key) is read as {ours}: {shown(translated)}.")

    def _set(self, key: str, given: Any, source: str, from_cli: bool) -> None:
        tp = FIELD_TYPES[key]
        if given is None and not from_cli and not is_optional(tp):
            # EveryDream2's files write null for "the default"
            self.null_notices[key] = f"{key}: null in {source} is read as the default, {shown(FIELDS[key].default)}."
            return
        if (key, given) in ed2.VALUE_TRANSLATIONS:
            translated = ed2.VALUE_TRANSLATIONS[(key, given)]
            self.notices.append(f"{key}: {shown(given)} (EveryDream2's value) is read as {shown(translated)}.")
            given = translated
        try:
            if from_cli and given is None:  # a bare --flag: true, for every boolean key, nullable or not
                if (strip_optional(tp) if is_optional(tp) else tp) is not bool:
                    raise BadValue
                value = True
            else:
                value = coerce_cli(tp, given) if from_cli else coerce_json(tp, given)
        except (BadValue, TypeError):
            what = "nothing" if given is None and from_cli else shown(given)
            self.bad_keys.add(key)
            self.problems.append(f"{key}: got {what} (from {source}); expected {expected_value(tp)}.")
            return
        self.values[key], self.sources[key] = value, source


def load_config(argv: list[str]) -> LoadedConfig:
    """Merge defaults, the json file and `argv`, then validate. Raises ConfigError listing every problem."""
    cli, problems = parse_cli(argv)
    given_config = "config" in cli
    config_text = cli.pop("config", None)
    if given_config and not config_text:
        problems.append("config: expected a path to a json file after --config.")
    config_path = Path(config_text) if config_text else default_config_path()

    merge = _Merge(problems=problems)
    raw_json, json_problems = _read_json(config_path)
    merge.problems += json_problems
    merge.layer(raw_json, str(config_path), from_cli=False)
    merge.layer(cli, "command line", from_cli=True)

    config = TrainConfig(**merge.values)
    merge.problems += merge.embedding_problems(config)
    # with the json file unread, its keys are at their defaults: what is wrong with those is not the user's doing
    invalid = [(key, expected) for key, expected in validate(config)
               if not (json_problems and merge.sources[key] == "default")]
    merge.problems += [f"{key}: got {shown(getattr(config, key))} (from {merge.sources[key]}); expected {expected}."
                       + _found_beside(getattr(config, key), merge.sources[key]) for key, expected in invalid]
    if merge.problems:
        bad = frozenset(merge.bad_keys | {key for key, _ in invalid})
        rest = None if json_problems else dataclasses.replace(config, **{key: FIELDS[key].default for key in bad})
        raise ConfigError(merge.problems, rest, bad)
    if config.lora_rank:  # in LoRA mode lora_text_encoder alone decides (checks.py refuses a contradiction);
        # an embedding's rows are the text encoder's, so with one it always takes part in training
        config = dataclasses.replace(config, disable_textenc_training=not (config.lora_text_encoder
                                                                          or embedding_mode(config)))
    merge.notices += [notice for key, notice in merge.null_notices.items() if merge.sources[key] == "default"]
    warnings = [ed2.not_honoured_warning(merge.not_honoured)] if merge.not_honoured else []
    return LoadedConfig(config, merge.sources, merge.notices, warnings)
