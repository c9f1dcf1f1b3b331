// SPDX-License-Identifier: Apache-2.0
// Host stand-in for the tt-metal compute API used by softmax_numerator.cpp (emulator only; see
// ../dataflow/dataflow_api.h).  One thread plays unpack, math and pack.  Dest registers hold fp32;
// copy_tile converts from the CB's format; the SFPU ops are fp32 IEEE; exp is exp() rounded to fp32.
// It enforces the API's order rules the kernel relies on: registers acquired before use and
// committed/waited before packing, an op's *_init before the op, copy_init and the source-register
// format set for the CB being copied, the packer configured for the CB being packed.
#pragma once

#include <cmath>
#include <cstring>

#include "api/dataflow/dataflow_api.h"

namespace emu_c {
enum class Op { None, Sub, Mul, Exp };
struct State {
    float dst[8][1024];
    int regs = 0;  // 0 released, 1 acquired, 2 committed, 3 waited
    int copy_cb = -1, srca_cb = -1, pack_cb = -1;
    Op op = Op::None;
};
inline State& st() {
    thread_local State s;
    return s;
}
inline float f32(uint32_t b) {
    float f;
    std::memcpy(&f, &b, 4);
    return f;
}
}  // namespace emu_c

inline void compute_kernel_hw_startup(uint32_t icb, uint32_t ocb) {
    emu_c::st().srca_cb = int(icb);
    emu_c::st().copy_cb = -1;
    emu_c::st().pack_cb = int(ocb);
}
inline void tile_regs_acquire() {
    if (emu_c::st().regs != 0) emu::fail("tile_regs_acquire twice");
    emu_c::st().regs = 1;
}
inline void tile_regs_commit() {
    if (emu_c::st().regs != 1) emu::fail("tile_regs_commit without acquire");
    emu_c::st().regs = 2;
}
inline void tile_regs_wait() {
    if (emu_c::st().regs != 2) emu::fail("tile_regs_wait without commit");
    emu_c::st().regs = 3;
}
inline void tile_regs_release() {
    if (emu_c::st().regs != 3) emu::fail("tile_regs_release without wait");
    emu_c::st().regs = 0;
}
inline void reconfig_data_format_srca(uint32_t cb) { emu_c::st().srca_cb = int(cb); }
inline void reconfig_data_format_srca(uint32_t old_cb, uint32_t cb) {
    if (emu_c::st().srca_cb != int(old_cb)) emu::fail("reconfig_data_format_srca: old CB is not the configured one", old_cb);
    emu_c::st().srca_cb = int(cb);
}
inline void pack_reconfig_data_format(uint32_t cb) { emu_c::st().pack_cb = int(cb); }
inline void copy_init(uint32_t cb) {
    emu_c::st().copy_cb = int(cb);
    emu_c::st().op = emu_c::Op::None;  // reprograms the unpacker/math: SFPU ops need their init again
}
inline void copy_tile(uint32_t cb, uint32_t tile, uint32_t d) {
    auto& s = emu_c::st();
    if (s.regs != 1) emu::fail("copy_tile outside acquire/commit", cb);
    if (s.copy_cb != int(cb)) emu::fail("copy_tile without copy_init for this CB", cb);
    if (s.srca_cb != int(cb)) emu::fail("copy_tile: source format not configured for this CB", cb);
    if (d >= 4) emu::fail("dest index beyond the 4 fp32 tiles of half-sync dest", d);
    const emu::CB& c = emu::cur->cb[cb];
    const uint8_t* p = reinterpret_cast<const uint8_t*>(uintptr_t(get_read_ptr(cb))) + tile * c.page;
    for (int i = 0; i < 1024; ++i) {
        s.dst[d][i] = c.fmt == 1 ? emu_c::f32(uint32_t(reinterpret_cast<const uint16_t*>(p)[i]) << 16)
                                 : emu_c::f32(reinterpret_cast<const uint32_t*>(p)[i]);
    }
}
inline void sub_binary_tile_init() { emu_c::st().op = emu_c::Op::Sub; }
inline void mul_binary_tile_init() { emu_c::st().op = emu_c::Op::Mul; }
template <bool approx = false>
inline void exp_tile_init() {
    emu_c::st().op = emu_c::Op::Exp;
}
inline void sub_binary_tile(uint32_t a, uint32_t b, uint32_t o) {
    auto& s = emu_c::st();
    if (s.regs != 1 || s.op != emu_c::Op::Sub) emu::fail("sub_binary_tile without acquire or sub_binary_tile_init");
    for (int i = 0; i < 1024; ++i) s.dst[o][i] = s.dst[a][i] - s.dst[b][i];
}
inline void mul_binary_tile(uint32_t a, uint32_t b, uint32_t o) {
    auto& s = emu_c::st();
    if (s.regs != 1 || s.op != emu_c::Op::Mul) emu::fail("mul_binary_tile without acquire or mul_binary_tile_init");
    for (int i = 0; i < 1024; ++i) s.dst[o][i] = s.dst[a][i] * s.dst[b][i];
}
template <bool approx = false>
inline void exp_tile(uint32_t d) {
    auto& s = emu_c::st();
    if (s.regs != 1 || s.op != emu_c::Op::Exp) emu::fail("exp_tile without acquire or exp_tile_init");
    if (approx) emu::fail("the model assumes the accurate exp");
    for (int i = 0; i < 1024; ++i) s.dst[d][i] = float(std::exp(double(s.dst[d][i])));
}
inline void pack_tile(uint32_t d, uint32_t cb) {
    auto& s = emu_c::st();
    if (s.regs != 3) emu::fail("pack_tile outside wait/release", cb);
    if (s.pack_cb != int(cb)) emu::fail("pack_tile: packer not configured for this CB", cb);
    const emu::CB& c = emu::cur->cb[cb];
    if (c.fmt != 0) emu::fail("pack_tile: the emulator packs fp32 CBs only", cb);
    std::memcpy(reinterpret_cast<void*>(uintptr_t(get_write_ptr(cb))), s.dst[d], 4096);
}
