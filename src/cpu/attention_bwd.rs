//! CPU attention backward (FlashAttention-2's algorithm): dq, dk, dv from the
//! saved out and lse, recomputing P tile by tile.
//!
//! With u = scale·q·k, s = softcap·tanh(u/softcap) (or u; `softcap_tanh`,
//! accurate for any softcap), minus the ALiBi bias,
//! P = exp(s − lse) on visible pairs:
//!   D_i = Σ_d dO_i·O_i − dlse_i (dlse: the gradient reaching lse, if any),
//!   dV_j = Σ_i P_ij dO_i,  dP_ij = dO_i·V_j,  dS_ij = P_ij (dP_ij − D_i),
//!   dU = dS·(1 − tanh²) with softcap,  dQ_i = scale Σ_j dU_ij K_j,  dK_j = scale Σ_i dU_ij Q_i.
//!
//! A task is (sequence, kv head): it walks the key blocks in order, and for
//! each the (query, query head of the group) rows that can see it, so dK/dV of
//! the block are summed over the group's heads in registers/L1 (GQA without
//! atomics) and dQ is accumulated in the task's own float32 buffer. Vectors run
//! over the keys of a block: Kᵀ, Vᵀ, dKᵀ, dVᵀ are [hd][NV·LANES] arrays, so scores
//! and updates need no horizontal sums. Parallelism is over (sequence, kv head).

// Register tiles are indexed [row][vector]: index loops read clearest.
#![allow(clippy::needless_range_loop)]

use super::attention::{softcap_tanh, SeqDesc};
use super::simd::Simd;
use super::SimdLevel;
use crate::simd_dispatch;
use crate::tensor::{load_row, store_row, Raw};
use rayon::prelude::*;

/// Key vectors per block: a block is NV·LANES keys (64 on AVX-512, 32 otherwise).
const NV: usize = 4;
/// Most query rows processed together.
const RMAX: usize = 4;

/// One sequence's backward: the forward's description (q, out, lse, keys in a
/// single segment starting at key 0) plus dout and the gradients.
#[derive(Clone, Debug)]
pub struct BwdSeq {
    pub fwd: SeqDesc,
    pub dout: Raw<3>,
    /// Gradient reaching lse ([head][row] float32), if any.
    pub dlse: Option<Raw<2>>,
    pub dq: Raw<3>,
    pub dk: Raw<3>,
    pub dv: Raw<3>,
}

#[derive(Clone, Debug)]
pub struct AttnBwdJob {
    pub hq: usize,
    pub hk: usize,
    pub hd: usize,
    pub scale: f32,
    pub left: i64,
    pub right: i64,
    pub softcap: f32,
    pub seqs: Vec<BwdSeq>,
}

struct Task<'a> {
    job: &'a AttnBwdJob,
    seq: &'a BwdSeq,
    kvh: usize,
}

pub fn attn_backward(job: &AttnBwdJob, level: SimdLevel) {
    let tasks: Vec<Task> = job
        .seqs
        .iter()
        .flat_map(|seq| (0..job.hk).map(move |kvh| Task { job, seq, kvh }))
        .collect();
    let run = |t: &Task| simd_dispatch!(level, bwd_task, t, &Task);
    tasks.par_iter().for_each(run);
}

#[inline(always)]
unsafe fn row_addr(r: &Raw<3>, i: usize, h: usize) -> usize {
    (r.ptr as isize
        + (i as isize * r.strides[0] + h as isize * r.strides[1]) * r.dtype.size() as isize)
        as usize
}

#[inline(always)]
unsafe fn bwd_task<S: Simd>(t: &Task) {
    let job = t.job;
    let bs = t.seq;
    let seq = &bs.fwd;
    let (hd, grp, kvh) = (job.hd, job.hq / job.hk, t.kvh);
    let (sq, sk) = (seq.sq, seq.sk);
    let rows = sq * grp;
    let lanes = S::LANES;
    let off = sk as i64 - sq as i64;
    let (left, right) = (job.left, job.right);
    let c1 = job.scale;
    let head = |r: usize| kvh * grp + r % grp;

    // Per row: q (pre-scaled by c1), dO, lse, D.
    let mut qs = vec![0.0f32; rows * hd];
    let mut dos = vec![0.0f32; rows * hd];
    let mut lse = vec![0.0f32; rows];
    let mut dd = vec![0.0f32; rows];
    let mut tmp = vec![0.0f32; hd];
    let lse_raw = seq.lse.as_ref().expect("backward needs lse");
    for r in 0..rows {
        let (i, h) = (r / grp, head(r));
        let q = &seq.q;
        load_row(
            &mut qs[r * hd..(r + 1) * hd],
            row_addr(q, i, h),
            q.dtype,
            q.strides[2],
        );
        for x in &mut qs[r * hd..(r + 1) * hd] {
            *x *= c1;
        }
        let d = &bs.dout;
        load_row(
            &mut dos[r * hd..(r + 1) * hd],
            row_addr(d, i, h),
            d.dtype,
            d.strides[2],
        );
        let o = &seq.out;
        load_row(&mut tmp, row_addr(o, i, h), o.dtype, o.strides[2]);
        let mut acc = 0.0f64;
        for x in 0..hd {
            acc += dos[r * hd + x] as f64 * tmp[x] as f64;
        }
        let la = lse_raw.ptr as isize
            + (h as isize * lse_raw.strides[0] + i as isize * lse_raw.strides[1]) * 4;
        lse[r] = *(la as *const f32);
        if let Some(dl) = &bs.dlse {
            let p = dl.ptr as isize + (h as isize * dl.strides[0] + i as isize * dl.strides[1]) * 4;
            acc -= *(p as *const f32) as f64;
        }
        dd[r] = acc as f32;
    }
    let mut dq = vec![0.0f32; rows * hd];
    let seg = &seq.segs[0];
    let slope: Vec<f32> = (0..grp)
        .map(|g| seq.slopes.as_ref().map_or(0.0, |s| s[kvh * grp + g]))
        .collect();
    let alibi = seq.slopes.is_some();
    let iota: Vec<f32> = (0..NV * lanes).map(|x| x as f32).collect();

    let bk = NV * lanes;
    let mut kt = vec![0.0f32; hd * bk];
    let mut vt = vec![0.0f32; hd * bk];
    let mut kn = vec![0.0f32; bk * hd];
    let mut dkt = vec![0.0f32; hd * bk];
    let mut dvt = vec![0.0f32; hd * bk];
    let mut dus = vec![0.0f32; RMAX * bk];
    let mut kb0 = 0;
    while kb0 < sk {
        let nk = bk.min(sk - kb0);
        // Pack K (natural and transposed) and Vᵀ; padding keys are zero.
        kt.fill(0.0);
        vt.fill(0.0);
        for j in 0..nk {
            load_row(
                &mut kn[j * hd..(j + 1) * hd],
                row_addr(&seg.k, kb0 + j, kvh),
                seg.k.dtype,
                seg.k.strides[2],
            );
            for x in 0..hd {
                let e = kn[j * hd + x];
                kt[x * bk + j] = e;
                // dQ = Σ_j dU_ij·K_j reads K of keys row i cannot see (dU = 0
                // there): a non-finite K must not make 0·inf = NaN. Rows that
                // see it get NaN through dU (their P and D are NaN).
                kn[j * hd + x] = if e.is_finite() { e } else { 0.0 };
            }
            load_row(
                &mut tmp,
                row_addr(&seg.v, kb0 + j, kvh),
                seg.v.dtype,
                seg.v.strides[2],
            );
            for x in 0..hd {
                vt[x * bk + j] = tmp[x];
            }
        }
        dkt.fill(0.0);
        dvt.fill(0.0);
        // Queries that can see some key of the block.
        let (jmin, jmax) = (kb0 as i64, (kb0 + nk - 1) as i64);
        let i_lo = if right >= 0 {
            (jmin - off - right).max(0)
        } else {
            0
        };
        let i_hi = if left >= 0 {
            (jmax - off + left).min(sq as i64 - 1)
        } else {
            sq as i64 - 1
        };
        if i_lo <= i_hi {
            let blk = Blk {
                hd,
                bk,
                nk,
                grp,
                kb0,
                off,
                left,
                right,
                scale: job.scale,
                qsc: job.scale / c1,
                softcap: job.softcap,
                inv_cap: if job.softcap > 0.0 {
                    (1.0 / job.softcap as f64) as f32
                } else {
                    0.0
                },
                alibi,
                slope: &slope,
                iota: &iota,
                kt: &kt,
                vt: &vt,
                kn: &kn,
                qs: &qs,
                dos: &dos,
                lse: &lse,
                dd: &dd,
                dkt: dkt.as_mut_ptr(),
                dvt: dvt.as_mut_ptr(),
                dq: dq.as_mut_ptr(),
                dus: dus.as_mut_ptr(),
            };
            let (r_end, mut r) = ((i_hi as usize + 1) * grp, i_lo as usize * grp);
            if lanes >= 16 {
                while r + 4 <= r_end {
                    rows_blk::<S, 4>(&blk, r);
                    r += 4;
                }
            } else {
                while r + 2 <= r_end {
                    rows_blk::<S, 2>(&blk, r);
                    r += 2;
                }
            }
            while r < r_end {
                rows_blk::<S, 1>(&blk, r);
                r += 1;
            }
        }
        // Store dK, dV rows of the block (sums over the group's heads).
        for j in 0..nk {
            for x in 0..hd {
                tmp[x] = dkt[x * bk + j];
            }
            store_row(
                &tmp,
                row_addr(&bs.dk, kb0 + j, kvh),
                bs.dk.dtype,
                bs.dk.strides[2],
            );
            for x in 0..hd {
                tmp[x] = dvt[x * bk + j];
            }
            store_row(
                &tmp,
                row_addr(&bs.dv, kb0 + j, kvh),
                bs.dv.dtype,
                bs.dv.strides[2],
            );
        }
        kb0 += nk;
    }
    for r in 0..rows {
        let (i, h) = (r / grp, head(r));
        store_row(
            &dq[r * hd..(r + 1) * hd],
            row_addr(&bs.dq, i, h),
            bs.dq.dtype,
            bs.dq.strides[2],
        );
    }
}

/// What a block of rows needs: the packed key block and the per-row inputs.
struct Blk<'a> {
    hd: usize,
    bk: usize,
    nk: usize,
    grp: usize,
    kb0: usize,
    off: i64,
    left: i64,
    right: i64,
    scale: f32,
    /// scale / c1: turns the pre-scaled q back into scale·q.
    qsc: f32,
    softcap: f32,
    /// 1 / softcap (0 without).
    inv_cap: f32,
    alibi: bool,
    slope: &'a [f32],
    iota: &'a [f32],
    kt: &'a [f32],
    vt: &'a [f32],
    kn: &'a [f32],
    qs: &'a [f32],
    dos: &'a [f32],
    lse: &'a [f32],
    dd: &'a [f32],
    dkt: *mut f32,
    dvt: *mut f32,
    dq: *mut f32,
    dus: *mut f32,
}

/// Rows r0 .. r0+R (row r = query r / grp, head r % grp of the group) against
/// the key block: scores and dP as R×NV register tiles, P and dU, then
/// dVᵀ += dOᵀ·P, dKᵀ += (scale·Q)ᵀ·dU and dQ += scale·dU·K.
#[inline(always)]
unsafe fn rows_blk<S: Simd, const R: usize>(b: &Blk, r0: usize) {
    let (hd, bk, l) = (b.hd, b.bk, S::LANES);
    let qs = b.qs.as_ptr().add(r0 * hd);
    let dos = b.dos.as_ptr().add(r0 * hd);
    let mut s = [[S::zero(); NV]; R];
    for x in 0..hd {
        let kv: [S::V; NV] = std::array::from_fn(|v| S::load(b.kt.as_ptr().add(x * bk + v * l)));
        for r in 0..R {
            let qb = S::splat(*qs.add(r * hd + x));
            for v in 0..NV {
                s[r][v] = S::fma(qb, kv[v], s[r][v]);
            }
        }
    }
    let mut dp = [[S::zero(); NV]; R];
    for x in 0..hd {
        let vv: [S::V; NV] = std::array::from_fn(|v| S::load(b.vt.as_ptr().add(x * bk + v * l)));
        for r in 0..R {
            let db = S::splat(*dos.add(r * hd + x));
            for v in 0..NV {
                dp[r][v] = S::fma(db, vv[v], dp[r][v]);
            }
        }
    }
    let softcap = b.softcap > 0.0;
    let zero = S::zero();
    let mut p = [[S::zero(); NV]; R];
    let mut du = [[S::zero(); NV]; R];
    for r in 0..R {
        let row = r0 + r;
        let (i, g) = (row / b.grp, row % b.grp);
        let dist0 = S::splat((i as i64 + b.off - b.kb0 as i64) as f32);
        let lse_v = S::splat(b.lse[row]);
        let d_v = S::splat(b.dd[row]);
        for v in 0..NV {
            let mut sc = s[r][v];
            let mut th = zero;
            if softcap {
                (sc, th) = softcap_tanh::<S>(sc, S::splat(b.inv_cap), S::splat(b.softcap));
            }
            let jl = S::load(b.iota.as_ptr().add(v * l));
            let dist = S::sub(dist0, jl);
            if b.alibi {
                sc = S::fma(S::abs(dist), S::splat(-b.slope[g]), sc);
            }
            let mut pv = S::exp(S::sub(sc, lse_v));
            let mut ds = S::mul(pv, S::sub(dp[r][v], d_v));
            if softcap {
                ds = S::mul(ds, S::sub(S::splat(1.0), S::mul(th, th)));
            }
            // Masked pairs: P = 0 and dU = 0 by selection, whatever dP holds
            // (a non-finite V or K at a key the row cannot see).
            if b.left >= 0 {
                let far = S::splat(b.left as f32 + 0.5);
                pv = S::select_gt(dist, far, zero, pv);
                ds = S::select_gt(dist, far, zero, ds);
            }
            if b.right >= 0 {
                let ahead = S::splat(-(b.right as f32) - 0.5);
                pv = S::select_gt(ahead, dist, zero, pv);
                ds = S::select_gt(ahead, dist, zero, ds);
            }
            let pad = S::splat(b.nk as f32 - 0.5);
            pv = S::select_gt(jl, pad, zero, pv);
            du[r][v] = S::select_gt(jl, pad, zero, ds);
            p[r][v] = pv;
        }
    }
    // dVᵀ += Σ_r dO_r ⊗ P_r
    for x in 0..hd {
        let b_: [S::V; R] = std::array::from_fn(|r| S::splat(*dos.add(r * hd + x)));
        for v in 0..NV {
            let ptr = b.dvt.add(x * bk + v * l);
            let mut a = S::load(ptr);
            for r in 0..R {
                a = S::fma(b_[r], p[r][v], a);
            }
            S::store(ptr, a);
        }
    }
    // dKᵀ += Σ_r (scale·q_r) ⊗ dU_r
    for x in 0..hd {
        let b_: [S::V; R] = std::array::from_fn(|r| S::splat(*qs.add(r * hd + x) * b.qsc));
        for v in 0..NV {
            let ptr = b.dkt.add(x * bk + v * l);
            let mut a = S::load(ptr);
            for r in 0..R {
                a = S::fma(b_[r], du[r][v], a);
            }
            S::store(ptr, a);
        }
    }
    // dQ_r += scale · Σ_j dU_r[j] K_j
    let sc = S::splat(b.scale);
    for r in 0..R {
        for v in 0..NV {
            S::store(b.dus.add(r * bk + v * l), S::mul(du[r][v], sc));
        }
    }
    let dq = b.dq.add(r0 * hd);
    let mut x = 0;
    while x + 4 * l <= hd {
        dq_chunk::<S, R, 4>(b, dq, x);
        x += 4 * l;
    }
    while x + l <= hd {
        dq_chunk::<S, R, 1>(b, dq, x);
        x += l;
    }
    if x < hd {
        for r in 0..R {
            for j in 0..b.nk {
                let w = *b.dus.add(r * bk + j);
                for xx in x..hd {
                    *dq.add(r * hd + xx) += w * b.kn[j * hd + xx];
                }
            }
        }
    }
}

/// dQ[r][x .. x + C·LANES] += Σ_j dus[r][j] · K[j][x ..].
#[inline(always)]
unsafe fn dq_chunk<S: Simd, const R: usize, const C: usize>(b: &Blk, dq: *mut f32, x: usize) {
    let (hd, l) = (b.hd, S::LANES);
    let mut acc: [[S::V; C]; R] =
        std::array::from_fn(|r| std::array::from_fn(|c| S::load(dq.add(r * hd + x + c * l))));
    for j in 0..b.nk {
        let kr = b.kn.as_ptr().add(j * hd + x);
        let kv: [S::V; C] = std::array::from_fn(|c| S::load(kr.add(c * l)));
        for r in 0..R {
            let w = S::splat(*b.dus.add(r * b.bk + j));
            for c in 0..C {
                acc[r][c] = S::fma(w, kv[c], acc[r][c]);
            }
        }
    }
    for r in 0..R {
        for c in 0..C {
            S::store(dq.add(r * hd + x + c * l), acc[r][c]);
        }
    }
}
