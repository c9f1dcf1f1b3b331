#!/usr/bin/env bash
# The measurements behind docs/benchmarks.md's table, in one go (make results): about 100 minutes on 2 cores.
# Run it on an otherwise idle machine; each JSON names the commit (SPECDEC_COMMIT), the CPU and the load.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-docs/benchmarks}
BIN=${BIN:-.venv/bin}
export SPECDEC_COMMIT=${SPECDEC_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
mkdir -p "$OUT"
$BIN/python -m specdec.cli models fetch
# llama.cpp as the peer needs the optional extra, built without OpenMP (see specdec/bench/llamacpp.py):
#   CMAKE_ARGS="-DGGML_OPENMP=OFF" pip install 'specdec[llamacpp]'
$BIN/python -m specdec.cli bench --max-new-tokens 64 --compare-llamacpp --json "$OUT/greedy.json" --plot "$OUT/greedy.png" --markdown "$OUT/greedy.md"
# The same on the AVX2 path (any x86 host with AVX-512 runs it too)
SPECDEC_ISA=avx2 $BIN/python -m specdec.cli bench --max-new-tokens 64 --compare-llamacpp --json "$OUT/greedy-avx2.json" --markdown "$OUT/greedy-avx2.md"
$BIN/python -m specdec.cli bench --max-new-tokens 64 --temperature 0.7 --seed 1 --compare-llamacpp --json "$OUT/t07.json" --markdown "$OUT/t07.md"
$BIN/python -m specdec.cli bench --max-new-tokens 64 --compare-hf --json "$OUT/vs-hf.json" --markdown "$OUT/vs-hf.md"
DRAFT=$(mktemp -d)
$BIN/python bench/random_draft.py "$DRAFT/random-draft"
$BIN/python -m specdec.cli bench --draft "$DRAFT/random-draft" --max-new-tokens 64 --json "$OUT/random-draft.json" --markdown "$OUT/random-draft.md"
rm -rf "$DRAFT"
$BIN/python -m specdec.cli bench --concurrency 1,4,8 --requests-per-stream 2 --max-new-tokens 32 --json "$OUT/concurrency.json" --markdown "$OUT/concurrency.md"
$BIN/python -m specdec.cli bench --scenario shared-prefix --max-new-tokens 32 --json "$OUT/shared-prefix.json" --markdown "$OUT/shared-prefix.md"
$BIN/python -m specdec.cli bench --scenario agent-loop --max-new-tokens 256 --json "$OUT/agent-loop.json" --markdown "$OUT/agent-loop.md"
$BIN/python -m specdec.cli bench --scenario json-schema --max-new-tokens 256 --json "$OUT/json-schema.json" --markdown "$OUT/json-schema.md"
$BIN/python -m specdec.cli bench --scenario methods --max-new-tokens 64 --json "$OUT/builtin-methods.json" --markdown "$OUT/builtin-methods.md"
SPECDEC_ISA=avx2 $BIN/python -m specdec.cli bench --scenario methods --max-new-tokens 64 --json "$OUT/builtin-methods-avx2.json" --markdown "$OUT/builtin-methods-avx2.md"
$BIN/python -m specdec.cli loadtest --duration 60 --clients 8 --fuzz-cases 0 --prompt-prefix-file python/specdec/bench/data/system_prompt.txt --json "$OUT/loadtest-prefix.json"
$BIN/python bench/suffix_lookup.py --json "$OUT/suffix-lookup.json"
$BIN/python bench/verify_cost.py --json "$OUT/verify-cost.json"
$BIN/python bench/linear_rows.py --json "$OUT/linear-rows.json"
$BIN/python bench/perplexity.py --json "$OUT/perplexity.json"
$BIN/python bench/long_prompt.py --json "$OUT/long-prompt.json"
SPECDEC_ISA=avx2 $BIN/python bench/long_prompt.py --json "$OUT/long-prompt-avx2.json"
$BIN/python -m specdec.cli loadtest --duration 60 --clients 8 --fuzz-cases 2000 --json "$OUT/loadtest.json"
