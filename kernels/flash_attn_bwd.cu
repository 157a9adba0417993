// Flash-attention backward (SPEC §3) on the tensor cores: mma.sync m16n8k16
// (f16/bf16 operands, f32 accumulators), ldmatrix, cp.async; sm_80 and later.
// The gradients of kernels/flash_attn_fwd.cu, from its saved lse.
//
// Three kernels per call (FlashAttention-2's split):
//   1. flash_bwd_pre_<dt>: per (query row, head) D = rowsum(dO∘O) − dlse and
//      the lse in log2 units (+inf for a row with no visible key, or a row
//      outside every sequence, so that P = exp2(x − lse) = 0 there);
//   2. flash_bwd_<dt>_hd<HD>: one CTA per (key tile of BN keys, kv head,
//      batch entry). K and V of the tile stay in shared memory; the CTA loops
//      over the query heads of its GQA group and, for each, over the query
//      tiles of BM rows that can see the tile (the mask bounds the loop:
//      causal/window cost O(s·W)). Per query tile, each warp owns 16 keys:
//        dPᵀ = V_w·dOᵀ, Sᵀ = K_w·Qᵀ (recomputed), P = exp2(x − lse),
//        dS = P∘(dP − D)·(1 − tanh² for softcap), dV_w += Pᵀ·dO, dK_w += dSᵀ·Q
//      (dK, dV in registers for the whole loop, so GQA sums its group there),
//      dSᵀ goes to shared memory and dQ_tile = dS·K is added into a float32
//      accumulator with atomics (or, deterministic, skipped: see 3b).
//   3. flash_bwd_dq_<dt>: dq = scale·dq_acc in the input dtype.
//   3b. deterministic: flash_bwd_dqk_<dt>_hd<HD>, one CTA per (query tile,
//      head, batch entry) that loops over key tiles and accumulates dQ in
//      registers (no atomics; bit-identical run to run), then stores it.
//
// Masking/semantics as the forward: query i sees key j iff
//   i + sk − sq − left ≤ j ≤ i + sk − sq + right and 0 ≤ j < sk.
// A masked pair's dS is selected to 0 (dP may be NaN from a non-finite V), and
// a non-finite K is zeroed in shared memory before dQ = dS·K reads it (the
// key-tile kernel: once per CTA; the dQ kernel: on edge tiles), so nothing a
// row cannot see reaches its gradients; rows that see it get NaN through D.
// Logits in log2 units: x = scale·log2e·s (softcap: softcap·log2e·tanh(scale·s/softcap);
// ALiBi: − slope·log2e·|i + sk − sq − j|). dK and dQ carry the factor scale
// (applied at the store); softcap adds (1 − t²) per element.
//
// Layouts: q/dout/out/dq (b, s, h, d), k/v/dk/dv (b, s, hk, d), arbitrary
// strides in elements with the last one 1; varlen: batch stride 0 and row r of
// entry z is token cu[z] + r. Scratch: lse2, dsum (hq, rows) float32 and
// dq_acc (rows, hq, hdp) float32 (zeroed by the caller; hdp = hd rounded up to
// 16, columns permuted within groups of 16: see dq_pos), where rows = b·sq
// (batched; row of (z, i) = z·sq + i) or total_q (varlen; row = token).

struct FlashBwdParams {
    const void* q;
    const void* k;
    const void* v;
    const void* out;
    const void* dout;
    void* dq;
    void* dk;
    void* dv;
    const float* lse;     // forward's lse: (b, hq, sq) or (hq, total_q) via strides
    const float* dlse;    // may be null (same strides as lse)
    float* lse2;          // scratch (hq, rows)
    float* dsum;          // scratch (hq, rows)
    float* dq_acc;        // scratch (rows, hq, hd)
    const float* alibi;   // may be null
    const int* cu_q;      // null unless varlen
    const int* cu_k;
    i64 q_sb, q_ss, q_sh;
    i64 k_sb, k_ss, k_sh;
    i64 v_sb, v_ss, v_sh;
    i64 o_sb, o_ss, o_sh;
    i64 do_sb, do_ss, do_sh;
    i64 dq_sb, dq_ss, dq_sh;
    i64 dk_sb, dk_ss, dk_sh;
    i64 dv_sb, dv_ss, dv_sh;
    i64 lse_sb, lse_sh, lse_ss;
    i64 dlse_sb, dlse_sh, dlse_ss;
    i64 alibi_sb, alibi_sh;
    i64 rows;             // b·sq (batched) or total_q (varlen)
    int b, hq, hk, hd;
    int sq, sk;           // batched lengths (varlen: max lengths, unused in kernels)
    int left, right;      // -1: unbounded
    float scale;          // softmax_scale
    float scale_log2;     // softmax_scale · log2(e)
    float softcap;        // 0: off
    float softcap_in;     // softmax_scale / softcap
    float softcap_out;    // softcap · log2(e)
    int vec_ok;           // q/k/v/dout rows 16-byte aligned: cp.async path
    int o_vec_ok;         // dk/dv/dq pairs 4-byte aligned
    int dq_atomic;        // 1: the key-tile kernel adds dQ into dq_acc
};

#define FB_LOG2E 1.4426950408889634f
// sm_90 (228 KB of shared memory): two dSᵀ buffers, and the dQ product of
// step i runs after the dK/dV products of step i + 1 without a barrier of its
// own. sm_80 (164 KB): one buffer and a barrier before each dQ product.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define FB_DEFER_DQ 1
#else
#define FB_DEFER_DQ 0
#endif
#define FB_INF (__int_as_float(0x7f800000))
#define FB_NEG_INF (-__int_as_float(0x7f800000))

namespace fab {

using namespace tc;

// ROWS rows of HD columns from row `row0` of `g` (row stride `rs`) into `s`
// (row stride HD + 8); rows ≥ nvalid, columns ≥ hd and everything when
// !active are zero-filled. VEC: 16-byte cp.async; else 2-byte loads.
template <int ROWS, int HD, int NT, bool VEC>
__device__ __forceinline__ void load_tile(u16* s, const u16* g, i64 rs, int row0, int nvalid, int hd, bool active,
                                          int tid) {
    constexpr int CH = HD / 8;
    constexpr int RS = HD + 8;
    constexpr int TOTAL = ROWS * CH;
#pragma unroll
    for (int i = 0; i < (TOTAL + NT - 1) / NT; ++i) {
        int c = tid + i * NT;
        if (TOTAL % NT != 0 && c >= TOTAL) break;
        int r = c / CH, col = (c % CH) * 8;
        bool valid = active && (row0 + r < nvalid) && (col < hd);
        const u16* src = g + (i64)(row0 + r) * rs + col;
        u16* dst = s + r * RS + col;
        if (VEC) {
            cp_async16(dst, valid ? (const void*)src : (const void*)g, valid ? 16 : 0);
        } else {
            unsigned w[4];
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                unsigned lo = valid ? (unsigned)src[2 * e] : 0u;
                unsigned hi = valid ? (unsigned)src[2 * e + 1] : 0u;
                w[e] = lo | (hi << 16);
            }
            *(uint4*)dst = make_uint4(w[0], w[1], w[2], w[3]);
        }
    }
}

// One (row, head) per warp: D = Σ dO·O − dlse, lse2 = lse·log2e (+inf when
// lse = −inf or the row is outside every sequence).
template <int DT>
__device__ __forceinline__ void bwd_pre(const FlashBwdParams& p) {
    const i64 pair = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (pair >= p.rows * p.hq) return;
    const int h = (int)(pair % p.hq);
    const i64 row = pair / p.hq;
    i64 z, i;
    bool valid;
    if (p.cu_q) {
        z = 0;
        i = row;
        valid = row < p.cu_q[p.b];
    } else {
        z = row / p.sq;
        i = row % p.sq;
        valid = true;
    }
    const u16* o = (const u16*)p.out + z * p.o_sb + i * p.o_ss + h * p.o_sh;
    const u16* d = (const u16*)p.dout + z * p.do_sb + i * p.do_ss + h * p.do_sh;
    float acc = 0.f;
    if (valid)
        for (int c = lane; c < p.hd; c += 32) acc += Mma<DT>::ld(o[c]) * Mma<DT>::ld(d[c]);
#pragma unroll
    for (int m = 16; m > 0; m >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, m);
    if (lane == 0) {
        float l = FB_INF, dl = 0.f;
        if (valid) {
            l = p.lse[z * p.lse_sb + h * p.lse_sh + i * p.lse_ss];
            l = (l == FB_NEG_INF || l != l) ? FB_INF : l * FB_LOG2E;
            if (p.dlse) {
                dl = p.dlse[z * p.dlse_sb + h * p.dlse_sh + i * p.dlse_ss];
                if (l == FB_INF) dl = 0.f;
            }
        }
        p.lse2[(i64)h * p.rows + row] = l;
        p.dsum[(i64)h * p.rows + row] = valid ? acc - dl : 0.f;
    }
}

__device__ __forceinline__ int dq_hdp(int hd);
__device__ __forceinline__ int dq_pos(int c);
// dq = scale · dq_acc (columns permuted, see dq_pos), one element pair per thread.
template <int DT>
__device__ __forceinline__ void bwd_dq(const FlashBwdParams& p) {
    const i64 half = p.hd / 2;
    const i64 idx = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= p.rows * p.hq * half) return;
    const int c = (int)(idx % half) * 2;
    const i64 rh = idx / half;
    const int h = (int)(rh % p.hq);
    const i64 row = rh / p.hq;
    i64 z, i;
    if (p.cu_q) {
        z = 0;
        i = row;
    } else {
        z = row / p.sq;
        i = row % p.sq;
    }
    const float2 a = *(const float2*)(p.dq_acc + (row * p.hq + h) * dq_hdp(p.hd) + dq_pos(c));
    u16* dst = (u16*)p.dq + z * p.dq_sb + i * p.dq_ss + h * p.dq_sh + c;
    const unsigned w = Mma<DT>::pack(a.x * p.scale, a.y * p.scale);
    if (p.o_vec_ok) {
        *(unsigned*)dst = w;
    } else {
        dst[0] = (u16)(w & 0xffffu);
        dst[1] = (u16)(w >> 16);
    }
}

// Per-lane ldmatrix byte addresses into a tile of row stride RS elements:
// A operand (rows row0.., non-transposed), B operand (non-transposed; also
// the A operand read transposed from an Aᵀ tile), B operand transposed.
__device__ __forceinline__ unsigned a_addr(const u16* s, int rs, int row0, int lane) {
    return smem_u32(s + (row0 + (lane & 15)) * rs + (lane >> 4) * 8);
}
__device__ __forceinline__ unsigned b_addr(const u16* s, int rs, int lane) {
    return smem_u32(s + ((lane & 7) + ((lane >> 4) << 3)) * rs + ((lane >> 3) & 1) * 8);
}
__device__ __forceinline__ unsigned bt_addr(const u16* s, int rs, int lane) {
    return smem_u32(s + ((lane & 7) + ((lane >> 3) & 1) * 8) * rs + (lane >> 4) * 8);
}

// C[16 × N] (+)= A[16 × HD] · Bᵀ where A rows come from `aaddr` (non-trans)
// and B is an N × HD tile read at `baddr` (non-trans).
template <int DT, int HD, int N>
__device__ __forceinline__ void mm_abt(float (&c)[N / 8][4], unsigned aaddr, unsigned baddr) {
    constexpr int RSB = (HD + 8) * 2;
#pragma unroll
    for (int i = 0; i < N / 8; ++i) c[i][0] = c[i][1] = c[i][2] = c[i][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < HD / 16; ++kk) {
        unsigned a[4];
        ldsm_x4(a, aaddr + kk * 32);
#pragma unroll
        for (int np = 0; np < N / 16; ++np) {
            unsigned b[4];
            ldsm_x4(b, baddr + np * 16 * RSB + kk * 32);
            Mma<DT>::run(c[2 * np], a, b[0], b[1]);
            Mma<DT>::run(c[2 * np + 1], a, b[2], b[3]);
        }
    }
}

// acc[16 × NC] += P[16 × K] · B[K × NC], P in accumulator layout (registers),
// B read transposed at `btaddr` (tile row stride RSB bytes; the caller's
// column offset already in btaddr).
template <int DT, int K, int NC, int RSB>
__device__ __forceinline__ void mm_pb(float (&acc)[NC / 8][4], const float (&pm)[K / 8][4], unsigned btaddr) {
#pragma unroll
    for (int kk = 0; kk < K / 16; ++kk) {
        unsigned a[4];
        a[0] = Mma<DT>::pack(pm[2 * kk][0], pm[2 * kk][1]);
        a[1] = Mma<DT>::pack(pm[2 * kk][2], pm[2 * kk][3]);
        a[2] = Mma<DT>::pack(pm[2 * kk + 1][0], pm[2 * kk + 1][1]);
        a[3] = Mma<DT>::pack(pm[2 * kk + 1][2], pm[2 * kk + 1][3]);
#pragma unroll
        for (int np = 0; np < NC / 16; ++np) {
            unsigned b[4];
            ldsm_x4_t(b, btaddr + kk * 16 * RSB + np * 32);
            Mma<DT>::run(acc[2 * np], a, b[0], b[1]);
            Mma<DT>::run(acc[2 * np + 1], a, b[2], b[3]);
        }
    }
}

// Two independent C = A·Bᵀ products in one loop (ILP for the tensor pipe).
template <int DT, int HD, int N>
__device__ __forceinline__ void mm_abt2(float (&c1)[N / 8][4], unsigned a1addr, unsigned b1addr,
                                        float (&c2)[N / 8][4], unsigned a2addr, unsigned b2addr) {
    constexpr int RSB = (HD + 8) * 2;
#pragma unroll
    for (int i = 0; i < N / 8; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) c1[i][e] = c2[i][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < HD / 16; ++kk) {
        unsigned a1[4], a2[4];
        ldsm_x4(a1, a1addr + kk * 32);
        ldsm_x4(a2, a2addr + kk * 32);
#pragma unroll
        for (int np = 0; np < N / 16; ++np) {
            unsigned b1[4], b2[4];
            ldsm_x4(b1, b1addr + np * 16 * RSB + kk * 32);
            ldsm_x4(b2, b2addr + np * 16 * RSB + kk * 32);
            Mma<DT>::run(c1[2 * np], a1, b1[0], b1[1]);
            Mma<DT>::run(c2[2 * np], a2, b2[0], b2[1]);
            Mma<DT>::run(c1[2 * np + 1], a1, b1[2], b1[3]);
            Mma<DT>::run(c2[2 * np + 1], a2, b2[2], b2[3]);
        }
    }
}

// acc1 += P1·B1 and acc2 += P2·B2 in one loop (see mm_pb).
template <int DT, int K, int NC, int RSB>
__device__ __forceinline__ void mm_pb2(float (&acc1)[NC / 8][4], const float (&p1)[K / 8][4], unsigned bt1,
                                       float (&acc2)[NC / 8][4], const float (&p2)[K / 8][4], unsigned bt2) {
#pragma unroll
    for (int kk = 0; kk < K / 16; ++kk) {
        unsigned a1[4], a2[4];
        a1[0] = Mma<DT>::pack(p1[2 * kk][0], p1[2 * kk][1]);
        a1[1] = Mma<DT>::pack(p1[2 * kk][2], p1[2 * kk][3]);
        a1[2] = Mma<DT>::pack(p1[2 * kk + 1][0], p1[2 * kk + 1][1]);
        a1[3] = Mma<DT>::pack(p1[2 * kk + 1][2], p1[2 * kk + 1][3]);
        a2[0] = Mma<DT>::pack(p2[2 * kk][0], p2[2 * kk][1]);
        a2[1] = Mma<DT>::pack(p2[2 * kk][2], p2[2 * kk][3]);
        a2[2] = Mma<DT>::pack(p2[2 * kk + 1][0], p2[2 * kk + 1][1]);
        a2[3] = Mma<DT>::pack(p2[2 * kk + 1][2], p2[2 * kk + 1][3]);
#pragma unroll
        for (int np = 0; np < NC / 16; ++np) {
            unsigned b1[4], b2[4];
            ldsm_x4_t(b1, bt1 + kk * 16 * RSB + np * 32);
            ldsm_x4_t(b2, bt2 + kk * 16 * RSB + np * 32);
            Mma<DT>::run(acc1[2 * np], a1, b1[0], b1[1]);
            Mma<DT>::run(acc2[2 * np], a2, b2[0], b2[1]);
            Mma<DT>::run(acc1[2 * np + 1], a1, b1[2], b1[3]);
            Mma<DT>::run(acc2[2 * np + 1], a2, b2[2], b2[3]);
        }
    }
}

// dq_acc keeps each 16-column group of a row permuted so that lane t's four
// values (columns 2t, 2t+1, 8+2t, 9+2t) are contiguous at 4t: one 16-byte
// vector reduction (sm_90) instead of four atomics. Rows are padded to a
// multiple of 16 floats.
__device__ __forceinline__ int dq_hdp(int hd) { return (hd + 15) & ~15; }
__device__ __forceinline__ int dq_pos(int c) { return (c & ~15) + 4 * ((c & 7) >> 1) + 2 * ((c >> 3) & 1) + (c & 1); }
__device__ __forceinline__ void red4(float* dst, float a, float b, float c, float d) {
#if __CUDA_ARCH__ >= 900
    asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(dst), "f"(a), "f"(b), "f"(c), "f"(d)
                 : "memory");
#else
    atomicAdd(dst, a);
    atomicAdd(dst + 1, b);
    atomicAdd(dst + 2, c);
    atomicAdd(dst + 3, d);
#endif
}

struct Seq {
    int q_start, k_start, sq, sk;
    i64 rowbase;  // row of (z, 0) in the (hq, rows) scratch
};

__device__ __forceinline__ Seq seq_of(const FlashBwdParams& p, int z) {
    Seq s;
    if (p.cu_q) {
        s.q_start = p.cu_q[z];
        s.sq = p.cu_q[z + 1] - s.q_start;
        s.k_start = p.cu_k[z];
        s.sk = p.cu_k[z + 1] - s.k_start;
        s.rowbase = s.q_start;
    } else {
        s.q_start = s.k_start = 0;
        s.sq = p.sq;
        s.sk = p.sk;
        s.rowbase = (i64)z * p.sq;
    }
    return s;
}

// Logit (log2 units) of raw score `x` at (query i, key j) and its softcap
// derivative factor; MASK: −inf outside the band, and `vis` false there.
template <bool MASK, bool FEAT>
__device__ __forceinline__ float logit(float x, float& dcap, bool& vis, int i, int j, int off, int sk,
                                       const FlashBwdParams& p, float slope_log2) {
    dcap = 1.f;
    vis = true;
    if (FEAT && p.softcap > 0.f) {
        float t;
        x = capped_logit(x, t, p.scale_log2, p.softcap_in, p.softcap_out);
        dcap = 1.f - t * t;
    } else {
        x *= p.scale_log2;
    }
    if (FEAT) x -= slope_log2 * fabsf((float)(i + off - j));
    if (MASK) {
        // 64-bit: left/right may be up to 2³¹ − 1.
        const i64 d = (i64)i + off - j;
        vis = j < sk && (p.left < 0 || d <= p.left) && (p.right < 0 || d >= -(i64)p.right);
        if (!vis) x = FB_NEG_INF;
    }
    return x;
}

// ----------------------------------------------------------------------------
// The key-tile kernel (dK, dV; dQ by atomics).
// NW = (BN / 16)·WD warps: warp w owns keys 16·(w / WD).. and the column
// slice (w % WD) of dK/dV (WD = 2 for HD 256: Sᵀ/dPᵀ are then computed by
// both warps of a pair).
// ----------------------------------------------------------------------------
template <int DT, int HD, int BN, int BM, int WD>
struct KCfg {
    static constexpr int NW = (BN / 16) * WD;
    static constexpr int NT = 32 * NW;
    static constexpr int RS = HD + 8;
    static constexpr int RSB = RS * 2;
    static constexpr int RSS = BM + 8;  // dSᵀ tile row stride
    static constexpr int HDW = HD / WD;
    static constexpr int WQ = NW / (BM / 16);  // warps per 16-row m-tile of dQ
    static constexpr int HDQ = HD / WQ;        // dQ columns per warp
    static constexpr unsigned SMEM =
        (2 * BN * RS + 4 * BM * RS + (1 + FB_DEFER_DQ) * BN * RSS) * 2 + 4 * BM * 4;
};


// Elementwise step of the key-tile kernel: s (Sᵀ raw scores, 16 keys × BM
// queries of this warp) → P; dp (dPᵀ) → dS' = P∘(dP − D)·dcap.
template <int BM, bool MASK, bool FEAT>
__device__ __forceinline__ void kv_elementwise(float (&s)[BM / 8][4], float (&dp)[BM / 8][4], const float* L,
                                               const float* Dd, int m0, int jw, int off, int sk,
                                               const FlashBwdParams& p, float slope_log2, int g, int t) {
#pragma unroll
    for (int nt = 0; nt < BM / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int j = jw + g + 8 * (e >> 1);
            const int il = nt * 8 + 2 * t + (e & 1);
            float dcap;
            bool vis;
            const float x = logit<MASK, FEAT>(s[nt][e], dcap, vis, m0 + il, j, off, sk, p, slope_log2);
            const float pr = ex2(x - L[il]);
            s[nt][e] = pr;
            const float ds = FEAT ? pr * (dp[nt][e] - Dd[il]) * dcap : pr * (dp[nt][e] - Dd[il]);
            // Masked: dS = 0 by selection (dP may be NaN from a non-finite V).
            dp[nt][e] = (MASK && !vis) ? 0.f : ds;
        }
    }
}

template <int DT, int HD, int BN, int BM, int WD, bool VEC, bool FEAT>
__device__ __forceinline__ void kv_loop(const FlashBwdParams& p, const Seq& S, int z, int hkv, int n0, int mb_lo,
                                        int n_m, float (&dk)[HD / WD / 8][4], float (&dv)[HD / WD / 8][4]) {
    using C = KCfg<DT, HD, BN, BM, WD>;
    constexpr int RS = C::RS, RSB = C::RSB, RSS = C::RSS, NT = C::NT, HDW = C::HDW, WQ = C::WQ, HDQ = C::HDQ;
    extern __shared__ __align__(16) unsigned char fb_smem[];
    u16* sK = (u16*)fb_smem;
    u16* sV = sK + BN * RS;
    u16* sQ = sV + BN * RS;     // 2 stages
    u16* sdO = sQ + 2 * BM * RS;  // 2 stages
    u16* sdS = sdO + 2 * BM * RS;
    float* sL = (float*)(sdS + (FB_DEFER_DQ ? 2 : 1) * BN * RSS);  // 2 stages
    float* sD = sL + 2 * BM;                // 2 stages
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
    const int kw = warp / WD, cw = warp % WD;
    const int rep = p.hq / p.hk;
    const int total = rep * n_m;
    const int off = S.sk - S.sq;

    const u16* kg = (const u16*)p.k + z * p.k_sb + (i64)S.k_start * p.k_ss + hkv * p.k_sh;
    const u16* vg = (const u16*)p.v + z * p.v_sb + (i64)S.k_start * p.v_ss + hkv * p.v_sh;
    load_tile<BN, HD, NT, VEC>(sK, kg, p.k_ss, n0, S.sk, p.hd, true, tid);
    load_tile<BN, HD, NT, VEC>(sV, vg, p.v_ss, n0, S.sk, p.hd, true, tid);

    auto issue = [&](int it, int st) {
        const int h = hkv * rep + it / n_m;
        const int m0 = (mb_lo + it % n_m) * BM;
        const u16* qg = (const u16*)p.q + z * p.q_sb + (i64)S.q_start * p.q_ss + h * p.q_sh;
        const u16* dog = (const u16*)p.dout + z * p.do_sb + (i64)S.q_start * p.do_ss + h * p.do_sh;
        load_tile<BM, HD, NT, VEC>(sQ + st * BM * RS, qg, p.q_ss, m0, S.sq, p.hd, true, tid);
        load_tile<BM, HD, NT, VEC>(sdO + st * BM * RS, dog, p.do_ss, m0, S.sq, p.hd, true, tid);
        if (tid < BM) {
            const int i = m0 + tid;
            float* dl = sL + st * BM + tid;
            float* dd = sD + st * BM + tid;
            if (i < S.sq) {
                const i64 idx = (i64)h * p.rows + S.rowbase + i;
                cp_async4(dl, p.lse2 + idx);
                cp_async4(dd, p.dsum + idx);
            } else {
                *dl = FB_INF;
                *dd = 0.f;
            }
        }
    };
    if (total > 0) issue(0, 0);
    cp_async_commit();

    constexpr unsigned STB = BM * RS * 2;
    const unsigned kA = a_addr(sK, RS, kw * 16, lane);
    const unsigned vA = a_addr(sV, RS, kw * 16, lane);
    const unsigned qB = b_addr(sQ, RS, lane);
    const unsigned doB = b_addr(sdO, RS, lane);
    const unsigned qT = bt_addr(sQ, RS, lane) + cw * HDW * 2;
    const unsigned doT = bt_addr(sdO, RS, lane) + cw * HDW * 2;
    const int mq = warp / WQ, qc = (warp % WQ) * HDQ;
    const unsigned dsA = b_addr(sdS, RSS, lane) + mq * 16 * 2;
    const unsigned kT = bt_addr(sK, RS, lane) + qc * 2;

    // dQ_tile = dS·K from the dSᵀ tile at `dsa` (this lane's ldmatrix address),
    // added into dq_acc rows m0.. of head hh.
    auto dq_step = [&](unsigned dsa, int hh, int mm0) {
        float dq[HDQ / 8][4];
#pragma unroll
        for (int i = 0; i < HDQ / 8; ++i) dq[i][0] = dq[i][1] = dq[i][2] = dq[i][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
            unsigned a[4];
            ldsm_x4_t(a, dsa + kk * 16 * RSS * 2);
#pragma unroll
            for (int np = 0; np < HDQ / 16; ++np) {
                unsigned b[4];
                ldsm_x4_t(b, kT + kk * 16 * RSB + np * 32);
                Mma<DT>::run(dq[2 * np], a, b[0], b[1]);
                Mma<DT>::run(dq[2 * np + 1], a, b[2], b[3]);
            }
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int i = mm0 + mq * 16 + g + 8 * r;
            if (i < S.sq) {
                float* dst = p.dq_acc + ((S.rowbase + i) * p.hq + hh) * dq_hdp(p.hd) + 4 * t;
#pragma unroll
                for (int np = 0; np < HDQ / 16; ++np) {
                    const int col = qc + np * 16;
                    if (col < p.hd)
                        red4(dst + col, dq[2 * np][2 * r], dq[2 * np][2 * r + 1], dq[2 * np + 1][2 * r],
                             dq[2 * np + 1][2 * r + 1]);
                }
            }
        }
    };
    int h_prev = 0, m0_prev = 0;
    for (int it = 0; it < total; ++it) {
        const int st = it & 1;
        const int h = hkv * rep + it / n_m;
        const int m0 = (mb_lo + it % n_m) * BM;
        cp_async_wait_all();
        __syncthreads();  // stage st (and K/V) landed; every warp is done with stage st^1 and sdS
        if (it == 0 && __syncthreads_or(tile_nonfinite<DT, BN, HD, NT>(sK, tid))) {
            // A non-finite K (rare) is zeroed for the whole CTA: dQ = dS·K must
            // stay finite for the rows that cannot see it (dS is 0 there), and
            // the rows that see it get NaN anyway through their lse and D
            // (their forward output is NaN). A non-finite V needs nothing: dP
            // only feeds dS, which is 0 where masked and NaN through D where seen.
            tile_clean<DT, BN, HD, NT>(sK, tid);
            __syncthreads();
        }
        if (it + 1 < total) issue(it + 1, st ^ 1);
        cp_async_commit();
        const float slope_log2 = (FEAT && p.alibi) ? p.alibi[z * p.alibi_sb + h * p.alibi_sh] * FB_LOG2E : 0.f;

        float dp[BM / 8][4], s[BM / 8][4];
        mm_abt2<DT, HD, BM>(dp, vA, doB + st * STB, s, kA, qB + st * STB);
        const i64 m_last = min(m0 + BM, S.sq) - 1;
        const bool full = n0 + BN <= S.sk && (p.left < 0 || n0 >= m_last + off - p.left) &&
                          (p.right < 0 || n0 + BN - 1 <= (i64)m0 + off + p.right);
        const float* L = sL + st * BM;
        const float* Dd = sD + st * BM;
        if (full)
            kv_elementwise<BM, false, FEAT>(s, dp, L, Dd, m0, n0 + kw * 16, off, S.sk, p, slope_log2, g, t);
        else
            kv_elementwise<BM, true, FEAT>(s, dp, L, Dd, m0, n0 + kw * 16, off, S.sk, p, slope_log2, g, t);

        mm_pb2<DT, BM, HDW, RSB>(dv, s, doT + st * STB, dk, dp, qT + st * STB);

        if (p.dq_atomic) {
            u16* ds = sdS + (FB_DEFER_DQ ? st * BN * RSS : 0);
            if (cw == 0) {
#pragma unroll
                for (int nt = 0; nt < BM / 8; ++nt)
#pragma unroll
                    for (int r = 0; r < 2; ++r)
                        *(unsigned*)(ds + (kw * 16 + g + 8 * r) * RSS + nt * 8 + 2 * t) =
                            Mma<DT>::pack(dp[nt][2 * r], dp[nt][2 * r + 1]);
            }
            if (FB_DEFER_DQ) {
                // dQ of the previous step: its dSᵀ (other buffer) was made
                // visible by this step's first barrier; no second barrier.
                if (it > 0) dq_step(dsA + (st ^ 1) * BN * RSS * 2, h_prev, m0_prev);
            } else {
                __syncthreads();
                dq_step(dsA, h, m0);
            }
        }
        h_prev = h;
        m0_prev = m0;
    }
    if (FB_DEFER_DQ && p.dq_atomic && total > 0) {
        __syncthreads();
        dq_step(dsA + ((total - 1) & 1) * BN * RSS * 2, h_prev, m0_prev);
    }
    cp_async_wait_all();  // nothing in flight at exit (no iteration: K/V loads)
}

template <int DT, int HD, int BN, int BM, int WD>
__device__ __forceinline__ void flash_bwd_kv(const FlashBwdParams& p) {
    constexpr int HDW = HD / WD;
    const int nb = blockIdx.x, hkv = blockIdx.y, z = blockIdx.z;
    const Seq S = seq_of(p, z);
    const int n0 = nb * BN;
    if (n0 >= S.sk) return;
    const i64 off = (i64)S.sk - S.sq;
    const i64 n_last = min(n0 + BN, S.sk) - 1;
    const i64 i_lo = p.right < 0 ? 0 : max((i64)0, (i64)n0 - off - p.right);
    const i64 i_hi = p.left < 0 ? (i64)S.sq - 1 : min((i64)S.sq - 1, n_last - off + p.left);
    int n_m = 0, mb_lo = 0;
    if (i_lo <= i_hi) {
        mb_lo = (int)(i_lo / BM);
        n_m = (int)(i_hi / BM) - mb_lo + 1;
    }
    float dk[HDW / 8][4], dv[HDW / 8][4];
#pragma unroll
    for (int i = 0; i < HDW / 8; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) dk[i][e] = dv[i][e] = 0.f;
    const bool feat = p.softcap > 0.f || p.alibi != nullptr;
    if (!p.vec_ok)
        kv_loop<DT, HD, BN, BM, WD, false, true>(p, S, z, hkv, n0, mb_lo, n_m, dk, dv);
    else if (feat)
        kv_loop<DT, HD, BN, BM, WD, true, true>(p, S, z, hkv, n0, mb_lo, n_m, dk, dv);
    else
        kv_loop<DT, HD, BN, BM, WD, true, false>(p, S, z, hkv, n0, mb_lo, n_m, dk, dv);

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
    const int kw = warp / WD, cw = warp % WD;
    u16* dkg = (u16*)p.dk + z * p.dk_sb + (i64)S.k_start * p.dk_ss + hkv * p.dk_sh;
    u16* dvg = (u16*)p.dv + z * p.dv_sb + (i64)S.k_start * p.dv_ss + hkv * p.dv_sh;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int key = n0 + kw * 16 + g + 8 * r;
        if (key < S.sk) {
            u16* kr = dkg + (i64)key * p.dk_ss;
            u16* vr = dvg + (i64)key * p.dv_ss;
#pragma unroll
            for (int nt = 0; nt < HDW / 8; ++nt) {
                const int col = cw * HDW + nt * 8 + 2 * t;
                if (col < p.hd) {
                    const unsigned wk = Mma<DT>::pack(dk[nt][2 * r] * p.scale, dk[nt][2 * r + 1] * p.scale);
                    const unsigned wv = Mma<DT>::pack(dv[nt][2 * r], dv[nt][2 * r + 1]);
                    if (p.o_vec_ok) {
                        *(unsigned*)(kr + col) = wk;
                        *(unsigned*)(vr + col) = wv;
                    } else {
                        kr[col] = (u16)(wk & 0xffffu);
                        kr[col + 1] = (u16)(wk >> 16);
                        vr[col] = (u16)(wv & 0xffffu);
                        vr[col + 1] = (u16)(wv >> 16);
                    }
                }
            }
        }
    }
}

// ----------------------------------------------------------------------------
// Deterministic dQ: one CTA of NW warps × 16 query rows per (query tile,
// head, batch entry); loops over the key tiles the rows see (two K/V stages),
// S = Q_w·Kᵀ, dP = dO_w·Vᵀ, dS, dQ += dS·K in registers; no atomics.
// ----------------------------------------------------------------------------
template <int HD, int BN, int NW>
struct QCfg {
    static constexpr int BM = 16 * NW;
    static constexpr int RS = HD + 8;
    static constexpr unsigned SMEM = (2 * BM * RS + 4 * BN * RS) * 2;
};

template <int BN, bool MASK, bool FEAT>
__device__ __forceinline__ void q_elementwise(float (&s)[BN / 8][4], float (&dp)[BN / 8][4], const float (&L)[2],
                                              const float (&Dd)[2], int iw, int n0, int off, int sk,
                                              const FlashBwdParams& p, float slope_log2, int g, int t) {
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int r = e >> 1;
            const int j = n0 + nt * 8 + 2 * t + (e & 1);
            float dcap;
            bool vis;
            const float x = logit<MASK, FEAT>(s[nt][e], dcap, vis, iw + g + 8 * r, j, off, sk, p, slope_log2);
            const float pr = ex2(x - L[r]);
            const float ds = FEAT ? pr * (dp[nt][e] - Dd[r]) * dcap : pr * (dp[nt][e] - Dd[r]);
            dp[nt][e] = (MASK && !vis) ? 0.f : ds;  // masked: 0 whatever dP holds
        }
    }
}

template <int DT, int HD, int BN, int NW, bool VEC, bool FEAT>
__device__ __forceinline__ void q_loop(const FlashBwdParams& p, const Seq& S, int z, int h, int m0,
                                       float (&dq)[HD / 8][4]) {
    using C = QCfg<HD, BN, NW>;
    constexpr int BM = C::BM, RS = C::RS, RSB = RS * 2, NT = 32 * NW;
    extern __shared__ __align__(16) unsigned char fb_smem[];
    u16* sQ = (u16*)fb_smem;
    u16* sdO = sQ + BM * RS;
    u16* sK = sdO + BM * RS;  // 2 stages
    u16* sV = sK + 2 * BN * RS;  // 2 stages
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
    const i64 off = (i64)S.sk - S.sq;
    const int m_last = min(m0 + BM, S.sq) - 1;
    const i64 n_lo = p.left < 0 ? 0 : max((i64)0, m0 + off - p.left);
    const i64 n_hi = p.right < 0 ? (i64)S.sk - 1 : min((i64)S.sk - 1, m_last + off + p.right);
    if (n_lo > n_hi) return;
    const int nb_lo = (int)(n_lo / BN), n_t = (int)(n_hi / BN) - nb_lo + 1;
    const int hkv = h / (p.hq / p.hk);
    const u16* qg = (const u16*)p.q + z * p.q_sb + (i64)S.q_start * p.q_ss + h * p.q_sh;
    const u16* dog = (const u16*)p.dout + z * p.do_sb + (i64)S.q_start * p.do_ss + h * p.do_sh;
    const u16* kg = (const u16*)p.k + z * p.k_sb + (i64)S.k_start * p.k_ss + hkv * p.k_sh;
    const u16* vg = (const u16*)p.v + z * p.v_sb + (i64)S.k_start * p.v_ss + hkv * p.v_sh;
    load_tile<BM, HD, NT, VEC>(sQ, qg, p.q_ss, m0, S.sq, p.hd, true, tid);
    load_tile<BM, HD, NT, VEC>(sdO, dog, p.do_ss, m0, S.sq, p.hd, true, tid);
    load_tile<BN, HD, NT, VEC>(sK, kg, p.k_ss, nb_lo * BN, S.sk, p.hd, true, tid);
    load_tile<BN, HD, NT, VEC>(sV, vg, p.v_ss, nb_lo * BN, S.sk, p.hd, true, tid);
    cp_async_commit();
    float L[2], Dd[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int i = m0 + warp * 16 + g + 8 * r;
        const i64 idx = (i64)h * p.rows + S.rowbase + i;
        L[r] = i < S.sq ? p.lse2[idx] : FB_INF;
        Dd[r] = i < S.sq ? p.dsum[idx] : 0.f;
    }
    const float slope_log2 = (FEAT && p.alibi) ? p.alibi[z * p.alibi_sb + h * p.alibi_sh] * FB_LOG2E : 0.f;
    const unsigned qA = a_addr(sQ, RS, warp * 16, lane);
    const unsigned doA = a_addr(sdO, RS, warp * 16, lane);
    const unsigned kB = b_addr(sK, RS, lane), vB = b_addr(sV, RS, lane);
    const unsigned kT = bt_addr(sK, RS, lane);
    constexpr unsigned STB = BN * RS * 2;
    for (int it = 0; it < n_t; ++it) {
        const int st = it & 1;
        const int n0 = (nb_lo + it) * BN;
        cp_async_wait_all();
        __syncthreads();
        load_tile<BN, HD, NT, VEC>(sK + (st ^ 1) * BN * RS, kg, p.k_ss, n0 + BN, S.sk, p.hd, it + 1 < n_t, tid);
        load_tile<BN, HD, NT, VEC>(sV + (st ^ 1) * BN * RS, vg, p.v_ss, n0 + BN, S.sk, p.hd, it + 1 < n_t, tid);
        cp_async_commit();
        const bool full = n0 + BN <= S.sk && (p.left < 0 || n0 >= m_last + off - p.left) &&
                          (p.right < 0 || n0 + BN - 1 <= m0 + off + p.right);
        // Edge tile: dQ += dS·K reads K of keys some rows cannot see (dS = 0
        // there); a non-finite K must not make 0·inf. Rows that see it get NaN
        // through their lse and D. One scan and barrier per edge tile.
        if (!full && __syncthreads_or(tile_nonfinite<DT, BN, HD, NT>(sK + st * BN * RS, tid))) {
            tile_clean<DT, BN, HD, NT>(sK + st * BN * RS, tid);
            __syncthreads();
        }
        float s[BN / 8][4], dp[BN / 8][4];
        mm_abt2<DT, HD, BN>(s, qA, kB + st * STB, dp, doA, vB + st * STB);
        if (full)
            q_elementwise<BN, false, FEAT>(s, dp, L, Dd, m0 + warp * 16, n0, (int)off, S.sk, p, slope_log2, g, t);
        else
            q_elementwise<BN, true, FEAT>(s, dp, L, Dd, m0 + warp * 16, n0, (int)off, S.sk, p, slope_log2, g, t);
        mm_pb<DT, BN, HD, RSB>(dq, dp, kT + st * STB);
    }
}

template <int DT, int HD, int BN, int NW>
__device__ __forceinline__ void flash_bwd_q(const FlashBwdParams& p) {
    constexpr int BM = 16 * NW;
    const int h = blockIdx.y, z = blockIdx.z;
    const Seq S = seq_of(p, z);
    const int m0 = (gridDim.x - 1 - blockIdx.x) * BM;
    if (m0 >= S.sq) return;
    float dq[HD / 8][4];
#pragma unroll
    for (int i = 0; i < HD / 8; ++i) dq[i][0] = dq[i][1] = dq[i][2] = dq[i][3] = 0.f;
    const bool feat = p.softcap > 0.f || p.alibi != nullptr;
    if (!p.vec_ok)
        q_loop<DT, HD, BN, NW, false, true>(p, S, z, h, m0, dq);
    else if (feat)
        q_loop<DT, HD, BN, NW, true, true>(p, S, z, h, m0, dq);
    else
        q_loop<DT, HD, BN, NW, true, false>(p, S, z, h, m0, dq);
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
    u16* dqg = (u16*)p.dq + z * p.dq_sb + (i64)S.q_start * p.dq_ss + h * p.dq_sh;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int i = m0 + warp * 16 + g + 8 * r;
        if (i < S.sq) {
            u16* row = dqg + (i64)i * p.dq_ss;
#pragma unroll
            for (int nt = 0; nt < HD / 8; ++nt) {
                const int col = nt * 8 + 2 * t;
                if (col < p.hd) {
                    const unsigned w = Mma<DT>::pack(dq[nt][2 * r] * p.scale, dq[nt][2 * r + 1] * p.scale);
                    if (p.o_vec_ok) {
                        *(unsigned*)(row + col) = w;
                    } else {
                        row[col] = (u16)(w & 0xffffu);
                        row[col + 1] = (u16)(w >> 16);
                    }
                }
            }
        }
    }
}

}  // namespace fab

// ----------------------------------------------------------------------------
// Entry points. Modules (src/cuda/mod.rs): flash_attn_bwd_aux (FAB_MODULE 0:
// the preprocess and dq-convert kernels of both dtypes) and
// flash_attn_bwd_<dt>_hd<HD> (FAB_MODULE 1 with FAB_ONLY_DT/FAB_ONLY_HD: the
// key-tile kernel flash_bwd_<dt>_hd<HD>_n<BN>m<BM>w<WD> and the deterministic
// dQ kernel flash_bwd_dqk_<dt>_hd<HD>_n<BN>w<NW>). Without FAB_MODULE (CI's
// checker) everything compiles. src/cuda/attention_bwd.rs mirrors the table.
// ----------------------------------------------------------------------------
#if !defined(FAB_MODULE) || FAB_MODULE == 0
extern "C" __global__ void __launch_bounds__(256) flash_bwd_pre_bf16(const __grid_constant__ FlashBwdParams p) { fab::bwd_pre<DT_BF16>(p); }
extern "C" __global__ void __launch_bounds__(256) flash_bwd_pre_f16(const __grid_constant__ FlashBwdParams p) { fab::bwd_pre<DT_F16>(p); }
extern "C" __global__ void __launch_bounds__(256) flash_bwd_dq_bf16(const __grid_constant__ FlashBwdParams p) { fab::bwd_dq<DT_BF16>(p); }
extern "C" __global__ void __launch_bounds__(256) flash_bwd_dq_f16(const __grid_constant__ FlashBwdParams p) { fab::bwd_dq<DT_F16>(p); }
#endif

#if !defined(FAB_MODULE) || (FAB_MODULE == 1 && FAB_ONLY_HD == 32 && FAB_ONLY_DT == DT_BF16)
extern "C" __global__ void __launch_bounds__(256, 1) flash_bwd_bf16_hd32_n128m64w1(const __grid_constant__ FlashBwdParams p) { fab::flash_bwd_kv<DT_BF16, 32, 128, 64, 1>(p); }
extern "C" __global__ void __launch_bounds__(128, 1) flash_bwd_dqk_bf16_hd32_n64w4(const __grid_constant__ FlashBwdParams p) { fab::flash_bwd_q<DT_BF16, 32, 64, 4>(p); }
#endif
#if !defined(FAB_MODULE) || (FAB_MODULE == 1 && FAB_ONLY_HD == 64 && FAB_ONLY_DT == DT_BF16)
extern "C" __global__ void __launch_bounds__(256, 1) flash_bwd_bf16_hd64_n128m64w1(const __grid_constant__ FlashBwdParams p) { fab::flash_bwd_kv<DT_BF16, 64, 128, 64, 1>(p); }
extern "C" __global__ void __launch_bounds__(128, 1) flash_bwd_dqk_bf16_hd64_n64w4(const __grid_constant__ FlashBwdParams p) { fab::flash_bwd_q<DT_BF16, 64, 64, 4>(p); }
#endif
#if !defined(FAB_MODULE) || (FAB_MODULE == 1 && FAB_ONLY_HD == 96 && FAB_ONLY_DT == DT_BF16)
extern "C" __global__ void __launch_bounds__(256, 1) flash_bwd_bf16_hd96_n128m64w1(const __grid_constant__ FlashBwdParams p) { fab::flash_bwd_kv<DT_BF16, 96, 128, 64, 1>(p); }
extern "C" __global__ void __launch_bounds__(128, 1) flash_bwd_dqk_bf16_hd96_n64w4(const __grid_constant__ FlashBwdParams p) { fab::flash_bwd_q<DT_BF16, 96, 64, 4>(p); }
#endif
#if !defined(FAB_MODULE) || (FAB_MODULE == 1 && FAB_ONLY_HD == 128 && FAB_ONLY_DT == DT_BF16)
extern "C" __global__ void __launch_bounds__(256, 1) flash_bwd_bf16_hd128_n128m64w1(const __grid_constant__ FlashBwdParams p) { fab::flash_bwd_kv<DT_BF16, 128, 128, 64, 1>(p); }
extern "C" __global__ void __launch_bounds__(128, 1) flash_bwd_dqk_bf16_hd128_n64w4(const __grid_constant__ FlashBwdParams p) { fab::flash_bwd_q<DT_BF16, 128, 64, 4>(p); }
#endif
#if !defined(FAB_MODULE) || (FAB_MODULE == 1 && FAB_ONLY_HD == 256 && FAB_ONLY_DT == DT_BF16)
extern "C" __global__ void __launch_bounds__(256, 1) flash_bwd_bf16_hd256_n64m32w2(const __grid_constant__ FlashBwdParams p) { fab::flash_bwd_kv<DT_BF16, 256, 64, 32, 2>(p); }
extern "C" __global__ void __launch_bounds__(128, 1) flash_bwd_dqk_bf16_hd256_n32w4(const __grid_constant__ FlashBwdParams p) { fab::flash_bwd_q<DT_BF16, 256, 32, 4>(p); }
#endif
#if !defined(FAB_MODULE) || (FAB_MODULE == 1 && FAB_ONLY_HD == 32 && FAB_ONLY_DT == DT_F16)
extern "C" __global__ void __launch_bounds__(256, 1) flash_bwd_f16_hd32_n128m64w1(const __grid_constant__ FlashBwdParams p) { fab::flash_bwd_kv<DT_F16, 32, 128, 64, 1>(p); }
extern "C" __global__ void __launch_bounds__(128, 1) flash_bwd_dqk_f16_hd32_n64w4(const __grid_constant__ FlashBwdParams p) { fab::flash_bwd_q<DT_F16, 32, 64, 4>(p); }
#endif
#if !defined(FAB_MODULE) || (FAB_MODULE == 1 && FAB_ONLY_HD == 64 && FAB_ONLY_DT == DT_F16)
extern "C" __global__ void __launch_bounds__(256, 1) flash_bwd_f16_hd64_n128m64w1(const __grid_constant__ FlashBwdParams p) { fab::flash_bwd_kv<DT_F16, 64, 128, 64, 1>(p); }
extern "C" __global__ void __launch_bounds__(128, 1) flash_bwd_dqk_f16_hd64_n64w4(const __grid_constant__ FlashBwdParams p) { fab::flash_bwd_q<DT_F16, 64, 64, 4>(p); }
#endif
#if !defined(FAB_MODULE) || (FAB_MODULE == 1 && FAB_ONLY_HD == 96 && FAB_ONLY_DT == DT_F16)
extern "C" __global__ void __launch_bounds__(256, 1) flash_bwd_f16_hd96_n128m64w1(const __grid_constant__ FlashBwdParams p) { fab::flash_bwd_kv<DT_F16, 96, 128, 64, 1>(p); }
extern "C" __global__ void __launch_bounds__(128, 1) flash_bwd_dqk_f16_hd96_n64w4(const __grid_constant__ FlashBwdParams p) { fab::flash_bwd_q<DT_F16, 96, 64, 4>(p); }
#endif
#if !defined(FAB_MODULE) || (FAB_MODULE == 1 && FAB_ONLY_HD == 128 && FAB_ONLY_DT == DT_F16)
extern "C" __global__ void __launch_bounds__(256, 1) flash_bwd_f16_hd128_n128m64w1(const __grid_constant__ FlashBwdParams p) { fab::flash_bwd_kv<DT_F16, 128, 128, 64, 1>(p); }
extern "C" __global__ void __launch_bounds__(128, 1) flash_bwd_dqk_f16_hd128_n64w4(const __grid_constant__ FlashBwdParams p) { fab::flash_bwd_q<DT_F16, 128, 64, 4>(p); }
#endif
#if !defined(FAB_MODULE) || (FAB_MODULE == 1 && FAB_ONLY_HD == 256 && FAB_ONLY_DT == DT_F16)
extern "C" __global__ void __launch_bounds__(256, 1) flash_bwd_f16_hd256_n64m32w2(const __grid_constant__ FlashBwdParams p) { fab::flash_bwd_kv<DT_F16, 256, 64, 32, 2>(p); }
extern "C" __global__ void __launch_bounds__(128, 1) flash_bwd_dqk_f16_hd256_n32w4(const __grid_constant__ FlashBwdParams p) { fab::flash_bwd_q<DT_F16, 256, 32, 4>(p); }
#endif
