// Instruction-set paths of the small-M kernels. Each path is batch-invariant on its own (1-32 rows give
// bit-identical outputs row for row); different paths need not agree bit for bit.
#pragma once

namespace specdec {

enum class Isa : int {
  kPortable = 0,  // plain C++: any CPU; the reference the vector paths are tested against
  kAvx2 = 1,      // AVX2 + FMA (int8 dot products through vpmaddubsw/vpmaddwd)
  kAvx512 = 2,    // AVX-512 F/BW/VL, with VNNI (vpdpbusd) for the quantised kernels
};

// Whether this CPU can run `isa` (the quantised AVX-512 path needs VNNI as well).
bool cpu_supports(Isa isa);

}  // namespace specdec
