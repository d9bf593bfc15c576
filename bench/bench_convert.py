"""Full-size SD1.5 conversion, side by side: our converter vs diffusers `from_single_file` vs a plain
safetensors load+save (the floor: every byte read once and written once).

Generates a random-weight SD1.5-architecture original checkpoint (fp16 .safetensors, ~2.1 GB) in a temp
dir, runs each contender in its own fresh process with every socket refused (so "offline" is checked too),
reports wall time and peak RSS, checks our folder is bit-identical to diffusers', and deletes everything.

    python bench/bench_convert.py [--keep-dir DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from convert.blank import blank_original  # noqa: E402
from convert.configs import scheduler_config  # noqa: E402
from convert.read import load_original_config  # noqa: E402
from convert.to_diffusers import meta_model  # noqa: E402
from convert.tokenizer import clip_tokenizer  # noqa: E402
from convert.write import write_model_index  # noqa: E402

NO_NETWORK = """import socket
def _refuse(*a, **k):
    raise OSError("network use attempted")
socket.socket.connect = _refuse
socket.create_connection = _refuse
socket.getaddrinfo = _refuse
"""


def make_sd15_checkpoint(path: Path, config_dir: Path) -> int:
    """A random fp16 SD1.5 original file, built from the shapes the stock yaml gives; also writes the
    diffusers config folder `from_single_file` needs (configs only, no weights). Returns its byte size."""
    from safetensors.torch import save_file

    original = load_original_config(REPO_ROOT / "v1-inference.yaml")
    gen = torch.Generator().manual_seed(0)
    blank = blank_original(original, "sd1", fill=lambda meta: (torch.randn(meta.shape, generator=gen) * 0.02).half())
    save_file(blank.state, str(path))
    blank.state.clear()  # its 2 GB are not needed for the configs
    models = {name: meta_model(name, config) for name, config in blank.configs.items()}

    # diffusers' local config folder (what the hub repo would have provided)
    models["unet"].save_config(config_dir / "unet")
    models["vae"].save_config(config_dir / "vae")
    text_config = models["text_encoder"].config
    text_config.architectures = ["CLIPTextModel"]
    text_config.save_pretrained(config_dir / "text_encoder")
    from diffusers import PNDMScheduler

    clip_tokenizer().save_pretrained(config_dir / "tokenizer")
    PNDMScheduler.from_config(scheduler_config(original, "epsilon")).save_pretrained(config_dir / "scheduler")
    write_model_index(config_dir, "PNDMScheduler", inpainting=False)
    return path.stat().st_size


def measure(name: str, argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one fresh process (imports included, the same for all)."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{name} failed:\n{out.decode(errors='replace')[-3000:]}")
    return wall, usage.ru_maxrss / 1024  # Linux reports KiB


def same_tensors(a: Path, b: Path) -> bool:
    from safetensors import safe_open

    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        if set(fa.keys()) != set(fb.keys()):
            return False
        return all(torch.equal(fa.get_tensor(k), fb.get_tensor(k).to(fa.get_tensor(k).dtype)) for k in fa.keys())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep-dir", default=None, help="work here and keep the files (default: a temp dir)")
    parser.add_argument("--generate", nargs=2, metavar=("CHECKPOINT", "CONFIG_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.generate:
        make_sd15_checkpoint(Path(args.generate[0]), Path(args.generate[1]))
        return
    work = Path(args.keep_dir or tempfile.mkdtemp(prefix="bench_convert-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        run(work)
    finally:
        if not args.keep_dir:
            shutil.rmtree(work, ignore_errors=True)


def run(work: Path) -> None:
    checkpoint, config_dir = work / "sd15-random.safetensors", work / "diffusers-config"
    if not checkpoint.is_file():
        print("generating a random fp16 SD1.5 original checkpoint ...", flush=True)
        # in a child: Linux carries a parent's peak RSS into the children it spawns, so this process
        # must stay small for the measurements below to mean anything
        subprocess.run([sys.executable, __file__, "--generate", str(checkpoint), str(config_dir)], check=True)
    size = checkpoint.stat().st_size
    print(f"checkpoint: {size / 1e9:.2f} GB, {checkpoint}")
    (work / "nonet").mkdir(exist_ok=True)
    (work / "nonet" / "sitecustomize.py").write_text(NO_NETWORK)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env["PYTHONPATH"] = str(work / "nonet")
    for out in ("ours", "diffusers", "floor.safetensors"):
        shutil.rmtree(work / out, ignore_errors=True) if (work / out).is_dir() else (work / out).unlink(missing_ok=True)

    py = sys.executable
    contenders = {
        "ours": [py, "utils/convert_original_stable_diffusion_to_diffusers.py", "--scheduler_type", "pndm",
                 "--original_config_file", "v1-inference.yaml", "--image_size", "512", "--checkpoint_path",
                 str(checkpoint), "--from_safetensors", "--to_safetensors", "--prediction_type", "epsilon",
                 "--dump_path", str(work / "ours")],
        "diffusers from_single_file": [py, "-c", (
            "import sys; from diffusers import StableDiffusionPipeline\n"
            "p = StableDiffusionPipeline.from_single_file(sys.argv[1], config=sys.argv[2], "
            "original_config=sys.argv[3], local_files_only=True)\n"
            "p.save_pretrained(sys.argv[4], safe_serialization=True)"),
            str(checkpoint), str(config_dir), str(REPO_ROOT / "v1-inference.yaml"), str(work / "diffusers")],
        "floor: safetensors load+save": [py, "-c", (
            "import sys; from safetensors.torch import load_file, save_file\n"
            "save_file(load_file(sys.argv[1]), sys.argv[2])"), str(checkpoint), str(work / "floor.safetensors")],
    }
    results = {}
    for name, argv in contenders.items():
        print(f"running {name} ...", flush=True)
        results[name] = measure(name, argv, env)

    for component, file in (("unet", "diffusion_pytorch_model.safetensors"),
                            ("vae", "diffusion_pytorch_model.safetensors"), ("text_encoder", "model.safetensors")):
        ok = same_tensors(work / "ours" / component / file, work / "diffusers" / component / file)
        print(f"{component}: {'bit-identical to' if ok else 'DIFFERS FROM'} diffusers' conversion")

    ours_t, ours_m = results["ours"]
    print(f"\n{'':32}{'wall s':>9}{'peak RSS MiB':>14}{'ours/this time':>16}{'ours/this RSS':>15}")
    for name, (t, m) in results.items():
        print(f"{name:32}{t:9.1f}{m:14.0f}{ours_t / t:16.2f}{ours_m / m:15.2f}")


if __name__ == "__main__":
    main()
