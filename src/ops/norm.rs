//! RMSNorm with a fused residual add, and SwiGLU (the pre-norm and the MLP
//! activation of the hybrid blocks, SPEC §5): argument checks, plans for both
//! backends, and the `#[pyfunction]`s. Tensors arrive as (rows, cols): the
//! Python layer flattens leading dimensions (python/mamba_attention/ops.py).

use crate::error::{Error, Result};
use crate::tensor::{DType, TensorView};

/// Largest rows / columns (the CUDA kernels index rows and columns with i32).
const MAX_DIM: usize = i32::MAX as usize;

fn check_2d(t: &TensorView, desc: &str) -> Result<(usize, usize)> {
    t.expect_float()?;
    t.expect_rank(2, desc)?;
    t.expect_nonempty()?;
    let (r, c) = (t.shape[0], t.shape[1]);
    if let crate::tensor::Device::Cuda(_) = t.device {
        crate::cuda::check_dims(t)?;
    }
    if r > MAX_DIM || c > MAX_DIM {
        return Err(Error::value(format!(
            "{}: dimensions above 2**31 - 1 are not supported, got shape {}",
            t.name,
            t.shape_str()
        )));
    }
    Ok((r, c))
}

fn check_like(t: &TensorView, like: &TensorView) -> Result<()> {
    t.expect_float()?;
    t.expect_device(like.device, like.name)?;
    t.expect_shape(&like.shape, "like ").map_err(|_| {
        Error::value(format!(
            "{}: expected the shape of {} {}, got {}",
            t.name,
            like.name,
            like.shape_str(),
            t.shape_str()
        ))
    })
}

fn check_vec(t: &TensorView, h: usize, x: &TensorView) -> Result<()> {
    t.expect_float()?;
    t.expect_device(x.device, x.name)?;
    t.expect_shape(&[h], "(h,)").map_err(|_| {
        Error::value(format!(
            "{}: expected shape (h,) = ({h},) with h the last dimension of {} {}, got {}",
            t.name,
            x.name,
            x.shape_str(),
            t.shape_str()
        ))
    })
}

/// The RMSNorm forward's inputs.
pub struct RmsArgs<'a> {
    pub x: &'a TensorView,
    pub weight: &'a TensorView,
    pub bias: Option<&'a TensorView>,
    pub residual: Option<&'a TensorView>,
}

/// Checks the forward; returns (rows, h).
pub fn check_rms(a: &RmsArgs) -> Result<(usize, usize)> {
    let (rows, h) = check_2d(a.x, "(rows, h)")?;
    check_vec(a.weight, h, a.x)?;
    if let Some(b) = a.bias {
        check_vec(b, h, a.x)?;
    }
    if let Some(r) = a.residual {
        check_like(r, a.x)?;
    }
    Ok((rows, h))
}

/// The dtype of the returned residual stream: the residual's if given, else
/// float32 with `residual_in_fp32`, else x's (as mamba_ssm's rms_norm_fn).
pub fn residual_dtype(a: &RmsArgs, residual_in_fp32: bool) -> DType {
    match a.residual {
        Some(r) => r.dtype,
        None if residual_in_fp32 => DType::F32,
        None => a.x.dtype,
    }
}

/// The RMSNorm backward's inputs (x and residual as in the forward).
pub struct RmsBwdArgs<'a> {
    pub fwd: RmsArgs<'a>,
    pub rstd: &'a TensorView,
    pub dy: &'a TensorView,
    pub dres_out: Option<&'a TensorView>,
}

pub fn check_rms_bwd(a: &RmsBwdArgs) -> Result<(usize, usize)> {
    let (rows, h) = check_rms(&a.fwd)?;
    check_like(a.dy, a.fwd.x)?;
    if let Some(d) = a.dres_out {
        check_like(d, a.fwd.x)?;
    }
    a.rstd.expect_device(a.fwd.x.device, "x")?;
    a.rstd.expect_dtype(DType::F32)?;
    a.rstd.expect_shape(&[rows], "(rows,)")?;
    Ok((rows, h))
}

/// Checks gate and up (and dout): equal (rows, cols) shapes; returns them.
pub fn check_swiglu(
    g: &TensorView,
    u: &TensorView,
    dy: Option<&TensorView>,
) -> Result<(usize, usize)> {
    let (rows, cols) = check_2d(g, "(rows, cols)")?;
    check_like(u, g)?;
    if let Some(d) = dy {
        check_like(d, g)?;
    }
    Ok((rows, cols))
}

#[cfg(feature = "python")]
pub use py::register;

#[cfg(feature = "python")]
mod py {
    use super::*;
    use crate::cpu::norm::{RmsNormBwdJob, RmsNormJob, SwiGluJob};
    use crate::cuda::norm::{RmsNormBwdParams, RmsNormParams, SwiGluParams};
    use crate::cuda::scan::Tensor4;
    use crate::tensor::Device;

    fn check_eps(eps: f64) -> Result<f32> {
        if !(eps.is_finite() && eps >= 0.0) {
            return Err(Error::value(format!(
                "eps: expected a finite number >= 0, got {eps}"
            )));
        }
        Ok(eps as f32)
    }

    fn t4(t: &TensorView) -> Tensor4 {
        Tensor4::of(t)
    }

    fn t4o(t: Option<&TensorView>) -> Tensor4 {
        Tensor4::opt(t)
    }

    use crate::cpu::norm::{rms_norm_backward, rms_norm_forward, swiglu};
    use crate::cpu::SimdLevel;
    use crate::error::catch_panic;
    use crate::tensor::{alloc, current_stream, extract, extract_opt};
    use pyo3::prelude::*;
    use pyo3::types::PyTuple;

    /// RMSNorm forward on (rows, h): (out, residual_out or None, rstd float32 (rows,)).
    #[pyfunction]
    #[pyo3(signature = (x, weight, bias=None, residual=None, eps=1e-6, store_residual=false, residual_in_fp32=false))]
    #[allow(clippy::too_many_arguments)]
    fn rms_norm_fwd<'py>(
        py: Python<'py>,
        x: &Bound<'py, PyAny>,
        weight: &Bound<'py, PyAny>,
        bias: Option<&Bound<'py, PyAny>>,
        residual: Option<&Bound<'py, PyAny>>,
        eps: f64,
        store_residual: bool,
        residual_in_fp32: bool,
    ) -> PyResult<Bound<'py, PyTuple>> {
        let xv = extract("x", x)?;
        let wv = extract("weight", weight)?;
        let bv = extract_opt("bias", bias)?;
        let rv = extract_opt("residual", residual)?;
        let eps = check_eps(eps)?;
        let args = RmsArgs {
            x: &xv,
            weight: &wv,
            bias: bv.as_ref(),
            residual: rv.as_ref(),
        };
        let (rows, h) = check_rms(&args)?;
        let (out_obj, out) = alloc("out", x, &xv, &[rows, h], None)?;
        let res_out = if store_residual {
            let dt = residual_dtype(&args, residual_in_fp32);
            Some(alloc("residual_out", x, &xv, &[rows, h], Some(dt))?)
        } else {
            None
        };
        let (rstd_obj, rstd) = alloc("rstd", x, &xv, &[rows], Some(DType::F32))?;
        let ro = res_out.as_ref().map(|r| &r.1);
        match xv.device {
            Device::Cpu => {
                let level = SimdLevel::current()?;
                let job = RmsNormJob {
                    rows,
                    h,
                    eps,
                    x: xv.raw(),
                    res: rv.as_ref().map(|r| r.raw()),
                    w: wv.raw(),
                    b: bv.as_ref().map(|b| b.raw()),
                    out: out.raw(),
                    res_out: ro.map(|r| r.raw()),
                    rstd: rstd.raw(),
                };
                py.detach(|| {
                    catch_panic("rms_norm_fn", || {
                        rms_norm_forward(&job, level);
                        Ok(())
                    })
                })?;
            }
            Device::Cuda(ord) => {
                let stream = current_stream(py, ord)?;
                let p = RmsNormParams {
                    rows: rows as i32,
                    h: h as i32,
                    eps,
                    _pad: 0,
                    x: t4(&xv),
                    res: t4o(rv.as_ref()),
                    w: t4(&wv),
                    b: t4o(bv.as_ref()),
                    out: t4(&out),
                    res_out: t4o(ro),
                    rstd: t4(&rstd),
                };
                py.detach(|| {
                    catch_panic("rms_norm_fn", || {
                        crate::cuda::norm::rms_norm_forward(ord, stream, &p)
                    })
                })?;
            }
        }
        let none = py.None().into_bound(py);
        PyTuple::new(py, [out_obj, res_out.map_or(none, |r| r.0), rstd_obj])
    }

    /// RMSNorm backward: (dx, dweight float32, dbias float32 or None,
    /// dresidual or None). `dresidual_out` is the gradient of the returned
    /// residual stream (pre-norm form), added to dx.
    #[pyfunction]
    #[pyo3(signature = (dy, x, weight, rstd, bias=None, residual=None, dresidual_out=None))]
    #[allow(clippy::too_many_arguments)]
    fn rms_norm_bwd<'py>(
        py: Python<'py>,
        dy: &Bound<'py, PyAny>,
        x: &Bound<'py, PyAny>,
        weight: &Bound<'py, PyAny>,
        rstd: &Bound<'py, PyAny>,
        bias: Option<&Bound<'py, PyAny>>,
        residual: Option<&Bound<'py, PyAny>>,
        dresidual_out: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyTuple>> {
        let dyv = extract("dy", dy)?;
        let xv = extract("x", x)?;
        let wv = extract("weight", weight)?;
        let sv = extract("rstd", rstd)?;
        let bv = extract_opt("bias", bias)?;
        let rv = extract_opt("residual", residual)?;
        let dv = extract_opt("dresidual_out", dresidual_out)?;
        let args = RmsBwdArgs {
            fwd: RmsArgs {
                x: &xv,
                weight: &wv,
                bias: bv.as_ref(),
                residual: rv.as_ref(),
            },
            rstd: &sv,
            dy: &dyv,
            dres_out: dv.as_ref(),
        };
        let (rows, h) = check_rms_bwd(&args)?;
        let (dx_obj, dx) = alloc("dx", x, &xv, &[rows, h], None)?;
        let (dw_obj, dw) = alloc("dweight", x, &xv, &[h], Some(DType::F32))?;
        let db = match &bv {
            Some(_) => Some(alloc("dbias", x, &xv, &[h], Some(DType::F32))?),
            None => None,
        };
        let dres = match &rv {
            Some(r) => Some(alloc("dresidual", x, &xv, &[rows, h], Some(r.dtype))?),
            None => None,
        };
        let (dbv, drv) = (db.as_ref().map(|t| &t.1), dres.as_ref().map(|t| &t.1));
        match xv.device {
            Device::Cpu => {
                let level = SimdLevel::current()?;
                let job = RmsNormBwdJob {
                    rows,
                    h,
                    x: xv.raw(),
                    res: rv.as_ref().map(|r| r.raw()),
                    w: wv.raw(),
                    rstd: sv.raw(),
                    dy: dyv.raw(),
                    dres_out: dv.as_ref().map(|r| r.raw()),
                    dx: dx.raw(),
                    dres: drv.map(|r| r.raw()),
                    dw: dw.raw(),
                    db: dbv.map(|r| r.raw()),
                };
                py.detach(|| {
                    catch_panic("rms_norm_fn backward", || {
                        rms_norm_backward(&job, level);
                        Ok(())
                    })
                })?;
            }
            Device::Cuda(ord) => {
                let stream = current_stream(py, ord)?;
                let nblk = crate::cuda::norm::bwd_blocks(rows);
                let (_part_obj, part) = alloc("partial", x, &xv, &[nblk, 2 * h], Some(DType::F32))?;
                let p = RmsNormBwdParams {
                    rows: rows as i32,
                    h: h as i32,
                    nblk: nblk as i32,
                    _pad: 0,
                    x: t4(&xv),
                    res: t4o(rv.as_ref()),
                    w: t4(&wv),
                    rstd: t4(&sv),
                    dy: t4(&dyv),
                    dres_out: t4o(dv.as_ref()),
                    dx: t4(&dx),
                    dres: t4o(drv),
                    partial: t4(&part),
                    dw: t4(&dw),
                    db: t4o(dbv),
                };
                // `_part_obj` lives until after the launch; torch's caching
                // allocator orders its reuse on the same stream.
                py.detach(|| {
                    catch_panic("rms_norm_fn backward", || {
                        crate::cuda::norm::rms_norm_backward(ord, stream, &p)
                    })
                })?;
            }
        }
        let none = || py.None().into_bound(py);
        PyTuple::new(
            py,
            [
                dx_obj,
                dw_obj,
                db.map_or_else(none, |t| t.0),
                dres.map_or_else(none, |t| t.0),
            ],
        )
    }

    fn run_swiglu<'py>(
        py: Python<'py>,
        gate: &Bound<'py, PyAny>,
        up: &Bound<'py, PyAny>,
        dout: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Vec<Bound<'py, PyAny>>> {
        let gv = extract("gate", gate)?;
        let uv = extract("up", up)?;
        let dyv = match dout {
            Some(d) => Some(extract("dout", d)?),
            None => None,
        };
        let (rows, cols) = check_swiglu(&gv, &uv, dyv.as_ref())?;
        let (o_obj, o) = alloc(
            if dyv.is_some() { "dgate" } else { "out" },
            gate,
            &gv,
            &[rows, cols],
            None,
        )?;
        let du = match &dyv {
            Some(_) => Some(alloc("dup", gate, &gv, &[rows, cols], Some(uv.dtype))?),
            None => None,
        };
        let duv = du.as_ref().map(|t| &t.1);
        match gv.device {
            Device::Cpu => {
                let level = SimdLevel::current()?;
                let job = SwiGluJob {
                    rows,
                    cols,
                    g: gv.raw(),
                    u: uv.raw(),
                    out: o.raw(),
                    dy: dyv.as_ref().map(|d| d.raw()),
                    du: duv.map(|d| d.raw()),
                };
                py.detach(|| {
                    catch_panic("swiglu", || {
                        swiglu(&job, level);
                        Ok(())
                    })
                })?;
            }
            Device::Cuda(ord) => {
                let stream = current_stream(py, ord)?;
                let p = SwiGluParams {
                    rows: rows as i32,
                    cols: cols as i32,
                    g: t4(&gv),
                    u: t4(&uv),
                    out: t4(&o),
                    dy: t4o(dyv.as_ref()),
                    du: t4o(duv),
                };
                let bwd = dyv.is_some();
                py.detach(|| {
                    catch_panic("swiglu", || crate::cuda::norm::swiglu(ord, stream, &p, bwd))
                })?;
            }
        }
        let mut res = vec![o_obj];
        if let Some((d, _)) = du {
            res.push(d);
        }
        Ok(res)
    }

    /// silu(gate)·up on (rows, cols), in gate's dtype.
    #[pyfunction]
    fn swiglu_fwd<'py>(
        py: Python<'py>,
        gate: &Bound<'py, PyAny>,
        up: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        Ok(run_swiglu(py, gate, up, None)?.remove(0))
    }

    /// Gradients of swiglu: (dgate in gate's dtype, dup in up's dtype).
    #[pyfunction]
    fn swiglu_bwd<'py>(
        py: Python<'py>,
        gate: &Bound<'py, PyAny>,
        up: &Bound<'py, PyAny>,
        dout: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyTuple>> {
        PyTuple::new(py, run_swiglu(py, gate, up, Some(dout))?)
    }

    pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
        m.add_function(wrap_pyfunction!(rms_norm_fwd, m)?)?;
        m.add_function(wrap_pyfunction!(rms_norm_bwd, m)?)?;
        m.add_function(wrap_pyfunction!(swiglu_fwd, m)?)?;
        m.add_function(wrap_pyfunction!(swiglu_bwd, m)?)?;
        Ok(())
    }
}
