//! The selective scan's training forward (CPU and CUDA): the forward that
//! also returns the chunk-start states (checkpoints) so that the backward
//! skips recomputing them (`selective_scan_bwd(..., checkpoints=...)`).
//!
//! CPU: every `checkpoint_chunk(b, d, n, l)` steps (16 to 64). CUDA: every
//! 32 steps (`cuda::scan::CK_CHUNK`, the fast backward kernel's chunk), and
//! only where that kernel runs (`cuda_checkpoints`); elsewhere the CUDA
//! forward returns an empty tensor and the backward recomputes.

use crate::cpu::scan::Checkpoints;
use crate::cpu::scan_bwd::checkpoint_chunk;
use crate::error::{Error, Result};
use crate::ops::scan::ScanDims;
use crate::tensor::{DType, Device, TensorView};

/// Validates a checkpoint tensor: float32 (b, d, l.div_ceil(ts), n) on the
/// CPU, contiguous, ts = `checkpoint_chunk(b, d, n, l)`.
pub fn check_checkpoints(t: &TensorView, dims: ScanDims) -> Result<Checkpoints> {
    let ScanDims { b, d, l, n } = dims;
    let ts = checkpoint_chunk(b, d, n, l);
    let nch = l.div_ceil(ts);
    if t.device != Device::Cpu {
        return Err(Error::value(format!(
            "{}: expected a CPU tensor (u is on the CPU)",
            t.name
        )));
    }
    t.expect_dtype(DType::F32)?;
    t.expect_shape(&[b, d, nch, n], "(b, d, ceil(l / chunk), n)")?;
    let want = [(d * nch * n) as isize, (nch * n) as isize, n as isize, 1];
    let ok = (0..4).all(|i| t.shape[i] <= 1 || t.strides[i] == want[i]);
    if !ok {
        return Err(Error::value(format!(
            "{}: expected a contiguous tensor, got strides {:?}",
            t.name, t.strides
        )));
    }
    Ok(Checkpoints { ptr: t.ptr, ts })
}

/// Whether the CUDA training forward saves checkpoints for these B, C (the
/// backward's fast kernel runs: n <= 16, time-varying B and C, groups of
/// whole 32-channel blocks); the rule of `_autograd._cuda_checkpoints`.
pub fn cuda_checkpoints(b: &TensorView, c: &TensorView, dims: ScanDims) -> bool {
    let (_, gb) = crate::cuda::scan::scan_bc(b);
    let (_, gc) = crate::cuda::scan::scan_bc(c);
    crate::cuda::scan_bwd::use_fast(dims.d, dims.n, gb, gc)
}

/// Validates a checkpoint tensor for the CUDA backward: float32 contiguous
/// (b, d, ceil(l / 32), n) on u's GPU, where `cuda_checkpoints` holds.
pub fn check_checkpoints_cuda(
    t: &TensorView,
    dims: ScanDims,
    device: Device,
    b: &TensorView,
    c: &TensorView,
) -> Result<()> {
    let ScanDims { b: nb, d, l, n } = dims;
    t.expect_device(device, "u")?;
    if !cuda_checkpoints(b, c, dims) {
        return Err(Error::value(format!(
            "{}: the CUDA backward takes checkpoints only for n <= 16 with time-varying B and C \
             whose groups hold whole blocks of 32 channels (the training forward returns an \
             empty tensor otherwise); pass None",
            t.name
        )));
    }
    t.expect_dtype(DType::F32)?;
    let nch = l.div_ceil(crate::cuda::scan::CK_CHUNK);
    t.expect_shape(&[nb, d, nch, n], "(b, d, ceil(l / 32), n)")?;
    let want = [(d * nch * n) as isize, (nch * n) as isize, n as isize, 1];
    if !(0..4).all(|i| t.shape[i] <= 1 || t.strides[i] == want[i]) {
        return Err(Error::value(format!(
            "{}: expected a contiguous tensor, got strides {:?}",
            t.name, t.strides
        )));
    }
    Ok(())
}

#[cfg(feature = "python")]
pub use py::register;

#[cfg(feature = "python")]
mod py {
    use super::*;
    use crate::args::Given;
    use crate::cpu::scan::scan_forward_ck;
    use crate::cpu::SimdLevel;
    use crate::error::catch_panic;
    use crate::ops::scan::{check_backend, check_scan, plan_scan, ScanViews};
    use crate::tensor::{alloc, alloc_reuse, current_stream};
    use pyo3::prelude::*;
    use pyo3::types::PyTuple;

    /// Forward selective scan for training: returns (out, last_state,
    /// checkpoints), checkpoints float32 (b, d, ceil(l / chunk), n) the states
    /// before every `chunk` steps, for `selective_scan_bwd`: on the CPU chunk
    /// = `checkpoint_chunk`, on CUDA 32 where `cuda_checkpoints` holds (else
    /// an empty (0,) tensor).
    #[pyfunction]
    #[pyo3(signature = (u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=Given(None), initial_state=None))]
    #[allow(non_snake_case, clippy::too_many_arguments)]
    fn selective_scan_fwd_ck<'py>(
        py: Python<'py>,
        u: &Bound<'py, PyAny>,
        delta: &Bound<'py, PyAny>,
        A: &Bound<'py, PyAny>,
        B: &Bound<'py, PyAny>,
        C: &Bound<'py, PyAny>,
        D: Option<&Bound<'py, PyAny>>,
        z: Option<&Bound<'py, PyAny>>,
        delta_bias: Option<&Bound<'py, PyAny>>,
        delta_softplus: Given<'py>,
        initial_state: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyTuple>> {
        let delta_softplus = crate::args::flag("delta_softplus", &delta_softplus, false)?;
        let v = ScanViews::extract("u", u, delta, A, B, C, D, z, delta_bias, initial_state)?;
        let (args, uv, bv, cv) = (v.args(), &v.u, &v.b, &v.c);
        let dims = check_scan(&args)?;
        check_backend(uv)?;
        let ScanDims { b, d, l, n } = dims;
        let f32_ = Some(DType::F32);
        if let Device::Cuda(ord) = uv.device {
            let ck_on = cuda_checkpoints(bv, cv, dims);
            let nch = if ck_on {
                l.div_ceil(crate::cuda::scan::CK_CHUNK)
            } else {
                0
            };
            let (out_o, out) = alloc("out", u, uv, &[b, d, l], None)?;
            let (last_o, last) = alloc("last_state", u, uv, &[b, d, n], f32_)?;
            let (ck_o, ck) = if ck_on {
                alloc("checkpoints", u, uv, &[b, d, nch, n], f32_)?
            } else {
                alloc("checkpoints", u, uv, &[0], f32_)?
            };
            let stream = current_stream(py, ord)?;
            let s =
                crate::ops::scan::plan_scan_cuda(&args, dims, delta_softplus, &out, Some(&last));
            let dt = uv.dtype;
            let ckp = crate::cuda::scan::ScanFwdCkParams {
                s,
                ck: ck.ptr as u64,
            };
            py.detach(|| {
                catch_panic("selective_scan_fn", || {
                    if ck_on {
                        crate::cuda::scan::scan_forward_ck(ord, stream, &ckp, dt)
                    } else {
                        crate::cuda::scan::scan_forward(ord, stream, &ckp.s, dt)
                    }
                })
            })?;
            return PyTuple::new(py, [out_o, last_o, ck_o]);
        }
        let nch = l.div_ceil(checkpoint_chunk(b, d, n, l));
        let (out_o, out) = alloc_reuse("out", u, uv, &[b, d, l], None)?;
        let (last_o, last) = alloc("last_state", u, uv, &[b, d, n], f32_)?;
        let (ck_o, ck) = alloc_reuse("checkpoints", u, uv, &[b, d, nch, n], f32_)?;
        let ckp = check_checkpoints(&ck, dims)?;
        let level = SimdLevel::current()?;
        let job = plan_scan(&args, dims, delta_softplus, &out, Some(&last));
        py.detach(|| {
            catch_panic("selective_scan_fn", || {
                scan_forward_ck(&job, level, Some(ckp));
                Ok(())
            })
        })?;
        PyTuple::new(py, [out_o, last_o, ck_o])
    }

    pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
        m.add_function(wrap_pyfunction!(selective_scan_fwd_ck, m)?)?;
        Ok(())
    }
}
