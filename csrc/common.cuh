// Shared by the fused kernels: compile-time configuration, the storage dtype, warp reductions,
// the rank → objective plan read from the averaging matrix, and the work-item table.
//
// Compiled at run time by NVRTC (through CuPy) with the configuration as -D defines, so no
// standard or CUDA header is included. Under -DBMOO_EMULATE the same code is compiled as C++ for
// the CPU by the tests' emulator (tests/cuda_emulator), which provides the CUDA built-ins.
#pragma once

#if !defined(BMOO_OBJECTIVES) || !defined(BMOO_DTYPE) || !defined(BMOO_BLOCK) || \
    !defined(BMOO_COLUMNS)
#error "define BMOO_OBJECTIVES (L), BMOO_DTYPE (0 fp32, 1 bf16, 2 fp16), BMOO_BLOCK, BMOO_COLUMNS"
#endif

constexpr int kObjectives = BMOO_OBJECTIVES;  // L
constexpr int kBlock = BMOO_BLOCK;            // threads per block
constexpr int kColumns = BMOO_COLUMNS;        // columns per thread per tile
[[maybe_unused]] constexpr int kTile = kBlock * kColumns;  // columns per block per tile
constexpr unsigned kFullMask = 0xffffffffu;

// One lane per objective in the warp solver, and the Gramian's triangle in registers.
static_assert(kObjectives >= 1 && kObjectives <= 16, "1 <= BMOO_OBJECTIVES <= 16");
static_assert(kBlock % 32 == 0 && kBlock >= 64, "BMOO_BLOCK: a multiple of 32, at least 64");
static_assert(kColumns >= 1 && kColumns <= 4, "1 <= BMOO_COLUMNS <= 4");

// fp32 buckets are read as float; bf16 and fp16 as their 16-bit patterns.
#if BMOO_DTYPE == 0
typedef float storage_t;
#elif BMOO_DTYPE == 1 || BMOO_DTYPE == 2
typedef unsigned short storage_t;
#else
#error "BMOO_DTYPE must be 0 (fp32), 1 (bf16) or 2 (fp16)"
#endif

__device__ __forceinline__ float to_float(float x) { return x; }

__device__ __forceinline__ float to_float(unsigned short bits) {
#if BMOO_DTYPE == 1
    return __uint_as_float(static_cast<unsigned int>(bits) << 16);  // exact
#elif defined(BMOO_EMULATE)
    return emu::half_to_float(bits);
#else
    float out;
    asm("cvt.f32.f16 %0, %1;" : "=f"(out) : "h"(bits));
    return out;
#endif
}

// Round to nearest even, as torch's .to(dtype).
__device__ __forceinline__ storage_t from_float(float x) {
#if BMOO_DTYPE == 0
    return x;
#elif defined(BMOO_EMULATE)
    return BMOO_DTYPE == 1 ? emu::float_to_bfloat16(x) : emu::float_to_half(x);
#else
    unsigned short out;
#if BMOO_DTYPE == 1
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(out) : "f"(x));
#else
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(out) : "f"(x));
#endif
    return out;
#endif
}

#ifndef BMOO_EMULATE
#define BMOO_SHARED_BYTES(name) extern __shared__ __align__(16) unsigned char name[]
#endif

__device__ __forceinline__ float nan_float() { return __int_as_float(0x7fc00000); }
__device__ __forceinline__ double infinity() { return __longlong_as_double(0x7ff0000000000000LL); }

__device__ __forceinline__ unsigned lane_id() { return threadIdx.x & 31u; }

// Butterfly sum: a + b == b + a exactly, so every lane ends with the same bits.
__device__ __forceinline__ double warp_sum(double value) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        value += __shfl_xor_sync(kFullMask, value, offset);
    }
    return value;
}

__device__ __forceinline__ double warp_min(double value) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        const double other = __shfl_xor_sync(kFullMask, value, offset);
        value = other < value ? other : value;
    }
    return value;
}

// The smallest value and its index, the lowest index among equals (torch.argmin's choice).
struct ArgMin {
    double value;
    int index;
};

__device__ __forceinline__ ArgMin warp_argmin(double value, int index) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        const double other = __shfl_xor_sync(kFullMask, value, offset);
        const int other_index = __shfl_xor_sync(kFullMask, index, offset);
        if (other < value || (other == value && other_index < index)) {
            value = other;
            index = other_index;
        }
    }
    ArgMin out;
    out.value = value;
    out.index = index;
    return out;
}

// Rank r belongs to objective group[r] with coefficient coef[r] = M[group[r], r] (1/m_ℓ for
// ObjectiveMap.averaging_matrix). Each column of M must hold exactly one nonzero; returns
// whether some column does not (block-uniform). Contains a __syncthreads: call from all threads.
__device__ __forceinline__ bool read_rank_groups(const float* __restrict__ averaging, int ranks,
                                                 int* group, float* coef) {
    int bad = 0;
    for (int rank = threadIdx.x; rank < ranks; rank += kBlock) {
        int objective = -1;
        int nonzeros = 0;
        float value = 0.f;
#pragma unroll
        for (int l = 0; l < kObjectives; ++l) {
            const float m = averaging[l * ranks + rank];
            if (m != 0.f) {
                ++nonzeros;
                objective = l;
                value = m;
            }
        }
        bad |= nonzeros != 1;
        group[rank] = objective;
        coef[rank] = value;
    }
    return __syncthreads_or(bad) != 0;
}

// The work-item table built by bucketmoo_hooks._kernels (int32):
//   [0, S]                 first item of each segment (items of segment s: start[s]..start[s+1]-1)
//   [S+1 + 3i, S+1 + 3i+3) item i: (segment, lo, hi) in slice columns; segment -1 marks a gap
//                          (columns outside every segment, written as zeros by the combine).
// Segment items come first, in segment order; every segment has at least one (maybe empty) item.
struct Item {
    int segment;
    long long lo;
    long long hi;
};

__device__ __forceinline__ Item read_item(const int* __restrict__ table, int segments, int item) {
    const int* entry = table + segments + 1 + 3 * item;
    Item out;
    out.segment = entry[0];
    out.lo = entry[1];
    out.hi = entry[2];
    return out;
}
