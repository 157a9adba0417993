//! Private binding of the CUDA flash-attention forward:
//! `_core._flash_attn_fwd_cuda(q, k, v, out, lse, softmax_scale, left, right,
//! softcap, alibi_slopes=None, cu_seqlens_q=None, cu_seqlens_k=None,
//! max_seqlen_q=None, max_seqlen_k=None)`.
//!
//! The caller (the public `flash_attn_*` functions) has already normalised the
//! options: `left`/`right` are window bounds with -1 = unbounded (causal is
//! right = 0, bottom-right aligned), `softmax_scale` is resolved, and `out`
//! (like q) and `lse` (float32, or None) are allocated. Layouts:
//! - batched: q, out (b, sq, hq, hd); k, v (b, sk, hk, hd); lse (b, hq, sq);
//! - varlen (cu_seqlens_q/k given, int32 (b + 1,)): q, out (total_q, hq, hd);
//!   k, v (total_k, hk, hd); lse (hq, total_q).
//!   alibi_slopes: float32 (hq,) or (b, hq).
//!
//! Only torch CUDA tensors of dtype float16 or bfloat16 (float32 raises
//! TypeError); the last dimension of q, k, v, out must be contiguous; other
//! strides are free (q may be a slice of a packed qkv tensor).

use crate::cuda::attention::{FlashFwdParams, MAX_HEAD_DIM};
use crate::error::{Error, Result};
use crate::tensor::{DType, Device, Kind, TensorView};

/// Checked shapes of one call.
#[derive(Debug, Clone, Copy)]
pub struct FwdDims {
    pub b: usize,
    pub sq: usize,
    pub sk: usize,
    pub hq: usize,
    pub hk: usize,
    pub hd: usize,
    pub varlen: bool,
}

fn cuda_torch(t: &TensorView, device: Device) -> Result<()> {
    if t.kind != Kind::Torch || !matches!(t.device, Device::Cuda(_)) {
        return Err(Error::type_(format!(
            "{}: the CUDA flash-attention kernel takes torch CUDA tensors, got a {} array on {}",
            t.name,
            match t.kind {
                Kind::Torch => "torch",
                Kind::Numpy => "NumPy",
                Kind::DLPack => "DLPack",
            },
            t.device
        )));
    }
    t.expect_device(device, "q")
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

/// Whether every row start of `t` (all dims but the last) is `align`-byte aligned.
fn rows_aligned(t: &TensorView, align: usize) -> bool {
    let el = t.dtype.size();
    t.ptr % align == 0
        && t.strides[..t.ndim() - 1]
            .iter()
            .zip(&t.shape)
            .all(|(&s, &n)| n <= 1 || (s.unsigned_abs() * el) % align == 0)
}

#[allow(clippy::too_many_arguments)]
pub fn check(
    q: &TensorView,
    k: &TensorView,
    v: &TensorView,
    out: &TensorView,
    lse: Option<&TensorView>,
    alibi: Option<&TensorView>,
    cu_q: Option<&TensorView>,
    cu_k: Option<&TensorView>,
    max_seqlen_q: Option<usize>,
    max_seqlen_k: Option<usize>,
    left: i64,
    right: i64,
    softcap: f64,
    softmax_scale: f64,
) -> Result<FwdDims> {
    let dev = q.device;
    for t in [q, k, v, out] {
        cuda_torch(t, dev)?;
    }
    match q.dtype {
        DType::F16 | DType::BF16 => {}
        DType::F32 => return Err(Error::type_(
            "q: the CUDA flash-attention kernel takes float16 or bfloat16 tensors, got float32 \
                 (convert to bfloat16/float16, or use the CPU)",
        )),
        other => {
            return Err(Error::type_(format!(
                "q: expected a float16 or bfloat16 tensor, got {}",
                other.name()
            )))
        }
    }
    for t in [k, v, out] {
        t.expect_same_dtype(q)?;
    }
    let varlen = cu_q.is_some() || cu_k.is_some();
    let (b, sq, sk, hq, hk, hd);
    if varlen {
        let (Some(cq), Some(ck)) = (cu_q, cu_k) else {
            return Err(Error::value(
                "cu_seqlens_q, cu_seqlens_k: give both (varlen) or neither",
            ));
        };
        q.expect_rank(3, "(total_q, hq, hd)")?;
        k.expect_rank(3, "(total_k, hk, hd)")?;
        for c in [cq, ck] {
            cuda_torch(c, dev)?;
            c.expect_dtype(DType::I32)?;
            c.expect_rank(1, "(b + 1,)")?;
            if c.shape[0] < 1 {
                return Err(Error::value(format!(
                    "{}: expected shape (b + 1,) with b ≥ 0, got {}",
                    c.name,
                    c.shape_str()
                )));
            }
        }
        if cq.shape[0] != ck.shape[0] {
            return Err(Error::value(format!(
                "cu_seqlens_k: expected shape (b + 1,) = ({},) like cu_seqlens_q, got {}",
                cq.shape[0],
                ck.shape_str()
            )));
        }
        b = cq.shape[0] - 1;
        sq =
            max_seqlen_q.ok_or_else(|| Error::value("max_seqlen_q: required with cu_seqlens_q"))?;
        sk =
            max_seqlen_k.ok_or_else(|| Error::value("max_seqlen_k: required with cu_seqlens_k"))?;
        hq = q.shape[1];
        hd = q.shape[2];
        hk = k.shape[1];
        k.expect_shape(&[k.shape[0], hk, hd], "(total_k, hk, hd)")?;
        v.expect_shape(&k.shape, "(total_k, hk, hd)")?;
        out.expect_shape(&q.shape, "(total_q, hq, hd) like q")?;
        if let Some(l) = lse {
            l.expect_shape(&[hq, q.shape[0]], "(hq, total_q)")?;
        }
    } else {
        q.expect_rank(4, "(b, sq, hq, hd)")?;
        (b, sq, hq, hd) = (q.shape[0], q.shape[1], q.shape[2], q.shape[3]);
        k.expect_rank(4, "(b, sk, hk, hd)")?;
        (sk, hk) = (k.shape[1], k.shape[2]);
        k.expect_shape(&[b, sk, hk, hd], "(b, sk, hk, hd)")?;
        v.expect_shape(&k.shape, "(b, sk, hk, hd) like k")?;
        out.expect_shape(&q.shape, "(b, sq, hq, hd) like q")?;
        if let Some(l) = lse {
            l.expect_shape(&[b, hq, sq], "(b, hq, sq)")?;
        }
    }
    if hd == 0 || hd % 8 != 0 || hd > MAX_HEAD_DIM {
        return Err(Error::value(format!(
            "q: the head dim must be a multiple of 8 between 8 and {MAX_HEAD_DIM} on CUDA, got {hd}"
        )));
    }
    if hk == 0 || hq % hk != 0 {
        return Err(Error::value(format!(
            "k: the number of kv heads hk = {hk} must divide the number of query heads hq = {hq}"
        )));
    }
    for t in [q, k, v, out] {
        last_contiguous(t)?;
    }
    out.expect_writable()?;
    if let Some(l) = lse {
        cuda_torch(l, dev)?;
        l.expect_dtype(DType::F32)?;
        l.expect_writable()?;
    }
    if let Some(a) = alibi {
        cuda_torch(a, dev)?;
        a.expect_dtype(DType::F32)?;
        if !(a.shape == [hq] || a.shape == [b, hq]) {
            return Err(Error::value(format!(
                "alibi_slopes: expected shape (hq,) = ({hq},) or (b, hq) = ({b}, {hq}), got {}",
                a.shape_str()
            )));
        }
    }
    if left < -1 || right < -1 {
        return Err(Error::value(format!(
            "window_size: expected bounds ≥ -1 (-1 = unbounded), got ({left}, {right})"
        )));
    }
    if !(softcap >= 0.0 && softcap.is_finite()) {
        return Err(Error::value(format!(
            "softcap: expected a finite value ≥ 0, got {softcap}"
        )));
    }
    if !softmax_scale.is_finite() {
        return Err(Error::value(format!(
            "softmax_scale: expected a finite value, got {softmax_scale}"
        )));
    }
    let lim = crate::cuda::MAX_DIM;
    if sq > lim || sk > lim || q.numel() > (1usize << 62) {
        return Err(Error::value("q: sequence too long for the CUDA kernel"));
    }
    Ok(FwdDims {
        b,
        sq,
        sk,
        hq,
        hk,
        hd,
        varlen,
    })
}

/// The kernel's parameters for a checked call.
#[allow(clippy::too_many_arguments)]
pub fn plan(
    d: FwdDims,
    q: &TensorView,
    k: &TensorView,
    v: &TensorView,
    out: &TensorView,
    lse: Option<&TensorView>,
    alibi: Option<&TensorView>,
    cu_q: Option<&TensorView>,
    cu_k: Option<&TensorView>,
    left: i64,
    right: i64,
    softcap: f64,
    softmax_scale: f64,
) -> FlashFwdParams {
    const LOG2E: f64 = std::f64::consts::LOG2_E;
    // (batch, seq, head) strides; varlen: no batch stride.
    let bsh = |t: &TensorView| -> (i64, i64, i64) {
        let s = &t.strides;
        if d.varlen {
            (0, s[0] as i64, s[1] as i64)
        } else {
            (s[0] as i64, s[1] as i64, s[2] as i64)
        }
    };
    let (q_sb, q_ss, q_sh) = bsh(q);
    let (k_sb, k_ss, k_sh) = bsh(k);
    let (v_sb, v_ss, v_sh) = bsh(v);
    let (o_sb, o_ss, o_sh) = bsh(out);
    let (lse_sb, lse_sh, lse_ss) = match lse {
        None => (0, 0, 0),
        Some(l) if d.varlen => (0, l.strides[0] as i64, l.strides[1] as i64),
        Some(l) => (
            l.strides[0] as i64,
            l.strides[1] as i64,
            l.strides[2] as i64,
        ),
    };
    let (alibi_sb, alibi_sh) = match alibi {
        None => (0, 0),
        Some(a) if a.ndim() == 1 => (0, a.strides[0] as i64),
        Some(a) => (a.strides[0] as i64, a.strides[1] as i64),
    };
    let clamp = |w: i64| -> i32 { w.min(i32::MAX as i64) as i32 };
    let vec_ok = [q, k, v].iter().all(|t| rows_aligned(t, 16));
    FlashFwdParams {
        q: q.ptr as u64,
        k: k.ptr as u64,
        v: v.ptr as u64,
        out: out.ptr as u64,
        lse: lse.map_or(0, |l| l.ptr as u64),
        alibi: alibi.map_or(0, |a| a.ptr as u64),
        cu_q: cu_q.map_or(0, |c| c.ptr as u64),
        cu_k: cu_k.map_or(0, |c| c.ptr as u64),
        q_sb,
        q_ss,
        q_sh,
        k_sb,
        k_ss,
        k_sh,
        v_sb,
        v_ss,
        v_sh,
        o_sb,
        o_ss,
        o_sh,
        lse_sb,
        lse_sh,
        lse_ss,
        alibi_sb,
        alibi_sh,
        b: d.b as i32,
        hq: d.hq as i32,
        hk: d.hk as i32,
        hd: d.hd as i32,
        sq: d.sq as i32,
        sk: d.sk as i32,
        left: clamp(left),
        right: clamp(right),
        scale_log2: (softmax_scale * LOG2E) as f32,
        softcap: softcap as f32,
        softcap_in: if softcap > 0.0 {
            (softmax_scale / softcap) as f32
        } else {
            0.0
        },
        softcap_out: (softcap * LOG2E).min(f32::MAX as f64) as f32,
        vec_ok: vec_ok as i32,
        o_vec_ok: rows_aligned(out, 4) as i32,
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

    /// CUDA flash-attention forward into caller-allocated `out` (and `lse`).
    /// Private: the public API normalises the options first (see the module doc).
    #[pyfunction]
    #[pyo3(signature = (q, k, v, out, lse, softmax_scale, left, right, softcap, alibi_slopes=None, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None))]
    #[allow(clippy::too_many_arguments)]
    fn _flash_attn_fwd_cuda(
        py: Python<'_>,
        q: &Bound<'_, PyAny>,
        k: &Bound<'_, PyAny>,
        v: &Bound<'_, PyAny>,
        out: &Bound<'_, PyAny>,
        lse: Option<&Bound<'_, PyAny>>,
        softmax_scale: f64,
        left: i64,
        right: i64,
        softcap: f64,
        alibi_slopes: Option<&Bound<'_, PyAny>>,
        cu_seqlens_q: Option<&Bound<'_, PyAny>>,
        cu_seqlens_k: Option<&Bound<'_, PyAny>>,
        max_seqlen_q: Option<usize>,
        max_seqlen_k: Option<usize>,
    ) -> PyResult<()> {
        let qv = extract("q", q)?;
        let kv = extract("k", k)?;
        let vv = extract("v", v)?;
        let ov = extract("out", out)?;
        let lv = extract_opt("lse", lse)?;
        let av = extract_opt("alibi_slopes", alibi_slopes)?;
        let cq = extract_opt("cu_seqlens_q", cu_seqlens_q)?;
        let ck = extract_opt("cu_seqlens_k", cu_seqlens_k)?;
        let d = check(
            &qv,
            &kv,
            &vv,
            &ov,
            lv.as_ref(),
            av.as_ref(),
            cq.as_ref(),
            ck.as_ref(),
            max_seqlen_q,
            max_seqlen_k,
            left,
            right,
            softcap,
            softmax_scale,
        )?;
        let Device::Cuda(ord) = qv.device else {
            return Err(Error::type_("q: expected a CUDA tensor").into());
        };
        let p = plan(
            d,
            &qv,
            &kv,
            &vv,
            &ov,
            lv.as_ref(),
            av.as_ref(),
            cq.as_ref(),
            ck.as_ref(),
            left,
            right,
            softcap,
            softmax_scale,
        );
        let stream = current_stream(py, ord)?;
        let dt = qv.dtype;
        py.detach(|| {
            catch_panic("flash_attn forward (CUDA)", || {
                crate::cuda::attention::flash_fwd(ord, stream, &p, dt, d.sq)
            })
        })?;
        Ok(())
    }

    pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
        m.add_function(wrap_pyfunction!(_flash_attn_fwd_cuda, m)?)?;
        Ok(())
    }
}
