// RMSNorm with a fused residual add, and SwiGLU: forward and backward
// (formulas in src/cpu/norm.rs). Every tensor is a (rows, cols) view: a
// Tensor4 with stride[0] = row stride, stride[1] = column stride, any dtype
// (ld_any / st_any), float32 arithmetic. Memory-bound; one CTA per row.
//
// Launch rules (src/cuda/norm.rs):
//   rms_norm_fwd:         grid (rows), block NORM_THREADS
//   rms_norm_bwd:         grid (nblk), block NORM_THREADS; CTA i takes rows
//                         i, i + nblk, ... and writes its dw/db partial sums
//                         to partial[i][0..h] / partial[i][h..2h]
//   rms_norm_bwd_reduce:  grid (ceil(h / 256)), block 256: dw, db = Σ_i partial[i]
//                         (a fixed order: deterministic)
//   swiglu_fwd/bwd:       grid (min(ceil(n / 256), 65535·8)), block 256, grid-stride

#define NORM_THREADS 256
// Columns per thread kept in registers by the backward (h ≤ 256·16 = 4096);
// wider rows keep their partial sums in the partial buffer instead.
#define NORM_MAXK 16

struct RmsNormParams {
    int rows, h;
    float eps;
    int _pad;
    Tensor4 x, res, w, b, out, res_out, rstd;  // res/b/res_out ptr 0: absent
};

struct RmsNormBwdParams {
    int rows, h, nblk, _pad;
    Tensor4 x, res, w, rstd, dy, dres_out, dx, dres;  // res/dres_out/dres ptr 0: absent
    Tensor4 partial;  // (nblk, 2h) float32
    Tensor4 dw, db;   // (h,) float32; db ptr 0: not wanted
};

struct SwiGluParams {
    int rows, cols;
    Tensor4 g, u, out, dy, du;  // dy ptr 0: forward (out = y); else out = dg
};

__device__ __forceinline__ float ld2(const Tensor4& t, i64 r, i64 c) {
    return ld_any(t.ptr, t.dtype, r * t.stride[0] + c * t.stride[1]);
}
__device__ __forceinline__ void st2(const Tensor4& t, i64 r, i64 c, float v) {
    st_any((void*)t.ptr, t.dtype, r * t.stride[0] + c * t.stride[1], v);
}

// Sum over the CTA; every thread gets the total. `sh` holds 32 floats.
__device__ __forceinline__ float cta_sum(float v, float* sh) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int w = threadIdx.x >> 5, ln = threadIdx.x & 31;
    __syncthreads();  // sh may still be read from a previous call
    if (ln == 0) sh[w] = v;
    __syncthreads();
    v = ln < (int)(blockDim.x >> 5) ? sh[ln] : 0.f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float row_in(const Tensor4& x, const Tensor4& res, i64 r, i64 c) {
    float s = ld2(x, r, c);
    if (res.ptr) s += ld2(res, r, c);
    return s;
}

extern "C" __global__ void __launch_bounds__(NORM_THREADS) rms_norm_fwd(RmsNormParams p) {
    __shared__ float sh[32];
    const i64 r = blockIdx.x;
    float ss = 0.f;
    for (int c = threadIdx.x; c < p.h; c += NORM_THREADS) {
        const float s = row_in(p.x, p.res, r, c);
        if (p.res_out.ptr) st2(p.res_out, r, c, s);
        ss = fmaf(s, s, ss);
    }
    ss = cta_sum(ss, sh);
    const float rstd = 1.f / sqrtf(ss / (float)p.h + p.eps);
    for (int c = threadIdx.x; c < p.h; c += NORM_THREADS) {
        const float s = row_in(p.x, p.res, r, c);
        float y = s * rstd * ld_any(p.w.ptr, p.w.dtype, c * p.w.stride[0]);
        if (p.b.ptr) y += ld_any(p.b.ptr, p.b.dtype, c * p.b.stride[0]);
        st2(p.out, r, c, y);
    }
    if (threadIdx.x == 0) st_any((void*)p.rstd.ptr, p.rstd.dtype, r * p.rstd.stride[0], rstd);
}

extern "C" __global__ void __launch_bounds__(NORM_THREADS) rms_norm_bwd(RmsNormBwdParams p) {
    __shared__ float sh[32];
    float* part = (float*)p.partial.ptr + (i64)blockIdx.x * p.partial.stride[0];
    const bool regs = p.h <= NORM_THREADS * NORM_MAXK;
    float dw[NORM_MAXK], db[NORM_MAXK];
#pragma unroll
    for (int k = 0; k < NORM_MAXK; k++) dw[k] = db[k] = 0.f;
    if (!regs)
        for (int c = threadIdx.x; c < p.h; c += NORM_THREADS) part[c] = part[p.h + c] = 0.f;
    for (i64 r = blockIdx.x; r < p.rows; r += p.nblk) {
        const float rstd = ld_any(p.rstd.ptr, p.rstd.dtype, r * p.rstd.stride[0]);
        float gs = 0.f;
#pragma unroll
        for (int k = 0; k < NORM_MAXK; k++) {
            const int c = threadIdx.x + k * NORM_THREADS;
            if (regs && c < p.h) {  // predicated, so dw/db stay in registers
                const float xn = row_in(p.x, p.res, r, c) * rstd;
                const float d = ld2(p.dy, r, c);
                gs = fmaf(d * ld_any(p.w.ptr, p.w.dtype, c * p.w.stride[0]), xn, gs);
                dw[k] = fmaf(d, xn, dw[k]);
                db[k] += d;
            }
        }
        if (!regs) {
            for (int c = threadIdx.x; c < p.h; c += NORM_THREADS) {
                const float xn = row_in(p.x, p.res, r, c) * rstd;
                const float d = ld2(p.dy, r, c);
                gs = fmaf(d * ld_any(p.w.ptr, p.w.dtype, c * p.w.stride[0]), xn, gs);
                part[c] = fmaf(d, xn, part[c]);
                part[p.h + c] += d;
            }
        }
        const float mean_gs = cta_sum(gs, sh) / (float)p.h;
        for (int c = threadIdx.x; c < p.h; c += NORM_THREADS) {
            const float xn = row_in(p.x, p.res, r, c) * rstd;
            const float g = ld2(p.dy, r, c) * ld_any(p.w.ptr, p.w.dtype, c * p.w.stride[0]);
            float ds = (g - xn * mean_gs) * rstd;
            if (p.dres_out.ptr) ds += ld2(p.dres_out, r, c);
            st2(p.dx, r, c, ds);
            if (p.dres.ptr) st2(p.dres, r, c, ds);
        }
    }
    if (regs) {
#pragma unroll
        for (int k = 0; k < NORM_MAXK; k++) {
            const int c = threadIdx.x + k * NORM_THREADS;
            if (c < p.h) {
                part[c] = dw[k];
                part[p.h + c] = db[k];
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(256) rms_norm_bwd_reduce(RmsNormBwdParams p) {
    const int c = blockIdx.x * 256 + threadIdx.x;
    if (c >= p.h) return;
    const float* part = (const float*)p.partial.ptr;
    float sw = 0.f, sb = 0.f;
    for (int i = 0; i < p.nblk; i++) {
        sw += part[(i64)i * p.partial.stride[0] + c];
        sb += part[(i64)i * p.partial.stride[0] + p.h + c];
    }
    st_any((void*)p.dw.ptr, p.dw.dtype, c * p.dw.stride[0], sw);
    if (p.db.ptr) st_any((void*)p.db.ptr, p.db.dtype, c * p.db.stride[0], sb);
}

__device__ __forceinline__ float sigmoidf_(float g) { return 1.f / (1.f + expf(-g)); }

extern "C" __global__ void __launch_bounds__(256) swiglu_fwd(SwiGluParams p) {
    const i64 n = (i64)p.rows * p.cols;
    for (i64 i = (i64)blockIdx.x * 256 + threadIdx.x; i < n; i += (i64)gridDim.x * 256) {
        const i64 r = i / p.cols, c = i - r * p.cols;
        const float g = ld2(p.g, r, c);
        st2(p.out, r, c, g * sigmoidf_(g) * ld2(p.u, r, c));
    }
}

extern "C" __global__ void __launch_bounds__(256) swiglu_bwd(SwiGluParams p) {
    const i64 n = (i64)p.rows * p.cols;
    for (i64 i = (i64)blockIdx.x * 256 + threadIdx.x; i < n; i += (i64)gridDim.x * 256) {
        const i64 r = i / p.cols, c = i - r * p.cols;
        const float g = ld2(p.g, r, c), u = ld2(p.u, r, c), dy = ld2(p.dy, r, c);
        const float sg = sigmoidf_(g), si = g * sg;
        st2(p.out, r, c, dy * u * fmaf(si, 1.f - sg, sg));
        st2(p.du, r, c, dy * si);
    }
}
