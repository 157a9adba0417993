//! Launcher of the sm_90a (wgmma) flash-attention forward,
//! kernels/flash_attn_fwd_wgmma.cu. It takes the same `FlashFwdParams` as the
//! mma.sync kernel and covers a subset of its calls; `attention::flash_fwd`
//! asks [`try_flash_fwd`] first and falls back to the mma.sync kernel when it
//! declines.
//!
//! Covered: compute capability 9.0 exactly (the cubin is sm_90a), float16 /
//! bfloat16, head dim exactly 128, q/k/v rows 16-byte aligned, no varlen, no
//! softcap, no ALiBi, softmax_scale > 0; any mask, GQA/MQA, sq != sk, lse or not.
//!
//! Environment: `MAMBA_ATTENTION_FA_WGMMA=0` turns the path off (both paths
//! stay testable); a set `MAMBA_ATTENTION_FA_CFG` (an explicit mma.sync tiling,
//! a benchmarking knob) also keeps calls on the mma.sync kernel.

use super::attention::FlashFwdParams;
use super::kernel;
use crate::error::{Error, Result};
use crate::tensor::DType;
use cudarc::driver::{result as cu, sys};

/// Query rows per CTA (two warpgroups of 64).
pub const BLOCK_M: u64 = 128;
/// Head dim the kernel is written for.
pub const HEAD_DIM: i32 = 128;
/// Dynamic shared memory: Q, two stages of K and V (32 KiB each), and 1 KiB
/// of slack to align the base to 1024 bytes (the 128-byte swizzle's period).
pub const SMEM_BYTES: u32 = 5 * 32 * 1024 + 1024;

/// Whether the environment allows the wgmma path.
pub fn enabled() -> bool {
    if std::env::var("MAMBA_ATTENTION_FA_WGMMA").is_ok_and(|v| v.trim() == "0") {
        return false;
    }
    !std::env::var("MAMBA_ATTENTION_FA_CFG").is_ok_and(|v| !v.trim().is_empty())
}

/// Whether the kernel covers these parameters (device aside).
pub fn covers(p: &FlashFwdParams, dtype: DType) -> bool {
    matches!(dtype, DType::F16 | DType::BF16)
        && p.hd == HEAD_DIM
        && p.cu_q == 0
        && p.cu_k == 0
        && p.alibi == 0
        && p.softcap == 0.0
        && p.scale_log2 > 0.0
        && p.scale_log2.is_finite()
        && p.vec_ok != 0
        && p.hk > 0
        && p.hq % p.hk == 0
}

/// (major, minor, opt-in shared memory per block) of GPU `ordinal`.
fn device_attrs(ordinal: i32) -> Option<(i32, i32, i32)> {
    if !super::driver_present() {
        return None;
    }
    cu::init().ok()?;
    let dev = cu::device::get(ordinal).ok()?;
    let attr = |a| unsafe { cu::device::get_attribute(dev, a) }.ok();
    Some((
        attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
        attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
        attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?,
    ))
}

/// Launches the wgmma forward when it covers the call on this device:
/// `Some(result)`; `None` when the caller should use the mma.sync kernel.
/// The caller has checked `p.b`, `p.hq` and `max_sq` (non-zero, grid limits).
pub fn try_flash_fwd(
    ordinal: i32,
    stream: u64,
    p: &FlashFwdParams,
    dtype: DType,
    max_sq: usize,
) -> Option<Result<()>> {
    if !enabled() || !covers(p, dtype) {
        return None;
    }
    let (major, minor, smem_max) = device_attrs(ordinal)?;
    if (major, minor) != (9, 0) || (smem_max as i64) < SMEM_BYTES as i64 {
        return None;
    }
    Some(launch(ordinal, stream, p, dtype, max_sq))
}

fn launch(
    ordinal: i32,
    stream: u64,
    p: &FlashFwdParams,
    dtype: DType,
    max_sq: usize,
) -> Result<()> {
    let dt = if dtype == DType::BF16 { "bf16" } else { "f16" };
    let module = format!("flash_attn_fwd_wgmma_{dt}_hd128");
    let name = format!("flash_fwd_wgmma_{dt}_hd128");
    let k = kernel(ordinal, &module, &name)?;
    k.set_max_dynamic_smem(SMEM_BYTES)?;
    let grid_x = (max_sq as u64).div_ceil(BLOCK_M);
    if grid_x > i32::MAX as u64 {
        return Err(Error::value("q: sequence too long for the CUDA grid"));
    }
    let grid = (grid_x as u32, p.hq as u32, p.b as u32);
    unsafe { k.launch(grid, (256, 1, 1), SMEM_BYTES, stream, p) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modules_and_entry_points_exist() {
        let src = include_str!("../../kernels/flash_attn_fwd_wgmma.cu");
        assert!(src.contains(super::super::nvrtc::ARCH_SPECIFIC_MARKER));
        for dt in ["bf16", "f16"] {
            let module = format!("flash_attn_fwd_wgmma_{dt}_hd128");
            assert!(
                super::super::SOURCES.iter().any(|(m, _)| *m == module),
                "{module}"
            );
            assert!(src.contains(&format!(" flash_fwd_wgmma_{dt}_hd128(")));
        }
    }

    #[test]
    fn coverage() {
        let base = FlashFwdParams {
            hd: 128,
            hq: 8,
            hk: 2,
            scale_log2: 0.1,
            vec_ok: 1,
            ..Default::default()
        };
        assert!(covers(&base, DType::BF16) && covers(&base, DType::F16));
        assert!(!covers(&base, DType::F32));
        assert!(!covers(&FlashFwdParams { hd: 64, ..base }, DType::BF16));
        assert!(!covers(
            &FlashFwdParams {
                softcap: 5.0,
                ..base
            },
            DType::BF16
        ));
        assert!(!covers(&FlashFwdParams { alibi: 8, ..base }, DType::BF16));
        assert!(!covers(
            &FlashFwdParams {
                cu_q: 8,
                cu_k: 8,
                ..base
            },
            DType::BF16
        ));
        assert!(!covers(&FlashFwdParams { vec_ok: 0, ..base }, DType::BF16));
        assert!(!covers(
            &FlashFwdParams {
                scale_log2: 0.0,
                ..base
            },
            DType::BF16
        ));
    }
}
