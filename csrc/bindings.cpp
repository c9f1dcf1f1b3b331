// pybind11 bindings for specdec._kernels.
//
// The Python face (python/specdec/kernels/sampling.py) does every shape, dtype and range check and passes raw
// addresses of contiguous numpy arrays / torch CPU tensors (zero-copy; the caller keeps them alive for
// the call). The GIL is released while a kernel runs. Use specdec.kernels, not this module.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <utility>
#include <vector>

#include "attention/rows.hpp"
#include "decoder/pointwise.hpp"
#include "kernels/acceptance.hpp"
#include "kernels/rng.hpp"
#include "kernels/sampling.hpp"
#include "kernels/threadpool.hpp"
#include "linear/pack.hpp"
#include "linear/quant.hpp"
#include "linear/small_m.hpp"

namespace py = pybind11;
using specdec::uniform;

template <class T>
static T* P(uintptr_t a) {
  return reinterpret_cast<T*>(a);
}

// An Isa from Python's int; with `usable`, one this CPU runs (a forced path the CPU lacks would fault).
static specdec::Isa checked_isa(int isa, bool usable = true) {
  if (isa < 0 || isa > 2) throw std::invalid_argument("isa must be 0 (portable), 1 (avx2) or 2 (avx512)");
  const auto path = static_cast<specdec::Isa>(isa);
  if (usable && !specdec::cpu_supports(path)) throw std::invalid_argument("this CPU cannot run the requested isa path");
  return path;
}

PYBIND11_MODULE(_kernels, m) {
  m.doc() = "specdec fused sampling and speculative verification kernels (use specdec.kernels)";
  m.attr("GREEDY_TEMPERATURE") = double(specdec::kGreedyTemperature);
  m.attr("STREAM_SAMPLE") = int(specdec::kStreamSample);
  m.attr("STREAM_VERIFY") = int(specdec::kStreamVerify);

  m.def(
      "sample",
      [](uintptr_t logits, int dtype, int64_t B, int64_t V, uintptr_t temperature, uintptr_t top_k, uintptr_t top_p,
         uintptr_t min_p, uintptr_t seed, uintptr_t offset, uintptr_t out_tokens, uintptr_t out_probs,
         uintptr_t status) {
        specdec::sample_batch(P<const void>(logits), dtype, B, V, P<const double>(temperature),
                              P<const int64_t>(top_k), P<const double>(top_p), P<const double>(min_p),
                              P<const uint64_t>(seed), P<const uint64_t>(offset), P<int64_t>(out_tokens),
                              P<float>(out_probs), P<int32_t>(status));
      },
      py::call_guard<py::gil_scoped_release>());

  m.def(
      "verify",
      [](uintptr_t logits, int dtype, int64_t B, int64_t K, int64_t V, uintptr_t draft_tokens, uintptr_t draft_probs,
         uintptr_t num_draft, uintptr_t temperature, uintptr_t top_k, uintptr_t top_p, uintptr_t min_p, uintptr_t seed,
         uintptr_t offset, uintptr_t out_tokens, uintptr_t out_num_accepted, uintptr_t status, uintptr_t status_pos) {
        specdec::verify_batch(P<const void>(logits), dtype, B, K, V, P<const int64_t>(draft_tokens),
                              P<const float>(draft_probs), P<const int32_t>(num_draft), P<const double>(temperature),
                              P<const int64_t>(top_k), P<const double>(top_p), P<const double>(min_p),
                              P<const uint64_t>(seed), P<const uint64_t>(offset), P<int64_t>(out_tokens),
                              P<int32_t>(out_num_accepted), P<int32_t>(status), P<int32_t>(status_pos));
      },
      py::call_guard<py::gil_scoped_release>());

  m.def(
      "logprobs",
      [](uintptr_t logits, int dtype, int64_t N, int64_t V, uintptr_t tokens, uintptr_t temperature, uintptr_t top_k,
         uintptr_t top_p, uintptr_t min_p, int64_t top_n, uintptr_t out_logprobs, uintptr_t out_top_ids,
         uintptr_t out_top_logprobs, uintptr_t status) {
        specdec::logprobs_batch(P<const void>(logits), dtype, N, V, P<const int64_t>(tokens),
                                P<const double>(temperature), P<const int64_t>(top_k), P<const double>(top_p),
                                P<const double>(min_p), top_n, P<float>(out_logprobs), P<int64_t>(out_top_ids),
                                P<float>(out_top_logprobs), P<int32_t>(status));
      },
      py::call_guard<py::gil_scoped_release>());

  m.def(
      "uniforms",
      [](uintptr_t seed, uintptr_t offset, int64_t B, int64_t count, uint32_t stream, uintptr_t out) {
        const uint64_t* s = P<const uint64_t>(seed);
        const uint64_t* o = P<const uint64_t>(offset);
        double* u = P<double>(out);
        for (int64_t b = 0; b < B; ++b)
          for (int64_t i = 0; i < count; ++i) u[b * count + i] = uniform(s[b], o[b], stream, uint32_t(i));
      },
      py::call_guard<py::gil_scoped_release>());

  m.def("philox4x32_10", [](uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
    const uint32_t ctr[4] = {c0, c1, c2, c3};
    const uint32_t key[2] = {k0, k1};
    uint32_t out[4];
    specdec::Philox4x32::generate(ctr, key, out);
    return py::make_tuple(out[0], out[1], out[2], out[3]);
  });

  // Output columns are split across the pool in tasks of at most 256 columns, and into at least two tasks per thread
  // so that a narrow matrix (a 256-row k or v projection) still keeps every thread streaming; a multiple of 4 columns,
  // the float kernel's widest group (`python bench/quant_rows.py` and `bench/linear_rows.py` time the split).
  const auto columns_per_task = [](int64_t n) {
    const int64_t per_thread = (n + 2 * specdec::num_threads() - 1) / (2 * specdec::num_threads());
    return std::max<int64_t>(4, std::min<int64_t>(256, (per_thread + 3) / 4 * 4));
  };
  const auto column_tasks = [=](int64_t n) { return (n + columns_per_task(n) - 1) / columns_per_task(n); };
  const auto columns = [=](int64_t t, int64_t n) {
    const int64_t c = columns_per_task(n);
    return std::pair(t * c, std::min(n, (t + 1) * c));
  };

  // y[m, n] = x[m, k] · w[n, k]^T (+ bias): the few-row linear of decode and verify forwards over float32 (wtype 0)
  // or bfloat16 (1) weights, on the `isa` path (python/specdec/models/linear.py checks the arguments).
  m.def(
      "linear_small_m",
      [=](uintptr_t x, uintptr_t w, int wtype, uintptr_t bias, uintptr_t y, int64_t rows, int64_t n, int64_t k, int isa) {
        if (wtype < 0 || wtype > 1) throw std::invalid_argument("wtype must be 0 (float32) or 1 (bfloat16)");
        const auto type = static_cast<specdec::WeightType>(wtype);
        const auto path = checked_isa(isa);
        specdec::parallel_run(column_tasks(n), [&](int64_t t, int) {
          const auto [begin, end] = columns(t, n);
          specdec::linear_small_m(P<const float>(x), P<const void>(w), type, P<const float>(bias), P<float>(y), rows, n,
                                  k, begin, end, path);
        });
      },
      py::call_guard<py::gil_scoped_release>());

  // y[m, n] = x[m, k] · w[n, k]^T (+ bias) over quantised weights (csrc/linear/quant.hpp: codes, scales, mins,
  // sub-scales, sub-mins, bits, group, block); x is quantised once, before the columns are split (python/specdec/models/quant.py checks the arguments).
  m.def(
      "linear_quant",
      [=](uintptr_t x, uintptr_t codes, uintptr_t scales, uintptr_t mins, uintptr_t sub_scales, uintptr_t sub_mins,
          int bits, int group, int block, uintptr_t bias, uintptr_t y, int64_t rows, int64_t n, int64_t k, int isa) {
        if (!((bits == 4 && group == 32) || (bits == 8 && (group == 16 || group == 32))))
          throw std::invalid_argument("bits/group must be 4/32, 8/16 or 8/32");
        if (k % specdec::kQuantChunk != 0) throw std::invalid_argument("k must be a multiple of 128");
        if (sub_scales ? (block != 256 || k % block != 0 || (mins != 0) != (sub_mins != 0)) : block != group)
          throw std::invalid_argument("two-level scales need block 256 dividing k (and sub-mins with mins); else block == group");
        const auto path = checked_isa(isa);
        std::vector<uint8_t> q(rows * k);
        std::vector<float> a(rows * (k / specdec::kQuantChunk)), gsum(mins ? rows * (k / group) : 0);
        specdec::quantize_activations(P<const float>(x), rows, k, group, specdec::quant_offset(path, bits), q.data(), a.data(),
                                      mins ? gsum.data() : nullptr);
        const specdec::QuantRows xq{q.data(), a.data(), mins ? gsum.data() : nullptr, rows, k};
        const specdec::QuantMatrix wq{P<const uint8_t>(codes), P<const float>(scales), P<const float>(mins),
                                      P<const int8_t>(sub_scales), P<const int8_t>(sub_mins), bits, group, block, n, k};
        specdec::parallel_run(column_tasks(n), [&](int64_t t, int) {
          const auto [begin, end] = columns(t, n);
          specdec::linear_quant(xq, wq, P<const float>(bias), P<float>(y), begin, end, path);
        });
      },
      py::call_guard<py::gil_scoped_release>());
  // Weights → the quantised kernel's arrays (csrc/linear/pack.hpp); python/specdec/models/quant.py allocates the
  // outputs for the format and checks the shapes. type: the index in GGUF_REPACK_TYPES; kind: 0 int8, 1 q4.
  m.attr("GGUF_REPACK_TYPES") = py::make_tuple("Q4_0", "Q5_0", "Q8_0", "Q4_K", "Q5_K", "Q6_K");
  m.def(
      "repack_gguf",
      [](int type, uintptr_t raw, int64_t n, int64_t k, uintptr_t codes, uintptr_t scales, uintptr_t mins,
         uintptr_t sub_scales, uintptr_t sub_mins) {
        if (type < 0 || type > 5) throw std::invalid_argument("type must index GGUF_REPACK_TYPES (0..5)");
        specdec::repack_gguf(static_cast<specdec::GgufType>(type), P<const uint8_t>(raw), n, k,
                             {P<uint8_t>(codes), P<float>(scales), P<float>(mins), P<int8_t>(sub_scales), P<int8_t>(sub_mins)});
      },
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "requantize_gguf",
      [](int type, uintptr_t raw, int64_t n, int64_t k, int kind, uintptr_t codes, uintptr_t scales, uintptr_t mins) {
        if (type < 0 || type > 5) throw std::invalid_argument("type must index GGUF_REPACK_TYPES (0..5)");
        if (kind < 0 || kind > 1) throw std::invalid_argument("kind must be 0 (int8) or 1 (q4)");
        if (k % specdec::kQuantChunk != 0) throw std::invalid_argument("k must be a multiple of 128");
        specdec::requantize_gguf(static_cast<specdec::GgufType>(type), P<const uint8_t>(raw), n, k,
                                 static_cast<specdec::QuantKind>(kind),
                                 {P<uint8_t>(codes), P<float>(scales), P<float>(mins), nullptr, nullptr});
      },
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "dequantize_rows",
      [](uintptr_t codes, uintptr_t scales, uintptr_t mins, uintptr_t sub_scales, uintptr_t sub_mins, int bits, int group,
         int block, int64_t n, int64_t k, int64_t r0, int64_t r1, uintptr_t out, bool bf16) {
        if (!((bits == 4 && group == 32) || (bits == 8 && (group == 16 || group == 32))))
          throw std::invalid_argument("bits/group must be 4/32, 8/16 or 8/32");
        if (k % specdec::kQuantChunk != 0 || block % group != 0) throw std::invalid_argument("k must be a multiple of 128");
        if (r0 < 0 || r1 > n || r0 > r1) throw std::invalid_argument("rows must lie in [0, n)");
        const specdec::QuantMatrix w{P<const uint8_t>(codes), P<const float>(scales), P<const float>(mins),
                                     P<const int8_t>(sub_scales), P<const int8_t>(sub_mins), bits, group, block, n, k};
        specdec::dequantize_rows(w, r0, r1, P<void>(out), bf16);
      },
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "quantize_weights",
      [](int kind, uintptr_t w, int64_t n, int64_t k, uintptr_t codes, uintptr_t scales, uintptr_t mins) {
        if (kind < 0 || kind > 1) throw std::invalid_argument("kind must be 0 (int8) or 1 (q4)");
        if (k % specdec::kQuantChunk != 0) throw std::invalid_argument("k must be a multiple of 128");
        specdec::quantize_weights(static_cast<specdec::QuantKind>(kind), P<const float>(w), n, k,
                                  {P<uint8_t>(codes), P<float>(scales), P<float>(mins), nullptr, nullptr});
      },
      py::call_guard<py::gil_scoped_release>());
  // out[r, h, :] = attention of query row r, head h over keys [begin[r], end[r]) (csrc/attention/rows.hpp); strides
  // in elements (python/specdec/models/attention.py checks the arguments).
  m.def(
      "attend_rows",
      [](uintptr_t q, int64_t q_head, int64_t q_row, uintptr_t k, int64_t k_head, int64_t k_row, uintptr_t v,
         int64_t v_head, int64_t v_row, int64_t rows, int64_t heads, int64_t kv_heads, int64_t dim, uintptr_t begin,
         uintptr_t end, float scale, uintptr_t out, int64_t o_head, int64_t o_row, int isa) {
        if (kv_heads <= 0 || heads % kv_heads != 0) throw std::invalid_argument("heads must be a multiple of kv_heads");
        specdec::attend_rows({P<const float>(q), q_head, q_row}, {P<const float>(k), k_head, k_row},
                             {P<const float>(v), v_head, v_row}, rows, heads, kv_heads, dim, P<const int64_t>(begin),
                             P<const int64_t>(end), scale, P<float>(out), o_head, o_row, checked_isa(isa));
      },
      py::call_guard<py::gil_scoped_release>());
  // The lean decoder's pointwise steps (csrc/decoder/pointwise.hpp); python/specdec/models/decoder.py passes
  // contiguous float32 tensors of the shapes given there.
  m.def(
      "rms_norm",
      [](uintptr_t x, uintptr_t weight, uintptr_t out, int64_t rows, int64_t n, float eps) {
        specdec::rms_norm(P<const float>(x), P<const float>(weight), P<float>(out), rows, n, eps);
      },
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "rope",
      [](uintptr_t x, int64_t rows, int64_t heads, int64_t dim, int64_t row_stride, uintptr_t positions, uintptr_t cos,
         uintptr_t sin) {
        if (dim % 2 != 0) throw std::invalid_argument("dim must be even");
        specdec::rope(P<float>(x), rows, heads, dim, row_stride, P<const int64_t>(positions), P<const float>(cos),
                      P<const float>(sin));
      },
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "silu_mul",
      [](uintptr_t gate_up, uintptr_t out, int64_t rows, int64_t inter) {
        specdec::silu_mul(P<const float>(gate_up), P<float>(out), rows, inter);
      },
      py::call_guard<py::gil_scoped_release>());
  m.def("cpu_supports", [](int isa) { return specdec::cpu_supports(checked_isa(isa, false)); });
  m.attr("rows_per_pass") = specdec::kRowsPerPass;

  m.def("num_threads", &specdec::num_threads);
  m.def("set_num_threads", &specdec::set_num_threads, py::call_guard<py::gil_scoped_release>());
}
