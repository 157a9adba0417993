// selective_scan_fn backward (SPEC §1), float32 arithmetic, any strides.
//
// The host prepends common.cuh (Tensor4, ld_any, st_any, ...); this file
// includes nothing and declares its own parameter struct (mirrored by
// src/cuda/scan_bwd.rs). Compiled by NVRTC for the device's exact sm_XY.
//
// Two kernels: selective_scan_bwd_fast (channel-parallel, see its own
// section near the end of this file) for 1 <= n <= 16 with time-varying B
// and C whose groups hold whole blocks of 32 channels (G2 and every usual
// Mamba layout), and selective_scan_bwd (time-parallel within a warp, below)
// for everything else (n > 16, constant (d, n) B or C, groups that straddle
// blocks of 32 channels). src/cuda/scan_bwd.rs (use_fast) picks one; the
// fast path runs selective_scan_bwd_fast_ck (the same without the forward
// pre-pass) when it is given the forward's checkpoints (ck_given = 1).
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
    // 1: scratch already holds the states at the chunk starts (the training
    // forward's checkpoints, selective_scan_fwd_ck_*): the fast kernel skips
    // its pre-pass and only reads scratch. Fast kernel only.
    int ck_given;
    int _pad;
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
                    __syncwarp();  // every lane has read qcar (racecheck: lane 0's write below)
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

// ============================================================================
// selective_scan_bwd_fast: the channel-parallel backward (the common case)
// ============================================================================
// Use when ALL of:  1 <= n <= 16, groups_b >= 1 and groups_c >= 1 (B and C
// time-varying), and for each of B, C: groups == 1 or (d / groups) % 32 == 0
// (no block of 32 channels straddles two groups; a block that would writes
// NaN to du and returns).
//   grid  = (ceil(d / 32), b, 1)    block = (128, 1, 1)
//   dynamic shared memory = 4 * (2*16*SF_T + 5*32*SF_T + 4*128*(SF_NSUB-1) + 2*32*64 + SF_ACC)
//                         = 56448 bytes for SF_T = 32 (cuFuncSetAttribute needed)
//   nchunks = ceil(l / SF_T) (32-step chunks); scratch: float32 (b, d, nchunks, n)
//   when nchunks > 1. Zero-filled outputs as for selective_scan_bwd.
//
// Design. Like the forward's fast kernel, each (batch, channel) is owned by
// SF_P = 4 adjacent lanes, lane q holding the states k = 4q .. 4q+3 in
// registers, and steps through time; no shuffles in the recurrences. The
// states at chunk starts (32 steps) come from a forward pre-pass over the
// sequence (scratch); per chunk, taken in reverse, a forward over the chunk
// leaves the states at its sub-chunk starts (4 steps) in shared memory; per
// sub-chunk, in reverse, a forward recomputes h_t and a_t = exp(Δ_t A) of its
// 4 steps into registers and the adjoint steps back through them:
//   g = C_t dy_t + r,  r := a_t g  (r enters step t-1; r = dlast at the end)
//   dC_t[k] += dy_t h_t     dB_t[k] += g Δ_t u_t     y_t += C_t h_t
//   du_t += g Δ_t B_t       dΔ_t += g (u_t B_t + A a_t h_{t-1})
//   dA[c,k] += Δ_t g a_t h_{t-1}
// The per-step sums over k (of g B, g A a h, C h) are reduce-scattered over
// the 4 lanes so that lane q finishes step 4s+q of the sub-chunk (du, dΔ, dz,
// dD, dΔbias). dB_t[k], dC_t[k] are summed over the block's 32 channels
// through shared memory (per sub-chunk: over each warp's 8 channels in the
// warp's own part of the buffer, then over the 4 warps, SF_WRS; one block
// barrier per chunk, SF_PB = 8) and added with one atomic per (t, k) per block. Per chunk, the block stages B, C
// ([t][16] float32) and the rows Δ = softplus(delta + bias), u,
// dy = dout silu(z), softplus'(.), dout silu'(z) ([32][SF_T]) in shared
// memory, with 16-byte loads where rows are contiguous and aligned. du, dΔ,
// dz go back into the row slots their step has consumed (SF_OST) and leave
// once per chunk, 8 steps per thread (16-byte stores where possible).
// Occupancy is what matters: 128 registers (launch bounds 128 x 4) and 54 KB
// of shared memory give 4 blocks = 16 warps per SM; a 3-block variant
// (SF_DBUF, one barrier less per sub-chunk) measured 1.6x slower.
// Three exps per element (pre-pass, chunk forward, sub-chunk forward);
// ~42 instructions per (t, k, channel). G2 backward alone: 1.41 ms on an
// H100 with the pre-pass, 1.15 ms from the forward's checkpoints (_ck; the
// warp-scan kernel above: 3.64 ms). bench/scan_bwd_notes.md has
// the measurements of each knob.
// ============================================================================

#define SF_T 32        // chunk length of the fast kernel (the staging assumes 32)
#define SF_S 4         // steps per sub-chunk (= lanes per channel)
#define SF_NSUB (SF_T / SF_S)
#define SF_CPB 32      // channels per block
#define SF_THREADS 128
#ifndef SF_MINB
#define SF_MINB 4
#endif
#ifndef SF_OST
#define SF_OST 1       // du, dΔ, dz staged in shared memory (in the consumed rows), stored 8 steps at a time per chunk
#endif
#ifndef SF_FSIG
#define SF_FSIG 1      // sigmoid in the staging with __fdividef (MUFU.RCP) instead of an IEEE division
#endif
#ifndef SF_PF
#define SF_PF 0        // prefetch the next chunk's rows and B/C into L2 after staging a chunk (pre-pass kernel)
#endif
#ifndef SF_PF_CK
#define SF_PF_CK 0     // the same in selective_scan_bwd_fast_ck (no pre-pass; measured slower, see below)
#endif
// SF_WRS: the dB/dC reduction in two levels. Each warp sums its own 8
// channels in its own part of s.red after a __syncwarp (the part is the
// warp's alone, so no block barrier guards its reuse), and leaves the 128 sums
// (one float4 per thread) in the thread's own s.hst slot that its sub-chunk
// has consumed (sub-chunk sc > 0: slot sc-1, read at the sub-chunk's start;
// sc = 0: slot 1, free since sub-chunk 2 read it; consecutive sub-chunks use
// different slots: a double buffer at no extra shared memory). One
// __syncthreads per sub-chunk, then each thread adds the 4 warps' sums of its
// (step, state) in warp order and makes the atomic. 0: one buffer for the
// block, a barrier before the writes and one before the reads (the old way).
// Changes the order of dB/dC's sums over channels (both kernels alike).
// Measured on the H100 at the G2 shape (scan_bwd_sweep.py, round 3): fast_ck
// 1.230 / 1.236 -> 1.212 / 1.213 ms, fast 1.541 -> 1.494 ms.
#ifndef SF_WRS
#define SF_WRS 1
#endif
// SF_PB (with SF_WRS): one block barrier per SF_PB sub-chunks instead of one
// per sub-chunk (1, 2, 4 or 8). Sub-chunk sc > 0 leaves its per-warp sums in
// s.hst slot sc-1 (its own state slot, read at its start; each slot is
// written once per chunk), sub-chunk 0 in its warp's own part of s.red (free
// until the next chunk); every SF_PB sub-chunks one __syncthreads, then the
// cross-warp sums and atomics of those SF_PB sub-chunks. Same sums in the same
// order as SF_PB = 1 (only issued later). 1: the round-3 code path.
// Measured on the H100 at the G2 shape (scan_bwd_sweep.py, device NVRTC,
// round 4 in bench/scan_bwd_notes.md): fast_ck 1.211-1.213 ms at SF_PB = 1;
// SF_PB = 8 with SF_PBU = 1: 1.182-1.189 (8 B frame); with SF_DSM_CK = 1 as
// well: 1.148-1.149 (0 B frame), the default. fast (pre-pass): 1.494 ->
// 1.392 (SF_PB = 8, SF_PBU = 1) -> 1.406 with SF_DSM too.
#ifndef SF_PB
#define SF_PB 8
#endif
#ifndef SF_WSU
#define SF_WSU 0  // unroll of the SF_WRS warp sum (0: 2 on sm_80, full on sm_90; 1, 2, 8)
#endif
#ifndef SF_PBU
#define SF_PBU 1  // SF_PB > 1: unroll the cross-warp loop (1) or not (0)
#endif
#if SF_PB != 1 && SF_PB != 2 && SF_PB != 4 && SF_PB != 8
#error "SF_PB must be 1, 2, 4 or 8"
#endif
// SF_HRE (selective_scan_bwd_fast) / SF_HRE_CK (..._fast_ck): the chunk's
// start state re-read from the scratch / checkpoints at sub-chunk 0 instead of
// held in 4 registers through the chunk. Only a register-allocation knob (same
// results). fast: the setting without a stack frame for each architecture
// with NVRTC 13.2 (SF_WRS = 0: sm_90 1, sm_80 0; SF_WRS = 1: 0 on both;
// nvrtc_check.py; the device's NVRTC gives fast an 8 B frame with SF_WRS = 1,
// and it is still faster: 1.494 vs 1.541 ms). fast_ck: 0, measured
// faster on the H100 (G2 shape: 1.222 ms with SF_HRE_CK = 0 and SF_PF_CK = 0,
// 1.246 with 0 / 1, 1.282 with 1 / 1, 1.281 with 1 / 0; all 0 B stack frame).
#ifndef SF_HRE
#if SF_WRS
#define SF_HRE 0  // with SF_WRS: 0 B stack frame on both (1: 8 B on sm_90)
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define SF_HRE 1
#else
#define SF_HRE 0
#endif
#endif
#ifndef SF_HRE_CK
#define SF_HRE_CK 0
#endif
// SF_DSM (selective_scan_bwd_fast) / SF_DSM_CK (..._fast_ck): D and the
// per-thread dD / dΔbias partial sums in shared memory (SF_ACC floats after
// the reduction buffer, allocated either way) instead of 3 loop-long
// registers: dD accumulated per chunk in the staging (Σ dy u over the
// thread's 8 steps), dΔbias in the output store (Σ dΔ over the same 8 steps).
// Requires SF_OST. Measured on the H100 at the G2 shape (device NVRTC):
// fast 1.558 ms (8 B stack frame) -> 1.538 (0 B) with it; fast_ck 1.226-1.228
// without, 1.230-1.234 with it (125 instead of 128 registers). Off in both:
// it changes the order in which dD and dΔbias are summed, and the two kernels
// must give the same bits (tests/test_cuda_scan_ck.py: the backward from the
// checkpoints is the recompute path), so both knobs move together. Round 2
// kept both off (fast_ck was not faster with it); with SF_PB = 8 it frees the
// registers that avoid a stack frame: fast_ck 1.186 -> 1.149 ms, so both on.
#ifndef SF_DSM
#define SF_DSM 1
#endif
#ifndef SF_DSM_CK
#define SF_DSM_CK 1
#endif
#if (SF_DSM || SF_DSM_CK) && !SF_OST
#error "SF_DSM requires SF_OST"
#endif
#define SF_ACC (2 * SF_THREADS + SF_CPB)
#define SF_LN2 0.6931471805599453f

namespace sbf {

using sbwd::ex2;
using sbwd::row_off;
using sbwd::softplus;

__device__ __forceinline__ float sigmoid(float x) {
#if SF_FSIG
    return __fdividef(1.0f, 1.0f + __expf(-x));  // 0 when exp(-x) = inf
#else
    return sbwd::sigmoid(x);
#endif
}

// softplus exactly as the forward computes it for f16/bf16 u
// (scan::softplus<true> in selective_scan_fwd.cu, SCAN_FAST_SOFTPLUS_16BIT):
// same operations in the same order, so that Δ, and with it every state, is
// bit for bit the forward's (the checkpoints the forward saves are then the
// states this kernel's pre-pass would compute).
__device__ __forceinline__ float softplus_fast(float x) {
    float y, l2;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x * SB_LOG2E));
    const float w = 1.0f + y;
    asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(l2) : "f"(w));
    const float r = fmaf(l2, SF_LN2, (y - (w - 1.0f)) * (2.0f - w));
    return x > 20.0f ? x : r;
}

enum { R_D = 0, R_U = 1, R_Y = 2, R_SP = 3, R_GZ = 4, NROWS = 5 };

// Element t (local) of channel row ch in a [32][SF_T] row block: float4
// groups XOR-swizzled by the channel's parity (conflict-free LDS.128 for the
// two channels of a quarter warp).
__device__ __forceinline__ int rsw(int ch, int t) {
    return ch * SF_T + ((((t >> 2) ^ (ch & 1))) << 2) + (t & 3);
}

// Float4 slot j (= step i * 4 + state quad kq) of channel ch in the dB/dC
// reduction buffer [32][16 float4]: swizzled so that both the writers (two
// channels per quarter warp) and the readers (four channels m*4 + r) hit
// distinct banks.
__device__ __forceinline__ int fsw(int ch) { return ((ch & 1) << 2) | (((ch >> 1) & 1) << 1); }
__device__ __forceinline__ int red_idx(int ch, int j) { return ch * 64 + ((j ^ fsw(ch)) << 2); }

// Sum over the 4 lanes of a quad of x[q] (q = this lane's index in the quad):
// a reduce-scatter, 3 shuffles.
__device__ __forceinline__ float rs4(const float (&x)[4], int q) {
    const bool b1 = (q & 2) != 0, b0 = (q & 1) != 0;
    const float y0 = (b1 ? x[2] : x[0]) + __shfl_xor_sync(SB_FULL, b1 ? x[0] : x[2], 2);
    const float y1 = (b1 ? x[3] : x[1]) + __shfl_xor_sync(SB_FULL, b1 ? x[1] : x[3], 2);
    return (b0 ? y1 : y0) + __shfl_xor_sync(SB_FULL, b0 ? y0 : y1, 1);
}

// SF_WRS: the sums of dB (lanes 0-15) / dC (16-31) over the warp's 8
// channels: lane L sums float4 slot L & 15 of its part of s.red.
__device__ __forceinline__ float4 warp_bc_sum(const float* red, int tid) {
    const int L = tid & 31;
    const float* base = red + (L >> 4) * 32 * 64 + (tid >> 5) * 8 * 64;
    float4 acc = *reinterpret_cast<const float4*>(base + red_idx(0, L & 15));
#if SF_WSU == 1
#pragma unroll 1
#elif SF_WSU == 2 || (SF_WSU == 0 && defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900)
#pragma unroll 2  // sm_80: 0 B stack frame with NVRTC 13.2 (full unroll: 8 B)
#else
#pragma unroll
#endif
    for (int m = 1; m < 8; m++) {
        const float4 v = *reinterpret_cast<const float4*>(base + red_idx(m, L & 15));
        acc.x += v.x; acc.y += v.y; acc.z += v.z; acc.w += v.w;
    }
    return acc;
}

// 8 consecutive elements t .. t+7 of a row (element i at base + i*st) as
// float32, zero beyond l. One or two 16-byte loads when st == 1, the row is
// aligned and t + 8 <= l; scalar loads otherwise.
__device__ __forceinline__ void load8(float (&v)[8], const void* ptr, int dtype, i64 base, i64 st, int t,
                                      int l) {
    const int es = dtype == DT_F32 ? 4 : (dtype == DT_F64 ? 8 : 2);
    const char* p = (const char*)ptr + (base + (i64)t * st) * es;
    const bool vec = st == 1 && dtype != DT_F64 && t + 8 <= l &&
                     ((reinterpret_cast<unsigned long long>(p) & 15ull) == 0);
    if (vec) {
        if (dtype == DT_F32) {
            const float4 a = __ldg(reinterpret_cast<const float4*>(p));
            const float4 b = __ldg(reinterpret_cast<const float4*>(p) + 1);
            v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
            v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
        } else {
            const uint4 a = __ldg(reinterpret_cast<const uint4*>(p));
            const unsigned w[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
            for (int i = 0; i < 8; i++) {
                const unsigned x = w[i >> 1];
                if (dtype == DT_BF16)
                    v[i] = __uint_as_float((i & 1) ? (x & 0xffff0000u) : (x << 16));
                else
                    v[i] = f16_to_f32((u16)((i & 1) ? (x >> 16) : (x & 0xffffu)));
            }
        }
    } else {
#pragma unroll
        for (int i = 0; i < 8; i++) v[i] = t + i < l ? ld_any(ptr, dtype, base + (i64)(t + i) * st) : 0.0f;
    }
}

// Stores v[0..7] as elements t .. t+7 of a row (element i at base + i*st),
// only those below l: one or two 16-byte stores when st == 1, the row is
// aligned and t + 8 <= l; st_any per element otherwise.
__device__ __forceinline__ void store8(const float (&v)[8], const Tensor4& x, i64 base, int t, int l) {
    const i64 st = x.stride[2];
    const int es = x.dtype == DT_F32 ? 4 : (x.dtype == DT_F64 ? 8 : 2);
    char* p = (char*)x.ptr + (base + (i64)t * st) * es;
    const bool vec = st == 1 && x.dtype != DT_F64 && t + 8 <= l &&
                     ((reinterpret_cast<unsigned long long>(p) & 15ull) == 0);
    if (vec) {
        if (x.dtype == DT_F32) {
            reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
            reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
        } else {
            unsigned w[4];
#pragma unroll
            for (int i = 0; i < 4; i++) {
                if (x.dtype == DT_BF16)
                    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(w[i]) : "f"(v[2 * i + 1]), "f"(v[2 * i]));
                else
                    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(w[i]) : "f"(v[2 * i + 1]), "f"(v[2 * i]));
            }
            *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
        }
    } else {
#pragma unroll
        for (int i = 0; i < 8; i++)
            if (t + i < l) st_any((void*)x.ptr, x.dtype, base + (i64)(t + i) * st, v[i]);
    }
}

struct Sm {
    float *sB, *sC;    // [SF_T][16]
    float* rows;       // NROWS x [32][SF_T]
    float4* hst;       // [SF_NSUB-1][128]: state at the start of sub-chunk s+1
    float* red;        // [2][32][64]: dB, dC per channel, step, state
    float* acc;        // SF_DSM: [128] dD, [128] dΔbias partials per thread, [32] D per channel
};

// Stages the rows of chunk t0 (main: all five; else Δ and u) and B (and C
// when main) into shared memory.
template <bool MAIN, bool DSM = false>
__device__ __forceinline__ void stage(const ScanBwdParams& p, const Sm& s, int bi, int c0, int grpB,
                                      int grpC, int t0, int tid) {
    const int l = p.l;
    {
        const int ch = tid >> 2, seg = tid & 3;
        const int c = c0 + ch;
        const bool act = c < p.d;
        const int cc = act ? c : p.d - 1;
        const int t = t0 + seg * 8;
        float dl[8], uu[8];
        load8(dl, p.delta.ptr, p.delta.dtype, row_off(p.delta, bi, cc), p.delta.stride[2], t, l);
        load8(uu, p.u.ptr, p.u.dtype, row_off(p.u, bi, cc), p.u.stride[2], t, l);
        float go[8] = {}, zz[8] = {};
        if (MAIN) {
            load8(go, p.dout.ptr, p.dout.dtype, row_off(p.dout, bi, cc), p.dout.stride[2], t, l);
            if (p.z.ptr) load8(zz, p.z.ptr, p.z.dtype, row_off(p.z, bi, cc), p.z.stride[2], t, l);
        }
        const float bias = p.delta_bias.ptr
                               ? ld_any(p.delta_bias.ptr, p.delta_bias.dtype, (i64)cc * p.delta_bias.stride[0])
                               : 0.0f;
        // Δ as the forward computed it (16-bit u: its MUFU softplus)
        const bool fast_sp = p.u.dtype != DT_F32;
        float sp[8], dy[8], gz[8];
#pragma unroll
        for (int i = 0; i < 8; i++) {
            const bool valid = act && t + i < l;
            const float x = dl[i] + bias;
            float dt = x, spd = 1.0f;
            if (p.softplus) {
                dt = fast_sp ? softplus_fast(x) : softplus(x);
                spd = x > 20.0f ? 1.0f : sigmoid(x);
            }
            dl[i] = valid ? dt : 0.0f;  // padding: Δ = 0 (a = 1, nothing added)
            uu[i] = valid ? uu[i] : 0.0f;
            sp[i] = spd;
            if (MAIN) {
                float y = go[i], gzv = 0.0f;
                if (p.z.ptr) {
                    const float sg = sigmoid(zz[i]);
                    y = go[i] * zz[i] * sg;
                    gzv = go[i] * sg * fmaf(zz[i], 1.0f - sg, 1.0f);
                }
                dy[i] = valid ? y : 0.0f;
                gz[i] = valid ? gzv : 0.0f;
            }
        }
        if (DSM && MAIN) {  // dD: Σ dy u over this thread's steps (0 where not valid)
            float dsum = 0.0f;
#pragma unroll
            for (int i = 0; i < 8; i++) dsum = fmaf(dy[i], uu[i], dsum);
            s.acc[tid] += dsum;
        }
        const int tl = seg * 8;
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int o = rsw(ch, tl + 4 * h);
            *reinterpret_cast<float4*>(s.rows + R_D * 32 * SF_T + o) =
                make_float4(dl[4 * h], dl[4 * h + 1], dl[4 * h + 2], dl[4 * h + 3]);
            *reinterpret_cast<float4*>(s.rows + R_U * 32 * SF_T + o) =
                make_float4(uu[4 * h], uu[4 * h + 1], uu[4 * h + 2], uu[4 * h + 3]);
            if (MAIN) {
                *reinterpret_cast<float4*>(s.rows + R_Y * 32 * SF_T + o) =
                    make_float4(dy[4 * h], dy[4 * h + 1], dy[4 * h + 2], dy[4 * h + 3]);
                *reinterpret_cast<float4*>(s.rows + R_SP * 32 * SF_T + o) =
                    make_float4(sp[4 * h], sp[4 * h + 1], sp[4 * h + 2], sp[4 * h + 3]);
                *reinterpret_cast<float4*>(s.rows + R_GZ * 32 * SF_T + o) =
                    make_float4(gz[4 * h], gz[4 * h + 1], gz[4 * h + 2], gz[4 * h + 3]);
            }
        }
    }
    // B (threads 0..63) and C (64..127): state k = idx % 16, steps seg*8 .. +7
    for (int v = tid; v < (MAIN ? 2 : 1) * 16 * (SF_T / 8); v += SF_THREADS) {
        const int which = v / (16 * (SF_T / 8));
        const int idx = v % (16 * (SF_T / 8));
        const int k = idx & 15, seg = idx >> 4;
        const Tensor4& X = which ? p.C : p.B;
        float* dst = which ? s.sC : s.sB;
        float vals[8];
        if (k < p.n) {
            const int grp = which ? grpC : grpB;
            const i64 base = (i64)bi * X.stride[0] + (i64)grp * X.stride[1] + (i64)k * X.stride[2];
            load8(vals, X.ptr, X.dtype, base, X.stride[3], t0 + seg * 8, l);
        } else {
#pragma unroll
            for (int i = 0; i < 8; i++) vals[i] = 0.0f;
        }
#pragma unroll
        for (int i = 0; i < 8; i++) dst[(seg * 8 + i) * 16 + k] = vals[i];
    }
}

// L2 prefetch of what stage<MAIN> will load for chunk t0 (no registers held).
__device__ __forceinline__ void pf(const void* ptr, int dtype, i64 idx) {
    const int es = dtype == DT_F32 ? 4 : (dtype == DT_F64 ? 8 : 2);
    asm volatile("prefetch.L2 [%0];" ::"l"((const char*)ptr + idx * es));
}
template <bool MAIN>
__device__ __forceinline__ void prefetch(const ScanBwdParams& p, int bi, int c0, int grpB, int grpC, int t0,
                                         int tid) {
    const int ch = tid >> 2, seg = tid & 3, t = t0 + seg * 8;
    if (t < p.l && c0 + ch < p.d) {
        const int c = c0 + ch;
        pf(p.delta.ptr, p.delta.dtype, row_off(p.delta, bi, c) + (i64)t * p.delta.stride[2]);
        pf(p.u.ptr, p.u.dtype, row_off(p.u, bi, c) + (i64)t * p.u.stride[2]);
        if (MAIN) {
            pf(p.dout.ptr, p.dout.dtype, row_off(p.dout, bi, c) + (i64)t * p.dout.stride[2]);
            if (p.z.ptr) pf(p.z.ptr, p.z.dtype, row_off(p.z, bi, c) + (i64)t * p.z.stride[2]);
        }
    }
    const int idx = tid & 63, k = idx & 15, tb = t0 + (idx >> 4) * 8;
    const bool which = tid >= 64;
    if ((MAIN || !which) && k < p.n && tb < p.l) {
        const Tensor4& X = which ? p.C : p.B;
        pf(X.ptr, X.dtype, (i64)bi * X.stride[0] + (i64)(which ? grpC : grpB) * X.stride[1] +
                               (i64)k * X.stride[2] + (i64)tb * X.stride[3]);
    }
}

// Forward over the 4 steps ts .. ts+3 (local) of channel row ch, states of quad q.
__device__ __forceinline__ void fwd4(float (&h)[4], const Sm& s, int ch, int q, int ts, const float (&A2)[4]) {
    const float4 D4 = *reinterpret_cast<const float4*>(s.rows + R_D * 32 * SF_T + rsw(ch, ts));
    const float4 U4 = *reinterpret_cast<const float4*>(s.rows + R_U * 32 * SF_T + rsw(ch, ts));
    const float Dl[4] = {D4.x, D4.y, D4.z, D4.w}, Ul[4] = {U4.x, U4.y, U4.z, U4.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const float du = Dl[i] * Ul[i];
        const float4 B4 = *reinterpret_cast<const float4*>(s.sB + (ts + i) * 16 + 4 * q);
        const float Bv[4] = {B4.x, B4.y, B4.z, B4.w};
#pragma unroll
        for (int k = 0; k < 4; k++) h[k] = fmaf(ex2(Dl[i] * A2[k]), h[k], Bv[k] * du);
    }
}

// PRE: with the forward pre-pass (skipped when p.ck_given); false: the
// checkpoints must be given (selective_scan_bwd_fast_ck).
template <bool PRE>
__device__ __forceinline__ void fast_entry(const ScanBwdParams& p) {
    constexpr bool PF = PRE ? SF_PF : SF_PF_CK;
    constexpr bool HRE = PRE ? SF_HRE : SF_HRE_CK;
    constexpr bool DSM = PRE ? SF_DSM : SF_DSM_CK;
    extern __shared__ float4 smem4[];
    Sm s;
    s.sB = reinterpret_cast<float*>(smem4);
    s.sC = s.sB + SF_T * 16;
    s.rows = s.sC + SF_T * 16;
    s.hst = reinterpret_cast<float4*>(s.rows + NROWS * 32 * SF_T);
    s.red = reinterpret_cast<float*>(s.hst + (SF_NSUB - 1) * SF_THREADS);  // [2][32][64]
    s.acc = s.red + 2 * 32 * 64;                                            // SF_ACC floats

    const int tid = threadIdx.x, ch = tid >> 2, q = tid & 3;
    const int bi = blockIdx.y, c0 = blockIdx.x * SF_CPB;
    const int d = p.d, l = p.l, n = p.n;
    const int c = c0 + ch;
    const bool act = c < d;
    const int cc = act ? c : d - 1;
    {
        const int c1 = min(c0 + SF_CPB, d) - 1;
        const bool ok = n >= 1 && n <= 16 && p.groups_b >= 1 && p.groups_c >= 1 &&
                        c0 / (d / p.groups_b) == c1 / (d / p.groups_b) &&
                        c0 / (d / p.groups_c) == c1 / (d / p.groups_c) &&
                        (PRE || p.ck_given || p.nchunks <= 1);
        if (!ok) {  // block-uniform: the host broke the launch rules
            if (act && q == 0)
                for (int t = 0; t < l; t++)
                    st_any((void*)p.du.ptr, p.du.dtype, row_off(p.du, bi, c) + (i64)t * p.du.stride[2],
                           __int_as_float(0x7fc00000));
            return;
        }
    }
    const int grpB = c0 / (d / p.groups_b), grpC = c0 / (d / p.groups_c);

    // initial state of this lane's states (re-read where needed: fewer live registers)
    auto h_init = [&](int i) -> float {
        const int k = 4 * q + i;
        return (k < n && p.initial_state.ptr)
                   ? ld_any(p.initial_state.ptr, p.initial_state.dtype,
                            row_off(p.initial_state, bi, cc) + (i64)k * p.initial_state.stride[2])
                   : 0.0f;
    };
    float A2[4], r[4], dA[4];
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const int k = 4 * q + i;
        const bool kv = k < n;
        A2[i] = kv ? ld_any(p.A.ptr, p.A.dtype, (i64)cc * p.A.stride[0] + (i64)k * p.A.stride[1]) * SB_LOG2E : 0.0f;
        r[i] = (kv && act && p.dlast.ptr)
                   ? ld_any(p.dlast.ptr, p.dlast.dtype, row_off(p.dlast, bi, cc) + (i64)k * p.dlast.stride[2])
                   : 0.0f;
        dA[i] = 0.0f;
    }
    const int nch = p.nchunks;
    float* scr = (float*)p.scratch.ptr;
    const i64 scr_row = scr ? row_off(p.scratch, bi, cc) : 0;

    // ---- forward pre-pass: the states at the starts of chunks 1 .. nch-1
    // (skipped when the forward saved them: ck_given)
    if (PRE && nch > 1 && !p.ck_given) {
        float h[4] = {h_init(0), h_init(1), h_init(2), h_init(3)};
#pragma unroll 1
        for (int j = 0; j + 1 < nch; j++) {
            __syncthreads();
            stage<false>(p, s, bi, c0, grpB, grpC, j * SF_T, tid);
            __syncthreads();
            if (PF) {
                if (j + 2 < nch) prefetch<false>(p, bi, c0, grpB, grpC, (j + 1) * SF_T, tid);
                else prefetch<true>(p, bi, c0, grpB, grpC, (nch - 1) * SF_T, tid);
            }
#pragma unroll 1
            for (int sc = 0; sc < SF_NSUB; sc++) fwd4(h, s, ch, q, sc * SF_S, A2);
            if (act) {
#pragma unroll
                for (int i = 0; i < 4; i++)
                    if (4 * q + i < n)
                        scr[scr_row + (i64)(j + 1) * p.scratch.stride[2] + (i64)(4 * q + i) * p.scratch.stride[3]] = h[i];
            }
        }
    }

    // ---- main pass, chunks in reverse
    float Dv = 0.0f, dD_acc = 0.0f, ddb_acc = 0.0f;  // DSM: in shared memory instead
    if (DSM) {  // read after the chunk loop's first barrier
        s.acc[tid] = 0.0f;
        s.acc[SF_THREADS + tid] = 0.0f;
        if (tid < SF_CPB) {
            const int cd = min(c0 + tid, d - 1);
            s.acc[2 * SF_THREADS + tid] = p.D.ptr ? ld_any(p.D.ptr, p.D.dtype, (i64)cd * p.D.stride[0]) : 0.0f;
        }
    } else {
        Dv = p.D.ptr ? ld_any(p.D.ptr, p.D.dtype, (i64)cc * p.D.stride[0]) : 0.0f;
    }
#if !SF_OST
    const i64 off_du = row_off(p.du, bi, cc), off_dd = row_off(p.ddelta, bi, cc);
    const i64 off_dz = p.dz.ptr ? row_off(p.dz, bi, cc) : 0;
#endif
#if !SF_WRS
    // the dB/dC reduction: this thread's float4 output slot
    const int rr = tid & 3, roj = tid >> 2, rQ = roj >> 4, rj = roj & 15;
    const int rk = (rj & 3) * 4 + rr, ri = rj >> 2;
#endif
#pragma unroll 1
    for (int j = nch - 1; j >= 0; j--) {
        const int t0 = j * SF_T;
        // the state before the chunk: the initial state or a checkpoint
        auto h_chunk = [&](int i) -> float {
            // the row offset recomputed per use (opaque to hoisting: a loop-long
            // 64-bit value would be spilled)
            int cc_o;
            asm volatile("mov.b32 %0, %1;" : "=r"(cc_o) : "r"(cc));
            const i64 srow = scr ? row_off(p.scratch, bi, cc_o) : 0;
            return (j == 0 || 4 * q + i >= n || !act)
                       ? h_init(i)
                       : scr[srow + (i64)j * p.scratch.stride[2] + (i64)(4 * q + i) * p.scratch.stride[3]];
        };
        float hc0[4];  // held through the chunk unless HRE
#pragma unroll
        for (int i = 0; i < 4; i++) hc0[i] = HRE ? 0.0f : h_chunk(i);
        __syncthreads();
        stage<true, DSM>(p, s, bi, c0, grpB, grpC, t0, tid);
        __syncthreads();
        if (PF && j > 0) prefetch<true>(p, bi, c0, grpB, grpC, t0 - SF_T, tid);
        {  // states at the sub-chunk starts
            float h[4];
#pragma unroll
            for (int i = 0; i < 4; i++) h[i] = HRE ? h_chunk(i) : hc0[i];
#pragma unroll 1
            for (int sc = 0; sc + 1 < SF_NSUB; sc++) {
                fwd4(h, s, ch, q, sc * SF_S, A2);
                s.hst[sc * SF_THREADS + tid] = make_float4(h[0], h[1], h[2], h[3]);
            }
        }
#pragma unroll 1
        for (int sc = SF_NSUB - 1; sc >= 0; sc--) {
            const int ts = sc * SF_S;
            float hh[5][4], a[4][4];
            if (sc == 0) {
#pragma unroll
                for (int k = 0; k < 4; k++) hh[0][k] = HRE ? h_chunk(k) : hc0[k];
            } else {
                const float4 h4 = s.hst[(sc - 1) * SF_THREADS + tid];
                hh[0][0] = h4.x; hh[0][1] = h4.y; hh[0][2] = h4.z; hh[0][3] = h4.w;
            }
            const float4 D4 = *reinterpret_cast<const float4*>(s.rows + R_D * 32 * SF_T + rsw(ch, ts));
            const float4 U4 = *reinterpret_cast<const float4*>(s.rows + R_U * 32 * SF_T + rsw(ch, ts));
            const float4 Y4 = *reinterpret_cast<const float4*>(s.rows + R_Y * 32 * SF_T + rsw(ch, ts));
            const float Dl[4] = {D4.x, D4.y, D4.z, D4.w}, Ul[4] = {U4.x, U4.y, U4.z, U4.w};
            const float Yl[4] = {Y4.x, Y4.y, Y4.z, Y4.w};
            float du[4];
#pragma unroll
            for (int i = 0; i < 4; i++) {  // recompute h_t, a_t of the sub-chunk
                du[i] = Dl[i] * Ul[i];
                const float4 B4 = *reinterpret_cast<const float4*>(s.sB + (ts + i) * 16 + 4 * q);
                const float Bv[4] = {B4.x, B4.y, B4.z, B4.w};
#pragma unroll
                for (int k = 0; k < 4; k++) {
                    a[i][k] = ex2(Dl[i] * A2[k]);
                    hh[i + 1][k] = fmaf(a[i][k], hh[i][k], Bv[k] * du[i]);
                }
            }
            // the previous sub-chunk's reduction has read s.red: the whole block's
            // (one block barrier), or with SF_WRS this warp's own part (warp_bc_sum)
            if (!SF_WRS) __syncthreads();
            else __syncwarp();
            float* const red = s.red;
            float pB[4], pA[4], pY[4];
#pragma unroll
            for (int i = SF_S - 1; i >= 0; i--) {  // the adjoint, steps in reverse
                const float4 B4 = *reinterpret_cast<const float4*>(s.sB + (ts + i) * 16 + 4 * q);
                const float4 C4 = *reinterpret_cast<const float4*>(s.sC + (ts + i) * 16 + 4 * q);
                const float Bv[4] = {B4.x, B4.y, B4.z, B4.w}, Cv[4] = {C4.x, C4.y, C4.z, C4.w};
                float vB[4], vC[4], sgB = 0.0f, sA = 0.0f, sy = 0.0f;
#pragma unroll
                for (int k = 0; k < 4; k++) {
                    const float g = fmaf(Cv[k], Yl[i], r[k]);
                    vC[k] = Yl[i] * hh[i + 1][k];
                    sy = fmaf(Cv[k], hh[i + 1][k], sy);
                    vB[k] = g * du[i];
                    sgB = fmaf(g, Bv[k], sgB);
                    const float x = g * (a[i][k] * hh[i][k]);
                    dA[k] = fmaf(Dl[i], x, dA[k]);
                    sA = fmaf(A2[k], x, sA);
                    r[k] = a[i][k] * g;
                }
                pB[i] = sgB;
                pA[i] = sA;
                pY[i] = sy;
                *reinterpret_cast<float4*>(red + red_idx(ch, i * 4 + q)) = make_float4(vB[0], vB[1], vB[2], vB[3]);
                *reinterpret_cast<float4*>(red + 32 * 64 + red_idx(ch, i * 4 + q)) =
                    make_float4(vC[0], vC[1], vC[2], vC[3]);
            }
            // this lane's step ts + q: sums over the channel's 16 states
            const float SB = rs4(pB, q), SA = rs4(pA, q) * SF_LN2, SY = rs4(pY, q);
            {
                const int tl = ts + q, t = t0 + tl;
                const int o = rsw(ch, tl);
                const float dl = s.rows[R_D * 32 * SF_T + o], uu = s.rows[R_U * 32 * SF_T + o];
                const float dy = s.rows[R_Y * 32 * SF_T + o], spd = s.rows[R_SP * 32 * SF_T + o];
                const float gz = s.rows[R_GZ * 32 * SF_T + o];
                if (DSM) Dv = s.acc[2 * SF_THREADS + ch];
                const float duv = fmaf(dl, SB, Dv * dy);
                const float ddv = fmaf(uu, SB, SA) * spd;
#if SF_OST
                // into the slots just consumed (the quad read its rows before the shuffles)
                __syncwarp();
                s.rows[R_Y * 32 * SF_T + o] = duv;
                s.rows[R_SP * 32 * SF_T + o] = ddv;
                s.rows[R_GZ * 32 * SF_T + o] = gz * fmaf(Dv, uu, SY);
                if (!DSM && act && t < l) {
                    dD_acc = fmaf(dy, uu, dD_acc);
                    ddb_acc += ddv;
                }
#else
                if (act && t < l) {
                    dD_acc = fmaf(dy, uu, dD_acc);
                    ddb_acc += ddv;
                    st_any((void*)p.du.ptr, p.du.dtype, off_du + (i64)t * p.du.stride[2], duv);
                    st_any((void*)p.ddelta.ptr, p.ddelta.dtype, off_dd + (i64)t * p.ddelta.stride[2], ddv);
                    if (p.dz.ptr)
                        st_any((void*)p.dz.ptr, p.dz.dtype, off_dz + (i64)t * p.dz.stride[2], gz * fmaf(Dv, uu, SY));
                }
#endif
            }
#if SF_WRS && SF_PB > 1
            static_assert(SF_NSUB % SF_PB == 0, "SF_PB divides the sub-chunks of a chunk");
            __syncwarp();  // this warp's part of s.red complete
            {
                const int L = tid & 31;
                const float4 acc = warp_bc_sum(red, tid);
                if (sc > 0) {
                    s.hst[(sc - 1) * SF_THREADS + tid] = acc;
                } else {  // into the warp's own dB part of s.red, once the warp has read it
                    __syncwarp();
                    reinterpret_cast<float4*>(red)[(tid >> 5) * 128 + L] = acc;
                }
            }
            if (sc % SF_PB == 0) {
                __syncthreads();  // every warp's sums of sub-chunks sc .. sc + SF_PB - 1
#if SF_PBU
#pragma unroll
#else
#pragma unroll 1
#endif
                for (int g = SF_PB - 1; g >= 0; g--) {
                    const int scg = sc + g;
                    const float* cs = scg > 0 ? reinterpret_cast<const float*>(s.hst + (scg - 1) * SF_THREADS) : red;
                    const int cst = scg > 0 ? 128 : 512;  // floats between the warps' sums
                    const float v = ((cs[tid] + cs[cst + tid]) + cs[2 * cst + tid]) + cs[3 * cst + tid];
                    int to;  // opaque: the slot's (step, state) recomputed here, not kept live
                    asm volatile("mov.b32 %0, %1;" : "=r"(to) : "r"(tid));
                    const int rQ = to >> 6, rk = ((to >> 2) & 3) * 4 + (to & 3), ri = (to >> 4) & 3;
                    const int t = t0 + scg * SF_S + ri;
                    if (rk < n && t < l) {
                        int bo;
                        asm volatile("mov.b32 %0, %1;" : "=r"(bo) : "r"(bi));
                        const Tensor4& dX = rQ ? p.dC : p.dB;
                        atomicAdd((float*)dX.ptr + (i64)bo * dX.stride[0] + (i64)(rQ ? grpC : grpB) * dX.stride[1] +
                                      (i64)rk * dX.stride[2] + (i64)t * dX.stride[3],
                                  v);
                    }
                }
            }
#elif SF_WRS
            static_assert(SF_NSUB >= 3, "SF_WRS: sub-chunk 0 uses hst slot 1");
            const int slot = sc > 0 ? sc - 1 : 1;
            __syncwarp();  // this warp's part of s.red complete
            s.hst[slot * SF_THREADS + tid] = warp_bc_sum(red, tid);
            __syncthreads();  // every warp's sums in s.hst
            {  // dB (rQ = 0) / dC (1) of step ri, state rk: the 4 warps' sums
                const float* cs = reinterpret_cast<const float*>(s.hst + slot * SF_THREADS);
                const float v = ((cs[tid] + cs[128 + tid]) + cs[256 + tid]) + cs[384 + tid];
                int to;  // opaque: the slot's (step, state) recomputed here, not kept live
                asm volatile("mov.b32 %0, %1;" : "=r"(to) : "r"(tid));
                const int rQ = to >> 6, rk = ((to >> 2) & 3) * 4 + (to & 3), ri = (to >> 4) & 3;
#else
            __syncthreads();  // s.red complete
            {  // dB (rQ = 0) / dC (1) of step ri, states rk: sum over the 32 channels
                const float* base = red + rQ * 32 * 64;
                float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
                for (int m = 0; m < 8; m++) {
                    const float4 v = *reinterpret_cast<const float4*>(base + red_idx(m * 4 + rr, rj));
                    acc[0] += v.x; acc[1] += v.y; acc[2] += v.z; acc[3] += v.w;
                }
                const float v = rs4(acc, rr);
#endif
#if !(SF_WRS && SF_PB > 1)
                const int t = t0 + ts + ri;
                if (rk < n && t < l) {
                    int bo;  // opaque: the 64-bit address is recomputed here, not kept live
                    asm volatile("mov.b32 %0, %1;" : "=r"(bo) : "r"(bi));
                    const Tensor4& dX = rQ ? p.dC : p.dB;
                    atomicAdd((float*)dX.ptr + (i64)bo * dX.stride[0] + (i64)(rQ ? grpC : grpB) * dX.stride[1] +
                                  (i64)rk * dX.stride[2] + (i64)t * dX.stride[3],
                              v);
                }
            }
#endif
        }
#if SF_OST
        // this quad's outputs of the chunk, staged in its rows: thread (ch, seg)
        // stores steps seg*8 .. seg*8+7
        __syncwarp();
        if (act) {
            const int tl = q * 8, t = t0 + tl;
            float v[8];
#pragma unroll
            for (int i = 0; i < 8; i++) v[i] = s.rows[R_Y * 32 * SF_T + rsw(ch, tl + i)];
            store8(v, p.du, row_off(p.du, bi, c), t, l);
#pragma unroll
            for (int i = 0; i < 8; i++) v[i] = s.rows[R_SP * 32 * SF_T + rsw(ch, tl + i)];
            store8(v, p.ddelta, row_off(p.ddelta, bi, c), t, l);
            if (DSM) {  // dΔbias: Σ dΔ over these steps (those below l)
                float dsum = 0.0f;
#pragma unroll
                for (int i = 0; i < 8; i++) dsum += t + i < l ? v[i] : 0.0f;
                s.acc[SF_THREADS + tid] += dsum;
            }
            if (p.dz.ptr) {
#pragma unroll
                for (int i = 0; i < 8; i++) v[i] = s.rows[R_GZ * 32 * SF_T + rsw(ch, tl + i)];
                store8(v, p.dz, row_off(p.dz, bi, c), t, l);
            }
        }
#endif
    }
    if (act && p.dinit.ptr) {
#pragma unroll
        for (int i = 0; i < 4; i++)
            if (4 * q + i < n)
                st_any((void*)p.dinit.ptr, p.dinit.dtype, row_off(p.dinit, bi, c) + (i64)(4 * q + i) * p.dinit.stride[2], r[i]);
    }
    if (act) {
#pragma unroll
        for (int i = 0; i < 4; i++)
            if (4 * q + i < n)
                atomicAdd((float*)p.dA.ptr + (i64)c * p.dA.stride[0] + (i64)(4 * q + i) * p.dA.stride[1], dA[i]);
    }
    if (DSM) {
        dD_acc = s.acc[tid];
        ddb_acc = s.acc[SF_THREADS + tid];
    }
    dD_acc += __shfl_xor_sync(SB_FULL, dD_acc, 1);
    dD_acc += __shfl_xor_sync(SB_FULL, dD_acc, 2);
    ddb_acc += __shfl_xor_sync(SB_FULL, ddb_acc, 1);
    ddb_acc += __shfl_xor_sync(SB_FULL, ddb_acc, 2);
    if (act && q == 0) {
        if (p.dD.ptr) atomicAdd((float*)p.dD.ptr + (i64)c * p.dD.stride[0], dD_acc);
        if (p.ddelta_bias.ptr) atomicAdd((float*)p.ddelta_bias.ptr + (i64)c * p.ddelta_bias.stride[0], ddb_acc);
    }
}

}  // namespace sbf

extern "C" __global__ void __launch_bounds__(SF_THREADS, SF_MINB)
selective_scan_bwd_fast(const __grid_constant__ ScanBwdParams p) { sbf::fast_entry<true>(p); }

// The same without the pre-pass, for a launch with the forward's checkpoints
// (p.ck_given = 1, p.scratch = the checkpoints; a launch without them poisons du).
extern "C" __global__ void __launch_bounds__(SF_THREADS, SF_MINB)
selective_scan_bwd_fast_ck(const __grid_constant__ ScanBwdParams p) { sbf::fast_entry<false>(p); }

// ----------------------------------------------------------------------------
// scan_bwd_zero: zero-fills up to 5 contiguous float32 buffers in one launch
// (the backward's atomically-added gradients dA, dB, dC, dD, dΔbias), instead
// of one fill per buffer. Any grid and block; 16-byte stores where a buffer is
// 16-byte aligned, scalar stores for the rest.
// ----------------------------------------------------------------------------
struct ScanBwdZeroParams {
    unsigned long long ptr[5];
    i64 n[5];  // elements (float32)
    int count;
    int _pad;
};

extern "C" __global__ void __launch_bounds__(256) scan_bwd_zero(const __grid_constant__ ScanBwdZeroParams p) {
    const i64 i0 = (i64)blockIdx.x * blockDim.x + threadIdx.x, step = (i64)gridDim.x * blockDim.x;
    for (int b = 0; b < p.count && b < 5; b++) {
        float* x = reinterpret_cast<float*>(p.ptr[b]);
        const i64 n = p.n[b];
        const i64 n4 = (p.ptr[b] & 15ull) == 0 ? n / 4 : 0;
        for (i64 i = i0; i < n4; i += step) reinterpret_cast<float4*>(x)[i] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        for (i64 i = 4 * n4 + i0; i < n; i += step) x[i] = 0.0f;
    }
}
