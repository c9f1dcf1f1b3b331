#!/usr/bin/env bash
# The tt job: a Python 3.12 venv with ttnn==0.81.1 (its wheels are cp310/cp312 only) and the project's CPU
# kernels built in it (no torch: the kernels need numpy alone), then the checks that run without a
# Tenstorrent device:
#   - the stock-ttnn path on the numpy model of its operations against the CPU kernels, and its ttnn
#     binding against the installed ttnn's functions and keywords,
#   - the custom kernel: its tile model against the CPU kernels, the real kernel sources in the host
#     emulator, program-descriptor builder tests under a mock Wormhole N150 cluster, every kernel
#     source through g++ -E with the JIT's include paths and macros, plus negative tests,
#   - the device tests (marked tt_device), which skip with their reason where no device exists.
# Where no 3.12 interpreter exists it says so and exits 0 (skipped).
#
#   scripts/tt_test.sh            # uses $PY312, else pyenv's 3.12, else python3.12 on PATH
#   TT_VENV=.venv-tt scripts/tt_test.sh
set -euo pipefail
cd "$(dirname "$0")/.."

TT_VENV=${TT_VENV:-.venv-tt}
PY312=${PY312:-}
if [[ -z "$PY312" ]] && command -v pyenv >/dev/null 2>&1; then
  PY312=$(ls -d "$(pyenv root)"/versions/3.12*/bin/python3.12 2>/dev/null | sort -V | tail -1 || true)
fi
if [[ -z "$PY312" ]]; then
  PY312=$(command -v python3.12 || true)
fi
if [[ -z "$PY312" || ! -x "$PY312" ]]; then
  echo "test-tt: SKIPPED - no Python 3.12 interpreter found (ttnn 0.81.1 ships wheels for CPython 3.10 and 3.12 only)"
  exit 0
fi

PKGS=(ttnn==0.81.1 "numpy<2" loguru networkx graphviz pyyaml click pandas seaborn ml_dtypes pytest pytest-timeout
      scipy scikit-build-core pybind11 ninja)
STAMP="$TT_VENV/.tt-installed"
WANT="${PKGS[*]}"
if [[ ! -x "$TT_VENV/bin/python" ]]; then
  "$PY312" -m venv "$TT_VENV"
fi
if [[ ! -f "$STAMP" || "$(cat "$STAMP")" != "$WANT" ]]; then
  "$TT_VENV/bin/pip" install -q --upgrade pip
  "$TT_VENV/bin/pip" install -q "${PKGS[@]}"
  echo "$WANT" > "$STAMP"
fi
# The CPU kernels (specdec._kernels) for this interpreter; an unchanged tree rebuilds in seconds.
"$TT_VENV/bin/pip" install -q --no-build-isolation --no-deps -e .

# Mock cluster descriptor: ../shared/tt-metal in CI (relative to the repository root).
if [[ -z "${TT_METAL_MOCK_CLUSTER_DESC_PATH:-}" ]]; then
  for d in ../shared/tt-metal /work/shared/tt-metal; do
    if [[ -f "$d/wormhole_N150.yaml" ]]; then
      export TT_METAL_MOCK_CLUSTER_DESC_PATH="$(cd "$d" && pwd)/wormhole_N150.yaml"
      break
    fi
  done
fi
if [[ -z "${TT_METAL_MOCK_CLUSTER_DESC_PATH:-}" ]]; then
  echo "test-tt: no mock cluster descriptor (../shared/tt-metal/wormhole_N150.yaml); the descriptor tests build without one"
fi

"$TT_VENV/bin/python" -c "import ttnn, sys; print('test-tt: ttnn', ttnn.__version__ if hasattr(ttnn, '__version__') else '0.81.1', 'on Python', sys.version.split()[0])" 2>&1 | grep -v DEBUG | grep -v '^Config' || true
# -m overrides the project's default deselection so the device tests report their skip reason.
"$TT_VENV/bin/python" -m pytest -q -rs -p no:cacheprovider --confcutdir=tests/tt -m "tt_device or not tt_device" \
  tests/tt/test_stock.py tests/tt/test_stock_ttnn.py tests/tt/test_tile_model.py tests/tt/test_emulator.py \
  tests/tt/test_descriptors.py tests/tt/test_kernel_sources.py tests/tt/test_device.py
