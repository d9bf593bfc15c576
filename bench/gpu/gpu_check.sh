#!/usr/bin/env bash
# The one-call GPU check of issues 13 and 25, for a bare CUDA machine (Python 3.12 with torch, accelerate,
# safetensors and huggingface_hub, no network): installs, offline, the wheels bench/gpu/gpu_wheels.sh downloaded into
# .gpu_wheels/, then runs bench/gpu/bench_gpu.py in what is left of 7 minutes. The table goes to stdout and, when
# $OUT is set (the device tool's folder that comes back), to $OUT/bench_gpu.txt, each row as it is measured; the
# whole log to $OUT/bench_gpu.log, the trainer row's run log to $OUT/bench_gpu_trainer.log, and the train.py runs'
# logs to $OUT/bench_gpu_runs.log. Its last line but one names the `--only` that reruns what did not pass.
#
#     bash bench/gpu/gpu_check.sh [bench_gpu.py options, e.g. --only lora,resume_fp32]
#     PYTHON=.venv/bin/python bash bench/gpu/gpu_check.sh --dry    # the CPU rehearsal, nothing installed
#     WHEELS=/tmp/w PYTHON=/tmp/bare/bin/python bash bench/gpu/gpu_check.sh --dry   # the install rehearsed too:
#         a venv holding only what the GPU machine is sure to have, wheels from PYVER=3.x DEST=/tmp/w gpu_wheels.sh
#
# Environment: LIMIT_S (420: the whole call, install included), PYTHON (python3), WHEELS (.gpu_wheels).
set -uo pipefail
cd "$(dirname "$0")/../.."

LIMIT_S=${LIMIT_S:-420}
PYTHON=${PYTHON:-python3}
WHEELS_GIVEN=${WHEELS:-}
WHEELS=${WHEELS:-.gpu_wheels}
INSTALL_LIMIT_S=150
MARGIN_S=30  # the bench's own deadline ends this long before the hard limit: its last row and the goals
export PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
export HF_HUB_OFFLINE=1  # no network there: nothing may wait on the Hub

# pip resolves the top-level wheels against what the machine already has and installs from $WHEELS only
# what is missing or too old (the machine's torch is never touched: every wheel's torch need is met by it). If
# that resolution fails (an installed package that conflicts), every wheel goes into a private folder instead,
# ahead of the machine's packages on PYTHONPATH.
install_wheels() {
  # accelerate as requirements.txt pins it too: the machine's own may be older than the one the tests run
  local tops=("$WHEELS"/diffusers-*.whl "$WHEELS"/transformers-*.whl "$WHEELS"/peft-*.whl "$WHEELS"/accelerate-*.whl)
  local bnb=("$WHEELS"/bitsandbytes-*.whl)
  [[ -e ${bnb[0]} ]] && tops+=("${bnb[@]}") || echo "no bitsandbytes wheel in $WHEELS: the 8-bit rows will be skipped"
  if timeout "$INSTALL_LIMIT_S" "$PYTHON" -m pip install --quiet --no-index --no-compile --find-links "$WHEELS" \
      "${tops[@]}"; then
    return 0
  fi
  echo "resolving against the installed packages failed; installing every wheel into /tmp/gpu_site instead"
  timeout "$INSTALL_LIMIT_S" "$PYTHON" -m pip install --quiet --no-index --no-compile --no-deps \
    --target /tmp/gpu_site "$WHEELS"/*.whl || return 1
  export PYTHONPATH=/tmp/gpu_site${PYTHONPATH:+:$PYTHONPATH}
}

check() {
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  df -h / /tmp "${TMPDIR:-/tmp}" 2>/dev/null | uniq  # the train.py runs' saves go under the temporary folder
  "$PYTHON" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)'
  if [[ " $* " == *" --dry "* && -z $WHEELS_GIVEN ]]; then
    echo "--dry: the CPU rehearsal, with the packages $PYTHON has (WHEELS=dir rehearses the install too)"
  elif compgen -G "$WHEELS/*.whl" >/dev/null; then
    install_wheels || { echo "gpu_check: installing the wheels in $WHEELS failed"; return 3; }
    echo "installed the wheels in $((SECONDS - started)) s"
  else
    echo "no wheels in $WHEELS (bash bench/gpu/gpu_wheels.sh makes them): using the installed packages"
  fi
  "$PYTHON" -c 'import diffusers, transformers' || { echo "gpu_check: diffusers/transformers cannot be imported"; return 3; }
  local left=$((LIMIT_S - (SECONDS - started)))
  timeout -k 5 "$((left - 5))" "$PYTHON" bench/gpu/bench_gpu.py --budget_s "$((left - MARGIN_S))" \
    ${OUT:+--out "$OUT/bench_gpu.txt"} "$@"
}

started=$SECONDS
if [[ -n ${OUT:-} ]]; then
  mkdir -p "$OUT"
  check "$@" 2>&1 | tee "$OUT/bench_gpu.log"
  exit "${PIPESTATUS[0]}"
fi
check "$@"
