// SPDX-License-Identifier: Apache-2.0
// Runs the device program's real kernels on the host: reader.cpp, writer.cpp and softmax_numerator.cpp,
// one thread per kernel per core, against the stand-in APIs in csrc/tt/host/emu (see there).  Driven by a
// config written by tests/tt/test_emulator.py from python/specdec/tt/program.py's plan: cores, circular
// buffers per core (allocated in the plan's order), runtime args per kernel and core, tensor files.
//
// Build (the test does this): the three kernels are compiled as separate units with their compile-time
// args, kernel_main renamed to emu_reader_main / emu_writer_main / emu_compute_main, linked with this file.
#include <sys/mman.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "api/dataflow/dataflow_api.h"
#include "../kernels/specdec_tt_algo.hpp"

void emu_reader_main();
void emu_writer_main();
void emu_compute_main();  // softmax_numerator.cpp against emu/api/compute

namespace emu {
thread_local Core* cur = nullptr;
thread_local const std::vector<uint32_t>* cur_args = nullptr;
thread_local const char* cur_role = "main";
static std::vector<Core*> g_cores;
static std::map<std::pair<uint32_t, uint32_t>, uint32_t> g_noc;
static std::map<uint32_t, uint8_t*> g_tensors;
static double g_timeout_s = 60.0;

void fail(const char* what, uint32_t a, uint32_t b) {
    fprintf(stderr, "EMULATOR FAILURE on core %u (%s): %s [%u, %u]\n", cur ? cur->index : 9999u, cur_role, what, a, b);
    fflush(stderr);
    _exit(3);
}
void wait_until(const std::atomic<uint32_t>& v, uint32_t at_least, const char* what) {
    const auto t0 = std::chrono::steady_clock::now();
    while (v.load() < at_least) {
        std::this_thread::yield();
        if (std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() > g_timeout_s) {
            fail("deadlock: waited too long in", v.load(), at_least), (void)what;
        }
    }
}
uint8_t* l1_of(uint32_t core) {
    if (core >= g_cores.size()) fail("NOC write to an unknown core", core);
    return g_cores[core]->l1;
}
uint32_t core_of_noc(uint32_t x, uint32_t y) {
    auto it = g_noc.find({x, y});
    if (it == g_noc.end()) fail("NOC coordinate of no core", x, y);
    return it->second;
}
uint8_t* tensor_ptr(uint32_t token) {
    auto it = g_tensors.find(token);
    if (it == g_tensors.end()) fail("unknown tensor address", token);
    return it->second;
}
static uint8_t* low_alloc(size_t bytes) {
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_32BIT, -1, 0);
    if (p == MAP_FAILED) {
        perror("mmap MAP_32BIT");
        exit(2);
    }
    return static_cast<uint8_t*>(p);
}
}  // namespace emu

using namespace specdec_tt;

int main(int argc, char** argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: emulator CONFIG\n");
        return 2;
    }
    std::ifstream cfg(argv[1]);
    std::string line;
    size_t l1_bytes = 1536 * 1024;
    std::map<uint32_t, uint32_t> next_free;  // per core: next CB address (offset)
    std::vector<std::pair<uint32_t, std::string>> outs;
    std::map<uint32_t, size_t> tensor_bytes;
    while (std::getline(cfg, line)) {
        std::istringstream in(line);
        std::string kind;
        in >> kind;
        if (kind == "l1") {
            in >> l1_bytes;
        } else if (kind == "timeout") {
            in >> emu::g_timeout_s;
        } else if (kind == "core") {
            uint32_t idx, nx, ny;
            in >> idx >> nx >> ny;
            if (idx != emu::g_cores.size()) emu::fail("cores must be listed in order", idx);
            auto* c = new emu::Core();
            c->index = idx;
            c->l1 = emu::low_alloc(l1_bytes);
            emu::g_cores.push_back(c);
            emu::g_noc[{nx, ny}] = idx;
            next_free[idx] = 4096;  // semaphores below
        } else if (kind == "cb") {
            uint32_t core, index, page, pages, fmt;
            in >> core >> index >> page >> pages >> fmt;
            emu::CB& cb = emu::g_cores.at(core)->cb[index];
            cb.base = next_free[core];
            cb.page = page;
            cb.pages = pages;
            cb.fmt = fmt;
            next_free[core] += ((page * pages + 31) / 32) * 32;
            if (next_free[core] > l1_bytes) emu::fail("circular buffers exceed L1", core, next_free[core]);
        } else if (kind == "rt") {
            std::string who;
            uint32_t core, n;
            in >> who >> core >> n;
            std::vector<uint32_t> a(n);
            for (auto& v : a) in >> v;
            emu::Core* c = emu::g_cores.at(core);
            (who == "reader" ? c->rt_reader : who == "writer" ? c->rt_writer : c->rt_compute) = a;
        } else if (kind == "tensor" || kind == "out") {
            uint32_t token;
            std::string path;
            size_t nbytes;
            in >> token >> path >> nbytes;
            uint8_t* p = emu::low_alloc(nbytes);
            std::ifstream f(path, std::ios::binary);
            f.read(reinterpret_cast<char*>(p), std::streamsize(nbytes));
            emu::g_tensors[token] = p;
            tensor_bytes[token] = nbytes;
            if (kind == "out") outs.emplace_back(token, path);
        }
    }
    std::vector<std::thread> threads;
    for (emu::Core* c : emu::g_cores) {
        if (!c->rt_reader.empty())
            threads.emplace_back([c] { emu::cur = c; emu::cur_args = &c->rt_reader; emu::cur_role = "reader"; emu_reader_main(); });
        if (!c->rt_compute.empty())
            threads.emplace_back([c] { emu::cur = c; emu::cur_args = &c->rt_compute; emu::cur_role = "compute"; emu_compute_main(); });
        if (!c->rt_writer.empty())
            threads.emplace_back([c] { emu::cur = c; emu::cur_args = &c->rt_writer; emu::cur_role = "writer"; emu_writer_main(); });
    }
    for (auto& t : threads) t.join();
    // every circular buffer must end balanced (all pushed pages consumed)
    for (emu::Core* c : emu::g_cores)
        for (uint32_t i = 0; i < 32; ++i)
            if (c->cb[i].pages && c->cb[i].pushed.load() != c->cb[i].popped.load()) {
                emu::cur = c;
                emu::fail("circular buffer left unbalanced (pushed != popped)", i, c->cb[i].pushed.load() - c->cb[i].popped.load());
            }
    for (auto& [token, path] : outs) {
        std::ofstream f(path, std::ios::binary);
        f.write(reinterpret_cast<const char*>(emu::g_tensors[token]), std::streamsize(tensor_bytes[token]));
    }
    return 0;
}
