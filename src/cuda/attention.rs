//! Launcher of the flash-attention forward kernel (kernels/flash_attn_fwd.cu).
//! `FlashFwdParams` mirrors the struct of the same name in that file.

use super::kernel;
use crate::error::{Error, Result};
use crate::tensor::DType;
use cudarc::driver::{result as cu, sys};

/// Mirror of `FlashFwdParams` in kernels/flash_attn_fwd.cu (keep in step).
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct FlashFwdParams {
    pub q: u64,
    pub k: u64,
    pub v: u64,
    pub out: u64,
    pub lse: u64,
    pub alibi: u64,
    pub cu_q: u64,
    pub cu_k: u64,
    pub q_sb: i64,
    pub q_ss: i64,
    pub q_sh: i64,
    pub k_sb: i64,
    pub k_ss: i64,
    pub k_sh: i64,
    pub v_sb: i64,
    pub v_ss: i64,
    pub v_sh: i64,
    pub o_sb: i64,
    pub o_ss: i64,
    pub o_sh: i64,
    pub lse_sb: i64,
    pub lse_sh: i64,
    pub lse_ss: i64,
    pub alibi_sb: i64,
    pub alibi_sh: i64,
    pub b: i32,
    pub hq: i32,
    pub hk: i32,
    pub hd: i32,
    pub sq: i32,
    pub sk: i32,
    pub left: i32,
    pub right: i32,
    pub scale_log2: f32,
    pub softcap: f32,
    pub softcap_in: f32,
    pub softcap_out: f32,
    pub vec_ok: i32,
    pub o_vec_ok: i32,
}

/// One compiled configuration: head dim the kernel is specialised for (the
/// real one is padded up to it), warps per CTA, m-tiles of 16 query rows per
/// warp, and keys per tile. Mirrors the entry points at the end of
/// flash_attn_fwd.cu.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FwdConfig {
    pub hd: i32,
    pub warps: i32,
    pub mt: i32,
    pub bn: i32,
}

impl FwdConfig {
    pub fn block_m(&self) -> i32 {
        16 * self.warps * self.mt
    }
    /// The entry-point suffix, e.g. "hd128_w8m1n64".
    pub fn tag(&self) -> String {
        format!("hd{}_w{}m{}n{}", self.hd, self.warps, self.mt, self.bn)
    }
    /// Dynamic shared memory: Q tile + 2 stages of K and V, rows padded by 16 bytes.
    pub fn smem_bytes(&self) -> u32 {
        ((self.block_m() + 4 * self.bn) * (self.hd + 8) * 2) as u32
    }
}

/// Every instantiated configuration, per padded head dim (first = default).
const CONFIGS: &[FwdConfig] = &[
    FwdConfig {
        hd: 32,
        warps: 4,
        mt: 1,
        bn: 64,
    },
    FwdConfig {
        hd: 64,
        warps: 8,
        mt: 1,
        bn: 64,
    },
    FwdConfig {
        hd: 96,
        warps: 8,
        mt: 1,
        bn: 64,
    },
    FwdConfig {
        hd: 128,
        warps: 8,
        mt: 1,
        bn: 64,
    },
    FwdConfig {
        hd: 128,
        warps: 4,
        mt: 2,
        bn: 32,
    },
    FwdConfig {
        hd: 256,
        warps: 4,
        mt: 1,
        bn: 32,
    },
];

/// Largest head dim the kernel supports.
pub const MAX_HEAD_DIM: usize = 256;

/// The configurations that fit head dim `hd`, best first. The environment
/// variable MAMBA_ATTENTION_FA_CFG (e.g. "w4m2n32") puts the configuration
/// of that shape first where it exists (a benchmarking knob).
pub fn configs_for(hd: i32) -> Vec<FwdConfig> {
    let padded = CONFIGS.iter().map(|c| c.hd).filter(|&p| p >= hd).min();
    let Some(padded) = padded else {
        return Vec::new();
    };
    let mut v: Vec<FwdConfig> = CONFIGS.iter().copied().filter(|c| c.hd == padded).collect();
    if let Ok(want) = std::env::var("MAMBA_ATTENTION_FA_CFG") {
        let want = want.trim().to_string();
        v.sort_by_key(|c| !c.tag().ends_with(&want));
    }
    v
}

fn suffix(d: DType) -> Result<&'static str> {
    match d {
        DType::F16 => Ok("f16"),
        DType::BF16 => Ok("bf16"),
        other => Err(Error::type_(format!(
            "q: the CUDA flash-attention kernel takes float16 or bfloat16, got {}",
            other.name()
        ))),
    }
}

fn device_attrs(ordinal: i32) -> Result<(i32, i32, i32)> {
    let err = |e: cu::DriverError| Error::runtime(format!("CUDA driver error: {e}"));
    if !super::driver_present() {
        return Err(Error::runtime(
            "no usable CUDA driver: libcuda could not be loaded, so CUDA tensors cannot be used here",
        ));
    }
    cu::init().map_err(err)?;
    let dev = cu::device::get(ordinal).map_err(err)?;
    let attr = |a| unsafe { cu::device::get_attribute(dev, a) }.map_err(err);
    Ok((
        attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
        attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
        attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?,
    ))
}

/// Picks a configuration for `p.hd` on GPU `ordinal` (sm_80+, fitting its
/// shared memory).
pub fn choose_config(ordinal: i32, hd: i32) -> Result<FwdConfig> {
    let (major, minor, smem_max) = device_attrs(ordinal)?;
    if major < 8 {
        return Err(Error::runtime(format!(
            "the CUDA flash-attention kernel needs compute capability 8.0 or newer (mma.sync bf16, cp.async); \
             cuda:{ordinal} is sm_{major}{minor}"
        )));
    }
    let cands = configs_for(hd);
    if cands.is_empty() {
        return Err(Error::value(format!(
            "q: head dim {hd} exceeds {MAX_HEAD_DIM}, the CUDA kernel's limit"
        )));
    }
    cands
        .iter()
        .copied()
        .find(|c| c.smem_bytes() as i32 <= smem_max)
        .ok_or_else(|| {
            Error::runtime(format!(
                "head dim {hd}: the CUDA flash-attention kernel needs {} bytes of shared memory per block, \
                 cuda:{ordinal} (sm_{major}{minor}) offers {smem_max}",
                cands[cands.len() - 1].smem_bytes()
            ))
        })
}

/// Launches the forward on `stream` of GPU `ordinal`. `grid_m` = the longest
/// query sequence (max_seqlen_q in varlen); `p.b` entries, `p.hq` heads.
pub fn flash_fwd(
    ordinal: i32,
    stream: u64,
    p: &FlashFwdParams,
    dtype: DType,
    max_sq: usize,
) -> Result<()> {
    if p.b == 0 || p.hq == 0 || max_sq == 0 {
        return Ok(());
    }
    if p.b > 65535 || p.hq > 65535 {
        return Err(Error::value(format!(
            "q: batch {} and query heads {} must each be at most 65535 (CUDA grid limit)",
            p.b, p.hq
        )));
    }
    // sm_90: the wgmma kernel where it covers the call (attention_wgmma.rs).
    if let Some(r) = super::attention_wgmma::try_flash_fwd(ordinal, stream, p, dtype, max_sq) {
        return r;
    }
    let cfg = choose_config(ordinal, p.hd)?;
    let dt = suffix(dtype)?;
    let name = format!("flash_fwd_{dt}_{}", cfg.tag());
    // One module per (dtype, head dim): a first call compiles only its kernels.
    let module = format!("flash_attn_fwd_{dt}_hd{}", cfg.hd);
    let k = kernel(ordinal, &module, &name)?;
    let smem = cfg.smem_bytes();
    k.set_max_dynamic_smem(smem)?;
    let grid_x = (max_sq as u64).div_ceil(cfg.block_m() as u64);
    if grid_x > i32::MAX as u64 {
        return Err(Error::value("q: sequence too long for the CUDA grid"));
    }
    let grid = (grid_x as u32, p.hq as u32, p.b as u32);
    unsafe { k.launch(grid, ((cfg.warps * 32) as u32, 1, 1), smem, stream, p) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_layout_matches_the_kernel() {
        // 8 pointers, 17 i64 strides, 8 ints, 4 floats, 2 flags.
        assert_eq!(
            std::mem::size_of::<FlashFwdParams>(),
            8 * 8 + 17 * 8 + 14 * 4
        );
    }

    #[test]
    fn every_config_has_a_module_and_entry_point() {
        let src = include_str!("../../kernels/flash_attn_fwd.cu");
        for c in CONFIGS {
            for dt in ["bf16", "f16"] {
                let module = format!("flash_attn_fwd_{dt}_hd{}", c.hd);
                assert!(
                    super::super::SOURCES.iter().any(|(m, _)| *m == module),
                    "{module}"
                );
                let entry = format!(" flash_fwd_{dt}_{}(", c.tag());
                assert!(src.contains(&entry), "{entry}");
            }
        }
    }

    #[test]
    fn configs_cover_every_head_dim() {
        for hd in (8..=256).step_by(8) {
            let c = configs_for(hd);
            assert!(!c.is_empty() && c[0].hd >= hd, "hd {hd}");
            assert!(c.iter().all(|c| c.smem_bytes() <= 163 * 1024));
        }
        assert!(configs_for(264).is_empty());
    }
}
