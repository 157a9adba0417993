//! The arguments of the attention bindings (SPEC §3), read and checked in
//! one place for every path: the scalar options (softmax_scale, causal,
//! window_size, softcap, the flags), the tensors of flash_attn_func,
//! flash_attn_varlen_func and the ring cache (`parse_*`, which the bindings in
//! `attention.rs` run first), and the check-only entries `attention_check`,
//! `attention_varlen_check` and `attention_ring_check` that `ops.py` and
//! `kvcache.py` call before a torch custom op or a CUDA path, so that those
//! raise the errors of the CPU path, before torch's schema check.

#[cfg(feature = "python")]
pub use py::register;
#[cfg(feature = "python")]
pub(crate) use py::*;

#[cfg(feature = "python")]
mod py {
    use crate::args::{self, Given};
    use crate::error::{Error, Result};
    use crate::ops::attention::{
        check_attn, check_ring, check_varlen, cu_host, AttnArgs, AttnParams, RingArgs,
    };
    use crate::tensor::{check_writes, extract, extract_opt, Device, TensorView};
    use pyo3::prelude::*;
    use pyo3::types::PyTuple;

    /// `window_size` as a pair of ints (any sequence of two), naming the
    /// argument on failure.
    pub(crate) fn window_arg(w: &Bound<'_, PyAny>) -> Result<(i64, i64)> {
        args::int_pair("window_size", w)
    }

    pub(crate) fn scale_arg(s: Option<&Bound<'_, PyAny>>) -> Result<Option<f64>> {
        match s {
            Some(o) if !o.is_none() => args::float("softmax_scale", o).map(Some),
            _ => Ok(None),
        }
    }

    /// softcap: a float, 0 when None or absent.
    pub(crate) fn softcap_arg(s: Option<&Bound<'_, PyAny>>) -> Result<f64> {
        match s {
            Some(s) if !s.is_none() => args::float("softcap", s),
            _ => Ok(0.0),
        }
    }

    /// The options every attention binding takes, parsed: softmax_scale,
    /// causal, window (left, right) with -1 unbounded (not yet normalised by
    /// causal), softcap.
    pub(crate) struct Opts {
        pub(crate) scale: Option<f64>,
        pub(crate) causal: bool,
        pub(crate) window: (i64, i64),
        pub(crate) softcap: f64,
    }

    pub(crate) fn options(
        softmax_scale: Option<&Bound<'_, PyAny>>,
        causal: &Given<'_>,
        window_size: Option<&Bound<'_, PyAny>>,
        softcap: Option<&Bound<'_, PyAny>>,
    ) -> Result<Opts> {
        let scale = scale_arg(softmax_scale)?;
        let causal = args::flag("causal", causal, false)?;
        let window = match window_size {
            Some(w) if !w.is_none() => window_arg(w)?,
            _ => (-1, -1),
        };
        Ok(Opts {
            scale,
            causal,
            window,
            softcap: softcap_arg(softcap)?,
        })
    }

    pub(crate) fn int_arg(name: &str, s: &Bound<'_, PyAny>) -> Result<i64> {
        args::int(name, s)
    }

    /// flash_attn_func's inputs, read and checked.
    pub(crate) struct Fwd {
        pub(crate) o: Opts,
        pub(crate) q: TensorView,
        pub(crate) k: TensorView,
        pub(crate) v: TensorView,
        pub(crate) alibi: Option<TensorView>,
        pub(crate) p: AttnParams,
    }

    impl Fwd {
        pub(crate) fn args(&self) -> AttnArgs<'_> {
            AttnArgs {
                q: &self.q,
                k: &self.k,
                v: &self.v,
                alibi: self.alibi.as_ref(),
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn parse_fwd(
        q: &Bound<'_, PyAny>,
        k: &Bound<'_, PyAny>,
        v: &Bound<'_, PyAny>,
        softmax_scale: Option<&Bound<'_, PyAny>>,
        causal: &Given<'_>,
        window_size: Option<&Bound<'_, PyAny>>,
        softcap: Option<&Bound<'_, PyAny>>,
        alibi_slopes: Option<&Bound<'_, PyAny>>,
        deterministic: &Given<'_>,
        return_attn_probs: &Given<'_>,
    ) -> Result<Fwd> {
        let o = options(softmax_scale, causal, window_size, softcap)?;
        args::flag("deterministic", deterministic, false)?;
        args::flag("return_attn_probs", return_attn_probs, false)?;
        let (q, k, v) = (extract("q", q)?, extract("k", k)?, extract("v", v)?);
        let alibi = extract_opt("alibi_slopes", alibi_slopes)?;
        let args = AttnArgs {
            q: &q,
            k: &k,
            v: &v,
            alibi: alibi.as_ref(),
        };
        let p = check_attn(&args, o.scale, o.causal, o.window, o.softcap)?;
        Ok(Fwd {
            o,
            q,
            k,
            v,
            alibi,
            p,
        })
    }

    /// Checks flash_attn_func's arguments without running it (what the
    /// custom-op and CUDA paths of `ops.flash_attn_func` call first, so that
    /// every path raises the same errors); returns the parsed options
    /// (softmax_scale or None, causal, left, right, softcap, deterministic).
    #[pyfunction]
    #[pyo3(signature = (q, k, v, softmax_scale=None, causal=Given(None), window_size=None, softcap=None, alibi_slopes=None, deterministic=Given(None), return_attn_probs=Given(None)))]
    #[allow(clippy::too_many_arguments)]
    fn attention_check<'py>(
        py: Python<'py>,
        q: &Bound<'py, PyAny>,
        k: &Bound<'py, PyAny>,
        v: &Bound<'py, PyAny>,
        softmax_scale: Option<&Bound<'py, PyAny>>,
        causal: Given<'py>,
        window_size: Option<&Bound<'py, PyAny>>,
        softcap: Option<&Bound<'py, PyAny>>,
        alibi_slopes: Option<&Bound<'py, PyAny>>,
        deterministic: Given<'py>,
        return_attn_probs: Given<'py>,
    ) -> PyResult<Bound<'py, PyTuple>> {
        let f = parse_fwd(
            q,
            k,
            v,
            softmax_scale,
            &causal,
            window_size,
            softcap,
            alibi_slopes,
            &deterministic,
            &return_attn_probs,
        )?;
        let det = args::flag("deterministic", &deterministic, false)?;
        let o = &f.o;
        (o.scale, o.causal, o.window.0, o.window.1, o.softcap, det).into_pyobject(py)
    }

    /// flash_attn_varlen_func's inputs, read and checked.
    pub(crate) struct Varlen {
        pub(crate) o: Opts,
        pub(crate) max_q: i64,
        pub(crate) max_k: i64,
        pub(crate) q: TensorView,
        pub(crate) k: TensorView,
        pub(crate) v: TensorView,
        pub(crate) cu_q: TensorView,
        pub(crate) cu_k: TensorView,
        pub(crate) alibi: Option<TensorView>,
        pub(crate) p: AttnParams,
    }

    impl Varlen {
        pub(crate) fn args(&self) -> AttnArgs<'_> {
            AttnArgs {
                q: &self.q,
                k: &self.k,
                v: &self.v,
                alibi: self.alibi.as_ref(),
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn parse_varlen(
        q: &Bound<'_, PyAny>,
        k: &Bound<'_, PyAny>,
        v: &Bound<'_, PyAny>,
        cu_seqlens_q: &Bound<'_, PyAny>,
        cu_seqlens_k: &Bound<'_, PyAny>,
        max_seqlen_q: &Bound<'_, PyAny>,
        max_seqlen_k: &Bound<'_, PyAny>,
        softmax_scale: Option<&Bound<'_, PyAny>>,
        causal: &Given<'_>,
        window_size: Option<&Bound<'_, PyAny>>,
        softcap: Option<&Bound<'_, PyAny>>,
        alibi_slopes: Option<&Bound<'_, PyAny>>,
        deterministic: &Given<'_>,
        return_attn_probs: &Given<'_>,
    ) -> Result<Varlen> {
        let o = options(softmax_scale, causal, window_size, softcap)?;
        args::flag("deterministic", deterministic, false)?;
        args::flag("return_attn_probs", return_attn_probs, false)?;
        let max_q = int_arg("max_seqlen_q", max_seqlen_q)?;
        let max_k = int_arg("max_seqlen_k", max_seqlen_k)?;
        for (n, m) in [("max_seqlen_q", max_q), ("max_seqlen_k", max_k)] {
            if m < 0 {
                return Err(Error::value(format!("{n}: expected an int ≥ 0, got {m}")));
            }
        }
        let (q, k, v) = (extract("q", q)?, extract("k", k)?, extract("v", v)?);
        let cu_q = extract("cu_seqlens_q", cu_seqlens_q)?;
        let cu_k = extract("cu_seqlens_k", cu_seqlens_k)?;
        let alibi = extract_opt("alibi_slopes", alibi_slopes)?;
        let args = AttnArgs {
            q: &q,
            k: &k,
            v: &v,
            alibi: alibi.as_ref(),
        };
        let p = check_varlen(&args, &cu_q, &cu_k, o.scale, o.causal, o.window, o.softcap)?;
        Ok(Varlen {
            o,
            max_q,
            max_k,
            q,
            k,
            v,
            cu_q,
            cu_k,
            alibi,
            p,
        })
    }

    /// `attention_check` for flash_attn_varlen_func: returns (softmax_scale or
    /// None, causal, left, right, softcap, deterministic, max_seqlen_q,
    /// max_seqlen_k). The offsets are read where they live (a GPU's are not).
    #[pyfunction]
    #[pyo3(signature = (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale=None, causal=Given(None), window_size=None, softcap=None, alibi_slopes=None, deterministic=Given(None), return_attn_probs=Given(None)))]
    #[allow(clippy::too_many_arguments)]
    fn attention_varlen_check<'py>(
        py: Python<'py>,
        q: &Bound<'py, PyAny>,
        k: &Bound<'py, PyAny>,
        v: &Bound<'py, PyAny>,
        cu_seqlens_q: &Bound<'py, PyAny>,
        cu_seqlens_k: &Bound<'py, PyAny>,
        max_seqlen_q: &Bound<'py, PyAny>,
        max_seqlen_k: &Bound<'py, PyAny>,
        softmax_scale: Option<&Bound<'py, PyAny>>,
        causal: Given<'py>,
        window_size: Option<&Bound<'py, PyAny>>,
        softcap: Option<&Bound<'py, PyAny>>,
        alibi_slopes: Option<&Bound<'py, PyAny>>,
        deterministic: Given<'py>,
        return_attn_probs: Given<'py>,
    ) -> PyResult<Bound<'py, PyTuple>> {
        let f = parse_varlen(
            q,
            k,
            v,
            cu_seqlens_q,
            cu_seqlens_k,
            max_seqlen_q,
            max_seqlen_k,
            softmax_scale,
            &causal,
            window_size,
            softcap,
            alibi_slopes,
            &deterministic,
            &return_attn_probs,
        )?;
        if f.q.device == Device::Cpu {
            cu_host(&f.cu_q, f.p.sq, f.max_q as usize)?;
            cu_host(&f.cu_k, f.p.sk, f.max_k as usize)?;
        }
        let det = args::flag("deterministic", &deterministic, false)?;
        let o = &f.o;
        let head = (o.scale, o.causal, o.window.0, o.window.1, o.softcap, det);
        let t = head.into_pyobject(py)?;
        let mut items: Vec<Bound<'py, PyAny>> = t.iter().collect();
        items.push(f.max_q.into_pyobject(py)?.into_any());
        items.push(f.max_k.into_pyobject(py)?.into_any());
        PyTuple::new(py, items)
    }

    /// The ring step's inputs, read and checked (the rings are written).
    pub(crate) struct Ring {
        pub(crate) pos: i64,
        pub(crate) q: TensorView,
        pub(crate) k_ring: TensorView,
        pub(crate) v_ring: TensorView,
        pub(crate) k: TensorView,
        pub(crate) v: TensorView,
        pub(crate) alibi: Option<TensorView>,
        pub(crate) p: AttnParams,
    }

    impl Ring {
        pub(crate) fn args(&self) -> RingArgs<'_> {
            RingArgs {
                q: &self.q,
                k_ring: &self.k_ring,
                v_ring: &self.v_ring,
                k: &self.k,
                v: &self.v,
                alibi: self.alibi.as_ref(),
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn parse_ring(
        q: &Bound<'_, PyAny>,
        k_ring: &Bound<'_, PyAny>,
        v_ring: &Bound<'_, PyAny>,
        k: &Bound<'_, PyAny>,
        v: &Bound<'_, PyAny>,
        pos: &Bound<'_, PyAny>,
        softmax_scale: Option<&Bound<'_, PyAny>>,
        softcap: Option<&Bound<'_, PyAny>>,
        alibi_slopes: Option<&Bound<'_, PyAny>>,
    ) -> Result<Ring> {
        let scale = scale_arg(softmax_scale)?;
        let softcap = softcap_arg(softcap)?;
        let pos = int_arg("pos", pos)?;
        let (q, k_ring, v_ring) = (
            extract("q", q)?,
            extract("k_ring", k_ring)?,
            extract("v_ring", v_ring)?,
        );
        let (k, v) = (extract("k", k)?, extract("v", v)?);
        let alibi = extract_opt("alibi_slopes", alibi_slopes)?;
        let args = RingArgs {
            q: &q,
            k_ring: &k_ring,
            v_ring: &v_ring,
            k: &k,
            v: &v,
            alibi: alibi.as_ref(),
        };
        let p = check_ring(&args, pos, scale, softcap)?;
        let read: Vec<&TensorView> = [&q, &k, &v].into_iter().chain(&alibi).collect();
        check_writes(&[&k_ring, &v_ring], &read)?;
        Ok(Ring {
            pos,
            q,
            k_ring,
            v_ring,
            k,
            v,
            alibi,
            p,
        })
    }

    /// Checks a ring step's arguments without running it (the CUDA paths of
    /// `SlidingWindowKVCache` call it first); returns the number of new tokens.
    #[pyfunction]
    #[pyo3(signature = (q, k_ring, v_ring, k, v, pos, softmax_scale=None, softcap=None, alibi_slopes=None))]
    #[allow(clippy::too_many_arguments)]
    fn attention_ring_check(
        q: &Bound<'_, PyAny>,
        k_ring: &Bound<'_, PyAny>,
        v_ring: &Bound<'_, PyAny>,
        k: &Bound<'_, PyAny>,
        v: &Bound<'_, PyAny>,
        pos: &Bound<'_, PyAny>,
        softmax_scale: Option<&Bound<'_, PyAny>>,
        softcap: Option<&Bound<'_, PyAny>>,
        alibi_slopes: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<usize> {
        let r = parse_ring(
            q,
            k_ring,
            v_ring,
            k,
            v,
            pos,
            softmax_scale,
            softcap,
            alibi_slopes,
        )?;
        Ok(r.p.sq)
    }

    pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
        m.add_function(wrap_pyfunction!(attention_check, m)?)?;
        m.add_function(wrap_pyfunction!(attention_varlen_check, m)?)?;
        m.add_function(wrap_pyfunction!(attention_ring_check, m)?)?;
        Ok(())
    }
}
