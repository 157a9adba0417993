//! CPU RMSNorm with a fused residual add, and the SwiGLU activation, forward
//! and backward (the hybrid blocks' pre-norm and MLP; see `ops::norm`).
//!
//! RMSNorm of a row x (and residual r, optional):
//!
//! ```text
//! s = x + r           rstd = 1 / sqrt(mean(s²) + eps)      y = s·rstd·w (+ b)
//! ds = rstd·(g − ŝ·mean(g·ŝ)) + dres,   with ŝ = s·rstd and g = dy·w
//! dx = dr = ds        dw = Σ_rows dy·ŝ     db = Σ_rows dy
//! ```
//!
//! (dres is the gradient of the returned residual s, in the pre-norm form.)
//! SwiGLU: y = silu(g)·u; dg = dy·u·σ(g)·(1 + g·(1 − σ(g))), du = dy·silu(g).
//!
//! Everything is float32 arithmetic on rows loaded into float32 buffers, so
//! any dtype and any strides work; rayon goes over runs of rows. Both ops are
//! memory-bound: one read of each input and one write of each output.

use super::simd::Simd;
use super::SimdLevel;
use crate::simd_dispatch;
use crate::tensor::{addr, load_row, store_row, Raw};
use rayon::prelude::*;

/// A validated RMSNorm forward (built by `ops::norm`): 2-D (rows, h) views.
pub struct RmsNormJob {
    pub rows: usize,
    pub h: usize,
    pub eps: f32,
    pub x: Raw<2>,
    pub res: Option<Raw<2>>,
    /// (h,) each.
    pub w: Raw<1>,
    pub b: Option<Raw<1>>,
    pub out: Raw<2>,
    /// s = x + r, written when requested (the pre-norm residual stream).
    pub res_out: Option<Raw<2>>,
    /// (rows,) float32.
    pub rstd: Raw<1>,
}

/// A validated RMSNorm backward.
pub struct RmsNormBwdJob {
    pub rows: usize,
    pub h: usize,
    pub x: Raw<2>,
    pub res: Option<Raw<2>>,
    pub w: Raw<1>,
    pub rstd: Raw<1>,
    pub dy: Raw<2>,
    pub dres_out: Option<Raw<2>>,
    pub dx: Raw<2>,
    pub dres: Option<Raw<2>>,
    /// (h,) float32.
    pub dw: Raw<1>,
    pub db: Option<Raw<1>>,
}

/// SwiGLU on 2-D (rows, cols) views: forward (dy/dg/du None) or backward.
pub struct SwiGluJob {
    pub rows: usize,
    pub cols: usize,
    pub g: Raw<2>,
    pub u: Raw<2>,
    /// Forward: out; backward: dg.
    pub out: Raw<2>,
    /// Backward only: dy in, du out.
    pub dy: Option<Raw<2>>,
    pub du: Option<Raw<2>>,
}

/// Rows per parallel task: enough work per task (~64K elements) to amortise
/// rayon, at least one row.
fn rows_per_task(rows: usize, h: usize) -> usize {
    (65536 / h.max(1)).clamp(1, rows.max(1))
}

/// Runs `f(r0, r1)` over runs of rows in parallel (see `rows_per_task`).
fn for_row_runs(rows: usize, width: usize, f: impl Fn(usize, usize) + Sync) {
    let per = rows_per_task(rows, width);
    let starts: Vec<usize> = (0..rows).step_by(per).collect();
    starts
        .par_iter()
        .for_each(|&r0| f(r0, (r0 + per).min(rows)));
}

/// A float32 row buffer padded to a whole number of vectors. The vector
/// loops read and write the padding; it never reaches an output, and the
/// one sum across lanes (`dot`) clears it first.
fn row_buf(h: usize) -> Vec<f32> {
    vec![0.0; h.div_ceil(16) * 16 + 16]
}

/// Address of row i of a (rows, cols) view.
#[inline(always)]
fn row(r: &Raw<2>, i: usize) -> usize {
    addr(r, [i, 0])
}

/// s = row i of x (+ row i of res), float32; `t` is scratch.
#[inline(always)]
unsafe fn load_sum_row<S: Simd>(
    x: &Raw<2>,
    res: Option<&Raw<2>>,
    i: usize,
    h: usize,
    s: &mut [f32],
    t: &mut [f32],
) {
    load_row(&mut s[..h], row(x, i), x.dtype, x.strides[1]);
    if let Some(r) = res {
        load_row(&mut t[..h], row(r, i), r.dtype, r.strides[1]);
        let mut k = 0;
        while k < h {
            let v = S::add(S::load(s.as_ptr().add(k)), S::load(t.as_ptr().add(k)));
            S::store(s.as_mut_ptr().add(k), v);
            k += S::LANES;
        }
    }
}

/// Σ a[i]·b[i] for i < n over padded buffers (whole vectors): the padding
/// lanes i ≥ n of the last vector are cleared before they are summed, so
/// whatever an earlier row left there (the vector loops write the padding
/// too: a NaN row's rstd makes it NaN) adds nothing.
#[inline(always)]
unsafe fn dot<S: Simd>(a: &[f32], b: &[f32], n: usize) -> f32 {
    let l = S::LANES;
    let (mut s0, mut s1) = (S::zero(), S::zero());
    let full = n / l * l;
    let mut i = 0;
    while i + 2 * l <= full {
        s0 = S::fma(S::load(a.as_ptr().add(i)), S::load(b.as_ptr().add(i)), s0);
        s1 = S::fma(
            S::load(a.as_ptr().add(i + l)),
            S::load(b.as_ptr().add(i + l)),
            s1,
        );
        i += 2 * l;
    }
    if i < full {
        s0 = S::fma(S::load(a.as_ptr().add(i)), S::load(b.as_ptr().add(i)), s0);
        i += l;
    }
    if i < n {
        let av = S::keep_first(S::load(a.as_ptr().add(i)), n - i);
        let bv = S::keep_first(S::load(b.as_ptr().add(i)), n - i);
        s1 = S::fma(av, bv, s1);
    }
    S::hsum(S::add(s0, s1))
}

pub fn rms_norm_forward(job: &RmsNormJob, level: SimdLevel) {
    for_row_runs(job.rows, job.h, |r0, r1| {
        simd_dispatch!(
            level,
            rms_fwd_rows,
            &(job, r0, r1),
            &(&RmsNormJob, usize, usize)
        );
    });
}

#[inline(always)]
unsafe fn rms_fwd_rows<S: Simd>(task: &(&RmsNormJob, usize, usize)) {
    let &(job, r0, r1) = task;
    let h = job.h;
    let l = S::LANES;
    let (mut s, mut t, mut w, mut b) = (row_buf(h), row_buf(h), row_buf(h), row_buf(h));
    load_row(&mut w[..h], job.w.ptr, job.w.dtype, job.w.strides[0]);
    if let Some(bb) = &job.b {
        load_row(&mut b[..h], bb.ptr, bb.dtype, bb.strides[0]);
    }
    let mut rstd_row = [0.0f32; 1];
    for i in r0..r1 {
        load_sum_row::<S>(&job.x, job.res.as_ref(), i, h, &mut s, &mut t);
        if let Some(ro) = &job.res_out {
            store_row(&s[..h], row(ro, i), ro.dtype, ro.strides[1]);
        }
        let rstd = 1.0 / (dot::<S>(&s, &s, h) / h as f32 + job.eps).sqrt();
        let rv = S::splat(rstd);
        let mut k = 0;
        while k < h {
            let xn = S::mul(S::load(s.as_ptr().add(k)), rv);
            let y = S::fma(xn, S::load(w.as_ptr().add(k)), S::load(b.as_ptr().add(k)));
            S::store(t.as_mut_ptr().add(k), y);
            k += l;
        }
        store_row(&t[..h], row(&job.out, i), job.out.dtype, job.out.strides[1]);
        rstd_row[0] = rstd;
        store_row(
            &rstd_row,
            addr(&job.rstd, [i]),
            job.rstd.dtype,
            job.rstd.strides[0],
        );
    }
}

/// Backward; dw and db are summed over per-task partials in task order, so
/// the result does not depend on the thread count's scheduling.
pub fn rms_norm_backward(job: &RmsNormBwdJob, level: SimdLevel) {
    let h = job.h;
    let per = rows_per_task(job.rows, h);
    let starts: Vec<usize> = (0..job.rows).step_by(per).collect();
    let partials: Vec<Vec<f32>> = starts
        .par_iter()
        .map(|&r0| {
            let mut acc = vec![0.0f32; 2 * row_buf(h).len()];
            let task = (job, r0, (r0 + per).min(job.rows), acc.as_mut_ptr() as usize);
            simd_dispatch!(
                level,
                rms_bwd_rows,
                &task,
                &(&RmsNormBwdJob, usize, usize, usize)
            );
            acc
        })
        .collect();
    let stride = row_buf(h).len();
    let mut dw = vec![0.0f32; h];
    let mut db = vec![0.0f32; h];
    for p in &partials {
        for k in 0..h {
            dw[k] += p[k];
            db[k] += p[stride + k];
        }
    }
    unsafe {
        store_row(&dw, job.dw.ptr, job.dw.dtype, job.dw.strides[0]);
        if let Some(d) = &job.db {
            store_row(&db, d.ptr, d.dtype, d.strides[0]);
        }
    }
}

#[inline(always)]
unsafe fn rms_bwd_rows<S: Simd>(task: &(&RmsNormBwdJob, usize, usize, usize)) {
    let &(job, r0, r1, acc) = task;
    let h = job.h;
    let l = S::LANES;
    let stride = row_buf(h).len();
    let (dwp, dbp) = (acc as *mut f32, (acc as *mut f32).add(stride));
    let (mut s, mut t, mut w, mut dy, mut g) =
        (row_buf(h), row_buf(h), row_buf(h), row_buf(h), row_buf(h));
    load_row(&mut w[..h], job.w.ptr, job.w.dtype, job.w.strides[0]);
    let mut rs = [0.0f32; 1];
    for i in r0..r1 {
        load_sum_row::<S>(&job.x, job.res.as_ref(), i, h, &mut s, &mut t);
        load_row(
            &mut dy[..h],
            row(&job.dy, i),
            job.dy.dtype,
            job.dy.strides[1],
        );
        load_row(&mut rs, addr(&job.rstd, [i]), job.rstd.dtype, 1);
        let rv = S::splat(rs[0]);
        // ŝ in s, g = dy·w in g; dw += dy·ŝ, db += dy.
        let mut k = 0;
        while k < h {
            let xn = S::mul(S::load(s.as_ptr().add(k)), rv);
            let d = S::load(dy.as_ptr().add(k));
            S::store(s.as_mut_ptr().add(k), xn);
            S::store(g.as_mut_ptr().add(k), S::mul(d, S::load(w.as_ptr().add(k))));
            S::store(dwp.add(k), S::fma(d, xn, S::load(dwp.add(k))));
            S::store(dbp.add(k), S::add(d, S::load(dbp.add(k))));
            k += l;
        }
        let c = S::splat(dot::<S>(&g, &s, h) / h as f32);
        if let Some(dr) = &job.dres_out {
            load_row(&mut t[..h], row(dr, i), dr.dtype, dr.strides[1]);
        }
        let has_dres = job.dres_out.is_some();
        let mut k = 0;
        while k < h {
            let gs = S::sub(
                S::load(g.as_ptr().add(k)),
                S::mul(S::load(s.as_ptr().add(k)), c),
            );
            let mut ds = S::mul(gs, rv);
            if has_dres {
                ds = S::add(ds, S::load(t.as_ptr().add(k)));
            }
            S::store(g.as_mut_ptr().add(k), ds);
            k += l;
        }
        store_row(&g[..h], row(&job.dx, i), job.dx.dtype, job.dx.strides[1]);
        if let Some(dr) = &job.dres {
            store_row(&g[..h], row(dr, i), dr.dtype, dr.strides[1]);
        }
    }
}

pub fn swiglu(job: &SwiGluJob, level: SimdLevel) {
    for_row_runs(job.rows, job.cols, |r0, r1| {
        simd_dispatch!(
            level,
            swiglu_rows,
            &(job, r0, r1),
            &(&SwiGluJob, usize, usize)
        );
    });
}

#[inline(always)]
unsafe fn swiglu_rows<S: Simd>(task: &(&SwiGluJob, usize, usize)) {
    let &(job, r0, r1) = task;
    let n = job.cols;
    let l = S::LANES;
    let (mut g, mut u, mut d) = (row_buf(n), row_buf(n), row_buf(n));
    let one = S::splat(1.0);
    for i in r0..r1 {
        load_row(&mut g[..n], row(&job.g, i), job.g.dtype, job.g.strides[1]);
        load_row(&mut u[..n], row(&job.u, i), job.u.dtype, job.u.strides[1]);
        match &job.dy {
            None => {
                let mut k = 0;
                while k < n {
                    let y = S::mul(
                        S::silu(S::load(g.as_ptr().add(k))),
                        S::load(u.as_ptr().add(k)),
                    );
                    S::store(g.as_mut_ptr().add(k), y);
                    k += l;
                }
            }
            Some(dyr) => {
                load_row(&mut d[..n], row(dyr, i), dyr.dtype, dyr.strides[1]);
                let mut k = 0;
                while k < n {
                    let gv = S::load(g.as_ptr().add(k));
                    let uv = S::load(u.as_ptr().add(k));
                    let dv = S::load(d.as_ptr().add(k));
                    // σ(g) = 1 / (1 + e^−g): 0 for very negative g (e^−g = inf).
                    let sg = S::div(one, S::add(one, S::exp(S::sub(S::zero(), gv))));
                    let si = S::mul(gv, sg);
                    // dsilu = σ + g·σ·(1 − σ) = σ + si·(1 − σ)
                    let ds = S::fma(si, S::sub(one, sg), sg);
                    S::store(g.as_mut_ptr().add(k), S::mul(S::mul(dv, uv), ds));
                    S::store(u.as_mut_ptr().add(k), S::mul(dv, si));
                    k += l;
                }
                let du = job.du.as_ref().expect("backward job has du");
                store_row(&u[..n], row(du, i), du.dtype, du.strides[1]);
            }
        }
        store_row(&g[..n], row(&job.out, i), job.out.dtype, job.out.strides[1]);
    }
}
