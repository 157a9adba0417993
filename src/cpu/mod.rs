//! CPU kernels: AVX-512, AVX2+FMA and portable, chosen at run time, parallel with rayon.

pub mod attention;
pub mod attention_bwd;
pub mod conv1d;
pub mod conv_scan;
pub mod hidden_attention;
pub mod norm;
pub mod scan;
pub mod scan_bwd;
pub mod simd;

use crate::error::{Error, Result};

/// The SIMD levels, from slowest to fastest. `Avx512` needs AVX-512 F and DQ.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum SimdLevel {
    Portable,
    Avx2,
    Avx512,
}

/// Environment variable that forces a level: `portable`, `avx2` or `avx512`.
pub const SIMD_ENV: &str = "MAMBA_ATTENTION_SIMD";

impl SimdLevel {
    pub fn name(self) -> &'static str {
        match self {
            SimdLevel::Portable => "portable",
            SimdLevel::Avx2 => "avx2",
            SimdLevel::Avx512 => "avx512",
        }
    }

    fn parse(s: &str) -> Option<SimdLevel> {
        match s.trim().to_ascii_lowercase().as_str() {
            "portable" | "scalar" | "none" => Some(SimdLevel::Portable),
            "avx2" => Some(SimdLevel::Avx2),
            "avx512" | "avx-512" | "avx512f" => Some(SimdLevel::Avx512),
            _ => None,
        }
    }

    /// Every level this CPU can run, slowest first.
    pub fn available() -> Vec<SimdLevel> {
        let mut v = vec![SimdLevel::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                v.push(SimdLevel::Avx2);
            }
            if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512dq") {
                v.push(SimdLevel::Avx512);
            }
        }
        v
    }

    /// The level to use now: `MAMBA_ATTENTION_SIMD` if set (read on every call,
    /// so tests can switch levels), else the fastest available.
    pub fn current() -> Result<SimdLevel> {
        let avail = Self::available();
        match std::env::var(SIMD_ENV) {
            Ok(s) if !s.trim().is_empty() => {
                let want = Self::parse(&s).ok_or_else(|| {
                    Error::value(format!(
                        "{SIMD_ENV}: expected one of portable, avx2, avx512, got {s:?}"
                    ))
                })?;
                if avail.contains(&want) {
                    Ok(want)
                } else {
                    Err(Error::runtime(format!(
                        "{SIMD_ENV}={s} asks for {}, which this CPU does not support (available: {})",
                        want.name(),
                        avail.iter().map(|l| l.name()).collect::<Vec<_>>().join(", ")
                    )))
                }
            }
            _ => Ok(*avail.last().unwrap_or(&SimdLevel::Portable)),
        }
    }
}

/// Runs `$f::<S>(arg)` for the level's `S`, inside a function compiled with that
/// level's target features. `$f` must be generic over `S: Simd`, take one
/// argument of type `$t`, and be `#[inline(always)]` so that it (and every
/// intrinsic it reaches) is inlined into the feature-enabled wrapper.
#[macro_export]
macro_rules! simd_dispatch {
    ($level:expr, $f:ident, $arg:expr, $t:ty) => {{
        #[allow(unused_imports)]
        use $crate::cpu::simd::*;
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f,avx512dq,avx2,fma")]
        unsafe fn on_avx512(a: $t) {
            $f::<Avx512>(a)
        }
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn on_avx2(a: $t) {
            $f::<Avx2>(a)
        }
        match $level {
            #[cfg(target_arch = "x86_64")]
            $crate::cpu::SimdLevel::Avx512 => unsafe { on_avx512($arg) },
            #[cfg(target_arch = "x86_64")]
            $crate::cpu::SimdLevel::Avx2 => unsafe { on_avx2($arg) },
            _ => unsafe { $f::<Portable>($arg) },
        }
    }};
}
