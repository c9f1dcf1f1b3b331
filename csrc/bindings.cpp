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

#include "kernels/acceptance.hpp"
#include "kernels/rng.hpp"
#include "kernels/sampling.hpp"
#include "kernels/threadpool.hpp"
#include "linear/small_m.hpp"

namespace py = pybind11;
using specdec::uniform;

template <class T>
static T* P(uintptr_t a) {
  return reinterpret_cast<T*>(a);
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
         uintptr_t offset, uintptr_t out_tokens, uintptr_t out_num_accepted, uintptr_t out_logprobs, uintptr_t status,
         uintptr_t status_pos) {
        specdec::verify_batch(P<const void>(logits), dtype, B, K, V, P<const int64_t>(draft_tokens),
                              P<const float>(draft_probs), P<const int32_t>(num_draft), P<const double>(temperature),
                              P<const int64_t>(top_k), P<const double>(top_p), P<const double>(min_p),
                              P<const uint64_t>(seed), P<const uint64_t>(offset), P<int64_t>(out_tokens),
                              P<int32_t>(out_num_accepted), P<float>(out_logprobs), P<int32_t>(status),
                              P<int32_t>(status_pos));
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

  // y[m, n] = x[m, k] · w[n, k]^T (· scale[n] for int8) (+ bias): the few-row linear of decode and verify
  // forwards (python/specdec/models/linear.py checks the arguments). Output columns are split across the pool;
  // for int8 weights x is quantised once, before the split.
  m.def(
      "linear_small_m",
      [](uintptr_t x, uintptr_t w, int wtype, uintptr_t scale, uintptr_t bias, uintptr_t y, int64_t rows, int64_t n,
         int64_t k) {
        constexpr int kInt8 = 2;  // int8 weights take the quantised-activation kernel, not a WeightType
        if (wtype < 0 || wtype > kInt8) throw std::invalid_argument("wtype must be 0 (float32), 1 (bfloat16) or 2 (int8)");
        constexpr int64_t kColumnsPerTask = 256;
        const int64_t tasks = (n + kColumnsPerTask - 1) / kColumnsPerTask;
        const auto columns = [&](int64_t t) { return std::pair(t * kColumnsPerTask, std::min(n, (t + 1) * kColumnsPerTask)); };
        if (wtype == kInt8) {
          std::vector<uint8_t> xu(rows * k);
          std::vector<float> sx(rows);
          specdec::quantize_rows_q8(P<const float>(x), rows, k, xu.data(), sx.data());
          specdec::parallel_run(tasks, [&](int64_t t, int) {
            const auto [begin, end] = columns(t);
            specdec::linear_small_m_q8(xu.data(), sx.data(), P<const int8_t>(w), P<const float>(scale), P<const float>(bias),
                                       P<float>(y), rows, n, k, begin, end);
          });
          return;
        }
        const auto type = static_cast<specdec::WeightType>(wtype);
        specdec::parallel_run(tasks, [&](int64_t t, int) {
          const auto [begin, end] = columns(t);
          specdec::linear_small_m(P<const float>(x), P<const void>(w), type, P<const float>(bias), P<float>(y), rows, n,
                                  k, begin, end);
        });
      },
      py::call_guard<py::gil_scoped_release>());
  m.def("cpu_has_avx512_vnni", &specdec::cpu_has_avx512_vnni);
  m.attr("rows_per_pass") = specdec::kRowsPerPass;

  m.def("num_threads", &specdec::num_threads);
  m.def("set_num_threads", &specdec::set_num_threads, py::call_guard<py::gil_scoped_release>());
}
