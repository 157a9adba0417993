// Hidden attention of Mamba (SPEC §4; Ali, Zimerman & Wolf 2024):
//
//   alpha[c, i, j] = sum_k C_i[k] * exp(sum_{t=j+1..i} dt_t * A[c,k]) * dt_j * B_j[k]   (j <= i, else 0)
//
// with dt = delta + delta_bias[c], softplus'd (threshold 20) when asked.
// float32 arithmetic; the output is float32, contiguous: (b, d, l, l), or
// (b, l, l) holding the mean over channels when params.mean != 0.
//
// The host prepends common.cuh (Tensor4, ld_any, ...); this file includes nothing.
//
// ============================================================================
// KERNELS AND LAUNCH CONFIGURATION
// ============================================================================
// hidden_attention_n{16,64}: the smallest NMAX >= nk (states per pass).
//    grid  = (ceil(l / HA_THREADS), d, b)     (d <= 65535, b <= 65535)
//    block = (HA_THREADS = 128, 1, 1)
//    dynamic shared memory = params.rows * (3 * nk + 1) * 4 bytes
//                            (rows = 32: <= 24.7 KB)
// One pass handles the states [k0, k0 + nk), nk <= 64; the host launches
// ceil(n / 64) passes in stream order, all but the first with accumulate = 1
// (alpha is linear in the sum over k, so passes add up).
// One thread per output column j of one (batch entry, channel): it carries
// the state s[k] = exp(sum_{t=j+1..i} dt_t A[k]) dt_j B_j[k] down the rows
// i >= j (a running decay from the diagonal: no exp(cumsum_i - cumsum_j)
// cancellation) and writes alpha[i, j] = sum_k C_i[k] s[k]. A warp's 32
// columns are consecutive, so each row's stores are coalesced. Per stage of
// `rows` rows the block stages dt_i, exp(dt_i A[k]), B_i[k] and C_i[k] in
// shared memory (each exp computed once per block). Rows above the block's
// first column are zero-filled (reduce = None, first pass). With mean != 0
// each value times 1/d is added with atomicAdd into out (b, l, l), which
// hidden_attention_zero must have cleared first (grid = (ceil(numel / 256)),
// block = (256)); the summation order across channels is therefore not
// deterministic.
// Strides of delta, A, B, C, delta_bias are arbitrary (elements); offsets are 64-bit.
// ============================================================================

#define HA_THREADS 128

// Mirrored by HaParams in src/cuda/hidden_attention.rs.
struct HaParams {
    int b, d, l, n;
    int groups_b, groups_c;  // 0 = constant (d, n) with strides {0, d, n, 0}
    int softplus, mean;
    int rows;                // rows staged per step (set by the host)
    int k0, nk;              // this pass: states [k0, k0 + nk)
    int accumulate;          // add to out instead of storing (passes after the first)
    float inv_d, _pad2;
    Tensor4 delta, A, B, C, delta_bias, out;
};

struct HaZeroParams {
    float* ptr;
    i64 numel;
};

extern "C" __global__ void hidden_attention_zero(HaZeroParams p) {
    i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < p.numel) p.ptr[i] = 0.f;
}

__device__ __forceinline__ float ha_softplus(float x) { return x > 20.f ? x : log1pf(expf(x)); }

// Element (batch bi, channel c, state k, time t) of B or C in any layout.
__device__ __forceinline__ float ha_bc(const Tensor4& t, int groups, int d, int bi, int c, int k, int t_) {
    if (groups == 0) return ld_any(t.ptr, t.dtype, (i64)c * t.stride[1] + (i64)k * t.stride[2]);
    int g = c / (d / groups);
    return ld_any(t.ptr, t.dtype,
                  (i64)bi * t.stride[0] + (i64)g * t.stride[1] + (i64)k * t.stride[2] + (i64)t_ * t.stride[3]);
}

template <int NMAX>
__device__ __forceinline__ void ha_body(const HaParams& p) {
    extern __shared__ float smem[];
    const int nk = p.nk, k0 = p.k0, l = p.l, d = p.d, rows = p.rows;
    float* dl_s = smem;              // [rows]
    float* e_s = smem + rows;        // [rows][nk]
    float* b_s = e_s + rows * nk;    // [rows][nk]
    float* c_s = b_s + rows * nk;    // [rows][nk]
    const int c = blockIdx.y, bi = blockIdx.z;
    const int j0 = blockIdx.x * HA_THREADS;
    const int j = j0 + threadIdx.x;
    const float bias = p.delta_bias.ptr ? ld_any(p.delta_bias.ptr, p.delta_bias.dtype, (i64)c * p.delta_bias.stride[0]) : 0.f;
    const i64 dbase = (i64)bi * p.delta.stride[0] + (i64)c * p.delta.stride[1];
    float* out = (float*)p.out.ptr;
    const i64 obase = p.mean ? (i64)bi * l * l : ((i64)bi * d + c) * l * l;

    if (!p.mean && !p.accumulate && j < l) {
        for (int i = 0; i < j0; ++i) out[obase + (i64)i * l + j] = 0.f;
    }
    float s[NMAX];
#pragma unroll
    for (int k = 0; k < NMAX; ++k) s[k] = 0.f;

    for (int i0 = j0; i0 < l; i0 += rows) {
        const int nr = min(rows, l - i0);
        __syncthreads();  // the previous stage is consumed
        for (int r = threadIdx.x; r < nr; r += HA_THREADS) {
            float x = ld_any(p.delta.ptr, p.delta.dtype, dbase + (i64)(i0 + r) * p.delta.stride[2]) + bias;
            dl_s[r] = p.softplus ? ha_softplus(x) : x;
        }
        __syncthreads();
        for (int q = threadIdx.x; q < nr * nk; q += HA_THREADS) {
            const int r = q / nk, k = k0 + (q - r * nk);
            const float a = ld_any(p.A.ptr, p.A.dtype, (i64)c * p.A.stride[0] + (i64)k * p.A.stride[1]);
            e_s[q] = expf(dl_s[r] * a);
            b_s[q] = dl_s[r] * ha_bc(p.B, p.groups_b, d, bi, c, k, i0 + r);
            c_s[q] = ha_bc(p.C, p.groups_c, d, bi, c, k, i0 + r);
        }
        __syncthreads();
        if (j < l) {
            for (int r = 0; r < nr; ++r) {
                const int i = i0 + r;
                if (i < j) {
                    if (!p.mean && !p.accumulate) out[obase + (i64)i * l + j] = 0.f;
                    continue;
                }
                const float* er = e_s + r * nk;
                const float* br = b_s + r * nk;
                const float* cr = c_s + r * nk;
                const bool diag = (i == j);
                float acc = 0.f;
#pragma unroll
                for (int k = 0; k < NMAX; ++k) {
                    if (k < nk) {
                        s[k] = diag ? br[k] : s[k] * er[k];
                        acc = fmaf(cr[k], s[k], acc);
                    }
                }
                const i64 o = obase + (i64)i * l + j;
                if (p.mean) {
                    atomicAdd(out + o, acc * p.inv_d);
                } else if (p.accumulate) {
                    out[o] += acc;
                } else {
                    out[o] = acc;
                }
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(HA_THREADS) hidden_attention_n16(HaParams p) { ha_body<16>(p); }
extern "C" __global__ void __launch_bounds__(HA_THREADS) hidden_attention_n64(HaParams p) { ha_body<64>(p); }
