"""The loopback hub against the real huggingface_hub client, over real HTTP on 127.0.0.1.

Most checks run the client in a subprocess with the environment `HubServer.client_env` builds, as
`python train.py --resume_ckpt owner/name` will; a few run it in-process through `patch_client`.
"""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors.numpy import load_file, save_file

from tests.hub_server import CLIENT_CHUNK_SIZE, HubServer

REPO = "owner/tiny"
CLIENT_TIMEOUT_S = 60

# Runs one huggingface_hub call from argv (JSON) and prints its result, or the error it raised, as JSON.
CLIENT_SCRIPT = """
import json, sys
import huggingface_hub
from huggingface_hub.errors import HfHubHTTPError
call = json.loads(sys.argv[1])
function = getattr(huggingface_hub, call.pop("function"))
try:
    print(json.dumps({"result": function(**call)}))
except HfHubHTTPError as error:
    print(json.dumps({"error": type(error).__name__, "status": error.response.status_code}))
except Exception as error:
    print(json.dumps({"error": type(error).__name__, "message": str(error)}))
"""


def run_client(hub: HubServer, hf_home: Path, function: str, *, offline: bool = False,
               token: str | None = None, **kwargs: Any) -> dict[str, Any]:
    """Call `huggingface_hub.<function>(**kwargs)` in a fresh Python process pointed at `hub`."""
    env = hub.client_env(hf_home, offline=offline)
    if token is not None:
        env["HF_TOKEN"] = token
    proc = subprocess.run(
        [sys.executable, "-c", CLIENT_SCRIPT, json.dumps({"function": function, **kwargs})],
        env=env, capture_output=True, text=True, timeout=CLIENT_TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture
def tiny_folder(tmp_path: Path) -> Path:
    """A diffusers-like repo: model_index.json, unet/ with a real safetensors file, and a .ckpt sibling."""
    folder = tmp_path / "tiny-src"
    (folder / "unet").mkdir(parents=True)
    model_index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}
    (folder / "model_index.json").write_text(json.dumps(model_index))
    (folder / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel", "sample_size": 8}))
    weights = {"conv_in.weight": np.arange(4 * 4 * 3 * 3, dtype=np.float32).reshape(4, 4, 3, 3)}
    save_file(weights, str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    (folder / "tiny.ckpt").write_bytes(b"\x80\x02" + bytes(range(256)) * 4)
    return folder


def source_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_public_snapshot_skips_ignored_files_and_fills_the_cache(hub_server, tiny_folder, tmp_path):
    hub = hub_server()
    sha = hub.add_repo(REPO, tiny_folder)

    out = run_client(
        hub, tmp_path / "hf", "snapshot_download", repo_id=REPO, revision="main", ignore_patterns=["*.ckpt"]
    )

    cache = tmp_path / "hf" / "hub" / "models--owner--tiny"
    snapshot = Path(out["result"])
    assert snapshot == cache / "snapshots" / sha
    assert (cache / "refs" / "main").read_text() == sha
    expected = {k: v for k, v in source_files(tiny_folder).items() if not k.endswith(".ckpt")}
    assert source_files(snapshot) == expected
    weights = load_file(str(snapshot / "unet" / "diffusion_pytorch_model.safetensors"))
    assert weights["conv_in.weight"].shape == (4, 4, 3, 3)
    # The safetensors file is LFS: its cache blob is named after its sha256, as with the real Hub.
    blob = (snapshot / "unet" / "diffusion_pytorch_model.safetensors").resolve()
    assert blob.parent == cache / "blobs" and len(blob.name) == 64
    # The ignored file was never asked for, not even its metadata.
    assert sorted(hub.downloads(REPO)) == sorted(expected)
    assert not [r for r in hub.requests if r.filename == "tiny.ckpt"]
    assert all(hub.served_count(REPO, name) == 1 for name in expected)


def test_allow_patterns_downloads_only_that_subfolder(hub_server, tiny_folder, tmp_path):
    hub = hub_server()
    hub.add_repo(REPO, tiny_folder)

    out = run_client(hub, tmp_path / "hf", "snapshot_download", repo_id=REPO, allow_patterns=["unet/*"])

    assert sorted(source_files(Path(out["result"]))) == ["unet/config.json", "unet/diffusion_pytorch_model.safetensors"]
    assert sorted(hub.downloads(REPO)) == ["unet/config.json", "unet/diffusion_pytorch_model.safetensors"]


@pytest.mark.slow
def test_gated_repo_needs_a_granted_token(hub_server, tiny_folder, tmp_path):
    hub = hub_server()
    hub.add_repo("owner/gated", tiny_folder, gated=True)
    hub.add_token("hf_granted", "owner/gated")
    hub.add_token("hf_other_user")
    call = dict(repo_id="owner/gated", filename="model_index.json")

    assert run_client(hub, tmp_path / "a", "hf_hub_download", **call) == {"error": "GatedRepoError", "status": 401}
    assert run_client(hub, tmp_path / "b", "hf_hub_download", token="hf_other_user", **call) == {
        "error": "GatedRepoError", "status": 403}
    # A token the Hub does not know is refused as such, not as a gate.
    assert run_client(hub, tmp_path / "c", "hf_hub_download", token="hf_typo", **call) == {
        "error": "HfHubHTTPError", "status": 401}
    out = run_client(hub, tmp_path / "d", "snapshot_download", repo_id="owner/gated", token="hf_granted")
    assert source_files(Path(out["result"])) == source_files(tiny_folder)
    granted = [r for r in hub.requests if r.served_content]
    assert granted and all(r.authorization == "Bearer hf_granted" for r in granted)


@pytest.mark.slow
def test_unknown_repo_is_repository_not_found(hub_server, tmp_path):
    hub = hub_server()
    hub.add_token("hf_user")

    assert run_client(hub, tmp_path / "a", "snapshot_download", repo_id="owner/missing") == {
        "error": "RepositoryNotFoundError", "status": 401}
    assert run_client(hub, tmp_path / "b", "snapshot_download", repo_id="owner/missing", token="hf_user") == {
        "error": "RepositoryNotFoundError", "status": 404}


def test_in_process_client_info_files_revisions_and_errors(hub_server, tiny_folder, tmp_path, monkeypatch):
    hub = hub_server()
    sha = hub.add_repo(REPO, tiny_folder)
    v2_folder = tmp_path / "v2"
    (v2_folder / "unet").mkdir(parents=True)
    (v2_folder / "unet" / "config.json").write_text('{"sample_size": 16}')
    sha_v2 = hub.add_revision(REPO, v2_folder, "v2")
    hub.add_repo("owner/private", tiny_folder, private=True)
    hub.patch_client(monkeypatch, tmp_path / "hf")
    api = HfApi()

    info = api.model_info(REPO)
    assert info.sha == sha and info.gated is False
    assert sorted(s.rfilename for s in info.siblings) == sorted(source_files(tiny_folder))
    assert api.model_info(REPO, revision="v2").sha == sha_v2
    assert sorted(api.list_repo_files(REPO, revision="v2")) == ["unet/config.json"]
    path = hf_hub_download(REPO, "unet/config.json", revision="v2")
    assert Path(path).read_text() == '{"sample_size": 16}' and sha_v2 in path
    path = hf_hub_download(REPO, "unet/config.json", revision=sha)  # a commit sha is a revision too
    assert Path(path).read_bytes() == (tiny_folder / "unet" / "config.json").read_bytes()
    snapshot = tmp_path / "hf" / "hub" / "models--owner--tiny" / "snapshots" / sha_v2
    assert snapshot_download(REPO, revision=sha_v2) == str(snapshot)

    with pytest.raises(RepositoryNotFoundError):
        api.model_info("owner/private")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, "model_index.json", revision="no-such-branch")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO, "no/such/file.json")
    hub.add_repo("owner/gated", tiny_folder, gated=True)
    assert api.model_info("owner/gated").gated == "manual"  # its info and file list are public...
    assert "model_index.json" in api.list_repo_files("owner/gated")
    with pytest.raises(GatedRepoError):  # ...its files are not
        hf_hub_download("owner/gated", "model_index.json")
    with pytest.raises(HfHubHTTPError):
        api.model_info(REPO, token="hf_unknown")


@pytest.mark.slow
def test_broken_off_download_is_resumed_with_range(hub_server, tmp_path):
    folder = tmp_path / "big-src"
    folder.mkdir()
    content = np.random.default_rng(0).bytes(CLIENT_CHUNK_SIZE + 2 * 1024 * 1024)  # 12 MiB
    (folder / "model.safetensors").write_bytes(content)
    hub = hub_server()
    hub.add_repo(REPO, folder)
    # The client keeps whole 10 MiB chunks only, so break past the first one to make it resume.
    hub.break_download(REPO, "model.safetensors", after_bytes=CLIENT_CHUNK_SIZE + 1024 * 1024)

    out = run_client(hub, tmp_path / "hf", "hf_hub_download", repo_id=REPO, filename="model.safetensors")

    assert Path(out["result"]).read_bytes() == content
    gets = [r for r in hub.requests if r.served_content]
    assert [(r.status, r.broken, r.range) for r in gets] == [
        (200, True, None), (206, False, f"bytes={CLIENT_CHUNK_SIZE}-")]
    assert hub.served_count(REPO, "model.safetensors") == 2


@pytest.mark.slow
def test_download_broken_off_in_its_first_chunk_starts_over(hub_server, tiny_folder, tmp_path):
    hub = hub_server()
    hub.add_repo(REPO, tiny_folder)
    hub.break_download(REPO, "unet/diffusion_pytorch_model.safetensors")  # after half the body

    out = run_client(
        hub, tmp_path / "hf", "hf_hub_download", repo_id=REPO, filename="unet/diffusion_pytorch_model.safetensors"
    )

    weights = tiny_folder / "unet" / "diffusion_pytorch_model.safetensors"
    assert Path(out["result"]).read_bytes() == weights.read_bytes()
    gets = [r for r in hub.requests if r.served_content]
    assert [(r.status, r.broken, r.range) for r in gets] == [(200, True, None), (200, False, None)]


@pytest.mark.slow
def test_offline_rerun_uses_the_cache_without_a_request(hub_server, tiny_folder, tmp_path):
    hub = hub_server()
    hub.add_repo(REPO, tiny_folder)
    online = run_client(hub, tmp_path / "hf", "snapshot_download", repo_id=REPO, ignore_patterns=["*.ckpt"])
    hub.clear_log()

    offline = run_client(
        hub, tmp_path / "hf", "snapshot_download", repo_id=REPO, ignore_patterns=["*.ckpt"], offline=True
    )

    assert offline == online
    assert hub.requests == []
    # Asking offline for a file that was never fetched fails clearly instead of reaching out.
    missing = run_client(hub, tmp_path / "hf", "snapshot_download", repo_id=REPO, offline=True)
    assert missing["error"] == "IncompleteSnapshotError" and hub.requests == []


def test_server_stops_promptly_with_an_idle_keep_alive_connection(tiny_folder):
    with HubServer() as hub:
        hub.add_repo(REPO, tiny_folder)
        port = hub.port
        client = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        client.request("GET", f"/api/models/{REPO}")
        assert json.loads(client.getresponse().read())["id"] == REPO
        started = time.monotonic()  # the connection stays open, its handler waiting for a next request
    assert time.monotonic() - started < 2
    assert client.sock.recv(1) == b""  # closed by the server
    client.close()
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=5):
        pass


@pytest.mark.slow
def test_diffusers_loads_a_pipeline_through_the_server(hub_server, tiny_model, tmp_path):
    hub = hub_server()
    hub.add_repo("owner/tiny-sd1", tiny_model("sd1"))
    script = (
        "from diffusers import StableDiffusionPipeline\n"
        "pipe = StableDiffusionPipeline.from_pretrained('owner/tiny-sd1', safety_checker=None)\n"
        "print(type(pipe.unet).__name__)\n"
    )

    proc = subprocess.run(
        [sys.executable, "-c", script], env=hub.client_env(tmp_path / "hf"),
        capture_output=True, text=True, timeout=CLIENT_TIMEOUT_S,
    )

    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "UNet2DConditionModel"
    assert "unet/diffusion_pytorch_model.safetensors" in hub.downloads("owner/tiny-sd1")
