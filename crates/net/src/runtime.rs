//! Where the async work behind r3map's blocking APIs runs: a runtime the caller hands in, or one
//! runtime shared by the whole process.
//!
//! A [`Backend`](r3map_core::Backend) is blocking; the network clients and the stores under it
//! are async. [`Io`] is the bridge: it runs a future to completion from blocking code, on the
//! runtime whose [`Handle`] it holds. A library is given an `Io` (or takes [`Io::shared`]); it
//! never builds a runtime of its own, so a process has one set of I/O threads however many
//! clients and stores it opens, and an application with its own tokio runtime can have them run
//! there.
//!
//! [`Io::block_on`] may be called from any thread: a plain thread, a blocking task, or a worker
//! of a multi-threaded tokio runtime (the worker is handed over to blocking first, with
//! [`tokio::task::block_in_place`]). From inside a current-thread runtime it runs the future on a
//! helper thread, since that runtime cannot block its only thread.

use std::future::Future;
use std::sync::OnceLock;

use tokio::runtime::{Handle, Runtime, RuntimeFlavor};

/// I/O threads of the shared runtime: enough to keep a few connections busy, few enough not to
/// compete with the application on a small machine.
const SHARED_WORKERS: usize = 2;

/// An async runtime to run on. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Io {
    handle: Handle,
}

impl Io {
    /// The process's shared runtime, started on first use ([`SHARED_WORKERS`] threads named
    /// `r3map-io`) and kept until the process exits.
    ///
    /// # Panics
    /// When the runtime's threads cannot be started (the process is out of threads or memory).
    #[must_use]
    pub fn shared() -> Self {
        static SHARED: OnceLock<Runtime> = OnceLock::new();
        let runtime = SHARED.get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(SHARED_WORKERS)
                .thread_name("r3map-io")
                .enable_all()
                .build()
                .expect("starting r3map's shared I/O runtime")
        });
        Self { handle: runtime.handle().clone() }
    }

    /// The runtime of `handle` (an application's own).
    #[must_use]
    pub fn from_handle(handle: Handle) -> Self {
        Self { handle }
    }

    /// The runtime this runs on, to spawn tasks on.
    #[must_use]
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// Runs `future` to completion on this runtime and returns its output; the calling thread
    /// blocks meanwhile. See the module docs for where it may be called from.
    pub fn block_on<F>(&self, future: F) -> F::Output
    where
        F: Future + Send,
        F::Output: Send,
    {
        match Handle::try_current().map(|h| h.runtime_flavor()) {
            Err(_) => self.handle.block_on(future),
            Ok(RuntimeFlavor::CurrentThread) => std::thread::scope(|s| {
                s.spawn(|| self.handle.block_on(future))
                    .join()
                    .unwrap_or_else(|p| std::panic::resume_unwind(p))
            }),
            Ok(_) => tokio::task::block_in_place(|| self.handle.block_on(future)),
        }
    }
}

/// Runs `wait` (a blocking wait for an answer from the runtime: a channel, a condition) so that
/// it cannot starve the runtime: on a worker of a multi-threaded runtime, the worker is handed
/// over to blocking first ([`tokio::task::block_in_place`]); elsewhere `wait` just runs.
pub fn blocking<T>(wait: impl FnOnce() -> T) -> T {
    match Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(RuntimeFlavor::MultiThread) => tokio::task::block_in_place(wait),
        _ => wait(),
    }
}

impl Default for Io {
    /// [`Io::shared`].
    fn default() -> Self {
        Self::shared()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn answer() -> u32 {
        tokio::task::yield_now().await;
        42
    }

    #[test]
    fn runs_from_a_plain_thread_on_the_shared_runtime() {
        assert_eq!(Io::shared().block_on(answer()), 42);
        // The same runtime every time.
        let (a, b) = (Io::shared(), Io::shared());
        assert_eq!(a.handle().id(), b.handle().id());
    }

    #[test]
    fn the_future_may_borrow_from_the_caller() {
        let data = [1u8, 2, 3];
        let sum = Io::shared().block_on(async { data.iter().map(|&b| u32::from(b)).sum::<u32>() });
        assert_eq!(sum, 6);
    }

    #[test]
    fn runs_from_inside_a_multi_threaded_runtime() {
        let app = tokio::runtime::Builder::new_multi_thread().worker_threads(2).build().unwrap();
        let out =
            app.block_on(async { tokio::spawn(async { Io::shared().block_on(answer()) }).await.unwrap() });
        assert_eq!(out, 42);
    }

    #[test]
    fn runs_from_inside_a_current_thread_runtime() {
        let app = tokio::runtime::Builder::new_current_thread().build().unwrap();
        assert_eq!(app.block_on(async { Io::shared().block_on(answer()) }), 42);
    }

    #[test]
    fn a_worker_waiting_for_the_runtime_does_not_starve_it() {
        // One worker: a task that blocks it waiting for another task would wait forever.
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let got = rt.block_on(async {
            tokio::spawn(async {
                let (tx, rx) = std::sync::mpsc::channel();
                tokio::spawn(async move { tx.send(7).unwrap() });
                blocking(|| rx.recv().unwrap())
            })
            .await
            .unwrap()
        });
        assert_eq!(got, 7);
    }

    #[test]
    fn runs_on_a_handle_the_caller_gives() {
        let own = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let io = Io::from_handle(own.handle().clone());
        let id = io.block_on(async { Handle::current().id() });
        assert_eq!(id, own.handle().id());
    }
}
