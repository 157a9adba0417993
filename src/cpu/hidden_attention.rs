//! CPU hidden attention of Mamba (SPEC §4, Ali, Zimerman & Wolf 2024):
//!
//! α[c, i, j] = Σₖ Cᵢ[k] · exp(Σ_{t=j+1..i} Δₜ·A[c,k]) · Δⱼ·Bⱼ[k]   (j ≤ i, else 0)
//!
//! Per (batch entry, channel) the work is O(l²·n). Vector lanes run over
//! columns j: a block of `LANES` columns j0..j0+L carries the state
//! s[k][lane] = exp(Σ_{t=j+1..i} Δₜ·A[k])·Δⱼ·Bⱼ[k] (in registers, up to 16
//! states per pass (8 on AVX2); passes over the states add up) down the rows i ≥ j0 — at
//! each row every lane is multiplied by exp(Δᵢ·A[k]) and lane i − j0 starts
//! (at its diagonal) with Δᵢ·Bᵢ[k] — and row i of the block is Σₖ Cᵢ[k]·s[k].
//! This running decay from the diagonal is exact up to one rounding per step
//! (no exp(cumsumᵢ − cumsumⱼ) cancellation) and underflows gracefully to 0.
//! exp(Δᵢ·A[k]), Δᵢ·Bᵢ[k] and Cᵢ[k] are computed once per channel into
//! [l][n] tables (B/C transposed once per (batch entry, group)).
//!
//! Parallelism (rayon): `reduce = None` runs (batch entry, channel) tasks, each
//! writing its own (l, l) matrix. `reduce = "mean"` never materialises the
//! (b, d, l, l) tensor: per batch entry the channels are split into P ranges,
//! each accumulated into its own (l, l) float32 partial sum (the first one
//! being the output itself), and the partials are added and scaled by 1/d
//! into the output. P = min(`MEAN_PARTS`, ⌈d / `MEAN_MIN_CHANNELS`⌉), lowered
//! so the extra partials take at most `MEAN_BUDGET` bytes (P = 1 at worst: no
//! extra memory). P never depends on the thread count: the ranges decide the
//! rounding, and the result is bitwise the same for every RAYON_NUM_THREADS.

use super::scan::BcSrc;
use super::simd::Simd;
use super::SimdLevel;
use crate::simd_dispatch;
use crate::tensor::{addr, load_row, Raw};
use rayon::prelude::*;

/// Widest vector (AVX-512), in float32 lanes.
const MAX_LANES: usize = 16;
/// Bytes the partial means of reduce="mean" may take together.
const MEAN_BUDGET: usize = 512 << 20;
/// Most channel ranges (parallel tasks per batch entry) of reduce="mean".
const MEAN_PARTS: usize = 16;
/// Fewest channels per range of reduce="mean" (each extra range costs an
/// (l, l) fill and add, worth about one channel's work).
const MEAN_MIN_CHANNELS: usize = 8;

/// A validated hidden-attention problem (built by `ops::hidden_attention`).
pub struct HaJob {
    pub b: usize,
    pub d: usize,
    pub l: usize,
    pub n: usize,
    /// delta (b, d, l), any float dtype and strides.
    pub delta: Raw<3>,
    /// A as float32 [d][n].
    pub a: Vec<f32>,
    pub bm: BcSrc,
    pub cm: BcSrc,
    pub dbias: Option<Vec<f32>>,
    pub softplus: bool,
    /// Contiguous float32 output: (b, d, l, l), or (b, l, l) when `mean`.
    pub out: usize,
    pub mean: bool,
}

/// softplus with mamba_ssm's threshold, in float32.
#[inline]
fn softplus(x: f32) -> f32 {
    if x > 20.0 {
        x
    } else {
        x.max(0.0) + (-x.abs()).exp().ln_1p()
    }
}

/// Per-thread tables of one channel, rows padded to `np` (a multiple of 16).
struct Scratch {
    np: usize,
    dl: Vec<f32>,
    row: Vec<f32>,
    /// exp(Δᵢ·A[c,k]) as [l][np].
    e: Vec<f32>,
    /// Δᵢ·Bᵢ[k] as [l][np].
    db: Vec<f32>,
    /// Bᵢ[k], Cᵢ[k] as [l][np], valid for the (batch entry, group) in the keys.
    bt: Vec<f32>,
    ct: Vec<f32>,
    bkey: Option<(usize, usize)>,
    ckey: Option<(usize, usize)>,
}

impl Scratch {
    fn new(l: usize, n: usize) -> Scratch {
        let np = n.div_ceil(MAX_LANES) * MAX_LANES;
        Scratch {
            np,
            dl: vec![0.0; l],
            row: vec![0.0; l],
            e: vec![0.0; l * np],
            db: vec![0.0; l * np],
            bt: vec![0.0; l * np],
            ct: vec![0.0; l * np],
            bkey: None,
            ckey: None,
        }
    }
}

/// Fills `dst` ([l][np]) with B or C of (batch entry, channel); returns the
/// cache key (None for constant B/C, which differ per channel).
fn load_bc(
    src: &BcSrc,
    job: &HaJob,
    bi: usize,
    c: usize,
    dst: &mut [f32],
    row: &mut [f32],
    key: &mut Option<(usize, usize)>,
    np: usize,
) {
    let (l, n) = (job.l, job.n);
    match src {
        BcSrc::Const(v) => {
            *key = None;
            let bc = &v[c * n..(c + 1) * n];
            for i in 0..l {
                dst[i * np..i * np + n].copy_from_slice(bc);
            }
        }
        BcSrc::Var { raw, groups } => {
            let g = c / (job.d / groups);
            if *key == Some((bi, g)) {
                return;
            }
            for k in 0..n {
                unsafe { load_row(row, addr(raw, [bi, g, k, 0]), raw.dtype, raw.strides[3]) };
                for (i, v) in row.iter().enumerate() {
                    dst[i * np + k] = *v;
                }
            }
            *key = Some((bi, g));
        }
    }
}

/// What one channel's kernel needs: the tables, the state and where row i goes.
struct ChanTask<'a> {
    l: usize,
    n: usize,
    np: usize,
    a: &'a [f32],
    dl: &'a [f32],
    e: *mut f32,
    db: *mut f32,
    bt: *const f32,
    ct: *const f32,
    /// Row 0 of this channel's (l, l) float32 destination, row stride l.
    out: *mut f32,
    /// Accumulate (+=) instead of store, and skip the upper triangle.
    accumulate: bool,
}

#[inline(always)]
unsafe fn channel<S: Simd>(t: &ChanTask) {
    let (l, n, np) = (t.l, t.n, t.np);
    let lanes = S::LANES;
    // Tables: e = exp(Δᵢ·A[k]), db = Δᵢ·Bᵢ[k], vectorised over k. Rows are
    // padded to np with C = 0, and e = db = 0 there whatever Δᵢ is (Δ·0 is
    // NaN for a NaN or infinite Δ), so the padded states stay 0 and add nothing.
    let mut apad = [0.0f32; 256 + MAX_LANES];
    apad[..n].copy_from_slice(t.a);
    for i in 0..l {
        let dv = S::splat(t.dl[i]);
        let mut k = 0;
        while k < n {
            let arg = S::mul(dv, S::load(apad.as_ptr().add(k)));
            let bv = S::load(t.bt.add(i * np + k));
            let (mut e, mut db) = (S::exp(arg), S::mul(dv, bv));
            if k + lanes > n {
                e = S::keep_first(e, n - k);
                db = S::keep_first(db, n - k);
            }
            S::store(t.e.add(i * np + k), e);
            S::store(t.db.add(i * np + k), db);
            k += lanes;
        }
    }
    let mut j0 = 0;
    while j0 < l {
        let jn = lanes.min(l - j0);
        if !t.accumulate {
            // the upper triangle above this block of columns
            for i in 0..j0 {
                let o = t.out.add(i * l + j0);
                if jn == lanes {
                    S::store(o, S::zero());
                } else {
                    std::ptr::write_bytes(o, 0, jn);
                }
            }
        }
        // States in passes of up to 16 (8 with 16 vector registers: AVX2 and
        // portable), held in registers; passes add up.
        let per_pass = if lanes == 16 { 16 } else { 8 };
        let mut k0 = 0;
        while k0 < n {
            let add = t.accumulate || k0 > 0;
            match (n - k0).min(per_pass) {
                1..=4 => walk::<S, 4>(t, j0, jn, k0, add),
                5..=8 => walk::<S, 8>(t, j0, jn, k0, add),
                _ => walk::<S, 16>(t, j0, jn, k0, add),
            }
            k0 += per_pass;
        }
        j0 += lanes;
    }
}

/// Rows j0..l of the column block [j0, j0 + jn) for the states [k0, k0 + NK):
/// the running state of each column lives in `NK` vector registers.
#[inline(always)]
unsafe fn walk<S: Simd, const NK: usize>(t: &ChanTask, j0: usize, jn: usize, k0: usize, add: bool) {
    let (l, np) = (t.l, t.np);
    let lanes = S::LANES;
    let mut s = [S::zero(); NK];
    let mut tmp = [0.0f32; MAX_LANES];
    for i in j0..l {
        let e = t.e.add(i * np + k0);
        let c = t.ct.add(i * np + k0);
        if i < j0 + jn {
            // lane i - j0 starts here, at its diagonal, with Δᵢ·Bᵢ
            let lane = i - j0;
            let db = t.db.add(i * np + k0);
            for k in 0..NK {
                S::store(tmp.as_mut_ptr(), S::mul(s[k], S::splat(*e.add(k))));
                tmp[lane] = *db.add(k);
                s[k] = S::load(tmp.as_ptr());
            }
        } else {
            for k in 0..NK {
                s[k] = S::mul(s[k], S::splat(*e.add(k)));
            }
        }
        let mut acc = [S::zero(); 4];
        for k in 0..NK {
            acc[k % 4] = S::fma(S::splat(*c.add(k)), s[k], acc[k % 4]);
        }
        let mut a = S::add(S::add(acc[0], acc[1]), S::add(acc[2], acc[3]));
        if i < j0 + lanes {
            // Columns j > i have not started: their lanes hold 0·e products
            // (NaN when e or C is NaN or inf), and α is exactly 0 there.
            a = S::keep_first(a, i - j0 + 1);
        }
        let o = t.out.add(i * l + j0);
        if jn == lanes {
            S::store(o, if add { S::add(S::load(o), a) } else { a });
        } else {
            S::store(tmp.as_mut_ptr(), a);
            for q in 0..jn {
                if add {
                    *o.add(q) += tmp[q];
                } else {
                    *o.add(q) = tmp[q];
                }
            }
        }
    }
}

/// Prepares channel c of batch entry bi in `sc` and runs the kernel into `out`.
fn run_channel(
    job: &HaJob,
    level: SimdLevel,
    sc: &mut Scratch,
    bi: usize,
    c: usize,
    out: *mut f32,
    accumulate: bool,
) {
    let (l, n, np) = (job.l, job.n, sc.np);
    let dr = &job.delta;
    unsafe { load_row(&mut sc.dl, addr(dr, [bi, c, 0]), dr.dtype, dr.strides[2]) };
    let bias = job.dbias.as_ref().map(|v| v[c]).unwrap_or(0.0);
    for x in sc.dl.iter_mut() {
        *x += bias;
        if job.softplus {
            *x = softplus(*x);
        }
    }
    load_bc(
        &job.bm,
        job,
        bi,
        c,
        &mut sc.bt,
        &mut sc.row,
        &mut sc.bkey,
        np,
    );
    load_bc(
        &job.cm,
        job,
        bi,
        c,
        &mut sc.ct,
        &mut sc.row,
        &mut sc.ckey,
        np,
    );
    let task = ChanTask {
        l,
        n,
        np,
        a: &job.a[c * n..(c + 1) * n],
        dl: &sc.dl,
        e: sc.e.as_mut_ptr(),
        db: sc.db.as_mut_ptr(),
        bt: sc.bt.as_ptr(),
        ct: sc.ct.as_ptr(),
        out,
        accumulate,
    };
    simd_dispatch!(level, channel, &task, &ChanTask);
}

/// Runs the whole job.
pub fn hidden_attention(job: &HaJob, level: SimdLevel) {
    let (b, d, l, n) = (job.b, job.d, job.l, job.n);
    let ll = l * l;
    let out = job.out;
    if !job.mean {
        (0..b * d).into_par_iter().for_each_init(
            || Scratch::new(l, n),
            |sc, idx| {
                let (bi, c) = (idx / d, idx % d);
                let dst = (out as *mut f32).wrapping_add(idx * ll);
                run_channel(job, level, sc, bi, c, dst, false);
            },
        );
        return;
    }
    // Partial sums: range 0 accumulates straight into out[bi], ranges 1.. into
    // their own (l, l) buffers (at most MEAN_BUDGET bytes together).
    let by_mem = 1 + MEAN_BUDGET / (ll * 4).max(1);
    let parts = MEAN_PARTS
        .min(d.div_ceil(MEAN_MIN_CHANNELS))
        .min(by_mem)
        .max(1);
    let mut partial = vec![0.0f32; (parts - 1) * ll];
    let inv_d = 1.0 / d as f32;
    for bi in 0..b {
        let dst = (out as *mut f32).wrapping_add(bi * ll) as usize;
        let own = unsafe { std::slice::from_raw_parts_mut(dst as *mut f32, ll) };
        let mut accs: Vec<&mut [f32]> = vec![own];
        accs.extend(partial.chunks_mut(ll));
        accs.into_par_iter().enumerate().for_each(|(p, acc)| {
            acc.fill(0.0);
            let mut sc = Scratch::new(l, n);
            let (c0, c1) = (p * d / parts, (p + 1) * d / parts);
            for c in c0..c1 {
                run_channel(job, level, &mut sc, bi, c, acc.as_mut_ptr(), true);
            }
        });
        // out[bi] = (Σ partials) / d (the upper triangle stays 0); rows in parallel.
        let part = &partial;
        (0..l).into_par_iter().for_each(|i| {
            let row =
                unsafe { std::slice::from_raw_parts_mut((dst as *mut f32).add(i * l), i + 1) };
            for (j, v) in row.iter_mut().enumerate() {
                let mut s = *v;
                for p in 0..parts - 1 {
                    s += part[p * ll + i * l + j];
                }
                *v = s * inv_d;
            }
        });
    }
}
