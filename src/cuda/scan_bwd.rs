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
    /// 1: `scratch` holds the forward's checkpoints (fast kernel: no pre-pass).
    pub ck_given: i32,
    pub _pad: i32,
}

/// Channels (warps) per block: SB_W in the kernel.
pub const BWD_W: u32 = 8;
/// Timesteps per chunk: 32 * SB_IT in the kernel.
pub const BWD_CHUNK: usize = 256;
/// The fast (channel-parallel) kernel: channels per block (SF_CPB), threads
/// per block (SF_THREADS), chunk length (SF_T).
pub const FAST_CPB: u32 = 32;
pub const FAST_THREADS: u32 = 128;
pub const FAST_CHUNK: usize = 32;
const _: () = assert!(FAST_CHUNK == super::scan::CK_CHUNK);

/// Whether `selective_scan_bwd_fast` applies (its launch rules): n <= 16,
/// time-varying B and C, and no block of 32 channels straddling two groups.
pub fn use_fast(d: usize, n: usize, groups_b: i32, groups_c: i32) -> bool {
    let fits = |g: i32| {
        g == 1
            || (g > 1
                && d.is_multiple_of(g as usize)
                && (d / g as usize).is_multiple_of(FAST_CPB as usize))
    };
    (1..=16).contains(&n) && fits(groups_b) && fits(groups_c)
}

/// Number of chunks of a sequence of length `l` for the kernel that
/// `use_fast(d, n, groups_b, groups_c)` selects: the scratch buffer is
/// float32 (b, d, nchunks, n) when this is above 1.
pub fn bwd_chunks(l: usize, fast: bool) -> usize {
    l.div_ceil(if fast { FAST_CHUNK } else { BWD_CHUNK })
}

/// Dynamic shared memory of one block (the kernel's launch rules).
fn smem_bytes(n: u32) -> u32 {
    let ch = BWD_CHUNK as u32;
    4 * (6 * BWD_W * ch + BWD_W * (ch + ch / 32) + 2 * BWD_W * n + 64 * BWD_W)
}

/// Dynamic shared memory of one block of the fast kernel (SF_DSM = 1: D and
/// the dD / dΔbias partial sums after the reduction buffer, SF_ACC floats).
fn smem_bytes_fast() -> u32 {
    let t = FAST_CHUNK as u32;
    let acc = 2 * FAST_THREADS + FAST_CPB;
    4 * (2 * 16 * t + 5 * 32 * t + 4 * 128 * (t / 4 - 1) + 2 * 32 * 64 + acc)
}

/// Launches the backward on `stream` of GPU `ordinal`. The caller has zeroed
/// dA, dB, dC, dD and ddelta_bias (added into atomically), set `nchunks` to
/// `bwd_chunks(l, use_fast(..))` and allocated the scratch buffer when
/// `nchunks > 1`.
pub fn scan_backward(ordinal: i32, stream: u64, p: &ScanBwdParams) -> Result<()> {
    if p.b > 65535 {
        return Err(Error::value(format!(
            "u: the batch size b = {} exceeds 65535, the CUDA kernels' limit",
            p.b
        )));
    }
    let fast = use_fast(p.d as usize, p.n as usize, p.groups_b, p.groups_c);
    if p.nchunks as usize != bwd_chunks(p.l as usize, fast) {
        return Err(Error::value(format!(
            "selective_scan_bwd: internal error: nchunks = {} for l = {}",
            p.nchunks, p.l
        )));
    }
    if fast {
        // given the forward's checkpoints: the kernel without the pre-pass
        let name = if p.ck_given != 0 {
            "selective_scan_bwd_fast_ck"
        } else {
            "selective_scan_bwd_fast"
        };
        let k = kernel(ordinal, "selective_scan_bwd", name)?;
        let smem = smem_bytes_fast();
        k.set_max_dynamic_smem(smem)?;
        let grid = ((p.d as u32).div_ceil(FAST_CPB), p.b as u32, 1);
        return unsafe { k.launch(grid, (FAST_THREADS, 1, 1), smem, stream, p) };
    }
    let k = kernel(ordinal, "selective_scan_bwd", "selective_scan_bwd")?;
    let smem = smem_bytes(p.n as u32);
    k.set_max_dynamic_smem(smem)?;
    let grid = ((p.d as u32).div_ceil(BWD_W), p.b as u32, 1);
    unsafe { k.launch(grid, (32 * BWD_W, 1, 1), smem, stream, p) }
}

/// Mirror of `ScanBwdZeroParams` in kernels/selective_scan_bwd.cu.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
struct ScanBwdZeroParams {
    ptr: [u64; 5],
    n: [i64; 5],
    count: i32,
    _pad: i32,
}

/// Zero-fills up to 5 contiguous float32 buffers `(device pointer, elements)`
/// on `stream` of GPU `ordinal` in one launch (`scan_bwd_zero`): the
/// backward's atomically-added gradients, before `scan_backward`.
pub fn zero_f32(ordinal: i32, stream: u64, bufs: &[(usize, usize)]) -> Result<()> {
    if bufs.len() > 5 {
        return Err(Error::runtime(
            "scan_bwd_zero: internal error: more than 5 buffers",
        ));
    }
    let mut p = ScanBwdZeroParams {
        count: bufs.len() as i32,
        ..Default::default()
    };
    let mut most = 0usize;
    for (i, &(ptr, n)) in bufs.iter().enumerate() {
        p.ptr[i] = ptr as u64;
        p.n[i] = n as i64;
        most = most.max(n);
    }
    if most == 0 {
        return Ok(());
    }
    let k = kernel(ordinal, "selective_scan_bwd", "scan_bwd_zero")?;
    // one float4 per thread over the largest buffer, at most 4 blocks per SM
    let blocks = most.div_ceil(4 * 256).clamp(1, 4 * k.sms.max(1) as usize) as u32;
    unsafe { k.launch((blocks, 1, 1), (256, 1, 1), 0, stream, &p) }
}
