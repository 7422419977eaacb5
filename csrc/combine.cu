// Kernel 2: weights on the device and the combined slice d = wᵀ A = Σ_r w_{ℓ(r)} M[ℓ(r),r] S[r],
// written in the bucket dtype, in one launch and one pass over S (docs/design.md §3, steps 5–6).
//
// solve_combine: one block per item of the table (common.cuh). Warp 0 of every block computes the
//   weights of its item's segment from the all-reduced Gramian (every block of a segment the same
//   bits: same code, same input, fixed-order reductions); the first block of each segment writes
//   them to `weights`. Then every thread streams its columns: d = Σ_r v_r S[r, col] (fp32) with
//   v_r = w_{ℓ(r)} M[ℓ(r), r]. Gap items (segment -1) write zeros, like combine_segments' padding.
//   mode 0: weights given in `weights` [S, L] (any weighting, solved by torch on the device);
//   mode 1: mean, w = 1/L; mode 2: MGDA(iterations, normalization) (mgda.cuh).
//   An averaging matrix with a column that is not exactly one nonzero makes the output NaN.
//
// Dynamic shared memory, in bytes: 4·L + 12·R.
#include "common.cuh"
#include "mgda.cuh"

constexpr int kGivenWeights = 0;
constexpr int kMeanWeights = 1;
constexpr int kMgdaWeights = 2;

extern "C" __global__ void __launch_bounds__(kBlock)
    solve_combine(const storage_t* __restrict__ shards, int ranks, long long columns,
                  const float* __restrict__ averaging, const int* __restrict__ table,
                  int segments, const float* __restrict__ gramians, float* __restrict__ weights,
                  int mode, int iterations, int l2_normalise, storage_t* __restrict__ update) {
    BMOO_SHARED_BYTES(shared);
    float* objective_weight = reinterpret_cast<float*>(shared);  // [L]
    float* rank_weight = objective_weight + kObjectives;         // [R]: v_r
    int* group = reinterpret_cast<int*>(rank_weight + ranks);    // [R]
    float* coef = reinterpret_cast<float*>(group + ranks);       // [R]

    const int tid = threadIdx.x;
    const Item item = read_item(table, segments, blockIdx.x);
    if (item.segment < 0) {  // block-uniform
        for (long long column = item.lo + tid; column < item.hi; column += kBlock) {
            update[column] = from_float(0.f);
        }
        return;
    }

    const bool bad = read_rank_groups(averaging, ranks, group, coef);
    if (tid < 32) {
        float w;
        if (mode == kMgdaWeights) {
            const float* gramian = gramians + static_cast<long long>(item.segment) * kObjectives *
                                                  kObjectives;
            w = static_cast<float>(mgda_weight(gramian, iterations, l2_normalise != 0));
        } else if (mode == kMeanWeights) {
            w = static_cast<float>(1.0 / kObjectives);
        } else {
            w = tid < kObjectives ? weights[item.segment * kObjectives + tid] : 0.f;
        }
        if (tid < kObjectives) {
            if (bad) w = nan_float();
            objective_weight[tid] = w;
            if (mode != kGivenWeights && static_cast<int>(blockIdx.x) == table[item.segment]) {
                weights[item.segment * kObjectives + tid] = w;
            }
        }
    }
    __syncthreads();
    for (int rank = tid; rank < ranks; rank += kBlock) {
        const int objective = group[rank];
        rank_weight[rank] = objective >= 0 ? objective_weight[objective] * coef[rank] : nan_float();
    }
    __syncthreads();

    for (long long base = item.lo; base < item.hi; base += kTile) {
        float d[kColumns];
#pragma unroll
        for (int u = 0; u < kColumns; ++u) d[u] = 0.f;
#pragma unroll 8
        for (int rank = 0; rank < ranks; ++rank) {
            const storage_t* row = shards + static_cast<long long>(rank) * columns;
            const float v = rank_weight[rank];
#pragma unroll
            for (int u = 0; u < kColumns; ++u) {
                const long long column = base + u * kBlock + tid;
                const float x = column < item.hi ? to_float(row[column]) : 0.f;
                d[u] = fmaf(v, x, d[u]);
            }
        }
#pragma unroll
        for (int u = 0; u < kColumns; ++u) {
            const long long column = base + u * kBlock + tid;
            if (column < item.hi) update[column] = from_float(d[u]);
        }
    }
}
