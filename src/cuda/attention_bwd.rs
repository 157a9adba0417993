//! Launcher of the flash-attention backward (kernels/flash_attn_bwd.cu):
//! preprocess (D = rowsum(dO∘O) − dlse, lse in log2 units), the key-tile
//! kernel (dK, dV; dQ by float32 atomics), then the dQ conversion — or, when
//! deterministic, the key-tile kernel without dQ and a query-tile dQ kernel.
//! `FlashBwdParams` mirrors the struct of the same name in that file.

use super::kernel;
use crate::error::{Error, Result};
use crate::tensor::DType;

/// Mirror of `FlashBwdParams` in kernels/flash_attn_bwd.cu (keep in step).
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct FlashBwdParams {
    pub q: u64,
    pub k: u64,
    pub v: u64,
    pub out: u64,
    pub dout: u64,
    pub dq: u64,
    pub dk: u64,
    pub dv: u64,
    pub lse: u64,
    pub dlse: u64,
    pub lse2: u64,
    pub dsum: u64,
    pub dq_acc: u64,
    pub alibi: u64,
    pub cu_q: u64,
    pub cu_k: u64,
    /// (batch, seq, head) strides of q, k, v, out, dout, dq, dk, dv.
    pub strides: [[i64; 3]; 8],
    /// lse and dlse: (batch, head, seq) strides.
    pub lse_s: [i64; 3],
    pub dlse_s: [i64; 3],
    pub alibi_sb: i64,
    pub alibi_sh: i64,
    pub rows: i64,
    pub b: i32,
    pub hq: i32,
    pub hk: i32,
    pub hd: i32,
    pub sq: i32,
    pub sk: i32,
    pub left: i32,
    pub right: i32,
    pub scale: f32,
    pub scale_log2: f32,
    pub softcap: f32,
    pub softcap_in: f32,
    pub softcap_out: f32,
    pub vec_ok: i32,
    pub o_vec_ok: i32,
    pub dq_atomic: i32,
}

/// One compiled configuration per padded head dim: the key-tile kernel's
/// keys per CTA (bn), query rows per step (bm), warps per 16 keys (wd: column
/// split of dK/dV), and the deterministic dQ kernel's keys per step (qbn) and
/// warps (qnw, 16 query rows each). Mirrors the entry points of the .cu file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BwdConfig {
    pub hd: i32,
    pub bn: i32,
    pub bm: i32,
    pub wd: i32,
    pub qbn: i32,
    pub qnw: i32,
}

impl BwdConfig {
    pub fn warps(&self) -> i32 {
        self.bn / 16 * self.wd
    }
    pub fn tag(&self) -> String {
        format!("hd{}_n{}m{}w{}", self.hd, self.bn, self.bm, self.wd)
    }
    pub fn q_tag(&self) -> String {
        format!("hd{}_n{}w{}", self.hd, self.qbn, self.qnw)
    }
    /// K, V tiles, 2 stages of Q and dO, the dSᵀ tile (bf16/f16, rows padded
    /// by 16 bytes; two of them on sm_90 and later, where the kernel defers
    /// each dQ product by one step) and 2 stages of lse/D (float32).
    pub fn smem_bytes(&self, major: i32) -> u32 {
        let rs = self.hd + 8;
        let ds = if major >= 9 { 2 } else { 1 };
        ((2 * self.bn * rs + 4 * self.bm * rs + ds * self.bn * (self.bm + 8)) * 2 + 16 * self.bm)
            as u32
    }
    /// Q, dO tiles and 2 stages of K and V.
    pub fn q_smem_bytes(&self) -> u32 {
        let rs = self.hd + 8;
        ((2 * 16 * self.qnw * rs + 4 * self.qbn * rs) * 2) as u32
    }
}

const fn cfg(hd: i32, bn: i32, bm: i32, wd: i32, qbn: i32, qnw: i32) -> BwdConfig {
    BwdConfig {
        hd,
        bn,
        bm,
        wd,
        qbn,
        qnw,
    }
}

const CONFIGS: &[BwdConfig] = &[
    cfg(32, 128, 64, 1, 64, 4),
    cfg(64, 128, 64, 1, 64, 4),
    cfg(96, 128, 64, 1, 64, 4),
    cfg(128, 128, 64, 1, 64, 4),
    cfg(256, 64, 32, 2, 32, 4),
    // Alternatives go after the default of their head dim, selected with
    // MAMBA_ATTENTION_FAB_CFG (hd 128 "n64m32w1", 4 warps and two CTAs per SM,
    // measured 8 % slower on G6/G8 and removed: bench/attn_notes.md).
];

/// The configuration for head dim `hd` (padded up to the next instantiated
/// one). MAMBA_ATTENTION_FAB_CFG (e.g. "n128m64w1") picks the configuration of
/// that shape where it exists (a benchmarking knob); else the first listed.
pub fn config_for(hd: i32) -> Option<BwdConfig> {
    let padded = CONFIGS.iter().map(|c| c.hd).filter(|&p| p >= hd).min()?;
    let mut v: Vec<BwdConfig> = CONFIGS.iter().copied().filter(|c| c.hd == padded).collect();
    if let Ok(want) = std::env::var("MAMBA_ATTENTION_FAB_CFG") {
        let want = want.trim().to_string();
        v.sort_by_key(|c| !c.tag().ends_with(&want));
    }
    v.first().copied()
}

fn suffix(d: DType) -> Result<&'static str> {
    match d {
        DType::F16 => Ok("f16"),
        DType::BF16 => Ok("bf16"),
        other => Err(Error::type_(format!(
            "q: the CUDA flash-attention backward takes float16 or bfloat16, got {}",
            other.name()
        ))),
    }
}

fn compute_major(ordinal: i32) -> Result<i32> {
    use cudarc::driver::{result as cu, sys};
    let err = |e: cu::DriverError| Error::runtime(format!("CUDA driver error: {e}"));
    let dev = cu::device::get(ordinal).map_err(err)?;
    unsafe {
        cu::device::get_attribute(
            dev,
            sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
        )
    }
    .map_err(err)
}

fn grid_1d(n: u64, per_block: u64) -> Result<u32> {
    let g = n.div_ceil(per_block);
    if g > i32::MAX as u64 {
        return Err(Error::value("q: too many rows for the CUDA grid"));
    }
    Ok(g as u32)
}

/// Launches the backward on `stream` of GPU `ordinal`. `max_sq`/`max_sk`:
/// the longest query/key sequence (the batched lengths, or max_seqlen_q/k).
/// `p.dq_acc` must be zeroed float32 scratch unless `deterministic`.
pub fn flash_bwd(
    ordinal: i32,
    stream: u64,
    p: &FlashBwdParams,
    dtype: DType,
    max_sq: usize,
    max_sk: usize,
    deterministic: bool,
) -> Result<()> {
    if p.b == 0 || p.hq == 0 {
        return Ok(());
    }
    if p.b > 65535 || p.hq > 65535 {
        return Err(Error::value(format!(
            "q: batch {} and query heads {} must each be at most 65535 (CUDA grid limit)",
            p.b, p.hq
        )));
    }
    // Checks the architecture as the forward does.
    super::attention::choose_config(ordinal, p.hd)?;
    let major = compute_major(ordinal)?;
    let c = config_for(p.hd).ok_or_else(|| {
        Error::value(format!(
            "q: head dim {} exceeds {}, the CUDA kernel's limit",
            p.hd,
            super::attention::MAX_HEAD_DIM
        ))
    })?;
    let dt = suffix(dtype)?;
    let mut p = *p;
    p.dq_atomic = (!deterministic) as i32;
    let pairs = p.rows as u64 * p.hq as u64;

    // 1. D and lse2 (one warp per (row, head)).
    if pairs > 0 {
        let k = kernel(
            ordinal,
            "flash_attn_bwd_aux",
            &format!("flash_bwd_pre_{dt}"),
        )?;
        unsafe { k.launch((grid_1d(pairs, 8)?, 1, 1), (256, 1, 1), 0, stream, &p)? };
    }
    let module = format!("flash_attn_bwd_{dt}_hd{}", c.hd);
    // 2. dK, dV (and dQ atomics).
    if max_sk > 0 {
        let k = kernel(ordinal, &module, &format!("flash_bwd_{dt}_{}", c.tag()))?;
        let smem = c.smem_bytes(major);
        k.set_max_dynamic_smem(smem)?;
        let gx = grid_1d(max_sk as u64, c.bn as u64)?;
        unsafe {
            k.launch(
                (gx, p.hk as u32, p.b as u32),
                ((c.warps() * 32) as u32, 1, 1),
                smem,
                stream,
                &p,
            )?
        };
    }
    // 3. dQ.
    if deterministic {
        if max_sq > 0 {
            let k = kernel(
                ordinal,
                &module,
                &format!("flash_bwd_dqk_{dt}_{}", c.q_tag()),
            )?;
            let smem = c.q_smem_bytes();
            k.set_max_dynamic_smem(smem)?;
            let gx = grid_1d(max_sq as u64, (16 * c.qnw) as u64)?;
            unsafe {
                k.launch(
                    (gx, p.hq as u32, p.b as u32),
                    ((c.qnw * 32) as u32, 1, 1),
                    smem,
                    stream,
                    &p,
                )?
            };
        }
    } else if pairs > 0 {
        let k = kernel(ordinal, "flash_attn_bwd_aux", &format!("flash_bwd_dq_{dt}"))?;
        let n = pairs * (p.hd as u64 / 2);
        unsafe { k.launch((grid_1d(n, 256)?, 1, 1), (256, 1, 1), 0, stream, &p)? };
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_layout_matches_the_kernel() {
        // 16 pointers, 33 i64, 16 four-byte fields.
        assert_eq!(
            std::mem::size_of::<FlashBwdParams>(),
            16 * 8 + 33 * 8 + 16 * 4
        );
    }

    #[test]
    fn every_config_has_a_module_and_entry_points() {
        let src = include_str!("../../kernels/flash_attn_bwd.cu");
        assert!(super::super::SOURCES
            .iter()
            .any(|(m, _)| *m == "flash_attn_bwd_aux"));
        for c in CONFIGS {
            for dt in ["bf16", "f16"] {
                let module = format!("flash_attn_bwd_{dt}_hd{}", c.hd);
                assert!(
                    super::super::SOURCES.iter().any(|(m, _)| *m == module),
                    "{module}"
                );
                for entry in [
                    format!(" flash_bwd_{dt}_{}(", c.tag()),
                    format!(" flash_bwd_dqk_{dt}_{}(", c.q_tag()),
                ] {
                    assert!(src.contains(&entry), "{entry}");
                }
            }
            assert!(c.smem_bytes(8) <= 163 * 1024, "{c:?}");
            assert!(c.smem_bytes(9) <= 227 * 1024, "{c:?}");
            assert!(c.q_smem_bytes() <= 163 * 1024, "{c:?}");
        }
    }

    #[test]
    fn configs_cover_every_head_dim() {
        for hd in (8..=256).step_by(8) {
            assert!(config_for(hd).is_some_and(|c| c.hd >= hd), "hd {hd}");
        }
        assert!(config_for(264).is_none());
    }
}
