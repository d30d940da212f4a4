//! Layers: each wraps an inner backend and changes one thing about it.

pub mod aligned;
pub mod chunked;
pub mod delay;
pub mod fault;
pub mod locked;
pub mod tracked;

pub use aligned::Aligned;
pub use chunked::Chunked;
pub use delay::{Clock, Delay, ManualClock, SystemClock};
pub use fault::{FaultConfig, FaultInject, Ops};
pub use locked::Locked;
pub use tracked::Tracked;
