//! Errors as values: every fallible path returns [`Result`], and the binding
//! layer maps each variant to the Python exception a caller expects.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// Bad shape or value: Python `ValueError`.
    Value(String),
    /// Bad kind or dtype: Python `TypeError`.
    Type(String),
    /// Environment or internal failure: Python `RuntimeError`.
    Runtime(String),
    /// An allocation failed (device or host memory). `torch`: the memory is
    /// torch's (raised as torch's `OutOfMemoryError`, a `RuntimeError`),
    /// else NumPy's or the system's (Python's `MemoryError`).
    OutOfMemory { msg: String, torch: bool },
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn value(msg: impl Into<String>) -> Self {
        Error::Value(msg.into())
    }
    pub fn type_(msg: impl Into<String>) -> Self {
        Error::Type(msg.into())
    }
    pub fn runtime(msg: impl Into<String>) -> Self {
        Error::Runtime(msg.into())
    }
    pub fn out_of_memory(msg: impl Into<String>, torch: bool) -> Self {
        Error::OutOfMemory {
            msg: msg.into(),
            torch,
        }
    }
}

/// Whether an allocator's error message reports exhausted memory (torch's
/// CUDA and CPU allocators, NumPy, the CUDA driver).
pub fn is_oom_message(msg: &str) -> bool {
    let m = msg.to_ascii_lowercase();
    m.contains("out of memory")
        || m.contains("can't allocate memory")
        || m.contains("cannot allocate memory")
        || m.contains("unable to allocate")
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Value(m) | Error::Type(m) | Error::Runtime(m) => f.write_str(m),
            Error::OutOfMemory { msg, .. } => f.write_str(msg),
        }
    }
}

impl std::error::Error for Error {}

#[cfg(feature = "python")]
impl From<Error> for pyo3::PyErr {
    fn from(e: Error) -> Self {
        use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
        match e {
            Error::Value(m) => PyValueError::new_err(m),
            Error::Type(m) => PyTypeError::new_err(m),
            Error::Runtime(m) => PyRuntimeError::new_err(m),
            Error::OutOfMemory { msg, torch } => out_of_memory_err(msg, torch),
        }
    }
}

/// torch.OutOfMemoryError (torch.cuda.OutOfMemoryError before torch 2.5) for
/// torch's memory when torch is imported, else MemoryError. torch's class
/// derives from RuntimeError, so callers catching RuntimeError still catch it.
#[cfg(feature = "python")]
fn out_of_memory_err(msg: String, torch: bool) -> pyo3::PyErr {
    use pyo3::prelude::*;
    use pyo3::types::PyType;
    if !torch {
        return pyo3::exceptions::PyMemoryError::new_err(msg);
    }
    pyo3::Python::attach(|py| {
        let torch = py
            .import("sys")
            .and_then(|s| s.getattr("modules"))
            .and_then(|m| m.get_item("torch"))
            .ok();
        let cls = torch.and_then(|t| {
            t.getattr("OutOfMemoryError")
                .or_else(|_| {
                    t.getattr("cuda")
                        .and_then(|c| c.getattr("OutOfMemoryError"))
                })
                .ok()
                .and_then(|c| c.cast_into::<PyType>().ok())
        });
        match cls {
            Some(c) => pyo3::PyErr::from_type(c, msg),
            None => pyo3::exceptions::PyMemoryError::new_err(msg),
        }
    })
}

/// Runs `f`, turning a panic (a bug) into `Error::Runtime` instead of letting it
/// cross into Python as a `PanicException`.
pub fn catch_panic<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Err(Error::runtime(format!(
                "internal error in {what}: {msg} (this is a bug in mamba-attention; please report it)"
            )))
        }
    }
}
