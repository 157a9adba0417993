//! CPU selective scan (forward) and one-step state update.
//!
//! Scan: lanes run over channels (n is small, channels are many). A job is cut
//! into blocks of up to `LANES` channels that never straddle a B or C group, so
//! a time-varying B/C value is one broadcast for the whole vector. Time is
//! walked in sub-chunks of `T` steps: the block's u/Δ/z rows are transposed into
//! [T][LANES] float32 tiles in L1, Δ gets its bias and softplus there, and the
//! recurrence runs from the tiles with the state in registers (n = 16) or in an
//! L1 array. Time-varying B/C are transposed once per outer time chunk into
//! [t][n] float32 (shared by every block of a group), bounding the memory used
//! for any l. rayon runs (batch, block) pairs in parallel.
//!
//! State update: one step for a (b, d, n) state, vectorised over the states of
//! a channel (the state is contiguous in n) with a horizontal sum for y.

use super::simd::{Simd, LOG2E};
use super::SimdLevel;
use crate::simd_dispatch;
use crate::tensor::{addr, load_row, store_row, DType, Raw};
use rayon::prelude::*;

/// Widest vector (AVX-512) in float32 lanes; per-block buffers are sized for it.
pub const MAX_LANES: usize = 16;
/// Time steps per tile.
pub(crate) const T: usize = 64;
/// Largest supported state size.
pub const MAX_N: usize = 256;

/// Where B (or C) comes from.
pub enum BcSrc {
    /// (d, n): one value per channel and state, as float32 [d][n].
    Const(Vec<f32>),
    /// (b, g, n, l) (the shared (b, n, l) layout is g = 1 with a zero group stride).
    Var { raw: Raw<4>, groups: usize },
}

impl BcSrc {
    pub(crate) fn groups(&self) -> usize {
        match self {
            BcSrc::Const(_) => 1,
            BcSrc::Var { groups, .. } => *groups,
        }
    }
    pub(crate) fn is_var(&self) -> bool {
        matches!(self, BcSrc::Var { .. })
    }
}

/// A validated selective-scan problem (built by `ops::scan`).
pub struct ScanJob {
    pub b: usize,
    pub d: usize,
    pub l: usize,
    pub n: usize,
    pub u: Raw<3>,
    pub delta: Raw<3>,
    pub z: Option<Raw<3>>,
    pub out: Raw<3>,
    /// A as float32 [d][n].
    pub a: Vec<f32>,
    pub bm: BcSrc,
    pub cm: BcSrc,
    pub dskip: Option<Vec<f32>>,
    pub dbias: Option<Vec<f32>>,
    pub softplus: bool,
    pub init: Option<Raw<3>>,
    pub last: Option<Raw<3>>,
}

/// Contiguous channel ranges [c0, c0 + len) of at most `lanes` channels that
/// each lie inside one B group and one C group.
pub(crate) fn channel_blocks(d: usize, gb: usize, gc: usize, lanes: usize) -> Vec<(usize, usize)> {
    let (sb, sc) = (d / gb, d / gc);
    let mut v = Vec::new();
    let mut c0 = 0;
    while c0 < d {
        let end = (c0 + lanes)
            .min((c0 / sb + 1) * sb)
            .min((c0 / sc + 1) * sc)
            .min(d);
        v.push((c0, end - c0));
        c0 = end;
    }
    v
}

/// Time steps per outer chunk: bounds the transposed B/C buffers to ~32 MB.
fn outer_chunk(job: &ScanJob) -> usize {
    let per_t = job.b * (job.bm.groups() + job.cm.groups()) * job.n * 4;
    let lc = (32usize << 20) / per_t.max(1);
    (lc.max(T) / T * T).min(job.l.div_ceil(T) * T)
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
            let (bi, gi) = (bg / g, bg % g);
            let mut row = vec![0.0f32; lc];
            for k in 0..n {
                unsafe {
                    load_row(
                        &mut row,
                        addr(raw, [bi, gi, k, t0]),
                        raw.dtype,
                        raw.strides[3],
                    )
                };
                for (t, v) in row.iter().enumerate() {
                    out[t * n + k] = *v;
                }
            }
        });
}

/// One (batch, block, outer chunk) of [`run_scan`].
pub(crate) struct BlockCtx<'a, U> {
    pub(crate) job: &'a ScanJob,
    src: &'a U,
    pub(crate) bi: usize,
    /// Channels [c0, c0 + len).
    pub(crate) c0: usize,
    pub(crate) len: usize,
    t0: usize,
    t1: usize,
    /// State of this block, float32 [n][MAX_LANES], carried across chunks.
    h: *mut f32,
    /// The u source's floats carried across chunks (`USource::carry_len`).
    carry: *mut f32,
    /// Transposed time-varying B/C of this block's group at t0: [t][n].
    bt: *const f32,
    ct: *const f32,
    first: bool,
    last_chunk: bool,
    /// Where to write the states at sub-chunk starts (see [`Checkpoints`]).
    ck: Option<Checkpoints>,
}

/// Chunk-start states for the backward pass: float32 (b, d, l.div_ceil(ts), n),
/// contiguous; entry j is the state before step j·ts (entry 0: initial_state or
/// zeros). `ts` must divide the tile length `T` (16, 32 or 64).
#[derive(Clone, Copy)]
pub struct Checkpoints {
    pub ptr: usize,
    pub ts: usize,
}

/// Runs the whole scan.
pub fn scan_forward(job: &ScanJob, level: SimdLevel) {
    scan_forward_ck(job, level, None)
}

/// Runs the whole scan and, when `ck` is given, also writes the states at the
/// start of every `ck.ts` steps (what the backward would otherwise recompute).
pub fn scan_forward_ck(job: &ScanJob, level: SimdLevel, ck: Option<Checkpoints>) {
    run_scan(job, level, ck, &LoadU);
}

/// Where a tile's u comes from. The scan loads it from `job.u` ([`LoadU`]);
/// the fused conv+scan (`cpu::conv_scan`) makes it from x = `job.u` by the
/// conv. Everything else (the work split, outer chunks, B/C transposes,
/// prefetches, Δ, the recurrence, checkpoints, D, z, states) is
/// [`run_scan`] / [`scan_block`], shared by both.
pub(crate) trait USource: Sync + Sized {
    /// What a block keeps while it walks one outer chunk.
    type Blk;
    /// Floats per (batch, block) carried from one outer chunk to the next
    /// (zeros before the first).
    fn carry_len(&self) -> usize;
    /// Sets up a block of channels [c0, c0+len) from its carried floats.
    unsafe fn begin<S: Simd>(&self, c0: usize, len: usize, carry: *const f32) -> Self::Blk;
    /// u of the block's rows [c0, c0+len) × [t, t+tt) into the
    /// [tt][S::LANES] tile `ut` (lanes ≥ len zero).
    unsafe fn u_tile<S: Simd>(
        &self,
        blk: &mut Self::Blk,
        ctx: &BlockCtx<Self>,
        t: usize,
        tt: usize,
        ut: &mut [f32],
    );
    /// Saves what the next outer chunk needs.
    unsafe fn end<S: Simd>(&self, blk: &Self::Blk, carry: *mut f32);
    /// `scan_block::<S, Self>` at `level` (`simd_dispatch!` wants a
    /// concrete argument type).
    fn run_block(ctx: &BlockCtx<Self>, level: SimdLevel);
}

/// u loaded from `job.u`: the plain scan.
pub(crate) struct LoadU;

impl USource for LoadU {
    type Blk = ();
    fn carry_len(&self) -> usize {
        0
    }
    #[inline(always)]
    unsafe fn begin<S: Simd>(&self, _c0: usize, _len: usize, _carry: *const f32) {}
    #[inline(always)]
    unsafe fn u_tile<S: Simd>(
        &self,
        _: &mut (),
        c: &BlockCtx<Self>,
        t: usize,
        tt: usize,
        ut: &mut [f32],
    ) {
        load_tile::<S>(&c.job.u, c.bi, c.c0, c.len, t, tt, S::LANES, ut);
    }
    #[inline(always)]
    unsafe fn end<S: Simd>(&self, _blk: &(), _carry: *mut f32) {}
    fn run_block(ctx: &BlockCtx<Self>, level: SimdLevel) {
        #[inline(always)]
        unsafe fn block<S: Simd>(ctx: &BlockCtx<LoadU>) {
            scan_block::<S, LoadU>(ctx)
        }
        simd_dispatch!(level, block, ctx, &BlockCtx<LoadU>);
    }
}

/// The scan's driver: rayon over (batch, block of up to LANES channels inside
/// one B/C group), outer time chunks bounding the transposed B/C, with u from
/// `src`.
pub(crate) fn run_scan<U: USource>(
    job: &ScanJob,
    level: SimdLevel,
    ck: Option<Checkpoints>,
    src: &U,
) {
    if let Some(c) = ck {
        assert!(
            c.ts > 0 && T.is_multiple_of(c.ts),
            "checkpoint interval must divide {T}"
        );
    }
    let lanes = match level {
        SimdLevel::Avx512 => 16,
        _ => 8,
    };
    let blocks = channel_blocks(job.d, job.bm.groups(), job.cm.groups(), lanes);
    let nb = blocks.len();
    // Per (batch, block): the state [n][MAX_LANES], then the source's carry.
    let stride_h = job.n * MAX_LANES;
    let stride = stride_h + src.carry_len();
    let mut states = vec![0.0f32; job.b * nb * stride];
    let lc = outer_chunk(job);
    let (mut bt, mut ct) = (Vec::new(), Vec::new());
    let mut t0 = 0;
    while t0 < job.l {
        let t1 = (t0 + lc).min(job.l);
        let len_t = t1 - t0;
        transpose_bc(&job.bm, job.b, job.n, t0, len_t, &mut bt);
        transpose_bc(&job.cm, job.b, job.n, t0, len_t, &mut ct);
        let (gb, gc) = (job.bm.groups(), job.cm.groups());
        let (sb, sc) = (job.d / gb, job.d / gc);
        let (bt_p, ct_p) = (bt.as_ptr() as usize, ct.as_ptr() as usize);
        states
            .par_chunks_mut(stride)
            .enumerate()
            .for_each(|(i, h)| {
                let (bi, blk) = (i / nb, i % nb);
                let (c0, len) = blocks[blk];
                let bt_off = ((bi * gb + c0 / sb) * len_t) * job.n;
                let ct_off = ((bi * gc + c0 / sc) * len_t) * job.n;
                let ctx = BlockCtx {
                    job,
                    src,
                    bi,
                    c0,
                    len,
                    t0,
                    t1,
                    h: h.as_mut_ptr(),
                    carry: h.as_mut_ptr().wrapping_add(stride_h),
                    bt: (bt_p as *const f32).wrapping_add(bt_off),
                    ct: (ct_p as *const f32).wrapping_add(ct_off),
                    first: t0 == 0,
                    last_chunk: t1 == job.l,
                    ck,
                };
                U::run_block(&ctx, level);
            });
        t0 = t1;
    }
}

/// Loads rows [c0, c0+len) × [t, t+tt) of a (b, d, l) tensor into a [T][LANES]
/// tile (lanes ≥ len are zero).
/// Whether a tile of `raw` can move by 8×8 register transposes: float32,
/// contiguous in time, whole groups of 8 lanes and 8 steps.
#[inline(always)]
fn fast_tile<S: Simd>(raw: &Raw<3>, len: usize, lanes: usize, tt: usize) -> bool {
    S::AVX && raw.dtype == DType::F32 && raw.strides[2] == 1 && len == lanes && tt % 8 == 0
}

#[inline(always)]
pub(crate) unsafe fn load_tile<S: Simd>(
    raw: &Raw<3>,
    bi: usize,
    c0: usize,
    len: usize,
    t: usize,
    tt: usize,
    lanes: usize,
    tile: &mut [f32],
) {
    if fast_tile::<S>(raw, len, lanes, tt) {
        let base = addr(raw, [bi, c0, t]) as *const f32;
        for j0 in (0..lanes).step_by(8) {
            for s0 in (0..tt).step_by(8) {
                let src = base.offset(j0 as isize * raw.strides[1] + s0 as isize);
                S::transpose8(
                    src,
                    raw.strides[1],
                    tile.as_mut_ptr().add(s0 * lanes + j0),
                    lanes as isize,
                );
            }
        }
        return;
    }
    let mut row = [0.0f32; T];
    for j in 0..lanes {
        if j < len {
            load_row(
                &mut row[..tt],
                addr(raw, [bi, c0 + j, t]),
                raw.dtype,
                raw.strides[2],
            );
            for s in 0..tt {
                tile[s * lanes + j] = row[s];
            }
        } else {
            for s in 0..tt {
                tile[s * lanes + j] = 0.0;
            }
        }
    }
}

#[inline(always)]
unsafe fn store_tile<S: Simd>(
    raw: &Raw<3>,
    bi: usize,
    c0: usize,
    len: usize,
    t: usize,
    tt: usize,
    lanes: usize,
    tile: &[f32],
) {
    if fast_tile::<S>(raw, len, lanes, tt) {
        let base = addr(raw, [bi, c0, t]) as *mut f32;
        for j0 in (0..lanes).step_by(8) {
            for s0 in (0..tt).step_by(8) {
                let dst = base.offset(j0 as isize * raw.strides[1] + s0 as isize);
                S::transpose8(
                    tile.as_ptr().add(s0 * lanes + j0),
                    lanes as isize,
                    dst,
                    raw.strides[1],
                );
            }
        }
        return;
    }
    let mut row = [0.0f32; T];
    for j in 0..len {
        for s in 0..tt {
            row[s] = tile[s * lanes + j];
        }
        store_row(
            &row[..tt],
            addr(raw, [bi, c0 + j, t]),
            raw.dtype,
            raw.strides[2],
        );
    }
}

/// Per-lane parameter vector [LANES] from a per-channel f32 slice.
#[inline(always)]
pub(crate) fn lane_vec(
    src: Option<&Vec<f32>>,
    c0: usize,
    len: usize,
    fill: f32,
) -> [f32; MAX_LANES] {
    let mut v = [fill; MAX_LANES];
    if let Some(s) = src {
        v[..len].copy_from_slice(&s[c0..c0 + len]);
    }
    v
}

/// [n][LANES] table from a per-channel [d][n] matrix, scaled by `scale`.
#[inline(always)]
pub(crate) fn lane_table(
    m: &[f32],
    n: usize,
    c0: usize,
    len: usize,
    lanes: usize,
    scale: f32,
    dst: &mut [f32],
) {
    for k in 0..n {
        for j in 0..lanes {
            dst[k * lanes + j] = if j < len {
                m[(c0 + j) * n + k] * scale
            } else {
                0.0
            };
        }
    }
}

/// One block's walk through one outer chunk: tiles of `T` steps.
#[inline(always)]
pub(crate) unsafe fn scan_block<S: Simd, U: USource>(ctx: &BlockCtx<U>) {
    let job = ctx.job;
    let (n, lanes, len) = (job.n, S::LANES, ctx.len);
    // exp(Δ·A) = exp2(Δ·A·log2 e): fold log2 e into A once per block.
    let mut a2 = [0.0f32; MAX_N * MAX_LANES];
    lane_table(&job.a, n, ctx.c0, len, lanes, LOG2E, &mut a2);
    let mut bconst = [0.0f32; MAX_N * MAX_LANES];
    let mut cconst = [0.0f32; MAX_N * MAX_LANES];
    if let BcSrc::Const(m) = &job.bm {
        lane_table(m, n, ctx.c0, len, lanes, 1.0, &mut bconst);
    }
    if let BcSrc::Const(m) = &job.cm {
        lane_table(m, n, ctx.c0, len, lanes, 1.0, &mut cconst);
    }
    let dv = lane_vec(job.dskip.as_ref(), ctx.c0, len, 0.0);
    let biasv = lane_vec(job.dbias.as_ref(), ctx.c0, len, 0.0);

    // State: from initial_state (or zeros) on the first chunk, else carried.
    let h = ctx.h;
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
    }

    let mut ub = ctx.src.begin::<S>(ctx.c0, len, ctx.carry);
    // The training forward streams out (non-temporal stores, no output
    // prefetch): its caller's backward does not read it.
    let out_nt = ctx.ck.is_some() && streams_tiles::<S>(&job.out, len);
    let mut ut = [0.0f32; T * MAX_LANES];
    let mut dt = [0.0f32; T * MAX_LANES];
    let mut zt = [0.0f32; T * MAX_LANES];
    let mut yt = [0.0f32; T * MAX_LANES];
    let bvar = job.bm.is_var();
    let cvar = job.cm.is_var();
    let mut t = ctx.t0;
    while t < ctx.t1 {
        let tt = T.min(ctx.t1 - t);
        // Prefetch the next tile's rows and the lines its outputs will be
        // stored to (out, and the checkpoints of the training forward).
        let tn = t + tt;
        if tn < ctx.t1 {
            let nt = T.min(ctx.t1 - tn);
            prefetch_tile_rows(job, ctx.bi, ctx.c0, len, tn, nt, !out_nt);
            // (Not the checkpoints' lines when they are streamed.)
            let streamed = ck_streaming::<S>(n, len, std::ptr::null(), 0);
            if let Some(ck) = ctx.ck.filter(|_| !streamed) {
                let nch = job.l.div_ceil(ck.ts);
                let (j0, j1) = (tn / ck.ts, (tn + nt).div_ceil(ck.ts));
                let row = Raw {
                    ptr: ck.ptr,
                    dtype: DType::F32,
                    strides: [(job.d * nch * n) as isize, (nch * n) as isize, 1],
                };
                prefetch_rows(&row, ctx.bi, ctx.c0, len, j0 * n, (j1 - j0) * n);
            }
        }
        ctx.src.u_tile::<S>(&mut ub, ctx, t, tt, &mut ut);
        load_tile::<S>(&job.delta, ctx.bi, ctx.c0, len, t, tt, lanes, &mut dt);
        // Δ = softplus(delta + bias): once per (t, channel), vectorised.
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
        let tiles = Tiles {
            u: ut.as_ptr(),
            dt: dt.as_ptr(),
            y: yt.as_mut_ptr(),
            a2: a2.as_ptr(),
            bp,
            cp,
            h,
            tt,
        };
        // (A function, not a closure: closures do not inherit the caller's
        // target features, and the kernels would not inline into one.)
        #[inline(always)]
        unsafe fn recur<S: Simd>(tiles: &Tiles, n: usize, bvar: bool, cvar: bool) {
            match (n, bvar, cvar) {
                (16, true, true) => recur16::<S, true, true>(tiles),
                (16, false, false) => recur16::<S, false, false>(tiles),
                (_, true, true) => recur_dyn::<S, true, true>(tiles, n),
                (_, true, false) => recur_dyn::<S, true, false>(tiles, n),
                (_, false, true) => recur_dyn::<S, false, true>(tiles, n),
                (_, false, false) => recur_dyn::<S, false, false>(tiles, n),
            }
        }
        match ctx.ck {
            None => recur::<S>(&tiles, n, bvar, cvar),
            Some(ck) => {
                // Sub-tiles of ck.ts steps (t is a multiple of T, so of ts),
                // each preceded by its start state.
                let nch = job.l.div_ceil(ck.ts);
                let mut s = 0;
                while s < tt {
                    let st = ck.ts.min(tt - s);
                    let dst = (ck.ptr as *mut f32)
                        .add(((ctx.bi * job.d + ctx.c0) * nch + (t + s) / ck.ts) * n);
                    store_checkpoint::<S>(h, n, len, dst, nch * n);
                    let sub = Tiles {
                        u: tiles.u.add(s * lanes),
                        dt: tiles.dt.add(s * lanes),
                        y: tiles.y.add(s * lanes),
                        bp: if bvar { bp.add(s * n) } else { bp },
                        cp: if cvar { cp.add(s * n) } else { cp },
                        tt: st,
                        ..tiles
                    };
                    recur::<S>(&sub, n, bvar, cvar);
                    s += st;
                }
            }
        }
        // y += D·u; y *= silu(z).
        let dvec = S::load(dv.as_ptr());
        if job.z.is_some() {
            load_tile::<S>(
                job.z.as_ref().unwrap(),
                ctx.bi,
                ctx.c0,
                len,
                t,
                tt,
                lanes,
                &mut zt,
            );
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
        #[cfg(target_arch = "x86_64")]
        if out_nt && tt.is_multiple_of(16) {
            let base = addr(&job.out, [ctx.bi, ctx.c0, t]) as *mut f32;
            for s0 in (0..tt).step_by(16) {
                stream_tile16::<S>(yt.as_ptr().add(s0 * 16), base.add(s0), job.out.strides[1]);
            }
            t += tt;
            continue;
        }
        store_tile::<S>(&job.out, ctx.bi, ctx.c0, len, t, tt, lanes, &yt);
        t += tt;
    }
    ctx.src.end::<S>(&ub, ctx.carry);

    #[cfg(target_arch = "x86_64")]
    if ctx.ck.is_some() && S::LANES == 16 {
        // Order the non-temporal checkpoint (and out) stores before the task ends.
        std::arch::x86_64::_mm_sfence();
    }
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

/// Prefetches the rows of u, delta, z and (`out`) out that the tile
/// [t, t+tt) of channels [c0, c0+len) will read and write.
#[inline(always)]
fn prefetch_tile_rows(
    job: &ScanJob,
    bi: usize,
    c0: usize,
    len: usize,
    t: usize,
    tt: usize,
    out: bool,
) {
    for r in [
        Some(&job.u),
        Some(&job.delta),
        job.z.as_ref(),
        Some(&job.out).filter(|_| out),
    ]
    .into_iter()
    .flatten()
    {
        prefetch_rows(r, bi, c0, len, t, tt);
    }
}

/// Prefetches (into L2) every 64-byte line of rows [c0, c0+len) × [t, t+tt)
/// of a (b, d, l) tensor with unit time stride.
#[inline(always)]
pub(crate) fn prefetch_rows(r: &Raw<3>, bi: usize, c0: usize, len: usize, t: usize, tt: usize) {
    #[cfg(target_arch = "x86_64")]
    if r.strides[2] == 1 && tt > 0 {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
        let p = addr(r, [bi, c0, t]);
        let bytes = tt * r.dtype.size();
        let row = r.strides[1] * r.dtype.size() as isize;
        for j in 0..len as isize {
            let q = (p as isize + j * row) as usize;
            // Every line the range touches: from q's line to its last byte's.
            let mut a = q & !63;
            while a < q + bytes {
                // SAFETY: prefetches never fault.
                unsafe { _mm_prefetch::<_MM_HINT_T1>(a as *const i8) };
                a += 64;
            }
        }
    }
}

/// Whether tiles of `r` can go out with non-temporal 16×16 stores
/// (`stream_tile16`): AVX-512, `k` == 16 (the caller's whole-tile count:
/// channels of a block, or steps of a tile), float32 rows of whole, 64-byte
/// aligned lines (a 64-byte aligned tensor whose rows are a multiple of 16
/// floats).
#[inline(always)]
pub(crate) fn streams_tiles<S: Simd>(r: &Raw<3>, k: usize) -> bool {
    cfg!(target_arch = "x86_64")
        && S::LANES == 16
        && k == 16
        && r.dtype == DType::F32
        && r.strides[2] == 1
        && r.ptr.is_multiple_of(64)
        && r.strides[1].rem_euclid(16) == 0
        && r.strides[0].rem_euclid(16) == 0
}

/// Whether `store_checkpoint` can write whole lines with non-temporal stores:
/// AVX-512 (16 lanes), n = 16, a full block, 64-byte aligned rows.
#[inline(always)]
fn ck_streaming<S: Simd>(n: usize, len: usize, dst: *const f32, row: usize) -> bool {
    cfg!(target_arch = "x86_64")
        && S::LANES == 16
        && n == 16
        && len == 16
        && (dst as usize).is_multiple_of(64)
        && (row * 4).is_multiple_of(64)
}

/// Transposes the 16 × 16 float32 tile `src` (16 rows of 16) and writes its
/// column j to `dst + j·row` (floats) with non-temporal stores. Every
/// destination row must be one whole, 64-byte aligned line (AVX-512 only).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn stream_tile16<S: Simd>(src: *const f32, dst: *mut f32, row: isize) {
    use std::arch::x86_64::{_mm512_loadu_ps, _mm512_stream_ps};
    let mut tmp = [0.0f32; 256];
    for k0 in (0..16).step_by(8) {
        for j0 in (0..16).step_by(8) {
            S::transpose8(
                src.add(k0 * 16 + j0),
                16,
                tmp.as_mut_ptr().add(j0 * 16 + k0),
                16,
            );
        }
    }
    for j in 0..16 {
        _mm512_stream_ps(
            dst.offset(j as isize * row),
            _mm512_loadu_ps(tmp.as_ptr().add(j * 16)),
        );
    }
}

/// Writes the block state h ([n][LANES]) to rows `dst + j·row` (channel j <
/// len, float32 [n] each) of the checkpoint tensor.
#[inline(always)]
unsafe fn store_checkpoint<S: Simd>(
    h: *const f32,
    n: usize,
    len: usize,
    dst: *mut f32,
    row: usize,
) {
    let lanes = S::LANES;
    #[cfg(target_arch = "x86_64")]
    if ck_streaming::<S>(n, len, dst, row) {
        // Whole 64-byte lines: transpose on the stack, then non-temporal
        // stores (the backward reads them much later; no read for ownership).
        stream_tile16::<S>(h, dst, row as isize);
        return;
    }
    if S::AVX && len == lanes && n.is_multiple_of(8) {
        for k0 in (0..n).step_by(8) {
            for j0 in (0..lanes).step_by(8) {
                S::transpose8(
                    h.add(k0 * lanes + j0),
                    lanes as isize,
                    dst.add(j0 * row + k0),
                    row as isize,
                );
            }
        }
        return;
    }
    for j in 0..len {
        for k in 0..n {
            *dst.add(j * row + k) = *h.add(k * lanes + j);
        }
    }
}

/// Pointers into one tile's buffers.
#[derive(Clone, Copy)]
struct Tiles {
    u: *const f32,
    dt: *const f32,
    y: *mut f32,
    a2: *const f32,
    /// Time-varying: [t][n] float32 (broadcast); constant: [n][LANES].
    bp: *const f32,
    cp: *const f32,
    h: *mut f32,
    tt: usize,
}

#[inline(always)]
pub(crate) unsafe fn bc<S: Simd, const VAR: bool>(
    p: *const f32,
    s: usize,
    k: usize,
    n: usize,
) -> S::V {
    if VAR {
        S::splat(*p.add(s * n + k))
    } else {
        S::load(p.add(k * S::LANES))
    }
}

/// Repeats `$m!(k)` for k = 0..16 (a full unroll LLVM will not always do by itself).
macro_rules! unroll16 {
    ($m:ident) => {
        $m!(0);
        $m!(1);
        $m!(2);
        $m!(3);
        $m!(4);
        $m!(5);
        $m!(6);
        $m!(7);
        $m!(8);
        $m!(9);
        $m!(10);
        $m!(11);
        $m!(12);
        $m!(13);
        $m!(14);
        $m!(15);
    };
}

/// The recurrence over one tile for n = 16, fully unrolled so that the 16
/// state vectors live in registers (A is read from L1 as memory operands).
#[inline(always)]
unsafe fn recur16<S: Simd, const BV: bool, const CV: bool>(tl: &Tiles) {
    let l = S::LANES;
    let mut h = [S::zero(); 16];
    for k in 0..16 {
        h[k] = S::load(tl.h.add(k * l));
    }
    for s in 0..tl.tt {
        let dt = S::load(tl.dt.add(s * l));
        let du = S::mul(dt, S::load(tl.u.add(s * l)));
        let (mut y0, mut y1) = (S::zero(), S::zero());
        macro_rules! step {
            ($k:expr) => {
                let da = S::exp2_fast(S::mul(dt, S::load(tl.a2.add($k * l))));
                h[$k] = S::fma(da, h[$k], S::mul(du, bc::<S, BV>(tl.bp, s, $k, 16)));
                if $k % 2 == 0 {
                    y0 = S::fma(bc::<S, CV>(tl.cp, s, $k, 16), h[$k], y0);
                } else {
                    y1 = S::fma(bc::<S, CV>(tl.cp, s, $k, 16), h[$k], y1);
                }
            };
        }
        unroll16!(step);
        S::store(tl.y.add(s * l), S::add(y0, y1));
    }
    for k in 0..16 {
        S::store(tl.h.add(k * l), h[k]);
    }
}

/// The recurrence for any n: the state stays in the block's L1 array.
#[inline(always)]
unsafe fn recur_dyn<S: Simd, const BV: bool, const CV: bool>(tl: &Tiles, n: usize) {
    let l = S::LANES;
    for s in 0..tl.tt {
        let dt = S::load(tl.dt.add(s * l));
        let du = S::mul(dt, S::load(tl.u.add(s * l)));
        let mut y = S::zero();
        for k in 0..n {
            let hp = tl.h.add(k * l);
            let da = S::exp2_fast(S::mul(dt, S::load(tl.a2.add(k * l))));
            let hk = S::fma(da, S::load(hp), S::mul(du, bc::<S, BV>(tl.bp, s, k, n)));
            S::store(hp, hk);
            y = S::fma(bc::<S, CV>(tl.cp, s, k, n), hk, y);
        }
        S::store(tl.y.add(s * l), y);
    }
}

// ------------------------------------------------------------ state update

/// A validated one-step state update (built by `ops::scan`).
pub struct UpdateJob {
    pub b: usize,
    pub d: usize,
    pub n: usize,
    /// (cache rows, d, n)
    pub state: Raw<3>,
    /// (b, d)
    pub x: Raw<2>,
    pub dt: Raw<2>,
    pub z: Option<Raw<2>>,
    pub out: Raw<2>,
    /// (d, n), read in place (a decoding step must not copy parameters).
    pub a: Raw<2>,
    /// (b, g, n), g = 1 with zero stride for (b, n).
    pub bm: Raw<3>,
    pub cm: Raw<3>,
    pub groups_b: usize,
    pub groups_c: usize,
    /// (d,) each.
    pub dskip: Option<Raw<1>>,
    pub dbias: Option<Raw<1>>,
    pub softplus: bool,
    /// State row of each batch entry; negative skips the entry.
    pub rows: Option<Vec<i64>>,
}

/// Channels per parallel task of the state update.
const UPDATE_CHUNK: usize = 256;
/// State elements (b·d·n) from which the update runs on several threads.
/// Waking rayon's workers costs more than a small step: at d 1536, n 16 the
/// step took 29 µs on one thread and 43 µs split over 2 cores (measured).
const PARALLEL_MIN: usize = 1 << 17;

pub fn state_update(job: &UpdateJob, level: SimdLevel) {
    let tasks: Vec<(usize, usize)> = (0..job.b)
        .flat_map(|bi| (0..job.d).step_by(UPDATE_CHUNK).map(move |c0| (bi, c0)))
        .collect();
    let run = |&(bi, c0): &(usize, usize)| {
        let task = UpdateTask {
            job,
            bi,
            c0,
            c1: (c0 + UPDATE_CHUNK).min(job.d),
        };
        simd_dispatch!(level, update_task, &task, &UpdateTask);
    };
    // A decoding step is microseconds of work: only go parallel when it pays.
    if job.b * job.d * job.n >= PARALLEL_MIN {
        tasks.par_iter().for_each(run);
    } else {
        tasks.iter().for_each(run);
    }
}

struct UpdateTask<'a> {
    job: &'a UpdateJob,
    bi: usize,
    c0: usize,
    c1: usize,
}

#[inline(always)]
unsafe fn update_task<S: super::scan_bwd::BwdSimd>(task: &UpdateTask) {
    let job = task.job;
    let (bi, c0, c1, n) = (task.bi, task.c0, task.c1, job.n);
    let m = c1 - c0;
    let l = S::LANES;
    // Per-channel rows of the chunk as float32, zero past m up to the next
    // whole vector (UPDATE_CHUNK is a multiple of every LANES), so the
    // vectorised passes below never need a partial vector.
    let mut x = [0.0f32; UPDATE_CHUNK];
    let mut dt = [0.0f32; UPDATE_CHUNK];
    let mut y = [0.0f32; UPDATE_CHUNK];
    let row = job.rows.as_ref().map_or(bi as i64, |r| r[bi]);
    if row < 0 {
        store_row(
            &y[..m],
            addr(&job.out, [bi, c0]),
            job.out.dtype,
            job.out.strides[1],
        );
        return;
    }
    let row = row as usize;
    load_row(
        &mut x[..m],
        addr(&job.x, [bi, c0]),
        job.x.dtype,
        job.x.strides[1],
    );
    load_row(
        &mut dt[..m],
        addr(&job.dt, [bi, c0]),
        job.dt.dtype,
        job.dt.strides[1],
    );
    let mut bias = [0.0f32; UPDATE_CHUNK];
    if let Some(r) = &job.dbias {
        load_row(&mut bias[..m], addr(r, [c0]), r.dtype, r.strides[0]);
    }
    let mut dsk = [0.0f32; UPDATE_CHUNK];
    if let Some(r) = &job.dskip {
        load_row(&mut dsk[..m], addr(r, [c0]), r.dtype, r.strides[0]);
    }
    // Δ (softplus'ed), then the two per-channel scalars of the recurrence:
    // Δ·log2(e) (the exponent's scale, exp(Δ·A) = 2^(A·Δ·log2 e)) into `dt`,
    // Δ·x into `du`; vectorised over channels.
    let mut du = [0.0f32; UPDATE_CHUNK];
    let mv = m.div_ceil(l) * l;
    let log2e = S::splat(LOG2E);
    let mut c = 0;
    while c < mv {
        let mut d = S::add(S::load(dt.as_ptr().add(c)), S::load(bias.as_ptr().add(c)));
        if job.softplus {
            d = S::softplus(d);
        }
        S::store(
            du.as_mut_ptr().add(c),
            S::mul(d, S::load(x.as_ptr().add(c))),
        );
        S::store(dt.as_mut_ptr().add(c), S::mul(d, log2e));
        c += l;
    }
    // Float32 state and A contiguous in n, n a whole number of vectors: read and
    // write them in place. Otherwise go through padded float32 copies (padding:
    // a = b = c = 0, and the new h is cleared there, so it adds nothing to y
    // and nothing carries from one channel to the next, whatever Δ·x is).
    let direct = job.state.dtype == DType::F32
        && job.state.strides[2] == 1
        && job.a.dtype == DType::F32
        && job.a.strides[1] == 1
        && n % l == 0;
    let nv = n.div_ceil(l);
    let g = UpdateGeom {
        job,
        bi,
        c0,
        hp: addr(&job.state, [row, c0, 0]),
        hs: job.state.strides[1] * job.state.dtype.size() as isize,
        ap: addr(&job.a, [c0, 0]),
        as_: job.a.strides[0] * job.a.dtype.size() as isize,
        sb: job.d / job.groups_b,
        sc: job.d / job.groups_c,
    };
    let (dtl, dup) = (dt.as_ptr(), du.as_ptr());
    // The channel loop, specialised for the common vector counts (n = 16: one
    // AVX-512 vector, two AVX2 vectors) so the inner loop unrolls away.
    match (direct, nv) {
        (true, 1) => update_channels::<S, true>(&g, m, 1, dtl, dup, &mut y),
        (true, 2) => update_channels::<S, true>(&g, m, 2, dtl, dup, &mut y),
        (true, _) => update_channels::<S, true>(&g, m, nv, dtl, dup, &mut y),
        (false, _) => update_channels::<S, false>(&g, m, nv, dtl, dup, &mut y),
    }
    // y = (Σ_k C·h + D·x) · silu(z), vectorised over channels.
    let mut zr = [0.0f32; UPDATE_CHUNK];
    if let Some(z) = &job.z {
        load_row(&mut zr[..m], addr(z, [bi, c0]), z.dtype, z.strides[1]);
    }
    let mut c = 0;
    while c < mv {
        let mut v = S::fma(
            S::load(dsk.as_ptr().add(c)),
            S::load(x.as_ptr().add(c)),
            S::load(y.as_ptr().add(c)),
        );
        if job.z.is_some() {
            v = S::mul(v, S::silu(S::load(zr.as_ptr().add(c))));
        }
        S::store(y.as_mut_ptr().add(c), v);
        c += l;
    }
    store_row(
        &y[..m],
        addr(&job.out, [bi, c0]),
        job.out.dtype,
        job.out.strides[1],
    );
}

/// Where a chunk's channels live: the state row's and A's first channel
/// (byte addresses) and their channel strides in bytes; channels per group.
struct UpdateGeom<'a> {
    job: &'a UpdateJob,
    bi: usize,
    c0: usize,
    hp: usize,
    hs: isize,
    ap: usize,
    as_: isize,
    sb: usize,
    sc: usize,
}

/// Per-chunk buffers of `update_channel` (no closure: a closure would not
/// inherit the caller's target features, and its intrinsics would not inline).
struct ChanBufs {
    bv: [f32; MAX_N],
    cv: [f32; MAX_N],
    hbuf: [f32; MAX_N],
    abuf: [f32; MAX_N],
    b_end: usize,
    c_end: usize,
}

/// Loads B and C of the groups of channel `ch` unless they are loaded already.
#[inline(always)]
unsafe fn load_groups(g: &UpdateGeom, st: &mut ChanBufs, ch: usize) {
    let job = g.job;
    if ch >= st.b_end {
        st.b_end = load_group(&mut st.bv[..job.n], &job.bm, g.bi, ch, g.sb);
    }
    if ch >= st.c_end {
        st.c_end = load_group(&mut st.cv[..job.n], &job.cm, g.bi, ch, g.sc);
    }
}

/// Loads the (batch `bi`) row of `m`'s group of channel `ch` (`per` channels
/// a group) into `dst`; returns the first channel of the next group.
#[inline(always)]
unsafe fn load_group(dst: &mut [f32], m: &Raw<3>, bi: usize, ch: usize, per: usize) -> usize {
    let grp = ch / per;
    load_row(dst, addr(m, [bi, grp, 0]), m.dtype, m.strides[2]);
    (grp + 1) * per
}

/// U channels (j .. j + U of the chunk) of the direct path in lockstep, `nv`
/// vectors each: U independent exp → FMA chains side by side in program order,
/// which the out-of-order core overlaps (one channel alone is a ~50-cycle chain:
/// the L2 loads, the polynomial's 5 dependent FMAs, the scaling). The channels
/// must share their B and C groups (loaded). Returns each channel's C·h.
#[inline(always)]
unsafe fn update_lockstep<S: super::scan_bwd::BwdSimd, const U: usize>(
    g: &UpdateGeom,
    st: &ChanBufs,
    nv: usize,
    dtl: *const f32,
    du: *const f32,
    j: usize,
) -> [S::V; U] {
    let l = S::LANES;
    let mut hp = [std::ptr::null_mut::<f32>(); U];
    let mut ap = [std::ptr::null::<f32>(); U];
    let mut dtv = [S::zero(); U];
    let mut duv = [S::zero(); U];
    for u in 0..U {
        hp[u] = (g.hp as isize + (j + u) as isize * g.hs) as *mut f32;
        ap[u] = (g.ap as isize + (j + u) as isize * g.as_) as *const f32;
        dtv[u] = S::splat(*dtl.add(j + u));
        duv[u] = S::splat(*du.add(j + u));
    }
    let (bp, cp) = (st.bv.as_ptr(), st.cv.as_ptr());
    let mut acc = [S::zero(); U];
    for v in 0..nv {
        let k = v * l;
        let (bk, ck) = (S::load(bp.add(k)), S::load(cp.add(k)));
        let mut da = [S::zero(); U];
        for u in 0..U {
            da[u] = S::exp2_fast(S::mul(S::load(ap[u].add(k)), dtv[u]));
        }
        for u in 0..U {
            let hk = S::fma(da[u], S::load(hp[u].add(k)), S::mul(duv[u], bk));
            S::store(hp[u].add(k), hk);
            acc[u] = S::fma(ck, hk, acc[u]);
        }
    }
    acc
}

/// One channel (j of the chunk) of `update_channels`; returns C·h as a vector
/// (its lanes summed by the caller).
#[inline(always)]
unsafe fn update_channel<S: super::scan_bwd::BwdSimd, const DIRECT: bool>(
    g: &UpdateGeom,
    st: &mut ChanBufs,
    nv: usize,
    dtl: *const f32,
    du: *const f32,
    j: usize,
) -> S::V {
    let job = g.job;
    let (n, l) = (job.n, S::LANES);
    load_groups(g, st, g.c0 + j);
    let sp = (g.hp as isize + j as isize * g.hs) as usize;
    let ap = (g.ap as isize + j as isize * g.as_) as usize;
    let (hp, apf): (*mut f32, *const f32) = if DIRECT {
        (sp as *mut f32, ap as *const f32)
    } else {
        load_row(&mut st.hbuf[..n], sp, job.state.dtype, job.state.strides[2]);
        load_row(&mut st.abuf[..n], ap, job.a.dtype, job.a.strides[1]);
        (st.hbuf.as_mut_ptr(), st.abuf.as_ptr())
    };
    let dtv = S::splat(*dtl.add(j));
    let duv = S::splat(*du.add(j));
    let (bp, cp) = (st.bv.as_ptr(), st.cv.as_ptr());
    let mut acc = S::zero();
    for v in 0..nv {
        let k = v * l;
        let da = S::exp2_fast(S::mul(S::load(apf.add(k)), dtv));
        let mut hk = S::fma(da, S::load(hp.add(k)), S::mul(duv, S::load(bp.add(k))));
        if !DIRECT && v + 1 == nv {
            // The padding states k ≥ n of the float32 copy: Δ·x·0 is NaN
            // when Δ·x is NaN or inf, and `hbuf` carries them to the next
            // channel. Cleared, they add nothing to y and stay 0.
            hk = S::keep_first(hk, n - k);
        }
        S::store(hp.add(k), hk);
        acc = S::fma(S::load(cp.add(k)), hk, acc);
    }
    if !DIRECT {
        store_row(&st.hbuf[..n], sp, job.state.dtype, job.state.strides[2]);
    }
    acc
}

/// The recurrence of channels c0 .. c0 + m: h = exp(Δ·A)·h + Δ·x·B per state,
/// y[j] = Σ_k C[k]·h[k] into `y`. `nv` vectors per channel (n ≤ nv·LANES; the
/// padding of the float32 copies is zero). `DIRECT`: h and A read and written in
/// place (float32, contiguous in n, n = nv·LANES).
#[inline(always)]
unsafe fn update_channels<S: super::scan_bwd::BwdSimd, const DIRECT: bool>(
    g: &UpdateGeom,
    m: usize,
    nv: usize,
    dtl: *const f32,
    du: *const f32,
    y: &mut [f32; UPDATE_CHUNK],
) {
    // B and C of the current group, reloaded when a channel crosses into the
    // next one (no division per channel).
    let mut st = ChanBufs {
        bv: [0.0; MAX_N],
        cv: [0.0; MAX_N],
        hbuf: [0.0; MAX_N],
        abuf: [0.0; MAX_N],
        b_end: 0,
        c_end: 0,
    };
    // 8 channels at a time: their lane sums in one shuffle tree.
    let mut j0 = 0;
    while j0 + 8 <= m {
        let mut accs = [S::zero(); 8];
        let ch = g.c0 + j0;
        load_groups(g, &mut st, ch);
        if DIRECT && ch + 8 <= st.b_end && ch + 8 <= st.c_end {
            // Two groups of 4 (8 in lockstep measured the same on AVX-512 and
            // ~3 % slower on AVX2, whose 16 registers it overflows).
            let a = update_lockstep::<S, 4>(g, &st, nv, dtl, du, j0);
            let b = update_lockstep::<S, 4>(g, &st, nv, dtl, du, j0 + 4);
            accs = [a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3]];
        } else {
            for (i, a) in accs.iter_mut().enumerate() {
                *a = update_channel::<S, DIRECT>(g, &mut st, nv, dtl, du, j0 + i);
            }
        }
        S::add_lane_sums8(&accs, y.as_mut_ptr().add(j0));
        j0 += 8;
    }
    if j0 < m {
        // UPDATE_CHUNK is a multiple of 8: the zero sums past m land in y's padding.
        let mut accs = [S::zero(); 8];
        for (i, a) in accs.iter_mut().enumerate().take(m - j0) {
            *a = update_channel::<S, DIRECT>(g, &mut st, nv, dtl, du, j0 + i);
        }
        S::add_lane_sums8(&accs, y.as_mut_ptr().add(j0));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_respect_groups() {
        // d = 36, groups of 12: blocks of at most 16 lanes that never cross 12, 24.
        let b = channel_blocks(36, 3, 1, 16);
        assert_eq!(b, vec![(0, 12), (12, 12), (24, 12)]);
        let b = channel_blocks(40, 1, 2, 16);
        assert_eq!(b, vec![(0, 16), (16, 4), (20, 16), (36, 4)]);
        let b = channel_blocks(5, 1, 1, 8);
        assert_eq!(b, vec![(0, 5)]);
    }
}
