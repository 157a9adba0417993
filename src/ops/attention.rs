//! Attention (SPEC §3): `flash_attn_func`, `flash_attn_varlen_func`,
//! `flash_attn_with_kvcache` and the sliding-window ring cache. Argument
//! checking and the plan live here, shared by every backend; `launch` is the
//! single place that picks the backend (CPU now; CUDA raises RuntimeError
//! until its launcher slots in there).

use crate::cpu::attention::{AttnJob, KeySeg, SeqDesc};
use crate::error::{Error, Result};
use crate::tensor::{DType, Device, Raw, TensorView};

/// The backend-independent description of one attention call.
#[derive(Clone, Debug, PartialEq)]
pub struct AttnParams {
    pub b: usize,
    /// Query / key length (the maximum over sequences for varlen and kv cache).
    pub sq: usize,
    pub sk: usize,
    pub hq: usize,
    pub hk: usize,
    pub hd: usize,
    pub scale: f32,
    /// Window sides after causal normalisation (causal ⇒ right = 0); -1 = unbounded.
    pub left: i64,
    pub right: i64,
    pub softcap: f32,
    /// ALiBi slopes given: None, per head (hq,) or per batch entry and head (b, hq).
    pub alibi: Option<AlibiShape>,
    /// Varlen: cumulative sequence offsets (b + 1 each), read on the host for the CPU.
    pub varlen: Option<(Vec<i64>, Vec<i64>)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AlibiShape {
    PerHead,
    PerBatchHead,
}

/// `window_size` and `causal` → (left, right), each ≥ -1.
pub fn normalize_window(causal: bool, window: (i64, i64)) -> Result<(i64, i64)> {
    let (l, r) = window;
    if l < -1 || r < -1 {
        return Err(Error::value(format!(
            "window_size: expected (left, right) with each side ≥ 0, or -1 for unbounded, got ({l}, {r})"
        )));
    }
    Ok((l, if causal { 0 } else { r }))
}

/// Window sides past every key are unbounded: query i of a sequence sees keys
/// down to i + sk − sq − left ≤ 0 once left ≥ sk − 1, and up to sk − 1 once
/// right ≥ sq − 1. So left ≥ sk and right ≥ sq (the largest lengths of the
/// call) become -1, which keeps every bound small enough that index
/// arithmetic on it cannot overflow (a window of 2⁶³ − 1 means "all keys").
pub fn saturate_window((l, r): (i64, i64), sq: usize, sk: usize) -> (i64, i64) {
    let sat = |w: i64, n: usize| if w as u64 >= n as u64 { -1 } else { w };
    (sat(l, sk), sat(r, sq))
}

pub fn check_scale_softcap(scale: Option<f64>, softcap: f64, hd: usize) -> Result<(f32, f32)> {
    let s = match scale {
        None => 1.0 / (hd as f64).sqrt(),
        Some(s) if s.is_finite() => s,
        Some(s) => {
            return Err(Error::value(format!(
                "softmax_scale: expected a finite number or None, got {s}"
            )))
        }
    };
    if !softcap.is_finite() || softcap < 0.0 {
        return Err(Error::value(format!(
            "softcap: expected a finite number ≥ 0 (0 disables it), got {softcap}"
        )));
    }
    // A softcap beyond float32's range caps nothing float32 scores reach.
    Ok((s as f32, softcap.min(f32::MAX as f64) as f32))
}

fn check_main(t: &TensorView, like: Option<&TensorView>) -> Result<()> {
    t.expect_float()?;
    if let Some(q) = like {
        t.expect_same_dtype(q)?;
        t.expect_device(q.device, "q")?;
    }
    Ok(())
}

fn check_heads(q: &TensorView, k: &TensorView, hq: usize, hk: usize) -> Result<()> {
    if hk == 0 || !hq.is_multiple_of(hk) {
        return Err(Error::value(format!(
            "{}: its number of heads hk = {hk} must divide the number of query heads hq = {hq} \
             (q has shape {}, {} has shape {})",
            k.name,
            q.shape_str(),
            k.name,
            k.shape_str()
        )));
    }
    Ok(())
}

/// Checks alibi_slopes: (hq,) or (b, hq), float, on q's device.
pub fn check_alibi(
    a: Option<&TensorView>,
    q: &TensorView,
    b: usize,
    hq: usize,
) -> Result<Option<AlibiShape>> {
    let Some(a) = a else { return Ok(None) };
    a.expect_float()?;
    a.expect_device(q.device, "q")?;
    if a.shape == [hq] {
        Ok(Some(AlibiShape::PerHead))
    } else if a.shape == [b, hq] {
        Ok(Some(AlibiShape::PerBatchHead))
    } else {
        Err(Error::value(format!(
            "alibi_slopes: expected shape (hq,) = ({hq},) or (b, hq) = ({b}, {hq}), got {}",
            a.shape_str()
        )))
    }
}

/// Checks optional destinations `out` (q's shape and dtype) and `softmax_lse` (float32).
pub fn check_dest(
    out: Option<&TensorView>,
    lse: Option<&TensorView>,
    q: &TensorView,
    lse_shape: &[usize],
    lse_desc: &str,
) -> Result<()> {
    if let Some(o) = out {
        o.expect_same_dtype(q)?;
        o.expect_device(q.device, "q")?;
        o.expect_writable()?;
        o.expect_shape(&q.shape, "of q")?;
    }
    if let Some(l) = lse {
        l.expect_dtype(DType::F32)?;
        l.expect_device(q.device, "q")?;
        l.expect_writable()?;
        l.expect_shape(lse_shape, lse_desc)?;
    }
    Ok(())
}

pub struct AttnArgs<'a> {
    pub q: &'a TensorView,
    pub k: &'a TensorView,
    pub v: &'a TensorView,
    pub alibi: Option<&'a TensorView>,
}

/// flash_attn_func: q (b, sq, hq, hd), k/v (b, sk, hk, hd).
pub fn check_attn(
    a: &AttnArgs,
    scale: Option<f64>,
    causal: bool,
    window: (i64, i64),
    softcap: f64,
) -> Result<AttnParams> {
    let (q, k, v) = (a.q, a.k, a.v);
    check_main(q, None)?;
    q.expect_rank(4, "(b, sq, hq, hd)")?;
    q.expect_nonempty()?;
    let (b, sq, hq, hd) = (q.shape[0], q.shape[1], q.shape[2], q.shape[3]);
    check_main(k, Some(q))?;
    k.expect_rank(4, "(b, sk, hk, hd)")?;
    k.expect_nonempty()?;
    let (sk, hk) = (k.shape[1], k.shape[2]);
    if k.shape[0] != b || k.shape[3] != hd {
        return Err(Error::value(format!(
            "k: expected shape (b, sk, hk, hd) with b = {b} and hd = {hd} (from q), got {}",
            k.shape_str()
        )));
    }
    check_heads(q, k, hq, hk)?;
    check_main(v, Some(q))?;
    v.expect_shape(&k.shape, "(b, sk, hk, hd) of k")?;
    let alibi = check_alibi(a.alibi, q, b, hq)?;
    let (left, right) = saturate_window(normalize_window(causal, window)?, sq, sk);
    let (scale, softcap) = check_scale_softcap(scale, softcap, hd)?;
    Ok(AttnParams {
        b,
        sq,
        sk,
        hq,
        hk,
        hd,
        scale,
        left,
        right,
        softcap,
        alibi,
        varlen: None,
    })
}

/// flash_attn_varlen_func: q (total_q, hq, hd), k/v (total_k, hk, hd),
/// cu_seqlens_* (b + 1,) integers. The offsets themselves are read by the
/// backend (`cu_host`), since they may live on a GPU.
pub fn check_varlen(
    a: &AttnArgs,
    cu_q: &TensorView,
    cu_k: &TensorView,
    scale: Option<f64>,
    causal: bool,
    window: (i64, i64),
    softcap: f64,
) -> Result<AttnParams> {
    let (q, k, v) = (a.q, a.k, a.v);
    check_main(q, None)?;
    q.expect_rank(3, "(total_q, hq, hd)")?;
    q.expect_nonempty()?;
    let (hq, hd) = (q.shape[1], q.shape[2]);
    check_main(k, Some(q))?;
    k.expect_rank(3, "(total_k, hk, hd)")?;
    k.expect_nonempty()?;
    let hk = k.shape[1];
    if k.shape[2] != hd {
        return Err(Error::value(format!(
            "k: expected shape (total_k, hk, hd) with hd = {hd} (from q), got {}",
            k.shape_str()
        )));
    }
    check_heads(q, k, hq, hk)?;
    check_main(v, Some(q))?;
    v.expect_shape(&k.shape, "(total_k, hk, hd) of k")?;
    for c in [cu_q, cu_k] {
        if !c.dtype.is_int() {
            return Err(Error::type_(format!(
                "{}: expected an int32 tensor of shape (b + 1,), got dtype {}",
                c.name,
                c.dtype.name()
            )));
        }
        c.expect_device(q.device, "q")?;
        if c.ndim() != 1 || c.shape[0] < 2 {
            return Err(Error::value(format!(
                "{}: expected shape (b + 1,) with b ≥ 1, got {}",
                c.name,
                c.shape_str()
            )));
        }
    }
    if cu_q.shape != cu_k.shape {
        return Err(Error::value(format!(
            "cu_seqlens_k: expected the shape of cu_seqlens_q {}, got {}",
            cu_q.shape_str(),
            cu_k.shape_str()
        )));
    }
    let b = cu_q.shape[0] - 1;
    let alibi = check_alibi(a.alibi, q, b, hq)?;
    // Every sequence is at most total_q × total_k long.
    let (left, right) = saturate_window(normalize_window(causal, window)?, q.shape[0], k.shape[0]);
    let (scale, softcap) = check_scale_softcap(scale, softcap, hd)?;
    Ok(AttnParams {
        b,
        sq: q.shape[0],
        sk: k.shape[0],
        hq,
        hk,
        hd,
        scale,
        left,
        right,
        softcap,
        alibi,
        varlen: None,
    })
}

/// Reads and validates host cu_seqlens against `total` rows and `max_seqlen`.
pub fn cu_host(c: &TensorView, total: usize, max_seqlen: usize) -> Result<Vec<i64>> {
    let v = c.to_i64_vec()?;
    if v[0] < 0 {
        return Err(Error::value(format!(
            "{}: offsets must be ≥ 0, got {} first",
            c.name, v[0]
        )));
    }
    for w in v.windows(2) {
        if w[1] < w[0] {
            return Err(Error::value(format!(
                "{}: offsets must be non-decreasing, got {} then {}",
                c.name, w[0], w[1]
            )));
        }
        if (w[1] - w[0]) as usize > max_seqlen {
            let which = if c.name.ends_with("_q") {
                "max_seqlen_q"
            } else {
                "max_seqlen_k"
            };
            return Err(Error::value(format!(
                "{which}: a sequence of {} tokens in {} exceeds {which} = {max_seqlen}",
                w[1] - w[0],
                c.name
            )));
        }
    }
    let last = *v.last().unwrap_or(&0);
    if last as usize > total {
        return Err(Error::value(format!(
            "{}: the last offset {last} exceeds the {total} rows of the packed tensor",
            c.name
        )));
    }
    Ok(v)
}

/// A rank-4 (b, s, h, d) view at batch `bi`, row `row` as a [s][h][d] view.
pub fn sub3(t: &Raw<4>, bi: usize, row: usize) -> Raw<3> {
    let off = (bi as isize * t.strides[0] + row as isize * t.strides[1]) * t.dtype.size() as isize;
    Raw {
        ptr: (t.ptr as isize + off) as usize,
        dtype: t.dtype,
        strides: [t.strides[1], t.strides[2], t.strides[3]],
    }
}

/// A rank-3 (s, h, d) view at row `row`.
pub fn row3(t: &Raw<3>, row: usize) -> Raw<3> {
    let off = row as isize * t.strides[0] * t.dtype.size() as isize;
    Raw {
        ptr: (t.ptr as isize + off) as usize,
        ..*t
    }
}

/// lse (b, hq, sq) at batch `bi` as [h][i].
pub fn lse_b(t: &Raw<3>, bi: usize) -> Raw<2> {
    Raw {
        ptr: (t.ptr as isize + bi as isize * t.strides[0] * 4) as usize,
        dtype: DType::F32,
        strides: [t.strides[1], t.strides[2]],
    }
}

/// ALiBi slopes of sequence `bi`, as float32 per query head.
pub fn slopes_for(
    a: Option<&TensorView>,
    shape: Option<AlibiShape>,
    bi: usize,
    hq: usize,
) -> Option<Vec<f32>> {
    let a = a?;
    let all = a.to_f32_vec();
    Some(match shape? {
        AlibiShape::PerHead => all,
        AlibiShape::PerBatchHead => all[bi * hq..(bi + 1) * hq].to_vec(),
    })
}

fn job_of(p: &AttnParams, seqs: Vec<SeqDesc>) -> AttnJob {
    AttnJob {
        hq: p.hq,
        hk: p.hk,
        hd: p.hd,
        scale: p.scale,
        left: p.left,
        right: p.right,
        softcap: p.softcap,
        seqs,
    }
}

/// The CPU job of flash_attn_func.
pub fn plan_attn(
    p: &AttnParams,
    a: &AttnArgs,
    out: &TensorView,
    lse: Option<&TensorView>,
) -> AttnJob {
    let (q, k, v, o) = (
        a.q.raw::<4>(),
        a.k.raw::<4>(),
        a.v.raw::<4>(),
        out.raw::<4>(),
    );
    let seqs = (0..p.b)
        .map(|bi| SeqDesc {
            q: sub3(&q, bi, 0),
            out: sub3(&o, bi, 0),
            lse: lse.map(|l| lse_b(&l.raw::<3>(), bi)),
            sq: p.sq,
            sk: p.sk,
            segs: vec![KeySeg {
                j0: 0,
                len: p.sk,
                k: sub3(&k, bi, 0),
                v: sub3(&v, bi, 0),
            }],
            slopes: slopes_for(a.alibi, p.alibi, bi, p.hq),
        })
        .collect();
    job_of(p, seqs)
}

/// The CPU job of flash_attn_varlen_func (lse is (hq, total_q)).
pub fn plan_varlen(
    p: &AttnParams,
    a: &AttnArgs,
    cu_q: &[i64],
    cu_k: &[i64],
    out: &TensorView,
    lse: Option<&TensorView>,
) -> AttnJob {
    let (q, k, v, o) = (
        a.q.raw::<3>(),
        a.k.raw::<3>(),
        a.v.raw::<3>(),
        out.raw::<3>(),
    );
    let seqs = (0..p.b)
        .map(|bi| {
            let (q0, k0) = (cu_q[bi] as usize, cu_k[bi] as usize);
            let (sq, sk) = (
                (cu_q[bi + 1] - cu_q[bi]) as usize,
                (cu_k[bi + 1] - cu_k[bi]) as usize,
            );
            SeqDesc {
                q: row3(&q, q0),
                out: row3(&o, q0),
                lse: lse.map(|l| {
                    let r = l.raw::<2>();
                    Raw {
                        ptr: (r.ptr as isize + q0 as isize * r.strides[1] * 4) as usize,
                        ..r
                    }
                }),
                sq,
                sk,
                segs: vec![KeySeg {
                    j0: 0,
                    len: sk,
                    k: row3(&k, k0),
                    v: row3(&v, k0),
                }],
                slopes: slopes_for(a.alibi, p.alibi, bi, p.hq),
            }
        })
        .collect();
    job_of(p, seqs)
}

pub struct KvCacheArgs<'a> {
    pub q: &'a TensorView,
    pub k_cache: &'a TensorView,
    pub v_cache: &'a TensorView,
    pub k: Option<&'a TensorView>,
    pub v: Option<&'a TensorView>,
    pub alibi: Option<&'a TensorView>,
}

/// flash_attn_with_kvcache: q (b, sq, hq, hd), caches (b, s_cache, hk, hd),
/// new k/v (b, s_new, hk, hd). Returns the params (sk = s_cache) and s_new.
pub fn check_kvcache(
    a: &KvCacheArgs,
    scale: Option<f64>,
    causal: bool,
    window: (i64, i64),
    softcap: f64,
) -> Result<(AttnParams, usize)> {
    let q = a.q;
    check_main(q, None)?;
    q.expect_rank(4, "(b, sq, hq, hd)")?;
    q.expect_nonempty()?;
    let (b, sq, hq, hd) = (q.shape[0], q.shape[1], q.shape[2], q.shape[3]);
    let kc = a.k_cache;
    check_main(kc, Some(q))?;
    kc.expect_rank(4, "(b, s_cache, hk, hd)")?;
    kc.expect_nonempty()?;
    let (sc, hk) = (kc.shape[1], kc.shape[2]);
    if kc.shape[0] != b || kc.shape[3] != hd {
        return Err(Error::value(format!(
            "k_cache: expected shape (b, s_cache, hk, hd) with b = {b} and hd = {hd} (from q), got {}",
            kc.shape_str()
        )));
    }
    check_heads(q, kc, hq, hk)?;
    check_main(a.v_cache, Some(q))?;
    a.v_cache
        .expect_shape(&kc.shape, "(b, s_cache, hk, hd) of k_cache")?;
    let mut snew = 0;
    match (a.k, a.v) {
        (None, None) => {}
        (Some(k), Some(v)) => {
            check_main(k, Some(q))?;
            k.expect_rank(4, "(b, s_new, hk, hd)")?;
            k.expect_nonempty()?;
            snew = k.shape[1];
            k.expect_shape(&[b, snew, hk, hd], "(b, s_new, hk, hd)")?;
            check_main(v, Some(q))?;
            v.expect_shape(&k.shape, "(b, s_new, hk, hd) of k")?;
            kc.expect_writable()?;
            a.v_cache.expect_writable()?;
        }
        (Some(_), None) => {
            return Err(Error::value(
                "v: expected a tensor when k is given, got None",
            ))
        }
        (None, Some(_)) => {
            return Err(Error::value(
                "k: expected a tensor when v is given, got None",
            ))
        }
    }
    let alibi = check_alibi(a.alibi, q, b, hq)?;
    // Each batch entry attends over at most s_cache keys.
    let (left, right) = saturate_window(normalize_window(causal, window)?, sq, sc);
    let (scale, softcap) = check_scale_softcap(scale, softcap, hd)?;
    Ok((
        AttnParams {
            b,
            sq,
            sk: sc,
            hq,
            hk,
            hd,
            scale,
            left,
            right,
            softcap,
            alibi,
            varlen: None,
        },
        snew,
    ))
}

/// Validates host cache_seqlens (None: the whole cache is valid and nothing is
/// appended) against the cache length; returns the per-batch fill before the append.
pub fn cache_lens(
    seqlens: Option<Vec<i64>>,
    b: usize,
    s_cache: usize,
    snew: usize,
) -> Result<Vec<usize>> {
    let Some(v) = seqlens else {
        if snew > 0 {
            return Err(Error::value(
                "cache_seqlens: expected an int or a (b,) int32 tensor when k and v are appended, got None",
            ));
        }
        return Ok(vec![s_cache; b]);
    };
    if v.len() != b {
        return Err(Error::value(format!(
            "cache_seqlens: expected shape (b,) = ({b},), got {} values",
            v.len()
        )));
    }
    v.iter()
        .map(|&n| {
            if n < 0 || n as usize + snew > s_cache {
                // i64::MAX stands for any larger value (saturated on input).
                let shown = if n == i64::MAX {
                    format!("{n} (or more)")
                } else {
                    n.to_string()
                };
                Err(Error::value(format!(
                    "cache_seqlens: {shown} + {snew} new tokens must lie in [0, s_cache = {s_cache}]"
                )))
            } else {
                Ok(n as usize)
            }
        })
        .collect()
}

/// Copies `src` (b, s_new, h, d) into `dst` (b, s_cache, h, d) at rows
/// lens[b].., byte for byte (same dtype).
pub fn append_rows(src: &Raw<4>, dst: &Raw<4>, shape: [usize; 4], lens: &[usize]) {
    let [b, sn, h, d] = shape;
    let es = src.dtype.size() as isize;
    for (bi, &len) in lens.iter().enumerate().take(b) {
        for t in 0..sn {
            for hh in 0..h {
                for dd in 0..d {
                    let s = src.ptr as isize
                        + (bi as isize * src.strides[0]
                            + t as isize * src.strides[1]
                            + hh as isize * src.strides[2]
                            + dd as isize * src.strides[3])
                            * es;
                    let o = dst.ptr as isize
                        + (bi as isize * dst.strides[0]
                            + (len + t) as isize * dst.strides[1]
                            + hh as isize * dst.strides[2]
                            + dd as isize * dst.strides[3])
                            * es;
                    unsafe {
                        std::ptr::copy_nonoverlapping(s as *const u8, o as *mut u8, es as usize);
                    }
                }
            }
        }
    }
}

/// The CPU job of flash_attn_with_kvcache, after the append: sequence b sees
/// keys 0 .. lens[b] + s_new of the cache.
pub fn plan_kvcache(
    p: &AttnParams,
    a: &KvCacheArgs,
    lens: &[usize],
    snew: usize,
    out: &TensorView,
    lse: Option<&TensorView>,
) -> AttnJob {
    let (q, k, v, o) = (
        a.q.raw::<4>(),
        a.k_cache.raw::<4>(),
        a.v_cache.raw::<4>(),
        out.raw::<4>(),
    );
    let seqs = (0..p.b)
        .map(|bi| {
            let sk = lens[bi] + snew;
            SeqDesc {
                q: sub3(&q, bi, 0),
                out: sub3(&o, bi, 0),
                lse: lse.map(|l| lse_b(&l.raw::<3>(), bi)),
                sq: p.sq,
                sk,
                segs: vec![KeySeg {
                    j0: 0,
                    len: sk,
                    k: sub3(&k, bi, 0),
                    v: sub3(&v, bi, 0),
                }],
                slopes: slopes_for(a.alibi, p.alibi, bi, p.hq),
            }
        })
        .collect();
    job_of(p, seqs)
}

pub struct RingArgs<'a> {
    pub q: &'a TensorView,
    pub k_ring: &'a TensorView,
    pub v_ring: &'a TensorView,
    pub k: &'a TensorView,
    pub v: &'a TensorView,
    pub alibi: Option<&'a TensorView>,
}

/// Sliding-window ring cache step: q (b, n, hq, hd), rings (b, W, hk, hd),
/// new k/v (b, n, hk, hd). The params describe the logical problem at `pos`:
/// sq = n, sk = pos + n, causal window (W − 1, 0).
pub fn check_ring(a: &RingArgs, pos: i64, scale: Option<f64>, softcap: f64) -> Result<AttnParams> {
    let q = a.q;
    check_main(q, None)?;
    q.expect_rank(4, "(b, n, hq, hd)")?;
    q.expect_nonempty()?;
    let (b, n, hq, hd) = (q.shape[0], q.shape[1], q.shape[2], q.shape[3]);
    let kr = a.k_ring;
    check_main(kr, Some(q))?;
    kr.expect_rank(4, "(b, window, hk, hd)")?;
    kr.expect_nonempty()?;
    let (w, hk) = (kr.shape[1], kr.shape[2]);
    if kr.shape[0] != b || kr.shape[3] != hd {
        return Err(Error::value(format!(
            "k_ring: expected shape (b, window, hk, hd) with b = {b} and hd = {hd} (from q), got {}",
            kr.shape_str()
        )));
    }
    check_heads(q, kr, hq, hk)?;
    kr.expect_writable()?;
    check_main(a.v_ring, Some(q))?;
    a.v_ring
        .expect_shape(&kr.shape, "(b, window, hk, hd) of k_ring")?;
    a.v_ring.expect_writable()?;
    check_main(a.k, Some(q))?;
    a.k.expect_shape(&[b, n, hk, hd], "(b, n, hk, hd)")?;
    check_main(a.v, Some(q))?;
    a.v.expect_shape(&[b, n, hk, hd], "(b, n, hk, hd)")?;
    if pos < 0 {
        return Err(Error::value(format!("pos: expected an int ≥ 0, got {pos}")));
    }
    let alibi = check_alibi(a.alibi, q, b, hq)?;
    let (scale, softcap) = check_scale_softcap(scale, softcap, hd)?;
    Ok(AttnParams {
        b,
        sq: n,
        // Only distances and slots (position mod W) matter: the problem is
        // posed at pos_r = ring_pos(pos, W) ≡ pos, so pos near 2⁶³ cannot overflow.
        sk: ring_pos(pos as u64, w) + n,
        hq,
        hk,
        hd,
        scale,
        left: w as i64 - 1,
        right: 0,
        softcap,
        alibi,
        varlen: None,
    })
}

/// The ring position equivalent to `pos` for a window of `w`: pos itself
/// below w (some slots unwritten), else w + pos mod w (every slot holds a
/// position, and slot j mod w is unchanged).
pub fn ring_pos(pos: u64, w: usize) -> usize {
    if pos < w as u64 {
        pos as usize
    } else {
        w + (pos % w as u64) as usize
    }
}

/// The CPU job of a ring step: logical key j is token position j; positions
/// max(0, pos − W) .. pos live in the ring at slot j mod W (at most two runs),
/// positions pos .. pos + n are the new k/v.
pub fn plan_ring(
    p: &AttnParams,
    a: &RingArgs,
    out: &TensorView,
    lse: Option<&TensorView>,
) -> AttnJob {
    let w = a.k_ring.shape[1];
    let n = p.sq;
    let pos = p.sk - n;
    let (q, kr, vr, k, v, o) = (
        a.q.raw::<4>(),
        a.k_ring.raw::<4>(),
        a.v_ring.raw::<4>(),
        a.k.raw::<4>(),
        a.v.raw::<4>(),
        out.raw::<4>(),
    );
    let seqs = (0..p.b)
        .map(|bi| {
            let mut segs = Vec::with_capacity(3);
            let mut j = pos.saturating_sub(w);
            while j < pos {
                let slot = j % w;
                let len = (w - slot).min(pos - j);
                segs.push(KeySeg {
                    j0: j,
                    len,
                    k: sub3(&kr, bi, slot),
                    v: sub3(&vr, bi, slot),
                });
                j += len;
            }
            segs.push(KeySeg {
                j0: pos,
                len: n,
                k: sub3(&k, bi, 0),
                v: sub3(&v, bi, 0),
            });
            SeqDesc {
                q: sub3(&q, bi, 0),
                out: sub3(&o, bi, 0),
                lse: lse.map(|l| lse_b(&l.raw::<3>(), bi)),
                sq: n,
                sk: p.sk,
                segs,
                slopes: slopes_for(a.alibi, p.alibi, bi, p.hq),
            }
        })
        .collect();
    job_of(p, seqs)
}

/// Writes the new tokens into the ring: token t goes to slot (pos + t) mod W
/// (in order, so with n > W the last W tokens remain).
pub fn ring_write(src: &Raw<4>, ring: &Raw<4>, shape: [usize; 4], w: usize, pos: usize) {
    let [b, n, h, d] = shape;
    let first = n.saturating_sub(w);
    let es = src.dtype.size() as isize;
    for bi in 0..b {
        for t in first..n {
            let slot = (pos + t) % w;
            for hh in 0..h {
                for dd in 0..d {
                    let s = src.ptr as isize
                        + (bi as isize * src.strides[0]
                            + t as isize * src.strides[1]
                            + hh as isize * src.strides[2]
                            + dd as isize * src.strides[3])
                            * es;
                    let o = ring.ptr as isize
                        + (bi as isize * ring.strides[0]
                            + slot as isize * ring.strides[1]
                            + hh as isize * ring.strides[2]
                            + dd as isize * ring.strides[3])
                            * es;
                    unsafe {
                        std::ptr::copy_nonoverlapping(s as *const u8, o as *mut u8, es as usize)
                    };
                }
            }
        }
    }
}

/// Gradient destinations and inputs of the backward, per call.
pub struct BwdViews<'a> {
    pub dout: &'a TensorView,
    pub out: &'a TensorView,
    pub lse: &'a TensorView,
    pub dlse: Option<&'a TensorView>,
    pub dq: &'a TensorView,
    pub dk: &'a TensorView,
    pub dv: &'a TensorView,
}

/// Checks the backward's extra inputs: dout and out with q's shape and dtype,
/// lse (and dlse) float32 of `lse_shape`.
pub fn check_bwd_inputs(
    q: &TensorView,
    dout: &TensorView,
    out: &TensorView,
    lse: &TensorView,
    dlse: Option<&TensorView>,
    lse_shape: &[usize],
    lse_desc: &str,
) -> Result<()> {
    for t in [dout, out] {
        t.expect_float()?;
        t.expect_same_dtype(q)?;
        t.expect_device(q.device, "q")?;
        t.expect_shape(&q.shape, "of q")?;
    }
    for t in std::iter::once(lse).chain(dlse) {
        t.expect_dtype(DType::F32)?;
        t.expect_device(q.device, "q")?;
        t.expect_shape(lse_shape, lse_desc)?;
    }
    Ok(())
}

/// Wraps a forward job's sequences into the backward's (batched layout).
pub fn plan_attn_bwd(
    p: &AttnParams,
    a: &AttnArgs,
    b: &BwdViews,
) -> crate::cpu::attention_bwd::AttnBwdJob {
    let fwd = plan_attn(p, a, b.out, Some(b.lse));
    let (d, dq, dk, dv) = (
        b.dout.raw::<4>(),
        b.dq.raw::<4>(),
        b.dk.raw::<4>(),
        b.dv.raw::<4>(),
    );
    let dl = b.dlse.map(|t| t.raw::<3>());
    let seqs = fwd
        .seqs
        .into_iter()
        .enumerate()
        .map(|(bi, f)| crate::cpu::attention_bwd::BwdSeq {
            fwd: f,
            dout: sub3(&d, bi, 0),
            dlse: dl.as_ref().map(|l| lse_b(l, bi)),
            dq: sub3(&dq, bi, 0),
            dk: sub3(&dk, bi, 0),
            dv: sub3(&dv, bi, 0),
        })
        .collect();
    bwd_job_of(p, seqs)
}

fn bwd_job_of(
    p: &AttnParams,
    seqs: Vec<crate::cpu::attention_bwd::BwdSeq>,
) -> crate::cpu::attention_bwd::AttnBwdJob {
    crate::cpu::attention_bwd::AttnBwdJob {
        hq: p.hq,
        hk: p.hk,
        hd: p.hd,
        scale: p.scale,
        left: p.left,
        right: p.right,
        softcap: p.softcap,
        seqs,
    }
}

/// The backward's job for varlen (lse, dlse (hq, total_q)).
pub fn plan_varlen_bwd(
    p: &AttnParams,
    a: &AttnArgs,
    cu_q: &[i64],
    cu_k: &[i64],
    b: &BwdViews,
) -> crate::cpu::attention_bwd::AttnBwdJob {
    let fwd = plan_varlen(p, a, cu_q, cu_k, b.out, Some(b.lse));
    let (d, dq, dk, dv) = (
        b.dout.raw::<3>(),
        b.dq.raw::<3>(),
        b.dk.raw::<3>(),
        b.dv.raw::<3>(),
    );
    let dl = b.dlse.map(|t| t.raw::<2>());
    let seqs = fwd
        .seqs
        .into_iter()
        .enumerate()
        .map(|(bi, f)| {
            let (q0, k0) = (cu_q[bi] as usize, cu_k[bi] as usize);
            crate::cpu::attention_bwd::BwdSeq {
                fwd: f,
                dout: row3(&d, q0),
                dlse: dl.map(|r| Raw {
                    ptr: (r.ptr as isize + q0 as isize * r.strides[1] * 4) as usize,
                    ..r
                }),
                dq: row3(&dq, q0),
                dk: row3(&dk, k0),
                dv: row3(&dv, k0),
            }
        })
        .collect();
    bwd_job_of(p, seqs)
}

/// The one backend switch: CPU runs `cpu`, CUDA is not implemented yet.
pub fn launch<T>(op: &str, device: Device, cpu: impl FnOnce() -> Result<T>) -> Result<T> {
    match device {
        Device::Cpu => cpu(),
        Device::Cuda(_) => Err(Error::runtime(format!(
            "{op}: q is on {device}: this attention function has no CUDA kernel yet (flash_attn_func and flash_attn_varlen_func do; the kv-cache and ring functions are CPU only)"
        ))),
    }
}

#[cfg(feature = "python")]
pub use py::register;

#[cfg(feature = "python")]
mod py {
    use super::*;
    use crate::args::{self, Given};
    use crate::cpu::attention::attn_forward;
    use crate::cpu::SimdLevel;
    use crate::error::catch_panic;
    use crate::ops::attention_args::{int_arg, options, parse_fwd, parse_ring, parse_varlen, Opts};
    use crate::tensor::{alloc, check_writes, extract, extract_opt};
    use pyo3::prelude::*;
    use pyo3::types::PyTuple;

    fn run_job(op: &'static str, job: &crate::cpu::attention::AttnJob) -> Result<()> {
        let level = SimdLevel::current()?;
        catch_panic(op, || {
            attn_forward(job, level);
            Ok(())
        })
    }

    fn dest<'py>(
        name: &'static str,
        given: Option<&Bound<'py, PyAny>>,
        like_obj: &Bound<'py, PyAny>,
        like: &TensorView,
        shape: &[usize],
        dtype: Option<DType>,
    ) -> Result<(Bound<'py, PyAny>, TensorView)> {
        match given {
            Some(o) if !o.is_none() => Ok((o.clone(), extract(name, o)?)),
            _ => alloc(name, like_obj, like, shape, dtype),
        }
    }

    /// flash_attn_func's forward: returns (out, softmax_lse (b, hq, sq) float32).
    /// `out` / `softmax_lse` may be given to write into (destination passing).
    /// `deterministic` and `return_attn_probs` are flash_attn_func's flags,
    /// checked here (the CPU kernel is always deterministic; the caller
    /// decides what to return).
    #[pyfunction]
    #[pyo3(signature = (q, k, v, softmax_scale=None, causal=Given(None), window_size=None, softcap=None, alibi_slopes=None, out=None, softmax_lse=None, deterministic=Given(None), return_attn_probs=Given(None)))]
    #[allow(clippy::too_many_arguments)]
    fn attention_fwd<'py>(
        py: Python<'py>,
        q: &Bound<'py, PyAny>,
        k: &Bound<'py, PyAny>,
        v: &Bound<'py, PyAny>,
        softmax_scale: Option<&Bound<'py, PyAny>>,
        causal: Given<'py>,
        window_size: Option<&Bound<'py, PyAny>>,
        softcap: Option<&Bound<'py, PyAny>>,
        alibi_slopes: Option<&Bound<'py, PyAny>>,
        out: Option<&Bound<'py, PyAny>>,
        softmax_lse: Option<&Bound<'py, PyAny>>,
        deterministic: Given<'py>,
        return_attn_probs: Given<'py>,
    ) -> PyResult<Bound<'py, PyTuple>> {
        let f = parse_fwd(
            q,
            k,
            v,
            softmax_scale,
            &causal,
            window_size,
            softcap,
            alibi_slopes,
            &deterministic,
            &return_attn_probs,
        )?;
        let (args, p, qv) = (f.args(), &f.p, &f.q);
        let ov = extract_opt("out", out)?;
        let lv = extract_opt("softmax_lse", softmax_lse)?;
        check_dest(
            ov.as_ref(),
            lv.as_ref(),
            qv,
            &[p.b, p.hq, p.sq],
            "(b, hq, sq)",
        )?;
        let written: Vec<&TensorView> = ov.iter().chain(lv.iter()).collect();
        let read: Vec<&TensorView> = [&f.q, &f.k, &f.v].into_iter().chain(&f.alibi).collect();
        check_writes(&written, &read)?;
        launch("flash_attn_func", qv.device, || {
            let (oo, o) = dest("out", out, q, qv, &qv.shape, None)?;
            let (lo, l) = dest(
                "softmax_lse",
                softmax_lse,
                q,
                qv,
                &[p.b, p.hq, p.sq],
                Some(DType::F32),
            )?;
            let job = plan_attn(p, &args, &o, Some(&l));
            py.detach(|| run_job("flash_attn_func", &job))?;
            Ok([oo, lo])
        })
        .map_err(PyErr::from)
        .and_then(|r| PyTuple::new(py, r))
    }

    /// flash_attn_varlen_func's forward: returns (out (total_q, hq, hd),
    /// softmax_lse (hq, total_q) float32). Flags as `attention_fwd`.
    #[pyfunction]
    #[pyo3(signature = (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale=None, causal=Given(None), window_size=None, softcap=None, alibi_slopes=None, out=None, softmax_lse=None, deterministic=Given(None), return_attn_probs=Given(None)))]
    #[allow(clippy::too_many_arguments)]
    fn attention_varlen_fwd<'py>(
        py: Python<'py>,
        q: &Bound<'py, PyAny>,
        k: &Bound<'py, PyAny>,
        v: &Bound<'py, PyAny>,
        cu_seqlens_q: &Bound<'py, PyAny>,
        cu_seqlens_k: &Bound<'py, PyAny>,
        max_seqlen_q: &Bound<'py, PyAny>,
        max_seqlen_k: &Bound<'py, PyAny>,
        softmax_scale: Option<&Bound<'py, PyAny>>,
        causal: Given<'py>,
        window_size: Option<&Bound<'py, PyAny>>,
        softcap: Option<&Bound<'py, PyAny>>,
        alibi_slopes: Option<&Bound<'py, PyAny>>,
        out: Option<&Bound<'py, PyAny>>,
        softmax_lse: Option<&Bound<'py, PyAny>>,
        deterministic: Given<'py>,
        return_attn_probs: Given<'py>,
    ) -> PyResult<Bound<'py, PyTuple>> {
        let f = parse_varlen(
            q,
            k,
            v,
            cu_seqlens_q,
            cu_seqlens_k,
            max_seqlen_q,
            max_seqlen_k,
            softmax_scale,
            &causal,
            window_size,
            softcap,
            alibi_slopes,
            &deterministic,
            &return_attn_probs,
        )?;
        let (args, p, qv) = (f.args(), &f.p, &f.q);
        let ov = extract_opt("out", out)?;
        let lv = extract_opt("softmax_lse", softmax_lse)?;
        check_dest(ov.as_ref(), lv.as_ref(), qv, &[p.hq, p.sq], "(hq, total_q)")?;
        let written: Vec<&TensorView> = ov.iter().chain(lv.iter()).collect();
        let read: Vec<&TensorView> = [&f.q, &f.k, &f.v, &f.cu_q, &f.cu_k]
            .into_iter()
            .chain(&f.alibi)
            .collect();
        check_writes(&written, &read)?;
        let (mq, mk) = (f.max_q as usize, f.max_k as usize);
        launch("flash_attn_varlen_func", qv.device, || {
            let cu_q = cu_host(&f.cu_q, p.sq, mq)?;
            let cu_k = cu_host(&f.cu_k, p.sk, mk)?;
            let p = AttnParams {
                varlen: Some((cu_q.clone(), cu_k.clone())),
                ..p.clone()
            };
            let (oo, o) = dest("out", out, q, qv, &qv.shape, None)?;
            let (lo, l) = dest(
                "softmax_lse",
                softmax_lse,
                q,
                qv,
                &[p.hq, p.sq],
                Some(DType::F32),
            )?;
            // Rows of q beyond the last sequence are not attended: zero them.
            let last = *cu_q.last().unwrap_or(&0) as usize;
            let first = cu_q[0] as usize;
            let job = plan_varlen(&p, &args, &cu_q, &cu_k, &o, Some(&l));
            py.detach(|| {
                zero_tail(&o, &l, 0, first);
                zero_tail(&o, &l, last, o.shape[0]);
                run_job("flash_attn_varlen_func", &job)
            })?;
            Ok([oo, lo])
        })
        .map_err(PyErr::from)
        .and_then(|r| PyTuple::new(py, r))
    }

    /// Zeroes rows `from..to` of a varlen out (total, h, d) and sets their lse (h, total) to -inf.
    fn zero_tail(o: &TensorView, l: &TensorView, from: usize, to: usize) {
        let (h, d) = (o.shape[1], o.shape[2]);
        let zeros = vec![0.0f32; d];
        let (or, lr) = (o.raw::<3>(), l.raw::<2>());
        for t in from..to {
            for hh in 0..h {
                let p = crate::tensor::addr(&or, [t, hh, 0]);
                unsafe { crate::tensor::store_row(&zeros, p, or.dtype, or.strides[2]) };
                let p = crate::tensor::addr(&lr, [hh, t]);
                unsafe { *(p as *mut f32) = f32::NEG_INFINITY };
            }
        }
    }

    /// cache_seqlens: None, a Python int, or a (b,) integer tensor.
    fn seqlens_arg(
        c: Option<&Bound<'_, PyAny>>,
        b: usize,
        device: Device,
    ) -> Result<Option<Vec<i64>>> {
        let Some(c) = c else { return Ok(None) };
        if c.is_none() {
            return Ok(None);
        }
        // Only a Python int broadcasts: a (1,) or 0-d tensor also converts
        // to an int, but must have shape (b,) like any tensor.
        if c.is_instance_of::<pyo3::types::PyInt>() && !c.is_instance_of::<pyo3::types::PyBool>() {
            // Beyond int64 is beyond any cache: saturate (cache_lens rejects it).
            let n = c.extract::<i64>().unwrap_or(if c.gt(0).unwrap_or(false) {
                i64::MAX
            } else {
                i64::MIN
            });
            return Ok(Some(vec![n; b]));
        }
        let t = extract("cache_seqlens", c)?;
        t.expect_device(device, "q")?;
        if !t.dtype.is_int() {
            return Err(Error::type_(format!(
                "cache_seqlens: expected an int or a (b,) int32 tensor, got dtype {}",
                t.dtype.name()
            )));
        }
        t.expect_shape(&[b], "(b,)")?;
        if device != Device::Cpu {
            return Ok(None);
        }
        let mut v = t.to_i64_vec()?;
        if t.dtype == DType::U64 {
            // uint64 ≥ 2⁶³ reads back negative: saturate instead of wrapping.
            for n in v.iter_mut().filter(|n| **n < 0) {
                *n = i64::MAX;
            }
        }
        Ok(Some(v))
    }

    /// flash_attn_with_kvcache: appends k/v (if given) into the caches in place
    /// at cache_seqlens, then attends over cache[:, :cache_seqlens + s_new].
    /// Returns (out, softmax_lse (b, hq, sq) float32).
    #[pyfunction]
    #[pyo3(signature = (q, k_cache, v_cache, k=None, v=None, cache_seqlens=None, softmax_scale=None, causal=Given(None), window_size=None, softcap=None, alibi_slopes=None, return_softmax_lse=Given(None)))]
    #[allow(clippy::too_many_arguments)]
    fn attention_kvcache<'py>(
        py: Python<'py>,
        q: &Bound<'py, PyAny>,
        k_cache: &Bound<'py, PyAny>,
        v_cache: &Bound<'py, PyAny>,
        k: Option<&Bound<'py, PyAny>>,
        v: Option<&Bound<'py, PyAny>>,
        cache_seqlens: Option<&Bound<'py, PyAny>>,
        softmax_scale: Option<&Bound<'py, PyAny>>,
        causal: Given<'py>,
        window_size: Option<&Bound<'py, PyAny>>,
        softcap: Option<&Bound<'py, PyAny>>,
        alibi_slopes: Option<&Bound<'py, PyAny>>,
        return_softmax_lse: Given<'py>,
    ) -> PyResult<Bound<'py, PyTuple>> {
        let Opts {
            scale,
            causal,
            window,
            softcap,
        } = options(softmax_scale, &causal, window_size, softcap)?;
        args::flag("return_softmax_lse", &return_softmax_lse, false)?;
        let qv = extract("q", q)?;
        let kcv = extract("k_cache", k_cache)?;
        let vcv = extract("v_cache", v_cache)?;
        let kv = extract_opt("k", k)?;
        let vv = extract_opt("v", v)?;
        let av = extract_opt("alibi_slopes", alibi_slopes)?;
        let args = KvCacheArgs {
            q: &qv,
            k_cache: &kcv,
            v_cache: &vcv,
            k: kv.as_ref(),
            v: vv.as_ref(),
            alibi: av.as_ref(),
        };
        let (p, snew) = check_kvcache(&args, scale, causal, window, softcap)?;
        if let (Some(k), Some(v)) = (args.k, args.v) {
            // The caches are written: their rows must be distinct memory, and
            // apart from every input.
            let read: Vec<&TensorView> = [&qv, k, v].into_iter().chain(&av).collect();
            check_writes(&[&kcv, &vcv], &read)?;
        }
        let seqlens = seqlens_arg(cache_seqlens, p.b, qv.device)?;
        launch("flash_attn_with_kvcache", qv.device, || {
            let lens = cache_lens(seqlens, p.b, p.sk, snew)?;
            let (oo, o) = alloc("out", q, &qv, &qv.shape, None)?;
            let (lo, l) = alloc("softmax_lse", q, &qv, &[p.b, p.hq, p.sq], Some(DType::F32))?;
            let job = plan_kvcache(&p, &args, &lens, snew, &o, Some(&l));
            py.detach(|| {
                if let (Some(k), Some(v)) = (args.k, args.v) {
                    append_rows(&k.raw(), &kcv.raw(), [p.b, snew, p.hk, p.hd], &lens);
                    append_rows(&v.raw(), &vcv.raw(), [p.b, snew, p.hk, p.hd], &lens);
                }
                run_job("flash_attn_with_kvcache", &job)
            })?;
            Ok([oo, lo])
        })
        .map_err(PyErr::from)
        .and_then(|r| PyTuple::new(py, r))
    }

    /// The backward's extra inputs: dout, out, softmax_lse, dsoftmax_lse.
    struct BwdIn {
        dout: TensorView,
        out: TensorView,
        lse: TensorView,
        dlse: Option<TensorView>,
    }

    impl BwdIn {
        fn extract(
            dout: &Bound<'_, PyAny>,
            out: &Bound<'_, PyAny>,
            lse: &Bound<'_, PyAny>,
            dlse: Option<&Bound<'_, PyAny>>,
        ) -> Result<BwdIn> {
            Ok(BwdIn {
                dout: extract("dout", dout)?,
                out: extract("out", out)?,
                lse: extract("softmax_lse", lse)?,
                dlse: extract_opt("dsoftmax_lse", dlse)?,
            })
        }

        fn check(&self, q: &TensorView, lse_shape: &[usize], lse_desc: &str) -> Result<()> {
            let (d, o, l) = (&self.dout, &self.out, &self.lse);
            check_bwd_inputs(q, d, o, l, self.dlse.as_ref(), lse_shape, lse_desc)
        }

        fn views<'a>(&'a self, g: &'a [TensorView; 3]) -> BwdViews<'a> {
            BwdViews {
                dout: &self.dout,
                out: &self.out,
                lse: &self.lse,
                dlse: self.dlse.as_ref(),
                dq: &g[0],
                dk: &g[1],
                dv: &g[2],
            }
        }
    }

    /// (dq, dk, dv) allocated like q, k, v: the Python objects and their views.
    type Grads<'py> = ([Bound<'py, PyAny>; 3], [TensorView; 3]);

    fn alloc_grads<'py>(
        objs: [&Bound<'py, PyAny>; 3],
        views: [&TensorView; 3],
    ) -> Result<Grads<'py>> {
        let (qo, q) = alloc("dq", objs[0], views[0], &views[0].shape, None)?;
        let (ko, k) = alloc("dk", objs[1], views[1], &views[1].shape, None)?;
        let (vo, v) = alloc("dv", objs[2], views[2], &views[2].shape, None)?;
        Ok(([qo, ko, vo], [q, k, v]))
    }

    fn run_bwd(op: &'static str, job: &crate::cpu::attention_bwd::AttnBwdJob) -> Result<()> {
        let level = SimdLevel::current()?;
        catch_panic(op, || {
            crate::cpu::attention_bwd::attn_backward(job, level);
            Ok(())
        })
    }

    /// Backward of flash_attn_func: (dq, dk, dv) in the dtypes of q, k, v, from
    /// the forward's out and softmax_lse; `dsoftmax_lse` is the gradient reaching
    /// lse, if any.
    #[pyfunction]
    #[pyo3(signature = (dout, q, k, v, out, softmax_lse, softmax_scale=None, causal=Given(None), window_size=None, softcap=None, alibi_slopes=None, dsoftmax_lse=None))]
    #[allow(clippy::too_many_arguments)]
    fn attention_bwd<'py>(
        py: Python<'py>,
        dout: &Bound<'py, PyAny>,
        q: &Bound<'py, PyAny>,
        k: &Bound<'py, PyAny>,
        v: &Bound<'py, PyAny>,
        out: &Bound<'py, PyAny>,
        softmax_lse: &Bound<'py, PyAny>,
        softmax_scale: Option<&Bound<'py, PyAny>>,
        causal: Given<'py>,
        window_size: Option<&Bound<'py, PyAny>>,
        softcap: Option<&Bound<'py, PyAny>>,
        alibi_slopes: Option<&Bound<'py, PyAny>>,
        dsoftmax_lse: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyTuple>> {
        let Opts {
            scale,
            causal,
            window,
            softcap,
        } = options(softmax_scale, &causal, window_size, softcap)?;
        let qv = extract("q", q)?;
        let kv = extract("k", k)?;
        let vv = extract("v", v)?;
        let av = extract_opt("alibi_slopes", alibi_slopes)?;
        let bi = BwdIn::extract(dout, out, softmax_lse, dsoftmax_lse)?;
        let args = AttnArgs {
            q: &qv,
            k: &kv,
            v: &vv,
            alibi: av.as_ref(),
        };
        let p = check_attn(&args, scale, causal, window, softcap)?;
        bi.check(&qv, &[p.b, p.hq, p.sq], "(b, hq, sq)")?;
        launch("flash_attn_func backward", qv.device, || {
            let (objs, g) = alloc_grads([q, k, v], [&qv, &kv, &vv])?;
            let job = plan_attn_bwd(&p, &args, &bi.views(&g));
            py.detach(|| run_bwd("flash_attn_func backward", &job))?;
            Ok(objs)
        })
        .map_err(PyErr::from)
        .and_then(|r| PyTuple::new(py, r))
    }

    /// Zeroes the rows `rows` of a packed (total, h, d) tensor.
    fn zero_rows(t: &TensorView, rows: std::ops::Range<usize>) {
        let (h, d) = (t.shape[1], t.shape[2]);
        let zeros = vec![0.0f32; d];
        let r = t.raw::<3>();
        for row in rows {
            for hh in 0..h {
                let p = crate::tensor::addr(&r, [row, hh, 0]);
                unsafe { crate::tensor::store_row(&zeros, p, r.dtype, r.strides[2]) };
            }
        }
    }

    /// Backward of flash_attn_varlen_func: (dq, dk, dv); rows outside every
    /// sequence get 0.
    #[pyfunction]
    #[pyo3(signature = (dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale=None, causal=Given(None), window_size=None, softcap=None, alibi_slopes=None, dsoftmax_lse=None))]
    #[allow(clippy::too_many_arguments)]
    fn attention_varlen_bwd<'py>(
        py: Python<'py>,
        dout: &Bound<'py, PyAny>,
        q: &Bound<'py, PyAny>,
        k: &Bound<'py, PyAny>,
        v: &Bound<'py, PyAny>,
        out: &Bound<'py, PyAny>,
        softmax_lse: &Bound<'py, PyAny>,
        cu_seqlens_q: &Bound<'py, PyAny>,
        cu_seqlens_k: &Bound<'py, PyAny>,
        max_seqlen_q: &Bound<'py, PyAny>,
        max_seqlen_k: &Bound<'py, PyAny>,
        softmax_scale: Option<&Bound<'py, PyAny>>,
        causal: Given<'py>,
        window_size: Option<&Bound<'py, PyAny>>,
        softcap: Option<&Bound<'py, PyAny>>,
        alibi_slopes: Option<&Bound<'py, PyAny>>,
        dsoftmax_lse: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyTuple>> {
        let Opts {
            scale,
            causal,
            window,
            softcap,
        } = options(softmax_scale, &causal, window_size, softcap)?;
        let mq = int_arg("max_seqlen_q", max_seqlen_q)?.max(0) as usize;
        let mk = int_arg("max_seqlen_k", max_seqlen_k)?.max(0) as usize;
        let qv = extract("q", q)?;
        let kv = extract("k", k)?;
        let vv = extract("v", v)?;
        let cq = extract("cu_seqlens_q", cu_seqlens_q)?;
        let ck = extract("cu_seqlens_k", cu_seqlens_k)?;
        let av = extract_opt("alibi_slopes", alibi_slopes)?;
        let bi = BwdIn::extract(dout, out, softmax_lse, dsoftmax_lse)?;
        let args = AttnArgs {
            q: &qv,
            k: &kv,
            v: &vv,
            alibi: av.as_ref(),
        };
        let p = check_varlen(&args, &cq, &ck, scale, causal, window, softcap)?;
        bi.check(&qv, &[p.hq, p.sq], "(hq, total_q)")?;
        launch("flash_attn_varlen_func backward", qv.device, || {
            let cu_q = cu_host(&cq, p.sq, mq)?;
            let cu_k = cu_host(&ck, p.sk, mk)?;
            let p = AttnParams {
                varlen: Some((cu_q.clone(), cu_k.clone())),
                ..p.clone()
            };
            let (objs, g) = alloc_grads([q, k, v], [&qv, &kv, &vv])?;
            let job = plan_varlen_bwd(&p, &args, &cu_q, &cu_k, &bi.views(&g));
            let (lq, lk) = (
                *cu_q.last().unwrap_or(&0) as usize,
                *cu_k.last().unwrap_or(&0) as usize,
            );
            let (fq, fk) = (cu_q[0] as usize, cu_k[0] as usize);
            py.detach(|| {
                // Rows before the first and after the last sequence.
                for (t, first, last) in [(&g[0], fq, lq), (&g[1], fk, lk), (&g[2], fk, lk)] {
                    zero_rows(t, 0..first);
                    zero_rows(t, last..t.shape[0]);
                }
                run_bwd("flash_attn_varlen_func backward", &job)
            })?;
            Ok(objs)
        })
        .map_err(PyErr::from)
        .and_then(|r| PyTuple::new(py, r))
    }

    /// One step of the sliding-window ring cache: the n new tokens (positions
    /// pos .. pos + n) attend causally to the `window` most recent positions —
    /// the ring's entries (positions pos − window .. pos at slot position mod
    /// window) and the new k/v — then the new k/v are written into the rings.
    /// Returns (out (b, n, hq, hd), softmax_lse (b, hq, n) float32).
    #[pyfunction]
    #[pyo3(signature = (q, k_ring, v_ring, k, v, pos, softmax_scale=None, softcap=None, alibi_slopes=None))]
    #[allow(clippy::too_many_arguments)]
    fn attention_ring<'py>(
        py: Python<'py>,
        q: &Bound<'py, PyAny>,
        k_ring: &Bound<'py, PyAny>,
        v_ring: &Bound<'py, PyAny>,
        k: &Bound<'py, PyAny>,
        v: &Bound<'py, PyAny>,
        pos: &Bound<'py, PyAny>,
        softmax_scale: Option<&Bound<'py, PyAny>>,
        softcap: Option<&Bound<'py, PyAny>>,
        alibi_slopes: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyTuple>> {
        let r = parse_ring(
            q,
            k_ring,
            v_ring,
            k,
            v,
            pos,
            softmax_scale,
            softcap,
            alibi_slopes,
        )?;
        let (args, p, qv, pos) = (r.args(), &r.p, &r.q, r.pos);
        launch("SlidingWindowKVCache", qv.device, || {
            let (oo, o) = alloc("out", q, qv, &qv.shape, None)?;
            let (lo, l) = alloc("softmax_lse", q, qv, &[p.b, p.hq, p.sq], Some(DType::F32))?;
            let job = plan_ring(p, &args, &o, Some(&l));
            let w = r.k_ring.shape[1];
            let shape = [p.b, p.sq, p.hk, p.hd];
            py.detach(|| {
                run_job("SlidingWindowKVCache", &job)?;
                ring_write(
                    &r.k.raw(),
                    &r.k_ring.raw(),
                    shape,
                    w,
                    ring_pos(pos as u64, w),
                );
                ring_write(
                    &r.v.raw(),
                    &r.v_ring.raw(),
                    shape,
                    w,
                    ring_pos(pos as u64, w),
                );
                Ok(())
            })?;
            Ok([oo, lo])
        })
        .map_err(PyErr::from)
        .and_then(|r| PyTuple::new(py, r))
    }

    pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
        m.add_function(wrap_pyfunction!(attention_ring, m)?)?;
        m.add_function(wrap_pyfunction!(attention_bwd, m)?)?;
        m.add_function(wrap_pyfunction!(attention_varlen_bwd, m)?)?;
        m.add_function(wrap_pyfunction!(attention_fwd, m)?)?;
        m.add_function(wrap_pyfunction!(attention_varlen_fwd, m)?)?;
        m.add_function(wrap_pyfunction!(attention_kvcache, m)?)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_window_bounds_saturate() {
        assert_eq!(saturate_window((i64::MAX, i64::MAX), 5, 7), (-1, -1));
        assert_eq!(saturate_window((7, 5), 5, 7), (-1, -1));
        assert_eq!(saturate_window((6, 4), 5, 7), (6, 4));
        assert_eq!(saturate_window((-1, 0), 5, 7), (-1, 0));
    }

    #[test]
    fn ring_pos_keeps_slots_and_distances() {
        assert_eq!(ring_pos(3, 8), 3);
        assert_eq!(ring_pos(8, 8), 8);
        let p = i64::MAX as u64;
        assert_eq!(ring_pos(p, 8), 8 + (p % 8) as usize);
        assert_eq!(ring_pos(u64::MAX, 5), 5 + (u64::MAX % 5) as usize);
    }
}
