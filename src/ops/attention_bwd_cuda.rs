//! Private binding of the CUDA flash-attention backward:
//! `_core._flash_attn_bwd_cuda(dout, q, k, v, out, lse, dq, dk, dv, dq_acc,
//! lse2, dsum, softmax_scale, left, right, softcap, alibi_slopes=None,
//! dlse=None, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None,
//! max_seqlen_k=None, deterministic=False)`.
//!
//! Options are normalised by the caller as for `_flash_attn_fwd_cuda` (see
//! src/ops/attention_cuda.rs, whose checks run here too). `dout`, `dq` are
//! shaped like q, `dk`, `dv` like k (same dtype, last dimension contiguous);
//! `lse` is the forward's (b, hq, sq) / varlen (hq, total_q) float32 and
//! `dlse` (optional) its gradient. Scratch, float32 and contiguous, allocated
//! by the caller with rows = b·sq (batched) or total_q (varlen): `lse2`,
//! `dsum` (hq, rows); `dq_acc` (rows, hq, hd rounded up to 16) zero-filled
//! (the kernel's private layout), or None when
//! `deterministic` (then dQ is computed without atomics, bit-identical run
//! to run). Varlen: rows of dk/dv past the last sequence are not written.

use crate::cuda::attention_bwd::FlashBwdParams;
use crate::error::{Error, Result};
use crate::ops::attention_cuda::{check as fwd_check, FwdDims};
use crate::tensor::{DType, Device, Kind, TensorView};

fn rows_aligned(t: &TensorView, align: usize) -> bool {
    let el = t.dtype.size();
    t.ptr % align == 0
        && t.strides[..t.ndim() - 1]
            .iter()
            .zip(&t.shape)
            .all(|(&s, &n)| n <= 1 || (s.unsigned_abs() * el) % align == 0)
}

fn contiguous(t: &TensorView) -> bool {
    let mut want = 1isize;
    for (&n, &s) in t.shape.iter().zip(&t.strides).rev() {
        if n > 1 && s != want {
            return false;
        }
        want *= n as isize;
    }
    true
}

fn cuda_torch(t: &TensorView, dev: Device) -> Result<()> {
    if t.kind != Kind::Torch || !matches!(t.device, Device::Cuda(_)) {
        return Err(Error::type_(format!(
            "{}: the CUDA flash-attention backward takes torch CUDA tensors, got one on {}",
            t.name, t.device
        )));
    }
    t.expect_device(dev, "q")
}

fn scratch(t: &TensorView, shape: &[usize], desc: &str, dev: Device) -> Result<()> {
    cuda_torch(t, dev)?;
    t.expect_dtype(DType::F32)?;
    t.expect_shape(shape, desc)?;
    t.expect_writable()?;
    if !contiguous(t) {
        return Err(Error::value(format!(
            "{}: expected a contiguous float32 scratch tensor, got strides {:?}",
            t.name, t.strides
        )));
    }
    Ok(())
}

fn last_contiguous(t: &TensorView) -> Result<()> {
    if t.strides.last() != Some(&1) && t.shape.last() != Some(&1) {
        return Err(Error::value(format!(
            "{}: the last dimension (head dim) must be contiguous (stride 1), got strides {:?}",
            t.name, t.strides
        )));
    }
    Ok(())
}

/// The tensors of one backward call.
pub struct BwdArgs<'a> {
    pub dout: &'a TensorView,
    pub q: &'a TensorView,
    pub k: &'a TensorView,
    pub v: &'a TensorView,
    pub out: &'a TensorView,
    pub lse: &'a TensorView,
    pub dq: &'a TensorView,
    pub dk: &'a TensorView,
    pub dv: &'a TensorView,
    pub dq_acc: Option<&'a TensorView>,
    pub lse2: &'a TensorView,
    pub dsum: &'a TensorView,
    pub alibi: Option<&'a TensorView>,
    pub dlse: Option<&'a TensorView>,
    pub cu_q: Option<&'a TensorView>,
    pub cu_k: Option<&'a TensorView>,
}

/// Checks every argument; returns the dims and the scratch row count.
#[allow(clippy::too_many_arguments)]
pub fn check(
    a: &BwdArgs,
    max_seqlen_q: Option<usize>,
    max_seqlen_k: Option<usize>,
    left: i64,
    right: i64,
    softcap: f64,
    softmax_scale: f64,
    deterministic: bool,
) -> Result<(FwdDims, usize)> {
    let d = fwd_check(
        a.q,
        a.k,
        a.v,
        a.out,
        Some(a.lse),
        a.alibi,
        a.cu_q,
        a.cu_k,
        max_seqlen_q,
        max_seqlen_k,
        left,
        right,
        softcap,
        softmax_scale,
    )?;
    let dev = a.q.device;
    for (t, like, desc) in [
        (a.dout, a.q, "like q"),
        (a.dq, a.q, "like q"),
        (a.dk, a.k, "like k"),
        (a.dv, a.k, "like k"),
    ] {
        cuda_torch(t, dev)?;
        t.expect_same_dtype(a.q)?;
        t.expect_shape(&like.shape, desc)?;
        last_contiguous(t)?;
    }
    for t in [a.dq, a.dk, a.dv] {
        t.expect_writable()?;
    }
    if let Some(l) = a.dlse {
        cuda_torch(l, dev)?;
        l.expect_dtype(DType::F32)?;
        l.expect_shape(&a.lse.shape, "like softmax_lse")?;
    }
    let rows = if d.varlen { a.q.shape[0] } else { d.b * d.sq };
    scratch(a.lse2, &[d.hq, rows], "(hq, rows)", dev)?;
    scratch(a.dsum, &[d.hq, rows], "(hq, rows)", dev)?;
    match (a.dq_acc, deterministic) {
        (Some(t), _) => scratch(
            t,
            &[rows, d.hq, d.hd.div_ceil(16) * 16],
            "(rows, hq, hd rounded up to 16)",
            dev,
        )?,
        (None, false) => {
            return Err(Error::value(
                "dq_acc: required (zero-filled float32 (rows, hq, hd rounded up to 16)) unless deterministic",
            ))
        }
        (None, true) => {}
    }
    if rows > crate::cuda::MAX_DIM {
        return Err(Error::value("q: too many rows for the CUDA kernel"));
    }
    Ok((d, rows))
}

/// The kernel's parameters for a checked call.
#[allow(clippy::too_many_arguments)]
pub fn plan(
    d: FwdDims,
    rows: usize,
    a: &BwdArgs,
    left: i64,
    right: i64,
    softcap: f64,
    softmax_scale: f64,
) -> FlashBwdParams {
    const LOG2E: f64 = std::f64::consts::LOG2_E;
    let bsh = |t: &TensorView| -> [i64; 3] {
        let s = &t.strides;
        if d.varlen {
            [0, s[0] as i64, s[1] as i64]
        } else {
            [s[0] as i64, s[1] as i64, s[2] as i64]
        }
    };
    // (batch, head, seq) strides of lse-shaped tensors.
    let lse_s = |l: &TensorView| -> [i64; 3] {
        if d.varlen {
            [0, l.strides[0] as i64, l.strides[1] as i64]
        } else {
            [
                l.strides[0] as i64,
                l.strides[1] as i64,
                l.strides[2] as i64,
            ]
        }
    };
    let (alibi_sb, alibi_sh) = match a.alibi {
        None => (0, 0),
        Some(t) if t.ndim() == 1 => (0, t.strides[0] as i64),
        Some(t) => (t.strides[0] as i64, t.strides[1] as i64),
    };
    // A window of 2³¹ − 1 or more is unbounded for any int32-indexed sequence;
    // the kernel does its band arithmetic in 64 bits.
    let clamp = |w: i64| -> i32 { w.min(i32::MAX as i64) as i32 };
    let vec_ok = [a.q, a.k, a.v, a.dout].iter().all(|t| rows_aligned(t, 16));
    let o_vec_ok = [a.dq, a.dk, a.dv].iter().all(|t| rows_aligned(t, 4));
    FlashBwdParams {
        q: a.q.ptr as u64,
        k: a.k.ptr as u64,
        v: a.v.ptr as u64,
        out: a.out.ptr as u64,
        dout: a.dout.ptr as u64,
        dq: a.dq.ptr as u64,
        dk: a.dk.ptr as u64,
        dv: a.dv.ptr as u64,
        lse: a.lse.ptr as u64,
        dlse: a.dlse.map_or(0, |t| t.ptr as u64),
        lse2: a.lse2.ptr as u64,
        dsum: a.dsum.ptr as u64,
        dq_acc: a.dq_acc.map_or(0, |t| t.ptr as u64),
        alibi: a.alibi.map_or(0, |t| t.ptr as u64),
        cu_q: a.cu_q.map_or(0, |t| t.ptr as u64),
        cu_k: a.cu_k.map_or(0, |t| t.ptr as u64),
        strides: [
            bsh(a.q),
            bsh(a.k),
            bsh(a.v),
            bsh(a.out),
            bsh(a.dout),
            bsh(a.dq),
            bsh(a.dk),
            bsh(a.dv),
        ],
        lse_s: lse_s(a.lse),
        dlse_s: a.dlse.map_or([0; 3], lse_s),
        alibi_sb,
        alibi_sh,
        rows: rows as i64,
        b: d.b as i32,
        hq: d.hq as i32,
        hk: d.hk as i32,
        hd: d.hd as i32,
        sq: d.sq as i32,
        sk: d.sk as i32,
        left: clamp(left),
        right: clamp(right),
        scale: softmax_scale as f32,
        scale_log2: (softmax_scale * LOG2E) as f32,
        softcap: softcap as f32,
        softcap_in: if softcap > 0.0 {
            (softmax_scale / softcap) as f32
        } else {
            0.0
        },
        softcap_out: (softcap * LOG2E).min(f32::MAX as f64) as f32,
        vec_ok: vec_ok as i32,
        o_vec_ok: o_vec_ok as i32,
        dq_atomic: 1,
    }
}

#[cfg(feature = "python")]
pub use py::register;

#[cfg(feature = "python")]
mod py {
    use super::*;
    use crate::error::catch_panic;
    use crate::tensor::{current_stream, extract, extract_opt};
    use pyo3::prelude::*;

    /// CUDA flash-attention backward into caller-allocated dq, dk, dv (and
    /// scratch). Private: see the module doc.
    #[pyfunction]
    #[pyo3(signature = (dout, q, k, v, out, lse, dq, dk, dv, dq_acc, lse2, dsum, softmax_scale, left, right, softcap, alibi_slopes=None, dlse=None, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None, deterministic=false))]
    #[allow(clippy::too_many_arguments)]
    fn _flash_attn_bwd_cuda(
        py: Python<'_>,
        dout: &Bound<'_, PyAny>,
        q: &Bound<'_, PyAny>,
        k: &Bound<'_, PyAny>,
        v: &Bound<'_, PyAny>,
        out: &Bound<'_, PyAny>,
        lse: &Bound<'_, PyAny>,
        dq: &Bound<'_, PyAny>,
        dk: &Bound<'_, PyAny>,
        dv: &Bound<'_, PyAny>,
        dq_acc: Option<&Bound<'_, PyAny>>,
        lse2: &Bound<'_, PyAny>,
        dsum: &Bound<'_, PyAny>,
        softmax_scale: f64,
        left: i64,
        right: i64,
        softcap: f64,
        alibi_slopes: Option<&Bound<'_, PyAny>>,
        dlse: Option<&Bound<'_, PyAny>>,
        cu_seqlens_q: Option<&Bound<'_, PyAny>>,
        cu_seqlens_k: Option<&Bound<'_, PyAny>>,
        max_seqlen_q: Option<usize>,
        max_seqlen_k: Option<usize>,
        deterministic: bool,
    ) -> PyResult<()> {
        let dov = extract("dout", dout)?;
        let qv = extract("q", q)?;
        let kv = extract("k", k)?;
        let vv = extract("v", v)?;
        let ov = extract("out", out)?;
        let lv = extract("softmax_lse", lse)?;
        let dqv = extract("dq", dq)?;
        let dkv = extract("dk", dk)?;
        let dvv = extract("dv", dv)?;
        let accv = extract_opt("dq_acc", dq_acc)?;
        let l2v = extract("lse2", lse2)?;
        let dsv = extract("dsum", dsum)?;
        let av = extract_opt("alibi_slopes", alibi_slopes)?;
        let dlv = extract_opt("dsoftmax_lse", dlse)?;
        let cq = extract_opt("cu_seqlens_q", cu_seqlens_q)?;
        let ck = extract_opt("cu_seqlens_k", cu_seqlens_k)?;
        let a = BwdArgs {
            dout: &dov,
            q: &qv,
            k: &kv,
            v: &vv,
            out: &ov,
            lse: &lv,
            dq: &dqv,
            dk: &dkv,
            dv: &dvv,
            dq_acc: accv.as_ref(),
            lse2: &l2v,
            dsum: &dsv,
            alibi: av.as_ref(),
            dlse: dlv.as_ref(),
            cu_q: cq.as_ref(),
            cu_k: ck.as_ref(),
        };
        let (d, rows) = check(
            &a,
            max_seqlen_q,
            max_seqlen_k,
            left,
            right,
            softcap,
            softmax_scale,
            deterministic,
        )?;
        let Device::Cuda(ord) = qv.device else {
            return Err(Error::type_("q: expected a CUDA tensor").into());
        };
        let p = plan(d, rows, &a, left, right, softcap, softmax_scale);
        let stream = current_stream(py, ord)?;
        let dt = qv.dtype;
        py.detach(|| {
            catch_panic("flash_attn backward (CUDA)", || {
                crate::cuda::attention_bwd::flash_bwd(
                    ord,
                    stream,
                    &p,
                    dt,
                    d.sq,
                    d.sk,
                    deterministic,
                )
            })
        })?;
        Ok(())
    }

    pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
        m.add_function(wrap_pyfunction!(_flash_attn_bwd_cuda, m)?)?;
        Ok(())
    }
}
