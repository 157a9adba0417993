//! `causal_conv1d_fn`, `causal_conv1d_update` and the conv1d backward
//! (SPEC §2): argument checking and the kernel plan, for the CPU and CUDA
//! (kernels/causal_conv1d.cu) backends.

use crate::cpu::conv1d::{ConvBwdJob, ConvJob, ConvUpdateJob, MAX_W, MIN_W};
use crate::error::{Error, Result};
use crate::tensor::{Device, Raw, TensorView};

fn check_common(t: &TensorView, device: Device, of: &str) -> Result<()> {
    t.expect_float()?;
    t.expect_nonempty()?;
    t.expect_device(device, of)
}

/// `activation`: None → identity; "silu" / "swish" → SiLU.
pub fn parse_activation(a: Option<&str>) -> Result<bool> {
    match a {
        None => Ok(false),
        Some("silu") | Some("swish") => Ok(true),
        Some(s) => Err(Error::value(format!(
            "activation: expected None, \"silu\" or \"swish\", got {s:?}"
        ))),
    }
}

/// The CUDA forward kernel (kernels/causal_conv1d.cu).
pub const FWD_KERNEL: &str = "causal_conv1d_fwd2";

/// Device-specific limits: CUDA takes torch tensors of float32/16/bf16 x.
pub fn check_backend(t: &TensorView, _op: &str) -> Result<()> {
    crate::ops::scan::check_backend(t)
}

/// A view as Tensor4 (strides padded with 0); a (b, d) tensor as (b, d, 1).
#[cfg(feature = "python")]
fn t4(t: &TensorView) -> crate::cuda::scan::Tensor4 {
    crate::cuda::scan::Tensor4::of(t)
}
#[cfg(feature = "python")]
fn t4o(t: Option<&TensorView>) -> crate::cuda::scan::Tensor4 {
    crate::cuda::scan::Tensor4::opt(t)
}

/// Checks weight (d, w) with 2 ≤ w ≤ 8 and bias (d,); returns w.
fn check_weight(
    weight: &TensorView,
    bias: Option<&TensorView>,
    d: usize,
    dev: Device,
    of: &str,
) -> Result<usize> {
    check_common(weight, dev, of)?;
    weight.expect_rank(2, "(d, w)")?;
    let w = weight.shape[1];
    if weight.shape[0] != d {
        return Err(Error::value(format!(
            "{}: expected shape (d, w) with d = {d} (from {of}), got {}",
            weight.name,
            weight.shape_str()
        )));
    }
    if !(MIN_W..=MAX_W).contains(&w) {
        return Err(Error::value(format!(
            "{}: the width w = {w} (dimension 1 of shape {}) must be between {MIN_W} and {MAX_W}",
            weight.name,
            weight.shape_str()
        )));
    }
    if let Some(bv) = bias {
        check_common(bv, dev, of)?;
        bv.expect_shape(&[d], "(d,)")?;
    }
    Ok(w)
}

pub struct ConvArgs<'a> {
    pub x: &'a TensorView,
    pub weight: &'a TensorView,
    pub bias: Option<&'a TensorView>,
    pub initial_states: Option<&'a TensorView>,
}

/// Validates the forward arguments; returns (b, d, l, w).
pub fn check_conv(a: &ConvArgs) -> Result<(usize, usize, usize, usize)> {
    let x = a.x;
    x.expect_float()?;
    x.expect_rank(3, "(b, d, l)")?;
    x.expect_nonempty()?;
    let (b, d, l) = (x.shape[0], x.shape[1], x.shape[2]);
    let w = check_weight(a.weight, a.bias, d, x.device, "x")?;
    if let Some(s) = a.initial_states {
        check_common(s, x.device, "x")?;
        s.expect_shape(&[b, d, w - 1], "(b, d, w - 1)")?;
    }
    Ok((b, d, l, w))
}

pub fn plan_conv(
    a: &ConvArgs,
    dims: (usize, usize, usize, usize),
    silu: bool,
    out: &TensorView,
    last: Option<&TensorView>,
) -> ConvJob {
    let (b, d, l, w) = dims;
    ConvJob {
        b,
        d,
        l,
        w,
        x: a.x.raw(),
        out: out.raw(),
        weight: a.weight.to_f32_vec(),
        bias: a.bias.map(|t| t.to_f32_vec()),
        init: a.initial_states.map(|t| t.raw()),
        last: last.map(|t| t.raw()),
        silu,
    }
}

/// A (b, d) tensor as a (b, d, 1) raw view.
fn raw3(t: &TensorView) -> Raw<3> {
    if t.ndim() == 2 {
        Raw {
            ptr: t.ptr,
            dtype: t.dtype,
            strides: [t.strides[0], t.strides[1], 0],
        }
    } else {
        t.raw()
    }
}

pub struct ConvUpdateArgs<'a> {
    pub x: &'a TensorView,
    pub conv_state: &'a TensorView,
    pub weight: &'a TensorView,
    pub bias: Option<&'a TensorView>,
    pub cache_seqlens: Option<&'a TensorView>,
}

/// Validates an update; returns (b, d, l_new, w, state_len, cache_seqlens).
#[allow(clippy::type_complexity)]
pub fn check_conv_update(
    a: &ConvUpdateArgs,
) -> Result<(usize, usize, usize, usize, usize, Option<Vec<i64>>)> {
    let x = a.x;
    x.expect_float()?;
    if x.ndim() != 2 && x.ndim() != 3 {
        return Err(Error::value(format!(
            "x: expected shape (b, d) or (b, d, l_new), got a {}-d tensor of shape {}",
            x.ndim(),
            x.shape_str()
        )));
    }
    x.expect_nonempty()?;
    let dev = x.device;
    let (b, d) = (x.shape[0], x.shape[1]);
    let l = if x.ndim() == 3 { x.shape[2] } else { 1 };
    let w = check_weight(a.weight, a.bias, d, dev, "x")?;
    let s = a.conv_state;
    check_common(s, dev, "x")?;
    s.expect_writable()?;
    s.expect_rank(3, "(b, d, state_len)")?;
    let sl = s.shape[2];
    if s.shape[0] != b || s.shape[1] != d || sl < w - 1 {
        return Err(Error::value(format!(
            "conv_state: expected shape (b, d, state_len) = ({b}, {d}, state_len ≥ w - 1 = {}), got {}",
            w - 1,
            s.shape_str()
        )));
    }
    let seqlens = match a.cache_seqlens {
        None => None,
        Some(c) => {
            c.expect_device(dev, "x")?;
            if !c.dtype.is_int() {
                return Err(Error::type_(format!(
                    "cache_seqlens: expected an integer (int32) tensor, got {}",
                    c.dtype.name()
                )));
            }
            c.expect_shape(&[b], "(b,)")?;
            if dev != Device::Cpu
                && !matches!(
                    c.dtype,
                    crate::tensor::DType::I32 | crate::tensor::DType::I64
                )
            {
                return Err(Error::type_(format!(
                    "cache_seqlens: expected an int32 or int64 tensor, got {}",
                    c.dtype.name()
                )));
            }
            if dev == Device::Cpu {
                Some(c.to_i64_vec()?)
            } else {
                None
            }
        }
    };
    Ok((b, d, l, w, sl, seqlens))
}

pub fn plan_conv_update(
    a: &ConvUpdateArgs,
    dims: (usize, usize, usize, usize, usize, Option<Vec<i64>>),
    silu: bool,
    out: &TensorView,
) -> ConvUpdateJob {
    let (b, d, l, w, state_len, seqlens) = dims;
    ConvUpdateJob {
        b,
        d,
        l,
        w,
        state_len,
        x: raw3(a.x),
        out: raw3(out),
        state: a.conv_state.raw(),
        weight: a.weight.to_f32_vec(),
        bias: a.bias.map(|t| t.to_f32_vec()),
        silu,
        seqlens,
    }
}

pub struct ConvBwdArgs<'a> {
    pub fwd: ConvArgs<'a>,
    pub dout: &'a TensorView,
    pub dfinal_states: Option<&'a TensorView>,
}

pub fn check_conv_bwd(a: &ConvBwdArgs) -> Result<(usize, usize, usize, usize)> {
    let dims = check_conv(&a.fwd)?;
    let (b, d, l, w) = dims;
    check_common(a.dout, a.fwd.x.device, "x")?;
    a.dout.expect_shape(&[b, d, l], "(b, d, l)")?;
    if let Some(t) = a.dfinal_states {
        check_common(t, a.fwd.x.device, "x")?;
        t.expect_shape(&[b, d, w - 1], "(b, d, w - 1)")?;
    }
    Ok(dims)
}

pub struct ConvBwdOut<'a> {
    pub dx: &'a TensorView,
    pub dweight: &'a TensorView,
    pub dbias: Option<&'a TensorView>,
    pub dinit: Option<&'a TensorView>,
}

pub fn plan_conv_bwd(
    a: &ConvBwdArgs,
    dims: (usize, usize, usize, usize),
    silu: bool,
    o: &ConvBwdOut,
) -> ConvBwdJob {
    let (b, d, l, w) = dims;
    ConvBwdJob {
        b,
        d,
        l,
        w,
        x: a.fwd.x.raw(),
        dout: a.dout.raw(),
        init: a.fwd.initial_states.map(|t| t.raw()),
        dfinal: a.dfinal_states.map(|t| t.raw()),
        weight: a.fwd.weight.to_f32_vec(),
        bias: a.fwd.bias.map(|t| t.to_f32_vec()),
        silu,
        dx: o.dx.raw(),
        dinit: o.dinit.map(|t| t.raw()),
        dweight: o.dweight.raw(),
        dbias: o.dbias.map(|t| t.raw()),
    }
}

#[cfg(feature = "python")]
pub(crate) use py::activation_arg;
#[cfg(feature = "python")]
pub use py::register;

#[cfg(feature = "python")]
mod py {
    use super::*;
    use crate::args::Given;
    use crate::cpu::conv1d::{conv_backward, conv_forward, conv_update};
    use crate::cpu::SimdLevel;
    use crate::cuda::conv1d::ConvParams;
    use crate::error::catch_panic;
    use crate::tensor::{alloc, check_writes, current_stream, extract, extract_opt, DType};
    use pyo3::prelude::*;
    use pyo3::types::{PyString, PyTuple};

    /// `activation` read by hand, so that a non-string names the argument.
    pub(crate) fn activation_arg(a: Option<&Bound<'_, PyAny>>) -> Result<bool> {
        match a {
            None => Ok(false),
            Some(o) if o.is_none() => Ok(false),
            Some(o) => match o.cast::<PyString>() {
                Ok(s) => parse_activation(Some(&s.to_string_lossy())),
                Err(_) => Err(Error::type_(format!(
                    "activation: expected None, \"silu\" or \"swish\", got an object of type {}",
                    o.get_type()
                        .name()
                        .map(|n| n.to_string())
                        .unwrap_or_else(|_| "?".into())
                ))),
            },
        }
    }

    /// Causal depthwise conv1d forward; see `mamba_attention.ops.causal_conv1d_fn`.
    #[pyfunction]
    #[pyo3(signature = (x, weight, bias=None, initial_states=None, return_final_states=Given(None), activation=None))]
    fn causal_conv1d_fwd<'py>(
        py: Python<'py>,
        x: &Bound<'py, PyAny>,
        weight: &Bound<'py, PyAny>,
        bias: Option<&Bound<'py, PyAny>>,
        initial_states: Option<&Bound<'py, PyAny>>,
        return_final_states: Given<'py>,
        activation: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let return_final_states =
            crate::args::flag("return_final_states", &return_final_states, false)?;
        let silu = activation_arg(activation)?;
        let xv = extract("x", x)?;
        let wv = extract("weight", weight)?;
        let bv = extract_opt("bias", bias)?;
        let iv = extract_opt("initial_states", initial_states)?;
        let args = ConvArgs {
            x: &xv,
            weight: &wv,
            bias: bv.as_ref(),
            initial_states: iv.as_ref(),
        };
        // CUDA: torch tensors, float32/16/bf16 x (before any other check, as before).
        check_backend(&xv, "causal_conv1d_fn")?;
        let dims = check_conv(&args)?;
        let (b, d, l, w) = dims;
        let (out_obj, out) = alloc("out", x, &xv, &[b, d, l], None)?;
        let last = if return_final_states {
            Some(alloc("final_states", x, &xv, &[b, d, w - 1], None)?)
        } else {
            None
        };
        if let Device::Cuda(ord) = xv.device {
            let p = ConvParams {
                b: b as i32,
                d: d as i32,
                l: l as i32,
                w: w as i32,
                silu: silu as i32,
                x: t4(&xv),
                weight: t4(&wv),
                bias: t4o(bv.as_ref()),
                init: t4o(iv.as_ref()),
                out: t4(&out),
                fin: t4o(last.as_ref().map(|l| &l.1)),
                ..Default::default()
            };
            let stream = current_stream(py, ord)?;
            py.detach(|| {
                catch_panic("causal_conv1d_fn", || {
                    crate::cuda::conv1d::conv_launch(ord, stream, FWD_KERNEL, &p)
                })
            })?;
        } else {
            let level = SimdLevel::current()?;
            let job = plan_conv(&args, dims, silu, &out, last.as_ref().map(|l| &l.1));
            py.detach(|| {
                catch_panic("causal_conv1d_fn", || {
                    conv_forward(&job, level);
                    Ok(())
                })
            })?;
        }
        match last {
            Some((lo, _)) => Ok(PyTuple::new(py, [out_obj, lo])?.into_any()),
            None => Ok(out_obj),
        }
    }

    /// Decoding step(s) of the causal conv1d; see `mamba_attention.ops.causal_conv1d_update`.
    #[pyfunction]
    #[pyo3(signature = (x, conv_state, weight, bias=None, activation=None, cache_seqlens=None))]
    fn causal_conv1d_update<'py>(
        py: Python<'py>,
        x: &Bound<'py, PyAny>,
        conv_state: &Bound<'py, PyAny>,
        weight: &Bound<'py, PyAny>,
        bias: Option<&Bound<'py, PyAny>>,
        activation: Option<&Bound<'py, PyAny>>,
        cache_seqlens: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let silu = activation_arg(activation)?;
        let xv = extract("x", x)?;
        let sv = extract("conv_state", conv_state)?;
        let wv = extract("weight", weight)?;
        let bv = extract_opt("bias", bias)?;
        let cv = extract_opt("cache_seqlens", cache_seqlens)?;
        let args = ConvUpdateArgs {
            x: &xv,
            conv_state: &sv,
            weight: &wv,
            bias: bv.as_ref(),
            cache_seqlens: cv.as_ref(),
        };
        // CUDA: torch tensors, float32/16/bf16 x (before any other check, as before).
        check_backend(&xv, "causal_conv1d_update")?;
        let dims = check_conv_update(&args)?;
        let read: Vec<&TensorView> = [&xv, &wv].into_iter().chain(bv.iter().chain(&cv)).collect();
        check_writes(&[&sv], &read)?;
        if let Device::Cuda(_) = xv.device {
            crate::cuda::check_dims(&sv)?;
        }
        let (out_obj, out) = alloc("out", x, &xv, &xv.shape, None)?;
        if let Device::Cuda(ord) = xv.device {
            let (b, d, l, w, sl, _) = dims;
            let p = ConvParams {
                b: b as i32,
                d: d as i32,
                l: l as i32,
                w: w as i32,
                silu: silu as i32,
                state_len: sl as i32,
                x: t4(&xv),
                weight: t4(&wv),
                bias: t4o(bv.as_ref()),
                out: t4(&out),
                state: t4(&sv),
                seqlens: t4o(cv.as_ref()),
                ..Default::default()
            };
            let stream = current_stream(py, ord)?;
            py.detach(|| {
                catch_panic("causal_conv1d_update", || {
                    crate::cuda::conv1d::conv_update(ord, stream, &p)
                })
            })?;
            return Ok(out_obj);
        }
        let job = plan_conv_update(&args, dims, silu, &out);
        py.detach(|| {
            catch_panic("causal_conv1d_update", || {
                conv_update(&job);
                Ok(())
            })
        })?;
        Ok(out_obj)
    }

    /// Backward of `causal_conv1d_fn`: (dx, dweight float32 (d, w), dbias
    /// float32 (d,) or None, dinitial_states or None).
    #[pyfunction]
    #[pyo3(signature = (x, weight, bias, initial_states, dout, dfinal_states=None, activation=None))]
    #[allow(clippy::too_many_arguments)]
    fn causal_conv1d_bwd<'py>(
        py: Python<'py>,
        x: &Bound<'py, PyAny>,
        weight: &Bound<'py, PyAny>,
        bias: Option<&Bound<'py, PyAny>>,
        initial_states: Option<&Bound<'py, PyAny>>,
        dout: &Bound<'py, PyAny>,
        dfinal_states: Option<&Bound<'py, PyAny>>,
        activation: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyTuple>> {
        let silu = activation_arg(activation)?;
        let xv = extract("x", x)?;
        let wv = extract("weight", weight)?;
        let bv = extract_opt("bias", bias)?;
        let iv = extract_opt("initial_states", initial_states)?;
        let dov = extract("dout", dout)?;
        let dfv = extract_opt("dfinal_states", dfinal_states)?;
        let args = ConvBwdArgs {
            fwd: ConvArgs {
                x: &xv,
                weight: &wv,
                bias: bv.as_ref(),
                initial_states: iv.as_ref(),
            },
            dout: &dov,
            dfinal_states: dfv.as_ref(),
        };
        // CUDA: torch tensors, float32/16/bf16 x (before any other check, as before).
        check_backend(&xv, "causal_conv1d_bwd")?;
        let dims = check_conv_bwd(&args)?;
        let (b, d, l, w) = dims;
        let (dx_obj, dx) = alloc("dx", x, &xv, &[b, d, l], None)?;
        let (dw_obj, dw) = alloc("dweight", x, &xv, &[d, w], Some(DType::F32))?;
        let db = match &bv {
            Some(_) => Some(alloc("dbias", x, &xv, &[d], Some(DType::F32))?),
            None => None,
        };
        let di = match &iv {
            Some(i) => Some(alloc(
                "dinitial_states",
                x,
                &xv,
                &[b, d, w - 1],
                Some(i.dtype),
            )?),
            None => None,
        };
        let outs = ConvBwdOut {
            dx: &dx,
            dweight: &dw,
            dbias: db.as_ref().map(|t| &t.1),
            dinit: di.as_ref().map(|t| &t.1),
        };
        if let Device::Cuda(ord) = xv.device {
            // The kernel adds into dweight and dbias.
            dw_obj.call_method0("zero_")?;
            if let Some((o, _)) = &db {
                o.call_method0("zero_")?;
            }
            let p = ConvParams {
                b: b as i32,
                d: d as i32,
                l: l as i32,
                w: w as i32,
                silu: silu as i32,
                x: t4(&xv),
                weight: t4(&wv),
                bias: t4o(bv.as_ref()),
                init: t4o(iv.as_ref()),
                dout: t4(&dov),
                dfin: t4o(dfv.as_ref()),
                dx: t4(&dx),
                dweight: t4(&dw),
                dbias: t4o(outs.dbias),
                dinit: t4o(outs.dinit),
                ..Default::default()
            };
            let stream = current_stream(py, ord)?;
            py.detach(|| {
                catch_panic("causal_conv1d_bwd", || {
                    crate::cuda::conv1d::conv_launch(ord, stream, "causal_conv1d_bwd", &p)
                })
            })?;
        } else {
            let job = plan_conv_bwd(&args, dims, silu, &outs);
            py.detach(|| {
                catch_panic("causal_conv1d_bwd", || {
                    conv_backward(&job);
                    Ok(())
                })
            })?;
        }
        let none = || py.None().into_bound(py);
        PyTuple::new(
            py,
            [
                dx_obj,
                dw_obj,
                db.map_or_else(none, |t| t.0),
                di.map_or_else(none, |t| t.0),
            ],
        )
    }

    pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
        m.add_function(wrap_pyfunction!(causal_conv1d_fwd, m)?)?;
        m.add_function(wrap_pyfunction!(causal_conv1d_update, m)?)?;
        m.add_function(wrap_pyfunction!(causal_conv1d_bwd, m)?)?;
        Ok(())
    }
}
