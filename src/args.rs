//! The scalar arguments of the bindings (flags, ints, floats, the window
//! pair), read by hand so that every error is a TypeError or ValueError that
//! names the argument: pyo3's typed arguments (`causal: bool`) raise a
//! message without the name ("'str' object is not an instance of 'bool'").
//!
//! Accepted: for a flag, `bool` and `numpy.bool_` (not ints, strings, None or
//! tensors); for an int, anything with `__index__` (Python and NumPy ints,
//! 0-d integer tensors) but not `bool` or floats; for a float, Python and
//! NumPy ints and floats (anything with `__float__` but bool and str).
//! Tensor arguments go through `tensor::extract`.

#[cfg(feature = "python")]
pub use py::*;

#[cfg(feature = "python")]
mod py {
    use crate::error::{Error, Result};
    use pyo3::prelude::*;
    use pyo3::types::{PyBool, PyBytes, PyFloat, PyString};
    use pyo3::Borrowed;

    /// An argument as given, None included; `Given(None)` when it was not
    /// passed: the type of the optional scalar arguments of a binding, with
    /// the default `Given(None)` in its `#[pyo3(signature)]`, so that an
    /// explicit None is an error for a flag instead of False.
    pub struct Given<'py>(pub Option<Bound<'py, PyAny>>);

    impl<'a, 'py> FromPyObject<'a, 'py> for Given<'py> {
        type Error = PyErr;

        fn extract(obj: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
            Ok(Given(Some(obj.to_owned())))
        }
    }

    /// "str 'no'": the type of `obj` and its repr (shortened), for messages.
    pub fn describe(obj: &Bound<'_, PyAny>) -> String {
        let ty = obj
            .get_type()
            .name()
            .map(|n| n.to_string())
            .unwrap_or_else(|_| "?".into());
        let mut r = obj
            .repr()
            .map(|r| r.to_string())
            .unwrap_or_else(|_| "?".into());
        if r.chars().count() > 60 {
            r = r.chars().take(57).collect::<String>() + "...";
        }
        if obj.is_none() {
            "None".into()
        } else {
            format!("{ty} {r}")
        }
    }

    fn is_numpy_bool(obj: &Bound<'_, PyAny>) -> bool {
        let t = obj.get_type();
        t.module().is_ok_and(|m| m == "numpy")
            && t.name().is_ok_and(|n| n == "bool_" || n == "bool")
    }

    /// A boolean flag: `bool` or `numpy.bool_`.
    pub fn flag_obj(name: &str, obj: &Bound<'_, PyAny>) -> Result<bool> {
        if let Ok(b) = obj.cast::<PyBool>() {
            return Ok(b.is_true());
        }
        if is_numpy_bool(obj) {
            if let Ok(v) = obj.is_truthy() {
                return Ok(v);
            }
        }
        Err(Error::type_(format!(
            "{name}: expected a bool (True or False), got {}",
            describe(obj)
        )))
    }

    /// A flag that may be absent (then `default`).
    pub fn flag(name: &str, arg: &Given<'_>, default: bool) -> Result<bool> {
        match &arg.0 {
            None => Ok(default),
            Some(o) => flag_obj(name, o),
        }
    }

    /// An integer: anything with `__index__` but bool, in int64's range.
    pub fn int(name: &str, obj: &Bound<'_, PyAny>) -> Result<i64> {
        let bad = || Error::type_(format!("{name}: expected an int, got {}", describe(obj)));
        if obj.is_instance_of::<PyBool>() || is_numpy_bool(obj) || obj.is_instance_of::<PyFloat>() {
            return Err(bad());
        }
        // operator.index: Python ints, NumPy integers, 0-d integer tensors.
        let idx = unsafe {
            let p = pyo3::ffi::PyNumber_Index(obj.as_ptr());
            if p.is_null() {
                pyo3::ffi::PyErr_Clear();
                return Err(bad());
            }
            Bound::from_owned_ptr(obj.py(), p)
        };
        idx.extract::<i64>().map_err(|_| {
            Error::value(format!(
                "{name}: expected an int in int64's range (|x| < 2**63), got {idx}"
            ))
        })
    }

    /// A float: Python or NumPy int or float (anything with `__float__` but
    /// bool and str).
    pub fn float(name: &str, obj: &Bound<'_, PyAny>) -> Result<f64> {
        let bad = || Error::type_(format!("{name}: expected a float, got {}", describe(obj)));
        if obj.is_instance_of::<PyBool>()
            || is_numpy_bool(obj)
            || obj.is_instance_of::<PyString>()
            || obj.is_instance_of::<PyBytes>()
        {
            return Err(bad());
        }
        obj.extract::<f64>().map_err(|_| bad())
    }

    /// A float that may be absent (then `default`; None is an error).
    pub fn float_or(name: &str, arg: &Given<'_>, default: f64) -> Result<f64> {
        match &arg.0 {
            None => Ok(default),
            Some(o) => float(name, o),
        }
    }

    /// An int as `int`, but values past int64 saturate to i64::MAX / i64::MIN
    /// instead of raising (for bounds, where anything that large means "no bound").
    pub fn int_saturating(name: &str, obj: &Bound<'_, PyAny>) -> Result<i64> {
        match int(name, obj) {
            Err(Error::Value(_)) => {
                let positive = obj.gt(0).map_err(|_| {
                    Error::type_(format!("{name}: expected an int, got {}", describe(obj)))
                })?;
                Ok(if positive { i64::MAX } else { i64::MIN })
            }
            r => r,
        }
    }

    /// A pair of ints given as any sequence of two (tuple, list, NumPy array,
    /// torch tensor), as flash-attn takes `window_size`; values past int64
    /// saturate (`int_saturating`).
    pub fn int_pair(name: &str, obj: &Bound<'_, PyAny>) -> Result<(i64, i64)> {
        let bad = || {
            Error::type_(format!(
                "{name}: expected a pair of ints (left, right), got {}",
                describe(obj)
            ))
        };
        if obj.is_instance_of::<PyString>() || obj.is_instance_of::<PyBytes>() {
            return Err(bad());
        }
        if !matches!(obj.len(), Ok(2)) {
            return Err(bad());
        }
        let item = |i: usize| -> Result<i64> {
            let o = obj.get_item(i).map_err(|_| bad())?;
            int_saturating(name, &o).map_err(|e| match e {
                Error::Value(m) => Error::Value(m),
                _ => bad(),
            })
        };
        Ok((item(0)?, item(1)?))
    }
}
