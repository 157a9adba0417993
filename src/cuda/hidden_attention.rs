//! Launcher of the hidden-attention kernels (kernels/hidden_attention.cu).
//! The structs mirror the ones at the top of that file.

use super::kernel;
use super::scan::Tensor4;
use crate::error::{Error, Result};

/// Mirror of `HaParams` in kernels/hidden_attention.cu.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct HaParams {
    pub b: i32,
    pub d: i32,
    pub l: i32,
    pub n: i32,
    pub groups_b: i32,
    pub groups_c: i32,
    pub softplus: i32,
    pub mean: i32,
    /// Rows staged in shared memory per step; set by [`launch`].
    pub rows: i32,
    /// This pass's states [k0, k0 + nk); set by [`launch`].
    pub k0: i32,
    pub nk: i32,
    /// Add to the output (passes after the first); set by [`launch`].
    pub accumulate: i32,
    pub inv_d: f32,
    pub _pad2: f32,
    pub delta: Tensor4,
    pub a: Tensor4,
    pub bm: Tensor4,
    pub cm: Tensor4,
    pub delta_bias: Tensor4,
    pub out: Tensor4,
}

/// Mirror of `HaZeroParams`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct HaZeroParams {
    ptr: u64,
    numel: i64,
}

/// Threads per block (HA_THREADS in the kernel).
const THREADS: u32 = 128;
/// Rows staged in shared memory per step.
const ROWS: i32 = 32;
/// States per pass (the largest kernel's NMAX).
const MAX_NK: i32 = 64;

/// Launches on `stream` of GPU `ordinal` (launch rules in the kernel's header).
pub fn launch(ordinal: i32, stream: u64, p: &HaParams) -> Result<()> {
    if p.d > 65535 || p.b > 65535 {
        return Err(Error::value(format!(
            "delta: hidden_attention on CUDA supports d and b up to 65535, got b = {}, d = {}",
            p.b, p.d
        )));
    }
    let mut p = *p;
    p.rows = ROWS;
    if p.mean != 0 {
        let numel = p.b as i64 * p.l as i64 * p.l as i64;
        let z = kernel(ordinal, "hidden_attention", "hidden_attention_zero")?;
        let zp = HaZeroParams {
            ptr: p.out.ptr,
            numel,
        };
        let blocks = (numel as u64).div_ceil(256);
        if blocks > i32::MAX as u64 {
            return Err(Error::value(
                "delta: the (b, l, l) output is too large for one CUDA launch",
            ));
        }
        unsafe { z.launch((blocks as u32, 1, 1), (256, 1, 1), 0, stream, &zp)? };
    }
    let grid = ((p.l as u32).div_ceil(THREADS), p.d as u32, p.b as u32);
    // Passes of at most MAX_NK states, in stream order; α adds up over them.
    let mut k0 = 0;
    while k0 < p.n {
        p.k0 = k0;
        p.nk = (p.n - k0).min(MAX_NK);
        p.accumulate = (k0 > 0) as i32;
        let name = if p.nk <= 16 {
            "hidden_attention_n16"
        } else {
            "hidden_attention_n64"
        };
        let smem = (p.rows * (3 * p.nk + 1) * 4) as u32;
        let k = kernel(ordinal, "hidden_attention", name)?;
        k.set_max_dynamic_smem(smem)?;
        unsafe { k.launch(grid, (THREADS, 1, 1), smem, stream, &p)? };
        k0 += MAX_NK;
    }
    Ok(())
}
