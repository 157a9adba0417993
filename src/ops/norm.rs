//! RMSNorm with a fused residual add, and SwiGLU (the pre-norm and the MLP
//! activation of the hybrid blocks, SPEC §5): argument checks, plans for both
//! backends, and the `#[pyfunction]`s. Tensors arrive as (rows, cols): the
//! Python layer flattens leading dimensions (python/mamba_attention/ops.py).

use crate::error::{Error, Result};
use crate::tensor::{DType, TensorView};

/// Largest rows / columns (the CUDA kernels index rows and columns with i32).
const MAX_DIM: usize = i32::MAX as usize;

/// Checks an (..., cols) tensor: float, at least 1-d, non-empty; returns
/// (rows, cols), rows the product of the leading dimensions.
fn check_rows(t: &TensorView, desc: &str) -> Result<(usize, usize)> {
    t.expect_float()?;
    if t.ndim() == 0 {
        return Err(Error::value(format!(
            "{}: expected a tensor of shape {desc} (at least 1-d), got a 0-d tensor",
            t.name
        )));
    }
    t.expect_nonempty()?;
    let c = t.shape[t.ndim() - 1];
    let r = t.numel() / c;
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

/// Checks the forward (x of any rank ≥ 1, residual of x's shape); returns
/// (rows, h).
pub fn check_rms(a: &RmsArgs) -> Result<(usize, usize)> {
    let (rows, h) = check_rows(a.x, "(..., h)")?;
    // weight (h,) sets h; x's last dimension must match it.
    let w = a.weight;
    w.expect_float()?;
    w.expect_device(a.x.device, a.x.name)?;
    w.expect_rank(1, "(h,)")?;
    if w.shape[0] != h {
        return Err(Error::value(format!(
            "{}: expected last dimension h = {} (from weight), got shape {}",
            a.x.name,
            w.shape[0],
            a.x.shape_str()
        )));
    }
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

/// Checks the backward, on (rows, h) views (the custom op flattens).
pub fn check_rms_bwd(a: &RmsBwdArgs) -> Result<(usize, usize)> {
    a.fwd.x.expect_rank(2, "(rows, h)")?;
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

/// Checks gate and up (and dout): equal (..., cols) shapes; returns (rows, cols).
pub fn check_swiglu(
    g: &TensorView,
    u: &TensorView,
    dy: Option<&TensorView>,
) -> Result<(usize, usize)> {
    let (rows, cols) = check_rows(g, "(..., cols)")?;
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
    use crate::args::{self, Given};
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

    /// An (..., cols) view as (rows, cols): the same memory where the leading
    /// dimensions collapse into one stride, else a copy (`obj.reshape`).
    fn rows_view(obj: &Bound<'_, PyAny>, mut v: TensorView) -> Result<TensorView> {
        if v.collapse_rows() {
            return Ok(v);
        }
        let c = v.shape[v.ndim() - 1];
        let rows = v.numel() / c;
        let r = obj
            .call_method1(pyo3::intern!(obj.py(), "reshape"), ((rows, c),))
            .map_err(|e| Error::runtime(format!("{}: could not copy it to rows: {e}", v.name)))?;
        let mut t = extract(v.name, &r)?;
        if !t.collapse_rows() {
            return Err(Error::runtime(format!(
                "{}: its reshaped copy is not a (rows, cols) view",
                v.name
            )));
        }
        if t._owner.is_none() {
            t._owner = Some(r.unbind());
        }
        Ok(t)
    }

    /// rms_norm_fn's inputs, read and checked (N-d, as given).
    struct RmsIn {
        x: TensorView,
        w: TensorView,
        b: Option<TensorView>,
        r: Option<TensorView>,
        eps: f32,
        prenorm: bool,
        fp32: bool,
        rows: usize,
        h: usize,
    }

    #[allow(clippy::too_many_arguments)]
    fn parse_rms(
        x: &Bound<'_, PyAny>,
        weight: &Bound<'_, PyAny>,
        bias: Option<&Bound<'_, PyAny>>,
        residual: Option<&Bound<'_, PyAny>>,
        eps: &Given<'_>,
        prenorm: &Given<'_>,
        residual_in_fp32: &Given<'_>,
    ) -> Result<RmsIn> {
        let eps = check_eps(args::float_or("eps", eps, 1e-6)?)?;
        let prenorm = args::flag("prenorm", prenorm, false)?;
        let fp32 = args::flag("residual_in_fp32", residual_in_fp32, false)?;
        let xv = extract("x", x)?;
        let wv = extract("weight", weight)?;
        let bv = extract_opt("bias", bias)?;
        let rv = extract_opt("residual", residual)?;
        let (rows, h) = check_rms(&RmsArgs {
            x: &xv,
            weight: &wv,
            bias: bv.as_ref(),
            residual: rv.as_ref(),
        })?;
        Ok(RmsIn {
            x: xv,
            w: wv,
            b: bv,
            r: rv,
            eps,
            prenorm,
            fp32,
            rows,
            h,
        })
    }

    /// RMSNorm forward on x (..., h): (out (x's shape), residual_out (x's
    /// shape) or None, rstd float32 (rows,)), rows the product of x's leading
    /// dimensions. `prenorm` returns the residual stream.
    #[pyfunction]
    #[pyo3(signature = (x, weight, bias=None, residual=None, eps=Given(None), prenorm=Given(None), residual_in_fp32=Given(None)))]
    #[allow(clippy::too_many_arguments)]
    fn rms_norm_fwd<'py>(
        py: Python<'py>,
        x: &Bound<'py, PyAny>,
        weight: &Bound<'py, PyAny>,
        bias: Option<&Bound<'py, PyAny>>,
        residual: Option<&Bound<'py, PyAny>>,
        eps: Given<'py>,
        prenorm: Given<'py>,
        residual_in_fp32: Given<'py>,
    ) -> PyResult<Bound<'py, PyTuple>> {
        let a = parse_rms(x, weight, bias, residual, &eps, &prenorm, &residual_in_fp32)?;
        let (rows, h, eps) = (a.rows, a.h, a.eps);
        let shape = a.x.shape.clone();
        let res_dt = residual_dtype(
            &RmsArgs {
                x: &a.x,
                weight: &a.w,
                bias: a.b.as_ref(),
                residual: a.r.as_ref(),
            },
            a.fp32,
        );
        let xv = rows_view(x, a.x)?;
        let rv = match (residual, a.r) {
            (Some(o), Some(v)) => Some(rows_view(o, v)?),
            _ => None,
        };
        let (wv, bv) = (a.w, a.b);
        let (out_obj, mut out) = alloc("out", x, &xv, &shape, None)?;
        let res_out = if a.prenorm {
            let (o, mut v) = alloc("residual_out", x, &xv, &shape, Some(res_dt))?;
            v.collapse_rows();
            Some((o, v))
        } else {
            None
        };
        out.collapse_rows();
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
        let shape = gv.shape.clone();
        let udt = uv.dtype;
        let gv = rows_view(gate, gv)?;
        let uv = rows_view(up, uv)?;
        let dyv = match (dout, dyv) {
            (Some(d), Some(v)) => Some(rows_view(d, v)?),
            _ => None,
        };
        let (o_obj, mut o) = alloc(
            if dyv.is_some() { "dgate" } else { "out" },
            gate,
            &gv,
            &shape,
            None,
        )?;
        o.collapse_rows();
        let du = match &dyv {
            Some(_) => {
                let (d, mut v) = alloc("dup", gate, &gv, &shape, Some(udt))?;
                v.collapse_rows();
                Some((d, v))
            }
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

    /// Checks rms_norm_fn's arguments without running it (the custom-op path
    /// of `ops.rms_norm_fn` calls it first); returns (eps, prenorm,
    /// residual_in_fp32) parsed.
    #[pyfunction]
    #[pyo3(signature = (x, weight, bias=None, residual=None, eps=Given(None), prenorm=Given(None), residual_in_fp32=Given(None)))]
    #[allow(clippy::too_many_arguments)]
    fn rms_norm_check(
        x: &Bound<'_, PyAny>,
        weight: &Bound<'_, PyAny>,
        bias: Option<&Bound<'_, PyAny>>,
        residual: Option<&Bound<'_, PyAny>>,
        eps: Given<'_>,
        prenorm: Given<'_>,
        residual_in_fp32: Given<'_>,
    ) -> PyResult<(f64, bool, bool)> {
        let eps_given = args::float_or("eps", &eps, 1e-6)?;
        let a = parse_rms(x, weight, bias, residual, &eps, &prenorm, &residual_in_fp32)?;
        Ok((eps_given, a.prenorm, a.fp32))
    }

    /// Checks swiglu's arguments without running it.
    #[pyfunction]
    fn swiglu_check(gate: &Bound<'_, PyAny>, up: &Bound<'_, PyAny>) -> PyResult<()> {
        let gv = extract("gate", gate)?;
        let uv = extract("up", up)?;
        check_swiglu(&gv, &uv, None)?;
        Ok(())
    }

    /// silu(gate)·up on (..., cols), in gate's dtype and shape.
    #[pyfunction]
    fn swiglu_fwd<'py>(
        py: Python<'py>,
        gate: &Bound<'py, PyAny>,
        up: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        Ok(run_swiglu(py, gate, up, None)?.remove(0))
    }

    /// Gradients of swiglu: (dgate in gate's dtype, dup in up's dtype), of
    /// gate's shape.
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
        m.add_function(wrap_pyfunction!(rms_norm_check, m)?)?;
        m.add_function(wrap_pyfunction!(swiglu_check, m)?)?;
        Ok(())
    }
}
