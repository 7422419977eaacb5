// MGDA's weights on one warp: the same float64 algorithm as bucketmoo_hooks.weightings.MGDA
// (_mgda.py), step for step, so the weights agree to round-off. Lane i < L holds row i of the
// Gramian in registers; lanes ≥ L hold zeros and return 0. All 32 lanes must call.
#pragma once
#include "common.cuh"

constexpr double kRidge = 1e-10;           // _mgda._RIDGE
constexpr double kEnterTolerance = 1e-12;  // _mgda._ENTER_TOLERANCE
constexpr double kNegative = -1e-12;       // _mgda._NEGATIVE
constexpr double kTiny = 2.2250738585072014e-308;  // torch.finfo(torch.float64).tiny

// The lane's own diagonal entry row[lane], without a run-time register index.
__device__ __forceinline__ double diagonal(const double (&row)[kObjectives]) {
    const int lane = static_cast<int>(lane_id());
    double value = 0.0;
#pragma unroll
    for (int j = 0; j < kObjectives; ++j) value = j == lane ? row[j] : value;
    return value;
}

// x with A x = b, A on the lanes (row i on lane i), by Gauss–Jordan elimination without pivoting:
// every system here is symmetric positive definite (a ridged block of the Gramian, the identity
// elsewhere). Entries left of the pivot column are zero in exact arithmetic and never read again.
__device__ __forceinline__ double warp_solve(double (&a)[kObjectives], double b) {
    const int lane = static_cast<int>(lane_id());
#pragma unroll
    for (int k = 0; k < kObjectives; ++k) {
        const double pivot = __shfl_sync(kFullMask, a[k], k);
        const double factor = lane == k ? 0.0 : a[k] / pivot;
#pragma unroll
        for (int j = k + 1; j < kObjectives; ++j) {
            a[j] = fma(-factor, __shfl_sync(kFullMask, a[j], k), a[j]);
        }
        b = fma(-factor, __shfl_sync(kFullMask, b, k), b);
    }
    return lane < kObjectives ? b / diagonal(a) : 0.0;
}

// _mgda._active_set on a trace-normalised g, stopping at the first fixed point: from then on every
// iteration recomputes the same weights bit for bit, so stopping is exact (and costs no host sync
// here, unlike in torch on a GPU).
__device__ __forceinline__ double active_set(const double (&g)[kObjectives], int iterations) {
    const int lane = static_cast<int>(lane_id());
    const bool real = lane < kObjectives;
    unsigned support = (1u << kObjectives) - 1u;
    double weight = real ? 1.0 / kObjectives : 0.0;
    for (int iteration = 0; iteration < iterations; ++iteration) {
        // Min-norm point of the support's affine hull: x = G_SS⁻¹ 1 (identity rows off S).
        const bool in_support = real && ((support >> lane) & 1u);
        double system[kObjectives];
#pragma unroll
        for (int j = 0; j < kObjectives; ++j) {
            const bool both = in_support && ((support >> j) & 1u);
            const double regularised = j == lane ? g[j] + kRidge : g[j];
            system[j] = both ? regularised : (j == lane ? 1.0 : 0.0);
        }
        const double s = in_support ? 1.0 : 0.0;
        const double x = warp_solve(system, s) * s;
        const double candidate = x / warp_sum(x);
        const bool negative = real && candidate < kNegative;
        const bool infeasible = __any_sync(kFullMask, negative);

        // Infeasible: walk towards the candidate until the first weight reaches zero.
        const double ratio = negative ? weight / (weight - candidate) : infinity();
        const double smallest = warp_min(ratio);
        const double step = smallest > 1.0 ? 1.0 : smallest;
        double moved = weight + step * (candidate - weight);
        const bool kept = in_support && ratio > step && moved > 0.0;
        moved = kept ? moved : 0.0;
        moved = moved / warp_sum(moved);

        // Feasible: optimal unless some objective outside S has (Gw)_j < wᵀGw; add the worst.
        const double feasible = candidate < 0.0 ? 0.0 : candidate;
        double gradient = 0.0;
#pragma unroll
        for (int j = 0; j < kObjectives; ++j) {
            gradient = fma(g[j], __shfl_sync(kFullMask, feasible, j), gradient);
        }
        const double value = warp_sum(feasible * gradient);
        const double outside = real && !in_support ? gradient : infinity();
        const ArgMin entering = warp_argmin(outside, lane);
        const bool enters = entering.value < value - kEnterTolerance;

        const unsigned kept_mask = __ballot_sync(kFullMask, kept);
        weight = infeasible ? moved : feasible;
        support = infeasible ? kept_mask : (enters ? support | (1u << entering.index) : support);
        if (!infeasible && !enters) break;
    }
    return weight;
}

// g ← g / max(tr g, floor) (min_norm_weights: floor = tiny), or g / tr g where the trace is
// positive and g itself elsewhere (floor = 0: _solvers.normalise_by_trace).
__device__ __forceinline__ void normalise_by_trace(double (&g)[kObjectives], double floor) {
    const double trace = warp_sum(diagonal(g));
    const double scale = floor > 0.0 ? (trace < floor ? floor : trace) : (trace > 0.0 ? trace : 1.0);
#pragma unroll
    for (int j = 0; j < kObjectives; ++j) g[j] /= scale;
}

// _mgda.min_norm_weights: argmin_{w∈Δ} wᵀGw (L = 1: 1; L = 2: closed form; else active set).
__device__ __forceinline__ double min_norm_weight(double (&g)[kObjectives], int iterations) {
    const int lane = static_cast<int>(lane_id());
    normalise_by_trace(g, kTiny);
    if (kObjectives == 1) return lane == 0 ? 1.0 : 0.0;
    if (kObjectives == 2) {
        const double g00 = __shfl_sync(kFullMask, g[0], 0);
        const double g11 = __shfl_sync(kFullMask, g[kObjectives - 1], 1);
        const double g01 = __shfl_sync(kFullMask, g[kObjectives - 1], 0);
        const double distance = g00 + g11 - 2 * g01;  // ‖ḡ₀ − ḡ₁‖², normalised
        double gamma = (g11 - g01) / (distance < kTiny ? kTiny : distance);
        gamma = gamma < 0.0 ? 0.0 : (gamma > 1.0 ? 1.0 : gamma);
        gamma = distance > 1e-12 ? gamma : 0.5;
        return lane == 0 ? gamma : (lane == 1 ? 1.0 - gamma : 0.0);
    }
    return active_set(g, iterations);
}

// MGDA(iterations, normalization).forward on the fp32 Gramian [L, L] (row-major); lane i returns
// w_i in float64 (the caller rounds to fp32, as forward's .to(gramian.dtype)).
__device__ __forceinline__ double mgda_weight(const float* __restrict__ gramian, int iterations,
                                              bool l2_normalise) {
    const int lane = static_cast<int>(lane_id());
    const bool real = lane < kObjectives;
    double g[kObjectives];
#pragma unroll
    for (int j = 0; j < kObjectives; ++j) {
        g[j] = real ? static_cast<double>(gramian[lane * kObjectives + j]) : 0.0;
    }
    if (!l2_normalise) return min_norm_weight(g, iterations);
    // The min-norm point of the unit gradients, D G D with D = diag(1/√G_ℓℓ), re-expressed on
    // the original gradients with weights summing to one (see MGDA's docstring).
    normalise_by_trace(g, 0.0);
    const double d = diagonal(g);
    const double norm = sqrt(d < 0.0 ? 0.0 : d);
    const double inverse = norm > 0.0 ? 1.0 / norm : 0.0;
#pragma unroll
    for (int j = 0; j < kObjectives; ++j) {
        g[j] = g[j] * inverse * __shfl_sync(kFullMask, inverse, j);
    }
    const double unit = min_norm_weight(g, iterations);
    const double weight = norm > 0.0 ? unit * inverse : unit;
    return weight / warp_sum(weight);
}
