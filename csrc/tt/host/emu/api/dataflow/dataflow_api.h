// SPDX-License-Identifier: Apache-2.0
// Host stand-in for tt-metal's dataflow API, used only by csrc/tt/host/emulator.cpp to run the real
// reader.cpp / writer.cpp on the host: one thread per RISC-V, L1 per core in the low 4 GiB (so 32-bit
// L1 addresses are host pointers), circular buffers as page rings that refuse non-contiguous
// reserve/wait (the kernels read waited pages as one array), NOC writes as copies between cores,
// semaphores as atomics.  It checks the kernels' logic and protocol, not the hardware.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include <atomic>
#include <vector>

#define tt_l1_ptr
#define FORCE_INLINE inline __attribute__((always_inline))

#ifndef KERNEL_COMPILE_TIME_ARGS
#error "KERNEL_COMPILE_TIME_ARGS must be defined"
#endif
namespace emu_ct {
constexpr uint32_t args[] = {KERNEL_COMPILE_TIME_ARGS};
}
#define get_compile_time_arg_val(i) (emu_ct::args[(i)])

namespace emu {
struct CB {
    uint32_t base = 0, page = 0, pages = 0;
    uint32_t fmt = 0;  // 0 fp32, 1 bf16, 2 uint32
    std::atomic<uint32_t> pushed{0}, popped{0};
};
struct Core {
    uint32_t index = 0;
    uint8_t* l1 = nullptr;  // L1 block of this core (in the low 4 GiB)
    CB cb[32];
    std::vector<uint32_t> rt_reader, rt_writer, rt_compute;
};
extern thread_local Core* cur;
extern thread_local const std::vector<uint32_t>* cur_args;
[[noreturn]] void fail(const char* what, uint32_t a = 0, uint32_t b = 0);
void wait_until(const std::atomic<uint32_t>& v, uint32_t at_least, const char* what);
uint8_t* l1_of(uint32_t core_index);
uint32_t core_of_noc(uint32_t x, uint32_t y);
uint8_t* tensor_ptr(uint32_t token);
constexpr uint32_t SEM_BASE = 64;  // semaphores at the bottom of each core's L1 block
}  // namespace emu

template <typename T>
inline T get_arg_val(int i) {
    if (i < 0 || size_t(i) >= emu::cur_args->size()) {
        emu::fail("runtime arg out of range", uint32_t(i), uint32_t(emu::cur_args->size()));
    }
    return static_cast<T>((*emu::cur_args)[i]);
}

inline uint32_t get_semaphore(uint32_t id) { return uint32_t(uintptr_t(emu::cur->l1 + emu::SEM_BASE + 16 * id)); }

// ---- circular buffers --------------------------------------------------------------------------
inline void cb_reserve_back(int32_t cb, int32_t n) {
    emu::CB& c = emu::cur->cb[cb];
    if (!c.pages) emu::fail("reserve on an absent CB", cb);
    if (uint32_t(n) > c.pages) emu::fail("reserve larger than the CB", cb, n);
    const uint32_t pushed = c.pushed.load();
    while (pushed - c.popped.load() + uint32_t(n) > c.pages) {
        emu::wait_until(c.popped, c.popped.load() + 1, "cb_reserve_back");
    }
    if (pushed % c.pages + uint32_t(n) > c.pages) emu::fail("cb_reserve_back would wrap (pages not contiguous)", cb, n);
}
inline void cb_push_back(int32_t cb, int32_t n) { emu::cur->cb[cb].pushed.fetch_add(uint32_t(n)); }
inline void cb_wait_front(int32_t cb, int32_t n) {
    emu::CB& c = emu::cur->cb[cb];
    if (!c.pages) emu::fail("wait on an absent CB", cb);
    emu::wait_until(c.pushed, c.popped.load() + uint32_t(n), "cb_wait_front");
    if (c.popped.load() % c.pages + uint32_t(n) > c.pages) emu::fail("cb_wait_front wraps (pages not contiguous)", cb, n);
}
inline void cb_pop_front(int32_t cb, int32_t n) { emu::cur->cb[cb].popped.fetch_add(uint32_t(n)); }
inline uint32_t get_write_ptr(uint32_t cb) {
    const emu::CB& c = emu::cur->cb[cb];
    if (!c.pages) emu::fail("get_write_ptr on an absent CB", cb);
    return uint32_t(uintptr_t(emu::cur->l1 + c.base + (c.pushed.load() % c.pages) * c.page));
}
inline uint32_t get_read_ptr(uint32_t cb) {
    const emu::CB& c = emu::cur->cb[cb];
    if (!c.pages) emu::fail("get_read_ptr on an absent CB", cb);
    return uint32_t(uintptr_t(emu::cur->l1 + c.base + (c.popped.load() % c.pages) * c.page));
}

// ---- tensors (interleaved DRAM: compile-time args [IsDram = 2, aligned page size]) ------------
// In an anonymous namespace: each kernel translation unit has its own compile-time args.
namespace {
template <uint32_t CTA_OFFSET>
struct TensorAccessorArgs {
    static_assert(get_compile_time_arg_val(CTA_OFFSET) == 2, "emulator: interleaved DRAM tensors only");
    static constexpr uint32_t next_compile_time_args_offset() { return CTA_OFFSET + 2; }
};
struct TensorAccessor {
    uint8_t* base;
    uint32_t page;
    template <uint32_t O>
    TensorAccessor(const TensorAccessorArgs<O>&, uint32_t addr, uint32_t page_size)
        : base(emu::tensor_ptr(addr)), page(page_size) {
        if (page_size != get_compile_time_arg_val(O + 1)) emu::fail("page size differs from the accessor's", page_size);
    }
};
inline void noc_async_read_page(uint32_t id, const TensorAccessor& s, uint32_t l1) {
    __builtin_memcpy(reinterpret_cast<void*>(uintptr_t(l1)), s.base + size_t(id) * s.page, s.page);
}
inline void noc_async_read_tile(uint32_t id, const TensorAccessor& s, uint32_t l1) { noc_async_read_page(id, s, l1); }
inline void noc_async_write_page(uint32_t id, const TensorAccessor& s, uint32_t l1) {
    __builtin_memcpy(s.base + size_t(id) * s.page, reinterpret_cast<const void*>(uintptr_t(l1)), s.page);
}
}  // namespace

// ---- core-to-core ------------------------------------------------------------------------------
// A NOC address: (destination core << 32) | offset inside its L1 block (same layout on every core).
inline uint64_t get_noc_addr(uint32_t x, uint32_t y, uint32_t addr) {
    const uint32_t off = addr - uint32_t(uintptr_t(emu::cur->l1));
    return (uint64_t(emu::core_of_noc(x, y)) << 32) | off;
}
inline void noc_async_write(uint32_t src, uint64_t dst, uint32_t bytes) {
    __builtin_memcpy(emu::l1_of(uint32_t(dst >> 32)) + uint32_t(dst), reinterpret_cast<const void*>(uintptr_t(src)),
                     bytes);
    std::atomic_thread_fence(std::memory_order_seq_cst);
}
inline void noc_semaphore_inc(uint64_t addr, uint32_t v) {
    auto* p = reinterpret_cast<std::atomic<uint32_t>*>(emu::l1_of(uint32_t(addr >> 32)) + uint32_t(addr));
    p->fetch_add(v);
}
inline void noc_semaphore_wait_min(volatile uint32_t* sem, uint32_t v) {
    emu::wait_until(*reinterpret_cast<std::atomic<uint32_t>*>(const_cast<uint32_t*>(sem)), v, "noc_semaphore_wait_min");
}
inline void noc_async_read_barrier() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void noc_async_write_barrier() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void noc_async_atomic_barrier() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void invalidate_l1_cache() { std::atomic_thread_fence(std::memory_order_seq_cst); }
