#!/usr/bin/env bash
# One CUDA check of the KD step, about 8 minutes on one H200:
#   1. python -m pytest -q -m gpu                 (the GPU tests: loss on CUDA vs CPU, bf16 autocast, kernels, ...)
#   2. python bench/speed.py --device cuda        (the `gpu` preset: a Qwen3-MoE teacher of 3.9B / 1.23B active
#      parameters with Qwen's 151,936 vocabulary and its final student, 1.6B / 0.89B active; bf16-mixed)
#      configurations: experts_kernels (grouped_mm / batched_mm / eager), ours_topk (SDPA), ours_topk_flash (when
#      flash-attn is installed), ours_topk_8bit (bitsandbytes teacher), ours_topk_cached (teacher cache),
#      scoring (kd_taylor), trl_gkd (when trl is installed); tokens/s, MFU (teacher forward + student
#      forward/backward over active matmul parameters, bench/speed.py) and peak CUDA memory of each.
# Writes ONE JSON: $OUT/gpu-check.json when $OUT is set, else bench/out/gpu-check/gpu-check.json (the pytest
# log and the speed run's own speed.{json,md} next to it). Exit status: 2 without CUDA (before anything runs),
# else non-zero if a part failed; the JSON is written either way.
#
#   bash bench/gpu_check.sh                        # or: OUT=/some/dir bash bench/gpu_check.sh
#   SPEED_CONFIGS=ours_topk,trl_gkd bash bench/gpu_check.sh   # a subset of the speed configurations
set -uo pipefail
cd "$(dirname "$0")/.."

DEST="${OUT:-bench/out/gpu-check}"
PY="${PYTHON:-python}"
# GPU_CHECK_SELFTEST=1: the same flow on the CPU with the tiny preset (only to test this script's plumbing)
DEVICE_ARGS=(--device cuda)
[ "${GPU_CHECK_SELFTEST:-0}" = 1 ] && DEVICE_ARGS=(--device cpu --preset tiny)

# --- fail fast without CUDA ---------------------------------------------------------------------------------
if [ "${GPU_CHECK_SELFTEST:-0}" != 1 ] && ! "$PY" - <<'EOF'
import sys
try:
    import torch
except ImportError:
    sys.exit("gpu_check: torch is not installed")
if not torch.cuda.is_available():
    sys.exit("gpu_check: no CUDA device (torch.cuda.is_available() is False; torch %s, CUDA build %s): this "
             "check needs a GPU" % (torch.__version__, torch.version.cuda))
print("gpu_check: %s, torch %s, CUDA %s" % (torch.cuda.get_device_name(), torch.__version__, torch.version.cuda))
EOF
then
    exit 2
fi
mkdir -p "$DEST"

STARTED=$(date +%s)
# --- 1. GPU tests (about 1-2 minutes) ------------------------------------------------------------------------
timeout "${PYTEST_TIMEOUT_S:-180}" "$PY" -m pytest -q -m gpu -p no:cacheprovider > "$DEST/pytest-gpu.log" 2>&1
PYTEST_RC=$?
tail -n 3 "$DEST/pytest-gpu.log"
PYTEST_S=$(( $(date +%s) - STARTED ))

# --- 2. KD step speed on the gpu preset (about 5-6 minutes) --------------------------------------------------
CONFIGS="${SPEED_CONFIGS:-experts_kernels,ours_topk,ours_topk_flash,ours_topk_8bit,ours_topk_cached,scoring,trl_gkd}"
SPEED_STARTED=$(date +%s)
timeout "${SPEED_TIMEOUT_S:-360}" "$PY" bench/speed.py "${DEVICE_ARGS[@]}" --out "$DEST/speed" --configs "$CONFIGS" \
    > "$DEST/speed.log" 2>&1
SPEED_RC=$?
tail -n 40 "$DEST/speed.log"
SPEED_S=$(( $(date +%s) - SPEED_STARTED ))

# --- one JSON ------------------------------------------------------------------------------------------------
"$PY" - "$DEST" "$PYTEST_RC" "$PYTEST_S" "$SPEED_RC" "$SPEED_S" <<'EOF'
import importlib.util, json, re, sys
from pathlib import Path

import torch

dest, pytest_rc, pytest_s, speed_rc, speed_s = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), \
    int(sys.argv[4]), int(sys.argv[5])
log = (dest / "pytest-gpu.log").read_text(errors="replace").splitlines()
summary_line = next((l for l in reversed(log) if re.search(r"\d+ (passed|failed|error|skipped)", l)), "")
speed_file = dest / "speed" / "speed.json"
partial = dest / "speed" / "speed.partial.json"
if speed_file.exists():
    speed, speed_complete = json.loads(speed_file.read_text()), True
elif partial.exists():  # cut short by the time limit: what ran
    speed, speed_complete = json.loads(partial.read_text()), False
else:
    speed, speed_complete = None, False
packages = {name: importlib.util.find_spec(name) is not None for name in ("flash_attn", "bitsandbytes", "trl")}
versions = {"torch": torch.__version__, "cuda": torch.version.cuda}
for name in ("transformers", "lightning", "trl", "bitsandbytes", "flash_attn"):
    try:
        versions[name] = __import__(name).__version__
    except Exception:
        pass
cuda = torch.cuda.is_available()
result = {
    "gpu": torch.cuda.get_device_name() if cuda else None,
    "capability": list(torch.cuda.get_device_capability()) if cuda else None,
    "versions": versions, "installed": packages,
    "pytest_gpu": {"rc": pytest_rc, "summary": summary_line, "wall_s": pytest_s, "log": str(dest / "pytest-gpu.log")},
    "speed": {"rc": speed_rc, "complete": speed_complete, "wall_s": speed_s, "log": str(dest / "speed.log"),
              "result": speed},
    "ok": pytest_rc == 0 and speed_rc == 0 and speed_complete,
}
(dest / "gpu-check.json").write_text(json.dumps(result, indent=2) + "\n")
print(f"gpu_check: wrote {dest / 'gpu-check.json'} (pytest rc {pytest_rc}: {summary_line!r}; speed rc {speed_rc}, "
      f"complete {speed_complete})")
EOF
[ "$PYTEST_RC" -eq 0 ] && [ "$SPEED_RC" -eq 0 ]
