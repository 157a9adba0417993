// causal_conv1d_fn forward / backward and causal_conv1d_update (SPEC §2),
// float32 arithmetic, any strides, any float dtype per tensor (ld_any/st_any).
//
// The host prepends common.cuh; this file declares its own parameter struct,
// mirrored by ConvParams in src/cuda/conv1d.rs.
//
// ============================================================================
// KERNELS AND LAUNCH CONFIGURATION (the host must follow this exactly)
// ============================================================================
// causal_conv1d_fwd3_{f32,f16,bf16}: the forward the host uses for the usual
//   contiguous layout (its rules at the kernel, below); causal_conv1d_fwd2 otherwise.
// causal_conv1d_fwd2 (the general forward)
//   grid  = (ceil(l / (CV_THREADS * CV_T * CV_SEGS)), d, b) = (ceil(l / 2048), d, b)
//   block = (128, 1, 1), no shared memory. Each thread computes CV_SEGS
//   segments of 8 steps, CV_THREADS segments apart; the halo of a segment
//   comes from the previous lane (shuffles), lane 0 loads its own.
// causal_conv1d_fwd (first version, kept for comparison), causal_conv1d_bwd
//   grid  = (ceil(l / (CV_THREADS * CV_T)), d, b)   (d <= 65535, b <= 65535)
//   block = (CV_THREADS = 128, 1, 1), no shared memory (bwd: 1 KB static)
//   Each thread owns CV_T = 8 consecutive timesteps of one (batch, channel)
//   row and reads the 8 before (and, backward, the 8 after) as its halo:
//   16-byte vector loads where the row has l-stride 1 and is aligned, else
//   scalar loads (channel-last x: correct, slower).
//   bwd: the host zero-fills dweight and dbias (float32; atomics, one per
//   block and value).
// causal_conv1d_update
//   grid = (ceil(d / 128), b, 1), block = (128, 1, 1): one thread per
//   (batch, channel) row, sequential over the l_new new inputs; the state
//   row is updated in place by its own thread.
// w: 2..8.
// ============================================================================

#define CV_THREADS 128
#define CV_T 8
#define CV_FULL 0xffffffffu
#define CV_SEGS 2  // causal_conv1d_fwd2: segments of 8 steps per thread (4, with 64-thread
                   // blocks: 0.134 ms at G4 against 0.120 ms)

struct ConvParams {
    int b, d, l, w;
    int silu;        // apply x * sigmoid(x)
    int state_len;   // update: conv_state's last dimension
    int _pad0, _pad1;
    Tensor4 x, weight, bias, init, out, fin;       // forward (fin: final_states, ptr 0 = not asked)
    Tensor4 dout, dfin, dx, dweight, dbias, dinit;  // backward (dweight, dbias float32)
    Tensor4 state, seqlens;                         // update (seqlens: int32/int64, ptr 0 = none)
};

namespace cv {

// Fast reciprocal (MUFU): the IEEE division was ~a third of the forward's
// instructions (ncu at G4: SM 72% busy, DRAM 34%). Relative error ~1e-7.
__device__ __forceinline__ float sigm(float z) { return __fdividef(1.0f, 1.0f + __expf(-z)); }

__device__ __forceinline__ bool aligned16(const void* p) {
    return (reinterpret_cast<unsigned long long>(p) & 15ull) == 0;
}

// Element t of row (bi, c) of x extended to the left by initial_states:
// t < 0 reads init[bi, c, t + h] (0 without init); t >= l reads 0.
__device__ __forceinline__ float xpad(const ConvParams& p, int bi, int c, int t, int h) {
    if (t >= p.l) return 0.0f;
    if (t >= 0)
        return ld_any(p.x.ptr, p.x.dtype,
                      (i64)bi * p.x.stride[0] + (i64)c * p.x.stride[1] + (i64)t * p.x.stride[2]);
    if (!p.init.ptr || t + h < 0) return 0.0f;
    return ld_any(p.init.ptr, p.init.dtype,
                  (i64)bi * p.init.stride[0] + (i64)c * p.init.stride[1] + (i64)(t + h) * p.init.stride[2]);
}

// v[0..8) = elements t0 .. t0+7 of a (b, d, l) row (x with its left
// extension when `pad`), zero past l: one or two 16-byte loads when the
// whole group lies in [0, l) of an l-contiguous, aligned row.
__device__ __forceinline__ void load8(float (&v)[8], const ConvParams& p, const Tensor4& X, int bi, int c,
                                      int t0, int h, bool pad) {
    const i64 base = (i64)bi * X.stride[0] + (i64)c * X.stride[1];
    const bool whole = t0 >= 0 && t0 + 8 <= p.l && X.stride[2] == 1;
    if (whole && X.dtype == DT_F32 && aligned16((const float*)X.ptr + base + t0)) {
        const float4* q = reinterpret_cast<const float4*>((const float*)X.ptr + base + t0);
        const float4 a = __ldg(q), b = __ldg(q + 1);
        v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
        v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
        return;
    }
    if (whole && (X.dtype == DT_BF16 || X.dtype == DT_F16) && aligned16((const u16*)X.ptr + base + t0)) {
        const uint4 a = __ldg(reinterpret_cast<const uint4*>((const u16*)X.ptr + base + t0));
        const unsigned wd[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
        for (int i = 0; i < 4; i++) {
            if (X.dtype == DT_BF16) {
                v[2 * i] = __uint_as_float(wd[i] << 16);
                v[2 * i + 1] = __uint_as_float(wd[i] & 0xffff0000u);
            } else {
                v[2 * i] = f16_to_f32((u16)(wd[i] & 0xffffu));
                v[2 * i + 1] = f16_to_f32((u16)(wd[i] >> 16));
            }
        }
        return;
    }
#pragma unroll
    for (int i = 0; i < 8; i++) {
        const int t = t0 + i;
        if (pad) {
            v[i] = xpad(p, bi, c, t, h);
        } else {
            v[i] = (t >= 0 && t < p.l) ? ld_any(X.ptr, X.dtype, base + (i64)t * X.stride[2]) : 0.0f;
        }
    }
}

// (lo, hi) -> packed bf16x2 (bf) or f16x2, round to nearest even.
__device__ __forceinline__ unsigned cvt2(bool bf, float lo, float hi) {
    unsigned r;
    if (bf)
        asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    else
        asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// Stores v[0..8) at t0 .. t0+7 of a (b, d, l) row (only t < l).
// PACK: the packed hardware conversion (the forward; the backward keeps the
// scalar one, which needs fewer registers there: no spill on sm_80).
template <bool PACK = false>
__device__ __forceinline__ void store8(const float (&v)[8], const ConvParams& p, const Tensor4& X, int bi,
                                       int c, int t0) {
    const i64 base = (i64)bi * X.stride[0] + (i64)c * X.stride[1];
    const bool whole = t0 + 8 <= p.l && X.stride[2] == 1;
    if (whole && (X.dtype == DT_BF16 || X.dtype == DT_F16) && aligned16((u16*)X.ptr + base + t0)) {
        const bool bf = X.dtype == DT_BF16;
        unsigned wd[4];
#pragma unroll
        for (int i = 0; i < 4; i++) {
            if (PACK) {
                wd[i] = cvt2(bf, v[2 * i], v[2 * i + 1]);
            } else {
                const u16 lo = bf ? f32_to_bf16(v[2 * i]) : f32_to_f16(v[2 * i]);
                const u16 hi = bf ? f32_to_bf16(v[2 * i + 1]) : f32_to_f16(v[2 * i + 1]);
                wd[i] = (unsigned)lo | ((unsigned)hi << 16);
            }
        }
        *reinterpret_cast<uint4*>((u16*)X.ptr + base + t0) = make_uint4(wd[0], wd[1], wd[2], wd[3]);
        return;
    }
    if (whole && X.dtype == DT_F32 && aligned16((float*)X.ptr + base + t0)) {
        float4* q = reinterpret_cast<float4*>((float*)X.ptr + base + t0);
        q[0] = make_float4(v[0], v[1], v[2], v[3]);
        q[1] = make_float4(v[4], v[5], v[6], v[7]);
        return;
    }
#pragma unroll
    for (int i = 0; i < 8; i++)
        if (t0 + i < p.l) st_any((void*)X.ptr, X.dtype, base + (i64)(t0 + i) * X.stride[2], v[i]);
}

// Taps in "lag" order: v[m] = weight[c, h - m] for m <= h, else 0 (the weight
// of the input m steps before the output's own step).
__device__ __forceinline__ void lag_taps(float (&v)[8], const ConvParams& p, int c) {
    const int h = p.w - 1;
#pragma unroll
    for (int m = 0; m < 8; m++)
        v[m] = m <= h ? ld_any(p.weight.ptr, p.weight.dtype, (i64)c * p.weight.stride[0] + (i64)(h - m) * p.weight.stride[1])
                      : 0.0f;
}

__device__ __forceinline__ float bias_of(const ConvParams& p, int c) {
    return p.bias.ptr ? ld_any(p.bias.ptr, p.bias.dtype, (i64)c * p.bias.stride[0]) : 0.0f;
}

__device__ __forceinline__ void fwd(const ConvParams& p) {
    const int bi = blockIdx.z, c = blockIdx.y, h = p.w - 1;
    const int t0 = (blockIdx.x * CV_THREADS + threadIdx.x) * CV_T;
    if (p.fin.ptr && blockIdx.x == 0 && threadIdx.x < h) {  // final_states = xpad[l .. l + h)
        const int k = threadIdx.x;
        st_any((void*)p.fin.ptr, p.fin.dtype,
               (i64)bi * p.fin.stride[0] + (i64)c * p.fin.stride[1] + (i64)k * p.fin.stride[2],
               xpad(p, bi, c, p.l - h + k, h));
    }
    if (t0 >= p.l) return;
    float win[16], v[8], w0[8], w1[8];
    load8(w0, p, p.x, bi, c, t0 - 8, h, true);
    load8(w1, p, p.x, bi, c, t0, h, true);
#pragma unroll
    for (int i = 0; i < 8; i++) {
        win[i] = w0[i];
        win[8 + i] = w1[i];
    }
    lag_taps(v, p, c);
    const float bias = bias_of(p, c);
    float o[8];
#pragma unroll
    for (int k = 0; k < 8; k++) {
        float z = bias;
#pragma unroll
        for (int m = 0; m < 8; m++) z = fmaf(v[m], win[8 + k - m], z);
        o[k] = p.silu ? z * sigm(z) : z;
    }
    store8(o, p, p.out, bi, c, t0);
}

// Forward, CV_SEGS segments of 8 steps per thread: segment k*CV_THREADS + tid
// of the block's run (consecutive lanes, consecutive segments: coalesced),
// taps and bias loaded once per thread, and the 7-step halo of each segment
// taken from the previous lane by shuffles (lane 0 loads its own).
// NT: taps evaluated (4 when w <= 4, else 8; the taps past w are zero), so
// the usual w = 4 does 4 FMAs and 3 halo shuffles per output, not 8 and 8.
template <int NT>
__device__ __forceinline__ void fwd2(const ConvParams& p) {
    const int bi = blockIdx.z, c = blockIdx.y, h = p.w - 1, lane = threadIdx.x & 31;
    if (p.fin.ptr && blockIdx.x == 0 && threadIdx.x < h) {  // final_states = xpad[l .. l + h)
        const int k = threadIdx.x;
        st_any((void*)p.fin.ptr, p.fin.dtype,
               (i64)bi * p.fin.stride[0] + (i64)c * p.fin.stride[1] + (i64)k * p.fin.stride[2],
               xpad(p, bi, c, p.l - h + k, h));
    }
    const int seg0 = blockIdx.x * CV_THREADS * CV_SEGS;
    if (seg0 * CV_T >= p.l) return;  // block-uniform
    float v[8];
    lag_taps(v, p, c);
    const float bias = bias_of(p, c);
    // Every segment's x is loaded before any is used (one memory round trip).
    float curs[CV_SEGS][8];
#pragma unroll
    for (int k = 0; k < CV_SEGS; k++) {
        const int t0 = (seg0 + k * CV_THREADS + threadIdx.x) * CV_T;
        if (t0 - (int)(lane * CV_T) < p.l) load8(curs[k], p, p.x, bi, c, t0, h, true);
    }
#pragma unroll
    for (int k = 0; k < CV_SEGS; k++) {
        const int t0 = (seg0 + k * CV_THREADS + threadIdx.x) * CV_T;
        if (t0 - (int)(lane * CV_T) >= p.l) break;  // the whole warp is past l (warp-uniform)
        float prev[8];
        const float (&cur)[8] = curs[k];
        // halo: the previous lane's elements (its cur), lane 0 loads them
#pragma unroll
        for (int i = 8 - NT; i < 8; i++) prev[i] = __shfl_up_sync(CV_FULL, cur[i], 1);
        if (lane == 0) load8(prev, p, p.x, bi, c, t0 - 8, h, true);
        if (t0 < p.l) {
            float o[8];
#pragma unroll
            for (int j = 0; j < 8; j++) {
                float z = bias;
#pragma unroll
                for (int m = 0; m < NT; m++) z = fmaf(v[m], j - m >= 0 ? cur[j - m] : prev[8 + j - m], z);
                o[j] = p.silu ? z * sigm(z) : z;
            }
            store8<true>(o, p, p.out, bi, c, t0);
        }
    }
}

__device__ __forceinline__ float block_sum(float v, float* sh) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(CV_FULL, v, o);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    __syncthreads();
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    float s = 0.0f;
    if (threadIdx.x == 0)
        for (int i = 0; i < CV_THREADS / 32; i++) s += sh[i];
    return s;  // valid in thread 0
}

__device__ __forceinline__ void bwd(const ConvParams& p) {
    __shared__ float sh[CV_THREADS / 32];
    const int bi = blockIdx.z, c = blockIdx.y, h = p.w - 1, l = p.l;
    const int t0 = (blockIdx.x * CV_THREADS + threadIdx.x) * CV_T;
    const bool live = t0 < l;
    const int ts = live ? t0 : 0;  // threads past l compute on a valid segment but add nothing
    // x over [t0-8, t0+16) (with the left extension), dout over [t0, t0+16)
    float xw[24], go[16], v[8], a0[8], a1[8], a2[8], g0[8], g1[8];
    load8(a0, p, p.x, bi, c, ts - 8, h, true);
    load8(a1, p, p.x, bi, c, ts, h, true);
    load8(a2, p, p.x, bi, c, ts + 8, h, true);
    load8(g0, p, p.dout, bi, c, ts, h, false);
    load8(g1, p, p.dout, bi, c, ts + 8, h, false);
#pragma unroll
    for (int i = 0; i < 8; i++) {
        xw[i] = a0[i];
        xw[8 + i] = a1[i];
        xw[16 + i] = a2[i];
        go[i] = g0[i];
        go[8 + i] = g1[i];
    }
    lag_taps(v, p, c);
    const float bias = bias_of(p, c);
    // g_s = dout_s * act'(z_s) for s = ts .. ts+15 (0 past l)
    float g[16];
#pragma unroll
    for (int k = 0; k < 16; k++) {
        float gk = go[k];
        if (p.silu) {
            float z = bias;
#pragma unroll
            for (int m = 0; m < 8; m++) z = fmaf(v[m], xw[8 + k - m], z);
            const float s = sigm(z);
            gk *= s * fmaf(z, 1.0f - s, 1.0f);
        }
        g[k] = ts + k < l ? gk : 0.0f;
    }
    // dx[t] = sum_m v[m] g[t + m] (+ dfinal where t + h >= l)
    float dx[8];
#pragma unroll
    for (int k = 0; k < 8; k++) {
        float a = 0.0f;
#pragma unroll
        for (int m = 0; m < 8; m++) a = fmaf(v[m], g[k + m], a);
        const int j = ts + k + h - l;  // index into dfinal when >= 0
        if (p.dfin.ptr && j >= 0 && j < h)
            a += ld_any(p.dfin.ptr, p.dfin.dtype,
                        (i64)bi * p.dfin.stride[0] + (i64)c * p.dfin.stride[1] + (i64)j * p.dfin.stride[2]);
        dx[k] = a;
    }
    if (live) store8(dx, p, p.dx, bi, c, t0);
    // dinitial_states[k] = sum_{s <= k} weight[k - s] g_s (+ dfinal[k - l] when k >= l)
    if (p.dinit.ptr && blockIdx.x == 0 && threadIdx.x == 0) {
#pragma unroll
        for (int k = 0; k < 7; k++) {
            if (k < h) {
                float a = 0.0f;
#pragma unroll
                for (int s = 0; s <= k; s++) {
                    // weight[c, k - s] = v[h - (k - s)]; written with compile-time
                    // indices over the possible h
                    const int i = k - s;
                    const float wt = ld_any(p.weight.ptr, p.weight.dtype,
                                            (i64)c * p.weight.stride[0] + (i64)i * p.weight.stride[1]);
                    a = fmaf(wt, g[s], a);
                }
                if (p.dfin.ptr && k >= l)
                    a += ld_any(p.dfin.ptr, p.dfin.dtype,
                                (i64)bi * p.dfin.stride[0] + (i64)c * p.dfin.stride[1] + (i64)(k - l) * p.dfin.stride[2]);
                st_any((void*)p.dinit.ptr, p.dinit.dtype,
                       (i64)bi * p.dinit.stride[0] + (i64)c * p.dinit.stride[1] + (i64)k * p.dinit.stride[2], a);
            }
        }
    }
    // dweight[c, h - m] += sum_s g_s x[s - m] and dbias[c] += sum_s g_s over the own steps
    float dv[8], db = 0.0f;
#pragma unroll
    for (int m = 0; m < 8; m++) dv[m] = 0.0f;
    if (live) {
#pragma unroll
        for (int k = 0; k < 8; k++) {
            db += g[k];
#pragma unroll
            for (int m = 0; m < 8; m++) dv[m] = fmaf(g[k], xw[8 + k - m], dv[m]);
        }
    }
    const float dbs = block_sum(db, sh);
    if (threadIdx.x == 0 && p.dbias.ptr) atomicAdd((float*)p.dbias.ptr + (i64)c * p.dbias.stride[0], dbs);
#pragma unroll
    for (int m = 0; m < 8; m++) {
        if (m <= h) {  // block-uniform
            const float s = block_sum(dv[m], sh);
            if (threadIdx.x == 0)
                atomicAdd((float*)p.dweight.ptr + (i64)c * p.dweight.stride[0] + (i64)(h - m) * p.dweight.stride[1], s);
        }
    }
}

// dst[di] = src[si]: a bit copy when the dtypes agree, else through float32.
__device__ __forceinline__ void copy_elem(const Tensor4& dst, i64 di, const Tensor4& src, i64 si) {
    if (dst.dtype == src.dtype) {
        switch (dst.dtype) {
            case DT_F64: ((double*)dst.ptr)[di] = ((const double*)src.ptr)[si]; return;
            case DT_F32: ((float*)dst.ptr)[di] = ((const float*)src.ptr)[si]; return;
            default: ((u16*)dst.ptr)[di] = ((const u16*)src.ptr)[si]; return;
        }
    }
    st_any((void*)dst.ptr, dst.dtype, di, ld_any(src.ptr, src.dtype, si));
}

__device__ __forceinline__ int wrap(i64 v, int n) {
    i64 r = v % n;
    return (int)(r < 0 ? r + n : r);
}

__device__ __forceinline__ void update(const ConvParams& p) {
    const int bi = blockIdx.y, c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= p.d) return;
    const int h = p.w - 1, sl = p.state_len, l = p.l;
    const Tensor4& S = p.state;
    const i64 sbase = (i64)bi * S.stride[0] + (i64)c * S.stride[1];
    const i64 pos = p.seqlens.ptr ? ld_index(p.seqlens.ptr, p.seqlens.dtype, (i64)bi * p.seqlens.stride[0]) : 0;
    // hist[m]: the input m steps before the current one once it is shifted in
    // (hist[0]: the current input). Before the first input, hist[m - 1] holds
    // the context value m steps back (the shift moves it to hist[m]).
    float hist[8], v[8];
#pragma unroll
    for (int m = 1; m < 8; m++) {
        float val = 0.0f;
        if (m <= h) {
            const int q = p.seqlens.ptr ? wrap(pos - m, sl) : sl - m;
            val = ld_any(S.ptr, S.dtype, sbase + (i64)q * S.stride[2]);
        }
        hist[m - 1] = val;
    }
    hist[7] = 0.0f;
    lag_taps(v, p, c);
    const float bias = bias_of(p, c);
    const i64 xb = (i64)bi * p.x.stride[0] + (i64)c * p.x.stride[1];
    const i64 ob = (i64)bi * p.out.stride[0] + (i64)c * p.out.stride[1];
    for (int t = 0; t < l; t++) {
#pragma unroll
        for (int m = 7; m > 0; m--) hist[m] = hist[m - 1];
        hist[0] = ld_any(p.x.ptr, p.x.dtype, xb + (i64)t * p.x.stride[2]);
        float z = bias;
#pragma unroll
        for (int m = 0; m < 8; m++) z = fmaf(v[m], hist[m], z);
        st_any((void*)p.out.ptr, p.out.dtype, ob + (i64)t * p.out.stride[2], p.silu ? z * sigm(z) : z);
    }
    // the state: shifted left by l and appended, or written circularly at pos
    if (!p.seqlens.ptr) {
        const int keep = sl > l ? sl - l : 0;
        for (int j = 0; j < keep; j++)
            copy_elem(S, sbase + (i64)j * S.stride[2], S, sbase + (i64)(j + l) * S.stride[2]);
        for (int j = keep; j < sl; j++)
            copy_elem(S, sbase + (i64)j * S.stride[2], p.x, xb + (i64)(l - (sl - j)) * p.x.stride[2]);
    } else {
        for (int t = 0; t < l; t++)
            copy_elem(S, sbase + (i64)wrap(pos + t, sl) * S.stride[2], p.x, xb + (i64)t * p.x.stride[2]);
    }
}


// ----------------------------------------------------------------------------
// causal_conv1d_fwd3_{f32,f16,bf16} (the forward the host uses when it can;
// else causal_conv1d_fwd2). Suffix = dtype of x and out (the same). Host rules:
//   x and out l-contiguous (stride[2] == 1), pointers and stride[0], stride[1]
//   multiples of 8 elements (16-byte aligned 8-step groups), l % 8 == 0,
//   w <= 4, no initial_states (init.ptr == 0); weight, bias, final_states any.
//   rows  = b * d (row r: batch r / d, channel r % d)
//   chunks = ceil(l / (256 * CV3_K)) per row; one warp per (row, chunk)
//   grid  = (ceil(rows * chunks / 4), 1, 1), block = (128, 1, 1), no smem.
// Lane j of a warp owns steps t0 = chunk_start + i * 256 + 8 j (i < CV3_K):
// every load of the warp is 512 contiguous bytes (16-bit dtypes), all CV3_K
// loads are issued first, and the 3-step halo of lane j comes from lane j-1
// by shuffles; lane 0 gets lane 31's of the previous iteration (one rotation
// per iteration) and loads its own only for the first. 4 FMAs + SiLU
// (ex2.approx + rcp.approx: 2 MUFU, 3 other instructions) per output.
// ----------------------------------------------------------------------------
#ifndef CV3_K
#define CV3_K 4  // iterations (8 steps per lane each) per warp
#endif
#ifndef CV3_SILU
#define CV3_SILU 0  // 16-bit outputs: 0 = ex2 + rcp, 1 = tanh.approx (one MUFU)
#endif

__device__ __forceinline__ float ex2_approx(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
__device__ __forceinline__ float rcp_approx(float x) {
    float y;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
__device__ __forceinline__ float tanh_approx(float x) {
    float y;
    asm("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
template <int DT>
__device__ __forceinline__ float silu_fast(float z) {
    if (CV3_SILU == 1 && DT != DT_F32) {
        const float h = 0.5f * z;
        return fmaf(h, tanh_approx(h), h);
    }
    return z * rcp_approx(1.0f + ex2_approx(-1.4426950408889634f * z));
}

// 8 steps as raw words: 16-bit dtypes in w[0..3], f32 in w[0..7].
template <int DT> struct Raw8 {
    uint4 a, b;
};
template <int DT>
__device__ __forceinline__ void ld8(Raw8<DT>& r, const void* base, i64 off) {
    if (DT == DT_F32) {
        const uint4* q = reinterpret_cast<const uint4*>((const float*)base + off);
        r.a = __ldg(q);
        r.b = __ldg(q + 1);
    } else {
        r.a = __ldg(reinterpret_cast<const uint4*>((const u16*)base + off));
    }
}
template <int DT>
__device__ __forceinline__ void unpack8(float (&v)[8], const Raw8<DT>& r) {
    if (DT == DT_F32) {
        v[0] = __uint_as_float(r.a.x); v[1] = __uint_as_float(r.a.y);
        v[2] = __uint_as_float(r.a.z); v[3] = __uint_as_float(r.a.w);
        v[4] = __uint_as_float(r.b.x); v[5] = __uint_as_float(r.b.y);
        v[6] = __uint_as_float(r.b.z); v[7] = __uint_as_float(r.b.w);
    } else {
        const unsigned wd[4] = {r.a.x, r.a.y, r.a.z, r.a.w};
#pragma unroll
        for (int i = 0; i < 4; i++) {
            if (DT == DT_BF16) {
                v[2 * i] = __uint_as_float(wd[i] << 16);
                v[2 * i + 1] = __uint_as_float(wd[i] & 0xffff0000u);
            } else {
                v[2 * i] = f16_to_f32((u16)(wd[i] & 0xffffu));
                v[2 * i + 1] = f16_to_f32((u16)(wd[i] >> 16));
            }
        }
    }
}
template <int DT>
__device__ __forceinline__ void st8(void* base, i64 off, const float (&o)[8]) {
    if (DT == DT_F32) {
        float4* q = reinterpret_cast<float4*>((float*)base + off);
        q[0] = make_float4(o[0], o[1], o[2], o[3]);
        q[1] = make_float4(o[4], o[5], o[6], o[7]);
    } else {
        const bool bf = DT == DT_BF16;
        *reinterpret_cast<uint4*>((u16*)base + off) =
            make_uint4(cvt2(bf, o[0], o[1]), cvt2(bf, o[2], o[3]), cvt2(bf, o[4], o[5]), cvt2(bf, o[6], o[7]));
    }
}

template <int DT>
__device__ __forceinline__ void fwd3(const ConvParams& p) {
    const int lane = threadIdx.x & 31;
    const int chunk_len = 256 * CV3_K;
    const int chunks = (p.l + chunk_len - 1) / chunk_len;
    // 32-bit index arithmetic: the host checks b * d * chunks < 2^31.
    const unsigned gw = blockIdx.x * (CV_THREADS / 32) + (threadIdx.x >> 5);
    const unsigned rowi = gw / (unsigned)chunks;
    if (rowi >= (unsigned)p.b * (unsigned)p.d) return;  // warp-uniform
    const int chunk = (int)(gw - rowi * chunks);
    const int bi = (int)(rowi / (unsigned)p.d), c = (int)(rowi - (unsigned)bi * p.d), h = p.w - 1;
    const i64 xb = (i64)bi * p.x.stride[0] + (i64)c * p.x.stride[1];
    const i64 ob = (i64)bi * p.out.stride[0] + (i64)c * p.out.stride[1];
    const int tbase = chunk * chunk_len + lane * 8;

    // every load first: CV3_K groups of 8 steps, lane 0's halo, taps, bias
    Raw8<DT> raw[CV3_K];
#pragma unroll
    for (int i = 0; i < CV3_K; i++) {
        const int t0 = tbase + i * 256;
        if (t0 < p.l) ld8<DT>(raw[i], p.x.ptr, xb + t0);
        else raw[i].a = raw[i].b = make_uint4(0u, 0u, 0u, 0u);
    }
    Raw8<DT> hraw;
    hraw.a = hraw.b = make_uint4(0u, 0u, 0u, 0u);
    if (lane == 0 && tbase > 0) ld8<DT>(hraw, p.x.ptr, xb + tbase - 8);
    float v[4];
#pragma unroll
    for (int m = 0; m < 4; m++)
        v[m] = m <= h ? ld_any(p.weight.ptr, p.weight.dtype, (i64)c * p.weight.stride[0] + (i64)(h - m) * p.weight.stride[1])
                      : 0.0f;
    const float bias = bias_of(p, c);
    if (p.fin.ptr && chunk == 0 && lane < h)  // final_states = x[l - h .. l)
        st_any((void*)p.fin.ptr, p.fin.dtype,
               (i64)bi * p.fin.stride[0] + (i64)c * p.fin.stride[1] + (i64)lane * p.fin.stride[2],
               xpad(p, bi, c, p.l - h + lane, h));

    float carry[8];
    unpack8<DT>(carry, hraw);  // lane 0: the 8 steps before its first group
#pragma unroll
    for (int i = 0; i < CV3_K; i++) {
        const int t0 = tbase + i * 256;
        if (t0 - lane * 8 >= p.l) continue;  // the whole warp is past l (warp-uniform)
        float cur[8];
        unpack8<DT>(cur, raw[i]);
        float prev[8];
#pragma unroll
        for (int j = 5; j < 8; j++) {
            const float rot = __shfl_sync(CV_FULL, cur[j], (lane + 31) & 31);
            prev[j] = lane == 0 ? carry[j] : rot;
            carry[j] = rot;  // lane 0 now holds lane 31's: its halo next iteration
        }
        if (t0 < p.l) {
            float o[8];
#pragma unroll
            for (int j = 0; j < 8; j++) {
                float z = bias;
#pragma unroll
                for (int m = 0; m < 4; m++) z = fmaf(v[m], j - m >= 0 ? cur[j - m] : prev[8 + j - m], z);
                o[j] = p.silu ? silu_fast<DT>(z) : z;
            }
            st8<DT>((void*)p.out.ptr, ob + t0, o);
        }
    }
}
}  // namespace cv

extern "C" __global__ void __launch_bounds__(CV_THREADS)
causal_conv1d_fwd(const __grid_constant__ ConvParams p) { cv::fwd(p); }

extern "C" __global__ void __launch_bounds__(CV_THREADS)
causal_conv1d_fwd2(const __grid_constant__ ConvParams p) {
    if (p.w <= 4)
        cv::fwd2<4>(p);
    else
        cv::fwd2<8>(p);
}

extern "C" __global__ void __launch_bounds__(CV_THREADS)
causal_conv1d_fwd3_f32(const __grid_constant__ ConvParams p) { cv::fwd3<DT_F32>(p); }

extern "C" __global__ void __launch_bounds__(CV_THREADS)
causal_conv1d_fwd3_f16(const __grid_constant__ ConvParams p) { cv::fwd3<DT_F16>(p); }

extern "C" __global__ void __launch_bounds__(CV_THREADS)
causal_conv1d_fwd3_bf16(const __grid_constant__ ConvParams p) { cv::fwd3<DT_BF16>(p); }

extern "C" __global__ void __launch_bounds__(CV_THREADS)
causal_conv1d_bwd(const __grid_constant__ ConvParams p) { cv::bwd(p); }

extern "C" __global__ void __launch_bounds__(128)
causal_conv1d_update(const __grid_constant__ ConvParams p) { cv::update(p); }
