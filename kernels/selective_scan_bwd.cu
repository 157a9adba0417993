// selective_scan_fn backward (SPEC §1), float32 arithmetic, any strides.
//
// The host prepends common.cuh (Tensor4, ld_any, st_any, ...); this file
// includes nothing and declares its own parameter struct (mirrored by
// src/cuda/scan_bwd.rs). Compiled by NVRTC for the device's exact sm_XY.
//
// ============================================================================
// KERNEL AND LAUNCH CONFIGURATION (the host must follow this exactly)
// ============================================================================
// selective_scan_bwd   (one kernel for every dtype and layout: all tensors
//                       are read with ld_any / written with st_any on their
//                       own dtype codes, f32/f16/bf16/f64)
//   W   = SB_W (8) channels per block, one warp per channel for loads/stores
//   CH  = 32 * SB_IT (256) timesteps per chunk
//   grid  = (ceil(d / W), b, 1)
//   block = (32 * W, 1, 1) = 256 threads
//   dynamic shared memory = 4 * (6*W*CH + W*(CH + CH/32) + 2*W*n + 64*W) bytes
//                           (61 KB for n = 16: cuFuncSetAttribute needed)
//   nchunks = ceil(l / CH). When nchunks > 1, scratch is a float32
//   (b, d, nchunks, n) buffer the kernel writes and reads (the states at
//   chunk starts); otherwise scratch.ptr may be 0.
//   The host zero-fills dA, dB, dC, dD, ddelta_bias before the launch: the
//   kernel adds into them with atomics (float32 outputs). du, ddelta, dz,
//   dinitial_state are written in full.
//   Limits: 1 <= n <= 256, b <= 65535.
//
// ============================================================================
// DESIGN
// ============================================================================
// Time-parallel within a warp: for one (channel c, state k) a warp covers a
// chunk of CH timesteps, lane j owning the SB_IT consecutive steps
// j*SB_IT .. j*SB_IT + SB_IT-1. Both recurrences are linear, so each is a
// scan of affine maps x -> a x + b composed over the lanes with 5 shuffle
// steps:
//   forward   h_t = a_t h_{t-1} + Δ_t B_t[k] u_t,            a_t = exp(Δ_t A[c,k])
//   adjoint   g_t = a_{t+1} g_{t+1} + C_t[k] dy_t,           g_l = dlast_state
// (g_t = dL/dh_t). From h_{t-1}, h_t and g_t every gradient follows:
//   dC_t[k] += dy_t h_t            dB_t[k] += g_t Δ_t u_t
//   du_t    += g_t Δ_t B_t[k]      dΔ_t    += g_t (B_t[k] u_t + A a_t h_{t-1})
//   dA[c,k] += g_t Δ_t a_t h_{t-1} y_t      += C_t[k] h_t    (y: for dz)
// Nothing of size (b, d, l, n) exists: h and g live in registers for one k.
//
// Block: W channels of one batch entry, W warps. Chunks are visited in
// reverse, carrying g (as q = a_{t0} g_{t0}, the adjoint entering the
// previous chunk) per (c, k) in shared memory. The state at each chunk start
// comes from a forward pre-pass over the chunks (the same scan, keeping only
// the chunk totals) stored in scratch; chunk 0 starts from initial_state.
// Per chunk:
//   1. warp w loads channel c0+w's row: Δ = softplus(delta + bias), u,
//      dy = dout * silu(z) (or dout) into shared memory as float32;
//   2. warp w takes the states k = w, w+W, ...; for each it visits the W
//      channels in the staggered order (i + w) % W, one per iteration with a
//      barrier between iterations, so that no two warps update the same
//      channel's du / dΔ / y accumulators (shared memory, no atomics) at
//      once. B_t[k], C_t[k] for the warp's k stay in registers while the
//      group does not change, and dB_t[k], dC_t[k] are summed over the
//      block's channels of one group in registers before one coalesced
//      atomic add per element (through a per-warp transpose), W times fewer
//      atomics than one per channel. Constant (d, n) B/C: the sums over t
//      go to dB[c, k] with one atomic per (c, k, chunk), like dA.
//   3. warp w finishes its channel's row: du = acc + dy D, ddelta = acc *
//      softplus', dz, and the per-channel sums dD, ddelta_bias (registers
//      across chunks, one atomic at the end).
// ============================================================================

#ifndef SB_W
#define SB_W 8        // channels (and warps) per block
#endif
#ifndef SB_IT
#define SB_IT 8       // timesteps per lane: 8 or 16
#endif
#ifndef SB_KEEPBC
#define SB_KEEPBC 1   // keep B_t[k], C_t[k] in registers across the channel loop (else reload per channel)
#endif
#ifndef SB_DIAG
#define SB_DIAG 0     // timing diagnostics only (wrong results): 1 no dB/dC flush, 2 no per-iteration barrier, 4 no dA reduction
#endif
#ifndef SB_MINB
#define SB_MINB 2     // blocks per SM the registers are capped for
#endif
#define SB_CH (32 * SB_IT)
#define SB_THREADS (32 * SB_W)
#define SB_NQ (SB_IT / 4)
#define SB_LOG2E 1.4426950408889634f
#define SB_FULL 0xffffffffu

// Mirrored by ScanBwdParams in src/cuda/scan_bwd.rs.
// u, delta, z, dout (b, d, l); A (d, n); B, C as (b, g, n, l) (groups >= 1;
// the (b, n, l) layout is g = 1 with stride[1] = 0) or constant (d, n) when
// groups == 0, with stride = {0, d-stride, n-stride, 0}; D, delta_bias (d,);
// initial_state, dlast (b, d, n). Outputs: du, ddelta, dz like u; dA (d, n);
// dB, dC like B, C (same stride convention, float32); dD, ddelta_bias (d,);
// dinit (b, d, n). Optional tensors have ptr == 0 when absent.
struct ScanBwdParams {
    int b, d, l, n;
    int groups_b, groups_c;
    int softplus;
    int nchunks;
    Tensor4 u, delta, z, dout, A, B, C, D, delta_bias, initial_state, dlast;
    Tensor4 du, ddelta, dz, dA, dB, dC, dD, ddelta_bias, dinit;
    Tensor4 scratch;  // float32 (b, d, nchunks, n)
};

namespace sbwd {

__device__ __forceinline__ float ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + __expf(-x)); }

__device__ __forceinline__ float softplus(float x) { return x > 20.0f ? x : log1pf(__expf(x)); }

// XOR swizzle of the 16-byte quads of a lane's SB_IT floats in a row
// [32 lanes][SB_IT]: conflict-free 16-byte accesses across the warp.
__device__ __forceinline__ int swz(int lane) {
    return SB_NQ == 2 ? ((lane >> 2) & 1) : (SB_NQ == 4 ? ((lane >> 1) & 3) : 0);
}
__device__ __forceinline__ float4* quad(float* row, int lane, int q) {
    return reinterpret_cast<float4*>(row + lane * SB_IT + ((q ^ swz(lane)) << 2));
}

// The lane's SB_IT elements t0 + lane*SB_IT + i of row `base` (stride st) of
// tensor x as float32; `pad` beyond l.
__device__ __forceinline__ void load_items(float (&v)[SB_IT], const Tensor4& x, i64 base, int t,
                                           int l, float pad) {
    const i64 st = x.stride[2];
    switch (x.dtype) {
        case DT_F32: {
            const float* p = (const float*)x.ptr + base;
#pragma unroll
            for (int i = 0; i < SB_IT; i++) v[i] = t + i < l ? p[(i64)(t + i) * st] : pad;
            break;
        }
        case DT_F16: {
            const u16* p = (const u16*)x.ptr + base;
#pragma unroll
            for (int i = 0; i < SB_IT; i++) v[i] = t + i < l ? f16_to_f32(p[(i64)(t + i) * st]) : pad;
            break;
        }
        case DT_BF16: {
            const u16* p = (const u16*)x.ptr + base;
#pragma unroll
            for (int i = 0; i < SB_IT; i++) v[i] = t + i < l ? bf16_to_f32(p[(i64)(t + i) * st]) : pad;
            break;
        }
        default: {
            const double* p = (const double*)x.ptr + base;
#pragma unroll
            for (int i = 0; i < SB_IT; i++) v[i] = t + i < l ? (float)p[(i64)(t + i) * st] : pad;
            break;
        }
    }
}

__device__ __forceinline__ void store_items(const float (&v)[SB_IT], const Tensor4& x, i64 base, int t,
                                            int l) {
    const i64 st = x.stride[2];
#pragma unroll
    for (int i = 0; i < SB_IT; i++)
        if (t + i < l) st_any((void*)x.ptr, x.dtype, base + (i64)(t + i) * st, v[i]);
}

__device__ __forceinline__ i64 row_off(const Tensor4& x, int bi, int c) {
    return (i64)bi * x.stride[0] + (i64)c * x.stride[1];
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(SB_FULL, v, o);
    return v;
}

// B or C for state k of channel c: the lane's items (time-varying) or the
// constant value in every item. Returns the "key" (group, or channel when
// constant) whose values these are.
__device__ __forceinline__ void load_bc(float (&v)[SB_IT], const Tensor4& X, int groups, int d, int bi,
                                        int c, int k, int t, int l) {
    if (groups >= 1) {
        const int grp = c / (d / groups);
        const i64 base = (i64)bi * X.stride[0] + (i64)grp * X.stride[1] + (i64)k * X.stride[2];
        const i64 st = X.stride[3];
        switch (X.dtype) {
            case DT_F32: {
                const float* p = (const float*)X.ptr + base;
#pragma unroll
                for (int i = 0; i < SB_IT; i++) v[i] = t + i < l ? p[(i64)(t + i) * st] : 0.0f;
                break;
            }
            case DT_F16: {
                const u16* p = (const u16*)X.ptr + base;
#pragma unroll
                for (int i = 0; i < SB_IT; i++) v[i] = t + i < l ? f16_to_f32(p[(i64)(t + i) * st]) : 0.0f;
                break;
            }
            case DT_BF16: {
                const u16* p = (const u16*)X.ptr + base;
#pragma unroll
                for (int i = 0; i < SB_IT; i++) v[i] = t + i < l ? bf16_to_f32(p[(i64)(t + i) * st]) : 0.0f;
                break;
            }
            default: {
                const double* p = (const double*)X.ptr + base;
#pragma unroll
                for (int i = 0; i < SB_IT; i++) v[i] = t + i < l ? (float)p[(i64)(t + i) * st] : 0.0f;
                break;
            }
        }
    } else {
        const float s = ld_any(X.ptr, X.dtype, (i64)c * X.stride[1] + (i64)k * X.stride[2]);
#pragma unroll
        for (int i = 0; i < SB_IT; i++) v[i] = s;
    }
}

// Adds the warp's per-item sums acc (then zeroed) into dX: time-varying
// (key = group): element (bi, key, k, t0 + t) for every t of the chunk, via
// a transpose through the warp's exchange buffer xw so each atomic
// instruction covers 32 consecutive timesteps; constant (key = channel):
// the sum over the chunk into dX[key, k].
__device__ __forceinline__ void flush(float (&acc)[SB_IT], float* xw, const Tensor4& dX, bool var, int bi,
                                      int key, int k, int t0, int l, int lane) {
    if (var) {
#pragma unroll
        for (int i = 0; i < SB_IT; i++) {
            const int t = lane * SB_IT + i;
            xw[t + (t >> 5)] = acc[i];
            acc[i] = 0.0f;
        }
        __syncwarp();
        float* base = (float*)dX.ptr + (i64)bi * dX.stride[0] + (i64)key * dX.stride[1] + (i64)k * dX.stride[2];
#pragma unroll
        for (int i = 0; i < SB_IT; i++) {
            const int t = i * 32 + lane;
            const float v = xw[t + i];
            if (t0 + t < l) atomicAdd(base + (i64)(t0 + t) * dX.stride[3], v);
        }
        __syncwarp();
    } else {
        float s = 0.0f;
#pragma unroll
        for (int i = 0; i < SB_IT; i++) {
            s += acc[i];
            acc[i] = 0.0f;
        }
        s = warp_sum(s);
        if (lane == 0) atomicAdd((float*)dX.ptr + (i64)key * dX.stride[1] + (i64)k * dX.stride[2], s);
    }
}

// Inclusive scan over the lanes of the affine maps x -> P x + H (lane order
// = time order); returns the map entering this lane (exclusive) in (Pe, He).
__device__ __forceinline__ void scan_fwd(float& P, float& H, int lane, float& Pe, float& He) {
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const float Pp = __shfl_up_sync(SB_FULL, P, o);
        const float Hp = __shfl_up_sync(SB_FULL, H, o);
        if (lane >= o) {
            H = fmaf(P, Hp, H);
            P *= Pp;
        }
    }
    Pe = __shfl_up_sync(SB_FULL, P, 1);
    He = __shfl_up_sync(SB_FULL, H, 1);
}

struct Block {
    float *sD, *sU, *sY;         // per channel row [32][SB_IT] (swizzled): Δ, u, dy
    float *aDU, *aDD, *aYY;      // accumulators over k: du, dΔ, y (pre-gate, without D u)
    float* xch;                  // per warp [SB_CH + SB_CH/32]
    float *hcar, *qcar;          // [W][n]: state at the chunk start / adjoint entering from the right
    float* part;                 // [W][2][32]: per-lane sums of dD, ddelta_bias over the chunks
};

// Loads channel row c (warp-wide) of chunk t0 into the shared rows:
// Δ, u and (main pass) dy; zeroes the accumulators.
__device__ __forceinline__ void load_tile(const ScanBwdParams& p, const Block& s, int w, int bi, int c,
                                          int t0, int lane, bool main_pass) {
    const int l = p.l;
    const int t = t0 + lane * SB_IT;
    float dl[SB_IT], uu[SB_IT];
    load_items(dl, p.delta, row_off(p.delta, bi, c), t, l, 0.0f);
    load_items(uu, p.u, row_off(p.u, bi, c), t, l, 0.0f);
    const float bias = p.delta_bias.ptr ? ld_any(p.delta_bias.ptr, p.delta_bias.dtype, (i64)c * p.delta_bias.stride[0]) : 0.0f;
#pragma unroll
    for (int i = 0; i < SB_IT; i++) {
        float x = dl[i] + bias;
        if (p.softplus) x = softplus(x);
        dl[i] = t + i < l ? x : 0.0f;  // padding: Δ = 0 (a = 1, nothing added)
    }
    float* rD = s.sD + w * SB_CH;
    float* rU = s.sU + w * SB_CH;
#pragma unroll
    for (int q = 0; q < SB_NQ; q++) {
        *quad(rD, lane, q) = make_float4(dl[4 * q], dl[4 * q + 1], dl[4 * q + 2], dl[4 * q + 3]);
        *quad(rU, lane, q) = make_float4(uu[4 * q], uu[4 * q + 1], uu[4 * q + 2], uu[4 * q + 3]);
    }
    if (!main_pass) return;
    float dy[SB_IT];
    load_items(dy, p.dout, row_off(p.dout, bi, c), t, l, 0.0f);
    if (p.z.ptr) {
        float zz[SB_IT];
        load_items(zz, p.z, row_off(p.z, bi, c), t, l, 0.0f);
#pragma unroll
        for (int i = 0; i < SB_IT; i++) dy[i] *= zz[i] * sigmoid(zz[i]);
    }
    float* rY = s.sY + w * SB_CH;
    const float4 z4 = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll
    for (int q = 0; q < SB_NQ; q++) {
        *quad(rY, lane, q) = make_float4(dy[4 * q], dy[4 * q + 1], dy[4 * q + 2], dy[4 * q + 3]);
        *quad(s.aDU + w * SB_CH, lane, q) = z4;
        *quad(s.aDD + w * SB_CH, lane, q) = z4;
        *quad(s.aYY + w * SB_CH, lane, q) = z4;
    }
}

// A 16-byte shared load the compiler cannot merge with an earlier one (so
// the values need not stay live in registers in between).
__device__ __forceinline__ float4 ld_quad_nc(float* row, int lane, int q) {
    float4 v;
    const unsigned a = (unsigned)__cvta_generic_to_shared(quad(row, lane, q));
    asm volatile("ld.shared.v4.f32 {%0, %1, %2, %3}, [%4];" : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w) : "r"(a));
    return v;
}

__device__ __forceinline__ void ld_row(float (&v)[SB_IT], float* row, int lane) {
#pragma unroll
    for (int q = 0; q < SB_NQ; q++) {
        const float4 f = *quad(row, lane, q);
        v[4 * q] = f.x;
        v[4 * q + 1] = f.y;
        v[4 * q + 2] = f.z;
        v[4 * q + 3] = f.w;
    }
}

// One (channel row cc, state k) of the main pass. Bv, Cv: B_t[k], C_t[k] of
// the lane's items; h0: the state at the chunk start; q: the adjoint entering
// from the right. Adds to the row's accumulators and to dBacc, dCacc; returns
// the adjoint entering from the right for the previous chunk (lane 0) and
// this lane's part of dA.
__device__ __forceinline__ float process(const Block& s, int cc, int lane, float Ak, float A2,
                                         const float (&Bv)[SB_IT], const float (&Cv)[SB_IT], float h0, float q,
                                         float (&dBacc)[SB_IT], float (&dCacc)[SB_IT], bool want_y,
                                         float& dAs) {
    float* rD = s.sD + cc * SB_CH;
    float* rU = s.sU + cc * SB_CH;
    float dl[SB_IT], uu[SB_IT], a[SB_IT], hp[SB_IT];
    ld_row(dl, rD, lane);
    ld_row(uu, rU, lane);
    // forward: this lane's composed map, then the scan over lanes
    float P = 1.0f, H = 0.0f;
#pragma unroll
    for (int i = 0; i < SB_IT; i++) {
        a[i] = ex2(dl[i] * A2);
        hp[i] = dl[i] * uu[i] * Bv[i];
        H = fmaf(a[i], H, hp[i]);
        P *= a[i];
    }
    float Pe, He;
    scan_fwd(P, H, lane, Pe, He);
    float hcur = lane == 0 ? h0 : fmaf(Pe, h0, He);
#pragma unroll
    for (int i = 0; i < SB_IT; i++) {  // hp[i] := h_{t-1} of item i
        const float bx = hp[i];
        hp[i] = hcur;
        hcur = fmaf(a[i], hcur, bx);
    }
    // adjoint: g_i = C_i dy_i + an_i g_{i+1}, an_i = a_{i+1} (next lane's a[0]
    // for the last item; 1 in lane 31, whose g_{i+1} is q)
    float dy[SB_IT];
    ld_row(dy, s.sY + cc * SB_CH, lane);
    float alast = __shfl_down_sync(SB_FULL, a[0], 1);
    if (lane == 31) alast = 1.0f;
    float G = 0.0f, Pr = 1.0f;
#pragma unroll
    for (int i = SB_IT - 1; i >= 0; i--) {
        const float an = i < SB_IT - 1 ? a[i + 1] : alast;
        G = fmaf(an, G, Cv[i] * dy[i]);
        Pr *= an;
    }
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const float Gn = __shfl_down_sync(SB_FULL, G, o);
        const float Pn = __shfl_down_sync(SB_FULL, Pr, o);
        if (lane + o < 32) {
            G = fmaf(Pr, Gn, G);
            Pr *= Pn;
        }
    }
    const float Gs = __shfl_down_sync(SB_FULL, G, 1);
    const float Ps = __shfl_down_sync(SB_FULL, Pr, 1);
    float gn = lane == 31 ? q : fmaf(Ps, q, Gs);
    float dA_l = 0.0f;
    float* rDU = s.aDU + cc * SB_CH;
    float* rDD = s.aDD + cc * SB_CH;
    float* rYY = s.aYY + cc * SB_CH;
#pragma unroll
    for (int qd = SB_NQ - 1; qd >= 0; qd--) {
        // Δ and u again from shared memory (fewer live registers than keeping them)
        const float4 dl4 = ld_quad_nc(rD, lane, qd), uu4 = ld_quad_nc(rU, lane, qd);
        const float dlq[4] = {dl4.x, dl4.y, dl4.z, dl4.w}, uuq[4] = {uu4.x, uu4.y, uu4.z, uu4.w};
        float4 du4 = *quad(rDU, lane, qd), dd4 = *quad(rDD, lane, qd);
        float du[4] = {du4.x, du4.y, du4.z, du4.w}, dd[4] = {dd4.x, dd4.y, dd4.z, dd4.w};
        float yy[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
        for (int ii = 3; ii >= 0; ii--) {
            const int i = 4 * qd + ii;
            const float an = i < SB_IT - 1 ? a[i + 1] : alast;
            const float g = fmaf(an, gn, Cv[i] * dy[i]);
            gn = g;
            const float ht = i < SB_IT - 1 ? hp[i + 1] : hcur;
            dCacc[i] = fmaf(dy[i], ht, dCacc[i]);
            yy[ii] = Cv[i] * ht;
            const float gd = g * dlq[ii];
            dBacc[i] = fmaf(gd, uuq[ii], dBacc[i]);
            du[ii] = fmaf(gd, Bv[i], du[ii]);
            const float ah = a[i] * hp[i];
            dA_l = fmaf(gd, ah, dA_l);
            dd[ii] = fmaf(g, fmaf(Ak, ah, Bv[i] * uuq[ii]), dd[ii]);
        }
        *quad(rDU, lane, qd) = make_float4(du[0], du[1], du[2], du[3]);
        *quad(rDD, lane, qd) = make_float4(dd[0], dd[1], dd[2], dd[3]);
        if (want_y) {
            float4 y4 = *quad(rYY, lane, qd);
            *quad(rYY, lane, qd) = make_float4(y4.x + yy[0], y4.y + yy[1], y4.z + yy[2], y4.w + yy[3]);
        }
    }
    dAs = dA_l;
    return a[0] * gn;  // lane 0: a_{t0} g_{t0}
}

// The forward pre-pass of one (row cc, state k): the state after the chunk,
// from the state h0 before it (valid in every lane).
__device__ __forceinline__ float chunk_state(const Block& s, int cc, int lane, float A2,
                                             const float (&Bv)[SB_IT], float h0) {
    float dl[SB_IT], uu[SB_IT];
    ld_row(dl, s.sD + cc * SB_CH, lane);
    ld_row(uu, s.sU + cc * SB_CH, lane);
    float P = 1.0f, H = 0.0f;
#pragma unroll
    for (int i = 0; i < SB_IT; i++) {
        const float a = ex2(dl[i] * A2);
        H = fmaf(a, H, dl[i] * uu[i] * Bv[i]);
        P *= a;
    }
    float Pe, He;
    scan_fwd(P, H, lane, Pe, He);
    P = __shfl_sync(SB_FULL, P, 31);
    H = __shfl_sync(SB_FULL, H, 31);
    return fmaf(P, h0, H);
}

// A[c, k] and the state at the start of chunk j of (bi, c, k) (initial_state
// or zero for chunk 0, else the pre-pass' scratch); nothing when c >= d.
__device__ __forceinline__ void prefetch_ck(const ScanBwdParams& p, int bi, int c, int k, int j, float& Ak,
                                            float& h0) {
    if (c >= p.d) return;
    Ak = ld_any(p.A.ptr, p.A.dtype, (i64)c * p.A.stride[0] + (i64)k * p.A.stride[1]);
    if (j == 0)
        h0 = p.initial_state.ptr ? ld_any(p.initial_state.ptr, p.initial_state.dtype,
                                          row_off(p.initial_state, bi, c) + (i64)k * p.initial_state.stride[2])
                                 : 0.0f;
    else
        h0 = ((const float*)p.scratch.ptr)[row_off(p.scratch, bi, c) + (i64)j * p.scratch.stride[2] +
                                           (i64)k * p.scratch.stride[3]];
}

__device__ __forceinline__ void entry(const ScanBwdParams& p) {
    extern __shared__ float4 smem4[];
    float* sm = reinterpret_cast<float*>(smem4);
    const int n = p.n, d = p.d, l = p.l;
    Block s;
    s.sD = sm;
    s.sU = s.sD + SB_W * SB_CH;
    s.sY = s.sU + SB_W * SB_CH;
    s.aDU = s.sY + SB_W * SB_CH;
    s.aDD = s.aDU + SB_W * SB_CH;
    s.aYY = s.aDD + SB_W * SB_CH;
    s.xch = s.aYY + SB_W * SB_CH;
    s.hcar = s.xch + SB_W * (SB_CH + SB_CH / 32);
    s.qcar = s.hcar + SB_W * n;
    s.part = s.qcar + SB_W * n;

    const int tid = threadIdx.x, w = tid >> 5, lane = tid & 31;
    const int bi = blockIdx.y, c0 = blockIdx.x * SB_W;
    const int cw = min(c0 + w, d - 1);  // this warp's row (a clamped copy when past d: never written)
    const bool row_ok = c0 + w < d;
    const bool varB = p.groups_b >= 1, varC = p.groups_c >= 1;
    const bool has_z = p.z.ptr != 0;
    float* xw = s.xch + w * (SB_CH + SB_CH / 32);

    for (int idx = tid; idx < SB_W * n; idx += SB_THREADS) {
        const int c = c0 + idx / n, k = idx % n;
        float h = 0.0f, g = 0.0f;
        if (c < d) {
            if (p.initial_state.ptr)
                h = ld_any(p.initial_state.ptr, p.initial_state.dtype,
                           row_off(p.initial_state, bi, c) + (i64)k * p.initial_state.stride[2]);
            if (p.dlast.ptr)
                g = ld_any(p.dlast.ptr, p.dlast.dtype, row_off(p.dlast, bi, c) + (i64)k * p.dlast.stride[2]);
        }
        s.hcar[idx] = h;
        s.qcar[idx] = g;
    }
    const int rounds = (n + SB_W - 1) / SB_W;

    // ---- forward pre-pass: the state at the start of chunks 1 .. nchunks-1
    for (int j = 0; j + 1 < p.nchunks; j++) {
        const int t0 = j * SB_CH;
        load_tile(p, s, w, bi, cw, t0, lane, false);
        __syncthreads();
        for (int r = 0; r < rounds; r++) {
            const int k = w + SB_W * r;
            if (k >= n) break;
            int keyB = -1;
            float Bv[SB_IT];
            for (int cc = 0; cc < SB_W; cc++) {
                const int c = c0 + cc;
                if (c >= d) break;
                const int kb = varB ? c / (d / p.groups_b) : c;
                if (kb != keyB) {
                    load_bc(Bv, p.B, p.groups_b, d, bi, c, k, t0 + lane * SB_IT, l);
                    keyB = kb;
                }
                const float a2 = ld_any(p.A.ptr, p.A.dtype, (i64)c * p.A.stride[0] + (i64)k * p.A.stride[1]) * SB_LOG2E;
                const float h = chunk_state(s, cc, lane, a2, Bv, s.hcar[cc * n + k]);
                __syncwarp();
                if (lane == 0) {
                    s.hcar[cc * n + k] = h;
                    ((float*)p.scratch.ptr)[row_off(p.scratch, bi, c) + (i64)(j + 1) * p.scratch.stride[2] +
                                            (i64)k * p.scratch.stride[3]] = h;
                }
            }
        }
        __syncthreads();
    }

    // ---- main pass, chunks in reverse. (The per-lane sums of dD and
    // ddelta_bias live in shared memory: fewer registers live across the loop.)
    float* part = s.part + w * 64 + lane;
    part[0] = 0.0f;
    part[32] = 0.0f;
    for (int j = p.nchunks - 1; j >= 0; j--) {
        const int t0 = j * SB_CH;
        load_tile(p, s, w, bi, cw, t0, lane, true);
        __syncthreads();
        for (int r = 0; r < rounds; r++) {
            const int k = w + SB_W * r;
            const bool kact = k < n;
            int keyB = -1, keyC = -1;
            float Bv[SB_IT], Cv[SB_IT], dBacc[SB_IT], dCacc[SB_IT];
#pragma unroll
            for (int i = 0; i < SB_IT; i++) {
                dBacc[i] = 0.0f;
                dCacc[i] = 0.0f;
            }
            // Software pipeline over the iterations: A[c, k] and the chunk-start
            // state of the next iteration's channel are loaded one iteration
            // ahead, and the warp reduction + atomic of dA is done one
            // iteration late, so neither latency sits on the critical path
            // between two barriers.
            float Ak_nx = 0.0f, h0_nx = 0.0f;
            if (kact) prefetch_ck(p, bi, c0 + w % SB_W, k, j, Ak_nx, h0_nx);
            float dA_pend = 0.0f;
            int c_pend = -1;
            for (int it = 0; it < SB_W; it++) {
                const int cc = (it + w) % SB_W;
                const int c = c0 + cc;
                const float Ak = Ak_nx, h0 = h0_nx;
                if (kact && it + 1 < SB_W) prefetch_ck(p, bi, c0 + (it + 1 + w) % SB_W, k, j, Ak_nx, h0_nx);
                if (c_pend >= 0) {  // warp-uniform
                    const float sA = (SB_DIAG & 4) ? dA_pend : warp_sum(dA_pend);
                    if (lane == 0 && !(SB_DIAG & 4))
                        atomicAdd((float*)p.dA.ptr + (i64)c_pend * p.dA.stride[0] + (i64)k * p.dA.stride[1], sA);
                    c_pend = -1;
                }
                if (kact && c < d) {  // warp-uniform
                    const int kb = varB ? c / (d / p.groups_b) : c;
                    const int kc = varC ? c / (d / p.groups_c) : c;
                    if (kb != keyB) {
                        if (keyB >= 0 && !(SB_DIAG & 1)) flush(dBacc, xw, p.dB, varB, bi, keyB, k, t0, l, lane);
                        keyB = kb;
                        if (SB_KEEPBC) load_bc(Bv, p.B, p.groups_b, d, bi, c, k, t0 + lane * SB_IT, l);
                    }
                    if (kc != keyC) {
                        if (keyC >= 0 && !(SB_DIAG & 1)) flush(dCacc, xw, p.dC, varC, bi, keyC, k, t0, l, lane);
                        keyC = kc;
                        if (SB_KEEPBC) load_bc(Cv, p.C, p.groups_c, d, bi, c, k, t0 + lane * SB_IT, l);
                    }
                    if (!SB_KEEPBC) {  // reloaded per channel (L1 hits): fewer live registers
                        load_bc(Bv, p.B, p.groups_b, d, bi, c, k, t0 + lane * SB_IT, l);
                        load_bc(Cv, p.C, p.groups_c, d, bi, c, k, t0 + lane * SB_IT, l);
                    }
                    const float q = s.qcar[cc * n + k];
                    float dAs;
                    const float qn = process(s, cc, lane, Ak, Ak * SB_LOG2E, Bv, Cv, h0, q, dBacc, dCacc, has_z, dAs);
                    dA_pend = dAs;
                    c_pend = c;
                    if (lane == 0) {
                        s.qcar[cc * n + k] = qn;
                        if (j == 0 && p.dinit.ptr)
                            st_any((void*)p.dinit.ptr, p.dinit.dtype,
                                   row_off(p.dinit, bi, c) + (i64)k * p.dinit.stride[2], qn);
                    }
                }
                if (!(SB_DIAG & 2)) __syncthreads();
            }
            if (c_pend >= 0) {
                const float sA = (SB_DIAG & 4) ? dA_pend : warp_sum(dA_pend);
                if (lane == 0 && !(SB_DIAG & 4))
                    atomicAdd((float*)p.dA.ptr + (i64)c_pend * p.dA.stride[0] + (i64)k * p.dA.stride[1], sA);
            }
            if (SB_DIAG & 2) __syncthreads();
            if (SB_DIAG & 1) keyB = keyC = -1;
            if (kact && keyB >= 0) flush(dBacc, xw, p.dB, varB, bi, keyB, k, t0, l, lane);
            if (kact && keyC >= 0) flush(dCacc, xw, p.dC, varC, bi, keyC, k, t0, l, lane);
        }
        // ---- the warp's own row: finish this chunk
        if (row_ok) {
            const int c = cw;
            const int t = t0 + lane * SB_IT;
            float dy[SB_IT], uu[SB_IT], du[SB_IT], dd[SB_IT];
            ld_row(dy, s.sY + w * SB_CH, lane);
            ld_row(uu, s.sU + w * SB_CH, lane);
            ld_row(du, s.aDU + w * SB_CH, lane);
            ld_row(dd, s.aDD + w * SB_CH, lane);
            const float Dv = p.D.ptr ? ld_any(p.D.ptr, p.D.dtype, (i64)c * p.D.stride[0]) : 0.0f;
            float dD_part = part[0];
#pragma unroll
            for (int i = 0; i < SB_IT; i++) {
                if (t + i < l) dD_part = fmaf(dy[i], uu[i], dD_part);
                du[i] = fmaf(dy[i], Dv, du[i]);
            }
            part[0] = dD_part;
            store_items(du, p.du, row_off(p.du, bi, c), t, l);
            if (p.softplus) {
                float dl[SB_IT];
                load_items(dl, p.delta, row_off(p.delta, bi, c), t, l, 0.0f);
                const float bias = p.delta_bias.ptr ? ld_any(p.delta_bias.ptr, p.delta_bias.dtype, (i64)c * p.delta_bias.stride[0]) : 0.0f;
#pragma unroll
                for (int i = 0; i < SB_IT; i++) {
                    const float x = dl[i] + bias;
                    dd[i] *= x > 20.0f ? 1.0f : sigmoid(x);
                }
            }
            float ddb_part = part[32];
#pragma unroll
            for (int i = 0; i < SB_IT; i++)
                if (t + i < l) ddb_part += dd[i];
            part[32] = ddb_part;
            store_items(dd, p.ddelta, row_off(p.ddelta, bi, c), t, l);
            if (has_z) {
                float yy[SB_IT], zz[SB_IT], go[SB_IT];
                ld_row(yy, s.aYY + w * SB_CH, lane);
                load_items(zz, p.z, row_off(p.z, bi, c), t, l, 0.0f);
                load_items(go, p.dout, row_off(p.dout, bi, c), t, l, 0.0f);
#pragma unroll
                for (int i = 0; i < SB_IT; i++) {
                    const float y = fmaf(Dv, uu[i], yy[i]);
                    const float sg = sigmoid(zz[i]);
                    yy[i] = go[i] * y * sg * fmaf(zz[i], 1.0f - sg, 1.0f);
                }
                store_items(yy, p.dz, row_off(p.dz, bi, c), t, l);
            }
        }
    }
    if (row_ok) {
        const float dD_part = warp_sum(part[0]);
        const float ddb_part = warp_sum(part[32]);
        if (lane == 0) {
            if (p.dD.ptr) atomicAdd((float*)p.dD.ptr + (i64)cw * p.dD.stride[0], dD_part);
            if (p.ddelta_bias.ptr) atomicAdd((float*)p.ddelta_bias.ptr + (i64)cw * p.ddelta_bias.stride[0], ddb_part);
        }
    }
}


}  // namespace sbwd

extern "C" __global__ void __launch_bounds__(SB_THREADS, SB_MINB)
selective_scan_bwd(const __grid_constant__ ScanBwdParams p) { sbwd::entry(p); }
