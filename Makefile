# Two commands do all the set-up on a fresh machine:
#   make serve   - builds the venv, fetches the default model pair if needed, serves it on :50051
#   make test    - builds the venv and runs the default test suite
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
SOURCES := pyproject.toml CMakeLists.txt $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.hpp)

.PHONY: venv serve test test-slow test-models proto bench-kernels results clean

venv: $(STAMP)

$(STAMP): $(SOURCES)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU wheel first: the project's torch range then needs nothing more.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q scikit-build-core pybind11 ninja
	$(BIN)/pip install -q --no-build-isolation -e '.[test]'
	touch $@

serve: venv
	$(BIN)/specdec serve

test: venv
	$(BIN)/python -m pytest -q

test-slow: venv
	$(BIN)/python -m pytest -q -m slow

test-models: venv
	$(BIN)/python -m pytest -q -m real_models

# Regenerates the committed gRPC stubs from proto/.
proto: venv
	$(BIN)/python -m grpc_tools.protoc -Iproto --python_out=python --grpc_python_out=python --pyi_out=python proto/specdec/v1/specdec.proto

bench-kernels: venv
	$(BIN)/python bench/kernels.py

# The measurements behind docs/benchmarks.md (about an hour on 2 cores; run on an idle machine).
results: venv
	scripts/bench_results.sh

clean:
	rm -rf build $(VENV)

# The tt-metal kernels' checks that need no Tenstorrent device, in a Python 3.12 venv with
# ttnn==0.81.1 (.venv-tt); prints SKIPPED and succeeds where no 3.12 interpreter exists.
.PHONY: test-tt
test-tt:
	scripts/tt_test.sh
