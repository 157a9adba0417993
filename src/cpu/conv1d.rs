//! CPU causal depthwise conv1d (SPEC §2): forward, one-step (or few-step)
//! update of a rolling / circular conv state, and backward.
//!
//! Forward: rayon runs (batch, block of `CB` channels) tasks. Each channel row
//! is read (through its strides) into a float32 buffer `[w-1 carried inputs |
//! up to TC new inputs]`; channel-last x (stride 1 along d) is instead
//! gathered one time step at a time (a contiguous load of the block's
//! channels) into the block's row buffers. The outputs are
//! computed vectorised along time: the w taps are FMAs over shifted unaligned
//! loads of that buffer, the width a const generic so the taps unroll. The
//! last w-1 buffer entries carry to the next time chunk and, at the end, are
//! the final states.
//!
//! Update: scalar per (batch, channel); the state shift is done in the state's
//! own dtype (an exact byte copy), only the new inputs are converted.
//!
//! Backward: plain loops per channel (each task owns its channels, so dweight
//! and dbias need no reduction across threads), accumulating them in float64.

use super::simd::Simd;
use super::SimdLevel;
use crate::simd_dispatch;
use crate::tensor::{addr, load_row, store_row, DType, Raw};
use rayon::prelude::*;

/// Supported kernel widths.
pub const MIN_W: usize = 2;
pub const MAX_W: usize = 8;
/// Channels per forward task.
const CB: usize = 16;
/// Time steps per chunk of a row (a block's buffers stay in L2).
const TC: usize = 2048;
/// Vector padding of the row buffers (the widest vector).
const PAD: usize = 16;

/// A validated forward problem (built by `ops::conv1d`).
pub struct ConvJob {
    pub b: usize,
    pub d: usize,
    pub l: usize,
    pub w: usize,
    pub x: Raw<3>,
    pub out: Raw<3>,
    /// weight as float32 [d][w].
    pub weight: Vec<f32>,
    pub bias: Option<Vec<f32>>,
    pub init: Option<Raw<3>>,
    pub last: Option<Raw<3>>,
    pub silu: bool,
}

struct Task<'a> {
    job: &'a ConvJob,
    bi: usize,
    c0: usize,
    c1: usize,
}

pub fn conv_forward(job: &ConvJob, level: SimdLevel) {
    let nb = job.d.div_ceil(CB);
    let run = |i: usize| {
        let (bi, blk) = (i / nb, i % nb);
        let task = Task {
            job,
            bi,
            c0: blk * CB,
            c1: ((blk + 1) * CB).min(job.d),
        };
        simd_dispatch!(level, conv_task, &task, &Task);
    };
    if job.b * job.d * job.l >= 1 << 14 {
        (0..job.b * nb).into_par_iter().for_each(run);
    } else {
        (0..job.b * nb).for_each(run);
    }
}

/// out[t] = act(bias + Σ_i w[i]·buf[t + i]) for t in 0..n (n rounded up to
/// whole vectors: `buf` and `out` are padded).
#[inline(always)]
unsafe fn conv_row<S: Simd, const W: usize>(
    buf: *const f32,
    out: *mut f32,
    n: usize,
    wt: &[f32],
    bias: f32,
    silu: bool,
) {
    let ws: [S::V; W] = std::array::from_fn(|i| S::splat(wt[i]));
    let bv = S::splat(bias);
    let mut t = 0;
    if silu {
        while t < n {
            let mut acc = bv;
            for (i, wv) in ws.iter().enumerate() {
                acc = S::fma(*wv, S::load(buf.add(t + i)), acc);
            }
            S::store(out.add(t), S::silu(acc));
            t += S::LANES;
        }
    } else {
        while t < n {
            let mut acc = bv;
            for (i, wv) in ws.iter().enumerate() {
                acc = S::fma(*wv, S::load(buf.add(t + i)), acc);
            }
            S::store(out.add(t), acc);
            t += S::LANES;
        }
    }
}

#[inline(always)]
unsafe fn conv_task<S: Simd>(task: &Task) {
    let job = task.job;
    let (w, l, bi, c0) = (job.w, job.l, task.bi, task.c0);
    let nc = task.c1 - c0;
    let h = w - 1;
    let x = &job.x;
    // Channel-last x (channels contiguous): gather a [t][channel] block per
    // time step (contiguous loads) into the channels' row buffers.
    let cl = x.strides[1] == 1 && x.strides[2] != 1 && nc > 1;
    let tc = l.min(TC);
    let rs = h + tc + PAD;
    let mut bufs = vec![0.0f32; nc * rs];
    let mut obuf = vec![0.0f32; tc + PAD];
    let mut col = [0.0f32; CB];
    if let Some(init) = &job.init {
        for k in 0..nc {
            load_row(
                &mut bufs[k * rs..k * rs + h],
                addr(init, [bi, c0 + k, 0]),
                init.dtype,
                init.strides[2],
            );
        }
    }
    let out = &job.out;
    let s = job.silu;
    let mut t0 = 0;
    while t0 < l {
        let n = (l - t0).min(tc);
        if cl {
            for t in 0..n {
                load_row(&mut col[..nc], addr(x, [bi, c0, t0 + t]), x.dtype, 1);
                for (k, v) in col[..nc].iter().enumerate() {
                    *bufs.get_unchecked_mut(k * rs + h + t) = *v;
                }
            }
        }
        for k in 0..nc {
            let c = c0 + k;
            let buf = &mut bufs[k * rs..(k + 1) * rs];
            if !cl {
                load_row(
                    &mut buf[h..h + n],
                    addr(x, [bi, c, t0]),
                    x.dtype,
                    x.strides[2],
                );
            }
            let wt = &job.weight[c * w..(c + 1) * w];
            let bias = job.bias.as_ref().map_or(0.0, |b| b[c]);
            let bp = buf.as_ptr();
            // A macro, not a closure: everything stays inlined into the
            // target-feature entry point.
            macro_rules! row {
                ($src:expr, $dst:expr, $n:expr) => {
                    match w {
                        2 => conv_row::<S, 2>($src, $dst, $n, wt, bias, s),
                        3 => conv_row::<S, 3>($src, $dst, $n, wt, bias, s),
                        4 => conv_row::<S, 4>($src, $dst, $n, wt, bias, s),
                        5 => conv_row::<S, 5>($src, $dst, $n, wt, bias, s),
                        6 => conv_row::<S, 6>($src, $dst, $n, wt, bias, s),
                        7 => conv_row::<S, 7>($src, $dst, $n, wt, bias, s),
                        _ => conv_row::<S, 8>($src, $dst, $n, wt, bias, s),
                    }
                };
            }
            // float32 contiguous output: whole vectors go straight to it.
            let nf = if out.dtype == DType::F32 && out.strides[2] == 1 {
                n / S::LANES * S::LANES
            } else {
                0
            };
            if nf > 0 {
                row!(bp, addr(out, [bi, c, t0]) as *mut f32, nf);
            }
            if nf < n {
                row!(bp.add(nf), obuf.as_mut_ptr(), n - nf);
                store_row(
                    &obuf[..n - nf],
                    addr(out, [bi, c, t0 + nf]),
                    out.dtype,
                    out.strides[2],
                );
            }
            buf.copy_within(n..n + h, 0);
        }
        t0 += n;
    }
    if let Some(last) = &job.last {
        for k in 0..nc {
            store_row(
                &bufs[k * rs..k * rs + h],
                addr(last, [bi, c0 + k, 0]),
                last.dtype,
                last.strides[2],
            );
        }
    }
}

#[inline(always)]
fn act(v: f32, silu: bool) -> f32 {
    if silu {
        v / (1.0 + (-v).exp())
    } else {
        v
    }
}

/// A validated update (built by `ops::conv1d`). x and out are (b, d, l_new)
/// views (a (b, d) tensor has a zero time stride and l_new = 1).
pub struct ConvUpdateJob {
    pub b: usize,
    pub d: usize,
    pub l: usize,
    pub w: usize,
    pub state_len: usize,
    pub x: Raw<3>,
    pub out: Raw<3>,
    pub state: Raw<3>,
    pub weight: Vec<f32>,
    pub bias: Option<Vec<f32>>,
    pub silu: bool,
    /// Circular mode: each batch entry's write position (cache_seqlens).
    pub seqlens: Option<Vec<i64>>,
}

/// Copies one element of `dtype` between byte addresses.
#[inline(always)]
unsafe fn copy_elem(src: usize, dst: usize, dtype: DType) {
    std::ptr::copy(src as *const u8, dst as *mut u8, dtype.size());
}

fn update_row(job: &ConvUpdateJob, bi: usize, c: usize, ctx: &mut Vec<f32>, out: &mut Vec<f32>) {
    let (w, l, sl) = (job.w, job.l, job.state_len);
    let h = w - 1;
    let st = &job.state;
    let ss = st.strides[2];
    ctx.resize(h + l, 0.0);
    out.resize(l, 0.0);
    unsafe {
        // The context: the w-1 inputs before the new ones, then the new ones.
        match &job.seqlens {
            None => load_row(&mut ctx[..h], addr(st, [bi, c, sl - h]), st.dtype, ss),
            Some(s) => {
                let pos = s[bi];
                for (j, v) in ctx[..h].iter_mut().enumerate() {
                    let p = (pos - h as i64 + j as i64).rem_euclid(sl as i64) as usize;
                    load_row(std::slice::from_mut(v), addr(st, [bi, c, p]), st.dtype, 1);
                }
            }
        }
        load_row(
            &mut ctx[h..],
            addr(&job.x, [bi, c, 0]),
            job.x.dtype,
            job.x.strides[2],
        );
    }
    let wt = &job.weight[c * w..(c + 1) * w];
    let bias = job.bias.as_ref().map_or(0.0, |b| b[c]);
    for (t, o) in out.iter_mut().enumerate() {
        let mut acc = bias;
        for i in 0..w {
            acc += wt[i] * ctx[t + i];
        }
        *o = act(acc, job.silu);
    }
    // Writes new input t to state position p: an exact copy when the dtypes
    // agree, else converted from float32.
    let put = |t: usize, p: usize| unsafe {
        if job.x.dtype == st.dtype {
            copy_elem(addr(&job.x, [bi, c, t]), addr(st, [bi, c, p]), st.dtype);
        } else {
            store_row(&ctx[h + t..h + t + 1], addr(st, [bi, c, p]), st.dtype, 1);
        }
    };
    unsafe {
        store_row(
            out,
            addr(&job.out, [bi, c, 0]),
            job.out.dtype,
            job.out.strides[2],
        );
        match &job.seqlens {
            None => {
                // Shift left by l in the state's own dtype, then append the inputs.
                let keep = sl.saturating_sub(l);
                for j in 0..keep {
                    copy_elem(addr(st, [bi, c, j + l]), addr(st, [bi, c, j]), st.dtype);
                }
                for j in keep..sl {
                    put(l - (sl - j), j);
                }
            }
            Some(s) => {
                // In order, so with l_new > state_len the last inputs win.
                let pos = s[bi];
                for t in 0..l {
                    let p = (pos + t as i64).rem_euclid(sl as i64) as usize;
                    put(t, p);
                }
            }
        }
    }
}

/// Channels per parallel task of the update.
const UPDATE_CHUNK: usize = 256;
/// Work (b·d·(state_len + l_new)) from which the update runs on several threads.
const PARALLEL_MIN: usize = 1 << 17;

pub fn conv_update(job: &ConvUpdateJob) {
    let tasks: Vec<(usize, usize)> = (0..job.b)
        .flat_map(|bi| (0..job.d).step_by(UPDATE_CHUNK).map(move |c0| (bi, c0)))
        .collect();
    let run = |&(bi, c0): &(usize, usize)| {
        let (mut ctx, mut out) = (Vec::new(), Vec::new());
        for c in c0..(c0 + UPDATE_CHUNK).min(job.d) {
            update_row(job, bi, c, &mut ctx, &mut out);
        }
    };
    if job.b * job.d * (job.state_len + job.l) >= PARALLEL_MIN {
        tasks.par_iter().for_each(run);
    } else {
        tasks.iter().for_each(run);
    }
}

/// A validated backward problem (built by `ops::conv1d`).
pub struct ConvBwdJob {
    pub b: usize,
    pub d: usize,
    pub l: usize,
    pub w: usize,
    pub x: Raw<3>,
    pub dout: Raw<3>,
    pub init: Option<Raw<3>>,
    pub dfinal: Option<Raw<3>>,
    pub weight: Vec<f32>,
    pub bias: Option<Vec<f32>>,
    pub silu: bool,
    pub dx: Raw<3>,
    pub dinit: Option<Raw<3>>,
    /// float32 (d, w).
    pub dweight: Raw<2>,
    /// float32 (d,).
    pub dbias: Option<Raw<1>>,
}

fn bwd_channel(job: &ConvBwdJob, c: usize) {
    let (w, l) = (job.w, job.l);
    let h = w - 1;
    let wt = &job.weight[c * w..(c + 1) * w];
    let bias = job.bias.as_ref().map_or(0.0, |b| b[c]);
    let mut xp = vec![0.0f32; h + l];
    let mut g = vec![0.0f32; l];
    let mut dxp = vec![0.0f32; h + l];
    let mut hd = vec![0.0f32; h];
    let mut dw = [0.0f64; MAX_W];
    let mut db = 0.0f64;
    for bi in 0..job.b {
        unsafe {
            match &job.init {
                Some(r) => load_row(&mut xp[..h], addr(r, [bi, c, 0]), r.dtype, r.strides[2]),
                None => xp[..h].fill(0.0),
            }
            let x = &job.x;
            load_row(&mut xp[h..], addr(x, [bi, c, 0]), x.dtype, x.strides[2]);
            let r = &job.dout;
            load_row(&mut g, addr(r, [bi, c, 0]), r.dtype, r.strides[2]);
        }
        // g = dout · act'(pre-activation), recomputed.
        for (t, gt) in g.iter_mut().enumerate() {
            if job.silu {
                let mut z = bias;
                for i in 0..w {
                    z += wt[i] * xp[t + i];
                }
                let s = 1.0 / (1.0 + (-z).exp());
                *gt *= s * (1.0 + z * (1.0 - s));
            }
            db += *gt as f64;
        }
        for (i, dwi) in dw.iter_mut().enumerate().take(w) {
            let mut acc = 0.0f64;
            for t in 0..l {
                acc += g[t] as f64 * xp[t + i] as f64;
            }
            *dwi += acc;
        }
        dxp.fill(0.0);
        for t in 0..l {
            for i in 0..w {
                dxp[t + i] += wt[i] * g[t];
            }
        }
        // final_states = xpad[l .. l + w - 1].
        if let Some(r) = &job.dfinal {
            unsafe { load_row(&mut hd, addr(r, [bi, c, 0]), r.dtype, r.strides[2]) };
            for k in 0..h {
                dxp[l + k] += hd[k];
            }
        }
        unsafe {
            let r = &job.dx;
            store_row(&dxp[h..], addr(r, [bi, c, 0]), r.dtype, r.strides[2]);
            if let Some(r) = &job.dinit {
                store_row(&dxp[..h], addr(r, [bi, c, 0]), r.dtype, r.strides[2]);
            }
        }
    }
    let dwf: Vec<f32> = dw[..w].iter().map(|&v| v as f32).collect();
    unsafe {
        let r = &job.dweight;
        store_row(&dwf, addr(r, [c, 0]), r.dtype, r.strides[1]);
        if let Some(r) = &job.dbias {
            store_row(&[db as f32], addr(r, [c]), r.dtype, 1);
        }
    }
}

pub fn conv_backward(job: &ConvBwdJob) {
    (0..job.d).into_par_iter().for_each(|c| bwd_channel(job, c));
}
