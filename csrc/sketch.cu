// The sketch protocol's fold (bucketmoo_hooks/_sketch.py): (Φg)_j = Σ_b ρ_b σ_{bp+j} g_{bp+j}, in one
// pass over the gradient, with no atomics (bitwise reproducible on a given GPU).
//
// sketch_fold: the problem's rows of `width` (p) columns are split into chunks of
//   `rows_per_chunk` rows; block (chunk, tile) has thread t own column j = tile·kBlock + t and sum
//   ρ_b σ_i g_i over the chunk's rows b in order (i = b·p + j < numel), in fp32, into
//   partial[chunk, j]. A warp reads consecutive elements of one row: coalesced. The caller sums
//   the chunks (a fixed-order reduction). Compiled with BMOO_OBJECTIVES 1 (unused here).
#include "common.cuh"

extern "C" __global__ void __launch_bounds__(kBlock)
    sketch_fold(const storage_t* __restrict__ gradient, const float* __restrict__ element_signs,
                const float* __restrict__ row_signs, long long numel, int width,
                int rows_per_chunk, int tiles, float* __restrict__ partial) {
    const int block = static_cast<int>(blockIdx.x);
    const int chunk = block / tiles;
    const int column = (block % tiles) * kBlock + static_cast<int>(threadIdx.x);
    if (column >= width) return;
    const long long first = static_cast<long long>(chunk) * rows_per_chunk;
    float sum = 0.f;
    for (long long row = first; row < first + rows_per_chunk; ++row) {
        const long long index = row * width + column;
        if (index >= numel) break;
        sum += row_signs[row] * (element_signs[index] * to_float(gradient[index]));
    }
    partial[static_cast<long long>(chunk) * width + column] = sum;
}
