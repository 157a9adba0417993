//! On-disk cache of compiled kernels, keyed by source hash + arch + NVRTC
//! version: `<dir>/<module>-<fnv64 of source>-sm<XY>[a]-nvrtc<M>.<m>.cubin`.
//!
//! Safe under concurrent first use by several processes: each writes its own
//! temporary file and renames it into place (atomic on POSIX), so a reader sees
//! either no file or a whole one; the last writer wins with identical bytes.
//! A cache hit needs no NVRTC; when NVRTC is missing, a cubin of the same source
//! and arch made by any NVRTC version is used.

use super::nvrtc::Nvrtc;
use crate::error::{Error, Result};
use std::path::PathBuf;

/// `MAMBA_ATTENTION_CACHE`, else `$XDG_CACHE_HOME/mamba_attention/kernels`,
/// else `~/.cache/mamba_attention/kernels`.
pub fn dir() -> PathBuf {
    if let Ok(p) = std::env::var("MAMBA_ATTENTION_CACHE") {
        if !p.is_empty() {
            return PathBuf::from(p);
        }
    }
    let base = std::env::var("XDG_CACHE_HOME")
        .ok()
        .filter(|s| !s.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var("HOME")
                .ok()
                .map(|h| PathBuf::from(h).join(".cache"))
        })
        .unwrap_or_else(std::env::temp_dir);
    base.join("mamba_attention").join("kernels")
}

/// FNV-1a, 64 bits: stable across Rust versions and machines.
pub fn fnv64(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn stem(module: &str, src: &str, arch: (i32, i32)) -> String {
    // The target NVRTC compiles for: "sm90", or "sm90a" for an arch-specific source.
    let target = super::nvrtc::target_name(src, arch).replace('_', "");
    format!("{module}-{:016x}-{target}", fnv64(src))
}

fn path(module: &str, src: &str, arch: (i32, i32), version: (i32, i32)) -> PathBuf {
    dir().join(format!(
        "{}-nvrtc{}.{}.cubin",
        stem(module, src, arch),
        version.0,
        version.1
    ))
}

/// Any cached cubin of this source and arch, whatever NVRTC made it.
fn any_version(module: &str, src: &str, arch: (i32, i32)) -> Option<Vec<u8>> {
    let prefix = format!("{}-nvrtc", stem(module, src, arch));
    let mut hits: Vec<PathBuf> = std::fs::read_dir(dir())
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".cubin"))
        })
        .collect();
    hits.sort();
    hits.last()
        .and_then(|p| std::fs::read(p).ok())
        .filter(|b| !b.is_empty())
}

/// Writes atomically: temporary file in the same directory, then rename.
fn store(p: &PathBuf, bytes: &[u8]) -> std::io::Result<()> {
    let d = p.parent().unwrap();
    std::fs::create_dir_all(d)?;
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = d.join(format!(
        ".{}.{}.{seq}.tmp",
        p.file_name().unwrap().to_string_lossy(),
        std::process::id()
    ));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, p).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// The cubin of `src` for `arch`: from the cache, or compiled and cached.
pub fn get_or_compile(
    module: &str,
    src: &str,
    arch: (i32, i32),
    nvrtc: fn() -> Result<&'static Nvrtc>,
) -> Result<Vec<u8>> {
    let compiler = match nvrtc() {
        Ok(n) => n,
        Err(e) => return any_version(module, src, arch).ok_or(e),
    };
    let p = path(module, src, arch, compiler.version);
    if let Ok(b) = std::fs::read(&p) {
        if !b.is_empty() {
            return Ok(b);
        }
    }
    let (bin, _log) = compiler
        .compile(module, src, arch)
        .map_err(Error::runtime)?;
    // A read-only or full disk only costs a recompile next time.
    let _ = store(&p, &bin);
    Ok(bin)
}

/// Removes every cached cubin of this source and arch (after a failed load).
pub fn evict(module: &str, src: &str, arch: (i32, i32)) {
    let prefix = stem(module, src, arch);
    if let Ok(rd) = std::fs::read_dir(dir()) {
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_is_stable() {
        assert_eq!(fnv64(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv64("a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn concurrent_stores_leave_one_whole_file() {
        let d = std::env::temp_dir().join(format!("ma-cache-test-{}", std::process::id()));
        let p = d.join("k.cubin");
        let payload = vec![7u8; 1 << 20];
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| store(&p, &payload).unwrap());
            }
        });
        assert_eq!(std::fs::read(&p).unwrap(), payload);
        let leftovers = std::fs::read_dir(&d).unwrap().count();
        assert_eq!(leftovers, 1, "temporary files left behind");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
