//! mamba-attention: fused CPU and CUDA kernels for Mamba/attention hybrids.
//!
//! This file only registers the Python module; see DESIGN.md for the layout.

pub mod cpu;
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
        let d = PyDict::new(py);
        d.set_item("driver", false)?;
        d.set_item("nvrtc", false)?;
        d.set_item(
            "detail",
            "this build has no CUDA backend yet: CPU kernels only",
        )?;
        Ok(d)
    }

    /// Where compiled CUDA kernels are cached (MAMBA_ATTENTION_CACHE overrides).
    #[pyfunction]
    fn kernel_cache_dir() -> String {
        if let Ok(p) = std::env::var("MAMBA_ATTENTION_CACHE") {
            if !p.is_empty() {
                return p;
            }
        }
        let base = std::env::var("XDG_CACHE_HOME")
            .ok()
            .filter(|s| !s.is_empty())
            .or_else(|| std::env::var("HOME").ok().map(|h| format!("{h}/.cache")))
            .unwrap_or_else(|| "/tmp".into());
        format!("{base}/mamba_attention/kernels")
    }

    #[pymodule]
    fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
        m.add("__version__", env!("CARGO_PKG_VERSION"))?;
        m.add_function(wrap_pyfunction!(simd_level, m)?)?;
        m.add_function(wrap_pyfunction!(simd_levels, m)?)?;
        m.add_function(wrap_pyfunction!(num_threads, m)?)?;
        m.add_function(wrap_pyfunction!(cuda_info, m)?)?;
        m.add_function(wrap_pyfunction!(kernel_cache_dir, m)?)?;
        crate::ops::scan::register(m)?;
        Ok(())
    }
}
