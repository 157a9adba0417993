//! Launchers for kernels/norm.cu (RMSNorm with residual, SwiGLU). The
//! structs mirror the kernel's; tensors are (rows, cols) views in `Tensor4`.

use super::kernel;
use super::scan::Tensor4;
use crate::error::Result;

/// Mirror of `RmsNormParams`.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct RmsNormParams {
    pub rows: i32,
    pub h: i32,
    pub eps: f32,
    pub _pad: i32,
    pub x: Tensor4,
    pub res: Tensor4,
    pub w: Tensor4,
    pub b: Tensor4,
    pub out: Tensor4,
    pub res_out: Tensor4,
    pub rstd: Tensor4,
}

/// Mirror of `RmsNormBwdParams`.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct RmsNormBwdParams {
    pub rows: i32,
    pub h: i32,
    pub nblk: i32,
    pub _pad: i32,
    pub x: Tensor4,
    pub res: Tensor4,
    pub w: Tensor4,
    pub rstd: Tensor4,
    pub dy: Tensor4,
    pub dres_out: Tensor4,
    pub dx: Tensor4,
    pub dres: Tensor4,
    pub partial: Tensor4,
    pub dw: Tensor4,
    pub db: Tensor4,
}

/// Mirror of `SwiGluParams`.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct SwiGluParams {
    pub rows: i32,
    pub cols: i32,
    pub g: Tensor4,
    pub u: Tensor4,
    pub out: Tensor4,
    pub dy: Tensor4,
    pub du: Tensor4,
}

const NORM_THREADS: u32 = 256;

/// CTAs of the backward (each walks rows i, i + nblk, ...): enough to fill
/// the GPU, and no more than there are rows.
pub fn bwd_blocks(rows: usize) -> usize {
    rows.clamp(1, 1024)
}

pub fn rms_norm_forward(ordinal: i32, stream: u64, p: &RmsNormParams) -> Result<()> {
    let k = kernel(ordinal, "norm", "rms_norm_fwd")?;
    unsafe { k.launch((p.rows as u32, 1, 1), (NORM_THREADS, 1, 1), 0, stream, p) }
}

pub fn rms_norm_backward(ordinal: i32, stream: u64, p: &RmsNormBwdParams) -> Result<()> {
    let k = kernel(ordinal, "norm", "rms_norm_bwd")?;
    unsafe { k.launch((p.nblk as u32, 1, 1), (NORM_THREADS, 1, 1), 0, stream, p)? };
    let r = kernel(ordinal, "norm", "rms_norm_bwd_reduce")?;
    unsafe {
        r.launch(
            ((p.h as u32).div_ceil(256), 1, 1),
            (256, 1, 1),
            0,
            stream,
            p,
        )
    }
}

pub fn swiglu(ordinal: i32, stream: u64, p: &SwiGluParams, backward: bool) -> Result<()> {
    let name = if backward { "swiglu_bwd" } else { "swiglu_fwd" };
    let k = kernel(ordinal, "norm", name)?;
    let n = p.rows as u64 * p.cols as u64;
    let grid = n.div_ceil(256).clamp(1, 65535 * 8) as u32;
    unsafe { k.launch((grid, 1, 1), (256, 1, 1), 0, stream, p) }
}
