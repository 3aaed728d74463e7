//! A fixed set of worker threads running boxed jobs from one queue, so a judge can keep many
//! blocking requests in flight and callers can hand work over without waiting for it.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread;

type Job = Box<dyn FnOnce() + Send + 'static>;

pub struct Pool {
    tx: Option<Sender<Job>>,
    threads: usize,
}

impl Pool {
    /// `threads` workers (at least one). They end when the pool is dropped and the queue is
    /// empty; a job still running then finishes on its own (the pool does not wait for it).
    /// A thread the system refuses (e.g. a huge `concurrency`) is an error, not a panic.
    pub fn new(threads: usize, name: &str) -> anyhow::Result<Pool> {
        let threads = threads.max(1);
        let (tx, rx) = channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads {
            let rx: Arc<Mutex<Receiver<Job>>> = rx.clone();
            thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || loop {
                    // The lock is held only while taking a job, never while running it.
                    let job = match rx.lock() {
                        Ok(r) => r.recv(),
                        Err(_) => return,
                    };
                    match job {
                        // A panicking job must not take its worker with it; its result channel
                        // closes, which the waiter reads as a failure.
                        Ok(job) => {
                            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                        }
                        Err(_) => return,
                    }
                })
                .map_err(|e| {
                    anyhow::anyhow!("starting {name} worker thread {} of {threads}: {e} (lower the concurrency)", i + 1)
                })?;
        }
        Ok(Pool { tx: Some(tx), threads })
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Queues `job`; it runs on the first free worker.
    pub fn spawn(&self, job: impl FnOnce() + Send + 'static) {
        if let Some(tx) = &self.tx {
            // Send fails only when every worker has ended, which only dropping the pool does.
            let _ = tx.send(Box::new(job));
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.tx.take();
    }
}
