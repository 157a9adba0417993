// Rotary position embedding (NeoX style, over the whole head) for q and k in
// one launch: the attention input path of SlidingWindowAttention (SPEC §5).
//
// q (b, l, hq, hd), k (b, l, hk, hd) in any float dtype and any strides; the
// outputs qo, ko (same shapes) are written in the inputs' dtype. With
// half = hd / 2, x1 = x[..., i], x2 = x[..., i + half] and the angle
// a = float(pos[t]) · inv[i] (float32, the same rounding as the torch
// formula): out1 = x1·cos a − x2·sin a, out2 = x2·cos a + x1·sin a.
// conj = 1 rotates by −a (the backward: the transpose of a rotation).
// pos: (l,) int64 or int32; inv: (half,) float32. One thread per (row, i) pair.

struct RotaryParams {
    int b, l, hq, hk;
    int hd, conj, _pad0, _pad1;
    Tensor4 q, k, qo, ko;
    Tensor4 pos, inv;
};

extern "C" __global__ void __launch_bounds__(256) rotary_qk(RotaryParams p) {
    const int half = p.hd >> 1, heads = p.hq + p.hk;
    const i64 n = (i64)p.b * p.l * heads * half;
    const float* inv = (const float*)p.inv.ptr;
    for (i64 idx = (i64)blockIdx.x * 256 + threadIdx.x; idx < n; idx += (i64)gridDim.x * 256) {
        const i64 row = idx / half;
        const int i = (int)(idx - row * half);
        const int h = (int)(row % heads);
        const i64 bt = row / heads;
        const int t = (int)(bt % p.l), bb = (int)(bt / p.l);
        const bool isq = h < p.hq;
        const Tensor4 x = isq ? p.q : p.k, o = isq ? p.qo : p.ko;
        const int hh = isq ? h : h - p.hq;
        const i64 xb = bb * x.stride[0] + t * x.stride[1] + hh * x.stride[2];
        const i64 ob = bb * o.stride[0] + t * o.stride[1] + hh * o.stride[2];
        const float x1 = ld_any(x.ptr, x.dtype, xb + i * x.stride[3]);
        const float x2 = ld_any(x.ptr, x.dtype, xb + (i + half) * x.stride[3]);
        const float a = __fmul_rn((float)ld_index(p.pos.ptr, p.pos.dtype, t * p.pos.stride[0]), inv[i * p.inv.stride[0]]);
        // Reduce a to [−π, π] in double (exact enough for any int32 position),
        // then the fast sin/cos (abs error ~2^-21 there; no local-memory slow path).
        const double ad = (double)a;
        const float r = (float)(ad - rint(ad * 0.15915494309189535) * 6.283185307179586);
        float s, c;
        __sincosf(r, &s, &c);
        if (p.conj) s = -s;
        st_any((void*)o.ptr, o.dtype, ob + i * o.stride[3], __fsub_rn(__fmul_rn(x1, c), __fmul_rn(x2, s)));
        st_any((void*)o.ptr, o.dtype, ob + (i + half) * o.stride[3],
               __fadd_rn(__fmul_rn(x2, c), __fmul_rn(x1, s)));
    }
}
