// Kernel 1: partial Gramians P[s] = A[:, s] A[:, s]ᵀ of the objective slices A = M S, in one pass
// over the received block S ∈ [R, c], for every segment s of the slice
// (docs/design.md §3, steps 2–3).
//
// gramian_partials: one block per segment item (a run of at most `chunk` columns of one segment).
//   Each thread owns kColumns columns per tile of kTile columns. For each column it sums the rows
//   of S group by group (ranks sorted by objective, in rank order within a group: a fixed order)
//   into a_ℓ = Σ_{r∈ℓ} M[ℓ,r] S[r,col] (fp32, as torch's fp32 matmul), and adds a_ℓ a_k to its
//   fp32 register triangle. The block then sums the triangles in float64 with a fixed tree and
//   writes one partial per item: partials[q][item], q = ℓ(ℓ+1)/2 + k.
// gramian_reduce: one block per segment; sums the segment's partials in a fixed order (float64)
//   and writes the symmetric fp32 Gramian [S, L, L]. No atomics: the result is bitwise
//   reproducible.
//
// Dynamic shared memory of gramian_partials, in bytes: 4·L·kTile + 20·R.
#include "common.cuh"

constexpr int kPairs = kObjectives * (kObjectives + 1) / 2;  // entries of the Gramian's triangle
constexpr int kWarps = kBlock / 32;

// The block-level reduction scratch aliases the objective tile.
static_assert(kWarps * kPairs * 8 <= kObjectives * kTile * 4, "reduction scratch too large");

// Ranks sorted by objective (stable), by warp 0: plan_row[i] is the i-th rank, plan_coef[i] its
// coefficient, plan_flush[i] its objective if it is the last rank of that objective, else -1.
// A counting sort over chunks of 32 ranks (__match_any_sync groups a chunk's lanes by objective);
// `next` and `end` ([L] each) are scratch.
__device__ __forceinline__ void sort_rank_plan(int ranks, const int* group, const float* coef,
                                               int* plan_row, float* plan_coef, int* plan_flush,
                                               int* next, int* end) {
    if (threadIdx.x >= 32) return;
    const int lane = static_cast<int>(lane_id());
    const unsigned below = (1u << lane) - 1u;
    if (lane < kObjectives) next[lane] = 0;
    __syncwarp();
    for (int base = 0; base < ranks; base += 32) {
        const int objective = base + lane < ranks ? group[base + lane] : -1;
        const unsigned peers = __match_any_sync(kFullMask, objective);
        if (objective >= 0 && (peers & below) == 0) next[objective] += __popc(peers);
        __syncwarp();
    }
    if (lane == 0) {  // counts → first position of each objective, and one past its last
        int total = 0;
        for (int l = 0; l < kObjectives; ++l) {
            const int count = next[l];
            next[l] = total;
            total += count;
            end[l] = total;
        }
    }
    __syncwarp();
    for (int base = 0; base < ranks; base += 32) {
        const int rank = base + lane;
        const int objective = rank < ranks ? group[rank] : -1;
        const unsigned peers = __match_any_sync(kFullMask, objective);
        if (objective >= 0) {
            const int position = next[objective] + __popc(peers & below);
            plan_row[position] = rank;
            plan_coef[position] = coef[rank];
            plan_flush[position] = position == end[objective] - 1 ? objective : -1;
        }
        __syncwarp();
        if (objective >= 0 && (peers & below) == 0) next[objective] += __popc(peers);
        __syncwarp();
    }
}

extern "C" __global__ void __launch_bounds__(kBlock)
    gramian_partials(const storage_t* __restrict__ shards, int ranks, long long columns,
                     const float* __restrict__ averaging, const int* __restrict__ table,
                     int segments, int items, double* __restrict__ partials) {
    BMOO_SHARED_BYTES(shared);
    float* tile = reinterpret_cast<float*>(shared);  // [L][kTile]: a_ℓ of the thread's columns
    int* plan_row = reinterpret_cast<int*>(tile + kObjectives * kTile);
    float* plan_coef = reinterpret_cast<float*>(plan_row + ranks);
    int* plan_flush = reinterpret_cast<int*>(plan_coef + ranks);
    int* group = plan_flush + ranks;
    float* coef = reinterpret_cast<float*>(group + ranks);

    const int tid = threadIdx.x;
    const bool bad = read_rank_groups(averaging, ranks, group, coef);
    int* scratch_next = reinterpret_cast<int*>(tile);  // the tile is free until the plan is built
    sort_rank_plan(ranks, group, coef, plan_row, plan_coef, plan_flush, scratch_next,
                   scratch_next + kObjectives);
    __syncthreads();
    // Each thread zeroes exactly the tile entries of its own columns (i ≡ tid mod kBlock), which
    // only it reads: an objective with no rank keeps a_ℓ = 0, as its row is never flushed.
    for (int i = tid; i < kObjectives * kTile; i += kBlock) tile[i] = 0.f;

    const Item item = read_item(table, segments, blockIdx.x);
    const long long end = bad ? item.lo : item.hi;  // a bad M leaves the plan incomplete
    float acc[kPairs];
#pragma unroll
    for (int q = 0; q < kPairs; ++q) acc[q] = 0.f;

    for (long long base = item.lo; base < end; base += kTile) {
        float run[kColumns];
#pragma unroll
        for (int u = 0; u < kColumns; ++u) run[u] = 0.f;
#pragma unroll 8
        for (int i = 0; i < ranks; ++i) {
            const storage_t* row = shards + static_cast<long long>(plan_row[i]) * columns;
            const float coefficient = plan_coef[i];
#pragma unroll
            for (int u = 0; u < kColumns; ++u) {
                const long long column = base + u * kBlock + tid;
                const float x = column < end ? to_float(row[column]) : 0.f;
                run[u] = fmaf(coefficient, x, run[u]);
            }
            const int flush = plan_flush[i];
            if (flush >= 0) {
#pragma unroll
                for (int u = 0; u < kColumns; ++u) {
                    tile[flush * kTile + u * kBlock + tid] = run[u];
                    run[u] = 0.f;
                }
            }
        }
        // Each thread reads back only its own columns: no barrier needed.
#pragma unroll
        for (int u = 0; u < kColumns; ++u) {
            float a[kObjectives];
#pragma unroll
            for (int l = 0; l < kObjectives; ++l) a[l] = tile[l * kTile + u * kBlock + tid];
#pragma unroll
            for (int l = 0, q = 0; l < kObjectives; ++l) {
#pragma unroll
                for (int k = 0; k <= l; ++k, ++q) acc[q] = fmaf(a[l], a[k], acc[q]);
            }
        }
    }

    __syncthreads();  // the scratch below overwrites the tile
    double* scratch = reinterpret_cast<double*>(shared);  // [kWarps][kPairs]
    const int warp = tid >> 5;
#pragma unroll
    for (int q = 0; q < kPairs; ++q) {
        const double sum = warp_sum(static_cast<double>(acc[q]));
        if (lane_id() == 0) scratch[warp * kPairs + q] = sum;
    }
    __syncthreads();
    for (int q = tid; q < kPairs; q += kBlock) {
        double sum = 0.0;
        for (int w = 0; w < kWarps; ++w) sum += scratch[w * kPairs + q];
        partials[static_cast<long long>(q) * items + blockIdx.x] = bad ? nan_float() : sum;
    }
}

extern "C" __global__ void __launch_bounds__(kBlock)
    gramian_reduce(const double* __restrict__ partials, int items, const int* __restrict__ table,
                   int segments, float* __restrict__ gramians) {
    const int segment = blockIdx.x;
    const int first = table[segment];
    const int last = table[segment + 1];
    const int warp = threadIdx.x >> 5;
    float* out = gramians + static_cast<long long>(segment) * kObjectives * kObjectives;
    for (int q = warp; q < kPairs; q += kWarps) {
        double sum = 0.0;
        for (int i = first + static_cast<int>(lane_id()); i < last; i += 32) {
            sum += partials[static_cast<long long>(q) * items + i];
        }
        sum = warp_sum(sum);
        if (lane_id() == 0) {
            int l = 0;
            while ((l + 1) * (l + 2) / 2 <= q) ++l;
            const int k = q - l * (l + 1) / 2;
            const float value = static_cast<float>(sum);
            out[l * kObjectives + k] = value;
            out[k * kObjectives + l] = value;
        }
    }
}
