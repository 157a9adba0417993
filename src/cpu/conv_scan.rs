//! CPU `conv_selective_scan_fn`: the causal depthwise conv1d (+ SiLU) fused
//! into the selective scan's forward, so the conv's output u never goes
//! through memory.
//!
//! This is the scan's own driver and tile loop (`cpu::scan::run_scan`) with
//! a different source of u ([`USource`]): where the scan loads a u tile, this
//! loads the x tile into a [w-1 + T][LANES] buffer whose first w-1 rows are
//! the previous inputs (zeros before t = 0, carried across tiles and, in the
//! block's carry, across outer chunks), and forms
//! u[t] = act(bias + Σ_i weight[i]·x[t - (w-1) + i]) vectorised over the
//! channels, in the same FMA order as `cpu::conv1d` and rounded to x's dtype
//! as the unfused conv would store it: the fused result equals
//! `selective_scan_fn(causal_conv1d_fn(x, …), …)` bit for bit.

use super::conv1d::MAX_W;
use super::scan::{
    lane_table, lane_vec, load_tile, run_scan, scan_block, BlockCtx, ScanJob, USource, MAX_LANES, T,
};
use super::simd::Simd;
use super::SimdLevel;
use crate::simd_dispatch;
use crate::tensor::DType;
use half::{bf16, f16};

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

/// Runs the fused conv + scan.
pub fn conv_scan_forward(job: &ConvScanJob, level: SimdLevel) {
    run_scan(&job.scan, level, None, job);
}

/// A block's conv: taps, bias and the x tile with its history rows.
pub(crate) struct ConvBlk {
    /// Conv taps as [w][lanes] (zero for lanes ≥ len).
    taps: [f32; MAX_W * MAX_LANES],
    cbias: [f32; MAX_LANES],
    /// x tile: rows 0..w-1 are x[t - (w-1) .. t), rows w-1.. the tile's own steps.
    xt: [f32; (HMAX + T) * MAX_LANES],
}

impl USource for ConvScanJob {
    type Blk = ConvBlk;

    /// The last w-1 x rows of the block, [HMAX][MAX_LANES].
    fn carry_len(&self) -> usize {
        HMAX * MAX_LANES
    }

    #[inline(always)]
    unsafe fn begin<S: Simd>(&self, c0: usize, len: usize, carry: *const f32) -> ConvBlk {
        let lanes = S::LANES;
        let mut blk = ConvBlk {
            taps: [0.0; MAX_W * MAX_LANES],
            cbias: lane_vec(self.bias.as_ref(), c0, len, 0.0),
            xt: [0.0; (HMAX + T) * MAX_LANES],
        };
        lane_table(&self.weight, self.w, c0, len, lanes, 1.0, &mut blk.taps);
        let hw = self.w - 1;
        std::ptr::copy_nonoverlapping(carry, blk.xt.as_mut_ptr(), hw * lanes);
        blk
    }

    #[inline(always)]
    unsafe fn u_tile<S: Simd>(
        &self,
        blk: &mut ConvBlk,
        c: &BlockCtx<Self>,
        t: usize,
        tt: usize,
        ut: &mut [f32],
    ) {
        let (lanes, w, job) = (S::LANES, self.w, c.job);
        let hw = w - 1;
        // u = act(bias + Σ_i w[i]·x[t - hw + i]): the conv of cpu::conv1d,
        // vectorised over the channels instead of time.
        let xt = &mut blk.xt;
        load_tile::<S>(
            &job.u,
            c.bi,
            c.c0,
            c.len,
            t,
            tt,
            lanes,
            &mut xt[hw * lanes..],
        );
        let cb = S::load(blk.cbias.as_ptr());
        for s in 0..tt {
            let mut acc = cb;
            for i in 0..w {
                acc = S::fma(
                    S::load(blk.taps.as_ptr().add(i * lanes)),
                    S::load(xt.as_ptr().add((s + i) * lanes)),
                    acc,
                );
            }
            if self.silu {
                acc = S::silu(acc);
            }
            S::store(ut.as_mut_ptr().add(s * lanes), acc);
        }
        round_to(job.u.dtype, &mut ut[..tt * lanes]);
        // the last hw inputs are the next tile's history
        xt.copy_within(tt * lanes..(tt + hw) * lanes, 0);
    }

    #[inline(always)]
    unsafe fn end<S: Simd>(&self, blk: &ConvBlk, carry: *mut f32) {
        std::ptr::copy_nonoverlapping(blk.xt.as_ptr(), carry, (self.w - 1) * S::LANES);
    }

    fn run_block(ctx: &BlockCtx<Self>, level: SimdLevel) {
        #[inline(always)]
        unsafe fn block<S: Simd>(ctx: &BlockCtx<ConvScanJob>) {
            scan_block::<S, ConvScanJob>(ctx)
        }
        simd_dispatch!(level, block, ctx, &BlockCtx<ConvScanJob>);
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
