//! One file per operation: argument checking and the op's plan, shared by
//! every backend; the `#[pyfunction]` bindings live beside them.

pub mod attention;
pub mod attention_args;
pub mod attention_bwd_cuda;
pub mod attention_cuda;
pub mod conv1d;
pub mod conv_scan;
pub mod hidden_attention;
pub mod norm;
pub mod rotary;
pub mod scan;
pub mod scan_bwd;
pub mod scan_ck;
