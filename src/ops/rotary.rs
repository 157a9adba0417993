//! Rotary position embedding of q and k in one CUDA launch (the input path of
//! SlidingWindowAttention, SPEC §5): argument checks and the `#[pyfunction]`.
//! The CPU path is the torch formula in python/mamba_attention/nn/attention.py.

use crate::error::{Error, Result};
use crate::tensor::{DType, Device, TensorView};

/// Checks q (b, l, hq, hd), k (b, l, hk, hd) with hd even, positions (l,)
/// int32/int64 and inv_freq (hd/2,) float32, all on one CUDA device; returns
/// (b, l, hq, hk, hd, device ordinal).
pub fn check_rotary(
    q: &TensorView,
    k: &TensorView,
    pos: &TensorView,
    inv: &TensorView,
) -> Result<(usize, usize, usize, usize, usize, i32)> {
    q.expect_float()?;
    q.expect_rank(4, "(b, l, heads, head_dim)")?;
    q.expect_nonempty()?;
    let ord = match q.device {
        Device::Cuda(o) => o,
        _ => {
            return Err(Error::value(
                "q: the fused rotary kernel runs on CUDA tensors, got a CPU tensor",
            ))
        }
    };
    let (b, l, hq, hd) = (q.shape[0], q.shape[1], q.shape[2], q.shape[3]);
    if hd % 2 != 0 {
        return Err(Error::value(format!(
            "q: rotary embeddings need an even head_dim, got {hd}"
        )));
    }
    k.expect_same_dtype(q)?;
    k.expect_device(q.device, "q")?;
    k.expect_rank(4, "(b, l, heads, head_dim)")?;
    let hk = k.shape[2];
    k.expect_shape(
        &[b, l, hk, hd],
        "(b, l, kv heads, head_dim) with q's b, l, head_dim ",
    )?;
    k.expect_nonempty()?;
    if !matches!(pos.dtype, DType::I32 | DType::I64) {
        return Err(Error::type_(format!(
            "positions: expected an int32 or int64 tensor, got {}",
            pos.dtype.name()
        )));
    }
    pos.expect_device(q.device, "q")?;
    pos.expect_shape(&[l], "(l,)")?;
    inv.expect_dtype(DType::F32)?;
    inv.expect_device(q.device, "q")?;
    inv.expect_shape(&[hd / 2], "(head_dim / 2,)")?;
    let big = |x: usize| x > i32::MAX as usize;
    if big(b) || big(l) || big(hq + hk) || big(hd) {
        return Err(Error::value(format!(
            "q: dimensions above 2**31 - 1 are not supported, got shape {}",
            q.shape_str()
        )));
    }
    Ok((b, l, hq, hk, hd, ord))
}

#[cfg(feature = "python")]
pub use py::register;

#[cfg(feature = "python")]
mod py {
    use super::*;
    use crate::cuda::rotary::RotaryParams;
    use crate::cuda::scan::Tensor4;
    use crate::error::catch_panic;
    use crate::tensor::{alloc, current_stream, extract};
    use pyo3::prelude::*;
    use pyo3::types::PyTuple;

    /// Rotates q (b, l, hq, hd) and k (b, l, hk, hd) on CUDA in one launch:
    /// (q_out, k_out), contiguous, in q's dtype. conj rotates by −angle.
    #[pyfunction]
    fn _rotary_cuda<'py>(
        py: Python<'py>,
        q: &Bound<'py, PyAny>,
        k: &Bound<'py, PyAny>,
        positions: &Bound<'py, PyAny>,
        inv_freq: &Bound<'py, PyAny>,
        conj: bool,
    ) -> PyResult<Bound<'py, PyTuple>> {
        let qv = extract("q", q)?;
        let kv = extract("k", k)?;
        let pv = extract("positions", positions)?;
        let iv = extract("inv_freq", inv_freq)?;
        let (b, l, hq, hk, hd, ord) = check_rotary(&qv, &kv, &pv, &iv)?;
        let (qo_obj, qo) = alloc("q_out", q, &qv, &[b, l, hq, hd], None)?;
        let (ko_obj, ko) = alloc("k_out", k, &kv, &[b, l, hk, hd], None)?;
        let stream = current_stream(py, ord)?;
        let p = RotaryParams {
            b: b as i32,
            l: l as i32,
            hq: hq as i32,
            hk: hk as i32,
            hd: hd as i32,
            conj: conj as i32,
            q: Tensor4::of(&qv),
            k: Tensor4::of(&kv),
            qo: Tensor4::of(&qo),
            ko: Tensor4::of(&ko),
            pos: Tensor4::of(&pv),
            inv: Tensor4::of(&iv),
            ..Default::default()
        };
        py.detach(|| catch_panic("rotary", || crate::cuda::rotary::rotary_qk(ord, stream, &p)))?;
        PyTuple::new(py, [qo_obj, ko_obj])
    }

    pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
        m.add_function(wrap_pyfunction!(_rotary_cuda, m)?)?;
        Ok(())
    }
}
