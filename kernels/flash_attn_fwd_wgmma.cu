// Flash-attention forward (SPEC §3) on Hopper's warpgroup MMA (wgmma, sm_90a).
// @nvrtc-arch-specific: the host compiles this file for sm_90a on a 9.0 device
// (src/cuda/nvrtc.rs); on any other target the body below compiles to nothing.
//
// Scope (the host routes only these here, src/cuda/attention_wgmma.rs; the rest
// keeps using flash_attn_fwd.cu): float16/bfloat16, head dim exactly 128, rows
// 16-byte aligned, no softcap / ALiBi / varlen, softmax_scale > 0. Every mask
// (causal, sliding window, none), GQA/MQA, sq != sk (bottom-right alignment)
// and the returned lse follow the same semantics as flash_attn_fwd.cu:
//     query i sees key j iff i + sk - sq - left <= j <= i + sk - sq + right
//     and 0 <= j < sk (left/right = -1: unbounded); O = 0, lse = -inf for a row
//     that sees no key.
//
// Design. One CTA of two warpgroups (256 threads) per (128 query rows, query
// head, batch entry); warpgroup w owns rows 64w..64w+63 of the tile. Tiles of
// BN = 128 keys. Shared memory holds Q (128 x 128) and two stages each of K
// and V (128 x 128), all in the 128-byte-swizzled layout wgmma reads through
// matrix descriptors: a tile of R rows x 128 columns is two column halves of
// R x 64 elements (128 bytes a row); 16-byte chunk c of row r sits at chunk
// c ^ (r & 7) of its row, and every half starts on a 1024-byte boundary.
//   S = Q·Kᵀ:  wgmma m64n128k16, A = Q and B = K both from shared memory,
//              K-major (no transpose), SBO = 1024 (8 rows), K steps of 16
//              columns = +32 bytes inside a half.
//   O += P·V:  wgmma m64n128k16, A = P from registers (the S accumulator
//              fragment converted to 16-bit pairs: the accumulator layout of
//              m64nN equals the A-fragment layout, as with mma.sync), B = V
//              from shared memory with the transpose flag (V is stored keys x
//              head-dim, i.e. MN-major): LBO = offset between the two 64-column
//              halves, SBO = 1024 (8 keys), K steps of 16 keys = +2048 bytes.
// All 256 threads load with cp.async (zero-fill past the sequence), then
// fence.proxy.async makes the generic-proxy writes visible to wgmma.
// Pipeline per key tile j (K runs one tile ahead of V):
//     barrier; issue S(j) = Q·K(j)ᵀ; issue O += P(j-1)·V(j-1);
//     cp.async K(j+1), V(j) into the other stages;
//     wait for S(j) only; mask + online softmax of S(j) (overlaps the P·V on
//     the tensor cores); wait for P·V; O *= alpha(j); P(j) = 16-bit(S(j)).
// The softmax runs in log2 units with the scale folded into the exp2's FMA.
//
// Launch: grid (ceil(sq / 128), hq, b), block 256, dynamic shared memory
// FAW_SMEM bytes (5 tiles of 32 KiB + 1 KiB for aligning the base to 1024).

struct FlashFwdParams {
    const void* q;
    const void* k;
    const void* v;
    void* out;
    float* lse;           // may be null
    const float* alibi;   // must be null here
    const int* cu_q;      // must be null here
    const int* cu_k;
    i64 q_sb, q_ss, q_sh;
    i64 k_sb, k_ss, k_sh;
    i64 v_sb, v_ss, v_sh;
    i64 o_sb, o_ss, o_sh;
    i64 lse_sb, lse_sh, lse_ss;
    i64 alibi_sb, alibi_sh;
    int b, hq, hk, hd;
    int sq, sk;
    int left, right;      // -1: unbounded
    float scale_log2;     // softmax_scale · log2(e), > 0 here
    float softcap;        // 0 here
    float softcap_in;
    float softcap_out;
    int vec_ok;           // 1 here
    int o_vec_ok;         // out pairs 4-byte aligned
};

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

#define FAW_LN2 0.6931471805599453f
#define FAW_NEG_INF (-__int_as_float(0x7f800000))

namespace faw {

using namespace tc;

constexpr int HD = 128;
constexpr int BM = 128;  // query rows per CTA (2 warpgroups x 64)
constexpr int BN = 128;  // keys per tile
constexpr unsigned TILE_B = 128 * HD * 2;  // one 128 x 128 16-bit tile: 32 KiB
constexpr unsigned HALF_B = 128 * 128;     // one 64-column half of a 128-row tile

__device__ __forceinline__ void cp16(unsigned dst, const void* src, int bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes));
}

// Loads rows [row0, row0 + 128) (zero-filled at or past `nvalid`) of a
// row-major 128-column matrix with row stride `rs` into the swizzled tile at
// shared address `s`. 256 threads: thread t moves chunk t % 16 of rows
// t / 16 + 16 i, so its swizzled column is the same for every i.
__device__ __forceinline__ void load_tile(unsigned s, const u16* g, i64 rs, int row0, int nvalid, int tid) {
    const int ch = tid & 15, r0 = tid >> 4;
    const unsigned dst0 = s + (ch >> 3) * HALF_B + r0 * 128 + (((ch & 7) ^ (r0 & 7)) << 4);
    const u16* src0 = g + (i64)(row0 + r0) * rs + ch * 8;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const bool ok = row0 + r0 + 16 * i < nvalid;
        cp16(dst0 + i * 16 * 128, ok ? (const void*)(src0 + (i64)(16 * i) * rs) : (const void*)g, ok ? 16 : 0);
    }
}

// wgmma shared-memory matrix descriptor, 128-byte swizzle.
__device__ __forceinline__ unsigned long long desc(unsigned addr, unsigned lbo, unsigned sbo) {
    return (unsigned long long)((addr & 0x3FFFF) >> 4) | ((unsigned long long)((lbo & 0x3FFFF) >> 4) << 16) |
           ((unsigned long long)((sbo & 0x3FFFF) >> 4) << 32) | (1ull << 62);
}

__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wg_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Pins the accumulator registers after a wait (no read of them is hoisted above it).
__device__ __forceinline__ void fence_regs(float (&d)[64]) {
#pragma unroll
    for (int i = 0; i < 64; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

#define FAW_D64                                                                                               \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                                 \
    "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "                        \
    "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "                        \
    "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"
#define FAW_O8(i)                                                                                             \
    "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), "+f"(d[i + 6]), \
        "+f"(d[i + 7])
#define FAW_O64 FAW_O8(0), FAW_O8(8), FAW_O8(16), FAW_O8(24), FAW_O8(32), FAW_O8(40), FAW_O8(48), FAW_O8(56)

template <int DT> struct Wg;
#define FAW_WG(DTC, PT)                                                                                       \
    template <> struct Wg<DTC> {                                                                              \
        /* d (+)= A·B, A and B from shared memory, both K-major. */                                           \
        static __device__ __forceinline__ void ss(float (&d)[64], unsigned long long da, unsigned long long db, \
                                                  int acc) {                                                  \
            asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                         \
                         "wgmma.mma_async.sync.aligned.m64n128k16.f32." PT "." PT " " FAW_D64                 \
                         ", %64, %65, p, 1, 1, 0, 0;\n}\n"                                                    \
                         : FAW_O64                                                                            \
                         : "l"(da), "l"(db), "r"(acc));                                                       \
        }                                                                                                     \
        /* d += A·B, A from registers, B from shared memory MN-major (transposed). */                         \
        static __device__ __forceinline__ void rs(float (&d)[64], const unsigned (&a)[4], unsigned long long db) { \
            asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"                                         \
                         "wgmma.mma_async.sync.aligned.m64n128k16.f32." PT "." PT " " FAW_D64                 \
                         ", {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"                                     \
                         : FAW_O64                                                                            \
                         : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1));                      \
        }                                                                                                     \
    };
FAW_WG(DT_BF16, "bf16")
FAW_WG(DT_F16, "f16")

// Waits for this thread's cp.async groups, publishes the writes to the async
// proxy (wgmma reads through it) and joins the CTA.
__device__ __forceinline__ void landed() {
    cp_async_wait_all();
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    __syncthreads();
}

// Issues S = Q·Kᵀ (8 wgmma k-steps over the head dim) for a warpgroup's 64 rows.
template <int DT>
__device__ __forceinline__ void qk(float (&s)[64], unsigned qa, unsigned ka) {
#pragma unroll
    for (int kk = 0; kk < HD / 16; ++kk) {
        const unsigned koff = (kk >> 2) * HALF_B + (kk & 3) * 32;
        Wg<DT>::ss(s, desc(qa + koff, 16, 1024), desc(ka + koff, 16, 1024), kk > 0);
    }
}

// Issues O += P·V (8 wgmma k-steps over the tile's keys).
template <int DT>
__device__ __forceinline__ void pv(float (&o)[64], const unsigned (&pa)[8][4], unsigned va) {
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) Wg<DT>::rs(o, pa[kk], desc(va + kk * 2048, HALF_B, 1024));
}

// Mask (only on tiles that straddle the band's edges) and online softmax of
// one tile of raw scores in place: s becomes P = exp2(s·scale_log2 - m).
__device__ __forceinline__ void softmax(float (&s)[64], float (&alpha)[2], float (&mrow)[2], float (&lrow)[2],
                                        int k0, i64 lo_all, i64 hi_all, const int (&lo)[2], const int (&hi)[2],
                                        int t, float sl2) {
    if (!(k0 >= lo_all && k0 + BN - 1 <= hi_all)) {
#pragma unroll
        for (int i = 0; i < BN / 8; ++i)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int r = e >> 1;
                const int col = k0 + 8 * i + 2 * t + (e & 1);
                if (col < lo[r] || col > hi[r]) s[4 * i + e] = FAW_NEG_INF;
            }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float mx = FAW_NEG_INF;
#pragma unroll
        for (int i = 0; i < BN / 8; ++i) mx = fmaxf(mx, fmaxf(s[4 * i + 2 * r], s[4 * i + 2 * r + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float mnew = fmaxf(mrow[r], mx * sl2);
        const float muse = mnew == FAW_NEG_INF ? 0.f : mnew;
        alpha[r] = ex2(mrow[r] - muse);
        mrow[r] = mnew;
        float sum = 0.f;
#pragma unroll
        for (int i = 0; i < BN / 8; ++i) {
            s[4 * i + 2 * r] = ex2(fmaf(s[4 * i + 2 * r], sl2, -muse));
            s[4 * i + 2 * r + 1] = ex2(fmaf(s[4 * i + 2 * r + 1], sl2, -muse));
            sum += s[4 * i + 2 * r] + s[4 * i + 2 * r + 1];
        }
        lrow[r] = lrow[r] * alpha[r] + sum;
    }
}

// P (f32 accumulator fragment) → the 16-bit A fragments of the 8 k-steps of P·V.
template <int DT>
__device__ __forceinline__ void to_a(unsigned (&pa)[8][4], const float (&s)[64]) {
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
        pa[kk][0] = Mma<DT>::pack(s[8 * kk], s[8 * kk + 1]);
        pa[kk][1] = Mma<DT>::pack(s[8 * kk + 2], s[8 * kk + 3]);
        pa[kk][2] = Mma<DT>::pack(s[8 * kk + 4], s[8 * kk + 5]);
        pa[kk][3] = Mma<DT>::pack(s[8 * kk + 6], s[8 * kk + 7]);
    }
}

// Before O += P·V of an edge tile (keys k0.., one the mask cuts) whose V
// stage `sv` (generic pointer to the swizzled 128 x 128 tile) holds a
// non-finite value (rare; one scan and barrier per edge tile): adds to O the
// non-finite V values of the keys each of this thread's rows sees (as P·V
// would for P > 0), then zeroes them in the tile, so that a masked key's
// P = 0 never multiplies a NaN/inf. O is settled (no wgmma in flight) and
// scaled to the tile's max already.
template <int DT>
__device__ __forceinline__ void fix_edge_v(float (&o)[64], u16* sv, int k0, const int (&lo)[2], const int (&hi)[2],
                                           int tid, int t) {
    uint4* v4 = (uint4*)sv;  // 2048 chunks of 16 bytes, 8 per thread
    bool bad = false;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const uint4 w = v4[tid + 256 * i];
        bad |= nonfinite2<DT>(w.x) | nonfinite2<DT>(w.y) | nonfinite2<DT>(w.z) | nonfinite2<DT>(w.w);
    }
    if (!__syncthreads_or(bad)) return;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int ja = max(lo[r], k0) - k0, jb = min(hi[r], k0 + BN - 1) - k0;
        for (int kk = ja; kk <= jb; ++kk) {
#pragma unroll
            for (int i = 0; i < HD / 8; ++i) {
                const int c = 8 * i + 2 * t;  // columns c, c + 1 of o[4i + 2r], o[4i + 2r + 1]
                const int off = (c >> 6) * HALF_B + kk * 128 + ((((c & 63) >> 3) ^ (kk & 7)) << 4) + (c & 7) * 2;
                const unsigned w = *(const unsigned*)((const unsigned char*)sv + off);
                if (nonfinite2<DT>(w)) {
                    const float x0 = Mma<DT>::ld((u16)(w & 0xffffu)), x1 = Mma<DT>::ld((u16)(w >> 16));
                    if (nonfinite(x0)) o[4 * i + 2 * r] += x0;
                    if (nonfinite(x1)) o[4 * i + 2 * r + 1] += x1;
                }
            }
        }
    }
    __syncthreads();  // every thread has read the tile
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const uint4 w = v4[tid + 256 * i];
        v4[tid + 256 * i] = make_uint4(clean2<DT>(w.x), clean2<DT>(w.y), clean2<DT>(w.z), clean2<DT>(w.w));
    }
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // visible to wgmma
    __syncthreads();
}

template <int DT>
__device__ __forceinline__ void flash_fwd(const FlashFwdParams& p) {
    extern __shared__ __align__(16) unsigned char faw_smem[];
    const unsigned base = (smem_u32(faw_smem) + 1023u) & ~1023u;
    const unsigned sQ = base, sK = base + TILE_B, sV = base + 3 * TILE_B;

    const int tid = threadIdx.x, wg = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const int m_block = gridDim.x - 1 - blockIdx.x;  // longest (causal) tiles first
    const int h = blockIdx.y, z = blockIdx.z;
    const int sq = p.sq, sk = p.sk;
    const int m0 = m_block * BM;
    if (m0 >= sq) return;
    const int hkv = h / (p.hq / p.hk);
    const u16* qg = (const u16*)p.q + z * p.q_sb + h * p.q_sh;
    const u16* kg = (const u16*)p.k + z * p.k_sb + hkv * p.k_sh;
    const u16* vg = (const u16*)p.v + z * p.v_sb + hkv * p.v_sh;

    // Visible key band of the CTA's rows (64-bit: left/right may be huge).
    const i64 off = (i64)sk - sq;
    const i64 m_last = (i64)min(m0 + BM, sq) - 1;
    const i64 n_lo = p.left < 0 ? 0 : max((i64)0, m0 + off - p.left);
    const i64 n_hi = p.right < 0 ? (i64)sk - 1 : min((i64)sk - 1, m_last + off + p.right);
    // Keys every row of the CTA sees: [lo_all, hi_all] (tiles inside need no mask).
    const i64 lo_all = p.left < 0 ? 0 : m_last + off - p.left;
    const i64 hi_all = p.right < 0 ? (i64)sk - 1 : min((i64)sk - 1, m0 + off + p.right);
    const int n_tiles = n_lo <= n_hi ? (int)(n_hi / BN - n_lo / BN + 1) : 0;
    const int kb0 = n_lo <= n_hi ? (int)(n_hi / BN) : 0;

    // This thread's two rows (g and g + 8 of its warp's 16) and their bands.
    int lo[2], hi[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const i64 row = m0 + wg * 64 + warp * 16 + g + 8 * r;
        lo[r] = (int)(p.left < 0 ? 0 : max((i64)0, min((i64)sk, row + off - p.left)));
        hi[r] = (int)(p.right < 0 ? (i64)sk - 1 : max((i64)-1, min((i64)sk - 1, row + off + p.right)));
    }

    float o[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) o[i] = 0.f;
    float mrow[2] = {FAW_NEG_INF, FAW_NEG_INF}, lrow[2] = {0.f, 0.f};

    if (n_tiles > 0) {
        const float sl2 = p.scale_log2;
        const unsigned qa = sQ + wg * 64 * 128;  // this warpgroup's Q rows
        float s[64];
        unsigned pa[8][4];
        float alpha[2];
        load_tile(sQ, qg, p.q_ss, m0, sq, tid);
        load_tile(sK, kg, p.k_ss, kb0 * BN, sk, tid);
        cp_async_commit();

        // Tile 0: S(0) alone.
        landed();
        if (n_tiles > 1) load_tile(sK + TILE_B, kg, p.k_ss, (kb0 - 1) * BN, sk, tid);
        load_tile(sV, vg, p.v_ss, kb0 * BN, sk, tid);
        cp_async_commit();
        wg_fence();
        qk<DT>(s, qa, sK);
        wg_commit();
        wg_wait<0>();
        fence_regs(s);
        softmax(s, alpha, mrow, lrow, kb0 * BN, lo_all, hi_all, lo, hi, t, sl2);
        to_a<DT>(pa, s);

        // Tiles 1 .. n-1: S(j) and P(j-1)·V(j-1) in flight together; the
        // softmax of S(j) runs while the tensor cores do P·V.
        // Generic pointer to shared address a (for the edge fix-up's scan).
        auto gen = [&](unsigned a) { return (u16*)(faw_smem + (a - smem_u32(faw_smem))); };
        for (int j = 1; j < n_tiles; ++j) {
            landed();  // K(j), V(j-1) landed; every warp is done with K(j-1), V(j-2)
            const int kp = (kb0 - j + 1) * BN;  // tile j-1, whose P·V goes out now
            if (!(kp >= lo_all && kp + BN - 1 <= hi_all))
                fix_edge_v<DT>(o, gen(sV + ((j - 1) & 1) * TILE_B), kp, lo, hi, tid, t);
            wg_fence();
            qk<DT>(s, qa, sK + (j & 1) * TILE_B);
            wg_commit();
            pv<DT>(o, pa, sV + ((j - 1) & 1) * TILE_B);
            wg_commit();
            // The next tiles' loads go out once the tensor cores have work
            // (they fill the other stages, which no wgmma in flight reads).
            if (j + 1 < n_tiles) load_tile(sK + ((j + 1) & 1) * TILE_B, kg, p.k_ss, (kb0 - j - 1) * BN, sk, tid);
            load_tile(sV + (j & 1) * TILE_B, vg, p.v_ss, (kb0 - j) * BN, sk, tid);
            cp_async_commit();
            wg_wait<1>();
            fence_regs(s);
            softmax(s, alpha, mrow, lrow, (kb0 - j) * BN, lo_all, hi_all, lo, hi, t, sl2);
            wg_wait<0>();
            fence_regs(o);
#pragma unroll
            for (int i = 0; i < HD / 8; ++i) {
                o[4 * i] *= alpha[0];
                o[4 * i + 1] *= alpha[0];
                o[4 * i + 2] *= alpha[1];
                o[4 * i + 3] *= alpha[1];
            }
            to_a<DT>(pa, s);
        }

        // The last P·V.
        landed();
        const int kp = (kb0 - n_tiles + 1) * BN;
        if (!(kp >= lo_all && kp + BN - 1 <= hi_all))
            fix_edge_v<DT>(o, gen(sV + ((n_tiles - 1) & 1) * TILE_B), kp, lo, hi, tid, t);
        wg_fence();
        pv<DT>(o, pa, sV + ((n_tiles - 1) & 1) * TILE_B);
        wg_commit();
        wg_wait<0>();
        fence_regs(o);
    }

    // Epilogue: O / l and lse; rows with no visible key give O = 0, lse = -inf.
    u16* og = (u16*)p.out + z * p.o_sb + h * p.o_sh;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float l = lrow[r];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        const float inv = l > 0.f ? 1.f / l : 0.f;
        const int row = m0 + wg * 64 + warp * 16 + g + 8 * r;
        if (row < sq) {
            u16* orow = og + (i64)row * p.o_ss;
#pragma unroll
            for (int i = 0; i < HD / 8; ++i) {
                const int col = 8 * i + 2 * t;
                const unsigned w = Mma<DT>::pack(o[4 * i + 2 * r] * inv, o[4 * i + 2 * r + 1] * inv);
                if (p.o_vec_ok) {
                    *(unsigned*)(orow + col) = w;
                } else {
                    orow[col] = (u16)(w & 0xffffu);
                    orow[col + 1] = (u16)(w >> 16);
                }
            }
            if (p.lse && t == 0) {
                const float lse = l > 0.f ? (mrow[r] + __log2f(l)) * FAW_LN2 : FAW_NEG_INF;
                p.lse[z * p.lse_sb + h * p.lse_sh + (i64)row * p.lse_ss] = lse;
            }
        }
    }
}

}  // namespace faw

// Entry points: flash_fwd_wgmma_<dtype>_hd128 (src/cuda/attention_wgmma.rs).
// The host registers this file once per dtype with FAW_ONLY_DT defined.
#if !defined(FAW_ONLY_DT) || FAW_ONLY_DT == DT_BF16
extern "C" __global__ void __launch_bounds__(256, 1) flash_fwd_wgmma_bf16_hd128(const __grid_constant__ FlashFwdParams p) { faw::flash_fwd<DT_BF16>(p); }
#endif
#if !defined(FAW_ONLY_DT) || FAW_ONLY_DT == DT_F16
extern "C" __global__ void __launch_bounds__(256, 1) flash_fwd_wgmma_f16_hd128(const __grid_constant__ FlashFwdParams p) { faw::flash_fwd<DT_F16>(p); }
#endif

#endif  // __CUDA_ARCH_FEAT_SM90_ALL
