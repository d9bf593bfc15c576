"""Download a diffusers Stable Diffusion model from the Hugging Face Hub: only what training needs, once.

This module owns everything between a repo id and a local folder:

* which files a training run needs (`select_training_files`, pure): `model_index.json` and the five
  components the trainer loads (convert/tables.py's `MODEL_COMPONENTS`) with their configs, and one
  weight format per component, safetensors preferred. Never the single-file `.ckpt`/`.safetensors`
  siblings at the repo root, the safety checker, fp16/EMA variants, Flax, TF or ONNX weights;
* the token, by an explicit order: `HF_API_TOKEN` (EveryDream2's name, which the client itself ignores),
  then `HF_TOKEN`, then the token `hf auth login` saved;
* the cache: `HUGGINGFACE_HUB_CACHE` (the legacy name EveryDream2 documents), then `HF_HUB_CACHE`, then the
  client's default. Downloads go through `snapshot_download`, so the client's cache layout, progress bars,
  in-process resume of broken transfers, and atomic blob writes (a file appears in a snapshot only once
  complete) all apply; with `HF_HUB_OFFLINE=1` the same files are taken from the cache with no request;
* asking for the Hub explicitly: `hf://owner/name[@revision]` (huggingface_hub's own URI grammar, that of
  `HfFileSystem`) is a repo even where a local folder is named like its owner, which a bare `owner/name` is not
  (trainer/models/ckpt_cache.py `source_kind`);
* the first request (the repo's file list) is the one that tells whether the Hub can be reached: a connection that
  cannot be made fails after that one try, faults after a connection was made are retried (`_repo_files`);
* turning the client's exceptions into one `UserError` each that says what to do, and checking, before any model
  loads, that the cache can take a download (`cache_problem`).

The client reads `HF_ENDPOINT` and `HF_HUB_OFFLINE` at import; they are honoured as it reads them.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import quote

from common.console import first_line, say
from common.files import free_bytes, human_bytes, place_problem
from convert.tables import COMPONENT_NAMES, MODEL_COMPONENTS
from trainer.errors import UserError

CONFIG_SUFFIXES = (".json", ".txt")  # configs, scheduler_config.json, vocab.json, merges.txt, shard indexes
# The weight file stems a component may have, in the loader's naming: diffusers models, then transformers'.
WEIGHT_STEMS = ("diffusion_pytorch_model", "model", "pytorch_model")
WEIGHT_FORMATS = (".safetensors", ".bin")  # preference order; one is downloaded per component
SHARD = re.compile(r"^(?P<stem>[\w]+)-\d{5}-of-\d{5}(?P<suffix>\.safetensors|\.bin)$")
SINGLE_FILE_SUFFIXES = (".ckpt", ".safetensors")

REPO_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+?)(?:@(?P<revision>[^\s@]+))?$")
HUB_SCHEME = "hf://"

# Removed from the Hub in November 2025; the same weights live on under sd2-community/.
RETIRED_REPOS = {
    f"stabilityai/{name}": f"sd2-community/{name}"
    for name in ("stable-diffusion-2", "stable-diffusion-2-base", "stable-diffusion-2-1", "stable-diffusion-2-1-base")
}

TOKEN_VARIABLES = ("HF_API_TOKEN", "HF_TOKEN")
CACHE_VARIABLES = ("HUGGINGFACE_HUB_CACHE", "HF_HUB_CACHE")
LOGIN_TOKEN = "the token saved by `hf auth login`"


@dataclass(frozen=True)
class RepoRef:
    repo_id: str
    revision: str | None  # None: the default branch
    explicit: bool = False  # named as hf://owner/name: the Hub, even where a local folder is named like the owner

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "")


@dataclass(frozen=True)
class HubToken:
    value: str | None
    source: str  # which variable or file it came from, for messages; "no token" when none


@dataclass(frozen=True)
class HubModel:
    """A downloaded (or cached) diffusers model: the folder to load and where it came from."""

    path: Path  # the snapshot folder, or its `subfolder`
    repo: RepoRef
    commit: str
    subfolder: str | None
    files: tuple[str, ...]  # repo paths that make up the model
    cache_dir: Path
    cache_source: str
    token_source: str
    offline: bool

    def describe(self) -> str:
        where = f", subfolder {self.subfolder}" if self.subfolder else ""
        how = "from the cache (HF_HUB_OFFLINE)" if self.offline else f"token: {self.token_source}"
        return f"Hugging Face repo {self.repo} at commit {self.commit[:12]}{where} ({how})"


def parse_repo_id(text: str) -> RepoRef | None:
    """`owner/name` or `owner/name@revision` as a reference, `hf://owner/name[@revision]` as an explicit one, or None
    when `text` is shaped like neither. A hf:// address that names no model repo raises UserError."""
    text = text.strip()
    if text.startswith(HUB_SCHEME):
        return _parse_hub_address(text)
    match = REPO_ID.match(text)
    if match is None or match.group("repo").endswith(SINGLE_FILE_SUFFIXES):
        return None
    return RepoRef(match.group("repo"), match.group("revision"))


def _parse_hub_address(text: str) -> RepoRef:
    """hf://[models/]owner/name[@revision], by huggingface_hub's own parser (the grammar HfFileSystem reads)."""
    from huggingface_hub.errors import HfUriError
    from huggingface_hub.utils import parse_hf_uri

    expected = ("Expected hf://owner/name or hf://owner/name@revision (an owner named like a repo type, such as "
                "models, takes it twice: hf://models/models/name).")
    try:
        uri = parse_hf_uri(text)
    except HfUriError as err:
        raise UserError(f"resume_ckpt {text!r} is not a Hugging Face model address: {first_line(err)} {expected}") \
            from None
    if uri.type != "model":
        raise UserError(f"resume_ckpt {text!r} names a {uri.type} repo; the trainer takes model repos. {expected}")
    repo = RepoRef(uri.id, uri.revision, explicit=True)
    if uri.path_in_repo:
        raise UserError(f"resume_ckpt {text!r} names {uri.path_in_repo} inside the repo {repo}: pass --resume_ckpt "
                        f"{hub_address(repo)} --hf_repo_subfolder {uri.path_in_repo}.")
    return repo


def hub_address(repo: RepoRef) -> str:
    """`repo` as an explicit Hub address. In huggingface_hub's grammar a first part such as models/ or datasets/ is
    the repo type, so an owner of that name needs the type in front: hf://models/models/name."""
    from huggingface_hub.constants import HF_URI_TYPE_PREFIXES

    owner = repo.repo_id.split("/", 1)[0]
    return HUB_SCHEME + ("models/" if owner in HF_URI_TYPE_PREFIXES else "") + str(repo)


def find_token() -> HubToken:
    """HF_API_TOKEN, else HF_TOKEN, else the `hf auth login` token; an empty variable counts as unset."""
    for name in TOKEN_VARIABLES:
        value = os.environ.get(name, "").strip()
        if value:
            return HubToken(value, name)
    from huggingface_hub import get_token

    saved = get_token()
    return HubToken(saved, LOGIN_TOKEN) if saved else HubToken(None, "no token")


def find_cache_dir() -> tuple[Path, str]:
    """HUGGINGFACE_HUB_CACHE, else HF_HUB_CACHE, else the client's default (under HF_HOME), with its source."""
    for name in CACHE_VARIABLES:
        value = os.environ.get(name, "").strip()
        if value:
            return Path(value).expanduser(), name
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE), "the default hub cache"


def is_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


# ------------------------------------------------------------------------------------------- selection


def select_training_files(repo_files: list[str], subfolder: str | None, repo: RepoRef) -> list[str]:
    """The repo paths a training run needs, or a UserError saying why this repo is not a usable model.

    Per component: every config file directly in its folder, and the weights of one format (a single
    file, or an index with its shards), safetensors before bin; never fp16/EMA variants.
    """
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    inside = [p[len(prefix):] for p in repo_files if p.startswith(prefix)]
    if "model_index.json" not in inside:
        raise UserError(_not_a_diffusers_model(repo_files, subfolder, repo))
    chosen = ["model_index.json"]
    problems = []
    for component in MODEL_COMPONENTS:
        name = component.name
        files = [PurePosixPath(p).name for p in inside if str(PurePosixPath(p).parent) == name]
        if not files:
            problems.append(f"{name}/ is missing")
            continue
        # configs; shard indexes come with the weights they index
        chosen += [f"{name}/{file}" for file in sorted(files)
                   if file.endswith(CONFIG_SUFFIXES) and not file.endswith(".index.json")]
        if component.weights is None:
            continue
        weights = pick_weights(files)
        if not weights:
            found = ", ".join(sorted(files)) or "nothing"
            problems.append(f"{name}/ has no {' or '.join(WEIGHT_FORMATS)} weights without a variant "
                            f"(found: {found})")
        chosen += [f"{name}/{file}" for file in weights]
    if problems:
        where = f"{repo} (subfolder {subfolder})" if subfolder else str(repo)
        raise UserError(
            f"{where} is not a complete diffusers Stable Diffusion model: " + "; ".join(problems) + ". Training "
            f"needs {', '.join(COMPONENT_NAMES)} with full-precision weights (fp16-only repos are not supported)."
        )
    return [prefix + p for p in chosen]


def pick_weights(files: list[str]) -> list[str]:
    """One format's weights: `<stem><suffix>`, or its index `<stem><suffix>.index.json` with the shards."""
    names = set(files)
    for suffix in WEIGHT_FORMATS:
        for stem in WEIGHT_STEMS:
            if f"{stem}{suffix}" in names:
                return [f"{stem}{suffix}"]
            index = f"{stem}{suffix}.index.json"
            if index in names:
                shards = [n for n in names if (m := SHARD.match(n)) and (m["stem"], m["suffix"]) == (stem, suffix)]
                if shards:
                    return [index, *sorted(shards)]
    return []


def _not_a_diffusers_model(repo_files: list[str], subfolder: str | None, repo: RepoRef) -> str:
    nested = sorted(str(PurePosixPath(p).parent) for p in repo_files
                    if PurePosixPath(p).name == "model_index.json" and "/" in p)
    singles = sorted(p for p in repo_files if p.endswith(SINGLE_FILE_SUFFIXES) and "/" not in p)
    where = f"subfolder {subfolder!r} of {repo}" if subfolder else str(repo)
    message = f"{where} is not a diffusers model: it has no model_index.json."
    if nested:
        message += (f" The repo holds diffusers model(s) in {', '.join(nested)}/: pass --hf_repo_subfolder "
                    f"{nested[0]} (or set hf_repo_subfolder in train.json).")
    if singles:
        example = singles[0]
        message += (f" It holds single-file checkpoint(s): {', '.join(singles)}. Download one, e.g. "
                    f"`hf download {repo.repo_id} {example} --local-dir models`, and pass the file: "
                    f"--resume_ckpt models/{example} (it is converted once, into ckpt_cache/).")
    if not nested and not singles:
        message += " Pass a Stable Diffusion 1.x/2.x model in diffusers format."
    return message


# -------------------------------------------------------------------------------------------- download


def download_model(repo: RepoRef, subfolder: str | None = None, *, local_hint: str = "") -> HubModel:
    """The training files of `repo` in the hub cache (downloading what is missing), or a UserError. `local_hint`
    (the local paths near the one resume_ckpt named) ends the messages that say the repo could not be had."""
    import httpx2  # huggingface_hub's HTTP transport; its network errors reach us unwrapped
    from huggingface_hub import get_cached_repo_tree, snapshot_download
    from huggingface_hub.errors import CachedRepoTreeNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    token = find_token()
    cache_dir, cache_source = find_cache_dir()
    offline = is_offline()
    revision = repo.revision or "main"
    if offline:
        say(f"Model: looking up {repo} in the hub cache {cache_dir} ({cache_source}); HF_HUB_OFFLINE is set")
    else:
        say(f"Model: fetching {repo} from {_endpoint()} into the hub cache {cache_dir} ({cache_source}); "
            f"token: {token.source}")
    try:
        if offline:
            try:
                listing = [f.path for f in get_cached_repo_tree(repo.repo_id, revision=revision, cache_dir=cache_dir)]
            except CachedRepoTreeNotFoundError:
                raise UserError(
                    f"{repo} is not in the hub cache {cache_dir} ({cache_source}) and HF_HUB_OFFLINE is set, so "
                    "it cannot be downloaded. Run once with network access (unset HF_HUB_OFFLINE), or point "
                    "HUGGINGFACE_HUB_CACHE at the cache that holds it." + _retired_hint(repo) + local_hint
                ) from None
        else:
            listing = _repo_files(repo, revision, token, cache_dir, local_hint)
        files = select_training_files(listing, subfolder, repo)
        snapshot = Path(snapshot_download(
            repo.repo_id, revision=revision, cache_dir=cache_dir, token=token.value, allow_patterns=files,
        ))
    except UserError:
        raise
    # GatedRepoError is a RepositoryNotFoundError: the order of these branches matters.
    except HfHubHTTPError as err:
        raise UserError(_http_error_message(err, repo, token) + local_hint) from None
    except LocalEntryNotFoundError as err:  # offline, or no connection, and not (fully) in the cache
        raise UserError(
            f"{repo} could not be fetched and the hub cache {cache_dir} does not hold all of its training files "
            f"({type(err).__name__}: {first_line(err)}). Check the network connection and HF_ENDPOINT, or "
            "unset HF_HUB_OFFLINE, and run again: files already complete are kept." + _retired_hint(repo)
        ) from None
    except httpx2.TransportError as err:  # broken off again and again: after the client's own retries
        raise UserError(
            f"could not download {repo} from {_endpoint()}: {type(err).__name__}: {first_line(err)}. Check the "
            "network connection (and HF_ENDPOINT if set) and run again: files already complete are kept in the "
            "cache and not downloaded twice." + _offline_hint(repo, cache_dir)
        ) from None
    except OSError as err:  # writing into the cache (the client's own errors above are OSErrors too)
        raise UserError(
            f"could not write {repo} into the hub cache {cache_dir}: {first_line(err)}. "
            f"{human_bytes(free_bytes(cache_dir))} is free there. Free some space or fix the permissions there, or "
            f"point {_cache_variable(cache_source)} at a folder on a disk with room; files already complete are kept."
        ) from None
    model_dir = snapshot / subfolder.strip("/") if subfolder else snapshot
    return HubModel(model_dir, repo, snapshot.name, subfolder, tuple(files), cache_dir, cache_source,
                    token.source, offline)


def _repo_files(repo: RepoRef, revision: str, token: HubToken, cache_dir: Path, local_hint: str) -> list[str]:
    """The repo's files, by the first request to the Hub: the one that tells whether it can be reached at all.

    huggingface_hub retries every network fault with backoff (`http_backoff`: 5 retries, 1, 2, 4, 8 and 8 s apart),
    a connection that cannot be made included, so on a machine without network a request waited 23 s to fail. A
    connection that cannot be made (no network, a host name that does not resolve, a closed port, no answer to
    connect) is no passing fault: it fails after this one try, and is said as the Hub request it was. Faults after
    a connection was made (a flaky network: read or write errors and timeouts, a response broken off, 429 and 5xx
    answers) are retried by the client's backoff, as every later request of the download is."""
    import httpx2
    from huggingface_hub import constants
    from huggingface_hub.utils import build_hf_headers, hf_raise_for_status, http_backoff

    after_connecting = (httpx2.ReadTimeout, httpx2.WriteTimeout, httpx2.PoolTimeout, httpx2.ReadError,
                        httpx2.WriteError, httpx2.CloseError, httpx2.RemoteProtocolError)
    # the model-info route, as HfApi.model_info asks it: its `siblings` list every file of the revision
    url = f"{constants.ENDPOINT}/api/models/{repo.repo_id}/revision/{quote(revision, safe='')}"
    try:
        response = http_backoff("GET", url, headers=build_hf_headers(token=token.value),
                                timeout=constants.HF_HUB_ETAG_TIMEOUT, retry_on_exceptions=after_connecting)
    except (httpx2.ConnectError, httpx2.ConnectTimeout) as err:
        taken = ("" if repo.explicit else " resume_ckpt was taken for a Hub repo id, as no local folder, file or "
                 "ckpt_cache/ name has that name.")
        raise UserError(
            f"a request to the Hugging Face Hub for {repo} at {_endpoint()} could not connect ({type(err).__name__}: "
            f"{first_line(err)}); a connection that cannot be made is not tried again.{taken} Check the network "
            "connection, and HF_ENDPOINT if it is set, then run again." + _offline_hint(repo, cache_dir) + local_hint
        ) from None
    hf_raise_for_status(response)
    return [sibling["rfilename"] for sibling in response.json().get("siblings", [])]


def cache_problem(resume_ckpt: str) -> str | None:
    """Why the hub cache cannot take a download of `resume_ckpt`, for the preflight; None when it can, or when
    HF_HUB_OFFLINE is set (the cache is then only read)."""
    if is_offline():
        return None
    cache_dir, source = find_cache_dir()
    problem = place_problem(cache_dir, "the Hugging Face hub cache")
    if problem is None:
        return None
    origin = f"set by {source}" if source in CACHE_VARIABLES else source
    return (f"resume_ckpt {resume_ckpt} is a Hugging Face repo, downloaded into the hub cache, but {problem} "
            f"Point {_cache_variable(source)} at a writable folder (this one is {origin}).")


def _cache_variable(source: str) -> str:
    """The variable that moves the hub cache: the one that set it (HUGGINGFACE_HUB_CACHE, when set, wins over
    HF_HUB_CACHE), else HF_HUB_CACHE."""
    return source if source in CACHE_VARIABLES else "HF_HUB_CACHE"


def _http_error_message(err: Exception, repo: RepoRef, token: HubToken) -> str:
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    status = getattr(getattr(err, "response", None), "status_code", None)
    page = f"{_endpoint()}/{repo.repo_id}"
    if isinstance(err, GatedRepoError):
        if token.value is None:
            return (f"{repo.repo_id} is a gated model and no Hugging Face token was found (looked at "
                    f"HF_API_TOKEN, HF_TOKEN and `hf auth login`). Accept its license at {page} with your "
                    "account, then run `hf auth login` or set HF_API_TOKEN to a token of that account.")
        return (f"{repo.repo_id} is a gated model and the token from {token.source} has no access to it "
                f"(HTTP {status}). Accept its license at {page} with the account of that token, or use a token "
                "of an account that has.")
    if isinstance(err, RepositoryNotFoundError):
        retired = RETIRED_REPOS.get(repo.repo_id)
        if retired:
            return (f"{repo.repo_id} was removed from the Hugging Face Hub in November 2025. The same weights are "
                    f"published as {retired}: pass --resume_ckpt {retired}.")
        private = ("" if token.value else
                   " If it is private, run `hf auth login` or set HF_API_TOKEN to a token that can read it.")
        local = ("" if repo.explicit else
                 " resume_ckpt was also not a local folder, a name in ckpt_cache/ or a .ckpt/.safetensors file.")
        return (f"{repo.repo_id} was not found on {_endpoint()} (HTTP {status}). Check the spelling: a repo id "
                f"is owner/name as in the model page's address.{private}{local}")
    if isinstance(err, RevisionNotFoundError):
        return f"{repo.repo_id} has no revision {repo.revision!r} (a branch, tag or commit); see {page}/tree/main."
    if status == 401 and token.value is not None:
        return (f"the Hugging Face token from {token.source} was refused as invalid (HTTP 401). Create a new one "
                f"at {_endpoint()}/settings/tokens and run `hf auth login` or set HF_API_TOKEN.")
    return (f"the Hub answered HTTP {status} for {repo}: {first_line(err)}. Try again later; if it persists, "
            f"download the model's diffusers folder and pass its path.")


def _offline_hint(repo: RepoRef, cache_dir: Path) -> str:
    return (f" {repo} is in the hub cache: set HF_HUB_OFFLINE=1 to train from it without network."
            if _is_cached(repo, cache_dir) else "")


def _is_cached(repo: RepoRef, cache_dir: Path) -> bool:
    from huggingface_hub import get_cached_repo_tree
    from huggingface_hub.errors import CachedRepoTreeNotFoundError

    try:
        get_cached_repo_tree(repo.repo_id, revision=repo.revision or "main", cache_dir=cache_dir)
    except CachedRepoTreeNotFoundError:
        return False
    return True


def _retired_hint(repo: RepoRef) -> str:
    retired = RETIRED_REPOS.get(repo.repo_id)
    return (f" Note: {repo.repo_id} was removed from the Hub in November 2025; its weights are published as "
            f"{retired}.") if retired else ""


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT
