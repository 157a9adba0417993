//! On-disk cache of compiled kernels, keyed by source hash + arch + NVRTC
//! version: `<dir>/<module>-<fnv64 of source>-sm<XY>[a]-nvrtc<M>.<m>.cubin`.
//!
//! Each entry is a 24-byte header followed by the cubin: the magic
//! `MACUBIN\x01`, the cubin's length (u64, little-endian) and its FNV-1a 64
//! checksum (u64, little-endian). An entry whose header, length or checksum
//! does not match (a truncated file, a flipped byte, a file of an older
//! format) is never handed to the driver: it is removed and the kernel is
//! compiled and stored again.
//!
//! Safe under concurrent first use by several processes: each writes its own
//! temporary file and renames it into place (atomic on POSIX), so a reader sees
//! either no file or a whole one; the last writer wins with identical bytes.
//! A cache hit needs no NVRTC; when NVRTC is missing, a valid cubin of the
//! same source and arch made by any NVRTC version is used.

use super::nvrtc::Nvrtc;
use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

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
    fnv64_bytes(s.as_bytes())
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

/// First bytes of every cache entry (the last one is the format version).
const MAGIC: &[u8; 8] = b"MACUBIN\x01";
/// Header bytes: magic, payload length, payload checksum.
const HEADER: usize = 24;

/// FNV-1a, 64 bits, over bytes (also the entries' checksum).
fn fnv64_bytes(b: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &x in b {
        h ^= x as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// A cache entry holding `payload`: header, then the payload.
fn encode(payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(HEADER + payload.len());
    v.extend_from_slice(MAGIC);
    v.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    v.extend_from_slice(&fnv64_bytes(payload).to_le_bytes());
    v.extend_from_slice(payload);
    v
}

/// The payload of a whole, intact entry; None for anything else (too short,
/// wrong magic, a length that is not the file's, a checksum mismatch, empty).
fn decode(entry: &[u8]) -> Option<&[u8]> {
    if entry.len() <= HEADER || &entry[..8] != MAGIC {
        return None;
    }
    let len = u64::from_le_bytes(entry[8..16].try_into().ok()?);
    let sum = u64::from_le_bytes(entry[16..24].try_into().ok()?);
    let payload = &entry[HEADER..];
    (payload.len() as u64 == len && fnv64_bytes(payload) == sum).then_some(payload)
}

/// The cubin of the entry at `p`, if it is valid. An entry that exists but is
/// damaged is removed (best effort), so that the rebuilt one replaces it.
fn load(p: &Path) -> Option<Vec<u8>> {
    let bytes = std::fs::read(p).ok()?;
    match decode(&bytes) {
        Some(payload) => Some(payload.to_vec()),
        None => {
            let _ = std::fs::remove_file(p);
            None
        }
    }
}

/// Any valid cached cubin of this source and arch, whatever NVRTC made it
/// (the newest version name first).
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
    hits.iter().rev().find_map(|p| load(p))
}

/// Writes `bytes` as the entry `p` atomically: a temporary file in the same
/// directory (unique to this process and call), then a rename over `p`.
fn store(p: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let d = p.parent().unwrap();
    std::fs::create_dir_all(d)?;
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = d.join(format!(
        ".{}.{}.{seq}.tmp",
        p.file_name().unwrap().to_string_lossy(),
        std::process::id()
    ));
    std::fs::write(&tmp, encode(bytes)).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })?;
    std::fs::rename(&tmp, p).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// The cubin of entry `p`: loaded if valid, else made by `compile` (which
/// returns the cubin and NVRTC's log) and stored. Returns the cubin and the
/// log, None on a cache hit.
fn fetch(
    p: &Path,
    compile: impl FnOnce() -> Result<(Vec<u8>, String)>,
) -> Result<(Vec<u8>, Option<String>)> {
    if let Some(b) = load(p) {
        return Ok((b, None));
    }
    let (bin, log) = compile()?;
    // A read-only or full disk only costs a recompile next time.
    let _ = store(p, &bin);
    Ok((bin, Some(log)))
}

/// The cubin of `src` for `arch`: from the cache, or compiled and cached.
/// The second value is NVRTC's log when it compiled, None on a cache hit.
pub fn get_or_compile_logged(
    module: &str,
    src: &str,
    arch: (i32, i32),
    nvrtc: fn() -> Result<&'static Nvrtc>,
) -> Result<(Vec<u8>, Option<String>)> {
    let compiler = match nvrtc() {
        Ok(n) => n,
        Err(e) => return any_version(module, src, arch).map(|b| (b, None)).ok_or(e),
    };
    let p = path(module, src, arch, compiler.version);
    fetch(&p, || {
        compiler.compile(module, src, arch).map_err(Error::runtime)
    })
}

/// The cubin of `src` for `arch`: from the cache, or compiled and cached.
pub fn get_or_compile(
    module: &str,
    src: &str,
    arch: (i32, i32),
    nvrtc: fn() -> Result<&'static Nvrtc>,
) -> Result<Vec<u8>> {
    get_or_compile_logged(module, src, arch, nvrtc).map(|r| r.0)
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
        assert_eq!(load(&p).unwrap(), payload);
        let leftovers = std::fs::read_dir(&d).unwrap().count();
        assert_eq!(leftovers, 1, "temporary files left behind");
        std::fs::remove_dir_all(&d).unwrap();
    }

    fn scratch_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ma-cache-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn entries_round_trip_and_damage_is_detected() {
        let payload: Vec<u8> = (0..1000u32).map(|i| (i * 7 + 3) as u8).collect();
        let e = encode(&payload);
        assert_eq!(e.len(), HEADER + payload.len());
        assert_eq!(decode(&e), Some(&payload[..]));
        // Every truncation, including to nothing and to the bare header.
        for n in 0..e.len() {
            assert_eq!(decode(&e[..n]), None, "truncated to {n} bytes");
        }
        // Every single flipped bit, in the header and in the payload.
        for i in 0..e.len() {
            for bit in 0..8 {
                let mut f = e.clone();
                f[i] ^= 1 << bit;
                assert_eq!(decode(&f), None, "bit {bit} of byte {i} flipped");
            }
        }
        // Trailing garbage, an empty payload, and a raw cubin (the old format).
        let mut long = e.clone();
        long.push(0);
        assert_eq!(decode(&long), None);
        assert_eq!(decode(&encode(&[])), None);
        assert_eq!(decode(b"\x7fELF\x02\x01\x01\x33\x07\x00\x00\x00\x00\x00\x00\x00\x02\x00\xbe\x00\x80\x00\x00\x00\x00\x00"), None);
    }

    #[test]
    fn damaged_entries_are_rebuilt_not_loaded() {
        let d = scratch_dir("rebuild");
        let p = d.join("m-0123-sm80-nvrtc13.0.cubin");
        let good = vec![0x5au8; 4096];
        let calls = std::cell::Cell::new(0);
        let compile = || {
            calls.set(calls.get() + 1);
            Ok((good.clone(), "log".to_string()))
        };
        // Miss: compiled and stored.
        assert_eq!(
            fetch(&p, compile).unwrap(),
            (good.clone(), Some("log".into()))
        );
        assert_eq!(calls.get(), 1);
        // Hit: not compiled.
        assert_eq!(fetch(&p, compile).unwrap(), (good.clone(), None));
        assert_eq!(calls.get(), 1);
        let whole = std::fs::read(&p).unwrap();
        let damage: Vec<(&str, Vec<u8>)> = vec![
            ("truncated", whole[..whole.len() / 2].to_vec()),
            ("header only", whole[..HEADER].to_vec()),
            ("empty", Vec::new()),
            ("flipped byte", {
                let mut w = whole.clone();
                w[HEADER + 100] ^= 0x40;
                w
            }),
            ("raw cubin of the old format", good.clone()),
        ];
        for (what, bytes) in damage {
            std::fs::write(&p, &bytes).unwrap();
            let before = calls.get();
            let (bin, log) = fetch(&p, compile).unwrap();
            assert_eq!(bin, good, "{what}: wrong cubin returned");
            assert!(log.is_some(), "{what}: the damaged entry was loaded");
            assert_eq!(calls.get(), before + 1, "{what}: not recompiled");
            assert_eq!(
                std::fs::read(&p).unwrap(),
                whole,
                "{what}: entry not rewritten"
            );
        }
        // A failed compile leaves no entry and reports the error.
        std::fs::write(&p, b"junk").unwrap();
        let err = fetch(&p, || Err(Error::runtime("boom"))).unwrap_err();
        assert_eq!(err, Error::runtime("boom"));
        assert!(!p.exists(), "the damaged entry was kept");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn concurrent_fetches_all_succeed_with_whole_entries() {
        let d = scratch_dir("fetch");
        let p = d.join("m-0123-sm90-nvrtc13.0.cubin");
        let good: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 251) as u8).collect();
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    for _ in 0..20 {
                        let (bin, _) = fetch(&p, || Ok((good.clone(), String::new()))).unwrap();
                        assert_eq!(bin, good);
                    }
                });
            }
        });
        assert_eq!(load(&p).unwrap(), good);
        assert_eq!(
            std::fs::read_dir(&d).unwrap().count(),
            1,
            "temporary files left behind"
        );
        std::fs::remove_dir_all(&d).unwrap();
    }
}
