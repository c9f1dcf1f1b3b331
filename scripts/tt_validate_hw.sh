#!/usr/bin/env bash
# Validate the tt-metal kernels on a Tenstorrent card (Wormhole n150/n300; Blackhole should also work)
# against the CPU kernels.  Needs: the card with its driver and firmware, the SFPI toolchain release
# named in <site-packages>/ttnn/tt_metal/sfpi-version, Python 3.12 and a C++17 compiler.
#
#   scripts/tt_validate_hw.sh            # venv in .venv-tt-hw
#
# It builds the project (CPU kernels) and installs ttnn==0.81.1 in one Python 3.12 venv, then runs the
# device tests of both paths (tests/tt/test_device.py, marker tt_device: the stock-ttnn path and the custom
# program against the CPU kernels, and a sampled speculative request through the server) and the numpy-model
# tests, and writes
# tt-report.json (python -m specdec.tt.hw_report: versions, agreement with the CPU kernels, a chi-square of
# sampled tokens, per-call timings), which can be pasted into an issue.  The device tests skip, with the
# reason, if no device can be opened; this script then fails, since that is no validation.
set -euo pipefail
cd "$(dirname "$0")/.."
PY312=${PY312:-$(command -v python3.12 || true)}
if [[ -z "$PY312" ]]; then echo "need python3.12 (ttnn 0.81.1 wheels are cp310/cp312)"; exit 2; fi
VENV=${VENV:-.venv-tt-hw}
[[ -x "$VENV/bin/python" ]] || "$PY312" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
"$VENV/bin/pip" install -q scikit-build-core pybind11 ninja
"$VENV/bin/pip" install -q --no-build-isolation -e '.[test]'
"$VENV/bin/pip" install -q ttnn==0.81.1 "numpy<2" loguru networkx graphviz pyyaml click pandas seaborn ml_dtypes
unset TT_METAL_MOCK_CLUSTER_DESC_PATH
"$VENV/bin/python" -c "from specdec.tt import why_unavailable as w; r = w(); print('device:', r or 'ok'); raise SystemExit(1 if r else 0)"
status=0
"$VENV/bin/python" -m pytest -p no:cacheprovider -rs -m "tt_device or not tt_device" \
  tests/tt/test_device.py tests/tt/test_stock.py tests/tt/test_stock_ttnn.py tests/tt/test_tile_model.py || status=$?
SPECDEC_COMMIT=${SPECDEC_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || true)} \
  "$VENV/bin/python" -m specdec.tt.hw_report --json tt-report.json
echo "report: tt-report.json (tests exit status $status)"
exit "$status"
