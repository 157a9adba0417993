//! Launch of the vectorised decode-step kernels
//! (`selective_state_update_vec{1,R}_*` in kernels/selective_state_update.cu)
//! when the arguments have the usual layout; `None` leaves the call to the
//! general kernel.

use super::kernel;
use super::scan::{suffix, StateUpdateParams, Tensor4};
use crate::error::Result;
use crate::tensor::DType;

/// SSU_VR in the kernel: batch entries per thread of the vecR kernel.
const VR: u32 = 2;
/// Below this batch size the vec1 kernel (one entry per thread) is used.
const VR_MIN_BATCH: i32 = 16;

/// Whether quads of 4 elements along the last used dimension are aligned:
/// pointer aligned to `align` bytes, n-stride 1, other strides multiples of 4.
fn quads_ok(t: &Tensor4, nd: usize, align: u64) -> bool {
    t.ptr % align == 0 && t.stride[nd - 1] == 1 && t.stride[..nd - 1].iter().all(|s| s % 4 == 0)
}

/// The host rules of the vec kernels (see the kernel file).
pub fn usable(p: &StateUpdateParams) -> bool {
    let bc_ok = |t: &Tensor4| match t.dtype {
        0 => quads_ok(t, 3, 16),
        1 | 2 => quads_ok(t, 3, 8),
        _ => false,
    };
    // The kernel's thread index c·(n/4) + k/4 is a 32-bit int.
    let threads = p.d.max(0) as u64 * (p.n.max(0) as u64 / 4);
    matches!(p.n, 4 | 8 | 16 | 32 | 64 | 128)
        && threads < (1 << 31) - 128
        && p.state.dtype == 0
        && p.a.dtype == 0
        && quads_ok(&p.state, 3, 16)
        && quads_ok(&p.a, 2, 16)
        && bc_ok(&p.bm)
        && bc_ok(&p.cm)
}

/// Launches the vec kernel when `usable`; Ok(false) otherwise.
pub fn try_launch(ordinal: i32, stream: u64, p: &StateUpdateParams, dtype: DType) -> Result<bool> {
    if !usable(p) {
        return Ok(false);
    }
    let (variant, r) = if p.b >= VR_MIN_BATCH {
        ("vecR", VR)
    } else {
        ("vec1", 1)
    };
    let k = kernel(
        ordinal,
        "selective_state_update",
        &format!("selective_state_update_{variant}_{}", suffix(dtype)),
    )?;
    let lanes = (p.n as u64) / 4;
    let grid = (
        (p.d as u64 * lanes).div_ceil(128) as u32,
        (p.b as u32).div_ceil(r),
        1,
    );
    unsafe { k.launch(grid, (128, 1, 1), 0, stream, p)? };
    Ok(true)
}
