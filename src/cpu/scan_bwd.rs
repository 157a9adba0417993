//! CPU selective scan, backward pass: the gradients of SPEC §1 for every input.
//!
//! For one channel c and state k, with a_t = exp(Δ_t·A_k) and p_t = a_t·h_{t-1}:
//!
//! ```text
//! forward   h_t = a_t·h_{t-1} + Δ_t·B_t·u_t     y_t = Σ_k C_t·h_t + D·u_t     out_t = y_t·silu(z_t)
//! gate      dy_t = dout_t·silu(z_t)             dz_t = dout_t·y_t·silu'(z_t)
//! state     g_t = ∂L/∂h_t = C_t·dy_t + a_{t+1}·g_{t+1},  g_{l-1} = C·dy + dlast_state
//! inputs    du_t = D·dy_t + Δ_t·Σ_k g_t·B_t              dΔ_t = Σ_k A_k·g_t·p_t + u_t·Σ_k g_t·B_t
//!           dA_k = Σ_t g_t·p_t·Δ_t    dB_t = Σ_c g_t·Δ_t·u_t    dC_t = Σ_c dy_t·h_t    dD = Σ_t dy_t·u_t
//!           dinitial_state = a_0·g_0;   ddelta = dΔ·softplus'(x) with x = delta + delta_bias,
//!           softplus'(x) = sigmoid(x) (1 above the threshold 20);  ddelta_bias = Σ_t ddelta
//! ```
//! (dB/dC sum over the channels of a group, and over the batch for the (d, n)
//! layout; dA, dD, ddelta_bias sum over the batch.)
//!
//! The state is never stored for every step. Time is cut into sub-chunks of
//! `ts` steps (16 unless the checkpoints would grow large):
//! 1. pass 1 runs the forward recurrence and keeps h at each sub-chunk
//!    boundary (checkpoints: b·d·n·l/ts floats);
//! 2. pass 2 walks each block of lanes through its sub-chunks from last to
//!    first: it recomputes a_t and h_t of the sub-chunk from the checkpoint
//!    into [ts][8][LANES] buffers that stay in L1, then runs the reverse
//!    recurrence over them. States go 8 at a time so that g and the dA sums
//!    stay in registers.
//!
//! Lanes run over channels as in the forward (blocks never straddle a B/C
//! group), so per-channel sums (dA, dD, ...) are vector accumulators. The
//! time-varying dB/dC sum over the channels of a group: each step's 8 product
//! vectors are reduced across lanes by a shuffle tree in registers and added
//! to the task's partial [chunk][n] sums; a task owns a run of blocks of one
//! group, and the partials of a group are added up after each outer chunk (no
//! shared writes). Pass 2 goes block by block so that every row of u, delta,
//! dout, z and of the outputs is one backward stream (with software
//! prefetch one sub-chunk ahead). rayon runs (batch, block) in pass 1 and
//! (batch, run of blocks) in pass 2.
//!
//! Cost on a 2-core AVX-512 Zen 4 (b1 d1536 n16 l2048): ~30 ms, about three
//! forward passes: pass 1 ~7 ms (a forward without outputs), the recompute
//! ~5 ms, the reverse ~7 ms, and ~8 ms streaming 7 (b, d, l) tensors through
//! DRAM with softplus/sigmoid/silu per step. Checkpoints saved by the forward
//! would remove pass 1.

use super::scan::{bc, channel_blocks, streams_tiles, BcSrc, Checkpoints, ScanJob, MAX_LANES};
use super::simd::{Simd, LOG2E};
use super::SimdLevel;
use crate::simd_dispatch;
use crate::tensor::{addr, load_row, store_row, DType, Raw};
use rayon::prelude::*;
use std::sync::Mutex;

/// Pass-2 tasks to aim for (over all batch entries and groups): enough for 8
/// to 16 threads. A constant, not 2 × threads, so that dB/dC do not depend
/// on the thread count; against 2 × threads it costs 2–4% more CPU time on 1
/// or 2 threads (b1 d1536 n16 l2048: the extra partial sums).
const BWD_TASKS: usize = 16;
/// Fewest blocks per pass-2 task (each task adds a [chunk][n] partial sum of
/// dB/dC per outer chunk).
const BWD_MIN_BLOCKS: usize = 4;

/// Longest sub-chunk (see `sub_chunk`).
const TMAX: usize = 64;
/// States per register group in the recurrences.
const KG: usize = 8;

/// Where dB (or dC) goes: float32 (d, n), or (b, g, n, l) (g = 1 with a zero
/// group stride for the shared (b, n, l) layout).
pub enum BcGrad {
    Const(Raw<2>),
    Var(Raw<4>),
}

/// A validated backward problem (built by `ops::scan_bwd`). `fwd` is the
/// forward's plan of the same inputs; its `out` and `last` are not used.
pub struct BwdJob {
    pub fwd: ScanJob,
    /// (b, d, l) gradient of out; (b, d, n) gradient of last_state.
    pub dout: Raw<3>,
    pub dlast: Option<Raw<3>>,
    pub du: Raw<3>,
    pub ddelta: Raw<3>,
    pub dz: Option<Raw<3>>,
    /// (d, n) float32.
    pub da: Raw<2>,
    pub db: BcGrad,
    pub dc: BcGrad,
    /// (d,) float32 each.
    pub dd: Option<Raw<1>>,
    pub ddbias: Option<Raw<1>>,
    /// (b, d, n) float32.
    pub dinit: Option<Raw<3>>,
}

/// Transposes a time-varying B/C chunk [t0, t0 + lc) into float32 [b][g][lc][n].
fn transpose_bc(src: &BcSrc, b: usize, n: usize, t0: usize, lc: usize, dst: &mut Vec<f32>) {
    let BcSrc::Var { raw, groups } = src else {
        return;
    };
    let g = *groups;
    dst.resize(b * g * lc * n, 0.0);
    dst.par_chunks_mut(lc * n)
        .enumerate()
        .for_each(|(bg, out)| {
            let mut row = vec![0.0f32; lc];
            for k in 0..n {
                let p = addr(raw, [bg / g, bg % g, k, t0]);
                unsafe { load_row(&mut row, p, raw.dtype, raw.strides[3]) };
                for (t, v) in row.iter().enumerate() {
                    out[t * n + k] = *v;
                }
            }
        });
}

/// The checkpoint buffer of the last call, kept (up to 64 MB) because a fresh
/// one costs a page fault per 4 KB on first touch: ~3 ms for the 12 MB of a
/// b1 d1536 l2048 problem, a sixth of its whole backward pass.
static CHECKPOINTS: Mutex<Vec<f32>> = Mutex::new(Vec::new());
const KEEP_CHECKPOINTS: usize = 16 << 20;

// ---------------------------------------------------------- ISA extras

/// What the backward needs beyond [`Simd`]: `add_lane_sums8`.
///
/// # Safety
/// As for [`Simd`]: only for a level whose CPU features were detected; the
/// pointer arguments must be valid for the accesses they name.
pub unsafe trait BwdSimd: Simd {
    /// dst[i] += Σ_lanes v[i] for i < 8 (the dB/dC sums over a block's channels).
    #[inline(always)]
    unsafe fn add_lane_sums8(v: &[Self::V; 8], dst: *mut f32) {
        for (i, x) in v.iter().enumerate() {
            *dst.add(i) += Self::hsum(*x);
        }
    }
    /// Whether `lane_pair` + `add_lane_pairs4` are a split `add_lane_sums8`
    /// (the reverse then folds each pair as soon as it is made, which keeps
    /// fewer vectors live).
    const PAIRS: bool = false;
    /// The first stage of `add_lane_sums8` for v[2i], v[2i+1].
    #[inline(always)]
    unsafe fn lane_pair(x: Self::V, _y: Self::V) -> Self::V {
        x
    }
    /// The rest of `add_lane_sums8`, from the four pairs.
    #[inline(always)]
    unsafe fn add_lane_pairs4(_p: &[Self::V; 4], _dst: *mut f32) {}
}

unsafe impl BwdSimd for super::simd::Portable {}

#[cfg(target_arch = "x86_64")]
unsafe impl BwdSimd for super::simd::Avx2 {}

#[cfg(target_arch = "x86_64")]
unsafe impl BwdSimd for super::simd::Avx512 {
    /// A reduction tree instead of 8 horizontal sums: 16 shuffles and 9 adds.
    #[inline(always)]
    unsafe fn add_lane_sums8(v: &[Self::V; 8], dst: *mut f32) {
        let h = |x, y| Self::lane_pair(x, y);
        Self::add_lane_pairs4(
            &[h(v[0], v[1]), h(v[2], v[3]), h(v[4], v[5]), h(v[6], v[7])],
            dst,
        );
    }
    const PAIRS: bool = true;
    /// Halves: [x.lo256 + x.hi256 | y.lo256 + y.hi256].
    #[inline(always)]
    unsafe fn lane_pair(x: Self::V, y: Self::V) -> Self::V {
        use std::arch::x86_64::*;
        _mm512_add_ps(
            _mm512_shuffle_f32x4::<0x44>(x, y),
            _mm512_shuffle_f32x4::<0xEE>(x, y),
        )
    }
    #[inline(always)]
    unsafe fn add_lane_pairs4(p: &[Self::V; 4], dst: *mut f32) {
        use std::arch::x86_64::*;
        // Quarters: [v0 | v1 | v2 | v3] four partial sums each.
        let q = |x, y| {
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0x88>(x, y),
                _mm512_shuffle_f32x4::<0xDD>(x, y),
            )
        };
        let x0 = q(p[0], p[1]);
        let x1 = q(p[2], p[3]);
        // In quad i: [Σ v_i, Σ v_i+4, Σ v_i, Σ v_i+4] after two more steps.
        let y = _mm512_add_ps(_mm512_unpacklo_ps(x0, x1), _mm512_unpackhi_ps(x0, x1));
        let z = _mm512_add_ps(y, _mm512_permute_ps::<0x4E>(y));
        let idx = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 0, 0, 0, 0, 0, 0, 0, 0);
        let s = _mm512_castps512_ps256(_mm512_permutexvar_ps(idx, z));
        _mm256_storeu_ps(dst, _mm256_add_ps(_mm256_loadu_ps(dst), s));
    }
}

// ------------------------------------------------------------------ tiles

/// Whether a tile can move by 8×8 register transposes.
#[inline(always)]
fn fast_tile<S: Simd>(raw: &Raw<3>, len: usize, tt: usize) -> bool {
    S::AVX
        && raw.dtype == DType::F32
        && raw.strides[2] == 1
        && len == S::LANES
        && tt.is_multiple_of(8)
}

/// Rows [c0, c0+len) × [t, t+tt) of a (b, d, l) tensor into a [ts][LANES]
/// tile (lanes ≥ len are zero).
#[inline(always)]
unsafe fn load_tile<S: Simd>(
    r: &Raw<3>,
    bi: usize,
    c0: usize,
    len: usize,
    t: usize,
    tt: usize,
    tile: *mut f32,
) {
    let lanes = S::LANES;
    if fast_tile::<S>(r, len, tt) {
        let base = addr(r, [bi, c0, t]) as *const f32;
        for j0 in (0..lanes).step_by(8) {
            for s0 in (0..tt).step_by(8) {
                let src = base.offset(j0 as isize * r.strides[1] + s0 as isize);
                S::transpose8(src, r.strides[1], tile.add(s0 * lanes + j0), lanes as isize);
            }
        }
        return;
    }
    if r.strides[2] == 0 {
        // Constant in time (e.g. the expanded ones of `out.sum().backward()`).
        let mut v = [0.0f32; MAX_LANES];
        for (j, x) in v.iter_mut().enumerate().take(len) {
            load_row(
                std::slice::from_mut(x),
                addr(r, [bi, c0 + j, t]),
                r.dtype,
                0,
            );
        }
        for s in 0..tt {
            S::store(tile.add(s * lanes), S::load(v.as_ptr()));
        }
        return;
    }
    let mut row = [0.0f32; TMAX];
    for j in 0..lanes {
        if j < len {
            load_row(
                &mut row[..tt],
                addr(r, [bi, c0 + j, t]),
                r.dtype,
                r.strides[2],
            );
        } else {
            row[..tt].fill(0.0);
        }
        for s in 0..tt {
            *tile.add(s * lanes + j) = row[s];
        }
    }
}

/// The inverse of `load_tile` (lanes ≥ len are not written).
#[inline(always)]
unsafe fn store_tile<S: Simd>(
    r: &Raw<3>,
    bi: usize,
    c0: usize,
    len: usize,
    t: usize,
    tt: usize,
    tile: *const f32,
) {
    let lanes = S::LANES;
    if fast_tile::<S>(r, len, tt) {
        let base = addr(r, [bi, c0, t]) as *mut f32;
        for j0 in (0..lanes).step_by(8) {
            for s0 in (0..tt).step_by(8) {
                let dst = base.offset(j0 as isize * r.strides[1] + s0 as isize);
                S::transpose8(tile.add(s0 * lanes + j0), lanes as isize, dst, r.strides[1]);
            }
        }
        return;
    }
    let mut row = [0.0f32; TMAX];
    for j in 0..len {
        for s in 0..tt {
            row[s] = *tile.add(s * lanes + j);
        }
        store_row(&row[..tt], addr(r, [bi, c0 + j, t]), r.dtype, r.strides[2]);
    }
}

/// `store_tile` with non-temporal stores when `streams_tiles` allows and the
/// tile is whole (16 lanes × 16 steps): the outputs are not read again here,
/// and streaming them skips the read for ownership of every line.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn store_tile_nt<S: Simd>(
    r: &Raw<3>,
    bi: usize,
    c0: usize,
    len: usize,
    t: usize,
    tt: usize,
    tile: *const f32,
    ts: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if len == 16 && tt == 16 && streams_tiles::<S>(r, ts) {
        let base = addr(r, [bi, c0, t]) as *mut f32;
        crate::cpu::scan::stream_tile16::<S>(tile, base, r.strides[1]);
        return;
    }
    store_tile::<S>(r, bi, c0, len, t, tt, tile)
}

/// Prefetches the rows of a tile (contiguous in time). Pass 2 visits tiles
/// out of memory order (blocks within a sub-chunk, sub-chunks backwards), one
/// cache line per row, which the hardware prefetchers cannot predict.
#[inline(always)]
fn prefetch_tile(r: &Raw<3>, bi: usize, c0: usize, len: usize, t: usize, tt: usize) {
    #[cfg(target_arch = "x86_64")]
    if r.strides[2] == 1 && tt > 0 {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
        let (p, last) = (addr(r, [bi, c0, t]), (tt * r.dtype.size() - 1) as isize);
        let row = r.strides[1] * r.dtype.size() as isize;
        for j in 0..len as isize {
            // SAFETY: prefetches never fault; the addresses lie in the tensor.
            unsafe {
                let q = (p as *const i8).offset(j * row);
                _mm_prefetch::<_MM_HINT_T1>(q);
                _mm_prefetch::<_MM_HINT_T1>(q.offset(last));
            }
        }
    }
}

/// Δ = softplus(delta + bias) in place over a tile, and (if `dsp` is given)
/// dΔ/d(delta) = sigmoid(x) below the threshold, 1 above (1 without softplus).
/// softplus(x) = max(x, 0) + log1p(e) and sigmoid(x) = 1/(1 + e) or e/(1 + e)
/// share e = exp(−|x|) (Δ is bitwise `Simd::softplus`, as in the forward).
#[inline(always)]
unsafe fn delta_tile<S: Simd>(
    dt: *mut f32,
    dsp: Option<*mut f32>,
    bias: *const f32,
    softplus: bool,
    tt: usize,
) {
    let l = S::LANES;
    let (zero, one, thr) = (S::zero(), S::splat(1.0), S::splat(20.0));
    let bias = S::load(bias);
    for s in 0..tt {
        let p = dt.add(s * l);
        let x = S::add(S::load(p), bias);
        if !softplus {
            S::store(p, x);
            if let Some(q) = dsp {
                S::store(q.add(s * l), one);
            }
            continue;
        }
        let e = S::exp(S::sub(zero, S::abs(x)));
        let sp = S::add(S::max(x, zero), S::log1p_pos(e));
        S::store(p, S::select_gt(x, thr, x, sp));
        if let Some(q) = dsp {
            let r = S::div(one, S::add(one, e));
            let sig = S::select_gt(x, zero, r, S::mul(e, r));
            S::store(q.add(s * l), S::select_gt(x, thr, one, sig));
        }
    }
}

/// Per-block lane tables, [n][LANES] each unless noted: A·log2(e), A, B and C
/// (constant layouts), then D and delta_bias ([LANES] each).
fn block_tables(job: &ScanJob, blocks: &[(usize, usize)], lanes: usize) -> (Vec<f32>, usize) {
    let n = job.n;
    let sz = 4 * n * lanes + 2 * lanes;
    let mut tabs = vec![0.0f32; blocks.len() * sz];
    for (blk, &(c0, len)) in blocks.iter().enumerate() {
        let t = &mut tabs[blk * sz..(blk + 1) * sz];
        for j in 0..len {
            let c = c0 + j;
            for k in 0..n {
                let a = job.a[c * n + k];
                t[k * lanes + j] = a * LOG2E;
                t[(n + k) * lanes + j] = a;
                if let BcSrc::Const(m) = &job.bm {
                    t[(2 * n + k) * lanes + j] = m[c * n + k];
                }
                if let BcSrc::Const(m) = &job.cm {
                    t[(3 * n + k) * lanes + j] = m[c * n + k];
                }
            }
            t[4 * n * lanes + j] = job.dskip.as_ref().map_or(0.0, |v| v[c]);
            t[4 * n * lanes + lanes + j] = job.dbias.as_ref().map_or(0.0, |v| v[c]);
        }
    }
    (tabs, sz)
}

// ------------------------------------------------------------ recurrences

/// `for $kk in 0..$K { $body }`, fully unrolled for K = 8 (LLVM does not
/// always unroll these bodies, and then the register arrays spill).
macro_rules! for_k {
    ($K:ident, $kk:ident, $body:block) => {
        if $K == 8 {
            for_k!(@ $kk, $body, 0 1 2 3 4 5 6 7);
        } else {
            for $kk in 0..$K $body
        }
    };
    (@ $kk:ident, $body:block, $($i:literal)*) => {
        $( { let $kk: usize = $i; $body } )*
    };
}

/// Runs `$body` with `$K` a constant, over the states in groups of 8, then
/// one at a time.
macro_rules! by_groups {
    ($n:expr, |$k0:ident, $K:ident| $body:expr) => {{
        let mut $k0 = 0;
        while $k0 + KG <= $n {
            {
                const $K: usize = KG;
                $body;
            }
            $k0 += KG;
        }
        while $k0 < $n {
            {
                const $K: usize = 1;
                $body;
            }
            $k0 += 1;
        }
    }};
}

/// Tiles [ts][LANES] and tables of one (block, sub-chunk).
struct Sub {
    n: usize,
    tt: usize,
    /// Channels of the block (lanes ≥ len are padding).
    len: usize,
    u: *const f32,
    dt: *const f32,
    dy: *const f32,
    /// A·log2(e) and A, [n][LANES].
    a2: *const f32,
    a1: *const f32,
    /// B / C: time-varying [t][n] (broadcast), or constant [n][LANES].
    bp: *const f32,
    cp: *const f32,
    /// Recompute buffers: a_t [ts][K][LANES], h [ts+1][K][LANES] (row 0:
    /// the state before the sub-chunk).
    abuf: *mut f32,
    hbuf: *mut f32,
}

/// The forward recurrence for states k0..k0+K over a sub-chunk, from the state
/// at `hin`. STORE: write a_t and h_t to the recompute buffers; else write the
/// final state to `hout` (pass 1's next checkpoint).
#[inline(always)]
unsafe fn forward_group<S: BwdSimd, const K: usize, const BV: bool, const STORE: bool>(
    p: &Sub,
    k0: usize,
    hin: *const f32,
    hout: *mut f32,
) {
    let l = S::LANES;
    let (a2, bp) = (p.a2.add(k0 * l), p.bp.add(if BV { k0 } else { k0 * l }));
    let mut h = [S::zero(); K];
    for_k!(K, kk, {
        h[kk] = S::load(hin.add(kk * l));
    });
    if STORE {
        for_k!(K, kk, {
            S::store(p.hbuf.add(kk * l), h[kk]);
        });
    }
    for s in 0..p.tt {
        let dt = S::load(p.dt.add(s * l));
        let du = S::mul(dt, S::load(p.u.add(s * l)));
        let (ab, hb) = (p.abuf.add(s * K * l), p.hbuf.add((s + 1) * K * l));
        for_k!(K, kk, {
            let a = S::exp2_fast(S::mul(dt, S::load(a2.add(kk * l))));
            h[kk] = S::fma(a, h[kk], S::mul(du, bc::<S, BV>(bp, s, kk, p.n)));
            if STORE {
                S::store(ab.add(kk * l), a);
                S::store(hb.add(kk * l), h[kk]);
            }
        });
    }
    if !STORE {
        for_k!(K, kk, {
            S::store(hout.add(kk * l), h[kk]);
        });
    }
}

/// Accumulators of one (block, sub-chunk) in the reverse pass.
struct Acc {
    /// Per step [ts][LANES]: Σ_k A·g·p, Σ_k g·B, and y.
    d1: *mut f32,
    d2: *mut f32,
    y: *mut f32,
    /// Block state [n][LANES]: a_{t+1}·g_{t+1} carried backwards, dA sums.
    gq: *mut f32,
    da: *mut f32,
    /// dB / dC: time-varying: the task's partial sums [ts][n] from step s0
    /// (lanes summed here); constant: the block's sums [n][LANES].
    db: *mut f32,
    dc: *mut f32,
}

/// dst[0..K] += the lane sums of v.
#[inline(always)]
unsafe fn add_lane_sums<S: BwdSimd, const K: usize>(v: &[S::V; K], dst: *mut f32) {
    if K == 8 {
        S::add_lane_sums8(&*(v.as_ptr() as *const [S::V; 8]), dst);
    } else {
        for (i, x) in v.iter().enumerate() {
            *dst.add(i) += S::hsum(*x);
        }
    }
}

/// The reverse recurrence for states k0..k0+K over a sub-chunk (from its last
/// step to its first), reading a_t and h_t from the recompute buffers. y is
/// accumulated too (needed for dz; cheap enough not to specialise).
///
/// `TAIL` (a block of fewer than LANES channels, with time-varying B or C):
/// the padding lanes' products are cleared before the dB/dC sums across
/// lanes. Their u, Δ·u and dy are 0, but a broadcast B or C of inf or NaN
/// makes their h and g NaN (0·inf), which must not reach a real channel's sum.
#[inline(always)]
unsafe fn reverse_group<
    S: BwdSimd,
    const K: usize,
    const BV: bool,
    const CV: bool,
    const TAIL: bool,
>(
    p: &Sub,
    acc: &Acc,
    k0: usize,
) {
    let (l, n) = (S::LANES, p.n);
    let a1 = p.a1.add(k0 * l);
    let (bp, cp) = (
        p.bp.add(if BV { k0 } else { k0 * l }),
        p.cp.add(if CV { k0 } else { k0 * l }),
    );
    let (db, dc) = (
        acc.db.add(if BV { k0 } else { k0 * l }),
        acc.dc.add(if CV { k0 } else { k0 * l }),
    );
    let mut gq = [S::zero(); K];
    let mut da = [S::zero(); K];
    for_k!(K, kk, {
        gq[kk] = S::load(acc.gq.add((k0 + kk) * l));
        da[kk] = S::load(acc.da.add((k0 + kk) * l));
    });
    for s in (0..p.tt).rev() {
        let dy = S::load(p.dy.add(s * l));
        let dt = S::load(p.dt.add(s * l));
        let du = S::mul(dt, S::load(p.u.add(s * l)));
        let (ab, hb) = (p.abuf.add(s * K * l), p.hbuf.add(s * K * l));
        // Two accumulators each halve the dependency chains.
        let z = S::zero();
        let (mut d1, mut d2, mut y) = ([z; 2], [z; 2], [z; 2]);
        let (mut pb, mut pc) = ([z; K], [z; K]);
        // With S::PAIRS and K = 8, the tree's first stage as soon as a pair is made.
        let pairs = S::PAIRS && K == 8;
        let (mut qb, mut qc) = ([z; 4], [z; 4]);
        for_k!(K, kk, {
            let c = bc::<S, CV>(cp, s, kk, n);
            let g = S::fma(c, dy, gq[kk]);
            let a = S::load(ab.add(kk * l));
            let hp = S::load(hb.add(kk * l));
            let ht = S::load(hb.add((K + kk) * l));
            let gp = S::mul(g, S::mul(a, hp));
            da[kk] = S::fma(gp, dt, da[kk]);
            let e = kk % 2;
            d1[e] = S::fma(S::load(a1.add(kk * l)), gp, d1[e]);
            d2[e] = S::fma(g, bc::<S, BV>(bp, s, kk, n), d2[e]);
            y[e] = S::fma(c, ht, y[e]);
            if BV {
                pb[kk] = S::mul(g, du);
                if TAIL {
                    pb[kk] = S::keep_first(pb[kk], p.len);
                }
                if pairs && kk % 2 == 1 {
                    qb[kk / 2] = S::lane_pair(pb[kk - 1], pb[kk]);
                }
            } else {
                S::store(db.add(kk * l), S::fma(g, du, S::load(db.add(kk * l))));
            }
            if CV {
                pc[kk] = S::mul(dy, ht);
                if TAIL {
                    pc[kk] = S::keep_first(pc[kk], p.len);
                }
                if pairs && kk % 2 == 1 {
                    qc[kk / 2] = S::lane_pair(pc[kk - 1], pc[kk]);
                }
            } else {
                S::store(dc.add(kk * l), S::fma(dy, ht, S::load(dc.add(kk * l))));
            }
            gq[kk] = S::mul(a, g);
        });
        if BV {
            if pairs {
                S::add_lane_pairs4(&qb, db.add(s * n));
            } else {
                add_lane_sums::<S, K>(&pb, db.add(s * n));
            }
        }
        if CV {
            if pairs {
                S::add_lane_pairs4(&qc, dc.add(s * n));
            } else {
                add_lane_sums::<S, K>(&pc, dc.add(s * n));
            }
        }
        let o = s * l;
        for (q, v) in [(acc.d1, d1), (acc.d2, d2), (acc.y, y)] {
            S::store(q.add(o), S::add(S::load(q.add(o)), S::add(v[0], v[1])));
        }
    }
    for_k!(K, kk, {
        S::store(acc.gq.add((k0 + kk) * l), gq[kk]);
        S::store(acc.da.add((k0 + kk) * l), da[kk]);
    });
}

// ------------------------------------------------------------------ pass 1

struct Pass1<'a> {
    job: &'a BwdJob,
    bi: usize,
    c0: usize,
    len: usize,
    t0: usize,
    t1: usize,
    ts: usize,
    /// This block's checkpoints [l/ts][n][LANES].
    ck: *mut f32,
    tab: *const f32,
    /// Transposed B of the block's group at t0, [t][n].
    bt: *const f32,
}

#[inline(always)]
unsafe fn pass1_block<S: BwdSimd>(c: &Pass1) {
    let job = &c.job.fwd;
    let (n, l, ts) = (job.n, S::LANES, c.ts);
    let hsz = n * l;
    let nch = job.l.div_ceil(ts);
    if c.t0 == 0 {
        std::slice::from_raw_parts_mut(c.ck, hsz).fill(0.0);
        if let Some(init) = &job.init {
            let mut row = vec![0.0f32; n];
            for j in 0..c.len {
                let p = addr(init, [c.bi, c.c0 + j, 0]);
                load_row(&mut row, p, init.dtype, init.strides[2]);
                for k in 0..n {
                    *c.ck.add(k * l + j) = row[k];
                }
            }
        }
    }
    let mut ut = [0.0f32; TMAX * MAX_LANES];
    let mut dt = [0.0f32; TMAX * MAX_LANES];
    let bvar = job.bm.is_var();
    let mut t = c.t0;
    while t < c.t1 {
        let (j, tt) = (t / ts, ts.min(c.t1 - t));
        if j + 1 >= nch {
            break; // the state after the last sub-chunk is not needed
        }
        // Prefetch the next sub-chunk's rows (as the forward's tile loop does).
        let tn = t + tt;
        if tn < c.t1 && (j + 2) < nch {
            let nt = ts.min(c.t1 - tn);
            prefetch_tile(&job.u, c.bi, c.c0, c.len, tn, nt);
            prefetch_tile(&job.delta, c.bi, c.c0, c.len, tn, nt);
        }
        load_tile::<S>(&job.u, c.bi, c.c0, c.len, t, tt, ut.as_mut_ptr());
        load_tile::<S>(&job.delta, c.bi, c.c0, c.len, t, tt, dt.as_mut_ptr());
        delta_tile::<S>(
            dt.as_mut_ptr(),
            None,
            c.tab.add(4 * hsz + l),
            job.softplus,
            tt,
        );
        let p = Sub {
            n,
            tt,
            len: c.len,
            u: ut.as_ptr(),
            dt: dt.as_ptr(),
            dy: std::ptr::null(),
            a2: c.tab,
            a1: c.tab.add(hsz),
            bp: if bvar {
                c.bt.add((t - c.t0) * n)
            } else {
                c.tab.add(2 * hsz)
            },
            cp: std::ptr::null(),
            abuf: std::ptr::null_mut(),
            hbuf: std::ptr::null_mut(),
        };
        let (hin, hout) = (c.ck.add(j * hsz), c.ck.add((j + 1) * hsz));
        by_groups!(n, |k0, K| {
            let (i, o) = (hin.add(k0 * l), hout.add(k0 * l));
            if bvar {
                forward_group::<S, K, true, false>(&p, k0, i, o)
            } else {
                forward_group::<S, K, false, false>(&p, k0, i, o)
            }
        });
        t += tt;
    }
}

// ------------------------------------------------------------------ pass 2

/// One pass-2 task: blocks [blk0, blk1) (one B group, one C group) of batch
/// entry `bi` over the outer chunk [t0, t1).
struct Pass2<'a> {
    job: &'a BwdJob,
    blocks: &'a [(usize, usize)],
    bi: usize,
    blk0: usize,
    blk1: usize,
    t0: usize,
    t1: usize,
    ts: usize,
    /// Checkpoints and block states of block blk0 (the task's blocks follow).
    ck: *const f32,
    /// The forward's checkpoints, float32 (b, d, nch, n) (null: use `ck`).
    ext: *const f32,
    st: *mut f32,
    st_sz: usize,
    tabs: *const f32,
    tab_sz: usize,
    /// Transposed B/C of the task's groups at t0, [t][n].
    bt: *const f32,
    ct: *const f32,
    /// The task's partial dB/dC sums [chunk][n] (time-varying layouts), zeroed.
    pb: *mut f32,
    pc: *mut f32,
}

/// Scratch of one pass-2 task.
struct Scratch {
    tiles: Vec<f32>,
    /// A checkpoint of `ext` in lane layout [n][LANES].
    ckbuf: Vec<f32>,
    abuf: Vec<f32>,
    hbuf: Vec<f32>,
}

/// Tiles of a (block, sub-chunk): u, Δ, softplus', dout, z, sigmoid(z), dy,
/// y, d1, d2.
const NTILES: usize = 10;

/// Pass 2 of one task: block by block, each walking its sub-chunks backwards,
/// so that every row of u, delta, dout, z and of the outputs is read as one
/// backward stream (the lane sums of dB/dC are done in registers for this).
#[inline(always)]
unsafe fn pass2_task<S: BwdSimd>(c: &Pass2) {
    let bj = c.job;
    let job = &bj.fwd;
    let (l, ts) = (S::LANES, c.ts);
    let mut sc = Scratch {
        tiles: vec![0.0; NTILES * ts * l],
        ckbuf: vec![0.0; if c.ext.is_null() { 0 } else { job.n * l }],
        abuf: vec![0.0; ts * KG * l],
        hbuf: vec![0.0; (ts + 1) * KG * l],
    };
    let (j0, j1) = (c.t0 / ts, c.t1.div_ceil(ts));
    for blk in c.blk0..c.blk1 {
        for j in (j0..j1).rev() {
            let s0 = j * ts;
            // Prefetch the inputs of the next sub-chunk (the one before in time).
            let next = if j > j0 {
                Some((blk, s0 - ts, ts))
            } else if blk + 1 < c.blk1 {
                Some((blk + 1, (j1 - 1) * ts, c.t1 - (j1 - 1) * ts))
            } else {
                None
            };
            if let Some((nb, ns, nt)) = next {
                let (c0, len) = c.blocks[nb];
                for r in [
                    Some(&job.u),
                    Some(&job.delta),
                    Some(&bj.dout),
                    job.z.as_ref(),
                ]
                .into_iter()
                .flatten()
                {
                    prefetch_tile(r, c.bi, c0, len, ns, nt);
                }
                // And the lines of its outputs: their stores would otherwise
                // each wait for a line from DRAM (112 rows walked backwards are
                // too many streams for the hardware prefetchers). Measured
                // (bench_c1, 1 thread, Intel Xeon host): 76 -> 67.5 CPU ms.
                for r in [Some(&bj.du), Some(&bj.ddelta), bj.dz.as_ref()]
                    .into_iter()
                    .flatten()
                {
                    if !(len == 16 && nt == 16 && streams_tiles::<S>(r, ts)) {
                        prefetch_tile(r, c.bi, c0, len, ns, nt);
                    }
                }
                // And its checkpoint rows (one [n] row per channel).
                if !c.ext.is_null() {
                    let n = job.n;
                    let nch = job.l.div_ceil(ts);
                    let row = Raw {
                        ptr: c.ext as usize,
                        dtype: DType::F32,
                        strides: [(job.d * nch * n) as isize, (nch * n) as isize, 1],
                    };
                    prefetch_tile(&row, c.bi, c0, len, ns / ts * n, n);
                }
            }
            sub_block::<S>(c, &mut sc, blk, j, s0, ts.min(job.l - s0));
        }
    }
    // Order the non-temporal stores of `store_tile_nt` before the task ends.
    #[cfg(target_arch = "x86_64")]
    if S::LANES == 16 {
        std::arch::x86_64::_mm_sfence();
    }
}

/// Recompute + reverse of one block over sub-chunk j (steps s0..s0+tt).
#[inline(always)]
unsafe fn sub_block<S: BwdSimd>(
    c: &Pass2,
    sc: &mut Scratch,
    blk: usize,
    j: usize,
    s0: usize,
    tt: usize,
) {
    let bj = c.job;
    let job = &bj.fwd;
    let (n, l) = (job.n, S::LANES);
    let hsz = n * l;
    let (c0, len) = c.blocks[blk];
    let bi = c.bi;
    let i = blk - c.blk0;
    let tab = c.tabs.add(blk * c.tab_sz);
    let st = c.st.add(i * c.st_sz);
    let nch = job.l.div_ceil(c.ts);
    let ck = if c.ext.is_null() {
        c.ck.add((i * nch + j) * hsz)
    } else {
        let src = c.ext.add(((bi * job.d + c0) * nch + j) * n);
        load_checkpoint::<S>(src, nch * n, n, len, sc.ckbuf.as_mut_ptr());
        sc.ckbuf.as_ptr()
    };
    let (bvar, cvar) = (job.bm.is_var(), job.cm.is_var());

    let tp = sc.tiles.as_mut_ptr();
    let [ut, dt, dsp, ot, zt, sz, dy, yb, d1, d2]: [*mut f32; NTILES] =
        std::array::from_fn(|q| tp.add(q * c.ts * l));
    load_tile::<S>(&job.u, bi, c0, len, s0, tt, ut);
    load_tile::<S>(&job.delta, bi, c0, len, s0, tt, dt);
    load_tile::<S>(&bj.dout, bi, c0, len, s0, tt, ot);
    if let Some(z) = &job.z {
        load_tile::<S>(z, bi, c0, len, s0, tt, zt);
    }
    delta_tile::<S>(dt, Some(dsp), tab.add(4 * hsz + l), job.softplus, tt);
    let dv = S::load(tab.add(4 * hsz));
    let one = S::splat(1.0);
    for s in 0..tt {
        let o = s * l;
        let mut g = S::load(ot.add(o));
        if job.z.is_some() {
            // dy = dout·silu(z) = dout·z·σ(z); σ(z) is kept for dz.
            let z = S::load(zt.add(o));
            let sig = S::div(one, S::add(one, S::exp(S::sub(S::zero(), z))));
            S::store(sz.add(o), sig);
            g = S::mul(g, S::mul(z, sig));
        }
        S::store(dy.add(o), g);
        S::store(yb.add(o), S::mul(dv, S::load(ut.add(o))));
        S::store(d1.add(o), S::zero());
        S::store(d2.add(o), S::zero());
    }

    let rel = s0 - c.t0;
    let p = Sub {
        n,
        tt,
        len,
        u: ut,
        dt,
        dy,
        a2: tab,
        a1: tab.add(hsz),
        bp: if bvar {
            c.bt.add(rel * n)
        } else {
            tab.add(2 * hsz)
        },
        cp: if cvar {
            c.ct.add(rel * n)
        } else {
            tab.add(3 * hsz)
        },
        abuf: sc.abuf.as_mut_ptr(),
        hbuf: sc.hbuf.as_mut_ptr(),
    };
    let acc = Acc {
        d1,
        d2,
        y: yb,
        gq: st,
        da: st.add(hsz),
        db: if bvar {
            c.pb.add(rel * n)
        } else {
            st.add(2 * hsz)
        },
        dc: if cvar {
            c.pc.add(rel * n)
        } else {
            st.add(3 * hsz)
        },
    };
    let nul = std::ptr::null_mut();
    macro_rules! run {
        ($K:ident, $k0:ident, $bv:literal, $cv:literal, $tail:literal) => {{
            forward_group::<S, $K, $bv, true>(&p, $k0, ck.add($k0 * l), nul);
            reverse_group::<S, $K, $bv, $cv, $tail>(&p, &acc, $k0);
        }};
    }
    // Padding lanes only matter to the lane sums of time-varying dB/dC.
    let tail = len < l;
    by_groups!(n, |k0, K| match (bvar, cvar, tail) {
        (true, true, false) => run!(K, k0, true, true, false),
        (true, true, true) => run!(K, k0, true, true, true),
        (true, false, false) => run!(K, k0, true, false, false),
        (true, false, true) => run!(K, k0, true, false, true),
        (false, true, false) => run!(K, k0, false, true, false),
        (false, true, true) => run!(K, k0, false, true, true),
        (false, false, _) => run!(K, k0, false, false, false),
    });

    // The reverse pass reached step 0: a_0·g_0 is the initial state's gradient.
    if j == 0 {
        if let Some(di) = &bj.dinit {
            let mut row = vec![0.0f32; n];
            for jj in 0..len {
                for k in 0..n {
                    row[k] = *st.add(k * l + jj);
                }
                store_row(&row, addr(di, [bi, c0 + jj, 0]), di.dtype, di.strides[2]);
            }
        }
    }

    // Per-step outputs; ot/zt/ut are reused as du/dz/ddelta tiles.
    let (mut sdd, mut sdb) = (S::load(st.add(4 * hsz)), S::load(st.add(4 * hsz + l)));
    // Backwards, like everything else, so that the sums' order is the same for
    // any sub-chunk length.
    for s in (0..tt).rev() {
        let o = s * l;
        let (u, dtv, g) = (S::load(ut.add(o)), S::load(dt.add(o)), S::load(dy.add(o)));
        let (a, b) = (S::load(d1.add(o)), S::load(d2.add(o)));
        sdd = S::fma(g, u, sdd);
        let dd = S::mul(S::fma(u, b, a), S::load(dsp.add(o)));
        sdb = S::add(sdb, dd);
        if job.z.is_some() {
            // silu'(z) = σ(z)·(1 + z·(1 − σ(z)))
            let (z, sig) = (S::load(zt.add(o)), S::load(sz.add(o)));
            let ds = S::mul(sig, S::fma(z, S::sub(one, sig), one));
            S::store(
                zt.add(o),
                S::mul(S::mul(S::load(ot.add(o)), S::load(yb.add(o))), ds),
            );
        }
        S::store(ot.add(o), S::fma(dv, g, S::mul(dtv, b)));
        S::store(ut.add(o), dd);
    }
    S::store(st.add(4 * hsz), sdd);
    S::store(st.add(4 * hsz + l), sdb);
    store_tile_nt::<S>(&bj.du, bi, c0, len, s0, tt, ot, c.ts);
    store_tile_nt::<S>(&bj.ddelta, bi, c0, len, s0, tt, ut, c.ts);
    if let Some(dz) = &bj.dz {
        store_tile_nt::<S>(dz, bi, c0, len, s0, tt, zt, c.ts);
    }
}

/// The inverse of `scan::store_checkpoint`: rows `src + j·row` (channel j <
/// len, float32 [n] each) into [n][LANES] (lanes ≥ len zero).
#[inline(always)]
unsafe fn load_checkpoint<S: Simd>(
    src: *const f32,
    row: usize,
    n: usize,
    len: usize,
    dst: *mut f32,
) {
    let lanes = S::LANES;
    if S::AVX && len == lanes && n.is_multiple_of(8) {
        for k0 in (0..n).step_by(8) {
            for j0 in (0..lanes).step_by(8) {
                S::transpose8(
                    src.add(j0 * row + k0),
                    row as isize,
                    dst.add(k0 * lanes + j0),
                    lanes as isize,
                );
            }
        }
        return;
    }
    for k in 0..n {
        for j in 0..lanes {
            *dst.add(k * lanes + j) = if j < len { *src.add(j * row + k) } else { 0.0 };
        }
    }
}

// ------------------------------------------------------------------ driver

/// The sub-chunk length: short, so that the recompute buffers and the dB/dC
/// accumulators stay in L1, unless the checkpoints (b·d·n·l/ts floats) would
/// pass 256 MB.
fn sub_chunk(job: &ScanJob) -> usize {
    checkpoint_chunk(job.b, job.d, job.n, job.l)
}

/// The sub-chunk length of a (b, d, n, l) problem: 16, doubled (up to 64)
/// while the checkpoints would pass 256 MB. The forward writes checkpoints for
/// the backward at this interval (`_autograd._checkpoint_chunk` is the same rule).
pub fn checkpoint_chunk(b: usize, d: usize, n: usize, l: usize) -> usize {
    let mut ts = 16;
    while ts < TMAX && b * d * n * l.div_ceil(ts) * 4 > 256 << 20 {
        ts *= 2;
    }
    ts
}

/// Time steps per outer chunk (a multiple of ts): bounds the transposed B/C and
/// the partial dB/dC buffers to ~32 MB.
fn outer_chunk(job: &ScanJob, ntasks: usize, ts: usize) -> usize {
    let vars = job.bm.is_var() as usize + job.cm.is_var() as usize;
    let per_t = (job.b * (job.bm.groups() + job.cm.groups()) + ntasks * vars) * job.n * 4;
    let lc = (32usize << 20) / per_t.max(1);
    (lc.max(ts) / ts * ts).min(job.l.div_ceil(ts) * ts)
}

/// Computes every gradient of `bj`.
pub fn scan_backward(bj: &BwdJob, level: SimdLevel) {
    scan_backward_tuned(bj, level, None, None)
}

/// `scan_backward` from the forward's checkpoints (`scan_forward_ck` with
/// `ts = checkpoint_chunk(..)`): skips the recomputation of pass 1.
pub fn scan_backward_ck(bj: &BwdJob, level: SimdLevel, ck: Option<Checkpoints>) {
    scan_backward_tuned(bj, level, ck.map(|c| (c.ts, 0)), ck)
}

/// `scan_backward` with the sub-chunk and outer chunk lengths forced (tests).
fn scan_backward_tuned(
    bj: &BwdJob,
    level: SimdLevel,
    tune: Option<(usize, usize)>,
    ext: Option<Checkpoints>,
) {
    let job = &bj.fwd;
    let lanes = match level {
        SimdLevel::Avx512 => 16,
        _ => 8,
    };
    let (b, d, n, len_l) = (job.b, job.d, job.n, job.l);
    let (gb, gc) = (job.bm.groups(), job.cm.groups());
    let (sb, sc) = (d / gb, d / gc);
    let (bvar, cvar) = (job.bm.is_var(), job.cm.is_var());
    let blocks = channel_blocks(d, gb, gc, lanes);
    let nb = blocks.len();
    let (tabs, tab_sz) = block_tables(job, &blocks, lanes);
    let hsz = n * lanes;
    let ts = tune.map_or_else(|| sub_chunk(job), |t| t.0);
    let nch = len_l.div_ceil(ts);

    // Pass-2 tasks: runs of blocks sharing a (B group, C group), cut into about
    // BWD_TASKS tasks in all, each of at least BWD_MIN_BLOCKS blocks (more tasks
    // mean more partial sums of dB/dC). The cut depends on the problem only,
    // never on the thread count: the tasks' partial sums decide the rounding of
    // dB/dC, which must be bitwise the same for every RAYON_NUM_THREADS.
    let mut segs: Vec<(usize, usize)> = Vec::new();
    let key = |c: usize| (c / sb, c / sc);
    for (i, &(c0, _)) in blocks.iter().enumerate() {
        match segs.last_mut() {
            Some(s) if key(blocks[s.0].0) == key(c0) => s.1 = i + 1,
            _ => segs.push((i, i + 1)),
        }
    }
    let parts = BWD_TASKS.div_ceil(b * segs.len());
    let mut tasks: Vec<(usize, usize, usize)> = Vec::new(); // (bi, blk0, blk1)
    for bi in 0..b {
        for &(s0, s1) in &segs {
            let per = (s1 - s0)
                .div_ceil(parts.clamp(1, s1 - s0))
                .max(BWD_MIN_BLOCKS);
            for k in (s0..s1).step_by(per) {
                tasks.push((bi, k, (k + per).min(s1)));
            }
        }
    }
    let lc = match tune {
        Some((_, lc)) if lc > 0 => lc,
        _ => outer_chunk(job, tasks.len(), ts),
    };

    // Pass 1: checkpoints (every element is written before pass 2 reads it).
    // Skipped when the forward saved them (`ext`).
    let mut ck = Vec::new();
    if ext.is_none() {
        ck = std::mem::take(&mut *CHECKPOINTS.lock().unwrap_or_else(|e| e.into_inner()));
        ck.resize(b * nb * nch * hsz, 0.0);
    }
    let (mut bt, mut ct) = (Vec::new(), Vec::new());
    let mut t0 = 0;
    while ext.is_none() && t0 < len_l {
        let t1 = (t0 + lc).min(len_l);
        transpose_bc(&job.bm, b, n, t0, t1 - t0, &mut bt);
        let (bt_p, lt) = (bt.as_ptr() as usize, t1 - t0);
        ck.par_chunks_mut(nch * hsz)
            .enumerate()
            .for_each(|(i, cki)| {
                let (bi, blk) = (i / nb, i % nb);
                let (c0, len) = blocks[blk];
                let ctx = Pass1 {
                    job: bj,
                    bi,
                    c0,
                    len,
                    t0,
                    t1,
                    ts,
                    ck: cki.as_mut_ptr(),
                    tab: tabs[blk * tab_sz..].as_ptr(),
                    bt: (bt_p as *const f32).wrapping_add((bi * gb + c0 / sb) * lt * n),
                };
                simd_dispatch!(level, pass1_block, &ctx, &Pass1);
            });
        t0 = t1;
    }

    // Block states [gq | dA | dB | dC: n×LANES each | dD | ddelta_bias: LANES
    // each], gq starting from dlast_state.
    let st_sz = 4 * hsz + 2 * lanes;
    let mut st = vec![0.0f32; b * nb * st_sz];
    if let Some(dl) = &bj.dlast {
        st.par_chunks_mut(st_sz).enumerate().for_each(|(i, s)| {
            let (c0, len) = blocks[i % nb];
            let mut row = vec![0.0f32; n];
            for j in 0..len {
                let p = addr(dl, [i / nb, c0 + j, 0]);
                unsafe { load_row(&mut row, p, dl.dtype, dl.strides[2]) };
                for k in 0..n {
                    s[k * lanes + j] = row[k];
                }
            }
        });
    }

    // Pass 2, outer chunks from last to first (pass 1 left B transposed for
    // the last one).
    let psz = n * lc;
    let mut pb = vec![0.0f32; if bvar { tasks.len() * psz } else { 0 }];
    let mut pc = vec![0.0f32; if cvar { tasks.len() * psz } else { 0 }];
    let mut t1 = len_l;
    while t1 > 0 {
        let t0 = (t1 - 1) / lc * lc;
        let lt = t1 - t0;
        if t1 != len_l || ext.is_some() {
            transpose_bc(&job.bm, b, n, t0, lt, &mut bt);
        }
        transpose_bc(&job.cm, b, n, t0, lt, &mut ct);
        pb.fill(0.0);
        pc.fill(0.0);
        let (bt_p, ct_p, ck_p) = (
            bt.as_ptr() as usize,
            ct.as_ptr() as usize,
            ck.as_ptr() as usize,
        );
        let (st_p, pb_p, pc_p) = (
            st.as_mut_ptr() as usize,
            pb.as_mut_ptr() as usize,
            pc.as_mut_ptr() as usize,
        );
        tasks
            .par_iter()
            .enumerate()
            .for_each(|(ti, &(bi, blk0, blk1))| {
                let c0 = blocks[blk0].0;
                let first = bi * nb + blk0;
                // Each task touches only its own blocks' states and its own partials.
                let ctx = Pass2 {
                    job: bj,
                    blocks: &blocks,
                    bi,
                    blk0,
                    blk1,
                    t0,
                    t1,
                    ts,
                    ck: (ck_p as *const f32).wrapping_add(first * nch * hsz),
                    ext: ext.map_or(std::ptr::null(), |e| e.ptr as *const f32),
                    st: (st_p as *mut f32).wrapping_add(first * st_sz),
                    st_sz,
                    tabs: tabs.as_ptr(),
                    tab_sz,
                    bt: (bt_p as *const f32).wrapping_add((bi * gb + c0 / sb) * lt * n),
                    ct: (ct_p as *const f32).wrapping_add((bi * gc + c0 / sc) * lt * n),
                    pb: (pb_p as *mut f32).wrapping_add(ti * psz),
                    pc: (pc_p as *mut f32).wrapping_add(ti * psz),
                };
                simd_dispatch!(level, pass2_task, &ctx, &Pass2);
            });
        // Sum the partials of each (batch, group) into the time-varying dB/dC.
        for (grad, part, g, sg) in [(&bj.db, &pb, gb, sb), (&bj.dc, &pc, gc, sc)] {
            let BcGrad::Var(out) = grad else { continue };
            (0..b * g).into_par_iter().for_each(|bg| {
                let (bi, gi) = (bg / g, bg % g);
                let mine: Vec<usize> = (0..tasks.len())
                    .filter(|&ti| tasks[ti].0 == bi && blocks[tasks[ti].1].0 / sg == gi)
                    .collect();
                let mut sum = vec![0.0f32; lt * n];
                for &ti in &mine {
                    let src = &part[ti * psz..][..lt * n];
                    sum.iter_mut().zip(src).for_each(|(r, v)| *r += v);
                }
                let mut row = vec![0.0f32; lt];
                for k in 0..n {
                    row.iter_mut()
                        .enumerate()
                        .for_each(|(t, r)| *r = sum[t * n + k]);
                    let p = addr(out, [bi, gi, k, t0]);
                    unsafe { store_row(&row, p, out.dtype, out.strides[3]) };
                }
            });
        }
        t1 = t0;
    }
    if ext.is_none() && ck.len() <= KEEP_CHECKPOINTS {
        *CHECKPOINTS.lock().unwrap_or_else(|e| e.into_inner()) = ck;
    }

    // Per-channel sums over the batch: dA, constant dB/dC, dD, ddelta_bias.
    let mut row = vec![0.0f32; n];
    for (blk, &(c0, len)) in blocks.iter().enumerate() {
        for j in 0..len {
            let c = c0 + j;
            let sum = |off: usize| {
                (0..b)
                    .map(|bi| st[(bi * nb + blk) * st_sz + off + j])
                    .sum::<f32>()
            };
            let mut put_row = |off: usize, out: &Raw<2>| {
                for k in 0..n {
                    row[k] = sum(off + k * lanes);
                }
                unsafe { store_row(&row, addr(out, [c, 0]), out.dtype, out.strides[1]) };
            };
            put_row(hsz, &bj.da);
            if let BcGrad::Const(o) = &bj.db {
                put_row(2 * hsz, o);
            }
            if let BcGrad::Const(o) = &bj.dc {
                put_row(3 * hsz, o);
            }
            for (off, out) in [(4 * hsz, &bj.dd), (4 * hsz + lanes, &bj.ddbias)] {
                if let Some(o) = out {
                    unsafe { store_row(&[sum(off)], addr(o, [c]), o.dtype, 0) };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_respect_groups() {
        assert_eq!(
            channel_blocks(36, 3, 1, 16),
            vec![(0, 12), (12, 12), (24, 12)]
        );
        assert_eq!(
            channel_blocks(40, 1, 2, 16),
            vec![(0, 16), (16, 4), (20, 16), (36, 4)]
        );
    }

    /// A float32 problem with every option, B/C time-varying with `gb`/`gc`
    /// groups (None: constant (d, n)). Returns the buffers (inputs from a fixed
    /// generator, outputs zeroed) and the job pointing into them.
    fn problem(
        (b, d, l, n): (usize, usize, usize, usize),
        gb: Option<usize>,
        gc: Option<usize>,
    ) -> (Vec<Vec<f32>>, BwdJob) {
        let mut seed = 1u64;
        let mut v = |len: usize, scale: f32, off: f32| -> Vec<f32> {
            (0..len)
                .map(|_| {
                    seed = seed
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((seed >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale + off
                })
                .collect()
        };
        let bc_len = |g: Option<usize>| g.map_or(d * n, |g| b * g * n * l);
        let x = b * d * l;
        let mut bufs = vec![
            v(x, 1.0, 0.0),          // 0 u
            v(x, 0.5, -2.0),         // 1 delta
            v(x, 1.0, 0.0),          // 2 z
            v(x, 1.0, 0.0),          // 3 dout
            v(bc_len(gb), 1.0, 0.0), // 4 B
            v(bc_len(gc), 1.0, 0.0), // 5 C
            v(b * d * n, 1.0, 0.0),  // 6 initial_state
            v(b * d * n, 1.0, 0.0),  // 7 dlast_state
        ];
        // Outputs 8..: du, ddelta, dz, dA, dB, dC, dD, ddelta_bias, dinit.
        for len in [x, x, x, d * n, bc_len(gb), bc_len(gc), d, d, b * d * n] {
            bufs.push(vec![0.0; len]);
        }
        let p = |i: usize| bufs[i].as_ptr() as usize;
        let raw3 = |i: usize, s: [usize; 3]| Raw {
            ptr: p(i),
            dtype: DType::F32,
            strides: s.map(|x| x as isize),
        };
        let bdl = [d * l, l, 1];
        let bdn = [d * n, n, 1];
        let var = |i: usize, g: usize| Raw {
            ptr: p(i),
            dtype: DType::F32,
            strides: [g * n * l, n * l, l, 1].map(|x| x as isize),
        };
        let src = |i: usize, g: Option<usize>| match g {
            None => BcSrc::Const(bufs[i].clone()),
            Some(g) => BcSrc::Var {
                raw: var(i, g),
                groups: g,
            },
        };
        let grad = |i: usize, g: Option<usize>| match g {
            None => BcGrad::Const(Raw {
                ptr: p(i),
                dtype: DType::F32,
                strides: [n as isize, 1],
            }),
            Some(g) => BcGrad::Var(var(i, g)),
        };
        let vec1 = |i: usize| Raw {
            ptr: p(i),
            dtype: DType::F32,
            strides: [1],
        };
        let job = BwdJob {
            fwd: ScanJob {
                b,
                d,
                l,
                n,
                u: raw3(0, bdl),
                delta: raw3(1, bdl),
                z: Some(raw3(2, bdl)),
                out: raw3(0, bdl),
                a: (0..d * n).map(|i| -((i % n) as f32 + 1.0) * 0.7).collect(),
                bm: src(4, gb),
                cm: src(5, gc),
                dskip: Some((0..d).map(|c| (c as f32 * 0.37).sin()).collect()),
                dbias: Some((0..d).map(|c| -2.5 + (c as f32 * 0.61).cos()).collect()),
                softplus: true,
                init: Some(raw3(6, bdn)),
                last: None,
            },
            dout: raw3(3, bdl),
            dlast: Some(raw3(7, bdn)),
            du: raw3(8, bdl),
            ddelta: raw3(9, bdl),
            dz: Some(raw3(10, bdl)),
            da: Raw {
                ptr: p(11),
                dtype: DType::F32,
                strides: [n as isize, 1],
            },
            db: grad(12, gb),
            dc: grad(13, gc),
            dd: Some(vec1(14)),
            ddbias: Some(vec1(15)),
            dinit: Some(raw3(16, bdn)),
        };
        (bufs, job)
    }

    /// The sub-chunk and outer-chunk lengths change where states are
    /// checkpointed and how B/C are staged, never the arithmetic: results are
    /// bitwise equal.
    #[test]
    fn chunking_does_not_change_results() {
        for (gb, gc) in [(Some(2), Some(1)), (None, Some(4)), (Some(4), None)] {
            let (bufs, job) = problem((2, 20, 150, 5), gb, gc);
            for level in SimdLevel::available() {
                scan_backward(&job, level);
                let want: Vec<Vec<f32>> = bufs[8..].to_vec();
                assert!(want.iter().flatten().all(|x| x.is_finite()));
                for tune in [(16, 16), (16, 48), (32, 64), (64, 64), (64, 192)] {
                    scan_backward_tuned(&job, level, Some(tune), None);
                    for (i, w) in want.iter().enumerate() {
                        assert!(
                            bufs[8 + i] == *w,
                            "{} {tune:?}: output {i} differs",
                            level.name()
                        );
                    }
                }
            }
        }
    }

    /// Checkpoints written by the forward (`scan_forward_ck`) are the states
    /// pass 1 recomputes, bitwise: the backward from them gives the same bits.
    #[test]
    fn forward_checkpoints_match_recompute() {
        use crate::cpu::scan::scan_forward_ck;
        for (dims, gb, gc) in [
            ((2, 20, 150, 5), Some(2), Some(1)),
            ((1, 40, 64, 16), Some(1), Some(1)),
            ((1, 33, 1, 16), None, Some(1)),
            ((2, 16, 97, 8), Some(1), None),
            ((1, 24, 40, 3), None, None),
        ] {
            let (b, d, l, n) = dims;
            let (bufs, mut job) = problem(dims, gb, gc);
            let out = vec![0.0f32; b * d * l];
            job.fwd.out.ptr = out.as_ptr() as usize;
            let ts = checkpoint_chunk(b, d, n, l);
            let ck = vec![f32::NAN; b * d * l.div_ceil(ts) * n];
            let ckp = Checkpoints {
                ptr: ck.as_ptr() as usize,
                ts,
            };
            for level in SimdLevel::available() {
                scan_backward(&job, level);
                let want: Vec<Vec<f32>> = bufs[8..].to_vec();
                assert!(want.iter().flatten().all(|x| x.is_finite()));
                scan_forward_ck(&job.fwd, level, Some(ckp));
                assert!(ck.iter().all(|x| x.is_finite()));
                scan_backward_ck(&job, level, Some(ckp));
                for (i, w) in want.iter().enumerate() {
                    assert!(
                        bufs[8 + i] == *w,
                        "{} {dims:?}: output {i} differs",
                        level.name()
                    );
                }
            }
        }
    }

    /// The C1 workload's backward, timed per SIMD level (a tuning aid:
    /// `cargo test --release --no-default-features --lib bench_c1 -- --ignored --nocapture`).
    #[test]
    #[ignore]
    fn bench_c1() {
        let (_bufs, job) = problem((1, 1536, 2048, 16), Some(1), Some(1));
        // MA_LEVEL=avx512 (or avx2, portable) times one level only.
        let only = std::env::var("MA_LEVEL").ok();
        for level in SimdLevel::available() {
            if only.as_deref().is_some_and(|o| o != level.name()) {
                continue;
            }
            let tune = std::env::var("MA_TUNE").ok().map(|v| {
                let t: Vec<usize> = v.split(',').map(|x| x.parse().unwrap()).collect();
                (t[0], t[1])
            });
            // Process CPU time too (utime + stime of every thread, /proc/self/stat):
            // steadier than wall time on a shared machine.
            let cpu = || -> f64 {
                let st = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
                let f: Vec<&str> = st
                    .rsplit(')')
                    .next()
                    .unwrap_or("")
                    .split_whitespace()
                    .collect();
                f.get(11..13).map_or(0.0, |v| {
                    v.iter()
                        .map(|x| x.parse::<f64>().unwrap_or(0.0))
                        .sum::<f64>()
                        / 100.0
                })
            };
            let reps = 40;
            let c0 = cpu();
            let mut best = f64::MAX;
            for _ in 0..reps {
                let t = std::time::Instant::now();
                scan_backward_tuned(&job, level, tune, None);
                best = best.min(t.elapsed().as_secs_f64());
            }
            eprintln!(
                "{}: cpu time per call {:.2} ms",
                level.name(),
                (cpu() - c0) / reps as f64 * 1e3
            );
            eprintln!("{}: best {:.2} ms", level.name(), best * 1e3);
        }
    }
}
