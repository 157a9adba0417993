//! `conv_selective_scan_fn`: the causal depthwise conv1d (+ SiLU) and the
//! selective scan in one pass, = `selective_scan_fn(causal_conv1d_fn(x,
//! weight, bias, activation=…), delta, A, B, C, D, z, …)` without the conv's
//! output in memory. Argument checking is the two ops' own (x is the scan's
//! u); the plans are theirs plus the conv's taps.

use crate::cpu::conv_scan::ConvScanJob;
use crate::cuda::conv_scan::ConvScanFwdParams;
use crate::error::Result;
use crate::ops::conv1d::{check_conv, ConvArgs};
#[cfg(feature = "python")]
use crate::ops::scan::ScanViews;
use crate::ops::scan::{check_scan, plan_scan, plan_scan_cuda, ScanArgs, ScanDims};
use crate::tensor::TensorView;

/// Validates every argument (the conv's on x / weight / bias, the scan's
/// with u = x); returns the scan's sizes and the conv width.
pub fn check_conv_scan(
    a: &ScanArgs,
    weight: &TensorView,
    bias: Option<&TensorView>,
) -> Result<(ScanDims, usize)> {
    let (_, _, _, w) = check_conv(&ConvArgs {
        x: a.u,
        weight,
        bias,
        initial_states: None,
    })?;
    let dims = check_scan(a)?;
    Ok((dims, w))
}

/// The CPU plan.
#[allow(clippy::too_many_arguments)]
pub fn plan_conv_scan(
    a: &ScanArgs,
    dims: ScanDims,
    w: usize,
    weight: &TensorView,
    bias: Option<&TensorView>,
    silu: bool,
    softplus: bool,
    out: &TensorView,
    last: Option<&TensorView>,
) -> ConvScanJob {
    ConvScanJob {
        scan: plan_scan(a, dims, softplus, out, last),
        w,
        weight: weight.to_f32_vec(),
        bias: bias.map(|t| t.to_f32_vec()),
        silu,
    }
}

/// The CUDA kernel's parameters.
#[allow(clippy::too_many_arguments)]
pub fn plan_conv_scan_cuda(
    a: &ScanArgs,
    dims: ScanDims,
    w: usize,
    weight: &TensorView,
    bias: Option<&TensorView>,
    silu: bool,
    softplus: bool,
    out: &TensorView,
    last: Option<&TensorView>,
) -> ConvScanFwdParams {
    use crate::cuda::scan::Tensor4;
    ConvScanFwdParams {
        s: plan_scan_cuda(a, dims, softplus, out, last),
        weight: Tensor4::of(weight),
        bias: Tensor4::opt(bias),
        w: w as i32,
        silu: silu as i32,
        _pad0: 0,
        _pad1: 0,
    }
}

#[cfg(feature = "python")]
pub use py::register;

#[cfg(feature = "python")]
mod py {
    use super::*;
    use crate::cpu::conv_scan::conv_scan_forward;
    use crate::cpu::SimdLevel;
    use crate::error::catch_panic;
    use crate::ops::conv1d::activation_arg;
    use crate::ops::scan::check_backend;
    use crate::tensor::{alloc, current_stream, extract, extract_opt, DType, Device};
    use pyo3::prelude::*;
    use pyo3::types::PyTuple;

    use crate::args::{self, Given};

    struct Parsed {
        v: ScanViews,
        w: TensorView,
        bias: Option<TensorView>,
        dims: (ScanDims, usize),
        flags: (bool, bool, bool),
    }

    /// The inputs, read; the flags (delta_softplus, silu, return_last_state).
    #[allow(non_snake_case, clippy::too_many_arguments)]
    fn parse(
        x: &Bound<'_, PyAny>,
        conv_weight: &Bound<'_, PyAny>,
        conv_bias: Option<&Bound<'_, PyAny>>,
        delta: &Bound<'_, PyAny>,
        A: &Bound<'_, PyAny>,
        B: &Bound<'_, PyAny>,
        C: &Bound<'_, PyAny>,
        D: Option<&Bound<'_, PyAny>>,
        z: Option<&Bound<'_, PyAny>>,
        delta_bias: Option<&Bound<'_, PyAny>>,
        delta_softplus: &Given<'_>,
        activation: Option<&Bound<'_, PyAny>>,
        return_last_state: &Given<'_>,
        initial_state: Option<&Bound<'_, PyAny>>,
    ) -> Result<Parsed> {
        let delta_softplus = args::flag("delta_softplus", delta_softplus, false)?;
        let return_last_state = args::flag("return_last_state", return_last_state, false)?;
        let silu = activation_arg(activation)?;
        let v = ScanViews::extract("x", x, delta, A, B, C, D, z, delta_bias, initial_state)?;
        let wv = extract("conv_weight", conv_weight)?;
        let cbv = extract_opt("conv_bias", conv_bias)?;
        check_backend(&v.u)?;
        let dims = check_conv_scan(&v.args(), &wv, cbv.as_ref())?;
        Ok(Parsed {
            v,
            w: wv,
            bias: cbv,
            dims,
            flags: (delta_softplus, silu, return_last_state),
        })
    }

    /// Checks conv_selective_scan_fn's arguments without running it (what
    /// the custom-op path calls first); returns (delta_softplus, silu,
    /// return_last_state) as bools.
    #[pyfunction]
    #[pyo3(signature = (x, conv_weight, conv_bias, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=Given(None), activation=None, return_last_state=Given(None), initial_state=None))]
    #[allow(non_snake_case, clippy::too_many_arguments)]
    fn conv_selective_scan_check(
        x: &Bound<'_, PyAny>,
        conv_weight: &Bound<'_, PyAny>,
        conv_bias: Option<&Bound<'_, PyAny>>,
        delta: &Bound<'_, PyAny>,
        A: &Bound<'_, PyAny>,
        B: &Bound<'_, PyAny>,
        C: &Bound<'_, PyAny>,
        D: Option<&Bound<'_, PyAny>>,
        z: Option<&Bound<'_, PyAny>>,
        delta_bias: Option<&Bound<'_, PyAny>>,
        delta_softplus: Given<'_>,
        activation: Option<&Bound<'_, PyAny>>,
        return_last_state: Given<'_>,
        initial_state: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<(bool, bool, bool)> {
        let p = parse(
            x,
            conv_weight,
            conv_bias,
            delta,
            A,
            B,
            C,
            D,
            z,
            delta_bias,
            &delta_softplus,
            activation,
            &return_last_state,
            initial_state,
        )?;
        Ok(p.flags)
    }

    /// Fused causal conv1d + selective scan forward; see
    /// `mamba_attention.ops.conv_selective_scan_fn`.
    #[pyfunction]
    #[pyo3(signature = (x, conv_weight, conv_bias, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=Given(None), activation=None, return_last_state=Given(None), initial_state=None))]
    #[allow(non_snake_case, clippy::too_many_arguments)]
    fn conv_selective_scan_fwd<'py>(
        py: Python<'py>,
        x: &Bound<'py, PyAny>,
        conv_weight: &Bound<'py, PyAny>,
        conv_bias: Option<&Bound<'py, PyAny>>,
        delta: &Bound<'py, PyAny>,
        A: &Bound<'py, PyAny>,
        B: &Bound<'py, PyAny>,
        C: &Bound<'py, PyAny>,
        D: Option<&Bound<'py, PyAny>>,
        z: Option<&Bound<'py, PyAny>>,
        delta_bias: Option<&Bound<'py, PyAny>>,
        delta_softplus: Given<'py>,
        activation: Option<&Bound<'py, PyAny>>,
        return_last_state: Given<'py>,
        initial_state: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let p = parse(
            x,
            conv_weight,
            conv_bias,
            delta,
            A,
            B,
            C,
            D,
            z,
            delta_bias,
            &delta_softplus,
            activation,
            &return_last_state,
            initial_state,
        )?;
        let (delta_softplus, silu, return_last_state) = p.flags;
        let (v, wv, cbv, (dims, w)) = (p.v, p.w, p.bias, p.dims);
        let (args, xv) = (v.args(), &v.u);
        let (out_obj, out) = alloc("out", x, xv, &[dims.b, dims.d, dims.l], None)?;
        let last = if return_last_state {
            Some(alloc(
                "last_state",
                x,
                xv,
                &[dims.b, dims.d, dims.n],
                Some(DType::F32),
            )?)
        } else {
            None
        };
        let last_v = last.as_ref().map(|l| &l.1);
        match xv.device {
            Device::Cpu => {
                let level = SimdLevel::current()?;
                let job = plan_conv_scan(
                    &args,
                    dims,
                    w,
                    &wv,
                    cbv.as_ref(),
                    silu,
                    delta_softplus,
                    &out,
                    last_v,
                );
                py.detach(|| {
                    catch_panic("conv_selective_scan_fn", || {
                        conv_scan_forward(&job, level);
                        Ok(())
                    })
                })?;
            }
            Device::Cuda(ord) => {
                let stream = current_stream(py, ord)?;
                let p = plan_conv_scan_cuda(
                    &args,
                    dims,
                    w,
                    &wv,
                    cbv.as_ref(),
                    silu,
                    delta_softplus,
                    &out,
                    last_v,
                );
                let dt = xv.dtype;
                py.detach(|| {
                    catch_panic("conv_selective_scan_fn", || {
                        crate::cuda::conv_scan::conv_scan_forward(ord, stream, &p, dt)
                    })
                })?;
            }
        }
        match last {
            Some((lo, _)) => Ok(PyTuple::new(py, [out_obj, lo])?.into_any()),
            None => Ok(out_obj),
        }
    }

    pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
        m.add_function(wrap_pyfunction!(conv_selective_scan_fwd, m)?)?;
        m.add_function(wrap_pyfunction!(conv_selective_scan_check, m)?)?;
        Ok(())
    }
}
