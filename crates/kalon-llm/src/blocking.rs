//! Async LLM work for synchronous callers (D_po construction, the trainer):
//! a small runtime of its own, on which futures run while the caller's
//! thread waits. Safe to use from a thread that is itself inside another
//! runtime's `spawn_blocking`.

use std::future::Future;

pub struct Blocking {
    runtime: tokio::runtime::Runtime,
}

impl Blocking {
    pub fn new(name: &str) -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(name)
            .enable_all()
            .build()?;
        Ok(Blocking { runtime })
    }

    /// Runs `future` on this runtime and waits for its output.
    pub fn run<F>(&self, future: F) -> anyhow::Result<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let task = self.runtime.spawn(future);
        Ok(futures::executor::block_on(task)?)
    }

    /// For tasks that outlive one call (a server the runtime keeps serving).
    pub fn handle(&self) -> &tokio::runtime::Handle {
        self.runtime.handle()
    }
}
