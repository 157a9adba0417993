//! One view type for every incoming array: dtype, shape, strides, device, pointer.
//!
//! Views come from DLPack capsules (`__dlpack__`: NumPy, JAX, CuPy, …) or, for
//! `torch.Tensor`, from its attributes (`data_ptr()`, `stride()`, …), which costs
//! 0.4 µs per tensor against 2.3 µs for torch's `__dlpack__` (measured with
//! torch 2.15): that difference decides the latency of a decoding step.
//! Validation helpers here produce the error messages every op shares.
//!
//! A torch tensor with the negative (or conjugate) bit set shows other values
//! than its memory holds: it is read through a resolved copy (`resolved`),
//! which `expect_writable` refuses for arguments written in place. Those
//! arguments also go through `check_writes`, torch's rule for in-place
//! arguments: distinct elements, and no memory shared with other arguments.

use crate::error::{Error, Result};
use half::{bf16, f16};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    F64,
    F16,
    BF16,
    I8,
    I16,
    I32,
    I64,
    U8,
    U16,
    U32,
    U64,
    Bool,
}

impl DType {
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::F64 => "float64",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            DType::I8 => "int8",
            DType::I16 => "int16",
            DType::I32 => "int32",
            DType::I64 => "int64",
            DType::U8 => "uint8",
            DType::U16 => "uint16",
            DType::U32 => "uint32",
            DType::U64 => "uint64",
            DType::Bool => "bool",
        }
    }

    pub fn size(self) -> usize {
        match self {
            DType::I8 | DType::U8 | DType::Bool => 1,
            DType::F16 | DType::BF16 | DType::I16 | DType::U16 => 2,
            DType::F32 | DType::I32 | DType::U32 => 4,
            DType::F64 | DType::I64 | DType::U64 => 8,
        }
    }

    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F64 | DType::F16 | DType::BF16)
    }

    pub fn is_int(self) -> bool {
        matches!(
            self,
            DType::I8
                | DType::I16
                | DType::I32
                | DType::I64
                | DType::U8
                | DType::U16
                | DType::U32
                | DType::U64
        )
    }

    /// From DLPack's (code, bits): 0 int, 1 uint, 2 float, 4 bfloat, 6 bool.
    pub fn from_dlpack(code: u8, bits: u8, lanes: u16) -> Option<DType> {
        if lanes != 1 {
            return None;
        }
        Some(match (code, bits) {
            (0, 8) => DType::I8,
            (0, 16) => DType::I16,
            (0, 32) => DType::I32,
            (0, 64) => DType::I64,
            (1, 8) => DType::U8,
            (1, 16) => DType::U16,
            (1, 32) => DType::U32,
            (1, 64) => DType::U64,
            (2, 16) => DType::F16,
            (2, 32) => DType::F32,
            (2, 64) => DType::F64,
            (4, 16) => DType::BF16,
            (6, 8) => DType::Bool,
            _ => return None,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda(i32),
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

/// Which framework made the array: outputs are allocated by the same one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Numpy,
    Torch,
    /// Another `__dlpack__` producer; its outputs are NumPy arrays (CPU).
    DLPack,
}

/// A borrowed view of an array's memory. Strides are in elements.
#[derive(Debug)]
pub struct TensorView {
    pub name: &'static str,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub strides: Vec<isize>,
    pub device: Device,
    pub ptr: usize,
    pub readonly: bool,
    pub kind: Kind,
    /// The view reads a resolved copy of a torch tensor with the negative
    /// (or conjugate) bit: fine to read, an error to write (`expect_writable`).
    pub resolved: bool,
    /// Keeps a DLPack capsule (and so the producer's buffer) alive.
    #[cfg(feature = "python")]
    pub(crate) _owner: Option<pyo3::Py<pyo3::PyAny>>,
}

/// A view reduced to what a kernel needs: a pointer, a dtype and strides.
/// Plain data, so it can cross into rayon workers.
#[derive(Clone, Copy, Debug)]
pub struct Raw<const R: usize> {
    pub ptr: usize,
    pub dtype: DType,
    pub strides: [isize; R],
}

impl TensorView {
    /// A view over host memory; used by Rust tests and benches.
    pub fn host(
        name: &'static str,
        dtype: DType,
        shape: &[usize],
        strides: &[isize],
        ptr: usize,
    ) -> TensorView {
        TensorView {
            name,
            dtype,
            shape: shape.to_vec(),
            strides: strides.to_vec(),
            device: Device::Cpu,
            ptr,
            readonly: false,
            kind: Kind::Numpy,
            resolved: false,
            #[cfg(feature = "python")]
            _owner: None,
        }
    }

    pub fn ndim(&self) -> usize {
        self.shape.len()
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn shape_str(&self) -> String {
        shape_str(&self.shape)
    }

    /// The view as a kernel argument of rank `R` (checked by the op beforehand).
    pub fn raw<const R: usize>(&self) -> Raw<R> {
        let mut strides = [0isize; R];
        strides.copy_from_slice(&self.strides[..R]);
        Raw {
            ptr: self.ptr,
            dtype: self.dtype,
            strides,
        }
    }

    pub fn expect_rank(&self, rank: usize, desc: &str) -> Result<()> {
        if self.ndim() != rank {
            return Err(Error::value(format!(
                "{}: expected a {rank}-d tensor of shape {desc}, got a {}-d tensor of shape {}",
                self.name,
                self.ndim(),
                self.shape_str()
            )));
        }
        Ok(())
    }

    /// Rank and sizes at once; `desc` names the dimensions, e.g. "(b, d, l)".
    pub fn expect_shape(&self, want: &[usize], desc: &str) -> Result<()> {
        self.expect_rank(want.len(), desc)?;
        if self.shape != want {
            return Err(Error::value(format!(
                "{}: expected shape {desc} = {}, got {}",
                self.name,
                shape_str(want),
                self.shape_str()
            )));
        }
        Ok(())
    }

    pub fn expect_nonempty(&self) -> Result<()> {
        if self.shape.contains(&0) {
            return Err(Error::value(format!(
                "{}: expected a non-empty tensor, got shape {}",
                self.name,
                self.shape_str()
            )));
        }
        Ok(())
    }

    pub fn expect_float(&self) -> Result<()> {
        if !self.dtype.is_float() {
            return Err(Error::type_(format!(
                "{}: expected a float32, float16, bfloat16 or float64 tensor, got {}",
                self.name,
                self.dtype.name()
            )));
        }
        Ok(())
    }

    pub fn expect_dtype(&self, dtype: DType) -> Result<()> {
        if self.dtype != dtype {
            return Err(Error::type_(format!(
                "{}: expected dtype {}, got {}",
                self.name,
                dtype.name(),
                self.dtype.name()
            )));
        }
        Ok(())
    }

    pub fn expect_same_dtype(&self, other: &TensorView) -> Result<()> {
        if self.dtype != other.dtype {
            return Err(Error::type_(format!(
                "{}: expected the same dtype as {} ({}), got {}",
                self.name,
                other.name,
                other.dtype.name(),
                self.dtype.name()
            )));
        }
        Ok(())
    }

    pub fn expect_device(&self, device: Device, of: &str) -> Result<()> {
        if self.device != device {
            return Err(Error::value(format!(
                "{}: expected a tensor on {device} (the device of {of}), got one on {}",
                self.name, self.device
            )));
        }
        Ok(())
    }

    pub fn expect_writable(&self) -> Result<()> {
        if self.readonly {
            return Err(Error::value(format!(
                "{}: is updated in place, so it must be writable, got a read-only array",
                self.name
            )));
        }
        if self.resolved {
            return Err(Error::type_(format!(
                "{}: is updated in place, so it cannot be a tensor with the negative or conjugate \
                 bit set (a lazy view such as t.conj().imag, whose memory holds other values than \
                 it shows); pass a tensor without it (t.is_neg() and t.is_conj() False)",
                self.name
            )));
        }
        Ok(())
    }

    /// Views an (..., h) tensor as (rows, h) in place, rows the product of
    /// the leading dimensions; false (and unchanged) where the leading
    /// dimensions do not collapse into one stride (a copy is needed).
    pub fn collapse_rows(&mut self) -> bool {
        let nd = self.ndim();
        if nd == 0 {
            return false;
        }
        let h = self.shape[nd - 1];
        let rows: usize = self.shape[..nd - 1].iter().product();
        let mut row_stride: Option<isize> = None;
        let mut next = 0isize;
        for i in (0..nd - 1).rev() {
            let (n, st) = (self.shape[i], self.strides[i]);
            if n == 1 {
                continue;
            }
            match row_stride {
                None => row_stride = Some(st),
                Some(_) if st != next => return false,
                Some(_) => {}
            }
            next = st * n as isize;
        }
        let inner = self.strides[nd - 1];
        self.shape = vec![rows, h];
        self.strides = vec![row_stride.unwrap_or(h.max(1) as isize), inner];
        true
    }

    /// The bytes `[lo, hi)` that the view's elements span; None when it has none.
    #[inline]
    pub fn byte_span(&self) -> Option<(usize, usize)> {
        // Offsets of a valid view fit in isize (torch and NumPy guarantee it);
        // saturating arithmetic keeps a malformed one conservative.
        let (mut lo, mut hi) = (0isize, 0isize);
        for (&n, &s) in self.shape.iter().zip(&self.strides) {
            if n == 0 {
                return None;
            }
            let e = (n as isize - 1).saturating_mul(s);
            if e < 0 {
                lo = lo.saturating_add(e);
            } else {
                hi = hi.saturating_add(e);
            }
        }
        let es = self.dtype.size() as isize;
        let p = self.ptr as isize;
        Some((
            p.saturating_add(lo.saturating_mul(es)).max(0) as usize,
            p.saturating_add(hi.saturating_add(1).saturating_mul(es))
                .max(0) as usize,
        ))
    }

    /// Whether two distinct indices address one element (torch's "internal
    /// overlap"): a zero stride on a dimension of size > 1, or strides whose
    /// multiples meet. Exact for every layout but exotic `as_strided` ones of
    /// more than 2**20 elements, which count as overlapping.
    pub fn has_internal_overlap(&self) -> bool {
        // Dense row-major, the usual layout: no overlap, and no allocation.
        let mut want = 1isize;
        let mut dense = true;
        for (&n, &s) in self.shape.iter().zip(&self.strides).rev() {
            if n == 0 {
                return false;
            }
            if n != 1 && s != want {
                dense = false;
                break;
            }
            want = want.saturating_mul(n as isize);
        }
        if dense {
            return false;
        }
        let mut dims: Vec<(usize, u128)> = self
            .shape
            .iter()
            .zip(&self.strides)
            .filter(|(&n, _)| n > 1)
            .map(|(&n, &s)| (n, s.unsigned_abs() as u128))
            .collect();
        if self.numel() == 0 || dims.is_empty() {
            return false;
        }
        if dims.iter().any(|&(_, s)| s == 0) {
            return true;
        }
        // Sorted by stride, a stride beyond the span of the smaller ones
        // gives distinct offsets (a mixed-radix number): the usual layouts.
        dims.sort_unstable_by_key(|&(_, s)| s);
        let mut span = 1u128;
        let mut radix = true;
        for &(n, s) in &dims {
            if s < span {
                radix = false;
                break;
            }
            span += (n as u128 - 1) * s;
        }
        if radix {
            return false;
        }
        let numel = self.numel();
        if numel > 1 << 20 {
            return true;
        }
        let mut offs: Vec<u128> = vec![0];
        for &(n, s) in &dims {
            let prev = std::mem::take(&mut offs);
            offs = (0..n as u128)
                .flat_map(|i| prev.iter().map(move |&o| o + i * s))
                .collect();
        }
        offs.sort_unstable();
        offs.windows(2).any(|w| w[0] == w[1])
    }

    /// Copies the tensor, in logical (row-major) order, into a new float32 vector.
    pub fn to_f32_vec(&self) -> Vec<f32> {
        let n = self.numel();
        let mut out = vec![0.0f32; n];
        if n == 0 {
            return out;
        }
        let nd = self.ndim();
        if nd == 0 {
            unsafe { load_row(&mut out, self.ptr, self.dtype, 1) };
            return out;
        }
        let inner = self.shape[nd - 1];
        let inner_stride = self.strides[nd - 1];
        let mut idx = vec![0usize; nd - 1];
        for row in out.chunks_mut(inner) {
            let mut off = 0isize;
            for (i, &k) in idx.iter().enumerate() {
                off += k as isize * self.strides[i];
            }
            let base = self.ptr as isize + off * self.dtype.size() as isize;
            unsafe { load_row(row, base as usize, self.dtype, inner_stride) };
            for i in (0..nd - 1).rev() {
                idx[i] += 1;
                if idx[i] < self.shape[i] {
                    break;
                }
                idx[i] = 0;
            }
        }
        out
    }

    /// Reads an integer tensor (any integer dtype) into i64s, in logical order.
    pub fn to_i64_vec(&self) -> Result<Vec<i64>> {
        if !self.dtype.is_int() {
            return Err(Error::type_(format!(
                "{}: expected an integer tensor, got {}",
                self.name,
                self.dtype.name()
            )));
        }
        let n = self.numel();
        let mut out = Vec::with_capacity(n);
        let nd = self.ndim();
        let mut idx = vec![0usize; nd];
        for _ in 0..n {
            let mut off = 0isize;
            for (i, &k) in idx.iter().enumerate() {
                off += k as isize * self.strides[i];
            }
            let p = (self.ptr as isize + off * self.dtype.size() as isize) as usize;
            let v = unsafe {
                match self.dtype {
                    DType::I8 => *(p as *const i8) as i64,
                    DType::I16 => *(p as *const i16) as i64,
                    DType::I32 => *(p as *const i32) as i64,
                    DType::I64 => *(p as *const i64),
                    DType::U8 => *(p as *const u8) as i64,
                    DType::U16 => *(p as *const u16) as i64,
                    DType::U32 => *(p as *const u32) as i64,
                    DType::U64 => {
                        let u = *(p as *const u64);
                        i64::try_from(u).map_err(|_| {
                            Error::value(format!(
                                "{}: expected values below 2**63, got {u}",
                                self.name
                            ))
                        })?
                    }
                    _ => unreachable!(),
                }
            };
            out.push(v);
            for i in (0..nd).rev() {
                idx[i] += 1;
                if idx[i] < self.shape[i] {
                    break;
                }
                idx[i] = 0;
            }
        }
        Ok(out)
    }
}

/// Torch's rule for arguments written in place: each view in `written` must
/// have distinct elements (no zero strides over several elements, as an
/// `expand()`ed tensor has), and no other argument, read or written, may share
/// memory with it (byte ranges on one device that intersect; the views of one
/// buffer that interleave count too, as for torch). `read` may repeat views of
/// `written`: a view is never compared with itself.
pub fn check_writes(written: &[&TensorView], read: &[&TensorView]) -> Result<()> {
    for (i, w) in written.iter().enumerate() {
        if w.has_internal_overlap() {
            return Err(Error::value(format!(
                "{}: is written in place, but its elements overlap in memory (shape {}, strides \
                 {:?}: an expand()ed or zero-stride view); pass a tensor with distinct elements \
                 (e.g. {}.clone())",
                w.name,
                w.shape_str(),
                w.strides,
                w.name
            )));
        }
        let Some((lo, hi)) = w.byte_span() else {
            continue;
        };
        let others = written.iter().take(i).chain(read);
        for o in others {
            if std::ptr::eq(*o, *w) || o.device != w.device {
                continue;
            }
            if let Some((a, b)) = o.byte_span() {
                if a < hi && lo < b {
                    return Err(Error::value(format!(
                        "{}: shares memory with {}, which is written in place; pass a copy \
                         (e.g. {}.clone())",
                        o.name, w.name, o.name
                    )));
                }
            }
        }
    }
    Ok(())
}

pub fn shape_str(s: &[usize]) -> String {
    match s.len() {
        1 => format!("({},)", s[0]),
        _ => format!(
            "({})",
            s.iter()
                .map(|x| x.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Loads `dst.len()` elements starting at byte address `src`, `stride` elements
/// apart, converting to float32.
///
/// # Safety
/// Every addressed element must be readable memory of type `dtype`.
#[inline]
pub unsafe fn load_row(dst: &mut [f32], src: usize, dtype: DType, stride: isize) {
    macro_rules! go {
        ($t:ty, $conv:expr) => {{
            let p = src as *const $t;
            if stride == 1 {
                let s = std::slice::from_raw_parts(p, dst.len());
                for (d, &v) in dst.iter_mut().zip(s) {
                    *d = $conv(v);
                }
            } else {
                for (i, d) in dst.iter_mut().enumerate() {
                    *d = $conv(*p.offset(i as isize * stride));
                }
            }
        }};
    }
    match dtype {
        DType::F32 => go!(f32, |v: f32| v),
        DType::F64 => go!(f64, |v: f64| v as f32),
        DType::F16 => go!(u16, |v: u16| f16::from_bits(v).to_f32()),
        DType::BF16 => go!(u16, |v: u16| f32::from_bits((v as u32) << 16)),
        _ => unreachable!("load_row on a non-float dtype (validated by the op)"),
    }
}

/// Stores `src` to byte address `dst`, `stride` elements apart, converting from
/// float32 with round-to-nearest-even.
///
/// # Safety
/// Every addressed element must be writable memory of type `dtype`.
#[inline]
pub unsafe fn store_row(src: &[f32], dst: usize, dtype: DType, stride: isize) {
    macro_rules! go {
        ($t:ty, $conv:expr) => {{
            let p = dst as *mut $t;
            if stride == 1 {
                let s = std::slice::from_raw_parts_mut(p, src.len());
                for (d, &v) in s.iter_mut().zip(src) {
                    *d = $conv(v);
                }
            } else {
                for (i, &v) in src.iter().enumerate() {
                    *p.offset(i as isize * stride) = $conv(v);
                }
            }
        }};
    }
    match dtype {
        DType::F32 => go!(f32, |v: f32| v),
        DType::F64 => go!(f64, |v: f32| v as f64),
        DType::F16 => go!(u16, |v: f32| f16::from_f32(v).to_bits()),
        DType::BF16 => go!(u16, |v: f32| bf16::from_f32(v).to_bits()),
        _ => unreachable!("store_row on a non-float dtype (validated by the op)"),
    }
}

/// Byte address of element `idx` of a raw view.
#[inline(always)]
pub fn addr<const R: usize>(r: &Raw<R>, idx: [usize; R]) -> usize {
    let mut off = 0isize;
    for i in 0..R {
        off += idx[i] as isize * r.strides[i];
    }
    (r.ptr as isize + off * r.dtype.size() as isize) as usize
}

#[cfg(feature = "python")]
pub use py::{alloc, alloc_reuse, current_stream, extract, extract_opt};

#[cfg(feature = "python")]
mod py {
    use super::*;
    use pyo3::ffi;
    use pyo3::intern;
    use pyo3::prelude::*;
    use pyo3::sync::PyOnceLock;
    use pyo3::types::{PyDict, PyString, PyTuple};
    use std::os::raw::c_void;

    #[repr(C)]
    struct DLDevice {
        device_type: i32,
        device_id: i32,
    }
    #[repr(C)]
    struct DLDataType {
        code: u8,
        bits: u8,
        lanes: u16,
    }
    #[repr(C)]
    struct DLTensor {
        data: *mut c_void,
        device: DLDevice,
        ndim: i32,
        dtype: DLDataType,
        shape: *const i64,
        strides: *const i64,
        byte_offset: u64,
    }
    #[repr(C)]
    struct DLManagedTensor {
        dl_tensor: DLTensor,
        manager_ctx: *mut c_void,
        deleter: *mut c_void,
    }
    #[repr(C)]
    struct DLManagedTensorVersioned {
        version: [u32; 2],
        manager_ctx: *mut c_void,
        deleter: *mut c_void,
        flags: u64,
        dl_tensor: DLTensor,
    }
    const DLPACK_FLAG_READ_ONLY: u64 = 1;

    fn type_name(obj: &Bound<'_, PyAny>) -> String {
        obj.get_type()
            .fully_qualified_name()
            .map(|s| s.to_string())
            .unwrap_or_else(|_| "?".into())
    }

    fn expected_tensor(name: &str, obj: &Bound<'_, PyAny>) -> Error {
        let what = if obj.is_none() {
            "None".to_string()
        } else {
            type_name(obj)
        };
        Error::type_(format!(
            "{name}: expected a tensor (NumPy array, torch.Tensor or a __dlpack__ object), got {what}"
        ))
    }

    // ------------------------------------------- torch's DLPack exchange API
    //
    // torch (≥ 2.10) puts a table of C functions on `torch.Tensor`
    // (`__dlpack_c_exchange_api__`, a capsule named "dlpack_exchange_api",
    // DLPack's `DLPackExchangeAPI`): `dltensor_from_py_object_no_sync` fills a
    // DLTensor from a tensor object without allocating (its shape and strides
    // point into the TensorImpl), ~40 ns against ~300 ns for the six attribute
    // reads of `from_torch` (each of which also makes a GC-tracked tuple or a
    // Python int), and `current_work_stream` gives the CUDA stream without a
    // Python call. Used for tensors whose type is exactly `torch.Tensor` or
    // `torch.nn.Parameter`; subclasses (which may override attributes), older
    // torch and every error case go through `from_torch`.

    #[repr(C)]
    struct DLPackVersion {
        major: u32,
        minor: u32,
    }

    type SetErrorFn =
        unsafe extern "C" fn(*mut c_void, *const std::os::raw::c_char, *const std::os::raw::c_char);

    /// DLPack 1.x `DLPackExchangeAPI` (dlpack.h), header first.
    #[repr(C)]
    struct ExchangeApi {
        version: DLPackVersion,
        prev_api: *const c_void,
        managed_tensor_allocator: Option<
            unsafe extern "C" fn(
                *mut DLTensor,
                *mut *mut DLManagedTensorVersioned,
                *mut c_void,
                Option<SetErrorFn>,
            ) -> i32,
        >,
        managed_tensor_from_py_object_no_sync:
            Option<unsafe extern "C" fn(*mut c_void, *mut *mut DLManagedTensorVersioned) -> i32>,
        managed_tensor_to_py_object_no_sync:
            Option<unsafe extern "C" fn(*mut DLManagedTensorVersioned, *mut *mut c_void) -> i32>,
        dltensor_from_py_object_no_sync:
            Option<unsafe extern "C" fn(*mut c_void, *mut DLTensor) -> i32>,
        current_work_stream: Option<unsafe extern "C" fn(i32, i32, *mut *mut c_void) -> i32>,
    }

    /// What is looked up once torch is imported.
    struct TorchInfo {
        tensor: Py<PyAny>,
        /// `torch.Tensor` and `torch.nn.Parameter` as type pointers (kept
        /// alive by `tensor` and torch's module dict).
        exact: [usize; 2],
        /// The exchange table (static in libtorch_python), or 0.
        api: usize,
        /// `torch.Tensor.is_neg` (unbound): the exchange API exports a tensor
        /// with the negative bit as its raw memory, so the fast path asks.
        is_neg: Py<PyAny>,
    }

    fn torch_info(py: Python<'_>) -> Option<&'static TorchInfo> {
        static INFO: PyOnceLock<TorchInfo> = PyOnceLock::new();
        if let Some(i) = INFO.get(py) {
            return Some(i);
        }
        // Until the caller has imported torch, nothing can be a tensor.
        let imported = py
            .import("sys")
            .and_then(|s| s.getattr("modules"))
            .and_then(|m| m.contains("torch"))
            .unwrap_or(false);
        if !imported {
            return None;
        }
        let torch = py.import("torch").ok()?;
        let tensor = torch.getattr("Tensor").ok()?;
        let param = torch
            .getattr("nn")
            .and_then(|m| m.getattr("Parameter"))
            .map(|p| p.as_ptr() as usize)
            .unwrap_or(0);
        let api = tensor
            .getattr("__dlpack_c_exchange_api__")
            .ok()
            .map(|cap| unsafe {
                let p = ffi::PyCapsule_GetPointer(cap.as_ptr(), c"dlpack_exchange_api".as_ptr());
                if p.is_null() {
                    ffi::PyErr_Clear();
                    return 0;
                }
                let a = &*(p as *const ExchangeApi);
                let usable = a.version.major == 1
                    && a.dltensor_from_py_object_no_sync.is_some()
                    && a.current_work_stream.is_some();
                if usable {
                    p as usize
                } else {
                    0
                }
            })
            .unwrap_or(0);
        let exact = [tensor.as_ptr() as usize, param];
        let is_neg = tensor.getattr("is_neg").ok()?.unbind();
        Some(INFO.get_or_init(py, || TorchInfo {
            tensor: tensor.unbind(),
            exact,
            api,
            is_neg,
        }))
    }

    fn exchange_api(info: &TorchInfo) -> Option<&'static ExchangeApi> {
        (info.api != 0).then(|| unsafe { &*(info.api as *const ExchangeApi) })
    }

    /// The view of a tensor whose type is exactly torch.Tensor / Parameter,
    /// through the exchange API; None where `from_torch` must decide (older
    /// torch, another type, an error, a dtype or device DLPack cannot name).
    fn from_torch_fast(
        name: &'static str,
        obj: &Bound<'_, PyAny>,
        info: &TorchInfo,
    ) -> Option<TensorView> {
        let api = exchange_api(info)?;
        let tp = obj.get_type_ptr() as usize;
        if tp != info.exact[0] && tp != info.exact[1] {
            return None;
        }
        let f = api.dltensor_from_py_object_no_sync?;
        let mut t = DLTensor {
            data: std::ptr::null_mut(),
            device: DLDevice {
                device_type: 0,
                device_id: 0,
            },
            ndim: 0,
            dtype: DLDataType {
                code: 0,
                bits: 0,
                lanes: 0,
            },
            shape: std::ptr::null(),
            strides: std::ptr::null(),
            byte_offset: 0,
        };
        unsafe {
            if f(obj.as_ptr() as *mut c_void, &mut t) != 0 {
                ffi::PyErr_Clear();
                return None;
            }
        }
        let dtype = DType::from_dlpack(t.dtype.code, t.dtype.bits, t.dtype.lanes)?;
        // A lazy negation (the negative bit: `t.conj().imag`, `torch._neg_view`)
        // is exported as its raw memory; `from_torch` resolves it. (The
        // conjugate bit exists on complex tensors only, which DLPack codes as
        // complex: `from_dlpack` above already sent them to `from_torch`.)
        // `torch.Tensor.is_neg(obj)` through the vectorcall of the method
        // descriptor (no argument tuple to build): ~60 ns, the cost of this check.
        let neg = unsafe {
            let r = ffi::PyObject_CallFunctionObjArgs(
                info.is_neg.as_ptr(),
                obj.as_ptr(),
                std::ptr::null_mut::<ffi::PyObject>(),
            );
            if r.is_null() {
                ffi::PyErr_Clear();
                return None;
            }
            let neg = r != ffi::Py_False();
            ffi::Py_DECREF(r);
            neg
        };
        if neg {
            return None;
        }
        let device = match t.device.device_type {
            1 => Device::Cpu,
            2 => Device::Cuda(t.device.device_id),
            _ => return None,
        };
        let nd = t.ndim.max(0) as usize;
        if nd > 0 && (t.shape.is_null() || t.strides.is_null()) {
            return None;
        }
        let (shape, strides) = unsafe {
            (
                (0..nd).map(|i| *t.shape.add(i) as usize).collect(),
                (0..nd).map(|i| *t.strides.add(i) as isize).collect(),
            )
        };
        Some(TensorView {
            name,
            dtype,
            shape,
            strides,
            device,
            ptr: t.data as usize + t.byte_offset as usize,
            readonly: false,
            kind: Kind::Torch,
            resolved: false,
            _owner: None,
        })
    }

    /// torch dtype objects and ours, looked up by identity (no string work per call).
    fn torch_dtype(dt: &Bound<'_, PyAny>) -> Option<DType> {
        static TABLE: PyOnceLock<Vec<(Py<PyAny>, DType)>> = PyOnceLock::new();
        let py = dt.py();
        let table = TABLE.get_or_init(py, || {
            let Ok(torch) = py.import("torch") else {
                return Vec::new();
            };
            [
                ("float32", DType::F32),
                ("float64", DType::F64),
                ("float16", DType::F16),
                ("bfloat16", DType::BF16),
                ("int8", DType::I8),
                ("int16", DType::I16),
                ("int32", DType::I32),
                ("int64", DType::I64),
                ("uint8", DType::U8),
                ("bool", DType::Bool),
            ]
            .into_iter()
            .filter_map(|(n, d)| torch.getattr(n).ok().map(|o| (o.unbind(), d)))
            .collect()
        });
        table
            .iter()
            .find(|(o, _)| o.bind(py).is(dt))
            .map(|(_, d)| *d)
    }

    fn from_torch(name: &'static str, obj: &Bound<'_, PyAny>) -> Result<TensorView> {
        static STRIDED: PyOnceLock<Option<Py<PyAny>>> = PyOnceLock::new();
        let py = obj.py();
        let pe = |e: PyErr| Error::type_(format!("{name}: could not read the torch.Tensor: {e}"));
        let dt = obj.getattr(intern!(py, "dtype")).map_err(pe)?;
        let dtype = torch_dtype(&dt).ok_or_else(|| {
            Error::type_(format!(
                "{name}: expected a float32, float16, bfloat16 or float64 tensor, got {}",
                dt.str().map(|s| s.to_string()).unwrap_or_default()
            ))
        })?;
        // The negative / conjugate bits: the memory holds other values than
        // the tensor shows. Read a resolved copy (as torch's own kernels do);
        // `expect_writable` refuses it for arguments written in place.
        for (bit, resolve) in [
            (intern!(py, "is_neg"), intern!(py, "resolve_neg")),
            (intern!(py, "is_conj"), intern!(py, "resolve_conj")),
        ] {
            let set = obj
                .call_method0(bit)
                .and_then(|v| v.extract::<bool>())
                .map_err(pe)?;
            if set {
                let r = obj.call_method0(resolve).map_err(pe)?;
                let mut v = from_torch(name, &r)?;
                v.resolved = true;
                v._owner = Some(r.unbind());
                return Ok(v);
            }
        }
        let strided = STRIDED.get_or_init(py, || {
            py.import("torch")
                .and_then(|t| t.getattr("strided"))
                .ok()
                .map(|s| s.unbind())
        });
        let layout = obj.getattr(intern!(py, "layout")).map_err(pe)?;
        if !strided.as_ref().is_some_and(|s| s.bind(py).is(&layout)) {
            return Err(Error::type_(format!(
                "{name}: expected a dense (strided) tensor, got layout {layout}"
            )));
        }
        let shape: Vec<usize> = obj
            .getattr(intern!(py, "shape"))
            .and_then(|s| s.extract())
            .map_err(pe)?;
        let strides: Vec<isize> = obj
            .call_method0(intern!(py, "stride"))
            .and_then(|s| s.extract())
            .map_err(pe)?;
        let ptr: usize = obj
            .call_method0(intern!(py, "data_ptr"))
            .and_then(|s| s.extract())
            .map_err(pe)?;
        let flag = |a: &Bound<'_, pyo3::types::PyString>| {
            obj.getattr(a).and_then(|v| v.extract::<bool>()).map_err(pe)
        };
        let device = if flag(intern!(py, "is_cpu"))? {
            Device::Cpu
        } else if flag(intern!(py, "is_cuda"))? {
            Device::Cuda(
                obj.call_method0(intern!(py, "get_device"))
                    .and_then(|v| v.extract())
                    .map_err(pe)?,
            )
        } else {
            let dev = obj.getattr(intern!(py, "device")).map_err(pe)?;
            return Err(Error::value(format!(
                "{name}: expected a CPU or CUDA tensor, got one on {dev}"
            )));
        };
        Ok(TensorView {
            name,
            dtype,
            shape,
            strides,
            device,
            ptr,
            readonly: false,
            kind: Kind::Torch,
            resolved: false,
            _owner: None,
        })
    }

    /// A DLTensor's strides in elements, or the C-contiguous ones of `shape`
    /// where the producer left them null.
    unsafe fn dl_strides(t: &DLTensor, shape: &[usize]) -> Vec<isize> {
        let nd = shape.len();
        if t.strides.is_null() {
            let mut s = vec![1isize; nd];
            for i in (0..nd.saturating_sub(1)).rev() {
                s[i] = s[i + 1] * shape[i + 1] as isize;
            }
            s
        } else {
            (0..nd).map(|i| *t.strides.add(i) as isize).collect()
        }
    }

    unsafe fn view_from_dltensor(
        name: &'static str,
        t: &DLTensor,
        readonly: bool,
        kind: Kind,
        owner: Py<PyAny>,
        dtype_override: Option<DType>,
    ) -> Result<TensorView> {
        let nd = t.ndim.max(0) as usize;
        let shape: Vec<usize> = (0..nd).map(|i| *t.shape.add(i) as usize).collect();
        let strides = dl_strides(t, &shape);
        let dtype = match dtype_override {
            Some(d) => d,
            None => {
                DType::from_dlpack(t.dtype.code, t.dtype.bits, t.dtype.lanes).ok_or_else(|| {
                    Error::type_(format!(
                        "{name}: unsupported dtype (DLPack code {}, {} bits, {} lanes)",
                        t.dtype.code, t.dtype.bits, t.dtype.lanes
                    ))
                })?
            }
        };
        let device = match t.device.device_type {
            1 | 3 => Device::Cpu,
            2 | 13 => Device::Cuda(t.device.device_id),
            other => {
                return Err(Error::value(format!(
                    "{name}: expected a CPU or CUDA array, got DLPack device type {other}"
                )))
            }
        };
        Ok(TensorView {
            name,
            dtype,
            shape,
            strides,
            device,
            ptr: t.data as usize + t.byte_offset as usize,
            readonly,
            kind,
            resolved: false,
            _owner: Some(owner),
        })
    }

    /// Reads a capsule returned by `__dlpack__`, without consuming it: the
    /// capsule keeps its name, so its destructor frees the tensor when the
    /// view (which owns the capsule) is dropped.
    fn from_capsule(
        name: &'static str,
        cap: Bound<'_, PyAny>,
        kind: Kind,
        dtype_override: Option<DType>,
    ) -> Result<TensorView> {
        let p = cap.as_ptr();
        unsafe {
            let v = ffi::PyCapsule_GetPointer(p, c"dltensor_versioned".as_ptr());
            if !v.is_null() {
                let m = &*(v as *const DLManagedTensorVersioned);
                let ro = m.flags & DLPACK_FLAG_READ_ONLY != 0;
                return view_from_dltensor(
                    name,
                    &m.dl_tensor,
                    ro,
                    kind,
                    cap.unbind(),
                    dtype_override,
                );
            }
            ffi::PyErr_Clear();
            let v = ffi::PyCapsule_GetPointer(p, c"dltensor".as_ptr());
            if !v.is_null() {
                let m = &*(v as *const DLManagedTensor);
                return view_from_dltensor(
                    name,
                    &m.dl_tensor,
                    false,
                    kind,
                    cap.unbind(),
                    dtype_override,
                );
            }
            ffi::PyErr_Clear();
        }
        Err(Error::type_(format!(
            "{name}: __dlpack__ did not return a DLPack capsule"
        )))
    }

    fn call_dlpack<'py>(obj: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
        // Ask for a versioned capsule (it can say "read-only"); producers that
        // predate DLPack 1.0 reject the keyword, so fall back to the plain call.
        let py = obj.py();
        let kw = PyDict::new(py);
        kw.set_item("max_version", PyTuple::new(py, [1u32, 0u32])?)?;
        match obj.call_method(intern!(py, "__dlpack__"), (), Some(&kw)) {
            Ok(c) => Ok(c),
            Err(e) if e.is_instance_of::<pyo3::exceptions::PyTypeError>(py) => {
                obj.call_method0(intern!(py, "__dlpack__"))
            }
            Err(e) => Err(e),
        }
    }

    fn is_numpy(obj: &Bound<'_, PyAny>) -> bool {
        let t = obj.get_type();
        t.name().map(|n| n == "ndarray").unwrap_or(false)
            && t.module()
                .map(|m| m.to_string() == "numpy")
                .unwrap_or(false)
    }

    /// The view of any supported array object, named `name` in errors.
    pub fn extract(name: &'static str, obj: &Bound<'_, PyAny>) -> Result<TensorView> {
        if let Some(info) = torch_info(obj.py()) {
            if let Some(v) = from_torch_fast(name, obj, info) {
                return Ok(v);
            }
            if obj.is_instance(info.tensor.bind(obj.py())).unwrap_or(false) {
                return from_torch(name, obj);
            }
        }
        let numpy = is_numpy(obj);
        if !numpy && !obj.hasattr("__dlpack__").unwrap_or(false) {
            return Err(expected_tensor(name, obj));
        }
        let kind = if numpy { Kind::Numpy } else { Kind::DLPack };
        match call_dlpack(obj) {
            Ok(cap) => from_capsule(name, cap, kind, None),
            Err(e) => {
                if numpy {
                    // DLPack has no code for ml_dtypes' bfloat16: read its bits as uint16.
                    let dname: String = obj
                        .getattr("dtype")
                        .and_then(|d| d.getattr("name"))
                        .and_then(|n| n.extract())
                        .unwrap_or_default();
                    if dname == "bfloat16" {
                        let view = obj.call_method1("view", ("uint16",)).map_err(|e| {
                            Error::type_(format!("{name}: could not read the bfloat16 array: {e}"))
                        })?;
                        let cap = call_dlpack(&view).map_err(|e| {
                            Error::type_(format!("{name}: could not read the bfloat16 array: {e}"))
                        })?;
                        let mut v = from_capsule(name, cap, kind, Some(DType::BF16))?;
                        v.readonly |= !obj
                            .getattr("flags")
                            .and_then(|f| f.getattr("writeable"))
                            .and_then(|w| w.extract::<bool>())
                            .unwrap_or(true);
                        return Ok(v);
                    }
                    let dstr = obj
                        .getattr("dtype")
                        .map(|d| d.to_string())
                        .unwrap_or_default();
                    return Err(Error::type_(format!(
                        "{name}: expected a float32, float16, bfloat16 or float64 array, got dtype {dstr} ({e})"
                    )));
                }
                Err(Error::type_(format!("{name}: __dlpack__ failed: {e}")))
            }
        }
    }

    /// `extract` for an optional argument: None gives None.
    pub fn extract_opt(
        name: &'static str,
        obj: Option<&Bound<'_, PyAny>>,
    ) -> Result<Option<TensorView>> {
        match obj {
            None => Ok(None),
            Some(o) if o.is_none() => Ok(None),
            Some(o) => extract(name, o).map(Some),
        }
    }

    fn torch_dtype_obj<'py>(py: Python<'py>, d: DType) -> PyResult<Bound<'py, PyAny>> {
        py.import("torch")?.getattr(match d {
            DType::F32 => "float32",
            DType::F64 => "float64",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            _ => "float32",
        })
    }

    /// `SetError` of the exchange API's allocator: keeps the message.
    unsafe extern "C" fn keep_error(
        ctx: *mut c_void,
        _kind: *const std::os::raw::c_char,
        msg: *const std::os::raw::c_char,
    ) {
        if !ctx.is_null() && !msg.is_null() {
            *(ctx as *mut String) = std::ffi::CStr::from_ptr(msg).to_string_lossy().into_owned();
        }
    }

    /// The error of a failed output allocation for a `kind` caller:
    /// `Error::OutOfMemory` (torch.OutOfMemoryError for torch, MemoryError
    /// otherwise) when the allocator ran out of memory (`oom`, or its message
    /// says so), else a RuntimeError.
    fn alloc_error(name: &str, kind: Kind, shape: &[usize], msg: String, oom: bool) -> Error {
        let msg = format!(
            "could not allocate {name} of shape {}: {msg}",
            shape_str(shape)
        );
        if oom || crate::error::is_oom_message(&msg) {
            Error::out_of_memory(msg, kind == Kind::Torch)
        } else {
            Error::runtime(msg)
        }
    }

    fn py_alloc_error(py: Python<'_>, name: &str, kind: Kind, shape: &[usize], e: PyErr) -> Error {
        let oom = e.is_instance_of::<pyo3::exceptions::PyMemoryError>(py);
        alloc_error(name, kind, shape, e.to_string(), oom)
    }

    /// `alloc` for a torch tensor of exact type torch.Tensor / Parameter
    /// through the exchange API: `at::empty` in C++ and the tensor object made
    /// from its DLPack export (~0.6 µs; `new_empty` from Python or Rust parses
    /// its arguments and costs ~1.3-1.9 µs). The result is a plain contiguous
    /// tensor on `like`'s device, as `new_empty` gives; its storage, being
    /// imported, cannot grow (`resize_` to a larger size raises). None where
    /// the API is missing or `like` is of another kind or type.
    fn alloc_torch_fast<'py>(
        name: &'static str,
        like_obj: &Bound<'py, PyAny>,
        like: &TensorView,
        shape: &[usize],
        dtype: Option<DType>,
    ) -> Option<Result<(Bound<'py, PyAny>, TensorView)>> {
        if like.kind != Kind::Torch {
            return None;
        }
        let py = like_obj.py();
        let info = torch_info(py)?;
        let api = exchange_api(info)?;
        let tp = like_obj.get_type_ptr() as usize;
        if tp != info.exact[0] && tp != info.exact[1] {
            return None;
        }
        let (alloc_f, to_py) = (
            api.managed_tensor_allocator?,
            api.managed_tensor_to_py_object_no_sync?,
        );
        let dt = dtype.unwrap_or(like.dtype);
        let dl = dl_dtype(dt)?;
        let device = match like.device {
            Device::Cpu => DLDevice {
                device_type: 1,
                device_id: 0,
            },
            Device::Cuda(i) => DLDevice {
                device_type: 2,
                device_id: i,
            },
        };
        let shape_i: Vec<i64> = shape.iter().map(|&s| s as i64).collect();
        let mut proto = DLTensor {
            data: std::ptr::null_mut(),
            device,
            ndim: shape.len() as i32,
            dtype: dl,
            shape: shape_i.as_ptr(),
            strides: std::ptr::null(),
            byte_offset: 0,
        };
        let fail = |msg: String| Some(Err(alloc_error(name, like.kind, shape, msg, false)));
        let mut msg = String::new();
        let mut m: *mut DLManagedTensorVersioned = std::ptr::null_mut();
        unsafe {
            let rc = alloc_f(
                &mut proto,
                &mut m,
                &mut msg as *mut String as *mut c_void,
                Some(keep_error),
            );
            if rc != 0 || m.is_null() {
                return fail(msg);
            }
            let t = &(*m).dl_tensor;
            let strides = dl_strides(t, shape);
            let view = TensorView {
                name,
                dtype: dt,
                shape: shape.to_vec(),
                strides,
                device: like.device,
                ptr: t.data as usize + t.byte_offset as usize,
                readonly: false,
                kind: Kind::Torch,
                resolved: false,
                _owner: None,
            };
            // The tensor object takes the export over (its deleter runs when
            // the object's storage dies).
            let mut obj: *mut c_void = std::ptr::null_mut();
            if to_py(m, &mut obj) != 0 || obj.is_null() {
                let e = PyErr::take(py).map(|e| e.to_string()).unwrap_or_default();
                return fail(e);
            }
            Some(Ok((
                Bound::from_owned_ptr(py, obj as *mut ffi::PyObject),
                view,
            )))
        }
    }

    /// Allocates an output with the caller's framework, on `like`'s device:
    /// `like.new_empty(...)` for torch, `numpy.empty(...)` otherwise. `dtype`
    /// None means `like`'s own dtype. Returns the object and its view.
    pub fn alloc<'py>(
        name: &'static str,
        like_obj: &Bound<'py, PyAny>,
        like: &TensorView,
        shape: &[usize],
        dtype: Option<DType>,
    ) -> Result<(Bound<'py, PyAny>, TensorView)> {
        let py = like_obj.py();
        if let Some(r) = alloc_torch_fast(name, like_obj, like, shape, dtype) {
            return r;
        }
        let err = |e: PyErr| py_alloc_error(py, name, like.kind, shape, e);
        let shp = PyTuple::new(py, shape).map_err(err)?;
        let obj = match like.kind {
            Kind::Torch => match dtype {
                Some(d) if d != like.dtype => {
                    let kw = PyDict::new(py);
                    kw.set_item(intern!(py, "dtype"), torch_dtype_obj(py, d).map_err(err)?)
                        .map_err(err)?;
                    like_obj
                        .call_method(intern!(py, "new_empty"), (shp,), Some(&kw))
                        .map_err(err)?
                }
                _ => like_obj
                    .call_method1(intern!(py, "new_empty"), (shp,))
                    .map_err(err)?,
            },
            Kind::Numpy | Kind::DLPack => {
                let np = py.import("numpy").map_err(err)?;
                let dt: Bound<'py, PyAny> = match dtype {
                    None if like.kind == Kind::Numpy => like_obj.getattr("dtype").map_err(err)?,
                    None => PyString::new(py, np_dtype_name(like.dtype)).into_any(),
                    Some(d) => PyString::new(py, np_dtype_name(d)).into_any(),
                };
                np.call_method1("empty", (shp, dt)).map_err(err)?
            }
        };
        let view = extract(name, &obj)?;
        Ok((obj, view))
    }

    // ------------------------------------------------ reused CPU output buffers
    //
    // A fresh multi-MB output costs a page fault per 4 KB on its first write:
    // ~4 ms of kernel time for 12.6 MB here (b1 d1536 l2048 float32), while
    // writing memory that is already mapped takes ~0.7 ms. glibc returns large
    // freed blocks to the system, so a training loop that allocates the same
    // outputs every step pays that again and again (5 such tensors per
    // forward + backward of the scan). `alloc_reuse` hands out buffers that
    // outlived their tensors instead: a small cache, like the CUDA caching
    // allocator's, for CPU torch outputs of at least `REUSE_MIN` bytes. The
    // tensor comes from DLPack (`torch._C._from_dlpack`), so its storage is not
    // resizable (`resize_` to a larger size raises).

    /// Smallest output (bytes) that goes through the cache.
    const REUSE_MIN: usize = 1 << 20;
    /// Alignment of the cached buffers (torch's CPU allocator uses 64).
    const REUSE_ALIGN: usize = 64;
    /// Environment variable: the cache's capacity in MB (default 256; 0 turns
    /// `alloc_reuse` into `alloc`).
    pub const REUSE_ENV: &str = "MAMBA_ATTENTION_CPU_CACHE_MB";

    struct Reuse {
        /// Idle buffers (address, bytes), oldest first.
        free: Vec<(usize, usize)>,
        idle: usize,
    }
    static REUSE: std::sync::Mutex<Reuse> = std::sync::Mutex::new(Reuse {
        free: Vec::new(),
        idle: 0,
    });

    fn reuse_cap() -> usize {
        static CAP: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
        *CAP.get_or_init(|| {
            std::env::var(REUSE_ENV)
                .ok()
                .and_then(|s| s.trim().parse::<usize>().ok())
                .unwrap_or(256)
                << 20
        })
    }

    fn reuse_layout(bytes: usize) -> std::alloc::Layout {
        std::alloc::Layout::from_size_align(bytes, REUSE_ALIGN).expect("buffer layout")
    }

    /// A buffer of exactly `bytes` (a multiple of 4096): the newest idle one of
    /// that size, else a fresh one (null if the system has no memory).
    fn reuse_take(bytes: usize) -> *mut u8 {
        {
            let mut r = REUSE.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(i) = r.free.iter().rposition(|&(_, b)| b == bytes) {
                let (p, _) = r.free.remove(i);
                r.idle -= bytes;
                return p as *mut u8;
            }
        }
        unsafe { std::alloc::alloc(reuse_layout(bytes)) }
    }

    /// Gives a buffer of `reuse_take` back; the oldest idle ones are freed while
    /// the cache holds more than its capacity.
    fn reuse_give(p: *mut u8, bytes: usize) {
        let mut drop_now = Vec::new();
        {
            let mut r = REUSE.lock().unwrap_or_else(|e| e.into_inner());
            r.free.push((p as usize, bytes));
            r.idle += bytes;
            let cap = reuse_cap();
            while r.idle > cap {
                let (q, b) = r.free.remove(0);
                r.idle -= b;
                drop_now.push((q, b));
            }
        }
        for (q, b) in drop_now {
            unsafe { std::alloc::dealloc(q as *mut u8, reuse_layout(b)) };
        }
    }

    /// A DLPack tensor that owns a cached buffer (the DLManagedTensor first,
    /// so a pointer to it is a pointer to the whole).
    #[repr(C)]
    struct Owned {
        m: DLManagedTensor,
        shape: Vec<i64>,
        strides: Vec<i64>,
        bytes: usize,
    }

    unsafe extern "C" fn owned_deleter(m: *mut DLManagedTensor) {
        let o = Box::from_raw(m as *mut Owned);
        reuse_give(o.m.dl_tensor.data as *mut u8, o.bytes);
    }

    /// The capsule's destructor: frees the tensor unless a consumer took it
    /// (which renames the capsule "used_dltensor").
    unsafe extern "C" fn owned_capsule_destructor(cap: *mut ffi::PyObject) {
        if ffi::PyCapsule_IsValid(cap, c"dltensor".as_ptr()) == 1 {
            let m = ffi::PyCapsule_GetPointer(cap, c"dltensor".as_ptr()) as *mut DLManagedTensor;
            if !m.is_null() {
                owned_deleter(m);
            }
        }
    }

    fn dl_dtype(d: DType) -> Option<DLDataType> {
        let (code, bits) = match d {
            DType::F32 => (2, 32),
            DType::F64 => (2, 64),
            DType::F16 => (2, 16),
            DType::BF16 => (4, 16),
            _ => return None,
        };
        Some(DLDataType {
            code,
            bits,
            lanes: 1,
        })
    }

    /// `alloc` for outputs that a caller is likely to allocate again with the
    /// same size (a training loop): CPU torch outputs of at least 1 MB come
    /// from the cache of idle buffers above; everything else is `alloc`.
    pub fn alloc_reuse<'py>(
        name: &'static str,
        like_obj: &Bound<'py, PyAny>,
        like: &TensorView,
        shape: &[usize],
        dtype: Option<DType>,
    ) -> Result<(Bound<'py, PyAny>, TensorView)> {
        let dt = dtype.unwrap_or(like.dtype);
        let numel: usize = shape.iter().product();
        let bytes = numel * dt.size();
        let dl = dl_dtype(dt);
        if like.kind != Kind::Torch
            || like.device != Device::Cpu
            || bytes < REUSE_MIN
            || dl.is_none()
            || reuse_cap() == 0
        {
            return alloc(name, like_obj, like, shape, dtype);
        }
        let py = like_obj.py();
        let err = |e: PyErr| py_alloc_error(py, name, like.kind, shape, e);
        static FROM_DLPACK: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
        let from = FROM_DLPACK
            .get_or_try_init(py, || {
                py.import("torch")?
                    .getattr("_C")?
                    .getattr("_from_dlpack")
                    .map(|f| f.unbind())
            })
            .map_err(err)?;
        let size = bytes.div_ceil(4096) * 4096;
        let data = reuse_take(size);
        if data.is_null() {
            return alloc(name, like_obj, like, shape, dtype);
        }
        let shape_i: Vec<i64> = shape.iter().map(|&s| s as i64).collect();
        let mut strides = vec![1i64; shape.len()];
        for i in (0..shape.len().saturating_sub(1)).rev() {
            strides[i] = strides[i + 1] * shape_i[i + 1].max(1);
        }
        let mut o = Box::new(Owned {
            m: DLManagedTensor {
                dl_tensor: DLTensor {
                    data: data as *mut c_void,
                    device: DLDevice {
                        device_type: 1,
                        device_id: 0,
                    },
                    ndim: shape.len() as i32,
                    dtype: dl.unwrap(),
                    shape: std::ptr::null(),
                    strides: std::ptr::null(),
                    byte_offset: 0,
                },
                manager_ctx: std::ptr::null_mut(),
                deleter: owned_deleter as *mut c_void,
            },
            shape: shape_i,
            strides,
            bytes: size,
        });
        o.m.dl_tensor.shape = o.shape.as_ptr();
        o.m.dl_tensor.strides = o.strides.as_ptr();
        let raw = Box::into_raw(o);
        let cap = unsafe {
            ffi::PyCapsule_New(
                raw as *mut c_void,
                c"dltensor".as_ptr(),
                Some(owned_capsule_destructor),
            )
        };
        if cap.is_null() {
            unsafe { owned_deleter(raw as *mut DLManagedTensor) };
            return Err(err(PyErr::fetch(py)));
        }
        // The capsule owns the buffer now (its destructor frees it if torch fails).
        let cap = unsafe { Bound::from_owned_ptr(py, cap) };
        let obj = from.bind(py).call1((cap,)).map_err(err)?;
        let view = extract(name, &obj)?;
        Ok((obj, view))
    }

    /// PyTorch's current CUDA stream on device `ordinal`, as a raw handle:
    /// kernels run in order with the caller's work on that stream.
    pub fn current_stream(py: Python<'_>, ordinal: i32) -> Result<u64> {
        if let Some(f) = torch_info(py)
            .and_then(exchange_api)
            .and_then(|a| a.current_work_stream)
        {
            let mut s: *mut c_void = std::ptr::null_mut();
            // kDLCUDA = 2; torch returns its current stream of that device.
            if unsafe { f(2, ordinal, &mut s) } == 0 {
                return Ok(s as u64);
            }
            unsafe { ffi::PyErr_Clear() };
        }
        static RAW: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
        let f = RAW.get_or_try_init(py, || {
            let c = py.import("torch")?.getattr("_C")?;
            c.getattr("_cuda_getCurrentRawStream").map(|f| f.unbind())
        });
        let r = match f {
            Ok(f) => f
                .bind(py)
                .call1((ordinal,))
                .and_then(|s| s.extract::<u64>()),
            Err(_) => py
                .import("torch")
                .and_then(|t| {
                    t.getattr("cuda")?
                        .call_method1("current_stream", (ordinal,))
                })
                .and_then(|s| s.getattr("cuda_stream")?.extract::<u64>()),
        };
        r.map_err(|e| {
            Error::runtime(format!(
                "could not get the current CUDA stream of device {ordinal}: {e}"
            ))
        })
    }

    fn np_dtype_name(d: DType) -> &'static str {
        match d {
            DType::BF16 => "float32", // a foreign producer's bf16 comes back as float32 NumPy
            d => d.name(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(name: &'static str, shape: &[usize], strides: &[isize], ptr: usize) -> TensorView {
        TensorView::host(name, DType::F32, shape, strides, ptr)
    }

    /// The exact answer by enumeration.
    fn overlaps(shape: &[usize], strides: &[isize]) -> bool {
        let mut offs = vec![0isize];
        for (&n, &s) in shape.iter().zip(strides) {
            offs = (0..n as isize)
                .flat_map(|i| offs.iter().map(move |&o| o + i * s))
                .collect();
        }
        let len = offs.len();
        offs.sort_unstable();
        offs.dedup();
        offs.len() != len
    }

    #[test]
    fn internal_overlap_matches_enumeration() {
        let cases: &[(&[usize], &[isize])] = &[
            (&[2, 6, 3], &[18, 3, 1]),
            (&[2, 6, 3], &[0, 3, 1]),
            (&[2, 1, 3], &[3, 0, 1]),
            (&[2, 6, 3], &[1, 2, 12]),
            (&[2, 4, 3], &[3, 1, 1]),
            (&[3, 2], &[2, 3]),
            (&[2, 2], &[1, 1]),
            (&[4, 3], &[-3, -1]),
            (&[4, 3], &[3, -1]),
            (&[5, 5], &[5, 1]),
            (&[5, 5], &[4, 1]),
            (&[3, 4, 5], &[7, 2, 1]),
            (&[0, 4], &[0, 0]),
            (&[1, 1, 1], &[0, 0, 0]),
        ];
        for (shape, strides) in cases {
            let v = view("t", shape, strides, 4096);
            let want = shape.iter().product::<usize>() > 0 && overlaps(shape, strides);
            assert_eq!(v.has_internal_overlap(), want, "{shape:?} {strides:?}");
        }
    }

    #[test]
    fn byte_span_covers_negative_strides() {
        let v = view("t", &[4, 3], &[-3, 1], 1000);
        assert_eq!(v.byte_span(), Some((1000 - 9 * 4, 1000 + 3 * 4)));
        assert_eq!(view("t", &[0, 3], &[3, 1], 1000).byte_span(), None);
    }

    #[test]
    fn check_writes_rules() {
        let state = view("state", &[2, 4, 3], &[12, 3, 1], 1000);
        let inside = view("x", &[2, 4], &[12, 3], 1000 + 4);
        let after = view("x", &[2, 4], &[4, 1], 1000 + 24 * 4);
        let before = view("x", &[2, 4], &[4, 1], 1000 - 8 * 4);
        assert!(check_writes(&[&state], &[&after, &before]).is_ok());
        let e = check_writes(&[&state], &[&after, &inside]).unwrap_err();
        assert!(matches!(&e, Error::Value(m) if m.starts_with("x: shares memory with state")));
        let expanded = view("state", &[2, 4, 3], &[0, 3, 1], 1000);
        let e = check_writes(&[&expanded], &[]).unwrap_err();
        assert!(matches!(&e, Error::Value(m) if m.starts_with("state: is written in place")));
        // Two written views of one buffer.
        let k = view("k_cache", &[2, 4], &[4, 1], 1000);
        let v = view("v_cache", &[2, 4], &[4, 1], 1000 + 4 * 4);
        let e = check_writes(&[&k, &v], &[]).unwrap_err();
        assert!(
            matches!(&e, Error::Value(m) if m.starts_with("k_cache: shares memory with v_cache"))
        );
        // A view is not compared with itself.
        assert!(check_writes(&[&state], &[&state]).is_ok());
    }

    #[test]
    fn collapse_rows_views_or_refuses() {
        let mut v = view("x", &[3, 5, 8], &[40, 8, 1], 0);
        assert!(v.collapse_rows());
        assert_eq!(
            (v.shape.clone(), v.strides.clone()),
            (vec![15, 8], vec![8, 1])
        );
        let mut v = view("x", &[3, 1, 5, 8], &[80, 7, 16, 2], 0);
        assert!(v.collapse_rows());
        assert_eq!(
            (v.shape.clone(), v.strides.clone()),
            (vec![15, 8], vec![16, 2])
        );
        let mut v = view("x", &[3, 5, 8], &[8, 24, 1], 0);
        assert!(!v.collapse_rows());
        assert_eq!(v.shape, vec![3, 5, 8]);
        let mut v = view("x", &[8], &[2], 0);
        assert!(v.collapse_rows());
        assert_eq!(
            (v.shape.clone(), v.strides.clone()),
            (vec![1, 8], vec![8, 2])
        );
    }

    #[test]
    fn uint64_beyond_int64_is_an_error() {
        let vals: [u64; 2] = [5, 1 << 63];
        let t = TensorView::host("idx", DType::U64, &[2], &[1], vals.as_ptr() as usize);
        let e = t.to_i64_vec().unwrap_err();
        assert!(matches!(&e, Error::Value(m) if m.starts_with("idx: expected values below 2**63")));
        let ok: [u64; 2] = [5, (1 << 63) - 1];
        let t = TensorView::host("idx", DType::U64, &[2], &[1], ok.as_ptr() as usize);
        assert_eq!(t.to_i64_vec().unwrap(), vec![5, i64::MAX]);
    }

    #[test]
    fn resolved_views_are_not_writable() {
        let mut t = view("state", &[2], &[1], 64);
        assert!(t.expect_writable().is_ok());
        t.resolved = true;
        assert!(matches!(t.expect_writable(), Err(Error::Type(m)) if m.starts_with("state: ")));
    }
}
