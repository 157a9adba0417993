//! NVRTC, found where users have it and loaded by absolute path, compiling
//! kernels to a cubin for one exact architecture.
//!
//! Search order: `MAMBA_ATTENTION_NVRTC` (a file), `CUDA_HOME` / `CUDA_PATH`,
//! the pip `nvidia-*` packages on the Python path (`nvidia/cu13/lib`,
//! `nvidia/cuda_nvrtc/lib`, as PyTorch installs them), `/usr/local/cuda`, then
//! the dynamic loader's own search by SONAME. Loading by path first means a
//! later load by SONAME (by cudarc or PyTorch) finds the same library.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::{Path, PathBuf};

type Prog = *mut c_void;
type FnCreate = unsafe extern "C" fn(
    *mut Prog,
    *const c_char,
    *const c_char,
    c_int,
    *const *const c_char,
    *const *const c_char,
) -> c_int;
type FnCompile = unsafe extern "C" fn(Prog, c_int, *const *const c_char) -> c_int;
type FnSize = unsafe extern "C" fn(Prog, *mut usize) -> c_int;
type FnGet = unsafe extern "C" fn(Prog, *mut c_char) -> c_int;
type FnDestroy = unsafe extern "C" fn(*mut Prog) -> c_int;
type FnVersion = unsafe extern "C" fn(*mut c_int, *mut c_int) -> c_int;
type FnErr = unsafe extern "C" fn(c_int) -> *const c_char;

/// A kernel source containing this marker (in a comment) asks for the
/// architecture-specific target on a compute capability 9.0 device: `sm_90a`,
/// which has wgmma and setmaxnreg (a cubin for it loads only on 9.0 devices).
/// On every other architecture it compiles for the plain `sm_XY`, so such a
/// file must guard its sm_90a code with `__CUDA_ARCH_FEAT_SM90_ALL`.
pub const ARCH_SPECIFIC_MARKER: &str = "@nvrtc-arch-specific";

/// The `--gpu-architecture` value for `src` on `arch`: `sm_90a` for a source
/// with [`ARCH_SPECIFIC_MARKER`] on 9.0, else `sm_{major}{minor}`. The kernel
/// disk cache keys on this name too.
pub fn target_name(src: &str, arch: (i32, i32)) -> String {
    let suffix = if arch == (9, 0) && src.contains(ARCH_SPECIFIC_MARKER) {
        "a"
    } else {
        ""
    };
    format!("sm_{}{}{suffix}", arch.0, arch.1)
}

/// A loaded NVRTC.
pub struct Nvrtc {
    _lib: libloading::Library,
    pub path: String,
    pub version: (i32, i32),
    create: FnCreate,
    compile: FnCompile,
    log_size: FnSize,
    log: FnGet,
    cubin_size: FnSize,
    cubin: FnGet,
    destroy: FnDestroy,
    err: FnErr,
}

// The function pointers are plain C entry points; NVRTC is thread-safe for
// distinct programs.
unsafe impl Send for Nvrtc {}
unsafe impl Sync for Nvrtc {}

const SONAMES: [&str; 4] = [
    "libnvrtc.so.13",
    "libnvrtc.so.12",
    "libnvrtc.so",
    "nvrtc64_130_0.dll",
];

/// Every file path worth trying, in order, given extra directories (the
/// Python path). Missing files are kept out; SONAMES come last.
pub fn candidates(python_path: &[PathBuf]) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Ok(p) = std::env::var(var) {
            if !p.is_empty() {
                dirs.push(Path::new(&p).join("lib64"));
                dirs.push(Path::new(&p).join("lib"));
            }
        }
    }
    for sp in python_path {
        dirs.push(sp.join("nvidia/cu13/lib"));
        dirs.push(sp.join("nvidia/cuda_nvrtc/lib"));
    }
    dirs.push("/usr/local/cuda/lib64".into());
    dirs.push("/usr/local/cuda/targets/x86_64-linux/lib".into());
    let mut out = Vec::new();
    if let Ok(p) = std::env::var("MAMBA_ATTENTION_NVRTC") {
        if !p.is_empty() {
            out.push(PathBuf::from(p));
        }
    }
    for d in dirs {
        for so in &SONAMES[..3] {
            let f = d.join(so);
            if f.is_file() {
                out.push(f);
            }
        }
    }
    out
}

impl Nvrtc {
    /// Loads the first NVRTC that works; the error says what was searched.
    pub fn load(python_path: &[PathBuf]) -> Result<Nvrtc, String> {
        let mut tried = Vec::new();
        let files = candidates(python_path);
        let names = files
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .chain(SONAMES.iter().map(|s| s.to_string()));
        for name in names {
            match unsafe { Self::open(&name) } {
                Ok(n) => return Ok(n),
                Err(e) => tried.push(format!("{name} ({e})")),
            }
        }
        Err(format!(
            "NVRTC (the CUDA runtime compiler) was not found. Searched: MAMBA_ATTENTION_NVRTC, CUDA_HOME/CUDA_PATH \
             lib64 and lib, the pip nvidia/cu13/lib and nvidia/cuda_nvrtc/lib folders on sys.path, /usr/local/cuda, and the \
             loader's default search for {}. Install it with `pip install nvidia-cuda-nvrtc` (PyTorch's CUDA wheels include it) \
             or set MAMBA_ATTENTION_NVRTC to libnvrtc.so. Tried: {}",
            SONAMES.join(", "),
            tried.join("; ")
        ))
    }

    unsafe fn open(name: &str) -> Result<Nvrtc, String> {
        let lib = libloading::Library::new(name).map_err(|e| e.to_string())?;
        macro_rules! sym {
            ($n:literal) => {
                *lib.get(concat!($n, "\0").as_bytes())
                    .map_err(|e| e.to_string())?
            };
        }
        let version_fn: FnVersion = sym!("nvrtcVersion");
        let (mut ma, mut mi) = (0, 0);
        version_fn(&mut ma, &mut mi);
        Ok(Nvrtc {
            path: name.to_string(),
            version: (ma, mi),
            create: sym!("nvrtcCreateProgram"),
            compile: sym!("nvrtcCompileProgram"),
            log_size: sym!("nvrtcGetProgramLogSize"),
            log: sym!("nvrtcGetProgramLog"),
            cubin_size: sym!("nvrtcGetCUBINSize"),
            cubin: sym!("nvrtcGetCUBIN"),
            destroy: sym!("nvrtcDestroyProgram"),
            err: sym!("nvrtcGetErrorString"),
            _lib: lib,
        })
    }

    fn errstr(&self, code: c_int) -> String {
        unsafe {
            CStr::from_ptr((self.err)(code))
                .to_string_lossy()
                .into_owned()
        }
    }

    /// Compiles `src` for `sm_{major}{minor}` (a real architecture, so the
    /// result is a cubin the driver loads as is; `sm_90a` for a source marked
    /// arch-specific, see [`target_name`]). Returns (cubin, log).
    pub fn compile(
        &self,
        name: &str,
        src: &str,
        arch: (i32, i32),
    ) -> Result<(Vec<u8>, String), String> {
        let csrc =
            CString::new(src).map_err(|_| "kernel source contains a NUL byte".to_string())?;
        let cname = CString::new(format!("{name}.cu")).unwrap();
        let opts: Vec<CString> = [
            format!("--gpu-architecture={}", target_name(src, arch)),
            "--std=c++17".into(),
            "-lineinfo".into(),
        ]
        .into_iter()
        .map(|s| CString::new(s).unwrap())
        .collect();
        let optp: Vec<*const c_char> = opts.iter().map(|s| s.as_ptr()).collect();
        unsafe {
            let mut prog: Prog = std::ptr::null_mut();
            let rc = (self.create)(
                &mut prog,
                csrc.as_ptr(),
                cname.as_ptr(),
                0,
                std::ptr::null(),
                std::ptr::null(),
            );
            if rc != 0 {
                return Err(format!("nvrtcCreateProgram failed: {}", self.errstr(rc)));
            }
            let rc = (self.compile)(prog, optp.len() as c_int, optp.as_ptr());
            let mut n = 0usize;
            (self.log_size)(prog, &mut n);
            let mut log = vec![0u8; n.max(1)];
            (self.log)(prog, log.as_mut_ptr() as *mut c_char);
            let log = String::from_utf8_lossy(&log[..n.saturating_sub(1)])
                .trim()
                .to_string();
            if rc != 0 {
                (self.destroy)(&mut prog);
                return Err(format!(
                    "NVRTC failed to compile {name}.cu for {}: {}\n{log}",
                    target_name(src, arch),
                    self.errstr(rc)
                ));
            }
            let mut sz = 0usize;
            let rc = (self.cubin_size)(prog, &mut sz);
            let mut bin = vec![0u8; sz];
            let rc2 = if rc == 0 {
                (self.cubin)(prog, bin.as_mut_ptr() as *mut c_char)
            } else {
                rc
            };
            (self.destroy)(&mut prog);
            if rc2 != 0 || sz == 0 {
                return Err(format!(
                    "NVRTC produced no cubin for {name}.cu: {}",
                    self.errstr(rc2)
                ));
            }
            Ok((bin, log))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arch_specific_target_only_on_9_0() {
        let marked = "// @nvrtc-arch-specific\n__global__ void k() {}";
        assert_eq!(target_name(marked, (9, 0)), "sm_90a");
        assert_eq!(target_name(marked, (8, 0)), "sm_80");
        assert_eq!(target_name(marked, (10, 0)), "sm_100");
        assert_eq!(target_name("__global__ void k() {}", (9, 0)), "sm_90");
    }
}
