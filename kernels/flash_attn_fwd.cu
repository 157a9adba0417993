// Flash-attention forward (SPEC §3) on the tensor cores: mma.sync m16n8k16
// (f16/bf16 operands, f32 accumulators), ldmatrix, cp.async; sm_80 and later.
//
// One CTA per (query tile of BM = 16·NW rows, query head, batch entry); NW
// warps, each owning 16 query rows. Q is loaded once (registers, or shared
// memory for the widest head dim); K/V tiles of BN keys stream through two
// shared-memory stages with cp.async, so the next tile loads while the current
// one is used. S = Q·Kᵀ and O += P·V run on mma.sync; the online softmax stays
// in registers in log2 units (the softmax scale folded into log2(e)), with
// exp2 on the SFU. Key tiles outside the visible band of the tile's rows are
// never visited (the loop bounds come from the mask), and the per-element mask
// runs only on tiles that straddle the band's edges.
//
// Semantics (SPEC §3): query i sees key j iff
//     i + sk - sq - left <= j <= i + sk - sq + right and 0 <= j < sk
// (left/right = -1: unbounded). s = scale·q·k; softcap > 0: s = softcap·tanh(s/softcap);
// ALiBi: s -= slope·|i + sk - sq - j|. A row with no visible key gets O = 0 and
// lse = -inf. GQA: query head h reads kv head h / (hq / hk).
// A masked key contributes nothing whatever its bits: keys past sk load as
// zeros, masked scores are selected to -inf, and an edge tile whose V holds a
// non-finite value (one scan per edge tile) is cleaned before P·V, its
// non-finite values added only to the rows that see them (poison_rows).
//
// Head dims are padded up to the instantiated width HD (32, 64, 96, 128, 256):
// the tail columns load as zeros (cp.async zero-fill) and are never stored.
// Layout: q/out (b, s, h, d) and k/v (b, s, hk, d) with arbitrary strides in
// elements (the last one 1); varlen: the batch stride is 0 and row r of entry z
// is token cu_seqlens[z] + r. lse (b, hq, sq) or, varlen, (hq, total_q).
//
// Launch: grid (ceil(max_sq / BM), hq, b), block NW·32 threads, dynamic shared
// memory (BM + 4·BN)·(HD + 8)·2 bytes (rows padded by 16 bytes so ldmatrix is
// free of bank conflicts).

struct FlashFwdParams {
    const void* q;
    const void* k;
    const void* v;
    void* out;
    float* lse;           // may be null
    const float* alibi;   // may be null: (b, hq) or (hq,) through the strides
    const int* cu_q;      // null unless varlen
    const int* cu_k;
    i64 q_sb, q_ss, q_sh;
    i64 k_sb, k_ss, k_sh;
    i64 v_sb, v_ss, v_sh;
    i64 o_sb, o_ss, o_sh;
    i64 lse_sb, lse_sh, lse_ss;
    i64 alibi_sb, alibi_sh;
    int b, hq, hk, hd;
    int sq, sk;           // sequence lengths (varlen: unused, read from cu_*)
    int left, right;      // -1: unbounded
    float scale_log2;     // softmax_scale · log2(e)
    float softcap;        // 0: off
    float softcap_in;     // softmax_scale / softcap
    float softcap_out;    // softcap · log2(e)
    int vec_ok;           // q/k/v rows 16-byte aligned: cp.async path
    int o_vec_ok;         // out pairs 4-byte aligned
};

#define FA_LOG2E 1.4426950408889634f
#define FA_LN2 0.6931471805599453f
#define FA_NEG_INF (-__int_as_float(0x7f800000))

namespace fa {

using namespace tc;

// Loads ROWS rows of HD columns starting at row `row0` of `g` (row stride
// `rs` elements) into `s` (row stride HD + 8). Rows at or past `nvalid`,
// columns at or past `hd`, and everything when `active` is false are
// zero-filled (so the caller needs no branch around a load past the end).
// VEC: 16-byte cp.async (rows 16-byte aligned); else plain 2-byte loads.
template <int ROWS, int HD, int NT, bool VEC>
__device__ __forceinline__ void load_tile(u16* s, const u16* g, i64 rs, int row0, int nvalid, int hd, bool active,
                                          int tid) {
    constexpr int CH = HD / 8;
    constexpr int RS = HD + 8;
    constexpr int TOTAL = ROWS * CH;
    // Chunk i of this thread is c = tid + i·NT: row r0 + i·(NT / CH) when CH
    // divides NT (every instantiation but HD 96), so one base pointer serves all.
    if constexpr (NT % CH == 0) {
        constexpr int RSTEP = NT % CH == 0 ? NT / CH : 1;
        const int r0 = tid / CH, col = (tid % CH) * 8;
        const u16* src = g + (i64)(row0 + r0) * rs + col;
        const i64 step = (i64)RSTEP * rs;
        u16* dst = s + r0 * RS + col;
        const bool colok = active && col < hd;
#pragma unroll
        for (int i = 0; i < TOTAL / NT; ++i) {
            const bool valid = colok && (row0 + r0 + i * RSTEP < nvalid);
            if (VEC) {
                cp_async16(dst + i * RSTEP * RS, valid ? (const void*)(src + i * step) : (const void*)g,
                           valid ? 16 : 0);
            } else {
                const u16* sp = src + i * step;
                unsigned w[4];
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    unsigned lo = valid ? (unsigned)sp[2 * e] : 0u;
                    unsigned hi = valid ? (unsigned)sp[2 * e + 1] : 0u;
                    w[e] = lo | (hi << 16);
                }
                *(uint4*)(dst + i * RSTEP * RS) = make_uint4(w[0], w[1], w[2], w[3]);
            }
        }
    } else {
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
}

struct RowInfo {
    int lo[2], hi[2];  // visible key range of the thread's two rows (inclusive)
    int diag[2];       // i + sk - sq (ALiBi distance origin)
};

// S = Q·Kᵀ for one key tile and the warp's MT m-tiles of 16 rows; each K
// fragment read from shared memory feeds all MT m-tiles. kaddr: this lane's
// ldmatrix address in the K stage; qaddr: in the warp's Q rows (QREG false).
template <int DT, int HD, int MT, int BN, bool QREG>
__device__ __forceinline__ void qk_tile(float (&s)[MT][BN / 8][4], const unsigned (&qf)[MT][QREG ? HD / 16 : 1][4],
                                        unsigned qaddr, unsigned kaddr) {
    constexpr int RSB = (HD + 8) * 2;  // row stride in bytes
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int i = 0; i < BN / 8; ++i) s[mt][i][0] = s[mt][i][1] = s[mt][i][2] = s[mt][i][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < HD / 16; ++kk) {
        unsigned a[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            if (QREG) {
#pragma unroll
                for (int e = 0; e < 4; ++e) a[mt][e] = qf[mt][QREG ? kk : 0][e];
            } else {
                ldsm_x4(a[mt], qaddr + mt * 16 * RSB + kk * 32);
            }
        }
#pragma unroll
        for (int np = 0; np < BN / 16; ++np) {
            unsigned b[4];
            ldsm_x4(b, kaddr + np * 16 * RSB + kk * 32);
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                Mma<DT>::run(s[mt][2 * np], a[mt], b[0], b[1]);
                Mma<DT>::run(s[mt][2 * np + 1], a[mt], b[2], b[3]);
            }
        }
    }
}

// Scores of one tile → log2 units (scale, softcap, ALiBi, mask), online
// softmax update: s becomes P, O is rescaled. FEAT: softcap/ALiBi may be on
// (else plain scale).
template <int DT, int HD, int MT, int BN, bool MASK, bool FEAT>
__device__ __forceinline__ void softmax_tile(float (&s)[MT][BN / 8][4], float (&o)[MT][HD / 8][4],
                                             float (&mrow)[MT][2], float (&lrow)[MT][2], int kbase,
                                             const RowInfo (&ri)[MT], const FlashFwdParams& p, float slope_log2,
                                             int lane) {
    const int t = lane & 3;
    const bool capped = FEAT && p.softcap > 0.f;
    const bool alibi = FEAT && slope_log2 != 0.f;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int r = e >> 1;
                const int j = kbase + nt * 8 + 2 * t + (e & 1);
                float x = s[mt][nt][e];
                // Plain path: x stays in raw units (scale > 0 is folded into the exp below).
                if (capped) {
                    float th;
                    x = capped_logit(x, th, p.scale_log2, p.softcap_in, p.softcap_out);
                } else if (FEAT) {
                    x *= p.scale_log2;
                }
                if (alibi) x -= slope_log2 * fabsf((float)(ri[mt].diag[r] - j));
                if (MASK && (j < ri[mt].lo[r] || j > ri[mt].hi[r])) x = FA_NEG_INF;
                s[mt][nt][e] = x;
            }
        }
    }

    // Online softmax (each row lives in 4 lanes: reduce over lane bits 0, 1).
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float mx = FA_NEG_INF;
#pragma unroll
            for (int nt = 0; nt < BN / 8; ++nt) mx = fmaxf(mx, fmaxf(s[mt][nt][2 * r], s[mt][nt][2 * r + 1]));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            if (!FEAT) mx *= p.scale_log2;  // raw → log2 units (scale > 0 on this path)
            const float mnew = fmaxf(mrow[mt][r], mx);
            const float muse = (mnew == FA_NEG_INF) ? 0.f : mnew;
            const float alpha = ex2(mrow[mt][r] - muse);
            mrow[mt][r] = mnew;
            const float sl2 = FEAT ? 1.f : p.scale_log2;
            float sum = 0.f;
#pragma unroll
            for (int nt = 0; nt < BN / 8; ++nt) {
                s[mt][nt][2 * r] = ex2(fmaf(s[mt][nt][2 * r], sl2, -muse));
                s[mt][nt][2 * r + 1] = ex2(fmaf(s[mt][nt][2 * r + 1], sl2, -muse));
                sum += s[mt][nt][2 * r] + s[mt][nt][2 * r + 1];
            }
            lrow[mt][r] = lrow[mt][r] * alpha + sum;
#pragma unroll
            for (int nt = 0; nt < HD / 8; ++nt) {
                o[mt][nt][2 * r] *= alpha;
                o[mt][nt][2 * r + 1] *= alpha;
            }
        }
    }
}

// O += P·V; each V fragment feeds all MT m-tiles.
template <int DT, int HD, int MT, int BN>
__device__ __forceinline__ void pv_tile(const float (&s)[MT][BN / 8][4], unsigned vaddr, float (&o)[MT][HD / 8][4]) {
    constexpr int RSB = (HD + 8) * 2;
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
        unsigned a[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            a[mt][0] = Mma<DT>::pack(s[mt][2 * kk][0], s[mt][2 * kk][1]);
            a[mt][1] = Mma<DT>::pack(s[mt][2 * kk][2], s[mt][2 * kk][3]);
            a[mt][2] = Mma<DT>::pack(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
            a[mt][3] = Mma<DT>::pack(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
        }
#pragma unroll
        for (int np = 0; np < HD / 16; ++np) {
            unsigned b[4];
            ldsm_x4_t(b, vaddr + kk * 16 * RSB + np * 32);
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                Mma<DT>::run(o[mt][2 * np], a[mt], b[0], b[1]);
                Mma<DT>::run(o[mt][2 * np + 1], a[mt], b[2], b[3]);
            }
        }
    }
}

template <int DT, int HD, int MT, int BN, bool MASK, bool FEAT>
__device__ __forceinline__ void softmax_pv(float (&s)[MT][BN / 8][4], unsigned vaddr, float (&o)[MT][HD / 8][4],
                                           float (&mrow)[MT][2], float (&lrow)[MT][2], int kbase,
                                           const RowInfo (&ri)[MT], const FlashFwdParams& p, float slope_log2,
                                           int lane) {
    softmax_tile<DT, HD, MT, BN, MASK, FEAT>(s, o, mrow, lrow, kbase, ri, p, slope_log2, lane);
    pv_tile<DT, HD, MT, BN>(s, vaddr, o);
}

// Edge tile with a non-finite V (rare): adds to O the non-finite V values of
// the tile's keys (k0..) that each of this thread's rows sees, as the sum
// P·V would for P > 0, so that P·V over the cleaned tile (non-finite → 0)
// carries exactly the poison of visible keys and none of the masked ones
// (a masked P of 0 times NaN would be NaN).
template <int DT, int HD, int MT, int BN>
__device__ __forceinline__ void poison_rows(float (&o)[MT][HD / 8][4], const u16* sv, int k0, const RowInfo (&ri)[MT],
                                            int lane) {
    constexpr int RS = HD + 8;
    const int t = lane & 3;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int ja = max(ri[mt].lo[r], k0) - k0, jb = min(ri[mt].hi[r], k0 + BN - 1) - k0;
            for (int jj = ja; jj <= jb; ++jj) {
#pragma unroll
                for (int nt = 0; nt < HD / 8; ++nt) {
                    const unsigned w = *(const unsigned*)(sv + jj * RS + nt * 8 + 2 * t);
                    if (nonfinite2<DT>(w)) {
                        const float x0 = Mma<DT>::ld((u16)(w & 0xffffu)), x1 = Mma<DT>::ld((u16)(w >> 16));
                        if (nonfinite(x0)) o[mt][nt][2 * r] += x0;
                        if (nonfinite(x1)) o[mt][nt][2 * r + 1] += x1;
                    }
                }
            }
        }
}

// Everything a CTA needs to know about its work, set up once.
struct Ctx {
    const u16 *qg, *kg, *vg;
    int sq, sk, m0, n_tiles, kb0, lo_all, hi_all;
    float slope_log2;
};

// One iteration of the key-tile loop (see main_loop): loads for it+2 / it+1,
// S(it+1) into s_next, softmax of s_cur and O += P·V for tile it.
template <int DT, int HD, int NW, int MT, int BN, bool QREG, bool VEC, bool FEAT>
__device__ __forceinline__ void loop_step(int it, const FlashFwdParams& p, const Ctx& c, u16* sK, u16* sV,
                                          unsigned kaddr0, unsigned vaddr0, unsigned qaddr,
                                          const unsigned (&qf)[MT][QREG ? HD / 16 : 1][4],
                                          float (&s_cur)[MT][BN / 8][4], float (&s_next)[MT][BN / 8][4],
                                          float (&o)[MT][HD / 8][4], float (&mrow)[MT][2], float (&lrow)[MT][2],
                                          const RowInfo (&ri)[MT], int tid, int lane) {
    constexpr int NT = 32 * NW;
    constexpr int RS = HD + 8;
    constexpr unsigned STAGE_B = BN * RS * 2;
    const int n = c.n_tiles;
    cp_async_wait_all();
    __syncthreads();  // K(it+1), V(it) landed; every warp is done with K(it), V(it-1)
    const int kb = c.kb0 - it;
    load_tile<BN, HD, NT, VEC>(sK + (it & 1) * BN * RS, c.kg, p.k_ss, (kb - 2) * BN, c.sk, p.hd, it + 2 < n, tid);
    load_tile<BN, HD, NT, VEC>(sV + ((it + 1) & 1) * BN * RS, c.vg, p.v_ss, (kb - 1) * BN, c.sk, p.hd, it + 1 < n,
                               tid);
    cp_async_commit();
    const unsigned kaddr = kaddr0 + ((it + 1) & 1) * STAGE_B;
    const unsigned vaddr = vaddr0 + (it & 1) * STAGE_B;
    const int k0 = kb * BN;
    // S(it+1) and the softmax of S(it) in one basic block per branch, so the
    // scheduler can interleave them. (On the last iteration qk_tile reads a
    // stale stage; the result is unused.)
    if (k0 >= c.lo_all && k0 + BN - 1 <= c.hi_all) {
        qk_tile<DT, HD, MT, BN, QREG>(s_next, qf, qaddr, kaddr);
        softmax_pv<DT, HD, MT, BN, false, FEAT>(s_cur, vaddr, o, mrow, lrow, k0, ri, p, c.slope_log2, lane);
    } else {
        qk_tile<DT, HD, MT, BN, QREG>(s_next, qf, qaddr, kaddr);
        softmax_tile<DT, HD, MT, BN, true, FEAT>(s_cur, o, mrow, lrow, k0, ri, p, c.slope_log2, lane);
        // Edge tile: a non-finite V at a key some row cannot see must not
        // reach that row through P = 0 (see poison_rows). One scan and a
        // barrier per edge tile; the fix-up itself only when one is found.
        u16* sv = sV + (it & 1) * BN * RS;
        if (__syncthreads_or(tile_nonfinite<DT, BN, HD, NT>(sv, tid))) {
            poison_rows<DT, HD, MT, BN>(o, sv, k0, ri, lane);
            __syncthreads();
            tile_clean<DT, BN, HD, NT>(sv, tid);
            __syncthreads();
        }
        pv_tile<DT, HD, MT, BN>(s_cur, vaddr, o);
    }
}

// The key-tile loop. Tiles are visited from the last (kb0) down. Shared
// memory holds K and V in two stages each; K runs one tile ahead of V, so
// iteration `it` issues S(it+1) = Q·K(it+1)ᵀ on the tensor cores before the
// softmax of S(it) (independent work the scheduler interleaves), then
// O += P(it)·V(it). One barrier per iteration; the loads of K(it+2) and
// V(it+1) fly during it. Unrolled by two so S(it) / S(it+1) swap roles
// without copies.
template <int DT, int HD, int NW, int MT, int BN, bool QREG, bool VEC, bool FEAT>
__device__ __forceinline__ void main_loop(const FlashFwdParams& p, const Ctx& c, u16* sQ, u16* sK, u16* sV,
                                          float (&o)[MT][HD / 8][4], float (&mrow)[MT][2], float (&lrow)[MT][2],
                                          const RowInfo (&ri)[MT], int tid, int warp, int lane) {
    constexpr int WM = 16 * MT;
    constexpr int BM = WM * NW;
    constexpr int NT = 32 * NW;
    constexpr int RS = HD + 8;
    const int n = c.n_tiles;
    unsigned qf[MT][QREG ? HD / 16 : 1][4];
    // Per-lane ldmatrix addresses (bytes, shared window): Q rows of this warp
    // (A operand), K stage 0 (B operand of Q·Kᵀ), V stage 0 (B of P·V, transposed).
    const unsigned qaddr = smem_u32(sQ + (warp * WM + (lane & 15)) * RS + (lane >> 4) * 8);
    const unsigned kaddr0 = smem_u32(sK + ((lane & 7) + ((lane >> 4) << 3)) * RS + ((lane >> 3) & 1) * 8);
    const unsigned vaddr0 = smem_u32(sV + ((lane & 7) + ((lane >> 3) & 1) * 8) * RS + (lane >> 4) * 8);

    load_tile<BM, HD, NT, VEC>(sQ, c.qg, p.q_ss, c.m0, c.sq, p.hd, true, tid);
    load_tile<BN, HD, NT, VEC>(sK, c.kg, p.k_ss, c.kb0 * BN, c.sk, p.hd, true, tid);
    cp_async_commit();
    load_tile<BN, HD, NT, VEC>(sK + BN * RS, c.kg, p.k_ss, (c.kb0 - 1) * BN, c.sk, p.hd, n > 1, tid);
    load_tile<BN, HD, NT, VEC>(sV, c.vg, p.v_ss, c.kb0 * BN, c.sk, p.hd, true, tid);
    cp_async_commit();
    asm volatile("cp.async.wait_group 1;\n" ::: "memory");
    __syncthreads();
    if (QREG) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int kk = 0; kk < (QREG ? HD / 16 : 0); ++kk)
                ldsm_x4(qf[mt][kk], qaddr + (mt * 16 * RS + kk * 16) * 2);
    }
    float sa[MT][BN / 8][4], sb[MT][BN / 8][4];
    qk_tile<DT, HD, MT, BN, QREG>(sa, qf, qaddr, kaddr0);

    for (int it = 0; it < n; it += 2) {
        loop_step<DT, HD, NW, MT, BN, QREG, VEC, FEAT>(it, p, c, sK, sV, kaddr0, vaddr0, qaddr, qf, sa, sb, o, mrow,
                                                       lrow, ri, tid, lane);
        if (it + 1 < n)
            loop_step<DT, HD, NW, MT, BN, QREG, VEC, FEAT>(it + 1, p, c, sK, sV, kaddr0, vaddr0, qaddr, qf, sb, sa,
                                                           o, mrow, lrow, ri, tid, lane);
    }
}

template <int DT, int HD, int NW, int MT, int BN, bool QREG>
__device__ __forceinline__ void flash_fwd(const FlashFwdParams& p) {
    constexpr int WM = 16 * MT;  // rows per warp
    constexpr int BM = WM * NW;
    constexpr int RS = HD + 8;
    extern __shared__ __align__(16) unsigned char fa_smem[];
    u16* sQ = (u16*)fa_smem;
    u16* sK = sQ + BM * RS;      // 2 stages
    u16* sV = sK + 2 * BN * RS;  // 2 stages

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const int m_block = gridDim.x - 1 - blockIdx.x;  // longest (causal) tiles first
    const int h = blockIdx.y, z = blockIdx.z;
    Ctx c;
    int q_start = 0, k_start = 0;
    c.sq = p.sq;
    c.sk = p.sk;
    if (p.cu_q) {
        q_start = p.cu_q[z];
        c.sq = p.cu_q[z + 1] - q_start;
        k_start = p.cu_k[z];
        c.sk = p.cu_k[z + 1] - k_start;
    }
    const int sq = c.sq, sk = c.sk;
    c.m0 = m_block * BM;
    const int m0 = c.m0;
    if (m0 >= sq) return;
    const int hkv = h / (p.hq / p.hk);
    c.qg = (const u16*)p.q + z * p.q_sb + (i64)q_start * p.q_ss + h * p.q_sh;
    c.kg = (const u16*)p.k + z * p.k_sb + (i64)k_start * p.k_ss + hkv * p.k_sh;
    c.vg = (const u16*)p.v + z * p.v_sb + (i64)k_start * p.v_ss + hkv * p.v_sh;

    // Band arithmetic in 64 bits (left/right may be up to 2³¹ − 1), clamped
    // back to [-1, sk] where it becomes an int.
    const int off = sk - sq;
    const i64 m_last = min(m0 + BM, sq) - 1;
    const i64 loff = (i64)off - p.left, roff = (i64)off + p.right;
    const int n_lo = p.left < 0 ? 0 : (int)max((i64)0, min((i64)sk, m0 + loff));
    const int n_hi = p.right < 0 ? sk - 1 : (int)max((i64)-1, min((i64)sk - 1, m_last + roff));
    // Keys every row of the tile sees: [lo_all, hi_all].
    c.lo_all = p.left < 0 ? 0 : (int)max((i64)-1, min((i64)sk, m_last + loff));
    c.hi_all = p.right < 0 ? sk - 1 : (int)max((i64)-1, min((i64)sk - 1, m0 + roff));
    c.n_tiles = n_lo <= n_hi ? n_hi / BN - n_lo / BN + 1 : 0;
    c.kb0 = n_lo <= n_hi ? n_hi / BN : 0;

    RowInfo ri[MT];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int row = m0 + warp * WM + mt * 16 + g + 8 * r;
            ri[mt].diag[r] = row + off;
            ri[mt].lo[r] = p.left < 0 ? 0 : (int)max((i64)0, min((i64)sk, row + loff));
            ri[mt].hi[r] = p.right < 0 ? sk - 1 : (int)max((i64)-1, min((i64)sk - 1, row + roff));
        }
    c.slope_log2 = p.alibi ? p.alibi[z * p.alibi_sb + h * p.alibi_sh] * FA_LOG2E : 0.f;

    float o[MT][HD / 8][4];
    float mrow[MT][2], lrow[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int i = 0; i < HD / 8; ++i) o[mt][i][0] = o[mt][i][1] = o[mt][i][2] = o[mt][i][3] = 0.f;
        mrow[mt][0] = mrow[mt][1] = FA_NEG_INF;
        lrow[mt][0] = lrow[mt][1] = 0.f;
    }

    if (c.n_tiles > 0) {
        const bool feat = p.softcap > 0.f || c.slope_log2 != 0.f || !(p.scale_log2 > 0.f);
        if (!p.vec_ok)
            main_loop<DT, HD, NW, MT, BN, QREG, false, true>(p, c, sQ, sK, sV, o, mrow, lrow, ri, tid, warp, lane);
        else if (feat)
            main_loop<DT, HD, NW, MT, BN, QREG, true, true>(p, c, sQ, sK, sV, o, mrow, lrow, ri, tid, warp, lane);
        else
            main_loop<DT, HD, NW, MT, BN, QREG, true, false>(p, c, sQ, sK, sV, o, mrow, lrow, ri, tid, warp, lane);
    }

    // Epilogue: O / l, lse; rows with no visible key give O = 0, lse = -inf.
    u16* og = (u16*)p.out + z * p.o_sb + (i64)q_start * p.o_ss + h * p.o_sh;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float l = lrow[mt][r];
            l += __shfl_xor_sync(0xffffffffu, l, 1);
            l += __shfl_xor_sync(0xffffffffu, l, 2);
            const float inv = l > 0.f ? 1.f / l : 0.f;
            const int row = m0 + warp * WM + mt * 16 + g + 8 * r;
            if (row < sq) {
                u16* orow = og + (i64)row * p.o_ss;
#pragma unroll
                for (int nt = 0; nt < HD / 8; ++nt) {
                    const int col = nt * 8 + 2 * t;
                    if (col < p.hd) {
                        const unsigned w = Mma<DT>::pack(o[mt][nt][2 * r] * inv, o[mt][nt][2 * r + 1] * inv);
                        if (p.o_vec_ok) {
                            *(unsigned*)(orow + col) = w;
                        } else {
                            orow[col] = (u16)(w & 0xffffu);
                            orow[col + 1] = (u16)(w >> 16);
                        }
                    }
                }
                if (p.lse && t == 0) {
                    float lse = l > 0.f ? (mrow[mt][r] + __log2f(l)) * FA_LN2 : FA_NEG_INF;
                    p.lse[z * p.lse_sb + h * p.lse_sh + (i64)(q_start + row) * p.lse_ss] = lse;
                }
            }
        }
    }
}

}  // namespace fa

// ----------------------------------------------------------------------------
// Entry points: flash_fwd_<dtype>_hd<HD>_w<NW>m<MT>n<BN> (NW warps of MT·16
// rows, BN keys a tile); the table in src/cuda/attention.rs mirrors these.
// The host registers this file once per (dtype, HD) as module
// flash_attn_fwd_<dtype>_hd<HD>, with FA_ONLY_DT / FA_ONLY_HD defined, so a
// first call compiles only the kernels it needs; without them (CI's checker)
// every entry compiles.
// ----------------------------------------------------------------------------

#if !defined(FA_ONLY_HD) || (FA_ONLY_HD == 32 && FA_ONLY_DT == DT_BF16)
extern "C" __global__ void __launch_bounds__(128, 1) flash_fwd_bf16_hd32_w4m1n64(const __grid_constant__ FlashFwdParams p) { fa::flash_fwd<DT_BF16, 32, 4, 1, 64, true>(p); }
#endif
#if !defined(FA_ONLY_HD) || (FA_ONLY_HD == 64 && FA_ONLY_DT == DT_BF16)
extern "C" __global__ void __launch_bounds__(256, 1) flash_fwd_bf16_hd64_w8m1n64(const __grid_constant__ FlashFwdParams p) { fa::flash_fwd<DT_BF16, 64, 8, 1, 64, true>(p); }
#endif
#if !defined(FA_ONLY_HD) || (FA_ONLY_HD == 96 && FA_ONLY_DT == DT_BF16)
extern "C" __global__ void __launch_bounds__(256, 1) flash_fwd_bf16_hd96_w8m1n64(const __grid_constant__ FlashFwdParams p) { fa::flash_fwd<DT_BF16, 96, 8, 1, 64, true>(p); }
#endif
#if !defined(FA_ONLY_HD) || (FA_ONLY_HD == 128 && FA_ONLY_DT == DT_BF16)
extern "C" __global__ void __launch_bounds__(256, 1) flash_fwd_bf16_hd128_w8m1n64(const __grid_constant__ FlashFwdParams p) { fa::flash_fwd<DT_BF16, 128, 8, 1, 64, true>(p); }
#endif
#if !defined(FA_ONLY_HD) || (FA_ONLY_HD == 128 && FA_ONLY_DT == DT_BF16)
extern "C" __global__ void __launch_bounds__(128, 1) flash_fwd_bf16_hd128_w4m2n32(const __grid_constant__ FlashFwdParams p) { fa::flash_fwd<DT_BF16, 128, 4, 2, 32, false>(p); }
#endif
#if !defined(FA_ONLY_HD) || (FA_ONLY_HD == 256 && FA_ONLY_DT == DT_BF16)
extern "C" __global__ void __launch_bounds__(128, 1) flash_fwd_bf16_hd256_w4m1n32(const __grid_constant__ FlashFwdParams p) { fa::flash_fwd<DT_BF16, 256, 4, 1, 32, false>(p); }
#endif
#if !defined(FA_ONLY_HD) || (FA_ONLY_HD == 32 && FA_ONLY_DT == DT_F16)
extern "C" __global__ void __launch_bounds__(128, 1) flash_fwd_f16_hd32_w4m1n64(const __grid_constant__ FlashFwdParams p) { fa::flash_fwd<DT_F16, 32, 4, 1, 64, true>(p); }
#endif
#if !defined(FA_ONLY_HD) || (FA_ONLY_HD == 64 && FA_ONLY_DT == DT_F16)
extern "C" __global__ void __launch_bounds__(256, 1) flash_fwd_f16_hd64_w8m1n64(const __grid_constant__ FlashFwdParams p) { fa::flash_fwd<DT_F16, 64, 8, 1, 64, true>(p); }
#endif
#if !defined(FA_ONLY_HD) || (FA_ONLY_HD == 96 && FA_ONLY_DT == DT_F16)
extern "C" __global__ void __launch_bounds__(256, 1) flash_fwd_f16_hd96_w8m1n64(const __grid_constant__ FlashFwdParams p) { fa::flash_fwd<DT_F16, 96, 8, 1, 64, true>(p); }
#endif
#if !defined(FA_ONLY_HD) || (FA_ONLY_HD == 128 && FA_ONLY_DT == DT_F16)
extern "C" __global__ void __launch_bounds__(256, 1) flash_fwd_f16_hd128_w8m1n64(const __grid_constant__ FlashFwdParams p) { fa::flash_fwd<DT_F16, 128, 8, 1, 64, true>(p); }
#endif
#if !defined(FA_ONLY_HD) || (FA_ONLY_HD == 128 && FA_ONLY_DT == DT_F16)
extern "C" __global__ void __launch_bounds__(128, 1) flash_fwd_f16_hd128_w4m2n32(const __grid_constant__ FlashFwdParams p) { fa::flash_fwd<DT_F16, 128, 4, 2, 32, false>(p); }
#endif
#if !defined(FA_ONLY_HD) || (FA_ONLY_HD == 256 && FA_ONLY_DT == DT_F16)
extern "C" __global__ void __launch_bounds__(128, 1) flash_fwd_f16_hd256_w4m1n32(const __grid_constant__ FlashFwdParams p) { fa::flash_fwd<DT_F16, 256, 4, 1, 32, false>(p); }
#endif
