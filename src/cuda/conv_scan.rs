//! Launcher of the fused conv + scan forward (`selective_scan_fwd_conv*`
//! kernels of kernels/selective_scan_fwd.cu). `ConvScanFwdParams` mirrors the
//! struct of the same name there.

use super::kernel;
use super::scan::{check_batch, forward_kernel, ScanFwdParams, Tensor4, SCAN_THREADS};
use crate::error::Result;
use crate::tensor::DType;

/// Mirror of `scan::ConvScanFwdParams` in kernels/selective_scan_fwd.cu.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct ConvScanFwdParams {
    /// The scan's parameters, with `u` = x (the conv's input).
    pub s: ScanFwdParams,
    pub weight: Tensor4,
    pub bias: Tensor4,
    pub w: i32,
    pub silu: i32,
    pub _pad0: i32,
    pub _pad1: i32,
}

/// Launches the fused forward on `stream` of GPU `ordinal`: the scan's launch
/// rules (fast kernel where it applies, else the general one), the fast
/// kernel with 4 conv taps for widths ≤ 4, 8 otherwise.
pub fn conv_scan_forward(
    ordinal: i32,
    stream: u64,
    p: &ConvScanFwdParams,
    dtype: DType,
) -> Result<()> {
    check_batch(p.s.b)?;
    let kw = if p.w <= 4 { 4 } else { 8 };
    let (name, grid) = forward_kernel(
        &p.s,
        &format!("selective_scan_fwd_conv{kw}"),
        "selective_scan_fwd_conv",
        dtype,
    );
    let k = kernel(ordinal, "selective_scan_fwd", &name)?;
    unsafe { k.launch(grid, (SCAN_THREADS, 1, 1), 0, stream, p) }
}
