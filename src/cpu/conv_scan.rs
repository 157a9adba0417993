//! CPU `conv_selective_scan_fn`: the causal depthwise conv1d (+ SiLU) fused
//! into the selective scan's forward, so the conv's output u never goes
//! through memory.
//!
//! The work is cut exactly as `cpu::scan::scan_forward` cuts it (rayon over
//! (batch, block of up to LANES channels inside one B/C group), outer time
//! chunks that bound the transposed B/C, tiles of `TILE_T` steps). Where the
//! scan loads a u tile, this loads the x tile into a [w-1 + TILE_T][LANES]
//! buffer whose first w-1 rows are the previous inputs (zeros before t = 0,
//! carried across tiles and outer chunks), and forms
//! u[t] = act(bias + Σ_i weight[i]·x[t - (w-1) + i]) vectorised over the
//! channels, in the same FMA order as `cpu::conv1d` and rounded to x's dtype
//! as the unfused conv would store it: the fused result equals
//! `selective_scan_fn(causal_conv1d_fn(x, …), …)` bit for bit. The
//! recurrence, Δ, D and the z gate are the scan's own code (the hooks in
//! `cpu::scan`).

use super::conv1d::MAX_W;
use super::scan::{
    channel_blocks, lane_table_hook, lane_vec_hook, load_tile_hook, outer_chunk_of,
    prefetch_tile_rows, recur_tile_hook, store_tile_hook, transpose_bc_chunk, BcSrc, ScanJob,
    MAX_LANES, MAX_N, TILE_T,
};
use super::simd::{Simd, LOG2E};
use super::SimdLevel;
use crate::simd_dispatch;
use crate::tensor::{addr, load_row, store_row, DType};
use half::{bf16, f16};
use rayon::prelude::*;

const T: usize = TILE_T;
/// History rows kept before a tile: w - 1 ≤ MAX_W - 1.
const HMAX: usize = MAX_W - 1;

/// A validated fused problem (built by `ops::conv_scan`): `scan.u` is x.
pub struct ConvScanJob {
    pub scan: ScanJob,
    /// Conv width, 2..=MAX_W.
    pub w: usize,
    /// Conv weight as float32 [d][w].
    pub weight: Vec<f32>,
    pub bias: Option<Vec<f32>>,
    /// SiLU after the conv.
    pub silu: bool,
}

struct Ctx<'a> {
    job: &'a ConvScanJob,
    bi: usize,
    c0: usize,
    len: usize,
    t0: usize,
    t1: usize,
    /// State [n][MAX_LANES], carried across outer chunks.
    h: *mut f32,
    /// Conv history [HMAX][MAX_LANES], carried across outer chunks.
    hist: *mut f32,
    bt: *const f32,
    ct: *const f32,
    first: bool,
    last_chunk: bool,
}

/// Runs the fused conv + scan.
pub fn conv_scan_forward(job: &ConvScanJob, level: SimdLevel) {
    let sj = &job.scan;
    let lanes = match level {
        SimdLevel::Avx512 => 16,
        _ => 8,
    };
    let blocks = channel_blocks(sj.d, sj.bm.groups(), sj.cm.groups(), lanes);
    let nb = blocks.len();
    let stride_h = sj.n * MAX_LANES;
    let stride_x = HMAX * MAX_LANES;
    let mut states = vec![0.0f32; sj.b * nb * stride_h];
    let mut hists = vec![0.0f32; sj.b * nb * stride_x];
    let lc = outer_chunk_of(sj);
    let (mut bt, mut ct) = (Vec::new(), Vec::new());
    let mut t0 = 0;
    while t0 < sj.l {
        let t1 = (t0 + lc).min(sj.l);
        let len_t = t1 - t0;
        transpose_bc_chunk(&sj.bm, sj.b, sj.n, t0, len_t, &mut bt);
        transpose_bc_chunk(&sj.cm, sj.b, sj.n, t0, len_t, &mut ct);
        let (gb, gc) = (sj.bm.groups(), sj.cm.groups());
        let (sb, sc) = (sj.d / gb, sj.d / gc);
        let (bt_p, ct_p) = (bt.as_ptr() as usize, ct.as_ptr() as usize);
        states
            .par_chunks_mut(stride_h)
            .zip(hists.par_chunks_mut(stride_x))
            .enumerate()
            .for_each(|(i, (h, hist))| {
                let (bi, blk) = (i / nb, i % nb);
                let (c0, len) = blocks[blk];
                let bt_off = ((bi * gb + c0 / sb) * len_t) * sj.n;
                let ct_off = ((bi * gc + c0 / sc) * len_t) * sj.n;
                let ctx = Ctx {
                    job,
                    bi,
                    c0,
                    len,
                    t0,
                    t1,
                    h: h.as_mut_ptr(),
                    hist: hist.as_mut_ptr(),
                    bt: (bt_p as *const f32).wrapping_add(bt_off),
                    ct: (ct_p as *const f32).wrapping_add(ct_off),
                    first: t0 == 0,
                    last_chunk: t1 == sj.l,
                };
                simd_dispatch!(level, conv_scan_block, &ctx, &Ctx);
            });
        t0 = t1;
    }
}

/// Rounds a float32 tile to `dtype` and back (what storing the conv's output
/// in x's dtype and reloading it does); float32 and float64 keep every value.
#[inline(always)]
fn round_to(dtype: DType, v: &mut [f32]) {
    match dtype {
        DType::BF16 => v.iter_mut().for_each(|x| *x = bf16::from_f32(*x).to_f32()),
        DType::F16 => v.iter_mut().for_each(|x| *x = f16::from_f32(*x).to_f32()),
        _ => {}
    }
}

#[inline(always)]
unsafe fn conv_scan_block<S: Simd>(ctx: &Ctx) {
    let cj = ctx.job;
    let job = &cj.scan;
    let (n, lanes, len) = (job.n, S::LANES, ctx.len);
    let mut a2 = [0.0f32; MAX_N * MAX_LANES];
    lane_table_hook(&job.a, n, ctx.c0, len, lanes, LOG2E, &mut a2);
    let mut bconst = [0.0f32; MAX_N * MAX_LANES];
    let mut cconst = [0.0f32; MAX_N * MAX_LANES];
    if let BcSrc::Const(m) = &job.bm {
        lane_table_hook(m, n, ctx.c0, len, lanes, 1.0, &mut bconst);
    }
    if let BcSrc::Const(m) = &job.cm {
        lane_table_hook(m, n, ctx.c0, len, lanes, 1.0, &mut cconst);
    }
    let dv = lane_vec_hook(job.dskip.as_ref(), ctx.c0, len, 0.0);
    let biasv = lane_vec_hook(job.dbias.as_ref(), ctx.c0, len, 0.0);
    // Conv taps as [w][lanes] (zero for lanes ≥ len) and the conv bias.
    let w = cj.w;
    let hw = w - 1;
    let mut taps = [0.0f32; MAX_W * MAX_LANES];
    lane_table_hook(&cj.weight, w, ctx.c0, len, lanes, 1.0, &mut taps);
    let cbias = lane_vec_hook(cj.bias.as_ref(), ctx.c0, len, 0.0);

    let h = ctx.h;
    // x tile: rows 0..hw are x[t - hw .. t), rows hw.. the tile's own steps.
    let mut xt = [0.0f32; (HMAX + T) * MAX_LANES];
    if ctx.first {
        for k in 0..n * lanes {
            *h.add(k) = 0.0;
        }
        if let Some(init) = &job.init {
            let mut row = [0.0f32; MAX_N];
            for j in 0..len {
                load_row(
                    &mut row[..n],
                    addr(init, [ctx.bi, ctx.c0 + j, 0]),
                    init.dtype,
                    init.strides[2],
                );
                for k in 0..n {
                    *h.add(k * lanes + j) = row[k];
                }
            }
        }
    } else {
        std::ptr::copy_nonoverlapping(ctx.hist, xt.as_mut_ptr(), hw * lanes);
    }

    let mut ut = [0.0f32; T * MAX_LANES];
    let mut dt = [0.0f32; T * MAX_LANES];
    let mut zt = [0.0f32; T * MAX_LANES];
    let mut yt = [0.0f32; T * MAX_LANES];
    let bvar = job.bm.is_var();
    let cvar = job.cm.is_var();
    let cb = S::load(cbias.as_ptr());
    let mut t = ctx.t0;
    while t < ctx.t1 {
        let tt = T.min(ctx.t1 - t);
        // Prefetch the next tile's rows, as the scan's tile loop does.
        let tn = t + tt;
        if tn < ctx.t1 {
            prefetch_tile_rows(job, ctx.bi, ctx.c0, len, tn, T.min(ctx.t1 - tn));
        }
        // u = act(bias + Σ_i w[i]·x[t - hw + i]): the conv of cpu::conv1d,
        // vectorised over the channels instead of time.
        load_tile_hook::<S>(
            &job.u,
            ctx.bi,
            ctx.c0,
            len,
            t,
            tt,
            lanes,
            &mut xt[hw * lanes..],
        );
        for s in 0..tt {
            let mut acc = cb;
            for i in 0..w {
                acc = S::fma(
                    S::load(taps.as_ptr().add(i * lanes)),
                    S::load(xt.as_ptr().add((s + i) * lanes)),
                    acc,
                );
            }
            if cj.silu {
                acc = S::silu(acc);
            }
            S::store(ut.as_mut_ptr().add(s * lanes), acc);
        }
        round_to(job.u.dtype, &mut ut[..tt * lanes]);
        // the last hw inputs are the next tile's history
        xt.copy_within(tt * lanes..(tt + hw) * lanes, 0);

        load_tile_hook::<S>(&job.delta, ctx.bi, ctx.c0, len, t, tt, lanes, &mut dt);
        let bias = S::load(biasv.as_ptr());
        for s in 0..tt {
            let p = dt.as_mut_ptr().add(s * lanes);
            let mut x = S::add(S::load(p), bias);
            if job.softplus {
                x = S::softplus(x);
            }
            S::store(p, x);
        }
        let rel = t - ctx.t0;
        let bp = if bvar {
            ctx.bt.add(rel * n)
        } else {
            bconst.as_ptr()
        };
        let cp = if cvar {
            ctx.ct.add(rel * n)
        } else {
            cconst.as_ptr()
        };
        recur_tile_hook::<S>(
            ut.as_ptr(),
            dt.as_ptr(),
            yt.as_mut_ptr(),
            a2.as_ptr(),
            bp,
            cp,
            h,
            tt,
            n,
            bvar,
            cvar,
        );
        let dvec = S::load(dv.as_ptr());
        if let Some(z) = &job.z {
            load_tile_hook::<S>(z, ctx.bi, ctx.c0, len, t, tt, lanes, &mut zt);
        }
        for s in 0..tt {
            let o = s * lanes;
            let mut y = S::load(yt.as_ptr().add(o));
            if job.dskip.is_some() {
                y = S::fma(dvec, S::load(ut.as_ptr().add(o)), y);
            }
            if job.z.is_some() {
                y = S::mul(y, S::silu(S::load(zt.as_ptr().add(o))));
            }
            S::store(yt.as_mut_ptr().add(o), y);
        }
        store_tile_hook::<S>(&job.out, ctx.bi, ctx.c0, len, t, tt, lanes, &yt);
        t += tt;
    }
    std::ptr::copy_nonoverlapping(xt.as_ptr(), ctx.hist, hw * lanes);

    if ctx.last_chunk {
        if let Some(last) = &job.last {
            let mut row = [0.0f32; MAX_N];
            for j in 0..len {
                for k in 0..n {
                    row[k] = *h.add(k * lanes + j);
                }
                store_row(
                    &row[..n],
                    addr(last, [ctx.bi, ctx.c0 + j, 0]),
                    last.dtype,
                    last.strides[2],
                );
            }
        }
    }
}
