//! Local storage backends.

pub mod dir;
pub mod file;
pub mod memory;

pub use dir::Dir;
pub use file::File;
pub use memory::Memory;
