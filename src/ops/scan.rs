//! `selective_scan_fn` and `selective_state_update` (SPEC §1): argument
//! checking and the kernel plan, shared by every backend.

use crate::cpu::scan::{BcSrc, ScanJob, UpdateJob, MAX_N};
use crate::cuda::scan::{ScanFwdParams, StateUpdateParams};
use crate::error::{Error, Result};
use crate::tensor::{DType, Device, Raw, TensorView};

/// The arguments of `selective_scan_fn`, as views.
pub struct ScanArgs<'a> {
    pub u: &'a TensorView,
    pub delta: &'a TensorView,
    pub a: &'a TensorView,
    pub b: &'a TensorView,
    pub c: &'a TensorView,
    pub d: Option<&'a TensorView>,
    pub z: Option<&'a TensorView>,
    pub delta_bias: Option<&'a TensorView>,
    pub initial_state: Option<&'a TensorView>,
}

/// Sizes of a validated scan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScanDims {
    pub b: usize,
    pub d: usize,
    pub l: usize,
    pub n: usize,
}

pub(crate) fn check_common(t: &TensorView, device: Device, of: &str) -> Result<()> {
    t.expect_float()?;
    t.expect_nonempty()?;
    t.expect_device(device, of)
}

/// Checks a per-channel vector (d,).
fn check_channel_vec(t: Option<&TensorView>, d: usize, device: Device) -> Result<()> {
    if let Some(t) = t {
        check_common(t, device, "u")?;
        t.expect_shape(&[d], "(d,)")?;
    }
    Ok(())
}

/// Checks B or C of a scan and returns its number of groups (0 = constant).
pub(crate) fn check_bc(t: &TensorView, dims: ScanDims) -> Result<usize> {
    let ScanDims { b, d, l, n } = dims;
    match t.ndim() {
        2 => {
            t.expect_shape(&[d, n], "(d, n)")?;
            Ok(0)
        }
        3 => {
            t.expect_shape(&[b, n, l], "(b, n, l)")?;
            Ok(1)
        }
        4 => {
            let g = t.shape[1];
            if g == 0 || d % g != 0 {
                return Err(Error::value(format!(
                    "{}: the number of groups g = {g} (dimension 1 of shape {}) must divide d = {d}",
                    t.name,
                    t.shape_str()
                )));
            }
            t.expect_shape(&[b, g, n, l], "(b, g, n, l)")?;
            Ok(g)
        }
        r => Err(Error::value(format!(
            "{}: expected shape (d, n), (b, n, l) or (b, g, n, l), got a {r}-d tensor of shape {}",
            t.name,
            t.shape_str()
        ))),
    }
}

fn check_n(a: &TensorView) -> Result<usize> {
    let n = a.shape[1];
    if n > MAX_N {
        return Err(Error::value(format!(
            "{}: the state size n = {n} (dimension 1 of shape {}) must be at most {MAX_N}",
            a.name,
            a.shape_str()
        )));
    }
    Ok(n)
}

/// Validates every argument; returns the sizes.
pub fn check_scan(a: &ScanArgs) -> Result<ScanDims> {
    let u = a.u;
    u.expect_float()?;
    u.expect_rank(3, "(b, d, l)")?;
    u.expect_nonempty()?;
    let dev = u.device;
    let (b, d, l) = (u.shape[0], u.shape[1], u.shape[2]);
    check_common(a.delta, dev, "u")?;
    a.delta.expect_same_dtype(u)?;
    a.delta.expect_shape(&u.shape, "(b, d, l)")?;
    if let Some(z) = a.z {
        check_common(z, dev, "u")?;
        z.expect_same_dtype(u)?;
        z.expect_shape(&u.shape, "(b, d, l)")?;
    }
    check_common(a.a, dev, "u")?;
    a.a.expect_rank(2, "(d, n)")?;
    if a.a.shape[0] != d {
        return Err(Error::value(format!(
            "A: expected shape (d, n) with d = {d} (from u), got {}",
            a.a.shape_str()
        )));
    }
    let n = check_n(a.a)?;
    let dims = ScanDims { b, d, l, n };
    for t in [a.b, a.c] {
        check_common(t, dev, "u")?;
        check_bc(t, dims)?;
    }
    check_channel_vec(a.d, d, dev)?;
    check_channel_vec(a.delta_bias, d, dev)?;
    if let Some(s) = a.initial_state {
        check_common(s, dev, "u")?;
        s.expect_shape(&[b, d, n], "(b, d, n)")?;
    }
    Ok(dims)
}

pub(crate) fn bc_src(t: &TensorView) -> BcSrc {
    match t.ndim() {
        2 => BcSrc::Const(t.to_f32_vec()),
        3 => {
            let s = &t.strides;
            BcSrc::Var {
                raw: Raw {
                    ptr: t.ptr,
                    dtype: t.dtype,
                    strides: [s[0], 0, s[1], s[2]],
                },
                groups: 1,
            }
        }
        _ => BcSrc::Var {
            raw: t.raw::<4>(),
            groups: t.shape[1],
        },
    }
}

/// The CPU plan of a checked scan writing to `out` (b, d, l) and `last` (b, d, n).
pub fn plan_scan(
    a: &ScanArgs,
    dims: ScanDims,
    softplus: bool,
    out: &TensorView,
    last: Option<&TensorView>,
) -> ScanJob {
    ScanJob {
        b: dims.b,
        d: dims.d,
        l: dims.l,
        n: dims.n,
        u: a.u.raw(),
        delta: a.delta.raw(),
        z: a.z.map(|z| z.raw()),
        out: out.raw(),
        a: a.a.to_f32_vec(),
        bm: bc_src(a.b),
        cm: bc_src(a.c),
        dskip: a.d.map(|t| t.to_f32_vec()),
        dbias: a.delta_bias.map(|t| t.to_f32_vec()),
        softplus,
        init: a.initial_state.map(|t| t.raw()),
        last: last.map(|t| t.raw()),
    }
}

/// The arguments of `selective_state_update`, as views.
pub struct UpdateArgs<'a> {
    pub state: &'a TensorView,
    pub x: &'a TensorView,
    pub dt: &'a TensorView,
    pub a: &'a TensorView,
    pub b: &'a TensorView,
    pub c: &'a TensorView,
    pub d: Option<&'a TensorView>,
    pub z: Option<&'a TensorView>,
    pub dt_bias: Option<&'a TensorView>,
    pub state_batch_indices: Option<&'a TensorView>,
}

/// Checks B or C of a state update: (b, n) or (b, g, n); returns g.
fn check_bc_step(t: &TensorView, b: usize, d: usize, n: usize) -> Result<usize> {
    match t.ndim() {
        2 => {
            t.expect_shape(&[b, n], "(b, n)")?;
            Ok(1)
        }
        3 => {
            let g = t.shape[1];
            if g == 0 || d % g != 0 {
                return Err(Error::value(format!(
                    "{}: the number of groups g = {g} (dimension 1 of shape {}) must divide d = {d}",
                    t.name,
                    t.shape_str()
                )));
            }
            t.expect_shape(&[b, g, n], "(b, g, n)")?;
            Ok(g)
        }
        r => Err(Error::value(format!(
            "{}: expected shape (b, n) or (b, g, n), got a {r}-d tensor of shape {}",
            t.name,
            t.shape_str()
        ))),
    }
}

/// Validates a state update; returns (b, d, n) and the state row of each entry.
pub fn check_update(a: &UpdateArgs) -> Result<(usize, usize, usize, Option<Vec<i64>>)> {
    let x = a.x;
    x.expect_float()?;
    x.expect_rank(2, "(b, d)")?;
    x.expect_nonempty()?;
    let dev = x.device;
    let (b, d) = (x.shape[0], x.shape[1]);
    check_common(a.dt, dev, "x")?;
    a.dt.expect_same_dtype(x)?;
    a.dt.expect_shape(&x.shape, "(b, d)")?;
    if let Some(z) = a.z {
        check_common(z, dev, "x")?;
        z.expect_same_dtype(x)?;
        z.expect_shape(&x.shape, "(b, d)")?;
    }
    check_common(a.a, dev, "x")?;
    a.a.expect_rank(2, "(d, n)")?;
    if a.a.shape[0] != d {
        return Err(Error::value(format!(
            "A: expected shape (d, n) with d = {d} (from x), got {}",
            a.a.shape_str()
        )));
    }
    let n = check_n(a.a)?;
    let s = a.state;
    check_common(s, dev, "x")?;
    s.expect_writable()?;
    s.expect_rank(3, "(b, d, n)")?;
    let rows = match a.state_batch_indices {
        None => {
            s.expect_shape(&[b, d, n], "(b, d, n)")?;
            None
        }
        Some(idx) => {
            idx.expect_device(dev, "x")?;
            if dev != Device::Cpu && !matches!(idx.dtype, DType::I32 | DType::I64) {
                return Err(Error::type_(format!(
                    "state_batch_indices: expected an int32 or int64 tensor, got {}",
                    idx.dtype.name()
                )));
            }
            if !idx.dtype.is_int() {
                return Err(Error::type_(format!(
                    "state_batch_indices: expected an integer tensor, got {}",
                    idx.dtype.name()
                )));
            }
            idx.expect_shape(&[b], "(b,)")?;
            if s.shape[1] != d || s.shape[2] != n {
                return Err(Error::value(format!(
                    "state: expected shape (cache_size, d, n) = (*, {d}, {n}), got {}",
                    s.shape_str()
                )));
            }
            if dev != Device::Cpu {
                // Reading device memory here would synchronise the stream: the
                // kernel checks the range (an index past the cache gives NaN).
                None
            } else {
                let rows = idx.to_i64_vec()?;
                let cache = s.shape[0] as i64;
                if let Some(bad) = rows.iter().find(|&&r| r >= cache) {
                    return Err(Error::value(format!(
                        "state_batch_indices: expected indices below the state's {cache} rows (negative to skip), got {bad}"
                    )));
                }
                let mut seen = rows.iter().copied().filter(|&r| r >= 0).collect::<Vec<_>>();
                seen.sort_unstable();
                if let Some(w) = seen.windows(2).find(|w| w[0] == w[1]) {
                    return Err(Error::value(format!(
                        "state_batch_indices: expected distinct state rows (two entries would update one state), got {} twice",
                        w[0]
                    )));
                }
                Some(rows)
            }
        }
    };
    for t in [a.b, a.c] {
        check_common(t, dev, "x")?;
        check_bc_step(t, b, d, n)?;
    }
    check_channel_vec(a.d, d, dev)?;
    check_channel_vec(a.dt_bias, d, dev)?;
    Ok((b, d, n, rows))
}

fn step_bc(t: &TensorView) -> (Raw<3>, usize) {
    if t.ndim() == 2 {
        let s = &t.strides;
        (
            Raw {
                ptr: t.ptr,
                dtype: t.dtype,
                strides: [s[0], 0, s[1]],
            },
            1,
        )
    } else {
        (t.raw(), t.shape[1])
    }
}

pub fn plan_update(
    a: &UpdateArgs,
    dims: (usize, usize, usize, Option<Vec<i64>>),
    softplus: bool,
    out: &TensorView,
) -> UpdateJob {
    let (b, d, n, rows) = dims;
    let (bm, groups_b) = step_bc(a.b);
    let (cm, groups_c) = step_bc(a.c);
    UpdateJob {
        b,
        d,
        n,
        state: a.state.raw(),
        x: a.x.raw(),
        dt: a.dt.raw(),
        z: a.z.map(|z| z.raw()),
        out: out.raw(),
        a: a.a.raw(),
        bm,
        cm,
        groups_b,
        groups_c,
        dskip: a.d.map(|t| t.raw()),
        dbias: a.dt_bias.map(|t| t.raw()),
        softplus,
        rows,
    }
}

/// Device-specific limits, checked before any allocation.
pub fn check_backend(t: &TensorView) -> Result<()> {
    if let Device::Cuda(_) = t.device {
        crate::cuda::check_dims(t)?;
        if t.kind != crate::tensor::Kind::Torch {
            return Err(Error::type_(format!(
                "{}: CUDA arrays are supported as torch tensors; convert with torch.from_dlpack",
                t.name
            )));
        }
        if t.dtype == DType::F64 {
            return Err(Error::type_(format!(
                "{}: float64 is supported on the CPU only; use float32, float16 or bfloat16 on CUDA",
                t.name
            )));
        }
    }
    Ok(())
}

/// The CUDA kernel's parameters for a checked scan.
pub fn plan_scan_cuda(
    a: &ScanArgs,
    dims: ScanDims,
    softplus: bool,
    out: &TensorView,
    last: Option<&TensorView>,
) -> ScanFwdParams {
    use crate::cuda::scan::{scan_bc, Tensor4};
    let (bm, groups_b) = scan_bc(a.b);
    let (cm, groups_c) = scan_bc(a.c);
    ScanFwdParams {
        b: dims.b as i32,
        d: dims.d as i32,
        l: dims.l as i32,
        n: dims.n as i32,
        groups_b,
        groups_c,
        softplus: softplus as i32,
        _pad: 0,
        u: Tensor4::of(a.u),
        delta: Tensor4::of(a.delta),
        z: Tensor4::opt(a.z),
        out: Tensor4::of(out),
        a: Tensor4::of(a.a),
        bm,
        cm,
        dskip: Tensor4::opt(a.d),
        delta_bias: Tensor4::opt(a.delta_bias),
        initial_state: Tensor4::opt(a.initial_state),
        last_state: Tensor4::opt(last),
    }
}

/// The CUDA kernel's parameters for a checked state update.
pub fn plan_update_cuda(
    a: &UpdateArgs,
    dims: (usize, usize, usize),
    softplus: bool,
    out: &TensorView,
) -> StateUpdateParams {
    use crate::cuda::scan::{step_bc, Tensor4};
    let (b, d, n) = dims;
    let (bm, groups_b) = step_bc(a.b);
    let (cm, groups_c) = step_bc(a.c);
    StateUpdateParams {
        b: b as i32,
        d: d as i32,
        n: n as i32,
        cache: a.state.shape[0] as i32,
        groups_b,
        groups_c,
        softplus: softplus as i32,
        _pad: 0,
        state: Tensor4::of(a.state),
        x: Tensor4::of(a.x),
        dt: Tensor4::of(a.dt),
        z: Tensor4::opt(a.z),
        out: Tensor4::of(out),
        a: Tensor4::of(a.a),
        bm,
        cm,
        dskip: Tensor4::opt(a.d),
        dt_bias: Tensor4::opt(a.dt_bias),
        rows: Tensor4::opt(a.state_batch_indices),
    }
}

/// The inputs of a selective scan read from Python objects, named as in
/// `selective_scan_fn` (the fused conv+scan passes "x" for u): what
/// `selective_scan_fwd`, `selective_scan_fwd_ck`, `selective_scan_bwd` and
/// `conv_selective_scan_fwd` share.
#[cfg(feature = "python")]
pub struct ScanViews {
    pub u: TensorView,
    pub delta: TensorView,
    pub a: TensorView,
    pub b: TensorView,
    pub c: TensorView,
    pub d: Option<TensorView>,
    pub z: Option<TensorView>,
    pub delta_bias: Option<TensorView>,
    pub initial_state: Option<TensorView>,
}

#[cfg(feature = "python")]
impl ScanViews {
    /// Extracts every input (in argument order, so the first bad one is the
    /// one named); no shape checks yet (`check_scan` does those).
    #[allow(clippy::too_many_arguments)]
    pub fn extract(
        u_name: &'static str,
        u: &pyo3::Bound<'_, pyo3::PyAny>,
        delta: &pyo3::Bound<'_, pyo3::PyAny>,
        a: &pyo3::Bound<'_, pyo3::PyAny>,
        b: &pyo3::Bound<'_, pyo3::PyAny>,
        c: &pyo3::Bound<'_, pyo3::PyAny>,
        d: Option<&pyo3::Bound<'_, pyo3::PyAny>>,
        z: Option<&pyo3::Bound<'_, pyo3::PyAny>>,
        delta_bias: Option<&pyo3::Bound<'_, pyo3::PyAny>>,
        initial_state: Option<&pyo3::Bound<'_, pyo3::PyAny>>,
    ) -> Result<Self> {
        use crate::tensor::{extract, extract_opt};
        Ok(ScanViews {
            u: extract(u_name, u)?,
            delta: extract("delta", delta)?,
            a: extract("A", a)?,
            b: extract("B", b)?,
            c: extract("C", c)?,
            d: extract_opt("D", d)?,
            z: extract_opt("z", z)?,
            delta_bias: extract_opt("delta_bias", delta_bias)?,
            initial_state: extract_opt("initial_state", initial_state)?,
        })
    }

    /// The views as `ScanArgs`.
    pub fn args(&self) -> ScanArgs<'_> {
        ScanArgs {
            u: &self.u,
            delta: &self.delta,
            a: &self.a,
            b: &self.b,
            c: &self.c,
            d: self.d.as_ref(),
            z: self.z.as_ref(),
            delta_bias: self.delta_bias.as_ref(),
            initial_state: self.initial_state.as_ref(),
        }
    }
}

#[cfg(feature = "python")]
pub use py::register;

#[cfg(feature = "python")]
mod py {
    use super::*;
    use crate::args::{self, Given};
    use crate::cpu::scan::{scan_forward, state_update};
    use crate::cpu::SimdLevel;
    use crate::error::catch_panic;
    use crate::tensor::{
        alloc, alloc_reuse, check_writes, current_stream, extract, extract_opt, DType,
    };
    use pyo3::prelude::*;
    use pyo3::types::PyTuple;

    /// Forward selective scan; see `mamba_attention.ops.selective_scan_fn`.
    #[pyfunction]
    #[pyo3(signature = (u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=Given(None), return_last_state=Given(None), initial_state=None))]
    #[allow(non_snake_case, clippy::too_many_arguments)]
    fn selective_scan_fwd<'py>(
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
        return_last_state: Given<'py>,
        initial_state: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let delta_softplus = args::flag("delta_softplus", &delta_softplus, false)?;
        let return_last_state = args::flag("return_last_state", &return_last_state, false)?;
        let v = ScanViews::extract("u", u, delta, A, B, C, D, z, delta_bias, initial_state)?;
        let (args, uv) = (v.args(), &v.u);
        let dims = check_scan(&args)?;
        check_backend(uv)?;
        let (out_obj, out) = alloc_reuse("out", u, uv, &[dims.b, dims.d, dims.l], None)?;
        let last = if return_last_state {
            Some(alloc(
                "last_state",
                u,
                uv,
                &[dims.b, dims.d, dims.n],
                Some(DType::F32),
            )?)
        } else {
            None
        };
        let last_v = last.as_ref().map(|l| &l.1);
        match uv.device {
            Device::Cpu => {
                let level = SimdLevel::current()?;
                let job = plan_scan(&args, dims, delta_softplus, &out, last_v);
                py.detach(|| {
                    catch_panic("selective_scan_fn", || {
                        scan_forward(&job, level);
                        Ok(())
                    })
                })?;
            }
            Device::Cuda(ord) => {
                let stream = current_stream(py, ord)?;
                let p = plan_scan_cuda(&args, dims, delta_softplus, &out, last_v);
                let dt = uv.dtype;
                py.detach(|| {
                    catch_panic("selective_scan_fn", || {
                        crate::cuda::scan::scan_forward(ord, stream, &p, dt)
                    })
                })?;
            }
        }
        match last {
            Some((lo, _)) => Ok(PyTuple::new(py, [out_obj, lo])?.into_any()),
            None => Ok(out_obj),
        }
    }

    /// Checks selective_scan_fn's arguments without running it (what the
    /// custom-op path of `ops.selective_scan_fn` calls first, so that every
    /// path raises the same errors); returns the flags (delta_softplus,
    /// return_last_state) as bools.
    #[pyfunction]
    #[pyo3(signature = (u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=Given(None), return_last_state=Given(None), initial_state=None))]
    #[allow(non_snake_case, clippy::too_many_arguments)]
    fn selective_scan_check(
        u: &Bound<'_, PyAny>,
        delta: &Bound<'_, PyAny>,
        A: &Bound<'_, PyAny>,
        B: &Bound<'_, PyAny>,
        C: &Bound<'_, PyAny>,
        D: Option<&Bound<'_, PyAny>>,
        z: Option<&Bound<'_, PyAny>>,
        delta_bias: Option<&Bound<'_, PyAny>>,
        delta_softplus: Given<'_>,
        return_last_state: Given<'_>,
        initial_state: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<(bool, bool)> {
        let delta_softplus = args::flag("delta_softplus", &delta_softplus, false)?;
        let return_last_state = args::flag("return_last_state", &return_last_state, false)?;
        let v = ScanViews::extract("u", u, delta, A, B, C, D, z, delta_bias, initial_state)?;
        check_scan(&v.args())?;
        check_backend(&v.u)?;
        Ok((delta_softplus, return_last_state))
    }

    /// One decoding step; see `mamba_attention.ops.selective_state_update`.
    #[pyfunction]
    #[pyo3(signature = (state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=Given(None), state_batch_indices=None))]
    #[allow(non_snake_case, clippy::too_many_arguments)]
    fn selective_state_update<'py>(
        py: Python<'py>,
        state: &Bound<'py, PyAny>,
        x: &Bound<'py, PyAny>,
        dt: &Bound<'py, PyAny>,
        A: &Bound<'py, PyAny>,
        B: &Bound<'py, PyAny>,
        C: &Bound<'py, PyAny>,
        D: Option<&Bound<'py, PyAny>>,
        z: Option<&Bound<'py, PyAny>>,
        dt_bias: Option<&Bound<'py, PyAny>>,
        dt_softplus: Given<'py>,
        state_batch_indices: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let dt_softplus = args::flag("dt_softplus", &dt_softplus, false)?;
        let sv = extract("state", state)?;
        let xv = extract("x", x)?;
        let dtv = extract("dt", dt)?;
        let av = extract("A", A)?;
        let bv = extract("B", B)?;
        let cv = extract("C", C)?;
        let dsk = extract_opt("D", D)?;
        let zv = extract_opt("z", z)?;
        let bias = extract_opt("dt_bias", dt_bias)?;
        let idx = extract_opt("state_batch_indices", state_batch_indices)?;
        let args = UpdateArgs {
            state: &sv,
            x: &xv,
            dt: &dtv,
            a: &av,
            b: &bv,
            c: &cv,
            d: dsk.as_ref(),
            z: zv.as_ref(),
            dt_bias: bias.as_ref(),
            state_batch_indices: idx.as_ref(),
        };
        let dims = check_update(&args)?;
        let read: Vec<&TensorView> = [&xv, &dtv, &av, &bv, &cv]
            .into_iter()
            .chain(dsk.iter().chain(&zv).chain(&bias).chain(&idx))
            .collect();
        check_writes(&[&sv], &read)?;
        check_backend(&xv)?;
        let (out_obj, out) = alloc("out", x, &xv, &[dims.0, dims.1], None)?;
        match xv.device {
            Device::Cpu => {
                let level = SimdLevel::current()?;
                let job = plan_update(&args, dims, dt_softplus, &out);
                py.detach(|| {
                    catch_panic("selective_state_update", || {
                        state_update(&job, level);
                        Ok(())
                    })
                })?;
            }
            Device::Cuda(ord) => {
                let stream = current_stream(py, ord)?;
                let p = plan_update_cuda(&args, (dims.0, dims.1, dims.2), dt_softplus, &out);
                let dt = xv.dtype;
                py.detach(|| {
                    catch_panic("selective_state_update", || {
                        crate::cuda::scan::state_update(ord, stream, &p, dt)
                    })
                })?;
            }
        }
        Ok(out_obj)
    }

    pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
        m.add_function(wrap_pyfunction!(selective_scan_fwd, m)?)?;
        m.add_function(wrap_pyfunction!(selective_state_update, m)?)?;
        m.add_function(wrap_pyfunction!(selective_scan_check, m)?)?;
        Ok(())
    }
}
