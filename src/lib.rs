//! mamba-attention: fused CPU and CUDA kernels for Mamba/attention hybrids.
//!
//! This file only registers the Python module; see DESIGN.md for the layout.

pub mod args;
pub mod cpu;
pub mod cuda;
pub mod error;
pub mod ops;
pub mod tensor;

#[cfg(feature = "python")]
mod module {
    use crate::cpu::SimdLevel;
    use pyo3::prelude::*;
    use pyo3::types::PyDict;

    /// The SIMD level kernels use now (honours MAMBA_ATTENTION_SIMD).
    #[pyfunction]
    fn simd_level() -> PyResult<&'static str> {
        Ok(SimdLevel::current()?.name())
    }

    /// Every SIMD level this CPU supports, slowest first.
    #[pyfunction]
    fn simd_levels() -> Vec<&'static str> {
        SimdLevel::available()
            .into_iter()
            .map(|l| l.name())
            .collect()
    }

    /// Threads used by CPU kernels (rayon; set RAYON_NUM_THREADS to change).
    #[pyfunction]
    fn num_threads() -> usize {
        rayon::current_num_threads()
    }

    /// Whether a CUDA driver and NVRTC are usable, with details.
    #[pyfunction]
    fn cuda_info(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
        let (driver, nvrtc, detail) = py.detach(crate::cuda::info);
        let d = PyDict::new(py);
        d.set_item("driver", driver)?;
        d.set_item("nvrtc", nvrtc)?;
        d.set_item("detail", detail)?;
        Ok(d)
    }

    /// Where compiled CUDA kernels are cached (MAMBA_ATTENTION_CACHE overrides).
    #[pyfunction]
    fn kernel_cache_dir() -> String {
        crate::cuda::cache::dir().to_string_lossy().into_owned()
    }

    /// Compiles the CUDA kernels for `arch` (e.g. "sm_90") through NVRTC, with
    /// no GPU needed: every module, or those in `modules`; through the disk
    /// cache unless `use_cache` is false. Returns [(module, cubin bytes, NVRTC
    /// log, read from the cache)]. CI runs it.
    #[pyfunction]
    #[pyo3(signature = (arch, modules=None, use_cache=true))]
    fn compile_kernels(
        py: Python<'_>,
        arch: &str,
        modules: Option<Vec<String>>,
        use_cache: bool,
    ) -> PyResult<Vec<crate::cuda::Compiled>> {
        let a = arch
            .trim_start_matches("sm_")
            .trim_start_matches("compute_");
        let parsed = (a.len() >= 2)
            .then(|| {
                (
                    a[..a.len() - 1].parse::<i32>().ok(),
                    a[a.len() - 1..].parse::<i32>().ok(),
                )
            })
            .and_then(|(m, n)| Some((m?, n?)));
        let arch = parsed.ok_or_else(|| {
            pyo3::exceptions::PyValueError::new_err(format!(
                "arch: expected a name like \"sm_90\", got {arch:?}"
            ))
        })?;
        Ok(py.detach(|| crate::cuda::compile_all(arch, modules.as_deref(), use_cache))?)
    }

    #[pymodule]
    fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
        m.add("__version__", env!("CARGO_PKG_VERSION"))?;
        m.add_function(wrap_pyfunction!(simd_level, m)?)?;
        m.add_function(wrap_pyfunction!(simd_levels, m)?)?;
        m.add_function(wrap_pyfunction!(num_threads, m)?)?;
        m.add_function(wrap_pyfunction!(cuda_info, m)?)?;
        m.add_function(wrap_pyfunction!(kernel_cache_dir, m)?)?;
        m.add_function(wrap_pyfunction!(compile_kernels, m)?)?;
        // NVRTC may live in pip's nvidia-* packages on sys.path.
        let path: Vec<String> = m.py().import("sys")?.getattr("path")?.extract()?;
        crate::cuda::set_python_path(
            path.into_iter()
                .filter(|p| !p.is_empty())
                .map(Into::into)
                .collect(),
        );
        crate::ops::scan::register(m)?;
        crate::ops::scan_bwd::register(m)?;
        crate::ops::conv1d::register(m)?;
        crate::ops::norm::register(m)?;
        crate::ops::hidden_attention::register(m)?;
        crate::ops::attention_cuda::register(m)?;
        crate::ops::attention::register(m)?;
        crate::ops::attention_args::register(m)?;
        crate::ops::rotary::register(m)?;
        crate::ops::attention_bwd_cuda::register(m)?;
        crate::ops::scan_ck::register(m)?;
        crate::ops::conv_scan::register(m)?;
        Ok(())
    }
}
