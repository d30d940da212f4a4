//! A userfaultfd memory region: a mapping of a remote [`Backend`](r3map_core::Backend)'s size
//! whose pages are filled from the remote on first access and by a background pull, and whose
//! writes are tracked and pushed back.
//!
//! [`Region::open`] maps anonymous memory, registers it with userfaultfd for missing-page (and
//! write-protect) faults and starts handler threads. The region's memory is the local cache of
//! the chunk pipeline: [`RegionCache`] is a [`Cache`](r3map_core::pipeline::Cache) whose fills
//! install missing pages with `UFFDIO_COPY` (never overwriting a present page), whose writes
//! replace the bytes, and which reports the pages the write tracking found written. The region
//! runs the same managed stack as the other frontends ([`Managed`](r3map_core::Managed): the
//! [`Synced`](r3map_core::Synced) layer with one pull per missing chunk and invalidation, a
//! [`Puller`](r3map_core::Puller) pulling in priority order with many bytes in flight, a
//! [`Pusher`](r3map_core::Pusher) with merged write-back) over it.
//!
//! - **Fault-around**: a fault fills its whole chunk (64 KiB by default) with one remote read.
//!   Faults that walk forward read ahead (up to [`RegionOptions::readahead`]); the faulting
//!   page of a random access is installed first, so its thread resumes before the rest of the
//!   chunk is in. Several handler threads serve faults at once; each polls briefly after a fault
//!   before it sleeps ([`RegionOptions::spin`]).
//! - **Writes** are tracked with userfaultfd write-protect ([`WriteTracking`]): pages are
//!   installed protected, the first write to each is recorded (by the kernel with `WP_ASYNC`,
//!   read back with `PAGEMAP_SCAN`), and [`Region::sync`] (or the background write-back) pushes
//!   the chunks of the written pages. [`Region::track`] / [`Region::dirty_pages`] and the
//!   [`Seeder`](r3map_core::Seeder) implementation report the pages written in an epoch, for
//!   migration; [`Region::invalidate`] drops chunks so they are fetched again.
//! - **Kernel-mode accesses** (a `read(2)` into the region, a `write(2)` from it) fault to the
//!   handlers too: the descriptor is created without `UFFD_USER_MODE_ONLY`
//!   ([`Region::read_from`], [`Region::write_to`]).
//! - **Access**: there is no `&[u8]` view, because other threads and the kernel change the bytes
//!   under it. Use [`Region::read`] / [`Region::write`] (volatile copies; the chunks they need
//!   are fetched first, so a failing remote is an error there), the byte and word accessors, or
//!   the raw [`Region::as_ptr`].
//!
//! # Failure policy
//! A handler that cannot fetch a faulting chunk retries it [`RegionOptions::fault_retries`]
//! times with doubling backoff, then poisons the page (`UFFDIO_POISON`): the access raises
//! SIGBUS rather than hanging forever, and nothing is presented as data that was not fetched.
//! A poisoned page stays poisoned until its chunk is fetched by another path (the background
//! pull, [`Region::read`]) or invalidated. Without the kernel's `POISON` feature the handler
//! retries forever. Failed pushes keep their chunks dirty (see the pusher).
//!
//! # Rules
//! - Never touch the region from a thread that serves its faults (a fault there could never be
//!   served). The handlers and the pull workers only issue ioctls; the pusher reads present
//!   pages only.
//! - Writes go through the mapping (tracked by write-protect) or through the pipeline
//!   ([`Region::write`], `Synced::write_at`: marked dirty directly). Both are pushed.
//! - `MADV_DONTNEED` by the application on the region discards the local data of those pages:
//!   the next access fetches them from the remote again.
//! - Closing or dropping the region stops the background pull, pushes what was written and
//!   flushes the remote, then stops the handlers and unmaps; the pointer dangles afterwards.
//!
//! It does not map files or shared memory (private anonymous memory only), does not use huge
//! pages, and does not serve minor faults.
//!
//! # Layout
//! - [`region`]: [`Region`], its options, errors and counters.
//! - [`cache`]: [`RegionCache`], the mapping as the pipeline's local backend.
//! - `handler`: the fault handler threads (fault-around, spinning, retries and poisoning).
//! - [`dirty`]: [`WriteTracking`] and the scan of written pages.
//! - [`external`]: a handler in another process, with the descriptor passed over a Unix
//!   socket (`SCM_RIGHTS`).

pub mod cache;
pub mod dirty;
pub mod external;
mod handler;
pub mod region;

pub use cache::RegionCache;
pub use dirty::WriteTracking;
pub use r3map_sys::uffd::Features;
pub use region::{Region, RegionError, RegionOptions, RegionStats};
