//! Launchers for the selective-scan kernels (kernels/selective_scan_fwd.cu,
//! kernels/selective_state_update.cu). The structs mirror kernels/common.cuh.

use super::{dtype_code, kernel};
use crate::error::Result;
use crate::tensor::{DType, TensorView};

/// Mirror of `Tensor4` in kernels/common.cuh.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct Tensor4 {
    pub ptr: u64,
    pub dtype: i32,
    pub _pad: i32,
    pub stride: [i64; 4],
}

impl Tensor4 {
    /// A view's pointer and dtype with the given strides (unused ones 0).
    pub fn with_strides(t: &TensorView, stride: [isize; 4]) -> Tensor4 {
        Tensor4 {
            ptr: t.ptr as u64,
            dtype: dtype_code(t.dtype),
            _pad: 0,
            stride: stride.map(|s| s as i64),
        }
    }
    /// A view of rank ≤ 4, strides in order, padded with 0.
    pub fn of(t: &TensorView) -> Tensor4 {
        let mut s = [0isize; 4];
        s[..t.ndim()].copy_from_slice(&t.strides);
        Self::with_strides(t, s)
    }
    pub fn opt(t: Option<&TensorView>) -> Tensor4 {
        t.map(Self::of).unwrap_or_default()
    }
}

/// Mirror of `ScanFwdParams`.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct ScanFwdParams {
    pub b: i32,
    pub d: i32,
    pub l: i32,
    pub n: i32,
    pub groups_b: i32,
    pub groups_c: i32,
    pub softplus: i32,
    pub _pad: i32,
    pub u: Tensor4,
    pub delta: Tensor4,
    pub z: Tensor4,
    pub out: Tensor4,
    pub a: Tensor4,
    pub bm: Tensor4,
    pub cm: Tensor4,
    pub dskip: Tensor4,
    pub delta_bias: Tensor4,
    pub initial_state: Tensor4,
    pub last_state: Tensor4,
}

/// Mirror of `StateUpdateParams`.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct StateUpdateParams {
    pub b: i32,
    pub d: i32,
    pub n: i32,
    pub cache: i32,
    pub groups_b: i32,
    pub groups_c: i32,
    pub softplus: i32,
    pub _pad: i32,
    pub state: Tensor4,
    pub x: Tensor4,
    pub dt: Tensor4,
    pub z: Tensor4,
    pub out: Tensor4,
    pub a: Tensor4,
    pub bm: Tensor4,
    pub cm: Tensor4,
    pub dskip: Tensor4,
    pub dt_bias: Tensor4,
    pub rows: Tensor4,
}

/// B or C of the scan as (b, g, n, l) strides and its group count (0 = constant (d, n)).
pub fn scan_bc(t: &TensorView) -> (Tensor4, i32) {
    let s = &t.strides;
    match t.ndim() {
        2 => (Tensor4::with_strides(t, [0, s[0], s[1], 0]), 0),
        3 => (Tensor4::with_strides(t, [s[0], 0, s[1], s[2]]), 1),
        _ => (Tensor4::of(t), t.shape[1] as i32),
    }
}

/// B or C of a step as (b, g, n) strides and its group count.
pub fn step_bc(t: &TensorView) -> (Tensor4, i32) {
    let s = &t.strides;
    match t.ndim() {
        2 => (Tensor4::with_strides(t, [s[0], 0, s[1], 0]), 1),
        _ => (Tensor4::of(t), t.shape[1] as i32),
    }
}

pub(crate) fn suffix(d: DType) -> &'static str {
    match d {
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        _ => "f32",
    }
}

/// The batch is the grid's y dimension.
pub(crate) fn check_batch(b: i32) -> Result<()> {
    if b > 65535 {
        return Err(crate::error::Error::value(format!(
            "u: the batch size b = {b} exceeds 65535, the CUDA kernels' limit"
        )));
    }
    Ok(())
}

/// Threads per block of every scan kernel (kernels/selective_scan_fwd.cu).
pub(crate) const SCAN_THREADS: u32 = 128;
/// Lanes per channel of the fast forward kernel (SCAN_FAST_P in the kernel).
pub(crate) const SCAN_FAST_P: u32 = 2;

/// Whether the fast forward kernel applies: n ≤ 16, B and C time-varying,
/// and no block of 128 / SCAN_FAST_P channels straddles a B or C group.
pub(crate) fn fast_forward(p: &ScanFwdParams) -> bool {
    let per_block = (SCAN_THREADS / SCAN_FAST_P) as i32;
    let fits = |g: i32| g >= 1 && (g == 1 || (p.d / g) % per_block == 0);
    p.n >= 1 && p.n <= 16 && fits(p.groups_b) && fits(p.groups_c)
}

/// Smallest power of two ≥ ceil(n / 16): lanes per channel in the general
/// scan and the state update (1 for n ≤ 16, … 16 for n ≤ 256).
pub(crate) fn lanes_per_channel(n: i32) -> u32 {
    ((n.max(1) as u32).div_ceil(16)).next_power_of_two().min(32)
}

/// The forward kernel a launch picks and its grid (launch rules from the
/// comment block of kernels/selective_scan_fwd.cu): `{fast_stem}_{dtype}` (the
/// fast kernel, SCAN_FAST_P lanes per channel) where `fast_forward` holds,
/// else `{general_stem}_{dtype}_general` (lanes_per_channel(n) lanes per
/// channel); blocks of SCAN_THREADS, the batch on the grid's y.
pub(crate) fn forward_kernel(
    p: &ScanFwdParams,
    fast_stem: &str,
    general_stem: &str,
    dtype: DType,
) -> (String, (u32, u32, u32)) {
    // In 64 bits: d · lanes passes 2^32 for d ≥ 2^28 (d ≤ MAX_DIM keeps the
    // block count below the grid limit).
    let (name, grid_x) = if fast_forward(p) {
        (
            format!("{fast_stem}_{}", suffix(dtype)),
            (p.d as u64).div_ceil((SCAN_THREADS / SCAN_FAST_P) as u64),
        )
    } else {
        let lanes = lanes_per_channel(p.n) as u64;
        (
            format!("{general_stem}_{}_general", suffix(dtype)),
            (p.d as u64 * lanes).div_ceil(SCAN_THREADS as u64),
        )
    };
    (name, (grid_x as u32, p.b as u32, 1))
}

/// Launches the forward scan on `stream` of GPU `ordinal` (launch rules from
/// the comment block of kernels/selective_scan_fwd.cu).
pub fn scan_forward(ordinal: i32, stream: u64, p: &ScanFwdParams, dtype: DType) -> Result<()> {
    check_batch(p.b)?;
    let (name, grid) = forward_kernel(p, "selective_scan_fwd", "selective_scan_fwd", dtype);
    let k = kernel(ordinal, "selective_scan_fwd", &name)?;
    unsafe { k.launch(grid, (SCAN_THREADS, 1, 1), 0, stream, p) }
}

/// Threads per block of the state update (SSU_THREADS in the kernel).
const UPDATE_THREADS: u32 = 128;

/// Launches one decoding step on `stream` of GPU `ordinal` (launch rules from
/// kernels/selective_state_update.cu).
pub fn state_update(ordinal: i32, stream: u64, p: &StateUpdateParams, dtype: DType) -> Result<()> {
    check_batch(p.b)?;
    if super::ssu_vec::try_launch(ordinal, stream, p, dtype)? {
        return Ok(());
    }
    let k = kernel(
        ordinal,
        "selective_state_update",
        &format!("selective_state_update_{}", suffix(dtype)),
    )?;
    let lanes = lanes_per_channel(p.n) as u64;
    let grid_x = (p.d as u64 * lanes).div_ceil(UPDATE_THREADS as u64);
    let grid = (grid_x as u32, p.b as u32, 1);
    unsafe { k.launch(grid, (UPDATE_THREADS, 1, 1), 0, stream, p) }
}

/// Mirror of `ScanFwdCkParams` (kernels/selective_scan_fwd.cu): the forward's
/// parameters and the checkpoint buffer, float32 contiguous (b, d, ceil(l /
/// CK_CHUNK), n).
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct ScanFwdCkParams {
    pub s: ScanFwdParams,
    pub ck: u64,
}

/// Steps between the training forward's checkpoints on CUDA (SCAN_CK_T in
/// the forward kernel; the backward's fast kernel's chunk, FAST_CHUNK).
pub const CK_CHUNK: usize = 32;

/// Launches the training forward: the forward of `scan_forward` that also
/// writes the states before every CK_CHUNK-th step to `p.ck`.
pub fn scan_forward_ck(ordinal: i32, stream: u64, p: &ScanFwdCkParams, dtype: DType) -> Result<()> {
    check_batch(p.s.b)?;
    let (name, grid) = forward_kernel(
        &p.s,
        "selective_scan_fwd_ck",
        "selective_scan_fwd_ck",
        dtype,
    );
    let k = kernel(ordinal, "selective_scan_fwd", &name)?;
    unsafe { k.launch(grid, (SCAN_THREADS, 1, 1), 0, stream, p) }
}
