#!/usr/bin/env bash
# One-GPU check for siclip: fresh venv, `pip install -e .[dev]` (PyPI only), the `gpu`-marked tests, then SiCLIP-S0 training with the
# inherited backbone frozen at batch 1536 vs MobileCLIP-S0 full fine-tuning (halved until it fits), mixed
# precision, random 256 px images and tokens. Prints samples/s and peak GPU memory; writes benchmarks/gpu.md.
# Then CoCa captioning, coca_ViT-L-14 random weights: siclip's cached decoder (bf16) vs open_clip's generate
# (bf16 autocast), CAPTION_IMAGES x 5 captions x CAPTION_TOKENS tokens; writes benchmarks/caption-gpu.md.
#
#   bash benchmarks/gpu_check.sh                 # defaults: batch 1536, 20 warm-up + 300 timed steps
#   BATCH=1024 STEPS=100 bash benchmarks/gpu_check.sh
#
# Env: PYTHON (a Python 3.11, pyproject's requires-python), VENV (default ~/.cache/siclip-gpu-venv, outside
# the repo), BATCH, STEPS, WARMUP, TEACHER_MODE (stored | forward | none), EXTRA (more siclip.bench.gpu arguments),
# CAPTION_IMAGES (default 16), CAPTION_TOKENS (default 30).
set -euo pipefail
cd "$(dirname "$0")/.."

BATCH=${BATCH:-1536}
STEPS=${STEPS:-300}
WARMUP=${WARMUP:-20}
TEACHER_MODE=${TEACHER_MODE:-stored}
VENV=${VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/siclip-gpu-venv}
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}

"$PYTHON" - <<'PY'
import sys
if sys.version_info[:2] != (3, 11):
    sys.exit(f"gpu_check: need Python 3.11 (pyproject requires-python), got {sys.version.split()[0]}; set PYTHON=")
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

t0=$SECONDS
mkdir -p "$(dirname "$VENV")"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# torch==2.14.1 from PyPI is the CUDA build on Linux x86_64; pyproject.toml pins the rest.
"$VENV/bin/python" -m pip install --quiet -e ".[dev]"
echo "gpu_check: install took $((SECONDS - t0)) s"

"$VENV/bin/python" - <<'PY'
import torch
assert torch.cuda.is_available(), f"torch {torch.__version__} sees no GPU (CPU wheel? driver?)"
print(f"gpu_check: torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}, "
      f"bf16 {torch.cuda.is_bf16_supported()}")
PY

# The CUDA-only tests (fp16 GradScaler, CUDA autocast, PM sampling on CUDA generators; skipped on CPU)
"$VENV/bin/python" -m pytest -q -p no:cacheprovider -m gpu tests/unit
t1=$SECONDS
# shellcheck disable=SC2086  # EXTRA is split on purpose
"$VENV/bin/python" -m siclip.bench.gpu --model siclip-s0 --baseline mobileclip-s0 \
  --batch "$BATCH" --steps "$STEPS" --warmup "$WARMUP" --teacher-mode "$TEACHER_MODE" \
  --out benchmarks/gpu.md --json benchmarks/gpu.json ${EXTRA:-}
echo "gpu_check: benchmark took $((SECONDS - t1)) s; table in benchmarks/gpu.md"

t2=$SECONDS
"$VENV/bin/python" -m siclip.bench.caption --model coca_ViT-L-14 --images "${CAPTION_IMAGES:-16}" --captions 5 \
  --tokens "${CAPTION_TOKENS:-30}" --repeats 3 --device cuda \
  --out benchmarks/caption-gpu.md --json benchmarks/caption-gpu.json
echo "gpu_check: caption benchmark took $((SECONDS - t2)) s; table in benchmarks/caption-gpu.md"
