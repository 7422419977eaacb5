// Runs the CUDA kernels of csrc/ on the CPU, for tests on machines without a GPU.
//
// Every thread of a block is a fiber (ucontext) on one OS thread, scheduled round-robin; a fiber
// runs until it reaches a barrier (__syncthreads, or a warp collective: shuffles, votes and
// __syncwarp, which are barriers over the 32 lanes of its warp) and every barrier releases its
// fibers only once all its participants have arrived. Blocks run one after another. What this
// checks: the kernels' arithmetic and indexing, and that every thread reaches the same barriers
// (a divergent barrier deadlocks and is reported). What it cannot: memory-model races, timing.
// Shared memory starts filled with 0xCD (reads before writes show up as garbage) and is followed
// by a canary that must survive each block (overruns are reported). Kernels may use only full-warp
// collectives. C++17 (the NVRTC options are passed through unchanged).
#pragma once

#include <ucontext.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <type_traits>
#include <utility>
#include <vector>

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

namespace emu {

constexpr std::size_t kStack = 64 * 1024;
constexpr std::size_t kCanary = 64;
constexpr unsigned char kCanaryByte = 0xA5;
constexpr unsigned kFull = 0xffffffffu;

struct Fiber {
    ucontext_t context;
    unsigned thread = 0;
    bool done = false;
    int waiting = 0;  // 0 runnable, 1 at the block barrier, 2 at its warp's barrier
    unsigned long generation = 0;
};

struct Block {
    std::vector<Fiber> fibers;
    std::vector<char> stacks;
    ucontext_t scheduler;
    unsigned long block_generation = 0;
    unsigned block_arrived = 0;
    std::vector<unsigned long> warp_generation;
    std::vector<unsigned> warp_arrived;
    std::vector<std::uint64_t> slots;  // one exchange slot per thread
    std::vector<unsigned char> shared;
};

inline Block* block = nullptr;
inline Fiber* current = nullptr;
inline dim3 grid_dim, block_dim, block_index;
inline std::function<void()> body;
inline const char* error = nullptr;

inline void fail(const char* message) {
    if (error == nullptr) error = message;
}

inline dim3 thread_index() { return dim3{current->thread, 0, 0}; }

inline void wait_block() {
    Block& b = *block;
    const unsigned long generation = b.block_generation;
    if (++b.block_arrived == b.fibers.size()) {
        b.block_arrived = 0;
        ++b.block_generation;
        return;
    }
    current->waiting = 1;
    current->generation = generation;
    swapcontext(&current->context, &b.scheduler);
    current->waiting = 0;
}

inline void wait_warp(unsigned mask) {
    if (mask != kFull) fail("a warp collective with a partial mask (the emulator needs full warps)");
    Block& b = *block;
    const unsigned warp = current->thread / 32;
    const unsigned long generation = b.warp_generation[warp];
    if (++b.warp_arrived[warp] == 32) {
        b.warp_arrived[warp] = 0;
        ++b.warp_generation[warp];
        return;
    }
    current->waiting = 2;
    current->generation = generation;
    swapcontext(&current->context, &b.scheduler);
    current->waiting = 0;
}

// Every lane publishes `value`, then reads the value of lane `source(lane)`.
template <class T, class Source>
T exchange(unsigned mask, T value, Source source) {
    static_assert(sizeof(T) <= sizeof(std::uint64_t), "exchange of a wide type");
    Block& b = *block;
    const unsigned warp_base = current->thread & ~31u;
    std::uint64_t bits = 0;
    std::memcpy(&bits, &value, sizeof(T));
    b.slots[current->thread] = bits;
    wait_warp(mask);
    bits = b.slots[warp_base + (source(current->thread & 31u) & 31u)];
    wait_warp(mask);
    T out;
    std::memcpy(&out, &bits, sizeof(T));
    return out;
}

inline unsigned ballot(unsigned mask, int predicate) {
    Block& b = *block;
    const unsigned warp_base = current->thread & ~31u;
    b.slots[current->thread] = predicate != 0;
    wait_warp(mask);
    unsigned out = 0;
    for (unsigned lane = 0; lane < 32; ++lane) out |= (b.slots[warp_base + lane] ? 1u : 0u) << lane;
    wait_warp(mask);
    return out;
}

inline void entry() {
    body();
    current->done = true;
}

inline bool runnable(const Fiber& fiber) {
    if (fiber.done) return false;
    if (fiber.waiting == 1) return block->block_generation != fiber.generation;
    if (fiber.waiting == 2) return block->warp_generation[fiber.thread / 32] != fiber.generation;
    return true;
}

inline void run_block(Block& b) {
    for (;;) {
        bool progressed = false;
        bool finished = true;
        for (Fiber& fiber : b.fibers) {
            if (fiber.done) continue;
            finished = false;
            if (!runnable(fiber)) continue;
            progressed = true;
            current = &fiber;
            swapcontext(&b.scheduler, &fiber.context);
            if (error != nullptr) return;
        }
        if (finished) return;
        if (!progressed) {
            fail("deadlock: the threads of a block wait at different barriers");
            return;
        }
    }
}

template <class... Args, std::size_t... I>
void call(void (*kernel)(Args...), void** params, std::index_sequence<I...>) {
    kernel(*static_cast<std::remove_cv_t<Args>*>(params[I])...);
}

// cuLaunchKernel's convention: params[i] points to the value of argument i.
template <class... Args>
int launch(void (*kernel)(Args...), unsigned grid, unsigned threads, std::size_t shared_bytes,
           void** params) {
    error = nullptr;
    if (threads == 0 || threads % 32 != 0) {
        fail("the block size must be a positive multiple of 32");
        return 1;
    }
    Block b;
    b.fibers = std::vector<Fiber>(threads);
    b.stacks.resize(threads * kStack);
    b.warp_generation.assign(threads / 32, 0);
    b.warp_arrived.assign(threads / 32, 0);
    b.slots.assign(threads, 0);
    block = &b;
    grid_dim = dim3{grid, 1, 1};
    block_dim = dim3{threads, 1, 1};
    body = [&] { call(kernel, params, std::index_sequence_for<Args...>{}); };
    for (unsigned index = 0; index < grid && error == nullptr; ++index) {
        block_index = dim3{index, 0, 0};
        b.shared.assign(shared_bytes, 0xCD);
        b.shared.resize(shared_bytes + kCanary, kCanaryByte);
        b.block_arrived = 0;
        for (unsigned thread = 0; thread < threads; ++thread) {
            Fiber& fiber = b.fibers[thread];
            fiber.thread = thread;
            fiber.done = false;
            fiber.waiting = 0;
            getcontext(&fiber.context);
            fiber.context.uc_stack.ss_sp = b.stacks.data() + thread * kStack;
            fiber.context.uc_stack.ss_size = kStack;
            fiber.context.uc_link = &b.scheduler;
            makecontext(&fiber.context, entry, 0);
        }
        run_block(b);
        for (std::size_t i = shared_bytes; i < b.shared.size(); ++i) {
            if (b.shared[i] != kCanaryByte) fail("a block wrote past its dynamic shared memory");
        }
    }
    block = nullptr;
    current = nullptr;
    return error == nullptr ? 0 : 1;
}

inline float half_to_float(unsigned short bits) {
    _Float16 value;
    std::memcpy(&value, &bits, sizeof(bits));
    return static_cast<float>(value);
}

inline unsigned short float_to_half(float x) {
    const _Float16 value = static_cast<_Float16>(x);  // round to nearest even
    unsigned short bits;
    std::memcpy(&bits, &value, sizeof(bits));
    return bits;
}

inline unsigned short float_to_bfloat16(float x) {  // round to nearest even, as c10::BFloat16
    std::uint32_t bits;
    std::memcpy(&bits, &x, sizeof(bits));
    if (std::isnan(x)) return 0x7fc0;
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return static_cast<unsigned short>(bits >> 16);
}

}  // namespace emu

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define threadIdx (::emu::thread_index())
#define blockIdx (::emu::block_index)
#define blockDim (::emu::block_dim)
#define gridDim (::emu::grid_dim)
#define BMOO_SHARED_BYTES(name) unsigned char* name = ::emu::block->shared.data()

inline void __syncthreads() { emu::wait_block(); }

inline int __syncthreads_or(int predicate) {
    emu::Block& b = *emu::block;
    b.slots[emu::current->thread] = predicate != 0;
    emu::wait_block();
    int any = 0;
    for (std::uint64_t slot : b.slots) any |= slot != 0;
    emu::wait_block();
    return any;
}

inline void __syncwarp(unsigned mask = emu::kFull) { emu::wait_warp(mask); }

template <class T>
T __shfl_sync(unsigned mask, T value, int lane, int width = 32) {
    if (width != 32) emu::fail("__shfl_sync with width != 32");
    return emu::exchange(mask, value, [lane](unsigned) { return static_cast<unsigned>(lane); });
}

template <class T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
    if (width != 32) emu::fail("__shfl_xor_sync with width != 32");
    return emu::exchange(mask, value, [lane_mask](unsigned lane) { return lane ^ lane_mask; });
}

inline unsigned __ballot_sync(unsigned mask, int predicate) { return emu::ballot(mask, predicate); }
inline int __any_sync(unsigned mask, int predicate) { return emu::ballot(mask, predicate) != 0; }

inline unsigned __match_any_sync(unsigned mask, int value) {
    emu::Block& b = *emu::block;
    const unsigned warp_base = emu::current->thread & ~31u;
    b.slots[emu::current->thread] = static_cast<std::uint32_t>(value);
    emu::wait_warp(mask);
    unsigned out = 0;
    for (unsigned lane = 0; lane < 32; ++lane) {
        if (b.slots[warp_base + lane] == static_cast<std::uint32_t>(value)) out |= 1u << lane;
    }
    emu::wait_warp(mask);
    return out;
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }

inline float __int_as_float(int x) {
    float out;
    std::memcpy(&out, &x, sizeof(out));
    return out;
}

inline float __uint_as_float(unsigned x) {
    float out;
    std::memcpy(&out, &x, sizeof(out));
    return out;
}

inline double __longlong_as_double(long long x) {
    double out;
    std::memcpy(&out, &x, sizeof(out));
    return out;
}
