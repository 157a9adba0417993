// Shared by every kernel: the host prepends this file to each kernel source
// before NVRTC compiles it (kernels include nothing, so no CUDA headers are
// needed at run time). The structs here are mirrored field for field by
// #[repr(C)] structs in src/cuda/ (keep both in step).

typedef unsigned short u16;
typedef long long i64;

// dtype codes, as in src/cuda/mod.rs
#define DT_F32 0
#define DT_F16 1
#define DT_BF16 2
#define DT_F64 3
#define DT_I32 4
#define DT_I64 5

__device__ __forceinline__ float bf16_to_f32(u16 v) { return __int_as_float(((unsigned)v) << 16); }
__device__ __forceinline__ u16 f32_to_bf16(float f) {
    unsigned u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u16)((u >> 16) | 0x40);  // NaN stays NaN
    u += 0x7fffu + ((u >> 16) & 1u);                                      // round to nearest even
    return (u16)(u >> 16);
}
__device__ __forceinline__ float f16_to_f32(u16 v) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v));
    return f;
}
__device__ __forceinline__ u16 f32_to_f16(float f) {
    u16 v;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(v) : "f"(f));
    return v;
}

// Load element `i` (in elements) of a tensor of run-time dtype as float32.
__device__ __forceinline__ float ld_any(const void* p, int dtype, i64 i) {
    switch (dtype) {
        case DT_F32: return ((const float*)p)[i];
        case DT_F16: return f16_to_f32(((const u16*)p)[i]);
        case DT_BF16: return bf16_to_f32(((const u16*)p)[i]);
        default: return (float)((const double*)p)[i];
    }
}
__device__ __forceinline__ i64 ld_index(const void* p, int dtype, i64 i) {
    return dtype == DT_I32 ? (i64)((const int*)p)[i] : ((const i64*)p)[i];
}
__device__ __forceinline__ void st_any(void* p, int dtype, i64 i, float v) {
    switch (dtype) {
        case DT_F32: ((float*)p)[i] = v; break;
        case DT_F16: ((u16*)p)[i] = f32_to_f16(v); break;
        case DT_BF16: ((u16*)p)[i] = f32_to_bf16(v); break;
        default: ((double*)p)[i] = (double)v; break;
    }
}

// A tensor argument: device pointer, dtype code, strides in elements.
// Unused dimensions have stride 0; an absent optional tensor has ptr == 0.
struct Tensor4 {
    const void* ptr;
    int dtype;
    int _pad;
    i64 stride[4];
};

// selective_scan_fn forward (SPEC §1). Shapes: u, delta, z, out (b, d, l);
// A (d, n); B, C as (b, g, n, l) with g = groups (the (b, n, l) layout is
// g = 1 with stride[1] = 0) or, when groups == 0, constant (d, n) with
// stride = {0, d-stride, n-stride, 0} indexed as [0][c][k][0];
// D, delta_bias (d,); initial_state, last_state (b, d, n), last_state float32.
struct ScanFwdParams {
    int b, d, l, n;
    int groups_b, groups_c;   // 0 = constant (d, n)
    int softplus;             // apply softplus (threshold 20) to delta + bias
    int _pad;
    Tensor4 u, delta, z, out; // z.ptr == 0: no gating; out is written
    Tensor4 A, B, C, D, delta_bias;
    Tensor4 initial_state, last_state;  // ptr == 0: zeros / not requested
};

// selective_state_update (SPEC §1). state (cache, d, n) updated in place;
// x, dt, z, out (b, d); A (d, n); B, C (b, g, n) with g = groups (the (b, n)
// layout is g = 1 with stride[1] = 0); D, dt_bias (d,);
// rows: int32/int64 (b,) state row per batch entry (negative: skip, out = 0;
// >= cache: out = NaN, state untouched, since the host cannot check device
// indices without a sync), or ptr == 0 for row = batch index.
struct StateUpdateParams {
    int b, d, n, cache;
    int groups_b, groups_c;
    int softplus;
    int _pad;
    Tensor4 state, x, dt, z, out;
    Tensor4 A, B, C, D, dt_bias;
    Tensor4 rows;
};

// Tensor-core helpers of the flash-attention kernels (sm_80+ PTX: cp.async,
// ldmatrix, mma.sync m16n8k16). Inline and unused elsewhere, so the other
// kernels compile as before. ldmatrix takes 32-bit shared-memory addresses:
// callers add compile-time byte offsets to a per-lane base computed once,
// which ptxas folds into the instruction.
namespace tc {

__device__ __forceinline__ unsigned smem_u32(const void* p) {
    unsigned r;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(r) : "l"(p));
    return r;
}
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src), "r"(bytes));
}
__device__ __forceinline__ void cp_async4(void* dst, const void* src) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(smem_u32(dst)), "l"(src));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

__device__ __forceinline__ void ldsm_x4(unsigned (&r)[4], unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_t(unsigned (&r)[4], unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

template <int DT> struct Mma;
template <> struct Mma<DT_BF16> {
    static __device__ __forceinline__ void run(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
            "{%8, %9}, {%0, %1, %2, %3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
    static __device__ __forceinline__ unsigned pack(float lo, float hi) {
        unsigned w;
        asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(w) : "f"(hi), "f"(lo));
        return w;
    }
    static __device__ __forceinline__ float ld(u16 v) { return bf16_to_f32(v); }
};
template <> struct Mma<DT_F16> {
    static __device__ __forceinline__ void run(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
            "{%8, %9}, {%0, %1, %2, %3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
    static __device__ __forceinline__ unsigned pack(float lo, float hi) {
        unsigned w;
        asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(w) : "f"(hi), "f"(lo));
        return w;
    }
    static __device__ __forceinline__ float ld(u16 v) { return f16_to_f32(v); }
};

// Masked keys must contribute nothing, whatever their bits: a P of 0 times a
// non-finite V (or dS of 0 times a non-finite K) is NaN, so the attention
// kernels look for ±inf/NaN in the K/V tiles that the mask cuts (edge tiles
// only) and clean them. Bit tests on pairs of 16-bit floats (exponent all ones).
template <int DT>
__device__ __forceinline__ bool nonfinite2(unsigned w) {
    constexpr unsigned E = DT == DT_BF16 ? 0x7f80u : 0x7c00u;
    return (w & E) == E || ((w >> 16) & E) == E;
}
// The pair with each non-finite half replaced by +0.
template <int DT>
__device__ __forceinline__ unsigned clean2(unsigned w) {
    constexpr unsigned E = DT == DT_BF16 ? 0x7f80u : 0x7c00u;
    const unsigned lo = (w & E) == E ? 0u : (w & 0xffffu);
    const unsigned hi = ((w >> 16) & E) == E ? 0u : (w >> 16);
    return lo | (hi << 16);
}
__device__ __forceinline__ bool nonfinite(float x) { return (__float_as_uint(x) & 0x7f800000u) == 0x7f800000u; }
// Whether rows 0..ROWS-1, columns 0..HD-1 of a shared tile (row stride HD + 8
// elements) hold a non-finite value; thread `tid` of NT checks its 16-byte chunks.
template <int DT, int ROWS, int HD, int NT>
__device__ __forceinline__ bool tile_nonfinite(const u16* s, int tid) {
    constexpr int CH = HD / 8, TOTAL = ROWS * CH;
    bool bad = false;
#pragma unroll
    for (int i = 0; i < (TOTAL + NT - 1) / NT; ++i) {
        const int c = tid + i * NT;
        if (TOTAL % NT != 0 && c >= TOTAL) break;
        const uint4 w = *(const uint4*)(s + (c / CH) * (HD + 8) + (c % CH) * 8);
        bad |= nonfinite2<DT>(w.x) | nonfinite2<DT>(w.y) | nonfinite2<DT>(w.z) | nonfinite2<DT>(w.w);
    }
    return bad;
}
// The same chunks with every non-finite value replaced by 0.
template <int DT, int ROWS, int HD, int NT>
__device__ __forceinline__ void tile_clean(u16* s, int tid) {
    constexpr int CH = HD / 8, TOTAL = ROWS * CH;
#pragma unroll
    for (int i = 0; i < (TOTAL + NT - 1) / NT; ++i) {
        const int c = tid + i * NT;
        if (TOTAL % NT != 0 && c >= TOTAL) break;
        uint4* p = (uint4*)(s + (c / CH) * (HD + 8) + (c % CH) * 8);
        const uint4 w = *p;
        *p = make_uint4(clean2<DT>(w.x), clean2<DT>(w.y), clean2<DT>(w.z), clean2<DT>(w.w));
    }
}

// softcap·tanh(s/softcap) in log2 units from the raw score x (attention):
// cap_out·tanh(x·cap_in) with cap_in = scale/softcap, cap_out =
// softcap·log2 e, or x·scale_log2 itself where |x·cap_in| < 1e-4 (tanh(u)/u
// rounds to 1 there). tanhf is accurate for small arguments, so this is
// float32-exact for any softcap, even one whose cap_in is subnormal or 0.
// t = tanh(u) (the backward's 1 − t²).
__device__ __forceinline__ float capped_logit(float x, float& t, float scale_log2, float cap_in, float cap_out) {
    const float u = x * cap_in;
    t = tanhf(u);
    return fabsf(u) < 1e-4f ? x * scale_log2 : cap_out * t;
}

__device__ __forceinline__ float ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

}  // namespace tc
