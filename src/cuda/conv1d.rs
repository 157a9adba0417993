//! Launchers of the causal conv1d kernels (kernels/causal_conv1d.cu).
//! `ConvParams` mirrors the struct of the same name in that file.

use super::kernel;
use super::scan::Tensor4;
use crate::error::{Error, Result};

/// Mirror of `ConvParams` in kernels/causal_conv1d.cu.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct ConvParams {
    pub b: i32,
    pub d: i32,
    pub l: i32,
    pub w: i32,
    pub silu: i32,
    pub state_len: i32,
    pub _pad0: i32,
    pub _pad1: i32,
    pub x: Tensor4,
    pub weight: Tensor4,
    pub bias: Tensor4,
    pub init: Tensor4,
    pub out: Tensor4,
    pub fin: Tensor4,
    pub dout: Tensor4,
    pub dfin: Tensor4,
    pub dx: Tensor4,
    pub dweight: Tensor4,
    pub dbias: Tensor4,
    pub dinit: Tensor4,
    pub state: Tensor4,
    pub seqlens: Tensor4,
}

/// Timesteps per block: CV_THREADS * CV_T (bwd), times CV_SEGS (fwd2).
fn steps_per_block(which: &str) -> u32 {
    if which == "causal_conv1d_fwd2" {
        128 * 8 * 2
    } else {
        128 * 8
    }
}

fn check_grid(p: &ConvParams) -> Result<()> {
    if p.b > 65535 || p.d > 65535 {
        return Err(Error::value(format!(
            "x: b = {} and d = {} must each be at most 65535 for the CUDA causal conv1d",
            p.b, p.d
        )));
    }
    Ok(())
}

/// Steps per warp of causal_conv1d_fwd3 (256 * CV3_K in the kernel).
const FWD3_CHUNK: u64 = 256 * 4;

/// Whether the forward can take causal_conv1d_fwd3 (its host rules in
/// kernels/causal_conv1d.cu): x and out of one dtype (f32/f16/bf16),
/// l-contiguous, 8-element aligned pointers and strides, l % 8 == 0, w <= 4,
/// no initial_states, b * d * chunks < 2^31. Returns the chunks per row.
fn fwd3_chunks(p: &ConvParams) -> Option<u64> {
    let (x, o) = (&p.x, &p.out);
    if !matches!(x.dtype, 0..=2) {
        return None;
    }
    let vec_ok = |t: &super::scan::Tensor4| {
        t.stride[2] == 1 && t.ptr % 16 == 0 && t.stride[0] % 8 == 0 && t.stride[1] % 8 == 0
    };
    let chunks = (p.l.max(0) as u64).div_ceil(FWD3_CHUNK);
    let ok = o.dtype == x.dtype
        && vec_ok(x)
        && vec_ok(o)
        && p.l > 0
        && p.l % 8 == 0
        && (2..=4).contains(&p.w)
        && p.init.ptr == 0
        && (p.b as u64) * (p.d as u64) * chunks < (1u64 << 31);
    ok.then_some(chunks)
}

/// `which`: "causal_conv1d_fwd2" (the forward), "causal_conv1d_fwd" (its
/// first version) or "causal_conv1d_bwd" (adds into dweight / dbias, which
/// the caller zero-fills).
pub fn conv_launch(ordinal: i32, stream: u64, which: &str, p: &ConvParams) -> Result<()> {
    check_grid(p)?;
    if which == "causal_conv1d_fwd2" {
        if let Some(chunks) = fwd3_chunks(p) {
            let name = match p.x.dtype {
                1 => "causal_conv1d_fwd3_f16",
                2 => "causal_conv1d_fwd3_bf16",
                _ => "causal_conv1d_fwd3_f32",
            };
            let k = kernel(ordinal, "causal_conv1d", name)?;
            let warps = p.b as u64 * p.d as u64 * chunks;
            let grid = (warps.div_ceil(4) as u32, 1, 1);
            return unsafe { k.launch(grid, (128, 1, 1), 0, stream, p) };
        }
    }
    let k = kernel(ordinal, "causal_conv1d", which)?;
    let grid = (
        (p.l as u32).div_ceil(steps_per_block(which)),
        p.d as u32,
        p.b as u32,
    );
    unsafe { k.launch(grid, (128, 1, 1), 0, stream, p) }
}

/// One decoding step (or l_new steps) with the state updated in place.
pub fn conv_update(ordinal: i32, stream: u64, p: &ConvParams) -> Result<()> {
    if p.b > 65535 {
        return Err(Error::value(format!(
            "x: the batch size b = {} exceeds 65535, the CUDA kernels' limit",
            p.b
        )));
    }
    let k = kernel(ordinal, "causal_conv1d", "causal_conv1d_update")?;
    let grid = ((p.d as u32).div_ceil(128), p.b as u32, 1);
    unsafe { k.launch(grid, (128, 1, 1), 0, stream, p) }
}
