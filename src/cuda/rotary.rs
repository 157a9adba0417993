//! Launcher for kernels/rotary.cu (rotary embedding of q and k in one launch).

use super::kernel;
use super::scan::Tensor4;
use crate::error::Result;

/// Mirror of `RotaryParams`.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct RotaryParams {
    pub b: i32,
    pub l: i32,
    pub hq: i32,
    pub hk: i32,
    pub hd: i32,
    pub conj: i32,
    pub _pad0: i32,
    pub _pad1: i32,
    pub q: Tensor4,
    pub k: Tensor4,
    pub qo: Tensor4,
    pub ko: Tensor4,
    pub pos: Tensor4,
    pub inv: Tensor4,
}

pub fn rotary_qk(ordinal: i32, stream: u64, p: &RotaryParams) -> Result<()> {
    let k = kernel(ordinal, "rotary", "rotary_qk")?;
    let n = p.b as u64 * p.l as u64 * (p.hq + p.hk) as u64 * (p.hd / 2) as u64;
    let grid = n.div_ceil(256).clamp(1, 65535 * 8) as u32;
    unsafe { k.launch((grid, 1, 1), (256, 1, 1), 0, stream, p) }
}
