#!/usr/bin/env bash
# Downloads, here (with pip registry access), the wheels that bench/gpu/gpu_check.sh installs offline on a bare CUDA
# machine: one with only Python 3.12, torch, accelerate, safetensors and huggingface_hub (and what those four
# pull in: numpy, pyyaml, tqdm, packaging, filelock, click, httpx, ...). Everything else that
# `import diffusers, transformers, bitsandbytes` and the trainer need comes from this folder.
#
#     bash bench/gpu/gpu_wheels.sh            # -> .gpu_wheels/ (git-ignored), cp312 manylinux x86_64 wheels
#     PYVER=3.11 DEST=/tmp/w311 bash bench/gpu/gpu_wheels.sh   # the same set for another Python (to test here)
#
# Versions are the ones requirements.txt pins and .venv holds, so the GPU runs the code the tests run. The list
# is the closure of diffusers' and transformers' Requires-Dist (and bitsandbytes') minus what the four packages
# above already bring; pip on the GPU machine installs only those still missing or too old there.
set -euo pipefail
cd "$(dirname "$0")/../.."

DEST=${DEST:-.gpu_wheels}
PYVER=${PYVER:-3.12}
PY=${PY:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}  # runs pip and the slimming
WITH_8BIT=${WITH_8BIT:-1}  # 0: leave bitsandbytes out (the bench then skips its 8-bit rows and says why)
# bitsandbytes' wheel is 41 MiB: one native library per CUDA/ROCm/XPU version. The GPU machine's torch is built
# for CUDA 13.0, so only these are kept (plus the CPU one); bitsandbytes loads libbitsandbytes_cuda<torch's>.so.
BNB_KEEP=${BNB_KEEP:-"cpu cuda130 cuda132"}

PACKAGES=(
  # the two libraries the trainer is built on, and peft (LoRA; its other needs are on the machine: psutil, ...)
  diffusers==0.42.1 transformers==5.24.0 peft==0.21.2
  # the versions requirements.txt pins of two the machine has in some version: pip takes them from here only
  # where the machine's are too old for the others (and the private-folder fallback has them)
  accelerate==1.15.0 huggingface_hub==2.4.0 safetensors==0.8.0
  # huggingface_hub 2.4's needs that an older hub's machine may lack
  hf-xet==1.8.0 httpx2==2.17.0 httpcore2==2.17.0 truststore==0.10.5 click==8.5.1 anyio==4.16.0 h11==0.16.0
  # diffusers: importlib_metadata (-> zipp, lazy-importer), regex, requests, Pillow
  importlib_metadata==10.2.0 zipp==4.1.2 lazy-importer==0.1.0 regex==2026.11.19 pillow==13.0.0
  requests==2.34.2 charset_normalizer==3.5.3 urllib3==2.8.0 idna==3.20 certifi==2026.10.19.post1
  # transformers: tokenizers, typer (-> pydantic, rich, shellingham, annotated-doc)
  tokenizers==0.23.3 typer==0.29.2 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0
  typing-inspection==0.4.5 typing_extensions==4.16.0 shellingham==1.5.4 annotated-doc==0.0.7
  rich==15.0.0 markdown-it-py==4.3.0 mdurl==0.1.2 pygments==2.21.0
)
if [[ $WITH_8BIT == 1 ]]; then
  PACKAGES+=(bitsandbytes==0.50.2)  # its CUDA kernels for every arch in one manylinux wheel; needs torch, numpy
fi

# Rewrites a bitsandbytes wheel in place without the native libraries BNB_KEEP does not name, and without their
# RECORD lines, so the wheel stays consistent (every file it lists is in it, with its original hash).
slim_bitsandbytes() {
  BNB_KEEP=$BNB_KEEP "$PY" - "$1" <<'PY'
import os, re, sys, zipfile
from pathlib import Path

wheel = Path(sys.argv[1])
keep = {f"libbitsandbytes_{name}.so" for name in os.environ["BNB_KEEP"].split()}
native = re.compile(r"bitsandbytes/libbitsandbytes_[^/]+\.so$")
dropped = lambda name: bool(native.search(name)) and name.rsplit("/", 1)[-1] not in keep
slim = wheel.with_suffix(".slim")
with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as out:
    for info in src.infolist():
        if dropped(info.filename):
            continue
        data = src.read(info)
        if info.filename.endswith(".dist-info/RECORD"):
            lines = data.decode().splitlines(keepends=True)
            data = "".join(line for line in lines if not dropped(line.split(",", 1)[0])).encode()
        out.writestr(info, data, zipfile.ZIP_DEFLATED)
before = wheel.stat().st_size
slim.replace(wheel)
print(f"{wheel.name}: kept {sorted(keep)}, {before / 2**20:.1f} -> {wheel.stat().st_size / 2**20:.1f} MiB")
PY
}

mkdir -p "$DEST"
# --no-deps: the list above is the whole closure (the GPU machine's torch must never be replaced by a download).
# pip matches manylinux tags exactly, so every tag a wheel here may carry is named. On a rerun pip finds the
# slimmed bitsandbytes wheel "has bad hash" against the registry's: it downloads it again, and it is slimmed again.
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --dest "$DEST" \
  --python-version "$PYVER" --implementation cp --abi "cp${PYVER/./}" --abi abi3 --abi none \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_34_x86_64 \
  --platform any \
  "${PACKAGES[@]}"

if [[ $WITH_8BIT == 1 ]]; then
  slim_bitsandbytes "$DEST"/bitsandbytes-*.whl
fi

echo "wheels in $DEST ($(ls "$DEST"/*.whl | wc -l) files):"
du -b "$DEST"/*.whl | sort -n | awk '{printf "  %8.2f MiB  %s\n", $1 / 2^20, $2; total += $1}
                                   END {printf "  %8.2f MiB  total (the device tool carries 64 MiB a call, the repo included)\n", total / 2^20}'
