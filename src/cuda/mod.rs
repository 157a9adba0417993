//! CUDA backend: the driver through cudarc (loaded at run time, so the wheel
//! imports and runs on machines without CUDA), kernels compiled by NVRTC at
//! first use for the exact sm_XY of the GPU, cached on disk, and launched on
//! the caller's (PyTorch's) current stream.

pub mod attention;
pub mod attention_bwd;
pub mod attention_wgmma;
pub mod cache;
pub mod conv1d;
pub mod conv_scan;
pub mod hidden_attention;
pub mod norm;
pub mod nvrtc;
pub mod rotary;
pub mod scan;
pub mod scan_bwd;
pub mod ssu_vec;

use crate::error::{Error, Result};
use cudarc::driver::{result as cu, sys};
use nvrtc::Nvrtc;
use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

/// Prepended to every kernel source (kernels include nothing else).
pub const COMMON: &str = include_str!("../../kernels/common.cuh");

/// Every kernel source: (module name, source). CI compiles each of these.
pub const SOURCES: &[(&str, &str)] = &[
    (
        "selective_scan_fwd",
        include_str!("../../kernels/selective_scan_fwd.cu"),
    ),
    (
        "selective_state_update",
        include_str!("../../kernels/selective_state_update.cu"),
    ),
    ("norm", include_str!("../../kernels/norm.cu")),
    ("rotary", include_str!("../../kernels/rotary.cu")),
    (
        "selective_scan_bwd",
        include_str!("../../kernels/selective_scan_bwd.cu"),
    ),
    (
        "causal_conv1d",
        include_str!("../../kernels/causal_conv1d.cu"),
    ),
    (
        "hidden_attention",
        include_str!("../../kernels/hidden_attention.cu"),
    ),
    (
        "flash_attn_fwd_bf16_hd32",
        concat!(
            "#define FA_ONLY_DT DT_BF16\n#define FA_ONLY_HD 32\n",
            include_str!("../../kernels/flash_attn_fwd.cu")
        ),
    ),
    (
        "flash_attn_fwd_bf16_hd64",
        concat!(
            "#define FA_ONLY_DT DT_BF16\n#define FA_ONLY_HD 64\n",
            include_str!("../../kernels/flash_attn_fwd.cu")
        ),
    ),
    (
        "flash_attn_fwd_bf16_hd96",
        concat!(
            "#define FA_ONLY_DT DT_BF16\n#define FA_ONLY_HD 96\n",
            include_str!("../../kernels/flash_attn_fwd.cu")
        ),
    ),
    (
        "flash_attn_fwd_bf16_hd128",
        concat!(
            "#define FA_ONLY_DT DT_BF16\n#define FA_ONLY_HD 128\n",
            include_str!("../../kernels/flash_attn_fwd.cu")
        ),
    ),
    (
        "flash_attn_fwd_bf16_hd256",
        concat!(
            "#define FA_ONLY_DT DT_BF16\n#define FA_ONLY_HD 256\n",
            include_str!("../../kernels/flash_attn_fwd.cu")
        ),
    ),
    (
        "flash_attn_fwd_f16_hd32",
        concat!(
            "#define FA_ONLY_DT DT_F16\n#define FA_ONLY_HD 32\n",
            include_str!("../../kernels/flash_attn_fwd.cu")
        ),
    ),
    (
        "flash_attn_fwd_f16_hd64",
        concat!(
            "#define FA_ONLY_DT DT_F16\n#define FA_ONLY_HD 64\n",
            include_str!("../../kernels/flash_attn_fwd.cu")
        ),
    ),
    (
        "flash_attn_fwd_f16_hd96",
        concat!(
            "#define FA_ONLY_DT DT_F16\n#define FA_ONLY_HD 96\n",
            include_str!("../../kernels/flash_attn_fwd.cu")
        ),
    ),
    (
        "flash_attn_fwd_f16_hd128",
        concat!(
            "#define FA_ONLY_DT DT_F16\n#define FA_ONLY_HD 128\n",
            include_str!("../../kernels/flash_attn_fwd.cu")
        ),
    ),
    (
        "flash_attn_fwd_f16_hd256",
        concat!(
            "#define FA_ONLY_DT DT_F16\n#define FA_ONLY_HD 256\n",
            include_str!("../../kernels/flash_attn_fwd.cu")
        ),
    ),
    (
        "flash_attn_bwd_aux",
        concat!(
            "#define FAB_MODULE 0\n",
            include_str!("../../kernels/flash_attn_bwd.cu")
        ),
    ),
    (
        "flash_attn_bwd_bf16_hd32",
        concat!(
            "#define FAB_MODULE 1\n#define FAB_ONLY_DT DT_BF16\n#define FAB_ONLY_HD 32\n",
            include_str!("../../kernels/flash_attn_bwd.cu")
        ),
    ),
    (
        "flash_attn_bwd_bf16_hd64",
        concat!(
            "#define FAB_MODULE 1\n#define FAB_ONLY_DT DT_BF16\n#define FAB_ONLY_HD 64\n",
            include_str!("../../kernels/flash_attn_bwd.cu")
        ),
    ),
    (
        "flash_attn_bwd_bf16_hd96",
        concat!(
            "#define FAB_MODULE 1\n#define FAB_ONLY_DT DT_BF16\n#define FAB_ONLY_HD 96\n",
            include_str!("../../kernels/flash_attn_bwd.cu")
        ),
    ),
    (
        "flash_attn_bwd_bf16_hd128",
        concat!(
            "#define FAB_MODULE 1\n#define FAB_ONLY_DT DT_BF16\n#define FAB_ONLY_HD 128\n",
            include_str!("../../kernels/flash_attn_bwd.cu")
        ),
    ),
    (
        "flash_attn_bwd_bf16_hd256",
        concat!(
            "#define FAB_MODULE 1\n#define FAB_ONLY_DT DT_BF16\n#define FAB_ONLY_HD 256\n",
            include_str!("../../kernels/flash_attn_bwd.cu")
        ),
    ),
    (
        "flash_attn_bwd_f16_hd32",
        concat!(
            "#define FAB_MODULE 1\n#define FAB_ONLY_DT DT_F16\n#define FAB_ONLY_HD 32\n",
            include_str!("../../kernels/flash_attn_bwd.cu")
        ),
    ),
    (
        "flash_attn_bwd_f16_hd64",
        concat!(
            "#define FAB_MODULE 1\n#define FAB_ONLY_DT DT_F16\n#define FAB_ONLY_HD 64\n",
            include_str!("../../kernels/flash_attn_bwd.cu")
        ),
    ),
    (
        "flash_attn_bwd_f16_hd96",
        concat!(
            "#define FAB_MODULE 1\n#define FAB_ONLY_DT DT_F16\n#define FAB_ONLY_HD 96\n",
            include_str!("../../kernels/flash_attn_bwd.cu")
        ),
    ),
    (
        "flash_attn_bwd_f16_hd128",
        concat!(
            "#define FAB_MODULE 1\n#define FAB_ONLY_DT DT_F16\n#define FAB_ONLY_HD 128\n",
            include_str!("../../kernels/flash_attn_bwd.cu")
        ),
    ),
    (
        "flash_attn_bwd_f16_hd256",
        concat!(
            "#define FAB_MODULE 1\n#define FAB_ONLY_DT DT_F16\n#define FAB_ONLY_HD 256\n",
            include_str!("../../kernels/flash_attn_bwd.cu")
        ),
    ),
    (
        "flash_attn_fwd_wgmma_bf16_hd128",
        concat!(
            "#define FAW_ONLY_DT DT_BF16\n",
            include_str!("../../kernels/flash_attn_fwd_wgmma.cu")
        ),
    ),
    (
        "flash_attn_fwd_wgmma_f16_hd128",
        concat!(
            "#define FAW_ONLY_DT DT_F16\n",
            include_str!("../../kernels/flash_attn_fwd_wgmma.cu")
        ),
    ),
];

/// Largest size of a dimension the CUDA kernels index with 32-bit ints
/// (batch, channels, sequence lengths, rows, heads): 2^31 − 2^16, so that an
/// index plus one tile, block or chunk never wraps. Element offsets are
/// 64-bit everywhere (`Tensor4` strides are i64 and every product of an index
/// with a stride is formed in 64 bits), so tensors may hold any number of
/// elements; only single dimensions are bounded.
pub const MAX_DIM: usize = (1 << 31) - (1 << 16);

/// ValueError unless every dimension of `t` is at most [`MAX_DIM`].
pub fn check_dims(t: &crate::tensor::TensorView) -> Result<()> {
    match t.shape.iter().position(|&s| s > MAX_DIM) {
        Some(i) => Err(Error::value(format!(
            "{}: dimension {i} of shape {} exceeds {MAX_DIM} (2**31 - 2**16), the CUDA kernels' limit",
            t.name,
            t.shape_str()
        ))),
        None => Ok(()),
    }
}

/// dtype codes shared with kernels/common.cuh.
pub fn dtype_code(d: crate::tensor::DType) -> i32 {
    use crate::tensor::DType::*;
    match d {
        F32 => 0,
        F16 => 1,
        BF16 => 2,
        F64 => 3,
        I32 => 4,
        I64 => 5,
        _ => -1,
    }
}

/// Directories on the Python path (set by the bindings), searched for pip's NVRTC.
static PYTHON_PATH: OnceLock<Vec<PathBuf>> = OnceLock::new();

pub fn set_python_path(p: Vec<PathBuf>) {
    let _ = PYTHON_PATH.set(p);
}

fn python_path() -> &'static [PathBuf] {
    PYTHON_PATH.get().map(|v| v.as_slice()).unwrap_or(&[])
}

static NVRTC: OnceLock<std::result::Result<Nvrtc, String>> = OnceLock::new();

/// The process's NVRTC, loaded once.
pub fn nvrtc() -> Result<&'static Nvrtc> {
    NVRTC
        .get_or_init(|| Nvrtc::load(python_path()))
        .as_ref()
        .map_err(|e| Error::runtime(e.clone()))
}

/// Whether the CUDA driver library can be loaded (never panics).
pub fn driver_present() -> bool {
    unsafe { sys::is_culib_present() }
}

/// A driver call's result; CUDA_ERROR_OUT_OF_MEMORY becomes
/// `Error::OutOfMemory` (torch.OutOfMemoryError in Python).
fn drv<T>(what: &str, r: std::result::Result<T, cu::DriverError>) -> Result<T> {
    r.map_err(|e| {
        let msg = format!("CUDA driver error in {what}: {e}");
        if e.0 == sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
            Error::out_of_memory(msg, true)
        } else {
            Error::runtime(msg)
        }
    })
}

/// One GPU: its primary context, architecture and loaded kernels.
struct Gpu {
    ctx: sys::CUcontext,
    arch: (i32, i32),
    sms: i32,
    functions: HashMap<String, sys::CUfunction>,
}

// Driver handles are process-wide and thread-safe to use from any thread.
unsafe impl Send for Gpu {}

static GPUS: OnceLock<Mutex<HashMap<i32, Gpu>>> = OnceLock::new();

fn init_driver() -> Result<()> {
    static INIT: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    INIT.get_or_init(|| {
        if !driver_present() {
            return Err("no usable CUDA driver: libcuda could not be loaded, so CUDA tensors cannot be used here \
                        (CPU tensors keep working)"
                .into());
        }
        cu::init().map_err(|e| format!("the CUDA driver failed to initialise: {e}"))
    })
    .clone()
    .map_err(Error::runtime)
}

fn gpu_state(ordinal: i32) -> Result<Gpu> {
    init_driver()?;
    let dev = drv("cuDeviceGet", cu::device::get(ordinal))?;
    let attr = |a| {
        drv("cuDeviceGetAttribute", unsafe {
            cu::device::get_attribute(dev, a)
        })
    };
    let major = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
    let minor = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
    let sms = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
    let ctx = drv("cuDevicePrimaryCtxRetain", unsafe {
        cu::primary_ctx::retain(dev)
    })?;
    Ok(Gpu {
        ctx,
        arch: (major, minor),
        sms,
        functions: HashMap::new(),
    })
}

/// Makes `ctx` current for the duration of `f`, restoring the caller's context
/// (PyTorch's current device must not change under it).
fn with_ctx<T>(ctx: sys::CUcontext, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let prev = drv("cuCtxGetCurrent", cu::ctx::get_current())?;
    drv("cuCtxSetCurrent", unsafe { cu::ctx::set_current(ctx) })?;
    let r = f();
    if let Some(p) = prev {
        if p != ctx {
            let _ = unsafe { cu::ctx::set_current(p) };
        }
    }
    r
}

/// A kernel ready to launch on one device.
#[derive(Clone, Copy)]
pub struct Kernel {
    f: sys::CUfunction,
    ctx: sys::CUcontext,
    /// Multiprocessors of the device (for grid sizing).
    pub sms: i32,
}

/// Looks up `function` of module `module` on GPU `ordinal`, compiling (or
/// reading from the disk cache) and loading the module at first use.
pub fn kernel(ordinal: i32, module: &str, function: &str) -> Result<Kernel> {
    let gpus = GPUS.get_or_init(|| Mutex::new(HashMap::new()));
    let mut map = gpus
        .lock()
        .map_err(|_| Error::runtime("CUDA kernel table poisoned by an earlier panic"))?;
    if !map.contains_key(&ordinal) {
        let g = gpu_state(ordinal)?;
        map.insert(ordinal, g);
    }
    let g = map.get_mut(&ordinal).unwrap();
    let key = format!("{module}::{function}");
    if let Some(f) = g.functions.get(&key) {
        return Ok(Kernel {
            f: *f,
            ctx: g.ctx,
            sms: g.sms,
        });
    }
    let src = SOURCES
        .iter()
        .find(|(m, _)| *m == module)
        .map(|(_, s)| *s)
        .ok_or_else(|| Error::runtime(format!("unknown kernel module {module}")))?;
    let full = format!("{COMMON}\n{src}");
    let arch = g.arch;
    let cubin = cache::get_or_compile(module, &full, arch, nvrtc)?;
    let ctx = g.ctx;
    let module_handle = with_ctx(ctx, || {
        let m = unsafe { cu::module::load_data(cubin.as_ptr() as *const c_void) };
        if let Err(e) = &m {
            // Entries are checksummed, so a cubin the driver rejects was made
            // for something else (another driver): drop it so the next call
            // recompiles. Out of memory is no reason to drop a good entry.
            if e.0 != sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
                cache::evict(module, &full, arch);
            }
        }
        drv("cuModuleLoadData", m)
    })?;
    // Resolve every extern "C" function of the module lazily: just this one now.
    let f = with_ctx(ctx, || {
        let name = CString::new(function).unwrap();
        drv(&format!("cuModuleGetFunction({function})"), unsafe {
            cu::module::get_function(module_handle, name)
        })
    })?;
    g.functions.insert(key, f);
    Ok(Kernel { f, ctx, sms: g.sms })
}

impl Kernel {
    /// Raises the dynamic shared-memory limit when a launch needs over 48 KB.
    pub fn set_max_dynamic_smem(&self, bytes: u32) -> Result<()> {
        if bytes <= 48 * 1024 {
            return Ok(());
        }
        with_ctx(self.ctx, || {
            drv("cuFuncSetAttribute", unsafe {
                cu::function::set_function_attribute(
                    self.f,
                    sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    bytes as i32,
                )
            })
        })
    }

    /// Launches with one by-value parameter struct `P` (a #[repr(C)] mirror of
    /// a struct in kernels/common.cuh) on the raw stream `stream`.
    ///
    /// # Safety
    /// `P` must match the kernel's parameter exactly, and every pointer in it
    /// must be valid device memory for the kernel's accesses.
    pub unsafe fn launch<P>(
        &self,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        smem: u32,
        stream: u64,
        params: &P,
    ) -> Result<()> {
        with_ctx(self.ctx, || {
            let mut args = [params as *const P as *mut c_void];
            drv(
                "cuLaunchKernel",
                cu::launch_kernel(
                    self.f,
                    grid,
                    block,
                    smem,
                    stream as sys::CUstream,
                    &mut args,
                ),
            )
        })
    }
}

/// One module of [`compile_all`]: name, cubin bytes, NVRTC's log, and
/// whether the cubin came from the disk cache (then the log is empty).
pub type Compiled = (String, usize, String, bool);

/// Compiles the kernels for `arch` (CI's check; needs NVRTC, no GPU):
/// every module, or those named in `only`. With `use_cache` each module goes
/// through the disk cache as at first use (a valid entry is read, anything
/// else is compiled and stored), so this also fills the cache ahead of time;
/// without it every module is compiled and the cache is not touched.
/// The modules compile in parallel (NVRTC is thread-safe across programs).
pub fn compile_all(
    arch: (i32, i32),
    only: Option<&[String]>,
    use_cache: bool,
) -> Result<Vec<Compiled>> {
    use rayon::prelude::*;
    if let Some(names) = only {
        if let Some(bad) = names.iter().find(|m| !SOURCES.iter().any(|(s, _)| s == m)) {
            let known: Vec<&str> = SOURCES.iter().map(|(s, _)| *s).collect();
            return Err(Error::value(format!(
                "modules: unknown kernel module {bad:?}; expected one of {}",
                known.join(", ")
            )));
        }
    }
    let n = nvrtc()?;
    SOURCES
        .par_iter()
        .filter(|(name, _)| only.is_none_or(|o| o.iter().any(|m| m == name)))
        .map(|(name, src)| {
            let full = format!("{COMMON}\n{src}");
            let (bin, log, cached) = if use_cache {
                let (bin, log) = cache::get_or_compile_logged(name, &full, arch, nvrtc)?;
                let cached = log.is_none();
                (bin, log.unwrap_or_default(), cached)
            } else {
                let (bin, log) = n.compile(name, &full, arch).map_err(Error::runtime)?;
                (bin, log, false)
            };
            Ok((name.to_string(), bin.len(), log, cached))
        })
        .collect()
}

/// A summary for `python -m mamba_attention info`.
pub fn info() -> (bool, bool, String) {
    let mut detail = Vec::new();
    let driver = match init_driver() {
        Ok(()) => {
            let n = cu::device::get_count().unwrap_or(0);
            let mut names = Vec::new();
            for i in 0..n {
                if let Ok(d) = cu::device::get(i) {
                    let name = cu::device::get_name(d).unwrap_or_default();
                    let maj = unsafe {
                        cu::device::get_attribute(
                            d,
                            sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
                        )
                    }
                    .unwrap_or(0);
                    let min = unsafe {
                        cu::device::get_attribute(
                            d,
                            sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR,
                        )
                    }
                    .unwrap_or(0);
                    names.push(format!("cuda:{i} {name} (sm_{maj}{min})"));
                }
            }
            detail.push(format!(
                "driver: {n} GPU(s){}{}",
                if names.is_empty() { "" } else { ": " },
                names.join(", ")
            ));
            n > 0
        }
        Err(e) => {
            detail.push(e.to_string());
            false
        }
    };
    let nv = match nvrtc() {
        Ok(n) => {
            detail.push(format!(
                "NVRTC {}.{} at {}",
                n.version.0, n.version.1, n.path
            ));
            true
        }
        Err(e) => {
            detail.push(e.to_string());
            false
        }
    };
    (driver, nv, detail.join("; "))
}
