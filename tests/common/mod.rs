//! The libgetar oracle helpers live with the format crate, which owns the
//! oracle script; daemon tests use the same ones.
#[path = "../../crates/gtar/tests/common/mod.rs"]
mod format;
#[allow(unused_imports)]
pub use format::*;
