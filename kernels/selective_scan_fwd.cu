// selective_scan_fn forward (SPEC §1), float32 arithmetic, any strides.
//
// The host prepends common.cuh (ScanFwdParams, Tensor4, ld_any, ...); this
// file includes nothing. Compiled by NVRTC for the device's exact sm_XY.
//
// ============================================================================
// KERNELS AND LAUNCH CONFIGURATION (the host must follow this exactly)
// ============================================================================
// The only kernel argument is ScanFwdParams, by value. Suffix = dtype of
// u / delta / z / out (f32, f16, bf16); every other tensor may have any float
// dtype (A, B, C, D, delta_bias, initial_state: f32, f16, bf16 or f64, read
// with ld_any). last_state is written with st_any on its own dtype code
// (float32 per SPEC).
//
// 1. selective_scan_fwd_{f32,f16,bf16}            "fast" kernel
//    Use when ALL of:  1 <= n <= 16,
//                      groups_b >= 1 and groups_c >= 1 (B and C time-varying),
//                      for each of B, C:  groups == 1  or  (d / groups) % 64 == 0
//                      (no block of 64 channels straddles two groups).
//    grid  = (ceil(d / 64), b, 1)          (2 threads per channel, 64 channels per block)
//    block = (128, 1, 1)
//    dynamic shared memory = 0             (16 KB of static shared memory; below
//                                           48 KB, so no cudaFuncSetAttribute)
//    A block whose channels would straddle groups (host rule broken) writes
//    NaN to its outputs instead of a silently wrong answer.
//    [The 64 above is SCAN_THREADS / SCAN_FAST_P = 128 / 2; it changes only if
//     the knob SCAN_FAST_P is changed.]
//
// 2. selective_scan_fwd_{f32,f16,bf16}_general    every other case
//    Any n in 1..256, any B/C layout (constant (d, n), grouped, straddling
//    groups).
//    P     = smallest power of two >= ceil(n / 16)   (1, 2, 4, 8 or 16)
//    grid  = (ceil(d * P / 128), b, 1)               (128 / P channels per block)
//    block = (128, 1, 1)
//    dynamic shared memory = 0                       (no shared memory at all)
//
// 3. selective_scan_fwd_conv{4,8}_{f32,f16,bf16}     fast kernel, u from a conv
//    selective_scan_fwd_conv_{f32,f16,bf16}_general  general kernel, u from a conv
//    The only argument is scan::ConvScanFwdParams (ScanFwdParams s + the
//    conv's weight (d, w), bias (d,) or ptr 0, w, silu), mirrored in
//    src/cuda/conv_scan.rs. s.u holds x, the conv's input; u = act(bias +
//    sum_i weight[c, i] x[t - (w-1) + i]) (zeros before t = 0) is formed in
//    registers where the plain kernels load u (see "u from the conv" below).
//    Fast vs general, grid and block: exactly as 1. and 2., decided on s.
//    conv4 needs w <= 4, conv8 and the general kernel w <= 8.
//
// Limits the host checks: 1 <= n <= 256, l >= 1, b <= 65535 (grid.y), d >= 1.
// Nothing else: strides are arbitrary (in elements; stride[2] of
// u/delta/z/out is the l-stride; stride 0 broadcasts), and alignment and
// contiguity are checked in the kernel (16-byte vector accesses only where
// every row of a warp has l-stride 1 and 16-byte alignment, else a scalar
// path, slower but correct). All element offsets are 64-bit. out must not
// overlap any input.
//
// ============================================================================
// DESIGN (fast kernel); measurements on one H200, G1 = bf16 b8 d2048 n16 l2048
// ============================================================================
// * Each (batch, channel) is owned by SCAN_FAST_P = 2 adjacent lanes, each
//   keeping 8 of the 16 states h[k] (and A[c,k]*log2 e) in registers for the
//   whole sequence: independent FMA chains, no (b, d, l, n) intermediate, l
//   unbounded. Why 2 lanes and not 1: with one thread per channel, G1
//   (b*d = 16384) gives one warp per scheduler, and the in-order issue of a
//   single warp exposes every MUFU/LDS latency (ncu: 2.35 cycles per issued
//   instruction; 376 us). Two lanes double the warps (1 lane: 345-383 us,
//   2 lanes: 268 us, 4 lanes: 300 us). The per-step extras are split between
//   the two lanes rather than duplicated: each lane computes softplus(Δ) for
//   4 of every 8 steps (shared with shuffles), the z gate and the output of
//   its own 4 steps, and y is reduce-scattered with 4 shuffles per 8 steps.
// * B and C (the same for the whole block, since the block sits in one group)
//   are staged by the block into shared memory as float32 [t][16], SCAN_CHUNK
//   timesteps per buffer, double-buffered: the global loads of chunk i+1 are
//   issued into registers right after the barrier that publishes chunk i and
//   stored to the other buffer at the top of the next iteration, so one
//   __syncthreads per chunk suffices. The two lanes of a channel read the two
//   halves of a row (float4 loads, a broadcast to the warp, no conflicts).
// * u, delta, z are read 8 timesteps at a time (one 16-byte load of 8
//   bf16/f16, two for f32). The group loop is software-pipelined and
//   branch-free (one basic block per group of 8 steps): while group g
//   updates the states, u of g+1 and delta, z of g+2 are in flight and Δ and
//   the gate of g+1 are computed, so the softplus/silu MUFU chains and the
//   shuffles overlap the state updates (b1: 208 -> 158 us, G1 287 -> 268 us).
//   Each lane writes its 4 outputs with one 8-byte (16-bit) or 16-byte (f32)
//   store. Rows that are not contiguous and aligned, and the last l % 8
//   steps, run one step at a time with scalar loads.
// * exp(Δ·A) = 2^(Δ·A·log2 e) with A·log2 e precomputed: ex2.approx.ftz, one
//   MUFU op. SCAN_NPOLY of each lane's exps can instead use a Cody-Waite +
//   degree-5 polynomial on the FMA pipe (max rel. error 2.4e-7); measured
//   slower here (NPOLY 1: +5%, 2: +16%): the kernel is latency- and
//   issue-bound, not SFU-bound, so the default is 0.
// * Register arrays are indexed by compile-time constants only (the compile
//   check fails on any stack frame).
//
// Small b*d (e.g. b=1, d=16): only ceil(d/64)*b blocks run and most SMs
// idle. The fix is a chunked time split: cut l into S segments; pass 1 runs
// every segment from h=0 in parallel and keeps its end state and its total
// decay exp(A * sum Δ); a tiny pass combines the S segment states in order
// per (b, c, k) into each segment's true initial state; pass 2 reruns every
// segment from that state and writes out. That costs ~2x the exps but uses S
// times more threads, which wins whenever b*d*S/64 is well below the SM count.
// ============================================================================

#ifndef SCAN_THREADS
#define SCAN_THREADS 128  // block size; the launch formulas above assume 128
#endif
#ifndef SCAN_FAST_P
#define SCAN_FAST_P 2     // lanes per channel in the fast kernel: 1, 2 or 4
#endif
#ifndef SCAN_CHUNK
#define SCAN_CHUNK 64     // timesteps per staged B/C buffer; a multiple of 64
#endif
#ifndef SCAN_NPOLY
#define SCAN_NPOLY 0      // of each lane's 16/P exps per step, how many use the FMA pipe
#endif
#ifndef SCAN_MIN_BLOCKS
#define SCAN_MIN_BLOCKS 1 // __launch_bounds__ min blocks/SM (caps registers)
#endif
#ifndef SCAN_FAST_SOFTPLUS_16BIT
#define SCAN_FAST_SOFTPLUS_16BIT 1  // MUFU softplus for f16/bf16 I/O (rel. err <= ~1e-4)
#endif

#define SCAN_NS 16        // states per thread in the general kernel
#define SCAN_LOG2E 1.4426950408889634f
#define SCAN_LN2 0.6931471805599453f
#define SCAN_FULL 0xffffffffu

namespace scan {

// ----------------------------------------------------------------------------
// Math
// ----------------------------------------------------------------------------

__device__ __forceinline__ float ex2_mufu(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

__device__ __forceinline__ float lg2_mufu(float x) {
    float y;
    asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// 2^x on the FMA pipe: x = j + f with j = rint(x), f in [-0.5, 0.5];
// 2^f by a degree-5 minimax polynomial (max rel. error 2.4e-7 in float32,
// like MUFU.EX2); 2^j by adding j to the exponent field. x is clamped to
// [-125, 126] so the exponent never wraps (2^-125 instead of 0 is harmless
// here: it multiplies a state that has decayed to nothing anyway).
__device__ __forceinline__ float ex2_fma(float x) {
    x = fminf(fmaxf(x, -125.0f), 126.0f);
    const float magic = 12582912.0f;          // 1.5 * 2^23
    const float t = __fadd_rn(x, magic);      // rint(x) lands in t's low mantissa bits
    const float j = __fsub_rn(t, magic);
    const float f = __fsub_rn(x, j);
    float p = 1.327644452e-3f;
    p = fmaf(p, f, 9.675537236e-3f);
    p = fmaf(p, f, 5.550713465e-2f);
    p = fmaf(p, f, 2.402212024e-1f);
    p = fmaf(p, f, 6.931469440e-1f);
    p = fmaf(p, f, 1.000000119e+0f);
    // (bits of t) << 23 == j << 23 (mod 2^32): the high bits shift out.
    return __int_as_float(__float_as_int(p) + (__float_as_int(t) << 23));
}

// softplus with mamba_ssm's threshold: x if x > 20 else log1p(exp(x)).
template <bool FAST>
__device__ __forceinline__ float softplus(float x) {
    if (FAST) {
        // log1p(y) = ln2 * lg2(1 + y) + (y - ((1 + y) - 1)) / (1 + y): the
        // second term restores what rounding 1 + y lost (1/(1+y) ~ 2-(1+y)
        // is plenty for a correction term). Two MUFU ops.
        const float y = ex2_mufu(x * SCAN_LOG2E);
        const float w = 1.0f + y;
        const float r = fmaf(lg2_mufu(w), SCAN_LN2, (y - (w - 1.0f)) * (2.0f - w));
        return x > 20.0f ? x : r;
    }
    return x > 20.0f ? x : log1pf(__expf(x));
}

// z * sigmoid(z)
__device__ __forceinline__ float silu(float z) {
    return __fdividef(z, 1.0f + ex2_mufu(-z * SCAN_LOG2E));
}

// ----------------------------------------------------------------------------
// Element types of u / delta / z / out. A "row of 8" is kept as raw 32-bit
// words (4 for 16-bit types, 8 for f32) until it is used: converting right
// after the load would make the in-order warp wait for the load there, and
// raw prefetched data costs fewer registers.
// ----------------------------------------------------------------------------

template <int DT> struct IO;

template <> struct IO<DT_F32> {
    typedef float S;
    static const int W8 = 8;  // 32-bit words per 8 elements
    static __device__ __forceinline__ float get(const unsigned (&w)[W8], int j) {
        return __uint_as_float(w[j]);
    }
    static __device__ __forceinline__ unsigned pack2(float, float) { return 0; }  // unused
    static __device__ __forceinline__ float to_f(S v) { return v; }
    static __device__ __forceinline__ S from_f(float v) { return v; }
};

template <> struct IO<DT_BF16> {
    typedef u16 S;
    static const int W8 = 4;
    static __device__ __forceinline__ float get(const unsigned (&w)[W8], int j) {
        const unsigned v = w[j >> 1];
        return __uint_as_float((j & 1) ? (v & 0xffff0000u) : (v << 16));
    }
    static __device__ __forceinline__ unsigned pack2(float lo, float hi) {
        unsigned w;
        asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(w) : "f"(hi), "f"(lo));
        return w;
    }
    static __device__ __forceinline__ float to_f(S v) { return bf16_to_f32(v); }
    static __device__ __forceinline__ S from_f(float v) { return f32_to_bf16(v); }
};

template <> struct IO<DT_F16> {
    typedef u16 S;
    static const int W8 = 4;
    static __device__ __forceinline__ float get(const unsigned (&w)[W8], int j) {
        return f16_to_f32((u16)(w[j >> 1] >> ((j & 1) * 16)));
    }
    static __device__ __forceinline__ unsigned pack2(float lo, float hi) {
        unsigned w;
        asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(w) : "f"(hi), "f"(lo));
        return w;
    }
    static __device__ __forceinline__ float to_f(S v) { return f16_to_f32(v); }
    static __device__ __forceinline__ S from_f(float v) { return f32_to_f16(v); }
};

__device__ __forceinline__ bool aligned16(const void* p) {
    return (reinterpret_cast<unsigned long long>(p) & 15ull) == 0;
}

__device__ __forceinline__ uint4 ldg16(const void* p) {
    return __ldg(reinterpret_cast<const uint4*>(p));
}

// One row of a (b, d, l) tensor: element t is at ptr[t * stride].
template <int DT> struct Row {
    typedef typename IO<DT>::S E;
    E* ptr;
    i64 stride;
    bool vec;  // stride == 1 and ptr 16-byte aligned: vector accesses

    __device__ __forceinline__ void init(const Tensor4& x, int bi, int c) {
        ptr = (E*)x.ptr + (i64)bi * x.stride[0] + (i64)c * x.stride[1];
        stride = x.stride[2];
        vec = stride == 1 && aligned16(ptr);
    }

    // Elements t0 .. t0+7 with 16-byte loads (requires vec and t0 + 8 <= l).
    __device__ __forceinline__ void load8v(unsigned (&w)[IO<DT>::W8], int t0) const {
#pragma unroll
        for (int q = 0; q < IO<DT>::W8 / 4; q++) {
            const uint4 v = ldg16(ptr + t0 + (16 / sizeof(E)) * q);
            w[4 * q + 0] = v.x;
            w[4 * q + 1] = v.y;
            w[4 * q + 2] = v.z;
            w[4 * q + 3] = v.w;
        }
    }

    // Stores the S consecutive values y at t .. t+S-1 (requires vec; t a
    // multiple of S, so that the S * sizeof(E) bytes are aligned): one 4, 8
    // or 16-byte store, two for 32 bytes.
    template <int S>
    __device__ __forceinline__ void store_vec(const float (&y)[S], int t) const {
        const int WORDS = S * (int)sizeof(E) / 4;
        unsigned w[WORDS];
        if (sizeof(E) == 4) {
#pragma unroll
            for (int i = 0; i < S; i++) w[i] = __float_as_uint(y[i]);
        } else {
#pragma unroll
            for (int i = 0; i < S / 2; i++) w[i] = IO<DT>::pack2(y[2 * i], y[2 * i + 1]);
        }
        E* p = ptr + t;
        if (WORDS % 4 == 0) {
#pragma unroll
            for (int q = 0; q < WORDS / 4; q++)
                reinterpret_cast<uint4*>(p)[q] = make_uint4(w[4 * q], w[4 * q + 1], w[4 * q + 2], w[4 * q + 3]);
        } else if (WORDS == 2) {
            *reinterpret_cast<uint2*>(p) = make_uint2(w[0], w[1 % WORDS]);  // (1 % WORDS: in range when WORDS == 1)
        } else {
            *reinterpret_cast<unsigned*>(p) = w[0];
        }
    }
};

// ----------------------------------------------------------------------------
// B / C staging for the fast kernel: the block's (batch, group) slice of a
// (b, g, n, l) tensor, SCAN_CHUNK timesteps at a time, into shared memory as
// float32 [t][16] (states k >= n are zero).
//
// Thread mapping: vector v of thread tid covers state k = idx % 16 and the 8
// timesteps seg*8 .. seg*8+7 of the chunk, idx = v*SCAN_THREADS + tid,
// seg = idx / 16. A warp reads 16 states x 2 segments of 8 consecutive
// timesteps: every 32-byte sector it touches is used in full (bf16).
// ----------------------------------------------------------------------------

#define SCAN_VPT (SCAN_CHUNK * 16 / 8 / SCAN_THREADS)  // 8-element vectors per thread per tensor

struct Stage {
    const char* base;  // element (bi, group, 0, 0)
    i64 sk, st;        // strides (elements) of state and time
    int dtype;
    int fmt;           // raw format held in registers: 0 f32 bits, 1 f16 pairs, 2 bf16 pairs
    int esize;         // element size in bytes
    bool vec;          // 16-byte loads possible (st == 1, rows 16-byte aligned)

    __device__ __forceinline__ void init(const Tensor4& x, int bi, int grp) {
        dtype = x.dtype;
        esize = dtype == DT_F32 ? 4 : (dtype == DT_F64 ? 8 : 2);
        fmt = dtype == DT_F16 ? 1 : (dtype == DT_BF16 ? 2 : 0);
        base = (const char*)x.ptr + ((i64)bi * x.stride[0] + (i64)grp * x.stride[1]) * esize;
        sk = x.stride[2];
        st = x.stride[3];
        vec = st == 1 && dtype != DT_F64 && ((sk * esize) & 15) == 0 && aligned16(base);
    }

    // Raw words of states k, timesteps t .. t+7 (zeros past l or for k >= n).
    __device__ __forceinline__ void load(unsigned (&w)[8], int k, int t, int n, int l) const {
#pragma unroll
        for (int q = 0; q < 8; q++) w[q] = 0;
        if (k >= n) return;
        const char* p = base + (k * sk) * esize;
        if (vec && t + 8 <= l) {
            const uint4 a = ldg16(p + (i64)t * esize);
            w[0] = a.x; w[1] = a.y; w[2] = a.z; w[3] = a.w;
            if (esize == 4) {
                const uint4 b = ldg16(p + (i64)t * esize + 16);
                w[4] = b.x; w[5] = b.y; w[6] = b.z; w[7] = b.w;
            }
        } else if (fmt == 0) {
#pragma unroll
            for (int j = 0; j < 8; j++)
                if (t + j < l) w[j] = __float_as_uint(ld_any(p, dtype, (i64)(t + j) * st));
        } else {
#pragma unroll
            for (int j = 0; j < 8; j++)
                if (t + j < l) w[j >> 1] |= ((unsigned)((const u16*)p)[(i64)(t + j) * st]) << ((j & 1) * 16);
        }
    }

    // Converts raw words to float32 and writes them to s[(t_local + j) * 16 + k].
    __device__ __forceinline__ void store(float* s, const unsigned (&w)[8], int k, int t_local) const {
        float f[8];
        if (fmt == 0) {
#pragma unroll
            for (int j = 0; j < 8; j++) f[j] = __uint_as_float(w[j]);
        } else if (fmt == 2) {
#pragma unroll
            for (int j = 0; j < 8; j++)
                f[j] = __uint_as_float((j & 1) ? (w[j >> 1] & 0xffff0000u) : (w[j >> 1] << 16));
        } else {
#pragma unroll
            for (int j = 0; j < 8; j++) f[j] = f16_to_f32((u16)(w[j >> 1] >> ((j & 1) * 16)));
        }
#pragma unroll
        for (int j = 0; j < 8; j++) s[(t_local + j) * 16 + k] = f[j];
    }
};

// ----------------------------------------------------------------------------
// Per-channel constants (both kernels): A*log2e and the initial state of
// states kbase .. kbase+NS-1 (zeros where k >= n), D and delta_bias.
// ----------------------------------------------------------------------------

template <int NS>
__device__ __forceinline__ void load_channel(const ScanFwdParams& p, int bi, int c, int kbase,
                                             float (&A2)[NS], float (&h)[NS], float& Dv,
                                             float& bias) {
#pragma unroll
    for (int i = 0; i < NS; i++) {
        const int k = kbase + i;
        A2[i] = 0.0f;
        h[i] = 0.0f;
        if (k < p.n) {
            A2[i] = ld_any(p.A.ptr, p.A.dtype, (i64)c * p.A.stride[0] + (i64)k * p.A.stride[1]) *
                    SCAN_LOG2E;
            if (p.initial_state.ptr)
                h[i] = ld_any(p.initial_state.ptr, p.initial_state.dtype,
                              (i64)bi * p.initial_state.stride[0] +
                                  (i64)c * p.initial_state.stride[1] +
                                  (i64)k * p.initial_state.stride[2]);
        }
    }
    Dv = p.D.ptr ? ld_any(p.D.ptr, p.D.dtype, (i64)c * p.D.stride[0]) : 0.0f;
    bias = p.delta_bias.ptr
               ? ld_any(p.delta_bias.ptr, p.delta_bias.dtype, (i64)c * p.delta_bias.stride[0])
               : 0.0f;
}

template <int NS>
__device__ __forceinline__ void store_last_state(const ScanFwdParams& p, int bi, int c, int kbase,
                                                 const float (&h)[NS]) {
    if (!p.last_state.ptr) return;
#pragma unroll
    for (int i = 0; i < NS; i++) {
        const int k = kbase + i;
        if (k < p.n)
            st_any((void*)p.last_state.ptr, p.last_state.dtype,
                   (i64)bi * p.last_state.stride[0] + (i64)c * p.last_state.stride[1] +
                       (i64)k * p.last_state.stride[2],
                   h[i]);
    }
}

// ----------------------------------------------------------------------------
// Checkpoints (selective_scan_fwd_ck_*): the training forward also writes
// the state before every SCAN_CK_T-th step to ck, float32, contiguous
// (b, d, nck, n), nck = ceil(l / SCAN_CK_T): element (bi, c, j, k) = h before
// step SCAN_CK_T * j (j = 0: the initial state, zeros without one). The
// backward's fast kernel reads them instead of recomputing them (its 32-step
// chunks: SCAN_CK_T must equal SF_T in selective_scan_bwd.cu). The states are
// the very registers the forward carries, so they are bit for bit the ones the
// backward's own pre-pass would compute with the same arithmetic.
// ----------------------------------------------------------------------------

#define SCAN_CK_T 32
#ifndef SCAN_CK_PAIR
#define SCAN_CK_PAIR 1  // fast kernel, n = 16: the lane pair of a channel writes whole 32-byte sectors
#endif
// SCAN_CK_CS: checkpoint stores with the streaming cache hint (st.global.cs,
// evict first): the 64 MB of checkpoints at G2 no longer push u, Δ, z, B, C
// out of L2. H100, G2 shape (scan_fwd_ck_sweep.py): fwd_ck 0.3042 -> 0.2955 ms
// (plain forward 0.275; with no checkpoint stores at all: 0.2961), bitwise
// the same outputs.
#ifndef SCAN_CK_CS
#define SCAN_CK_CS 1
#endif
__device__ __forceinline__ void ck_st4(float* q, float4 v) {
#if SCAN_CK_CS
    __stcs(reinterpret_cast<float4*>(q), v);
#else
    *reinterpret_cast<float4*>(q) = v;
#endif
}

template <int NS>
struct CkRow {
    float* ptr;  // element (bi, c, 0, kbase)
    int n, nck, nvalid;
    bool on;     // active lane with at least one state below n

    __device__ __forceinline__ void init(float* ck, const ScanFwdParams& p, int bi, int c, int kbase,
                                         bool active) {
        n = p.n;
        nck = (p.l + SCAN_CK_T - 1) / SCAN_CK_T;
        nvalid = p.n - kbase;
        on = active && nvalid > 0;
        ptr = ck + (((i64)bi * p.d + c) * nck) * p.n + kbase;
    }

    // h into checkpoint j (16-byte stores when the lane's NS states are all
    // valid and n is a multiple of 4: rows stay 16-byte aligned).
    __device__ __forceinline__ void store(const float (&h)[NS], int j) const {
        if (!on) return;
        float* q = ptr + (i64)j * n;
        if (nvalid >= NS && (n & 3) == 0) {
#pragma unroll
            for (int i = 0; i < NS; i += 4)
                ck_st4(q + i, make_float4(h[i], h[i + 1], h[i + 2], h[i + 3]));
        } else {
#pragma unroll
            for (int i = 0; i < NS; i++)
                if (i < nvalid) q[i] = h[i];
        }
    }

    // The fast kernel's store (NS = 8, lane pair sub = 0, 1 of a channel; all
    // lanes of the warp call it). For n = 16 the pair swaps half of its
    // states so that each of its two 16-byte stores fills one whole 32-byte
    // sector with the partner (lane 0: states 0-3, then 8-11; lane 1: 4-7,
    // then 12-15): 16 full sectors per warp store instead of 32 halves.
    __device__ __forceinline__ void store_pair(const float (&h)[NS], int j, int sub) const {
#ifdef SCAN_CK_DIAG  // timing diagnostic only: no checkpoint written (wrong results)
        return;
#endif
        if (SCAN_CK_PAIR && NS == 8 && n == 16) {
            float x[4];
#pragma unroll
            for (int i = 0; i < 4; i++) x[i] = __shfl_xor_sync(SCAN_FULL, sub ? h[i] : h[4 + i], 1);
            if (!on) return;
            float* q = ptr + (i64)j * n;
            const float4 lo = sub ? make_float4(x[0], x[1], x[2], x[3]) : make_float4(h[0], h[1], h[2], h[3]);
            const float4 hi = sub ? make_float4(h[4], h[5], h[6], h[7]) : make_float4(x[0], x[1], x[2], x[3]);
            ck_st4(q + (sub ? -4 : 0), lo);
            ck_st4(q + (sub ? 4 : 8), hi);
        } else {
            store(h, j);
        }
    }
};

// ----------------------------------------------------------------------------
// Fast kernel: P lanes per channel, NS = 16/P states per lane, each lane
// owning FS = 8/P of every group of 8 steps for the per-step extras.
// ----------------------------------------------------------------------------

#define FP SCAN_FAST_P
#define FNS (16 / SCAN_FAST_P)
#define FS (8 / SCAN_FAST_P)
#define FCPB (SCAN_THREADS / SCAN_FAST_P)  // channels per block

// Element sub*FS + i of a raw row (the lane's own steps): P-1 selects.
template <int DT>
__device__ __forceinline__ float own_elem(const unsigned (&w)[IO<DT>::W8], int sub, int i) {
    float v = IO<DT>::get(w, i);
#pragma unroll
    for (int q = 1; q < FP; q++) v = (sub == q) ? IO<DT>::get(w, q * FS + i) : v;
    return v;
}

// a if flag else b, computing both: an asm select the compiler cannot turn
// into a branch (a branch would end the basic block and with it the overlap
// of this work with the state updates around it).
__device__ __forceinline__ float select(bool flag, float a, float b) {
    float r;
    asm("{ .reg .pred p; setp.ne.s32 p, %3, 0; selp.f32 %0, %1, %2, p; }"
        : "=f"(r) : "f"(a), "f"(b), "r"((int)flag));
    return r;
}

// Δ of all 8 steps of a group (each lane computes the softplus of its own FS
// steps; shuffles share them) and the z gate of the lane's own steps.
// Branch-free: both options are computed and selected (a few wasted
// instructions when an option is off).
template <int DT>
__device__ __forceinline__ void prep(float (&dt)[8], float (&gate)[FS],
                                     const unsigned (&rd)[IO<DT>::W8],
                                     const unsigned (&rz)[IO<DT>::W8], int sub, float bias,
                                     bool do_softplus, bool has_z) {
    const bool fast_sp = SCAN_FAST_SOFTPLUS_16BIT && DT != DT_F32;
    float v[FS];
#pragma unroll
    for (int i = 0; i < FS; i++) {
        const float x = own_elem<DT>(rd, sub, i) + bias;
        v[i] = select(do_softplus, softplus<fast_sp>(x), x);
        gate[i] = select(has_z, silu(own_elem<DT>(rz, sub, i)), 1.0f);
    }
#pragma unroll
    for (int j = 0; j < 8; j++)
        dt[j] = (FP == 1) ? v[j % FS] : __shfl_sync(SCAN_FULL, v[j % FS], j / FS, FP);
}

// The lane's part of one step: updates its FNS states and returns their
// part of sum_k C[k] h[k]. sB / sC: the lane's slice of the staged rows.
__device__ __forceinline__ float step(float dt, float uu, float (&h)[FNS], const float (&A2)[FNS],
                                      const float* __restrict__ sB, const float* __restrict__ sC) {
    const float du = dt * uu;
    float Bv[FNS], Cv[FNS];
#pragma unroll
    for (int q = 0; q < FNS / 4; q++) {
        const float4 b = reinterpret_cast<const float4*>(sB)[q];
        const float4 c = reinterpret_cast<const float4*>(sC)[q];
        Bv[4 * q] = b.x; Bv[4 * q + 1] = b.y; Bv[4 * q + 2] = b.z; Bv[4 * q + 3] = b.w;
        Cv[4 * q] = c.x; Cv[4 * q + 1] = c.y; Cv[4 * q + 2] = c.z; Cv[4 * q + 3] = c.w;
    }
    float y0 = 0.0f, y1 = 0.0f;  // two partial sums: shorter dependency chains
#pragma unroll
    for (int k = 0; k < FNS; k++) {
        const float x = dt * A2[k];
        const float dA = (k < SCAN_NPOLY) ? ex2_fma(x) : ex2_mufu(x);
        h[k] = fmaf(dA, h[k], Bv[k] * du);
        if (k & 1) y1 = fmaf(Cv[k], h[k], y1);
        else y0 = fmaf(Cv[k], h[k], y0);
    }
    return y0 + y1;
}

// y[j] holds this lane's part of step j; returns in own[i] the channel's full
// sum for the lane's own step sub*FS + i.
__device__ __forceinline__ void reduce_scatter(float (&y)[8], float (&own)[FS], int sub) {
    if (FP == 1) {
#pragma unroll
        for (int i = 0; i < FS; i++) own[i] = y[i];
    } else if (FP == 2) {  // send the partner its steps, keep mine: FS shuffles
#pragma unroll
        for (int i = 0; i < FS; i++) {
            const float send = sub ? y[i] : y[FS + i];
            const float keep = sub ? y[FS + i] : y[i];
            own[i] = keep + __shfl_xor_sync(SCAN_FULL, send, 1);
        }
    } else {  // all-reduce, then pick
#pragma unroll
        for (int j = 0; j < 8; j++)
#pragma unroll
            for (int o = 1; o < FP; o <<= 1) y[j] += __shfl_xor_sync(SCAN_FULL, y[j], o);
#pragma unroll
        for (int i = 0; i < FS; i++) {
            float v = y[i];
#pragma unroll
            for (int q = 1; q < FP; q++) v = (sub == q) ? y[q * FS + i] : v;
            own[i] = v;
        }
    }
}

struct SharedBC {
    float B[2][SCAN_CHUNK * 16];
    float C[2][SCAN_CHUNK * 16];
};

// Group of channel c for a tensor with g >= 1 groups.
__device__ __forceinline__ int group_of(int c, int d, int g) { return c / (d / g); }

// The host used the fast kernel where it does not apply: NaN, loudly, not a
// silently wrong answer.
__device__ __noinline__ void poison_block(const ScanFwdParams& p, int c0, int cpb) {
    const float nan = __int_as_float(0x7fc00000);
    for (int c = c0 + threadIdx.x; c < min(c0 + cpb, p.d); c += blockDim.x) {
        const i64 ob = (i64)blockIdx.y * p.out.stride[0] + (i64)c * p.out.stride[1];
        for (int t = 0; t < p.l; t++)
            st_any((void*)p.out.ptr, p.out.dtype, ob + (i64)t * p.out.stride[2], nan);
        if (p.last_state.ptr) {
            const i64 sb = (i64)blockIdx.y * p.last_state.stride[0] + (i64)c * p.last_state.stride[1];
            for (int k = 0; k < p.n; k++)
                st_any((void*)p.last_state.ptr, p.last_state.dtype, sb + (i64)k * p.last_state.stride[2], nan);
        }
    }
}

// ----------------------------------------------------------------------------
// "u from the conv" (conv_selective_scan_fn): the kernels below also run with
// u = act(bias + sum_m taps[m] * x[t - m]) (causal depthwise conv1d, act =
// SiLU or identity) computed where u is loaded, so the conv output never goes
// through global memory. p.u then holds x (same dtype and shape as u). Each
// value is formed as causal_conv1d.cu forms it (same FMA order from the
// newest tap) and rounded to u's dtype, as the unfused causal_conv1d_fn ->
// selective_scan_fn pair would store and reload it. The SiLU is this file's
// silu() (ex2.approx and a fast divide, within ~2 ulp of the conv kernel's
// IEEE-divided one): an exact division compiles to a branch to a slow path,
// which splits the pipelined group loop's basic block (measured in SASS:
// inner loop 664 instructions with 4 CALLs vs 583 and no branch; the plain
// scan's is 531). So the fused result equals the unfused pair's to float32
// rounding of u, not bit for bit (the CPU's is bit for bit). KW = taps kept in
// registers (>= the conv width; taps past the width are zero); KW = 0 is the
// plain scan and compiles to exactly the code it was before.
// ----------------------------------------------------------------------------

struct ConvScanFwdParams {
    ScanFwdParams s;  // s.u = x, the conv's input (b, d, l)
    Tensor4 weight;   // (d, w), any float dtype
    Tensor4 bias;     // (d,), ptr 0 = none
    int w;            // conv width, 2 .. KW of the kernel launched
    int silu;         // 1: SiLU after the conv (causal_conv1d_fn's activation="silu")
    int _pad0, _pad1;
};

template <int KW>
struct ConvTaps {
    float v[KW > 0 ? KW : 1];  // v[m] = weight[c, w - 1 - m]: the weight of x[t - m]
    float bias;
    int silu;

    __device__ __forceinline__ void init(const ConvScanFwdParams* cp, int c) {
        const int h = cp->w - 1;
#pragma unroll
        for (int m = 0; m < KW; m++)
            v[m] = m <= h ? ld_any(cp->weight.ptr, cp->weight.dtype,
                                   (i64)c * cp->weight.stride[0] + (i64)(h - m) * cp->weight.stride[1])
                          : 0.0f;
        bias = cp->bias.ptr ? ld_any(cp->bias.ptr, cp->bias.dtype, (i64)c * cp->bias.stride[0]) : 0.0f;
        silu = cp->silu;
    }

    // The activation and the rounding to u's dtype of a conv sum z.
    template <int DT>
    __device__ __forceinline__ float finish(float z) const {
        const float a = silu ? scan::silu(z) : z;
        return IO<DT>::to_f(IO<DT>::from_f(a));
    }
};

// u of the 8 steps of a group from the raw x words of the group before
// (prev; zeros before t = 0) and of the group itself (cur).
template <int DT, int KW>
__device__ __forceinline__ void conv8(float (&u)[8], const unsigned (&prev)[IO<DT>::W8],
                                      const unsigned (&cur)[IO<DT>::W8], const ConvTaps<KW>& tp) {
    float x[16];
#pragma unroll
    for (int i = 0; i < 8; i++) {
        x[i] = IO<DT>::get(prev, i);
        x[8 + i] = IO<DT>::get(cur, i);
    }
#pragma unroll
    for (int j = 0; j < 8; j++) {
        float z = tp.bias;
#pragma unroll
        for (int m = 0; m < KW; m++) z = fmaf(tp.v[m], x[8 + j - m], z);
        u[j] = tp.template finish<DT>(z);
    }
}

// u at step t with scalar loads of x (the tail and non-vector paths).
template <int DT, int KW>
__device__ __forceinline__ float conv_at(const Row<DT>& r, int t, const ConvTaps<KW>& tp) {
    float z = tp.bias;
#pragma unroll
    for (int m = 0; m < KW; m++) {
        const int s = t - m;
        const float xv = s >= 0 ? IO<DT>::to_f(r.ptr[(i64)s * r.stride]) : 0.0f;
        z = fmaf(tp.v[m], xv, z);
    }
    return tp.template finish<DT>(z);
}

// u of the 8 steps of a group, the work split between the FP lanes of the
// channel: lane sub forms the FS steps sub*FS .. sub*FS+FS-1 (from its window
// of FS + KW - 1 inputs, picked by selects), rounds them to u's dtype (16-bit:
// one paired cvt per 2 values, the same round-to-nearest-even as
// f32_to_bf16 / f32_to_f16 for every non-NaN value) and the lanes share them
// with shuffles, as prep() shares Δ.
template <int DT, int KW>
__device__ __forceinline__ void conv8_split(float (&u)[8], const unsigned (&prev)[IO<DT>::W8],
                                            const unsigned (&cur)[IO<DT>::W8],
                                            const ConvTaps<KW>& tp, int sub) {
    float x[16];
#pragma unroll
    for (int i = 0; i < 8; i++) {
        x[i] = IO<DT>::get(prev, i);
        x[8 + i] = IO<DT>::get(cur, i);
    }
    const int NW = FS + KW - 1;  // the lane's inputs: x[8 + sub*FS - (KW-1) + k]
    float xs[NW];
#pragma unroll
    for (int k = 0; k < NW; k++) {
        float v = x[8 - (KW - 1) + k];
#pragma unroll
        for (int q = 1; q < FP; q++) v = (sub == q) ? x[8 + q * FS - (KW - 1) + k] : v;
        xs[k] = v;
    }
    float own[FS];
#pragma unroll
    for (int i = 0; i < FS; i++) {
        float z = tp.bias;
#pragma unroll
        for (int m = 0; m < KW; m++) z = fmaf(tp.v[m], xs[KW - 1 + i - m], z);
        own[i] = select(tp.silu, silu(z), z);  // branch-free
    }
    if (DT != DT_F32) {
#pragma unroll
        for (int i = 0; i + 1 < FS; i += 2) {
            const unsigned w[2] = {IO<DT>::pack2(own[i], own[i + 1]), 0u};
            unsigned ww[IO<DT>::W8];
#pragma unroll
            for (int q = 0; q < IO<DT>::W8; q++) ww[q] = q < 2 ? w[q] : 0u;
            own[i] = IO<DT>::get(ww, 0);
            own[i + 1] = IO<DT>::get(ww, 1);
        }
    }
#pragma unroll
    for (int j = 0; j < 8; j++)
        u[j] = (FP == 1) ? own[j % FS] : __shfl_sync(SCAN_FULL, own[j % FS], j / FS, FP);
}

// Element sub*FS + i of 8 floats (the lane's own steps).
__device__ __forceinline__ float own_f(const float (&u)[8], int sub, int i) {
    float v = u[i];
#pragma unroll
    for (int q = 1; q < FP; q++) v = (sub == q) ? u[q * FS + i] : v;
    return v;
}

template <int DT, int KW, bool CK = false>
__device__ __forceinline__ void fast_entry(const ScanFwdParams& p, const ConvScanFwdParams* cp,
                                           float* ck = nullptr) {
    __shared__ __align__(16) SharedBC sm;
    const int tid = threadIdx.x;
    const int bi = blockIdx.y;
    const int c0 = blockIdx.x * FCPB;
    const int c1 = min(c0 + FCPB, p.d) - 1;
    const bool ok = p.n >= 1 && p.n <= 16 && p.groups_b >= 1 && p.groups_c >= 1 &&
                    group_of(c0, p.d, p.groups_b) == group_of(c1, p.d, p.groups_b) &&
                    group_of(c0, p.d, p.groups_c) == group_of(c1, p.d, p.groups_c);
    if (!ok) {  // block-uniform
        poison_block(p, c0, FCPB);
        return;
    }
    const int sub = tid & (FP - 1);  // lane within the channel
    const int c_raw = c0 + tid / FP;
    const bool active = c_raw < p.d;
    const int c = active ? c_raw : p.d - 1;  // idle lanes read a valid channel, write nothing
    const int l = p.l, n = p.n;
    const bool has_z = p.z.ptr != 0;
    const bool do_softplus = p.softplus != 0;

    float A2[FNS], h[FNS], Dv, bias;
    load_channel<FNS>(p, bi, c, sub * FNS, A2, h, Dv, bias);
    ConvTaps<KW> tp;
    if (KW > 0) tp.init(cp, c);
    // CK: this lane's part of the channel's checkpoint row (see "Checkpoints")
    CkRow<FNS> ckr;
    if (CK) {
        ckr.init(ck, p, bi, c, sub * FNS, active);
        ckr.store(h, 0);
    }

    Row<DT> ru, rd, rz, ro;
    ru.init(p.u, bi, c);
    rd.init(p.delta, bi, c);
    rz.init(has_z ? p.z : p.u, bi, c);  // without z: never read
    ro.init(p.out, bi, c);

    Stage stB, stC;
    stB.init(p.B, bi, group_of(c0, p.d, p.groups_b));
    stC.init(p.C, bi, group_of(c0, p.d, p.groups_c));

    // staging: this thread's (k, first timestep) per vector
    int vk[SCAN_VPT], vt[SCAN_VPT];
#pragma unroll
    for (int v = 0; v < SCAN_VPT; v++) {
        const int idx = v * SCAN_THREADS + tid;
        vk[v] = idx & 15;
        vt[v] = (idx >> 4) * 8;
    }
    unsigned wB[SCAN_VPT][8], wC[SCAN_VPT][8];
#pragma unroll
    for (int v = 0; v < SCAN_VPT; v++) {  // chunk 0
        stB.load(wB[v], vk[v], vt[v], n, l);
        stC.load(wC[v], vk[v], vt[v], n, l);
    }

    // Steps [0, lfull) run in unrolled groups of 8 with 16-byte loads; the
    // rest (the last l % 8 steps, or every step when a row of this warp is
    // not contiguous and aligned) one at a time with scalar loads.
    const bool vec_all = __all_sync(SCAN_FULL, ru.vec && rd.vec && (!has_z || rz.vec) && ro.vec);
    const int lfull = vec_all ? (l & ~7) : 0;

    // The group loop is software-pipelined: while group g updates the
    // states, the loads of u for g+1 and of delta, z for g+2 are in flight,
    // and Δ / gate of g+1 are computed (from delta, z loaded a group
    // earlier), all in one basic block. Group loads are clamped to the last
    // full group, so they never need a branch or read past l.
    const int W = IO<DT>::W8;
    unsigned U[W], D1[W], Z1[W];
    float Dt[8], G[FS];
    // conv (KW > 0): U = raw x of the current group, X1 = of the next one,
    // Uf = u of the current group
    unsigned X1[W];
    float Uf[8];
    if (lfull > 0) {
        unsigned D0[W], Z0[W];
        ru.load8v(U, 0);
        rd.load8v(D0, 0);
        rz.load8v(Z0, 0);
        const int t1 = min(8, lfull - 8);
        rd.load8v(D1, t1);
        rz.load8v(Z1, t1);
        if (KW > 0) {
            ru.load8v(X1, t1);
            unsigned zero[W];
#pragma unroll
            for (int q = 0; q < W; q++) zero[q] = 0u;
            conv8<DT, KW>(Uf, zero, U, tp);
        }
        prep<DT>(Dt, G, D0, Z0, sub, bias, do_softplus, has_z);
    }

#pragma unroll 1
    for (int tb = 0; tb < l; tb += SCAN_CHUNK) {
        // Chunk tb: registers -> shared buffer `buf`. That buffer was last
        // read two chunks ago, before the barrier of the previous chunk.
        const int buf = (tb / SCAN_CHUNK) & 1;
#pragma unroll
        for (int v = 0; v < SCAN_VPT; v++) {
            stB.store(sm.B[buf], wB[v], vk[v], vt[v]);
            stC.store(sm.C[buf], wC[v], vk[v], vt[v]);
        }
        __syncthreads();
        if (tb + SCAN_CHUNK < l) {  // next chunk: in flight while this one computes
#pragma unroll
            for (int v = 0; v < SCAN_VPT; v++) {
                stB.load(wB[v], vk[v], tb + SCAN_CHUNK + vt[v], n, l);
                stC.load(wC[v], vk[v], tb + SCAN_CHUNK + vt[v], n, l);
            }
        }
        const int tend = min(tb + SCAN_CHUNK, l);
        const float* sB0 = sm.B[buf] + sub * FNS - tb * 16;  // lane's slice of row t: sB0 + 16 t
        const float* sC0 = sm.C[buf] + sub * FNS - tb * 16;

        const int gend = min(tend, lfull);
#pragma unroll 1
        for (int t0 = tb; t0 < gend; t0 += 8) {
            // loads for later groups (clamped, never past l)
            unsigned UN[W], DN[W], ZN[W];
            const int last = lfull - 8;
            ru.load8v(UN, min(t0 + (KW > 0 ? 16 : 8), last));  // conv: x two groups ahead
            rd.load8v(DN, min(t0 + 16, last));
            rz.load8v(ZN, min(t0 + 16, last));  // without z, rz reads u: harmless, keeps this branch-free

            // Δ and gate of the next group (from delta, z loaded a group ago),
            // written first so that their latency chains (MUFU, shuffles)
            // overlap with this group's state updates
            float DtN[8], GN[FS];
            prep<DT>(DtN, GN, D1, Z1, sub, bias, do_softplus, has_z);
            float UfN[8];  // conv: u of the next group (from x loaded a group ago)
            if (KW > 0) conv8_split<DT, KW>(UfN, U, X1, tp, sub);

            // the 8 steps of this group
            float y[8];
#pragma unroll
            for (int j = 0; j < 8; j++)
                y[j] = step(Dt[j], KW > 0 ? Uf[j] : IO<DT>::get(U, j), h, A2, sB0 + 16 * (t0 + j),
                            sC0 + 16 * (t0 + j));

            // output of this group: reduce over the lanes, + D u, gate, store
            float own[FS];
            reduce_scatter(y, own, sub);
#pragma unroll
            for (int i = 0; i < FS; i++)
                own[i] = fmaf(Dv, KW > 0 ? own_f(Uf, sub, i) : own_elem<DT>(U, sub, i), own[i]) * G[i];
            if (active) ro.template store_vec<FS>(own, t0 + sub * FS);

            // rotate the pipeline
#pragma unroll
            for (int j = 0; j < 8; j++) Dt[j] = DtN[j];
#pragma unroll
            for (int i = 0; i < FS; i++) G[i] = GN[i];
#pragma unroll
            for (int q = 0; q < W; q++) {
                U[q] = KW > 0 ? X1[q] : UN[q];
                if (KW > 0) X1[q] = UN[q];
                D1[q] = DN[q];
                Z1[q] = ZN[q];
            }
            if (KW > 0) {
#pragma unroll
                for (int j = 0; j < 8; j++) Uf[j] = UfN[j];
            }
            // CK: a checkpoint after every SCAN_CK_T steps (at the end of the
            // group's basic block; compiled out otherwise)
            if (CK && ((t0 + 8) % SCAN_CK_T) == 0 && t0 + 8 < l) ckr.store_pair(h, (t0 + 8) / SCAN_CK_T, sub);
        }

        // Steps past the full groups, one at a time (the next step's inputs
        // are loaded one step ahead).
        const int t1 = max(tb, lfull);
        if (t1 < tend) {
            const bool fast_sp = SCAN_FAST_SOFTPLUS_16BIT && DT != DT_F32;
            float nd = IO<DT>::to_f(rd.ptr[(i64)t1 * rd.stride]);
            float nu = KW > 0 ? conv_at<DT, KW>(ru, t1, tp) : IO<DT>::to_f(ru.ptr[(i64)t1 * ru.stride]);
            float nz = has_z ? IO<DT>::to_f(rz.ptr[(i64)t1 * rz.stride]) : 0.0f;
#pragma unroll 1
            for (int t = t1; t < tend; t++) {
                const float dl = nd, uu = nu, zz = nz;
                const int tn = min(t + 1, l - 1);
                nd = IO<DT>::to_f(rd.ptr[(i64)tn * rd.stride]);
                nu = KW > 0 ? conv_at<DT, KW>(ru, tn, tp) : IO<DT>::to_f(ru.ptr[(i64)tn * ru.stride]);
                if (has_z) nz = IO<DT>::to_f(rz.ptr[(i64)tn * rz.stride]);
                float dt = dl + bias;
                if (do_softplus) dt = softplus<fast_sp>(dt);
                float y = step(dt, uu, h, A2, sB0 + 16 * t, sC0 + 16 * t);
#pragma unroll
                for (int o = 1; o < FP; o <<= 1) y += __shfl_xor_sync(SCAN_FULL, y, o);
                y = fmaf(Dv, uu, y);
                if (has_z) y *= silu(zz);
                if (active && sub == 0) ro.ptr[(i64)t * ro.stride] = IO<DT>::from_f(y);
                if (CK && ((t + 1) % SCAN_CK_T) == 0 && t + 1 < l) ckr.store(h, (t + 1) / SCAN_CK_T);
            }
        }
    }
    if (active) store_last_state<FNS>(p, bi, c, sub * FNS, h);
}

// ----------------------------------------------------------------------------
// General kernel: P = 2^ceil(log2(ceil(n/16))) consecutive lanes per channel,
// each holding 16 states in registers; y is summed over the P lanes with
// shuffles. B and C are read per thread, either once (constant (d, n)) or at
// every step from global memory (grouped, any group layout). No shared memory.
// ----------------------------------------------------------------------------

// v[i] = element k = kbase + i of x at offset base + i * sk, zero for i >= nvalid.
__device__ __forceinline__ void load16(float (&v)[SCAN_NS], const void* ptr, int dtype, i64 base,
                                       i64 sk, int nvalid) {
    if (dtype == DT_F32) {
#pragma unroll
        for (int i = 0; i < SCAN_NS; i++)
            v[i] = i < nvalid ? ((const float*)ptr)[base + i * sk] : 0.0f;
    } else if (dtype == DT_BF16 || dtype == DT_F16) {
        u16 r[SCAN_NS];
#pragma unroll
        for (int i = 0; i < SCAN_NS; i++) r[i] = i < nvalid ? ((const u16*)ptr)[base + i * sk] : 0;
#pragma unroll
        for (int i = 0; i < SCAN_NS; i++)
            v[i] = dtype == DT_BF16 ? bf16_to_f32(r[i]) : f16_to_f32(r[i]);
    } else {
#pragma unroll
        for (int i = 0; i < SCAN_NS; i++)
            v[i] = i < nvalid ? (float)((const double*)ptr)[base + i * sk] : 0.0f;
    }
}

__device__ __forceinline__ int lanes_per_channel(int n) {
    const int q = (n + SCAN_NS - 1) / SCAN_NS;
    int P = 1;
    while (P < q) P <<= 1;
    return P;
}

template <int DT, int KW, bool CK = false>
__device__ __forceinline__ void general_entry(const ScanFwdParams& p, const ConvScanFwdParams* cp,
                                              float* ck = nullptr) {
    typedef typename IO<DT>::S S;
    const int P = lanes_per_channel(p.n);
    const int tid = threadIdx.x;
    const int sub = tid & (P - 1);
    const int c_raw = blockIdx.x * (SCAN_THREADS / P) + tid / P;
    const bool active = c_raw < p.d;
    const int c = active ? c_raw : p.d - 1;  // idle lanes still join the shuffles
    const int bi = blockIdx.y;
    const int l = p.l;
    const int kbase = sub * SCAN_NS;
    const int nvalid = p.n - kbase;  // this lane's states: min(nvalid, 16), maybe none
    const bool has_z = p.z.ptr != 0;
    const bool do_softplus = p.softplus != 0;
    const bool fast_sp = SCAN_FAST_SOFTPLUS_16BIT && DT != DT_F32;

    float A2[SCAN_NS], h[SCAN_NS], Dv, bias;
    load_channel<SCAN_NS>(p, bi, c, kbase, A2, h, Dv, bias);
    CkRow<SCAN_NS> ckr;
    if (CK) {
        ckr.init(ck, p, bi, c, kbase, active);
        ckr.store(h, 0);
    }
    ConvTaps<KW> tp;
    float xw[KW > 0 ? KW : 1];  // conv: xw[m] = x[t - m]
    if (KW > 0) {
        tp.init(cp, c);
#pragma unroll
        for (int m = 0; m < (KW > 0 ? KW : 1); m++) xw[m] = 0.0f;
    }

    // B, C: offset of element (bi, group, kbase, t=0) (constant: (c, kbase)),
    // and the time stride (0 when constant).
    const bool varB = p.groups_b >= 1, varC = p.groups_c >= 1;
    i64 offB = varB ? (i64)bi * p.B.stride[0] + (i64)group_of(c, p.d, p.groups_b) * p.B.stride[1]
                    : (i64)c * p.B.stride[1];
    i64 offC = varC ? (i64)bi * p.C.stride[0] + (i64)group_of(c, p.d, p.groups_c) * p.C.stride[1]
                    : (i64)c * p.C.stride[1];
    offB += (i64)kbase * p.B.stride[2];
    offC += (i64)kbase * p.C.stride[2];
    const i64 stB = varB ? p.B.stride[3] : 0, stC = varC ? p.C.stride[3] : 0;
    float Bv[SCAN_NS], Cv[SCAN_NS];

    const S* pu = (const S*)p.u.ptr + (i64)bi * p.u.stride[0] + (i64)c * p.u.stride[1];
    const S* pd = (const S*)p.delta.ptr + (i64)bi * p.delta.stride[0] + (i64)c * p.delta.stride[1];
    const S* pz = has_z ? (const S*)p.z.ptr + (i64)bi * p.z.stride[0] + (i64)c * p.z.stride[1] : pu;
    S* po = (S*)p.out.ptr + (i64)bi * p.out.stride[0] + (i64)c * p.out.stride[1];
    const i64 su = p.u.stride[2], sd = p.delta.stride[2], so = p.out.stride[2];
    const i64 sz = has_z ? p.z.stride[2] : 0;

#pragma unroll 1
    for (int t = 0; t < l; t++) {
        if (t == 0 || varB) load16(Bv, p.B.ptr, p.B.dtype, offB + (i64)t * stB, p.B.stride[2], nvalid);
        if (t == 0 || varC) load16(Cv, p.C.ptr, p.C.dtype, offC + (i64)t * stC, p.C.stride[2], nvalid);
        float dt = IO<DT>::to_f(pd[(i64)t * sd]) + bias;
        if (do_softplus) dt = softplus<fast_sp>(dt);
        float uu = IO<DT>::to_f(pu[(i64)t * su]);
        if (KW > 0) {  // uu is x[t]: shift it into the window, u = the conv's output
#pragma unroll
            for (int m = (KW > 0 ? KW : 1) - 1; m > 0; m--) xw[m] = xw[m - 1];
            xw[0] = uu;
            float z = tp.bias;
#pragma unroll
            for (int m = 0; m < KW; m++) z = fmaf(tp.v[m], xw[m], z);
            uu = tp.template finish<DT>(z);
        }
        const float du = dt * uu;
        float y0 = 0.0f, y1 = 0.0f;
#pragma unroll
        for (int i = 0; i < SCAN_NS; i++) {
            const float dA = ex2_mufu(dt * A2[i]);
            h[i] = fmaf(dA, h[i], Bv[i] * du);
            if (i & 1) y1 = fmaf(Cv[i], h[i], y1);
            else y0 = fmaf(Cv[i], h[i], y0);
        }
        float y = y0 + y1;
        for (int o = 1; o < P; o <<= 1) y += __shfl_xor_sync(0xffffffffu, y, o);
        if (active && sub == 0) {
            y = fmaf(Dv, uu, y);
            if (has_z) y *= silu(IO<DT>::to_f(pz[(i64)t * sz]));
            po[(i64)t * so] = IO<DT>::from_f(y);
        }
        if (CK && ((t + 1) % SCAN_CK_T) == 0 && t + 1 < l) ckr.store(h, (t + 1) / SCAN_CK_T);
    }
    if (active) store_last_state<SCAN_NS>(p, bi, c, kbase, h);
}

}  // namespace scan

// ----------------------------------------------------------------------------
// Entry points (names looked up by the host)
// ----------------------------------------------------------------------------

extern "C" __global__ void __launch_bounds__(SCAN_THREADS, SCAN_MIN_BLOCKS)
selective_scan_fwd_f32(const __grid_constant__ ScanFwdParams p) { scan::fast_entry<DT_F32, 0>(p, nullptr); }

extern "C" __global__ void __launch_bounds__(SCAN_THREADS, SCAN_MIN_BLOCKS)
selective_scan_fwd_f16(const __grid_constant__ ScanFwdParams p) { scan::fast_entry<DT_F16, 0>(p, nullptr); }

extern "C" __global__ void __launch_bounds__(SCAN_THREADS, SCAN_MIN_BLOCKS)
selective_scan_fwd_bf16(const __grid_constant__ ScanFwdParams p) { scan::fast_entry<DT_BF16, 0>(p, nullptr); }

extern "C" __global__ void __launch_bounds__(SCAN_THREADS, 1)
selective_scan_fwd_f32_general(const __grid_constant__ ScanFwdParams p) { scan::general_entry<DT_F32, 0>(p, nullptr); }

extern "C" __global__ void __launch_bounds__(SCAN_THREADS, 1)
selective_scan_fwd_f16_general(const __grid_constant__ ScanFwdParams p) { scan::general_entry<DT_F16, 0>(p, nullptr); }

extern "C" __global__ void __launch_bounds__(SCAN_THREADS, 1)
selective_scan_fwd_bf16_general(const __grid_constant__ ScanFwdParams p) { scan::general_entry<DT_BF16, 0>(p, nullptr); }

// conv_selective_scan_fn: u = act(conv(x)) computed in the kernel (p.s.u = x).
// Same launch rules as above, decided on p.s; _conv4 for widths <= 4, _conv8
// for widths <= 8; the general kernel takes any width <= 8.

extern "C" __global__ void __launch_bounds__(SCAN_THREADS, SCAN_MIN_BLOCKS)
selective_scan_fwd_conv4_f32(const __grid_constant__ scan::ConvScanFwdParams p) { scan::fast_entry<DT_F32, 4>(p.s, &p); }

extern "C" __global__ void __launch_bounds__(SCAN_THREADS, SCAN_MIN_BLOCKS)
selective_scan_fwd_conv8_f32(const __grid_constant__ scan::ConvScanFwdParams p) { scan::fast_entry<DT_F32, 8>(p.s, &p); }

extern "C" __global__ void __launch_bounds__(SCAN_THREADS, SCAN_MIN_BLOCKS)
selective_scan_fwd_conv4_f16(const __grid_constant__ scan::ConvScanFwdParams p) { scan::fast_entry<DT_F16, 4>(p.s, &p); }

extern "C" __global__ void __launch_bounds__(SCAN_THREADS, SCAN_MIN_BLOCKS)
selective_scan_fwd_conv8_f16(const __grid_constant__ scan::ConvScanFwdParams p) { scan::fast_entry<DT_F16, 8>(p.s, &p); }

extern "C" __global__ void __launch_bounds__(SCAN_THREADS, SCAN_MIN_BLOCKS)
selective_scan_fwd_conv4_bf16(const __grid_constant__ scan::ConvScanFwdParams p) { scan::fast_entry<DT_BF16, 4>(p.s, &p); }

extern "C" __global__ void __launch_bounds__(SCAN_THREADS, SCAN_MIN_BLOCKS)
selective_scan_fwd_conv8_bf16(const __grid_constant__ scan::ConvScanFwdParams p) { scan::fast_entry<DT_BF16, 8>(p.s, &p); }

extern "C" __global__ void __launch_bounds__(SCAN_THREADS, 1)
selective_scan_fwd_conv_f32_general(const __grid_constant__ scan::ConvScanFwdParams p) { scan::general_entry<DT_F32, 8>(p.s, &p); }

extern "C" __global__ void __launch_bounds__(SCAN_THREADS, 1)
selective_scan_fwd_conv_f16_general(const __grid_constant__ scan::ConvScanFwdParams p) { scan::general_entry<DT_F16, 8>(p.s, &p); }

extern "C" __global__ void __launch_bounds__(SCAN_THREADS, 1)
selective_scan_fwd_conv_bf16_general(const __grid_constant__ scan::ConvScanFwdParams p) { scan::general_entry<DT_BF16, 8>(p.s, &p); }

// Training forward with checkpoints (scan::CkRow): ScanFwdCkParams = the
// ScanFwdParams s + ck, a float32 contiguous (b, d, ceil(l / 32), n) buffer
// (mirrored in src/cuda/scan.rs). Fast vs general, grid and block: exactly
// as 1. and 2. above, decided on s.
struct ScanFwdCkParams {
    ScanFwdParams s;
    float* ck;
};

extern "C" __global__ void __launch_bounds__(SCAN_THREADS, SCAN_MIN_BLOCKS)
selective_scan_fwd_ck_f32(const __grid_constant__ ScanFwdCkParams p) { scan::fast_entry<DT_F32, 0, true>(p.s, nullptr, p.ck); }

extern "C" __global__ void __launch_bounds__(SCAN_THREADS, SCAN_MIN_BLOCKS)
selective_scan_fwd_ck_f16(const __grid_constant__ ScanFwdCkParams p) { scan::fast_entry<DT_F16, 0, true>(p.s, nullptr, p.ck); }

extern "C" __global__ void __launch_bounds__(SCAN_THREADS, SCAN_MIN_BLOCKS)
selective_scan_fwd_ck_bf16(const __grid_constant__ ScanFwdCkParams p) { scan::fast_entry<DT_BF16, 0, true>(p.s, nullptr, p.ck); }

extern "C" __global__ void __launch_bounds__(SCAN_THREADS, 1)
selective_scan_fwd_ck_f32_general(const __grid_constant__ ScanFwdCkParams p) { scan::general_entry<DT_F32, 0, true>(p.s, nullptr, p.ck); }

extern "C" __global__ void __launch_bounds__(SCAN_THREADS, 1)
selective_scan_fwd_ck_f16_general(const __grid_constant__ ScanFwdCkParams p) { scan::general_entry<DT_F16, 0, true>(p.s, nullptr, p.ck); }

extern "C" __global__ void __launch_bounds__(SCAN_THREADS, 1)
selective_scan_fwd_ck_bf16_general(const __grid_constant__ ScanFwdCkParams p) { scan::general_entry<DT_BF16, 0, true>(p.s, nullptr, p.ck); }
