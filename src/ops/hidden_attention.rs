//! `hidden_attention` (SPEC §4): argument checking and the kernel plan, shared
//! by the CPU and CUDA backends.

use super::scan::{bc_src, check_bc, check_common, ScanDims};
use crate::cpu::hidden_attention::HaJob;
use crate::cuda::hidden_attention::HaParams;
use crate::error::{Error, Result};
use crate::tensor::TensorView;
#[cfg(feature = "python")]
use crate::tensor::{DType, Device};

/// Largest supported state size (as the scan's).
pub const MAX_N: usize = 256;

/// The arguments, as views.
pub struct HaArgs<'a> {
    pub delta: &'a TensorView,
    pub a: &'a TensorView,
    pub b: &'a TensorView,
    pub c: &'a TensorView,
    pub delta_bias: Option<&'a TensorView>,
}

/// Sizes of a validated call (the scan's: B and C have the scan's layouts).
pub type HaDims = ScanDims;

/// `reduce`: None or "mean"; returns whether to average over channels.
pub fn parse_reduce(reduce: Option<&str>) -> Result<bool> {
    match reduce {
        None => Ok(false),
        Some("mean") => Ok(true),
        Some(s) => Err(Error::value(format!(
            "reduce: expected None or \"mean\", got {s:?}"
        ))),
    }
}

/// Validates every argument; returns the sizes.
pub fn check(a: &HaArgs) -> Result<HaDims> {
    let delta = a.delta;
    delta.expect_float()?;
    delta.expect_rank(3, "(b, d, l)")?;
    delta.expect_nonempty()?;
    let dev = delta.device;
    let (b, d, l) = (delta.shape[0], delta.shape[1], delta.shape[2]);
    check_common(a.a, dev, "delta")?;
    a.a.expect_rank(2, "(d, n)")?;
    if a.a.shape[0] != d {
        return Err(Error::value(format!(
            "A: expected shape (d, n) with d = {d} (from delta), got {}",
            a.a.shape_str()
        )));
    }
    let n = a.a.shape[1];
    if n > MAX_N {
        return Err(Error::value(format!(
            "A: the state size n = {n} (dimension 1 of shape {}) must be at most {MAX_N}",
            a.a.shape_str()
        )));
    }
    let dims = HaDims { b, d, l, n };
    for t in [a.b, a.c] {
        check_common(t, dev, "delta")?;
        check_bc(t, dims)?;
    }
    if let Some(t) = a.delta_bias {
        check_common(t, dev, "delta")?;
        t.expect_shape(&[d], "(d,)")?;
    }
    Ok(dims)
}

/// Device limits (before any allocation): as the scan's.
pub use super::scan::check_backend;

/// The CPU plan; `out` is the contiguous float32 output we allocated.
pub fn plan(a: &HaArgs, dims: HaDims, softplus: bool, mean: bool, out: &TensorView) -> HaJob {
    HaJob {
        b: dims.b,
        d: dims.d,
        l: dims.l,
        n: dims.n,
        delta: a.delta.raw(),
        a: a.a.to_f32_vec(),
        bm: bc_src(a.b),
        cm: bc_src(a.c),
        dbias: a.delta_bias.map(|t| t.to_f32_vec()),
        softplus,
        out: out.ptr,
        mean,
    }
}

/// The CUDA kernel's parameters.
pub fn plan_cuda(
    a: &HaArgs,
    dims: HaDims,
    softplus: bool,
    mean: bool,
    out: &TensorView,
) -> HaParams {
    use crate::cuda::scan::{scan_bc, Tensor4};
    let (bm, groups_b) = scan_bc(a.b);
    let (cm, groups_c) = scan_bc(a.c);
    HaParams {
        b: dims.b as i32,
        d: dims.d as i32,
        l: dims.l as i32,
        n: dims.n as i32,
        groups_b,
        groups_c,
        softplus: softplus as i32,
        mean: mean as i32,
        rows: 0,
        k0: 0,
        nk: 0,
        accumulate: 0,
        inv_d: 1.0 / dims.d as f32,
        _pad2: 0.0,
        delta: Tensor4::of(a.delta),
        a: Tensor4::of(a.a),
        bm,
        cm,
        delta_bias: Tensor4::opt(a.delta_bias),
        out: Tensor4::of(out),
    }
}

#[cfg(feature = "python")]
pub use py::register;

#[cfg(feature = "python")]
mod py {
    use super::*;
    use crate::args::Given;
    use crate::cpu::SimdLevel;
    use crate::error::catch_panic;
    use crate::tensor::{alloc, current_stream, extract, extract_opt};
    use pyo3::prelude::*;

    /// Hidden attention matrices of a selective scan; see `mamba_attention.ops.hidden_attention`.
    #[pyfunction]
    #[pyo3(signature = (delta, A, B, C, delta_bias=None, delta_softplus=Given(None), reduce=None))]
    #[allow(non_snake_case, clippy::too_many_arguments)]
    fn hidden_attention<'py>(
        py: Python<'py>,
        delta: &Bound<'py, PyAny>,
        A: &Bound<'py, PyAny>,
        B: &Bound<'py, PyAny>,
        C: &Bound<'py, PyAny>,
        delta_bias: Option<&Bound<'py, PyAny>>,
        delta_softplus: Given<'py>,
        reduce: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let delta_softplus = crate::args::flag("delta_softplus", &delta_softplus, false)?;
        let reduce: Option<String> = match reduce {
            None => None,
            Some(r) if r.is_none() => None,
            Some(r) => Some(r.extract::<String>().map_err(|_| {
                Error::type_(format!(
                    "reduce: expected None or \"mean\", got an object of type {}",
                    r.get_type()
                        .name()
                        .map(|n| n.to_string())
                        .unwrap_or_default()
                ))
            })?),
        };
        let mean = parse_reduce(reduce.as_deref())?;
        let dv = extract("delta", delta)?;
        let av = extract("A", A)?;
        let bv = extract("B", B)?;
        let cv = extract("C", C)?;
        let bias = extract_opt("delta_bias", delta_bias)?;
        let args = HaArgs {
            delta: &dv,
            a: &av,
            b: &bv,
            c: &cv,
            delta_bias: bias.as_ref(),
        };
        let dims = check(&args)?;
        check_backend(&dv)?;
        let HaDims { b, d, l, .. } = dims;
        let shape: Vec<usize> = if mean {
            vec![b, l, l]
        } else {
            vec![b, d, l, l]
        };
        let numel = shape.iter().try_fold(1usize, |a, &s| a.checked_mul(s));
        if numel
            .and_then(|e| e.checked_mul(4))
            .is_none_or(|bytes| bytes > isize::MAX as usize)
        {
            return Err(Error::value(format!(
                "delta: the output of shape {shape:?} float32 is too large to allocate"
            ))
            .into());
        }
        let (out_obj, out) = alloc("out", delta, &dv, &shape, Some(DType::F32))?;
        if !is_contiguous(&out) || out.dtype != DType::F32 {
            return Err(Error::runtime(
                "hidden_attention: the allocated output is not contiguous float32",
            )
            .into());
        }
        match dv.device {
            Device::Cpu => {
                let level = SimdLevel::current()?;
                let job = plan(&args, dims, delta_softplus, mean, &out);
                py.detach(|| {
                    catch_panic("hidden_attention", || {
                        crate::cpu::hidden_attention::hidden_attention(&job, level);
                        Ok(())
                    })
                })?;
            }
            Device::Cuda(ord) => {
                let stream = current_stream(py, ord)?;
                let p = plan_cuda(&args, dims, delta_softplus, mean, &out);
                py.detach(|| {
                    catch_panic("hidden_attention", || {
                        crate::cuda::hidden_attention::launch(ord, stream, &p)
                    })
                })?;
            }
        }
        Ok(out_obj)
    }

    fn is_contiguous(t: &TensorView) -> bool {
        let mut want = 1isize;
        for (s, st) in t.shape.iter().zip(&t.strides).rev() {
            if *s > 1 && *st != want {
                return false;
            }
            want *= *s as isize;
        }
        true
    }

    pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
        m.add_function(wrap_pyfunction!(hidden_attention, m)?)?;
        Ok(())
    }
}
