//! Backward of `selective_scan_fn` (SPEC §1): argument checking and the plan,
//! and the `selective_scan_bwd` binding used by the autograd layer.

use crate::cpu::scan_bwd::{BcGrad, BwdJob};
use crate::error::Result;
#[cfg(feature = "python")]
use crate::ops::scan::ScanViews;
use crate::ops::scan::{check_scan, plan_scan, ScanArgs, ScanDims};
use crate::tensor::{Raw, TensorView};

/// Validates the forward's arguments and the incoming gradients.
pub fn check_scan_bwd(
    a: &ScanArgs,
    dout: &TensorView,
    dlast: Option<&TensorView>,
) -> Result<ScanDims> {
    let dims = check_scan(a)?;
    let ScanDims { b, d, l, n } = dims;
    for (t, shape, desc) in [
        (Some(dout), [b, d, l], "(b, d, l)"),
        (dlast, [b, d, n], "(b, d, n)"),
    ] {
        if let Some(t) = t {
            t.expect_float()?;
            t.expect_device(a.u.device, "u")?;
            t.expect_shape(&shape, desc)?;
        }
    }
    Ok(dims)
}

/// The view of a dB/dC output of B's/C's shape, as the kernel writes it.
fn bc_grad(t: &TensorView) -> BcGrad {
    match t.ndim() {
        2 => BcGrad::Const(t.raw()),
        3 => {
            let s = &t.strides;
            BcGrad::Var(Raw {
                ptr: t.ptr,
                dtype: t.dtype,
                strides: [s[0], 0, s[1], s[2]],
            })
        }
        _ => BcGrad::Var(t.raw()),
    }
}

/// The outputs of the backward, as views.
pub struct BwdOuts<'a> {
    pub du: &'a TensorView,
    pub ddelta: &'a TensorView,
    pub da: &'a TensorView,
    pub db: &'a TensorView,
    pub dc: &'a TensorView,
    pub dd: Option<&'a TensorView>,
    pub dz: Option<&'a TensorView>,
    pub ddbias: Option<&'a TensorView>,
    pub dinit: Option<&'a TensorView>,
}

/// The CPU plan of a checked backward.
pub fn plan_scan_bwd(
    a: &ScanArgs,
    dims: ScanDims,
    softplus: bool,
    dout: &TensorView,
    dlast: Option<&TensorView>,
    o: &BwdOuts,
) -> BwdJob {
    BwdJob {
        // The forward's plan of the same inputs; its `out` is never written.
        fwd: plan_scan(a, dims, softplus, a.u, None),
        dout: dout.raw(),
        dlast: dlast.map(|t| t.raw()),
        du: o.du.raw(),
        ddelta: o.ddelta.raw(),
        dz: o.dz.map(|t| t.raw()),
        da: o.da.raw(),
        db: bc_grad(o.db),
        dc: bc_grad(o.dc),
        dd: o.dd.map(|t| t.raw()),
        ddbias: o.ddbias.map(|t| t.raw()),
        dinit: o.dinit.map(|t| t.raw()),
    }
}

/// The CUDA kernel's parameters of a checked backward; `scratch` is the
/// float32 (b, d, nchunks, n) buffer when the sequence has several chunks.
pub fn plan_scan_bwd_cuda(
    a: &ScanArgs,
    dims: ScanDims,
    softplus: bool,
    dout: &TensorView,
    dlast: Option<&TensorView>,
    o: &BwdOuts,
    scratch: Option<&TensorView>,
) -> crate::cuda::scan_bwd::ScanBwdParams {
    use crate::cuda::scan::{scan_bc, Tensor4};
    let (bm, groups_b) = scan_bc(a.b);
    let (cm, groups_c) = scan_bc(a.c);
    crate::cuda::scan_bwd::ScanBwdParams {
        b: dims.b as i32,
        d: dims.d as i32,
        l: dims.l as i32,
        n: dims.n as i32,
        groups_b,
        groups_c,
        softplus: softplus as i32,
        nchunks: crate::cuda::scan_bwd::bwd_chunks(
            dims.l,
            crate::cuda::scan_bwd::use_fast(dims.d, dims.n, groups_b, groups_c),
        ) as i32,
        u: Tensor4::of(a.u),
        delta: Tensor4::of(a.delta),
        z: Tensor4::opt(a.z),
        dout: Tensor4::of(dout),
        a: Tensor4::of(a.a),
        bm,
        cm,
        dskip: Tensor4::opt(a.d),
        delta_bias: Tensor4::opt(a.delta_bias),
        initial_state: Tensor4::opt(a.initial_state),
        dlast: Tensor4::opt(dlast),
        du: Tensor4::of(o.du),
        ddelta: Tensor4::of(o.ddelta),
        dz: Tensor4::opt(o.dz),
        da: Tensor4::of(o.da),
        db: scan_bc(o.db).0,
        dc: scan_bc(o.dc).0,
        dd: Tensor4::opt(o.dd),
        ddelta_bias: Tensor4::opt(o.ddbias),
        dinit: Tensor4::opt(o.dinit),
        scratch: Tensor4::opt(scratch),
        ck_given: 0,
        _pad: 0,
    }
}

#[cfg(feature = "python")]
pub use py::register;

#[cfg(feature = "python")]
mod py {
    use super::*;
    use crate::args::Given;
    use crate::cpu::scan_bwd::scan_backward_ck;
    use crate::cpu::SimdLevel;
    use crate::error::{catch_panic, Error};
    use crate::tensor::{alloc, alloc_reuse, current_stream, extract, extract_opt, DType, Device};
    use pyo3::prelude::*;
    use pyo3::types::PyTuple;

    /// Gradients of `selective_scan_fn` given dout (b, d, l) and optionally
    /// dlast_state (b, d, n). Returns (du, ddelta, dA, dB, dC, dD, dz,
    /// ddelta_bias, dinitial_state): du, ddelta in u's dtype, dz in z's, the rest
    /// float32 in their input's shape; None for an input that was None.
    #[pyfunction]
    #[pyo3(signature = (u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=Given(None), initial_state=None, dout=None, dlast_state=None, checkpoints=None))]
    #[allow(non_snake_case, clippy::too_many_arguments)]
    fn selective_scan_bwd<'py>(
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
        dout: Option<&Bound<'py, PyAny>>,
        dlast_state: Option<&Bound<'py, PyAny>>,
        checkpoints: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyTuple>> {
        let delta_softplus = crate::args::flag("delta_softplus", &delta_softplus, false)?;
        let v = ScanViews::extract("u", u, delta, A, B, C, D, z, delta_bias, initial_state)?;
        let (uv, bv, cv) = (&v.u, &v.b, &v.c);
        let (dsk, zv, bias, init) = (&v.d, &v.z, &v.delta_bias, &v.initial_state);
        let Some(dout) = dout.filter(|o| !o.is_none()) else {
            return Err(
                Error::type_("dout: expected a tensor of shape (b, d, l), got None").into(),
            );
        };
        let gv = extract("dout", dout)?;
        let glast = extract_opt("dlast_state", dlast_state)?;
        let args = v.args();
        let dims = check_scan_bwd(&args, &gv, glast.as_ref())?;
        // The forward's checkpoints (`selective_scan_fwd_ck`); an empty tensor
        // counts as None (the autograd op's placeholder on CUDA).
        let ckv = extract_opt("checkpoints", checkpoints)?.filter(|t| !t.shape.contains(&0));
        let ckp = match (&ckv, uv.device) {
            (Some(t), Device::Cpu) => Some(crate::ops::scan_ck::check_checkpoints(t, dims)?),
            (Some(t), dev) => {
                crate::ops::scan_ck::check_checkpoints_cuda(t, dims, dev, bv, cv)?;
                None
            }
            (None, _) => None,
        };
        crate::ops::scan::check_backend(uv)?;
        let ScanDims { b, d, l, n } = dims;
        let f32_ = Some(DType::F32);
        let (du_o, du) = alloc_reuse("du", u, uv, &[b, d, l], None)?;
        let (ddelta_o, ddelta) = alloc_reuse("ddelta", u, uv, &[b, d, l], None)?;
        let (da_o, da) = alloc("dA", u, uv, &[d, n], f32_)?;
        let (db_o, db) = alloc("dB", u, uv, &bv.shape, f32_)?;
        let (dc_o, dc) = alloc("dC", u, uv, &cv.shape, f32_)?;
        let opt = |on: bool, name, shape: &[usize], dtype| -> PyResult<_> {
            Ok(if on {
                Some(alloc(name, u, uv, shape, dtype)?)
            } else {
                None
            })
        };
        let dd = opt(dsk.is_some(), "dD", &[d], f32_)?;
        let dz = match &zv {
            Some(zt) => Some(alloc_reuse("dz", u, uv, &[b, d, l], Some(zt.dtype))?),
            None => None,
        };
        let ddb = opt(bias.is_some(), "ddelta_bias", &[d], f32_)?;
        let dinit = opt(init.is_some(), "dinitial_state", &[b, d, n], f32_)?;
        let outs = BwdOuts {
            du: &du,
            ddelta: &ddelta,
            da: &da,
            db: &db,
            dc: &dc,
            dd: dd.as_ref().map(|x| &x.1),
            dz: dz.as_ref().map(|x| &x.1),
            ddbias: ddb.as_ref().map(|x| &x.1),
            dinit: dinit.as_ref().map(|x| &x.1),
        };
        match uv.device {
            Device::Cpu => {
                let level = SimdLevel::current()?;
                let job = plan_scan_bwd(&args, dims, delta_softplus, &gv, glast.as_ref(), &outs);
                py.detach(|| {
                    catch_panic("selective_scan_bwd", || {
                        scan_backward_ck(&job, level, ckp);
                        Ok(())
                    })
                })?;
            }
            Device::Cuda(ord) => {
                // The kernel adds into these with atomics: zeroed in one
                // launch (scan_bwd_zero) instead of one `zero_()` each.
                let stream = current_stream(py, ord)?;
                let mut zero: Vec<(usize, usize)> = vec![
                    (da.ptr, da.shape.iter().product()),
                    (db.ptr, db.shape.iter().product()),
                    (dc.ptr, dc.shape.iter().product()),
                ];
                for x in [&dd, &ddb].into_iter().flatten() {
                    zero.push((x.1.ptr, x.1.shape.iter().product()));
                }
                py.detach(|| {
                    catch_panic("selective_scan_bwd", || {
                        crate::cuda::scan_bwd::zero_f32(ord, stream, &zero)
                    })
                })?;
                let (_, gb) = crate::cuda::scan::scan_bc(bv);
                let (_, gc) = crate::cuda::scan::scan_bc(cv);
                let fast = crate::cuda::scan_bwd::use_fast(d, n, gb, gc);
                let nchunks = crate::cuda::scan_bwd::bwd_chunks(l, fast);
                // the forward's checkpoints (checked above) stand in for the scratch
                let scratch = if nchunks > 1 && ckv.is_none() {
                    Some(alloc("scratch", u, uv, &[b, d, nchunks, n], f32_)?)
                } else {
                    None
                };
                let mut p = plan_scan_bwd_cuda(
                    &args,
                    dims,
                    delta_softplus,
                    &gv,
                    glast.as_ref(),
                    &outs,
                    scratch.as_ref().map(|x| &x.1),
                );
                if let Some(ck) = &ckv {
                    p.scratch = crate::cuda::scan::Tensor4::of(ck);
                    p.ck_given = 1;
                }
                py.detach(|| {
                    catch_panic("selective_scan_bwd", || {
                        crate::cuda::scan_bwd::scan_backward(ord, stream, &p)
                    })
                })?;
                drop(scratch);
            }
        }
        let none = || py.None().into_bound(py);
        let or_none = |x: Option<(Bound<'py, PyAny>, TensorView)>| x.map_or_else(none, |x| x.0);
        PyTuple::new(
            py,
            [
                du_o,
                ddelta_o,
                da_o,
                db_o,
                dc_o,
                or_none(dd),
                or_none(dz),
                or_none(ddb),
                or_none(dinit),
            ],
        )
    }

    pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
        m.add_function(wrap_pyfunction!(selective_scan_bwd, m)?)?;
        Ok(())
    }
}
