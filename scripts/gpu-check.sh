#!/usr/bin/env bash
# The GPU check, sized to finish within 10 minutes on the accelerator machine (an NVIDIA H200):
# at most 2 min of CUDA tests, 5:45 of figures (a 300 s budget the script keeps to, then a hard stop)
# and 2:30 of two replicas on the one GPU.
#
#   bash scripts/gpu-check.sh --fetch-wheels   # here, once: what the device image lacks, into .whl/
#   bash scripts/gpu-check.sh                  # there (the device tool: carry .whl): CUDA tests + figures
#   bash scripts/gpu-check.sh --cpu            # anywhere: the dry run on builtin:tiny (a test runs it)
#
# Writes into $OUT (the device tool's folder) or out/gpu-check/: sdk-tests.txt (the CUDA tests),
# gpu-check.json and gpu-check.md (scripts/gpu_check.py: float16 vs float32, eager / compile /
# CUDA graphs beside diffusers and the paper's code, memory peaks), replicas.txt / replicas.json (two
# pipeline replicas on the one GPU beside one: the mechanism's overhead). Exit status 0 when all passed.
set -uo pipefail
cd "$(dirname "$0")/.."
mode=gpu
for arg in "$@"; do
  case "$arg" in
    --cpu) mode=cpu ;;
    --fetch-wheels) mode=fetch ;;
    *) echo "gpu-check.sh: unknown option '$arg'; allowed: --cpu, --fetch-wheels" >&2; exit 2 ;;
  esac
done
PY="${PYTHON:-python3}"
WHEELS=.whl
# What the device image lacks (its README): at the versions installed here, so both run the same code.
NEEDED="diffusers importlib_metadata pydantic pydantic_core annotated_types typing_inspection python-osc streamdiffusion"

if [ "$mode" = fetch ]; then
  mkdir -p "$WHEELS"
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  for name in $NEEDED; do
    version=$("$PY" -c "import importlib.metadata as m; print(m.version('$name'))") || {
      echo "gpu-check.sh: $name is not installed here (pip install -e '.[test]'; $name for the peer)" >&2; exit 2; }
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d "$WHEELS" "$name==$version" || exit 1
  done
  du -sh "$WHEELS"
  exit 0
fi

OUT_DIR="${OUT:-out/gpu-check}"
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ "$mode" = gpu ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/latentstage-site "$WHEELS"/*.whl || exit 1
  export PYTHONPATH="$PYTHONPATH:/tmp/latentstage-site"
fi
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-/tmp/latentstage-inductor}"

echo "== 1. tests that need CUDA (marker sdk; TensorRT and onnxruntime-gpu ones skip without them)"
timeout 120 "$PY" -m pytest -q -rs -m sdk -p no:cacheprovider \
  tests/test_cuda.py tests/test_onnx.py tests/test_tensorrt_logic.py 2>&1 | tee "$OUT_DIR/sdk-tests.txt"
tests_status=${PIPESTATUS[0]}

echo "== 2. figures (scripts/gpu_check.py)"
if [ "$mode" = cpu ]; then
  check_args=(--cpu --budget-s 240)
else
  check_args=(--budget-s 300)
fi
timeout 345 "$PY" scripts/gpu_check.py --out "$OUT_DIR" "${check_args[@]}" 2>&1 | tee "$OUT_DIR/gpu-check.log"
check_status=${PIPESTATUS[0]}

echo "== 3. two replicas on one GPU (the mechanism and its overhead there: one GPU is not scaling)"
if [ "$mode" = cpu ]; then
  replica_args=(--set model.id=builtin:tiny --set stream.width=256 --set stream.height=256 --frames 10 --rounds 1)
else
  replica_args=(--set model.id=builtin:sd-turbo-shape --set stream.width=512 --set stream.height=512 \
    --set scale.devices=[cuda:0] --frames 60 --rounds 2)
fi
timeout 150 "$PY" -m engine.cli bench --replicas 1,2 --json "$OUT_DIR/replicas.json" "${replica_args[@]}" \
  2>&1 | tee "$OUT_DIR/replicas.txt"
replicas_status=${PIPESTATUS[0]}

echo "== gpu-check: tests exit $tests_status, figures exit $check_status, replicas exit $replicas_status; files in $OUT_DIR"
[ "$tests_status" -eq 0 ] && [ "$check_status" -eq 0 ] && [ "$replicas_status" -eq 0 ]
