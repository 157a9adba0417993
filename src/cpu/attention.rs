//! CPU attention forward (SPEC §3): FlashAttention's tiled online softmax in
//! float32, for float32 / float16 / bfloat16 (and float64) inputs.
//!
//! Layout of the work. A task is (sequence, kv head, block of up to
//! `MVC·LANES` "rows"), where the rows of a kv head are the (query, query head
//! of its group) pairs in query-major order: with GQA/MQA the query heads that
//! share a kv head are processed together, so each K/V element is read once
//! per block, never copied per head. rayon runs the tasks.
//!
//! Everything inside a task is transposed so that the vector lanes run over
//! rows (queries): Qᵀ [hd][BQ] is packed once per task (pre-multiplied by the
//! softmax scale and log2 e), scores are Sᵀ [BK][BQ] = K·Qᵀ — a register-blocked
//! GEMM that broadcasts K[j][d] and streams Qᵀ rows — and the accumulator is
//! Oᵀ [hd][BQ] += Vᵀ·Pᵀ, broadcasting V[j][d] and streaming Pᵀ rows. The
//! softmax's running max / sum are then plain vectors over rows: no horizontal
//! reductions anywhere. exp is the Simd trait's degree-4 `exp2_attn` (2.7e-6
//! relative; scores are kept in the log2 domain). Output rows of whole aligned
//! float32 lines are written with non-temporal stores.
//!
//! Keys come as a list of segments (`KeySeg`): a run of logical key indices
//! stored at consecutive rows of some K/V memory. A batch entry is one segment;
//! a ring-buffer KV cache is two (the wrapped halves) plus the new tokens.
//! Only keys the mask can reach are visited (a window of W costs O(s·W)); a
//! tile wholly inside the mask skips the masking, a tile partly outside gets
//! it element-wise. A masked key contributes nothing whatever its bits: its
//! score is selected to −inf (a NaN K never survives), and an edge tile whose
//! V holds a non-finite value (found by one scan of the tile) runs P·V on a
//! cleaned copy and adds the non-finite values to the lanes that see them
//! (P = 0 times NaN would be NaN). softcap uses `softcap_tanh`, exact to
//! float32 rounding for any softcap. A task is a run of up to `RUN_BLOCKS` consecutive blocks:
//! the K/V rows it reads are converted to float32 into a contiguous
//! thread-local buffer once, the first time a block touches them (one tile at
//! a time into a small buffer when the run's keys would need > 4 MB).

// Register tiles are indexed [row][vector]: index loops read clearest.
#![allow(clippy::needless_range_loop)]

use super::simd::{Simd, LOG2E};
use super::SimdLevel;
use crate::simd_dispatch;
use crate::tensor::{load_row, store_row, DType, Raw};
use rayon::prelude::*;
use std::cell::RefCell;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Keys per tile.
pub const BK: usize = 64;
/// Most vectors of rows per block.
const MAX_MVC: usize = 4;

/// Logical keys `j0 .. j0 + len` of a sequence, stored at rows 0.. of `k`/`v`
/// ([row][kv head][d] views whose pointer is the segment's first row).
#[derive(Clone, Copy, Debug)]
pub struct KeySeg {
    pub j0: usize,
    pub len: usize,
    pub k: Raw<3>,
    pub v: Raw<3>,
}

/// One sequence: q/out are [row][head][d] views at its first query; lse is
/// [head][row] float32 at its first query.
#[derive(Clone, Debug)]
pub struct SeqDesc {
    pub q: Raw<3>,
    pub out: Raw<3>,
    pub lse: Option<Raw<2>>,
    pub sq: usize,
    /// Logical number of keys (the mask is bottom-right aligned on sk − sq).
    pub sk: usize,
    pub segs: Vec<KeySeg>,
    /// ALiBi slope of each query head (already chosen for this sequence).
    pub slopes: Option<Vec<f32>>,
}

/// A validated attention problem (built by `ops::attention`).
#[derive(Clone, Debug)]
pub struct AttnJob {
    pub hq: usize,
    pub hk: usize,
    pub hd: usize,
    pub scale: f32,
    /// Window sides after causal normalisation; -1 = unbounded.
    pub left: i64,
    pub right: i64,
    pub softcap: f32,
    pub seqs: Vec<SeqDesc>,
}

struct Task<'a> {
    job: &'a AttnJob,
    seq: &'a SeqDesc,
    kvh: usize,
    /// Rows r0 .. r0 + nrows: a run of consecutive blocks of up to
    /// `MAX_MVC·LANES` rows that share one packed copy of their K/V rows.
    r0: usize,
    nrows: usize,
    /// Keys this task covers: the block's visible keys ∩ [klo, khi).
    klo: i64,
    khi: i64,
    /// Split-KV part: address of its scratch ([nrows][hd] normalised out,
    /// then [nrows] lse), merged after all parts ran; 0 = write out directly.
    part: usize,
}

/// Split-KV: with fewer than `SPLIT_BELOW_BLOCKS` blocks (decoding: few rows,
/// long contexts), each block's keys are cut into about
/// `SPLIT_PARTS / blocks` chunks of at least `MIN_SPLIT_KEYS` keys that run in
/// parallel and are merged by their lse. These are constants, not functions
/// of the thread count: where the chunks start decides the rounding, and the
/// result must not depend on how many threads run (RAYON_NUM_THREADS).
const MIN_SPLIT_KEYS: i64 = 512;
const SPLIT_BELOW_BLOCKS: usize = 32;
const SPLIT_PARTS: usize = 64;

/// Most blocks per task (a run). The run's K/V rows are converted into a
/// contiguous buffer once, when a block first touches them, and the run's
/// later blocks read them from there: a window of W keys used to be copied
/// ≈ W / BK + 1 times, from rows `hk·hd` elements apart. Longer runs re-read
/// fewer keys from memory (a run of R blocks of 64 rows under a window of W
/// reads (64·R + W − 1) / (64·R) times the keys it needs): C5 (1 thread,
/// best CPU time) 4 → 95.4 – 96.4 ms, 8 → 93.7 – 94.9, 32 → 91.6 – 92.1,
/// 64 → 92.9 – 94.3 (bench/cpu_attn_notes.md, session 3).
const RUN_BLOCKS: usize = 32;

/// Largest packed K+V buffer (bytes) per task; runs whose keys need more
/// convert each tile into a small buffer instead (settable for tests).
static PACK_MAX_BYTES: AtomicUsize = AtomicUsize::new(4 << 20);

thread_local! {
    /// Packed K and V rows of the task this thread runs (kept between calls).
    static PACK: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// The keys a block of rows can see, [lo, hi), clipped to the sequence's segments.
fn visible_keys(job: &AttnJob, seq: &SeqDesc, r0: usize, nrows: usize) -> (i64, i64) {
    let grp = (job.hq / job.hk) as i64;
    let off = seq.sk as i64 - seq.sq as i64;
    let (i_min, i_max) = (r0 as i64 / grp, (r0 + nrows - 1) as i64 / grp);
    let mut lo = if job.left >= 0 {
        (i_min + off - job.left).max(0)
    } else {
        0
    };
    let mut hi = if job.right >= 0 {
        (i_max + off + job.right + 1).min(seq.sk as i64)
    } else {
        seq.sk as i64
    };
    let s_lo = seq.segs.iter().map(|g| g.j0 as i64).min().unwrap_or(0);
    let s_hi = seq
        .segs
        .iter()
        .map(|g| (g.j0 + g.len) as i64)
        .max()
        .unwrap_or(0);
    lo = lo.max(s_lo);
    hi = hi.min(s_hi);
    (lo, hi)
}

fn lanes_of(level: SimdLevel) -> usize {
    match level {
        SimdLevel::Avx512 => 16,
        _ => 8,
    }
}

/// softcap · log2 e in float32, kept finite (a cap beyond float32's range
/// acts on scores that large only, which overflow anyway).
pub(crate) fn softcap_log2(softcap: f32) -> f32 {
    (softcap as f64 * std::f64::consts::LOG2_E).min(f32::MAX as f64) as f32
}

/// Runs the forward pass of `job`, writing out (and lse) of every sequence.
pub fn attn_forward(job: &AttnJob, level: SimdLevel) {
    let grp = job.hq / job.hk;
    let bq = MAX_MVC * lanes_of(level);
    let threads = rayon::current_num_threads();
    let nblocks = job.hk
        * job
            .seqs
            .iter()
            .map(|s| (s.sq * grp).div_ceil(bq))
            .sum::<usize>();
    // Split-KV (below) depends on the problem only, never on the thread count,
    // so that the result is bitwise the same for every thread count.
    let split_kv = nblocks < SPLIT_BELOW_BLOCKS;
    // Blocks per task: as many as keep ≥ 8 tasks per thread (the run length
    // changes only the work split, not the arithmetic of any row).
    let mut run = if split_kv { 1 } else { RUN_BLOCKS };
    while run > 1 && nblocks.div_ceil(run) < 8 * threads {
        run /= 2;
    }
    // Run-major order: consecutive tasks of a thread are the kv heads of one
    // run, whose K/V rows share pages (a [s][hk][hd] row of 16 heads × 64
    // floats is one 4 KB page): each page's TLB walk then serves every head,
    // not one.
    let mut tasks = Vec::new();
    for seq in &job.seqs {
        let rows = seq.sq * grp;
        let mut r0 = 0;
        while r0 < rows {
            let n = (run * bq).min(rows - r0);
            for kvh in 0..job.hk {
                tasks.push(Task {
                    job,
                    seq,
                    kvh,
                    r0,
                    nrows: n,
                    klo: 0,
                    khi: i64::MAX,
                    part: 0,
                });
            }
            r0 += n;
        }
    }
    // Split-KV when there are too few blocks to occupy many threads (then every
    // task is one block): about SPLIT_PARTS parts in all.
    let mut groups: Vec<(usize, usize)> = Vec::new(); // (first part task, parts)
    let mut scratch: Vec<f32> = Vec::new();
    if split_kv && !tasks.is_empty() {
        let want = SPLIT_PARTS.div_ceil(tasks.len()) as i64;
        let mut split = Vec::with_capacity(tasks.len() * want as usize);
        let mut offs = Vec::new();
        let mut total = 0usize;
        for t in tasks.drain(..) {
            let (lo, hi) = visible_keys(job, t.seq, t.r0, t.nrows);
            let nsplit = want.min((hi - lo) / MIN_SPLIT_KEYS);
            if nsplit < 2 {
                split.push(t);
                continue;
            }
            let chunk = ((hi - lo) / nsplit + BK as i64 - 1) / BK as i64 * BK as i64;
            groups.push((split.len(), 0));
            let mut a = lo;
            while a < hi {
                let e = (a + chunk).min(hi);
                offs.push((split.len(), total));
                total += t.nrows * (job.hd + 1);
                split.push(Task {
                    klo: a,
                    khi: e,
                    part: 1,
                    ..t
                });
                a = e;
            }
            let g = groups.last_mut().unwrap();
            g.1 = split.len() - g.0;
        }
        tasks = split;
        scratch = vec![0.0f32; total];
        let base = scratch.as_mut_ptr() as usize;
        for (ti, off) in offs {
            tasks[ti].part = base + off * 4;
        }
    }
    let run = |t: &Task| simd_dispatch!(level, task_any, t, &Task);
    let work: usize = job.seqs.iter().map(|s| s.sq * s.sk.max(1)).sum::<usize>() * job.hq * job.hd;
    if tasks.len() > 1 && work >= 1 << 15 {
        tasks.par_iter().for_each(run);
    } else {
        tasks.iter().for_each(run);
    }
    for &(first, n) in &groups {
        unsafe { merge_parts(&tasks[first..first + n], job.hd) };
    }
    drop(scratch);
}

/// Merges the split-KV parts of one block: out = Σ_c w_c·out_c / Σ_c w_c with
/// w_c = exp(lse_c − max lse), lse = max lse + ln Σ w_c.
unsafe fn merge_parts(parts: &[Task], hd: usize) {
    let t0 = &parts[0];
    let (seq, nrows) = (t0.seq, t0.nrows);
    let grp = t0.job.hq / t0.job.hk;
    let mut row = vec![0.0f32; hd];
    for rl in 0..nrows {
        let lse_of = |t: &Task| *((t.part as *const f32).add(nrows * hd + rl));
        let m = parts.iter().map(lse_of).fold(f32::NEG_INFINITY, f32::max);
        row.fill(0.0);
        let mut lse = f32::NEG_INFINITY;
        if m > f32::NEG_INFINITY {
            let mut wsum = 0.0f64;
            for t in parts {
                let w = ((lse_of(t) - m) as f64).exp();
                if w == 0.0 {
                    continue;
                }
                wsum += w;
                let o = (t.part as *const f32).add(rl * hd);
                for x in 0..hd {
                    row[x] += (w as f32) * *o.add(x);
                }
            }
            let inv = (1.0 / wsum) as f32;
            for x in row.iter_mut() {
                *x *= inv;
            }
            lse = m + wsum.ln() as f32;
        }
        write_row(seq, grp, t0.kvh, t0.r0 + rl, &row, lse);
    }
}

/// Stores one normalised output row and its lse.
unsafe fn write_row(seq: &SeqDesc, grp: usize, kvh: usize, r: usize, row: &[f32], lse: f32) {
    let (i, h) = (r / grp, kvh * grp + r % grp);
    let o = &seq.out;
    let p = o.ptr as isize
        + (i as isize * o.strides[0] + h as isize * o.strides[1]) * o.dtype.size() as isize;
    store_row(row, p as usize, o.dtype, o.strides[2]);
    if let Some(ls) = &seq.lse {
        let p = ls.ptr as isize + (h as isize * ls.strides[0] + i as isize * ls.strides[1]) * 4;
        *(p as *mut f32) = lse;
    }
}

#[inline(always)]
unsafe fn task_any<S: Simd>(t: &Task) {
    let (job, seq, hd) = (t.job, t.seq, t.job.hd);
    let bq = MAX_MVC * S::LANES;
    let end = t.r0 + t.nrows;
    // Keys of the whole run: [base, top).
    let (mut base, mut top) = (i64::MAX, i64::MIN);
    let mut r = t.r0;
    while r < end {
        let n = bq.min(end - r);
        let (lo, hi) = visible_keys(job, seq, r, n);
        base = base.min(lo.max(t.klo));
        top = top.max(hi.min(t.khi));
        r += n;
    }
    let span = if top > base { (top - base) as usize } else { 0 };
    let (mut kb, mut vb) = PACK.with(|c| std::mem::take(&mut *c.borrow_mut()));
    let mut pk = Packer {
        k: std::ptr::null_mut(),
        v: std::ptr::null_mut(),
        base,
        reg: vec![(0, 0); seq.segs.len()],
    };
    if span > 0 && span * hd * 8 <= PACK_MAX_BYTES.load(Ordering::Relaxed) {
        if kb.len() < span * hd {
            kb.resize(span * hd, 0.0);
            vb.resize(span * hd, 0.0);
        }
        pk.k = kb.as_mut_ptr();
        pk.v = vb.as_mut_ptr();
    }
    let mut r = t.r0;
    while r < end {
        let n = bq.min(end - r);
        match n.div_ceil(S::LANES) {
            1 => task::<S, 1>(t, r, n, &mut pk),
            2 => task::<S, 2>(t, r, n, &mut pk),
            _ => task::<S, 4>(t, r, n, &mut pk),
        }
        r += n;
    }
    PACK.with(|c| *c.borrow_mut() = (kb, vb));
    #[cfg(target_arch = "x86_64")]
    if t.part == 0 && streams_out::<S>(&seq.out, hd) {
        // Order the non-temporal output stores before the task ends.
        std::arch::x86_64::_mm_sfence();
    }
}

/// Whether a task writes its output rows with non-temporal stores: AVX-512,
/// float32 rows of whole, 64-byte aligned lines.
#[inline(always)]
fn streams_out<S: Simd>(o: &Raw<3>, hd: usize) -> bool {
    cfg!(target_arch = "x86_64")
        && S::LANES == 16
        && o.dtype == DType::F32
        && o.strides[2] == 1
        && hd.is_multiple_of(16)
        && o.ptr.is_multiple_of(64)
        && o.strides[1].rem_euclid(16) == 0
        && o.strides[0].rem_euclid(16) == 0
}

/// Where a task's K/V tiles come from: the run's packed buffers (`k`/`v`
/// non-null: row j − `base` holds logical key j, converted on first use),
/// else each tile is converted into the block's own small buffers.
struct Packer {
    k: *mut f32,
    v: *mut f32,
    base: i64,
    /// Per segment, the logical keys [lo, hi) already packed.
    reg: Vec<(i64, i64)>,
}

impl Packer {
    /// K and V rows (stride hd) of keys jt .. jt + nj of segment `si`.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile<S: Simd>(
        &mut self,
        si: usize,
        seg: &KeySeg,
        kvh: usize,
        jt: i64,
        nj: usize,
        hd: usize,
        kbuf: &mut [f32],
        vbuf: &mut [f32],
    ) -> (*const f32, *const f32) {
        if self.k.is_null() {
            let row0 = jt as usize - seg.j0;
            pack_rows::<S>(&seg.k, kvh, row0, nj, hd, kbuf.as_mut_ptr());
            pack_rows::<S>(&seg.v, kvh, row0, nj, hd, vbuf.as_mut_ptr());
            return (kbuf.as_ptr(), vbuf.as_ptr());
        }
        let end = jt + nj as i64;
        let (lo, hi) = self.reg[si];
        // Blocks of a run visit keys in non-decreasing order, so the packed
        // keys are one interval; a tile outside it restarts the interval.
        let from = if jt >= lo && jt <= hi {
            hi
        } else {
            self.reg[si] = (jt, jt);
            jt
        };
        if end > from {
            let o = (from - self.base) as usize * hd;
            let (row0, n) = (from as usize - seg.j0, (end - from) as usize);
            pack_rows::<S>(&seg.k, kvh, row0, n, hd, self.k.add(o));
            pack_rows::<S>(&seg.v, kvh, row0, n, hd, self.v.add(o));
            self.reg[si].1 = end;
            // The next tile's rows, each in its own 4 KB page for C5's
            // layout (no hardware prefetch across pages), are packed next
            // (this block's next tile or the next block's last one).
            let (r1, n1) = (row0 + n, BK.min(seg.len.saturating_sub(row0 + n)));
            prefetch_kv_rows(&seg.k, kvh, r1, n1, hd);
            prefetch_kv_rows(&seg.v, kvh, r1, n1, hd);
        }
        let o = (jt - self.base) as usize * hd;
        (self.k.add(o), self.v.add(o))
    }
}

/// tanh(u)/u ≈ P(w)/Q(w), w = u², on |u| ≤ 10 (tanh(10) rounds to 1): a
/// rational fit made for this crate (relative-error weighted least squares,
/// iterated on Chebyshev nodes), P(0) = Q(0) = 1. tanh(u) = u·P/Q to 2.2 ulp
/// in float32, with no cancellation however small u is.
const TANH_P: [f32; 7] = [
    1.0,
    0.130_425_51,
    0.003_057_705_2,
    1.067_404_2e-5,
    -1.831_230_3e-8,
    4.385_015e-11,
    -6.289_914e-14,
];
const TANH_Q: [f32; 4] = [1.0, 0.463_758_74, 0.024_310_801, 0.000_247_896_3];

/// cap·tanh(s/cap) and t = tanh(s/cap), accurate to float32 rounding (≈2
/// ulp) for every cap > 0 (`inv` = 1/cap): s·(tanh(u)/u) with u = s/cap,
/// so a huge cap (u tiny or subnormal) gives back s itself; cap·(±1) past
/// |u| = 10. `s` and `cap` share their units (the forward's log2 units, the
/// backward's natural ones). NaN stays NaN, ±inf gives ±cap.
#[inline(always)]
pub(crate) unsafe fn softcap_tanh<S: Simd>(s: S::V, inv: S::V, cap: S::V) -> (S::V, S::V) {
    let u = S::mul(s, inv);
    let lim = S::splat(10.0);
    let uc = S::min(lim, S::max(S::splat(-10.0), u));
    let w = S::mul(uc, uc);
    let r = S::div(S::horner(w, &TANH_P), S::horner(w, &TANH_Q));
    // Past |u| = 10: exactly ±1 (uc·0.1 rounds to ±1).
    let far = S::abs(u);
    let sat = S::mul(uc, S::splat(0.1));
    let t = S::keep_nan(u, S::select_gt(far, lim, sat, S::mul(uc, r)));
    let capped = S::select_gt(far, lim, S::mul(cap, sat), S::mul(s, r));
    (capped, t)
}

/// Per-tile score epilogue: softcap, ALiBi, mask.
struct Epi<S: Simd, const MVC: usize> {
    softcap: bool,
    /// 1 / (softcap·log2 e) and softcap·log2 e (scores are in log2 units).
    inv_cap: S::V,
    c2: S::V,
    alibi: bool,
    /// −slope·log2 e per lane.
    nslope: [S::V; MVC],
    mask: bool,
    /// Allowed distances (i + sk − sq − j) are lo < dist < hi.
    lo: S::V,
    hi: S::V,
    /// dist at the tile's first key, per lane.
    dtile: [S::V; MVC],
}

impl<S: Simd, const MVC: usize> Epi<S, MVC> {
    #[inline(always)]
    unsafe fn apply(&self, acc: S::V, v: usize, jj: usize) -> S::V {
        let mut s = acc;
        if self.softcap {
            s = softcap_tanh::<S>(s, self.inv_cap, self.c2).0;
        }
        if self.alibi || self.mask {
            let dist = S::sub(self.dtile[v], S::splat(jj as f32));
            if self.alibi {
                s = S::fma(S::abs(dist), self.nslope[v], s);
            }
            if self.mask {
                let ninf = S::splat(f32::NEG_INFINITY);
                s = S::select_gt(dist, self.hi, ninf, s);
                s = S::select_gt(self.lo, dist, ninf, s);
            }
        }
        s
    }
}

/// Sᵀ rows jj0 .. jj0+NR of the tile: K rows (broadcast) · Qᵀ (streamed),
/// stored into `st`. Without an epilogue (`EPI` false: a tile inside the mask,
/// no softcap, no ALiBi) the per-lane running max is taken here too.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn qk_rows<S: Simd, const NR: usize, const MVC: usize, const EPI: bool>(
    krows: *const f32,
    kstride: isize,
    jj0: usize,
    qt: *const f32,
    bq: usize,
    hd: usize,
    st: *mut f32,
    tmax: &mut [S::V; MVC],
) {
    // Plain loops, not `std::array::from_fn`: its closures do not always
    // inline into the target-feature function, and an out-of-line closure
    // calls the intrinsics out of line too (perf: `_mm512_mul_ps` as a
    // function, ~4% of C5's kernel time).
    let mut kp = [krows; NR];
    for r in 0..NR {
        kp[r] = krows.offset((jj0 + r) as isize * kstride);
    }
    let mut acc = [[S::zero(); MVC]; NR];
    for d in 0..hd {
        let qrow = qt.add(d * bq);
        let mut q = [S::zero(); MVC];
        for v in 0..MVC {
            q[v] = S::load(qrow.add(v * S::LANES));
        }
        for r in 0..NR {
            let kb = S::splat(*kp[r].add(d));
            for v in 0..MVC {
                acc[r][v] = S::fma(kb, q[v], acc[r][v]);
            }
        }
    }
    for r in 0..NR {
        let srow = st.add((jj0 + r) * bq);
        for v in 0..MVC {
            if !EPI {
                tmax[v] = S::max(tmax[v], acc[r][v]);
            }
            S::store(srow.add(v * S::LANES), acc[r][v]);
        }
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn qk_tile<S: Simd, const NR: usize, const MVC: usize, const EPI: bool>(
    krows: *const f32,
    kstride: isize,
    nj: usize,
    qt: *const f32,
    bq: usize,
    hd: usize,
    st: *mut f32,
    tmax: &mut [S::V; MVC],
) {
    let mut jj = 0;
    while jj + NR <= nj {
        qk_rows::<S, NR, MVC, EPI>(krows, kstride, jj, qt, bq, hd, st, tmax);
        jj += NR;
    }
    if NR > 4 && jj + 4 <= nj {
        qk_rows::<S, 4, MVC, EPI>(krows, kstride, jj, qt, bq, hd, st, tmax);
        jj += 4;
    }
    while jj < nj {
        qk_rows::<S, 1, MVC, EPI>(krows, kstride, jj, qt, bq, hd, st, tmax);
        jj += 1;
    }
}

/// Applies the epilogue to the tile's scores in place, with the running max.
#[inline(always)]
unsafe fn epi_tile<S: Simd, const MVC: usize>(
    st: *mut f32,
    nj: usize,
    bq: usize,
    epi: &Epi<S, MVC>,
    tmax: &mut [S::V; MVC],
) {
    epi_piece::<S, MVC>(st, (0, nj, 0, MVC), bq, epi, tmax);
}

/// The epilogue and running max over keys x..y, row vectors va..vb of an
/// edge tile (one piece).
#[inline(always)]
unsafe fn epi_piece<S: Simd, const MVC: usize>(
    st: *mut f32,
    (x, y, va, vb): (usize, usize, usize, usize),
    bq: usize,
    epi: &Epi<S, MVC>,
    tmax: &mut [S::V; MVC],
) {
    for jj in x..y {
        let row = st.add(jj * bq);
        for v in va..vb {
            let s = epi.apply(S::load(row.add(v * S::LANES)), v, jj);
            tmax[v] = S::max(tmax[v], s);
            S::store(row.add(v * S::LANES), s);
        }
    }
}

/// Pᵀ = 2^(Sᵀ − mu) in place over keys x..y, row vectors va..vb, summed
/// into `lsum`.
#[inline(always)]
unsafe fn exp_rows<S: Simd, const MVC: usize>(
    st: *mut f32,
    bq: usize,
    (x, y, va, vb): (usize, usize, usize, usize),
    mu: &[S::V; MVC],
    lsum: &mut [S::V; MVC],
) {
    for jj in x..y {
        let row = st.add(jj * bq);
        for v in va..vb {
            // Masked scores are −inf: exp2_attn clamps them to −150 (→ 0);
            // NaN stays NaN. Degree 4: 2.7e-6 relative (simd.rs).
            let p = S::exp2_attn(S::sub(S::load(row.add(v * S::LANES)), mu[v]));
            lsum[v] = S::add(lsum[v], p);
            S::store(row.add(v * S::LANES), p);
        }
    }
}

/// Whether any of the `n` floats at `p` is ±inf or NaN (x·0 is NaN exactly then).
#[inline(always)]
unsafe fn any_nonfinite<S: Simd>(p: *const f32, n: usize) -> bool {
    let mut acc = S::zero();
    let zero = S::zero();
    let mut x = 0;
    while x + S::LANES <= n {
        acc = S::fma(S::load(p.add(x)), zero, acc);
        x += S::LANES;
    }
    let mut bad = S::hsum(acc).is_nan();
    while x < n {
        bad |= !(*p.add(x)).is_finite();
        x += 1;
    }
    bad
}

/// Oᵀ rows d0 .. d0+ND: Oᵀ·factor + Σ_j V[j][d] (broadcast) · Pᵀ[j] (streamed).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn pv_rows<S: Simd, const ND: usize, const MVC: usize>(
    vrows: *const f32,
    vstride: isize,
    nj: usize,
    d0: usize,
    pt: *const f32,
    bq: usize,
    ot: *mut f32,
    factor: &[S::V; MVC],
) {
    let mut acc = [[S::zero(); MVC]; ND];
    for r in 0..ND {
        for v in 0..MVC {
            acc[r][v] = S::mul(S::load(ot.add((d0 + r) * bq + v * S::LANES)), factor[v]);
        }
    }
    let mut vp = vrows.add(d0);
    for j in 0..nj {
        let prow = pt.add(j * bq);
        let mut p = [S::zero(); MVC];
        for v in 0..MVC {
            p[v] = S::load(prow.add(v * S::LANES));
        }
        for r in 0..ND {
            let vb = S::splat(*vp.add(r));
            for v in 0..MVC {
                acc[r][v] = S::fma(vb, p[v], acc[r][v]);
            }
        }
        vp = vp.offset(vstride);
    }
    for r in 0..ND {
        for v in 0..MVC {
            S::store(ot.add((d0 + r) * bq + v * S::LANES), acc[r][v]);
        }
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn pv_tile<S: Simd, const ND: usize, const MVC: usize>(
    vrows: *const f32,
    vstride: isize,
    nj: usize,
    hd: usize,
    pt: *const f32,
    bq: usize,
    ot: *mut f32,
    factor: &[S::V; MVC],
) {
    let mut d0 = 0;
    while d0 + ND <= hd {
        pv_rows::<S, ND, MVC>(vrows, vstride, nj, d0, pt, bq, ot, factor);
        d0 += ND;
    }
    if ND > 4 && d0 + 4 <= hd {
        pv_rows::<S, 4, MVC>(vrows, vstride, nj, d0, pt, bq, ot, factor);
        d0 += 4;
    }
    while d0 < hd {
        pv_rows::<S, 1, MVC>(vrows, vstride, nj, d0, pt, bq, ot, factor);
        d0 += 1;
    }
}

/// dst[c][r] = src[r][c] for r < rows, c < cols (row strides `ss`, `ds`), in
/// 8×8 blocks through the Simd trait's transpose where they fit.
#[inline(always)]
unsafe fn transpose<S: Simd>(
    src: *const f32,
    ss: usize,
    dst: *mut f32,
    ds: usize,
    rows: usize,
    cols: usize,
) {
    let (r8, c8) = (rows / 8 * 8, cols / 8 * 8);
    for r in (0..r8).step_by(8) {
        for c in (0..c8).step_by(8) {
            S::transpose8(
                src.add(r * ss + c),
                ss as isize,
                dst.add(c * ds + r),
                ds as isize,
            );
        }
    }
    for r in 0..rows {
        let c_from = if r < r8 { c8 } else { 0 };
        for c in c_from..cols {
            *dst.add(c * ds + r) = *src.add(r * ss + c);
        }
    }
}

/// Prefetches (into L2) the lines of rows row0 .. row0 + n of kv head `h` of
/// a K/V view with unit stride along hd.
#[inline(always)]
fn prefetch_kv_rows(r: &Raw<3>, h: usize, row0: usize, n: usize, hd: usize) {
    #[cfg(target_arch = "x86_64")]
    if r.strides[2] == 1 {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
        let esz = r.dtype.size() as isize;
        let base =
            r.ptr as isize + (row0 as isize * r.strides[0] + h as isize * r.strides[1]) * esz;
        let bytes = hd * esz as usize;
        for j in 0..n as isize {
            let q = (base + j * r.strides[0] * esz) as usize;
            let mut a = q & !63;
            while a < q + bytes {
                // SAFETY: prefetches never fault.
                unsafe { _mm_prefetch::<_MM_HINT_T1>(a as *const i8) };
                a += 64;
            }
        }
    }
}

/// Converts `nj` rows of a segment's K or V for kv head `h`, rows `row0..`,
/// into float32 rows at `dst` (row stride hd): packing also avoids the
/// cache-set conflicts of rows h·hd·4 bytes apart.
#[inline(always)]
unsafe fn pack_rows<S: Simd>(
    r: &Raw<3>,
    h: usize,
    row0: usize,
    nj: usize,
    hd: usize,
    dst: *mut f32,
) {
    let esz = r.dtype.size() as isize;
    let base = r.ptr as isize + (row0 as isize * r.strides[0] + h as isize * r.strides[1]) * esz;
    if r.dtype == DType::F32 && r.strides[2] == 1 {
        // Inline vector copy: a libc memmove call per 256-byte row cost ~15%
        // of C5 (perf, bench/cpu_attn_notes.md).
        let nv = hd / S::LANES * S::LANES;
        for j in 0..nj {
            let src = (base + j as isize * r.strides[0] * esz) as *const f32;
            let d = dst.add(j * hd);
            let mut x = 0;
            while x < nv {
                S::store(d.add(x), S::load(src.add(x)));
                x += S::LANES;
            }
            while x < hd {
                *d.add(x) = *src.add(x);
                x += 1;
            }
        }
        return;
    }
    for j in 0..nj {
        let p = base + j as isize * r.strides[0] * esz;
        let row = std::slice::from_raw_parts_mut(dst.add(j * hd), hd);
        load_row(row, p as usize, r.dtype, r.strides[2]);
    }
}

/// Row-vector subsets of an edge tile (a tile the mask cuts): the tile's keys
/// are split at the points where the set of row vectors that can see a key
/// changes; each piece `(x, y, va, vb)` runs the micro-kernels on keys x..y
/// and vectors va..vb only (the set is contiguous: visible key ranges grow
/// with the row). Keys no lane of a vector can see are never multiplied.
/// Returns the number of pieces written into `out`.
#[allow(clippy::too_many_arguments)]
fn edge_pieces(
    ranges: &[(usize, usize)],
    nj: usize,
    out: &mut [(usize, usize, usize, usize)],
) -> usize {
    let mut cuts = [0usize; 2 * MAX_MVC + 2];
    let mut nc = 0;
    cuts[nc] = 0;
    nc += 1;
    cuts[nc] = nj;
    nc += 1;
    for &(a, b) in ranges {
        if a < b {
            cuts[nc] = a;
            cuts[nc + 1] = b;
            nc += 2;
        }
    }
    let cuts = &mut cuts[..nc];
    cuts.sort_unstable();
    let mut n = 0;
    for w in 0..nc - 1 {
        let (x, y) = (cuts[w], cuts[w + 1]);
        if x >= y {
            continue;
        }
        let mut va = usize::MAX;
        let mut vb = 0;
        for (v, &(a, b)) in ranges.iter().enumerate() {
            if a <= x && y <= b {
                va = va.min(v);
                vb = v + 1;
            }
        }
        if va < vb {
            out[n] = (x, y, va, vb);
            n += 1;
        }
    }
    n
}

/// QK micro-kernel over keys x..y of a tile for row vectors va..va+n (an edge piece).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn qk_piece<S: Simd>(
    kp: *const f32,
    ks: isize,
    (x, y, va, vb): (usize, usize, usize, usize),
    qt: *const f32,
    bq: usize,
    hd: usize,
    st: *mut f32,
) {
    let (k, nj) = (kp.offset(x as isize * ks), y - x);
    let (q, s) = (qt.add(va * S::LANES), st.add(x * bq + va * S::LANES));
    macro_rules! go {
        ($nr:literal, $m:literal) => {{
            let mut tm = [S::zero(); $m];
            qk_tile::<S, $nr, $m, true>(k, ks, nj, q, bq, hd, s, &mut tm)
        }};
    }
    match (S::LANES >= 16, vb - va) {
        (true, 1) => go!(16, 1),
        (true, 2) => go!(12, 2),
        (true, 3) => go!(8, 3),
        (true, _) => go!(6, 4),
        (false, 1) => go!(8, 1),
        (false, 2) => go!(4, 2),
        (false, 3) => go!(2, 3),
        (false, _) => go!(2, 4),
    }
}

/// P·V micro-kernel over keys x..y for row vectors va..vb (Oᵀ already rescaled).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn pv_piece<S: Simd>(
    vp: *const f32,
    vs: isize,
    (x, y, va, vb): (usize, usize, usize, usize),
    hd: usize,
    pt: *const f32,
    bq: usize,
    ot: *mut f32,
) {
    let (v, nj) = (vp.offset(x as isize * vs), y - x);
    let (p, o) = (pt.add(x * bq + va * S::LANES), ot.add(va * S::LANES));
    macro_rules! go {
        ($nd:literal, $m:literal) => {{
            let one = [S::splat(1.0); $m];
            pv_tile::<S, $nd, $m>(v, vs, nj, hd, p, bq, o, &one)
        }};
    }
    match (S::LANES >= 16, vb - va) {
        (true, 1) => go!(16, 1),
        (true, 2) => go!(12, 2),
        (true, 3) => go!(8, 3),
        (true, _) => go!(6, 4),
        (false, 1) => go!(8, 1),
        (false, 2) => go!(4, 2),
        (false, 3) => go!(2, 3),
        (false, _) => go!(2, 4),
    }
}

/// One block of rows r0 .. r0 + nrows of task `t`.
#[inline(always)]
unsafe fn task<S: Simd, const MVC: usize>(t: &Task, r0: usize, nrows: usize, pk: &mut Packer) {
    let job = t.job;
    let seq = t.seq;
    let hd = job.hd;
    let grp = job.hq / job.hk;
    let lanes = S::LANES;
    let bq = MVC * lanes;
    let off = seq.sk as i64 - seq.sq as i64;
    let (left, right) = (job.left, job.right);
    let softcap = job.softcap > 0.0;
    // Scores are kept in the log2 domain: s₂ = s · log2 e (softcap applies
    // to s₂ with a cap of softcap · log2 e: the same function, scaled).
    let c1 = job.scale * LOG2E;
    let cap2 = softcap_log2(job.softcap);

    // Qᵀ, pre-scaled; padding lanes are zero. Rows are read into [bq][hd]
    // and transposed in 8×8 register blocks.
    let mut qt = vec![0.0f32; hd * bq];
    let mut rowbuf = vec![0.0f32; bq * hd];
    let q = &seq.q;
    let qsz = q.dtype.size() as isize;
    let q_at = |r: usize| {
        let (i, h) = (r / grp, t.kvh * grp + r % grp);
        q.ptr as isize + (i as isize * q.strides[0] + h as isize * q.strides[1]) * qsz
    };
    let q_f32 = q.dtype == DType::F32 && q.strides[2] == 1;
    for rl in 0..nrows {
        let p = q_at(r0 + rl);
        let row = &mut rowbuf[rl * hd..(rl + 1) * hd];
        if q_f32 {
            // Inline, scaled vector copy (load_row's copy is a memmove call).
            let (src, dst, c) = (p as *const f32, row.as_mut_ptr(), S::splat(c1));
            let mut x = 0;
            while x + lanes <= hd {
                S::store(dst.add(x), S::mul(S::load(src.add(x)), c));
                x += lanes;
            }
            while x < hd {
                *dst.add(x) = *src.add(x) * c1;
                x += 1;
            }
            continue;
        }
        load_row(row, p as usize, q.dtype, q.strides[2]);
        for x in row.iter_mut() {
            *x *= c1;
        }
    }
    transpose::<S>(rowbuf.as_ptr(), hd, qt.as_mut_ptr(), bq, bq, hd);
    // Per-lane query index (relative to the block's first) and ALiBi slopes.
    let i_min = r0 / grp;
    let i_max = (r0 + nrows - 1) / grp;
    let mut lane_rel = vec![0.0f32; bq];
    let mut lane_slope = vec![0.0f32; bq];
    for rl in 0..bq {
        let r = r0 + rl.min(nrows - 1);
        lane_rel[rl] = (r / grp - i_min) as f32;
        if let Some(sl) = &seq.slopes {
            lane_slope[rl] = -sl[t.kvh * grp + r % grp] * LOG2E;
        }
    }
    let alibi = seq.slopes.is_some();
    let lo = if right >= 0 {
        -(right as f32) - 0.5
    } else {
        f32::NEG_INFINITY
    };
    let hi = if left >= 0 {
        left as f32 + 0.5
    } else {
        f32::INFINITY
    };
    let mut epi = Epi::<S, MVC> {
        softcap,
        inv_cap: S::splat((1.0 / cap2 as f64) as f32),
        c2: S::splat(cap2),
        alibi,
        nslope: [S::zero(); MVC],
        mask: false,
        lo: S::splat(lo),
        hi: S::splat(hi),
        dtile: [S::zero(); MVC],
    };
    for v in 0..MVC {
        epi.nslope[v] = S::load(lane_slope.as_ptr().add(v * lanes));
    }

    // Keys any row of the block can see: [j_lo, j_hi).
    let sk = seq.sk as i64;
    let j_lo = if left >= 0 {
        (i_min as i64 + off - left).max(0)
    } else {
        0
    };
    let j_hi = if right >= 0 {
        (i_max as i64 + off + right + 1).min(sk)
    } else {
        sk
    };
    let (j_lo, j_hi) = (j_lo.max(t.klo), j_hi.min(t.khi));

    let mut ot = vec![0.0f32; hd * bq];
    let mut st = vec![0.0f32; BK * bq];
    let mut kbuf = vec![0.0f32; BK * hd];
    let mut vbuf = vec![0.0f32; BK * hd];
    let mut vclean: Vec<f32> = Vec::new();
    let mut m = [S::splat(f32::NEG_INFINITY); MVC];
    let mut l = [S::zero(); MVC];
    let big = lanes >= 16;

    for (si, seg) in seq.segs.iter().enumerate() {
        let a = j_lo.max(seg.j0 as i64);
        let e = j_hi.min((seg.j0 + seg.len) as i64);
        let mut jt = a;
        while jt < e {
            let nj = (BK as i64).min(e - jt) as usize;
            // Distances i + off − j over the block × tile.
            let dmin = i_min as i64 + off - (jt + nj as i64 - 1);
            let dmax = i_max as i64 + off - jt;
            let empty = (left >= 0 && dmin > left) || (right >= 0 && dmax < -right);
            if empty {
                jt += nj as i64;
                continue;
            }
            epi.mask = !((left < 0 || dmax <= left) && (right < 0 || dmin >= -right));
            if epi.mask || alibi {
                let base = (i_min as i64 + off - jt) as f32;
                for v in 0..MVC {
                    let rel = S::load(lane_rel.as_ptr().add(v * lanes));
                    epi.dtile[v] = S::add(rel, S::splat(base));
                }
            }
            let (kp, vp) = pk.tile::<S>(si, seg, t.kvh, jt, nj, hd, &mut kbuf, &mut vbuf);
            let (ks, vs) = (hd as isize, hd as isize);
            let mut tmax = [S::splat(f32::NEG_INFINITY); MVC];
            let stp = st.as_mut_ptr();
            let qtp = qt.as_ptr();
            let need_epi = epi.mask || alibi || softcap;
            macro_rules! qk {
                ($nr:literal) => {
                    if need_epi {
                        qk_tile::<S, $nr, MVC, true>(kp, ks, nj, qtp, bq, hd, stp, &mut tmax);
                        epi_tile::<S, MVC>(stp, nj, bq, &epi, &mut tmax);
                    } else {
                        qk_tile::<S, $nr, MVC, false>(kp, ks, nj, qtp, bq, hd, stp, &mut tmax);
                    }
                };
            }
            // Register tiles: NR keys × MVC row vectors of accumulators, 16-24
            // of the 32 AVX-512 registers (8 of the 16 AVX2 ones).
            // Edge tile: only the pieces (keys × row vectors) some lane can
            // see are multiplied; the rest of Sᵀ is −inf (the mask's value).
            let mut pieces = [(0usize, 0usize, 0usize, 0usize); 2 * MAX_MVC + 1];
            let mut npieces = 0;
            if epi.mask {
                let mut ranges = [(0usize, 0usize); MVC];
                for (v, rg) in ranges.iter_mut().enumerate() {
                    if v * lanes >= nrows {
                        continue;
                    }
                    let ia = ((r0 + v * lanes) / grp) as i64 + off;
                    let ib = ((r0 + (v * lanes + lanes).min(nrows) - 1) / grp) as i64 + off;
                    let klo = if left >= 0 { ia - left } else { i64::MIN / 2 };
                    let khi = if right >= 0 {
                        ib + right + 1
                    } else {
                        i64::MAX / 2
                    };
                    let a = (klo - jt).clamp(0, nj as i64) as usize;
                    let b = (khi - jt).clamp(0, nj as i64) as usize;
                    *rg = (a, b);
                }
                npieces = edge_pieces(&ranges, nj, &mut pieces);
                // Only the pieces' scores are computed, masked, exponentiated
                // and read by the PV pieces: the rest of Sᵀ is never touched.
                for &pc in &pieces[..npieces] {
                    qk_piece::<S>(kp, ks, pc, qtp, bq, hd, stp);
                    epi_piece::<S, MVC>(stp, pc, bq, &epi, &mut tmax);
                }
            } else {
                match (big, MVC) {
                    (true, 1) => qk!(16),
                    (true, 2) => qk!(12),
                    (true, _) => qk!(6),
                    (false, 1) => qk!(8),
                    (false, 2) => qk!(4),
                    (false, _) => qk!(2),
                }
            }
            // Online softmax update.
            let ninf = S::splat(f32::NEG_INFINITY);
            let mut mu = [S::zero(); MVC];
            let mut factor = [S::zero(); MVC];
            for v in 0..MVC {
                let mn = S::max(m[v], tmax[v]);
                // A row that has seen no visible key yet keeps m = −inf; use 0
                // as its offset so exp2(−inf − 0) = 0 instead of NaN.
                mu[v] = S::select_gt(mn, ninf, mn, S::zero());
                factor[v] = S::exp2(S::sub(m[v], mu[v]));
                m[v] = mn;
            }
            let mut lsum = [S::zero(); MVC];
            if epi.mask {
                for &pc in &pieces[..npieces] {
                    exp_rows::<S, MVC>(stp, bq, pc, &mu, &mut lsum);
                }
            } else {
                exp_rows::<S, MVC>(stp, bq, (0, nj, 0, MVC), &mu, &mut lsum);
            }
            for v in 0..MVC {
                l[v] = S::fma(l[v], factor[v], lsum[v]);
            }
            let (stp, otp) = (st.as_ptr(), ot.as_mut_ptr());
            if epi.mask {
                for d in 0..hd {
                    for v in 0..MVC {
                        let p = otp.add(d * bq + v * lanes);
                        S::store(p, S::mul(S::load(p), factor[v]));
                    }
                }
                // A row's masked keys have P = 0 here, and 0·NaN = NaN: a
                // non-finite V row that some lanes of a piece cannot see must
                // not reach them. Rare: such tiles run on a cleaned copy of V
                // and add the non-finite values to the lanes that see them.
                if any_nonfinite::<S>(vp, nj * hd) {
                    vclean.resize(BK * hd, 0.0);
                    let vc = vclean.as_mut_ptr();
                    for x in 0..nj * hd {
                        let e = *vp.add(x);
                        *vc.add(x) = if e.is_finite() { e } else { 0.0 };
                    }
                    for &pc in &pieces[..npieces] {
                        pv_piece::<S>(vc, vs, pc, hd, stp, bq, otp);
                    }
                    for rl in 0..nrows {
                        let i = ((r0 + rl) / grp) as i64 + off;
                        let ka = if left >= 0 { i - left } else { i64::MIN / 2 };
                        let kb = if right >= 0 { i + right } else { i64::MAX / 2 };
                        let ja = (ka - jt).clamp(0, nj as i64) as usize;
                        let jb = (kb + 1 - jt).clamp(0, nj as i64) as usize;
                        for jj in ja..jb {
                            for d in 0..hd {
                                let e = *vp.add(jj * hd + d);
                                if !e.is_finite() {
                                    *otp.add(d * bq + rl) += e;
                                }
                            }
                        }
                    }
                } else {
                    for &pc in &pieces[..npieces] {
                        pv_piece::<S>(vp, vs, pc, hd, stp, bq, otp);
                    }
                }
                jt += nj as i64;
                continue;
            }
            match (big, MVC) {
                (true, 1) => pv_tile::<S, 16, MVC>(vp, vs, nj, hd, stp, bq, otp, &factor),
                (true, 2) => pv_tile::<S, 12, MVC>(vp, vs, nj, hd, stp, bq, otp, &factor),
                (true, _) => pv_tile::<S, 6, MVC>(vp, vs, nj, hd, stp, bq, otp, &factor),
                (false, 1) => pv_tile::<S, 8, MVC>(vp, vs, nj, hd, stp, bq, otp, &factor),
                (false, 2) => pv_tile::<S, 4, MVC>(vp, vs, nj, hd, stp, bq, otp, &factor),
                (false, _) => pv_tile::<S, 2, MVC>(vp, vs, nj, hd, stp, bq, otp, &factor),
            }
            jt += nj as i64;
        }
    }

    // Normalise and store: out = Oᵀ / l; lse = ln 2 · (m + log2 l).
    let mut mv = vec![0.0f32; bq];
    let mut lv = vec![0.0f32; bq];
    for v in 0..MVC {
        S::store(mv.as_mut_ptr().add(v * lanes), m[v]);
        S::store(lv.as_mut_ptr().add(v * lanes), l[v]);
    }
    // Oᵀ·(1/l) in place (0 for rows that saw no key), transposed back to rows.
    let mut inv = vec![0.0f32; bq];
    for rl in 0..bq {
        inv[rl] = if lv[rl] > 0.0 { 1.0 / lv[rl] } else { 0.0 };
    }
    let mut invv = [S::zero(); MVC];
    for v in 0..MVC {
        invv[v] = S::load(inv.as_ptr().add(v * lanes));
    }
    for d in 0..hd {
        for v in 0..MVC {
            let p = ot.as_mut_ptr().add(d * bq + v * lanes);
            S::store(p, S::mul(S::load(p), invv[v]));
        }
    }
    transpose::<S>(ot.as_ptr(), bq, rowbuf.as_mut_ptr(), hd, hd, bq);
    let stream_out = streams_out::<S>(&seq.out, hd);
    for rl in 0..nrows {
        let lr = lv[rl];
        let lse = if lr > 0.0 {
            (std::f64::consts::LN_2 * (mv[rl] as f64 + (lr as f64).log2())) as f32
        } else {
            f32::NEG_INFINITY
        };
        let row = &rowbuf[rl * hd..(rl + 1) * hd];
        if t.part != 0 {
            // Split-KV parts are single blocks: rows r0.. = t.r0...
            debug_assert!(r0 == t.r0 && nrows == t.nrows);
            let p = t.part as *mut f32;
            std::ptr::copy_nonoverlapping(row.as_ptr(), p.add(rl * hd), hd);
            *p.add(nrows * hd + rl) = lse;
        } else if stream_out {
            // Whole 64-byte lines with non-temporal stores: no read for
            // ownership of the output's lines (rows hk·hd apart, a page
            // each for C5); task_any fences them.
            #[cfg(target_arch = "x86_64")]
            {
                use std::arch::x86_64::{_mm512_loadu_ps, _mm512_stream_ps};
                let r = r0 + rl;
                let (i, h) = (r / grp, t.kvh * grp + r % grp);
                let o = &seq.out;
                let dst = (o.ptr as *mut f32)
                    .offset(i as isize * o.strides[0] + h as isize * o.strides[1]);
                for x in (0..hd).step_by(16) {
                    _mm512_stream_ps(dst.add(x), _mm512_loadu_ps(row.as_ptr().add(x)));
                }
                if let Some(ls) = &seq.lse {
                    let p = ls.ptr as isize
                        + (h as isize * ls.strides[0] + i as isize * ls.strides[1]) * 4;
                    *(p as *mut f32) = lse;
                }
            }
        } else {
            write_row(seq, grp, t.kvh, r0 + rl, row, lse);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    /// Naive float64 attention for one (b = 1) problem: q (sq, hq, hd), k/v (sk, hk, hd).
    #[allow(clippy::too_many_arguments)]
    fn naive(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        sq: usize,
        sk: usize,
        hq: usize,
        hk: usize,
        hd: usize,
        left: i64,
        right: i64,
    ) -> (Vec<f64>, Vec<f64>) {
        let scale = 1.0 / (hd as f64).sqrt();
        let mut out = vec![0.0; sq * hq * hd];
        let mut lse = vec![f64::NEG_INFINITY; hq * sq];
        for h in 0..hq {
            let kh = h / (hq / hk);
            for i in 0..sq {
                let d0 = i as i64 + sk as i64 - sq as i64;
                let vis: Vec<usize> = (0..sk)
                    .filter(|&j| {
                        (left < 0 || j as i64 >= d0 - left) && (right < 0 || j as i64 <= d0 + right)
                    })
                    .collect();
                if vis.is_empty() {
                    continue;
                }
                let s: Vec<f64> = vis
                    .iter()
                    .map(|&j| {
                        (0..hd)
                            .map(|x| {
                                q[(i * hq + h) * hd + x] as f64 * k[(j * hk + kh) * hd + x] as f64
                            })
                            .sum::<f64>()
                            * scale
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let p: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let l: f64 = p.iter().sum();
                for (pj, &j) in p.iter().zip(&vis) {
                    for x in 0..hd {
                        out[(i * hq + h) * hd + x] += pj / l * v[(j * hk + kh) * hd + x] as f64;
                    }
                }
                lse[h * sq + i] = m + l.ln();
            }
        }
        (out, lse)
    }

    #[test]
    fn forward_matches_naive_on_every_level() {
        forward_matches_naive();
    }

    #[inline(always)]
    unsafe fn softcap_worst<S: Simd>(_: ()) {
        // cap·tanh(s/cap) against float64 over caps from 1e-3 to 3e38, |s/cap|
        // from 1e-40 to 30 (both branches, the switch at 1/2 and subnormal u).
        let mut worst = 0.0f64;
        let mut buf = vec![0.0f32; S::LANES];
        let mut tb = vec![0.0f32; S::LANES];
        for &cap in &[1e-3f32, 0.7, 30.0, 1e4, 1e6, 1e30, 3e38] {
            for k in 0..4000 {
                let u = 10f64.powf(-40.0 + 41.5 * k as f64 / 4000.0);
                let s = (u * cap as f64) as f32;
                if !s.is_finite() || s == 0.0 {
                    continue;
                }
                let inv = (1.0 / cap as f64) as f32;
                for sign in [1.0f32, -1.0] {
                    let (c, t) =
                        softcap_tanh::<S>(S::splat(sign * s), S::splat(inv), S::splat(cap));
                    S::store(buf.as_mut_ptr(), c);
                    S::store(tb.as_mut_ptr(), t);
                    let ut = (sign * s) as f64 / cap as f64;
                    let want = cap as f64 * ut.tanh();
                    let e = ((buf[0] as f64 - want) / want).abs();
                    assert!(
                        e < 3.5e-7,
                        "{} cap {cap} s {s}: {} vs {want}",
                        S::NAME,
                        buf[0]
                    );
                    worst = worst.max(e);
                    // t (the backward's 1 − t²) to float32 rounding while u is normal.
                    if ut.abs() > 1e-30 {
                        let e = ((tb[0] as f64 - ut.tanh()) / ut.tanh()).abs();
                        assert!(
                            e < 3.5e-7,
                            "{} cap {cap} s {s}: t {} vs {}",
                            S::NAME,
                            tb[0],
                            ut.tanh()
                        );
                    }
                }
            }
        }
        assert!(worst < 3.5e-7, "{} softcap rel err {worst}", S::NAME);
        let (c, t) = softcap_tanh::<S>(S::splat(f32::NAN), S::splat(0.1), S::splat(10.0));
        S::store(buf.as_mut_ptr(), c);
        S::store(tb.as_mut_ptr(), t);
        assert!(buf[0].is_nan() && tb[0].is_nan());
        let (c, _) = softcap_tanh::<S>(S::splat(f32::NEG_INFINITY), S::splat(0.1), S::splat(10.0));
        S::store(buf.as_mut_ptr(), c);
        assert_eq!(buf[0], -10.0);
    }

    #[test]
    fn softcap_tanh_is_float32_exact_for_any_cap() {
        for level in SimdLevel::available() {
            simd_dispatch!(level, softcap_worst, (), ());
        }
    }

    /// A NaN/inf V at keys a row cannot see (edge tiles: the diagonal, with
    /// lane vectors straddling it) leaves that row bitwise unchanged.
    #[test]
    fn masked_nonfinite_values_do_not_leak() {
        let (sq, sk, hq, hk, hd) = (70usize, 70usize, 2usize, 1usize, 9usize);
        let mut seed = 3u64;
        let gen = |n: usize, seed: &mut u64| (0..n).map(|_| lcg(seed)).collect::<Vec<f32>>();
        let q = gen(sq * hq * hd, &mut seed);
        let k = gen(sk * hk * hd, &mut seed);
        let v = gen(sk * hk * hd, &mut seed);
        let mut vp = v.clone();
        for (j, x) in [
            (5usize, f32::NAN),
            (33, f32::INFINITY),
            (69, f32::NEG_INFINITY),
        ] {
            vp[j * hd + 4] = x;
        }
        for level in SimdLevel::available() {
            let run = |v: &[f32]| {
                let mut out = vec![0.0f32; sq * hq * hd];
                let raw = |p: *const f32, h: usize| Raw::<3> {
                    ptr: p as usize,
                    dtype: DType::F32,
                    strides: [(h * hd) as isize, hd as isize, 1],
                };
                let job = AttnJob {
                    hq,
                    hk,
                    hd,
                    scale: 0.3,
                    left: 40,
                    right: 0,
                    softcap: 0.0,
                    seqs: vec![SeqDesc {
                        q: raw(q.as_ptr(), hq),
                        out: raw(out.as_mut_ptr(), hq),
                        lse: None,
                        sq,
                        sk,
                        segs: vec![KeySeg {
                            j0: 0,
                            len: sk,
                            k: raw(k.as_ptr(), hk),
                            v: raw(v.as_ptr(), hk),
                        }],
                        slopes: None,
                    }],
                };
                attn_forward(&job, level);
                out
            };
            let (a, b) = (run(&v), run(&vp));
            for i in 0..sq {
                let seen = [5usize, 33, 69].iter().any(|&j| j <= i && i <= j + 40);
                for x in 0..hq * hd {
                    let (p, r) = (b[i * hq * hd + x], a[i * hq * hd + x]);
                    if seen && x % hd == 4 {
                        assert!(!p.is_finite(), "{level:?} row {i} must see the poison");
                    } else {
                        assert_eq!(
                            p.to_bits() & 0x7fff_ffff,
                            r.to_bits() & 0x7fff_ffff,
                            "{level:?} row {i} col {x}"
                        );
                    }
                }
            }
        }
    }

    /// The per-tile conversion (runs whose packed K/V would exceed
    /// PACK_MAX_BYTES) against the same reference.
    #[test]
    fn forward_matches_naive_without_run_packing() {
        PACK_MAX_BYTES.store(0, Ordering::Relaxed);
        forward_matches_naive();
        PACK_MAX_BYTES.store(4 << 20, Ordering::Relaxed);
    }

    fn forward_matches_naive() {
        let mut seed = 7u64;
        for &(sq, sk, hq, hk, hd, left, right) in &[
            (600usize, 600usize, 8usize, 2usize, 16usize, 100i64, 0i64),
            (37usize, 37usize, 4usize, 2usize, 16usize, -1i64, 0i64),
            (20, 70, 2, 1, 9, 5, 3),
            (70, 20, 3, 3, 64, -1, 0),
            (1, 130, 8, 2, 32, 100, -1),
        ] {
            let gen = |n: usize, seed: &mut u64| (0..n).map(|_| lcg(seed)).collect::<Vec<f32>>();
            let q = gen(sq * hq * hd, &mut seed);
            let k = gen(sk * hk * hd, &mut seed);
            let v = gen(sk * hk * hd, &mut seed);
            let (ro, rl) = naive(&q, &k, &v, sq, sk, hq, hk, hd, left, right);
            for level in SimdLevel::available() {
                let mut out = vec![f32::NAN; sq * hq * hd];
                let mut lse = vec![f32::NAN; hq * sq];
                let raw = |p: *const f32, h: usize| Raw::<3> {
                    ptr: p as usize,
                    dtype: DType::F32,
                    strides: [(h * hd) as isize, hd as isize, 1],
                };
                let job = AttnJob {
                    hq,
                    hk,
                    hd,
                    scale: 1.0 / (hd as f32).sqrt(),
                    left,
                    right,
                    softcap: 0.0,
                    seqs: vec![SeqDesc {
                        q: raw(q.as_ptr(), hq),
                        out: raw(out.as_mut_ptr(), hq),
                        lse: Some(Raw {
                            ptr: lse.as_mut_ptr() as usize,
                            dtype: DType::F32,
                            strides: [sq as isize, 1],
                        }),
                        sq,
                        sk,
                        segs: vec![KeySeg {
                            j0: 0,
                            len: sk,
                            k: raw(k.as_ptr(), hk),
                            v: raw(v.as_ptr(), hk),
                        }],
                        slopes: None,
                    }],
                };
                attn_forward(&job, level);
                let num: f64 = out
                    .iter()
                    .zip(&ro)
                    .map(|(a, b)| (*a as f64 - b).powi(2))
                    .sum();
                let den: f64 = ro.iter().map(|b| b * b).sum();
                assert!(
                    (num / den).sqrt() < 1e-5,
                    "{level:?} out rel err {}",
                    (num / den).sqrt()
                );
                for (a, b) in lse.iter().zip(&rl) {
                    if b.is_finite() {
                        assert!(
                            (*a as f64 - b).abs() < 1e-4 * b.abs().max(1.0),
                            "{level:?} lse {a} vs {b}"
                        );
                    } else {
                        assert!(*a == f32::NEG_INFINITY, "{level:?} empty row lse {a}");
                    }
                }
            }
        }
    }
}
