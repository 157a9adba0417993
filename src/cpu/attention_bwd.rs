//! CPU attention backward (FlashAttention-2's algorithm): dq, dk, dv from the
//! saved out and lse, recomputing P tile by tile.
//!
//! With u = scale·q·k, s = softcap·tanh(u/softcap) (or u), minus the ALiBi bias,
//! P = exp(s − lse) on visible pairs:
//!   D_i = Σ_d dO_i·O_i − dlse_i (dlse: the gradient reaching lse, if any),
//!   dV_j = Σ_i P_ij dO_i,  dP_ij = dO_i·V_j,  dS_ij = P_ij (dP_ij − D_i),
//!   dU = dS·(1 − tanh²) with softcap,  dQ_i = scale Σ_j dU_ij K_j,  dK_j = scale Σ_i dU_ij Q_i.
//!
//! A task is (sequence, kv head): it walks the key blocks in order, and for
//! each the (query, query head of the group) rows that can see it, so dK/dV of
//! the block are summed over the group's heads in registers/L1 (GQA without
//! atomics) and dQ is accumulated in the task's own float32 buffer. Vectors run
//! over the keys of a block: Kᵀ, Vᵀ, dKᵀ, dVᵀ are [hd][BKB] arrays, so scores
//! and updates need no horizontal sums. Parallelism is over (sequence, kv head).

use super::attention::SeqDesc;
use super::simd::Simd;
use super::SimdLevel;
use crate::simd_dispatch;
use crate::tensor::{load_row, store_row, Raw};
use rayon::prelude::*;

/// Keys per block (lanes of the key vectors).
const BKB: usize = 64;
/// Most key vectors per block (8-lane levels).
const MAXV: usize = 8;

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
    (r.ptr as isize + (i as isize * r.strides[0] + h as isize * r.strides[1]) * r.dtype.size() as isize) as usize
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
    let softcap = job.softcap > 0.0;
    let c1 = if softcap { job.scale / job.softcap } else { job.scale };
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
        load_row(&mut qs[r * hd..(r + 1) * hd], row_addr(q, i, h), q.dtype, q.strides[2]);
        for x in &mut qs[r * hd..(r + 1) * hd] {
            *x *= c1;
        }
        let d = &bs.dout;
        load_row(&mut dos[r * hd..(r + 1) * hd], row_addr(d, i, h), d.dtype, d.strides[2]);
        let o = &seq.out;
        load_row(&mut tmp, row_addr(o, i, h), o.dtype, o.strides[2]);
        let mut acc = 0.0f64;
        for x in 0..hd {
            acc += dos[r * hd + x] as f64 * tmp[x] as f64;
        }
        let la = lse_raw.ptr as isize + (h as isize * lse_raw.strides[0] + i as isize * lse_raw.strides[1]) * 4;
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
    let iota: Vec<f32> = (0..BKB).map(|x| x as f32).collect();

    let mut kt = vec![0.0f32; hd * BKB];
    let mut vt = vec![0.0f32; hd * BKB];
    let mut kn = vec![0.0f32; BKB * hd];
    let mut dkt = vec![0.0f32; hd * BKB];
    let mut dvt = vec![0.0f32; hd * BKB];
    let mut du_s = vec![0.0f32; BKB];
    let mut kb0 = 0;
    while kb0 < sk {
        let nk = BKB.min(sk - kb0);
        let nv = nk.div_ceil(lanes);
        // Pack K (natural and transposed) and Vᵀ; padding keys are zero.
        kt.fill(0.0);
        vt.fill(0.0);
        for j in 0..nk {
            load_row(&mut kn[j * hd..(j + 1) * hd], row_addr(&seg.k, kb0 + j, kvh), seg.k.dtype, seg.k.strides[2]);
            for x in 0..hd {
                kt[x * BKB + j] = kn[j * hd + x];
            }
            load_row(&mut tmp, row_addr(&seg.v, kb0 + j, kvh), seg.v.dtype, seg.v.strides[2]);
            for x in 0..hd {
                vt[x * BKB + j] = tmp[x];
            }
        }
        dkt.fill(0.0);
        dvt.fill(0.0);
        // Queries that can see some key of the block.
        let (jmin, jmax) = (kb0 as i64, (kb0 + nk - 1) as i64);
        let i_lo = if right >= 0 { (jmin - off - right).max(0) } else { 0 };
        let i_hi = if left >= 0 { (jmax - off + left).min(sq as i64 - 1) } else { sq as i64 - 1 };
        let mut i = i_lo;
        while i <= i_hi {
            let iu = i as usize;
            let dist0 = (i + off - kb0 as i64) as f32;
            for g in 0..grp {
                let r = iu * grp + g;
                let qr = qs.as_ptr().add(r * hd);
                let dor = dos.as_ptr().add(r * hd);
                let mut s = [S::zero(); MAXV];
                let mut dp = [S::zero(); MAXV];
                for x in 0..hd {
                    let qb = S::splat(*qr.add(x));
                    let db = S::splat(*dor.add(x));
                    for v in 0..nv {
                        s[v] = S::fma(qb, S::load(kt.as_ptr().add(x * BKB + v * lanes)), s[v]);
                        dp[v] = S::fma(db, S::load(vt.as_ptr().add(x * BKB + v * lanes)), dp[v]);
                    }
                }
                let lse_v = S::splat(lse[r]);
                let d_v = S::splat(dd[r]);
                let mut du = [S::zero(); MAXV];
                let mut p = [S::zero(); MAXV];
                for v in 0..nv {
                    let mut sc = s[v];
                    let mut th = S::zero();
                    if softcap {
                        let e = S::exp(S::add(sc, sc));
                        th = S::sub(S::splat(1.0), S::div(S::splat(2.0), S::add(e, S::splat(1.0))));
                        sc = S::mul(th, S::splat(job.softcap));
                    }
                    let jl = S::load(iota.as_ptr().add(v * lanes));
                    let dist = S::sub(S::splat(dist0), jl);
                    if alibi {
                        sc = S::fma(S::abs(dist), S::splat(-slope[g]), sc);
                    }
                    let mut pv = S::exp(S::sub(sc, lse_v));
                    let zero = S::zero();
                    if left >= 0 {
                        pv = S::select_gt(dist, S::splat(left as f32 + 0.5), zero, pv);
                    }
                    if right >= 0 {
                        pv = S::select_gt(S::splat(-(right as f32) - 0.5), dist, zero, pv);
                    }
                    pv = S::select_gt(jl, S::splat(nk as f32 - 0.5), zero, pv);
                    let ds = S::mul(pv, S::sub(dp[v], d_v));
                    du[v] = if softcap {
                        S::mul(ds, S::sub(S::splat(1.0), S::mul(th, th)))
                    } else {
                        ds
                    };
                    p[v] = pv;
                }
                // dVᵀ += dO ⊗ P, dKᵀ += (scale·q) ⊗ dU.
                let qsc = job.scale / c1;
                for x in 0..hd {
                    let db = S::splat(*dor.add(x));
                    let qb = S::splat(*qr.add(x) * qsc);
                    for v in 0..nv {
                        let pv_ = dvt.as_mut_ptr().add(x * BKB + v * lanes);
                        S::store(pv_, S::fma(db, p[v], S::load(pv_)));
                        let pk = dkt.as_mut_ptr().add(x * BKB + v * lanes);
                        S::store(pk, S::fma(qb, du[v], S::load(pk)));
                    }
                }
                // dQ += scale · Σ_j dU_j K_j.
                for v in 0..nv {
                    S::store(du_s.as_mut_ptr().add(v * lanes), du[v]);
                }
                let dqr = dq.as_mut_ptr().add(r * hd);
                for j in 0..nk {
                    let w = du_s[j] * job.scale;
                    if w == 0.0 {
                        continue;
                    }
                    let kr = kn.as_ptr().add(j * hd);
                    let mut x = 0;
                    let wv = S::splat(w);
                    while x + lanes <= hd {
                        S::store(dqr.add(x), S::fma(wv, S::load(kr.add(x)), S::load(dqr.add(x))));
                        x += lanes;
                    }
                    while x < hd {
                        *dqr.add(x) += w * *kr.add(x);
                        x += 1;
                    }
                }
            }
            i += 1;
        }
        // Store dK, dV rows of the block (sums over the group's heads).
        for j in 0..nk {
            for x in 0..hd {
                tmp[x] = dkt[x * BKB + j];
            }
            store_row(&tmp, row_addr(&bs.dk, kb0 + j, kvh), bs.dk.dtype, bs.dk.strides[2]);
            for x in 0..hd {
                tmp[x] = dvt[x * BKB + j];
            }
            store_row(&tmp, row_addr(&bs.dv, kb0 + j, kvh), bs.dv.dtype, bs.dv.strides[2]);
        }
        kb0 += nk;
    }
    for r in 0..rows {
        let (i, h) = (r / grp, head(r));
        store_row(&dq[r * hd..(r + 1) * hd], row_addr(&bs.dq, i, h), bs.dq.dtype, bs.dq.strides[2]);
    }
}
