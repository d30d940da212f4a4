//! What the server serves: [`NbdExport`] (a named backend, its flags and block sizes) and
//! [`BlockSizes`]. Configuration only: negotiation announces it, request execution obeys it.

use std::fmt;
use std::sync::Arc;

use r3map_core::{Capabilities, SharedBackend};
use thiserror::Error;

use crate::proto::{self, transmission_flags};
use crate::status::{ChunkStates, Context};

/// A server configuration that cannot work.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("an NBD server needs at least one export")]
    NoExports,
    #[error("the export name '{0}' is used twice")]
    DuplicateName(String),
    #[error("an export name is longer than {} bytes", proto::MAX_NAME)]
    NameTooLong,
    #[error("bad block sizes {0}")]
    BlockSizes(String),
}

/// Block sizes announced with `NBD_INFO_BLOCK_SIZE`: any alignment works, 4 KiB is preferred.
pub const MIN_BLOCK: u32 = 1;
pub const PREFERRED_BLOCK: u32 = 4096;

/// Block sizes announced with `NBD_INFO_BLOCK_SIZE`.
///
/// `min` and `preferred` are advice to clients (the backend copes with any alignment);
/// `max` is enforced: longer reads and writes are refused with `EOVERFLOW`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizes {
    pub min: u32,
    pub preferred: u32,
    pub max: u32,
}

impl Default for BlockSizes {
    fn default() -> Self {
        Self { min: MIN_BLOCK, preferred: PREFERRED_BLOCK, max: proto::MAX_REQUEST }
    }
}

impl BlockSizes {
    /// # Errors
    /// Sizes that are not powers of two, not in `min <= preferred`, `min <= max` order, a
    /// minimum above 64 KiB, a preferred size above 32 MiB, or a maximum above
    /// [`proto::MAX_REQUEST`] (the spec's rules).
    pub fn new(min: u32, preferred: u32, max: u32) -> Result<Self, ConfigError> {
        let bad = |why: &str| Err(ConfigError::BlockSizes(format!("{min}/{preferred}/{max}: {why}")));
        if !min.is_power_of_two() || !preferred.is_power_of_two() {
            return bad("the minimum and preferred sizes must be powers of two");
        }
        if min > 64 * 1024 {
            return bad("the minimum may be at most 64 KiB");
        }
        if preferred > 32 * 1024 * 1024 || preferred < min {
            return bad("the preferred size must be at most 32 MiB and not below the minimum");
        }
        if max > proto::MAX_REQUEST || max < min || !max.is_multiple_of(min) {
            return bad("the maximum must be a multiple of the minimum and at most 32 MiB");
        }
        Ok(Self { min, preferred, max })
    }
}

/// One named export.
#[derive(Clone)]
pub struct NbdExport {
    /// The name clients ask for; the empty name (the default export) maps to the first export.
    pub name: String,
    pub backend: SharedBackend,
    /// Refuse writes, trims and zeroing (also set when the backend reports itself read-only).
    pub read_only: bool,
    /// Shown by `NBD_OPT_LIST` and `NBD_INFO_DESCRIPTION`.
    pub description: Option<String>,
    /// Announced with `NBD_INFO_BLOCK_SIZE`.
    pub block_sizes: BlockSizes,
    /// Chunk states of an export that is the local side of a pull/push pipeline: offered as the
    /// `r3map:chunks` metadata context, and `NBD_CMD_CACHE` pulls through it.
    pub chunk_states: Option<Arc<dyn ChunkStates>>,
}

impl NbdExport {
    /// A writable export without a description.
    pub fn new(name: impl Into<String>, backend: SharedBackend) -> Self {
        Self {
            name: name.into(),
            backend,
            read_only: false,
            description: None,
            block_sizes: BlockSizes::default(),
            chunk_states: None,
        }
    }

    /// Offers `r3map:chunks` from `states` and pulls through it on `NBD_CMD_CACHE`.
    #[must_use]
    pub fn with_chunk_states(mut self, states: Arc<dyn ChunkStates>) -> Self {
        self.chunk_states = Some(states);
        self
    }

    pub(crate) fn read_only(&self, caps: Capabilities) -> bool {
        self.read_only || caps.read_only
    }

    pub(crate) fn contexts(&self) -> &'static [Context] {
        Context::offered(self.chunk_states.is_some())
    }

    /// The transmission flags this export is announced with.
    #[must_use]
    pub fn transmission_flags(&self) -> u16 {
        use transmission_flags as f;
        let caps = self.backend.capabilities();
        // Flushes go to the shared backend, which makes every completed write durable whichever
        // connection sent it: that is what CAN_MULTI_CONN promises.
        let mut flags = f::HAS_FLAGS | f::SEND_FLUSH | f::SEND_FUA | f::SEND_CACHE | f::CAN_MULTI_CONN;
        if self.read_only(caps) {
            flags |= f::READ_ONLY;
        } else {
            if caps.trim {
                flags |= f::SEND_TRIM;
            }
            if caps.write_zeroes {
                flags |= f::SEND_WRITE_ZEROES;
            }
        }
        flags
    }
}

impl fmt::Debug for NbdExport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NbdExport")
            .field("name", &self.name)
            .field("size", &self.backend.size())
            .field("read_only", &self.read_only)
            .field("description", &self.description)
            .field("block_sizes", &self.block_sizes)
            .field("chunk_states", &self.chunk_states.is_some())
            .finish()
    }
}
