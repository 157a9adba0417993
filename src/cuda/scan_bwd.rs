//! Launcher of the selective-scan backward (kernels/selective_scan_bwd.cu).
//! `ScanBwdParams` mirrors the struct of the same name in that file.

use super::kernel;
use super::scan::Tensor4;
use crate::error::{Error, Result};

/// Mirror of `ScanBwdParams` in kernels/selective_scan_bwd.cu.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct ScanBwdParams {
    pub b: i32,
    pub d: i32,
    pub l: i32,
    pub n: i32,
    pub groups_b: i32,
    pub groups_c: i32,
    pub softplus: i32,
    pub nchunks: i32,
    pub u: Tensor4,
    pub delta: Tensor4,
    pub z: Tensor4,
    pub dout: Tensor4,
    pub a: Tensor4,
    pub bm: Tensor4,
    pub cm: Tensor4,
    pub dskip: Tensor4,
    pub delta_bias: Tensor4,
    pub initial_state: Tensor4,
    pub dlast: Tensor4,
    pub du: Tensor4,
    pub ddelta: Tensor4,
    pub dz: Tensor4,
    pub da: Tensor4,
    pub db: Tensor4,
    pub dc: Tensor4,
    pub dd: Tensor4,
    pub ddelta_bias: Tensor4,
    pub dinit: Tensor4,
    pub scratch: Tensor4,
}

/// Channels (warps) per block: SB_W in the kernel.
pub const BWD_W: u32 = 8;
/// Timesteps per chunk: 32 * SB_IT in the kernel.
pub const BWD_CHUNK: usize = 256;

/// Number of chunks of a sequence of length `l`.
pub fn bwd_chunks(l: usize) -> usize {
    l.div_ceil(BWD_CHUNK)
}

/// Dynamic shared memory of one block (the kernel's launch rules).
fn smem_bytes(n: u32) -> u32 {
    let ch = BWD_CHUNK as u32;
    4 * (6 * BWD_W * ch + BWD_W * (ch + ch / 32) + 2 * BWD_W * n + 64 * BWD_W)
}

/// Launches the backward on `stream` of GPU `ordinal`. The caller has zeroed
/// dA, dB, dC, dD and ddelta_bias (added into atomically) and allocated the
/// scratch buffer when `nchunks > 1`.
pub fn scan_backward(ordinal: i32, stream: u64, p: &ScanBwdParams) -> Result<()> {
    if p.b > 65535 {
        return Err(Error::value(format!(
            "u: the batch size b = {} exceeds 65535, the CUDA kernels' limit",
            p.b
        )));
    }
    let k = kernel(ordinal, "selective_scan_bwd", "selective_scan_bwd")?;
    let smem = smem_bytes(p.n as u32);
    k.set_max_dynamic_smem(smem)?;
    let grid = ((p.d as u32).div_ceil(BWD_W), p.b as u32, 1);
    unsafe { k.launch(grid, (32 * BWD_W, 1, 1), smem, stream, p) }
}
