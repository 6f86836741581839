//! Thread-per-core: one OS thread per core, each running its own tokio
//! current-thread runtime. Every listener has one SO_REUSEPORT socket per
//! core, so the kernel spreads new connections over the cores and a
//! connection lives its whole life on the core that accepted it: no work
//! stealing, no cross-core wakeups, per-core upstream connection pools.
//!
//! Why not tokio's multi-thread runtime: its work stealing moves tasks (and
//! their cache lines) between cores and its shared injection queue is a
//! contended lock under accept storms; a proxy's connections are independent,
//! so nothing is gained by balancing them after accept.

use std::sync::mpsc;
use std::thread::JoinHandle;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error("Cannot build the runtime of core thread {name}")]
    Runtime {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot spawn core thread {name}")]
    Spawn {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("Core thread {name} exited during start-up")]
    Exited { name: String },
}

/// One core thread; stopped and joined on drop (its tasks are dropped, which
/// closes their connections).
pub struct Core {
    pub handle: Handle,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Core {
    /// Starts thread `name`, pinned to CPU `pin` if given.
    pub fn start(name: String, pin: Option<usize>) -> Result<Core, CoreError> {
        let (handle_tx, handle_rx) = mpsc::channel();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let thread_name = name.clone();
        let thread = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                if let Some(cpu) = pin {
                    pin_to_cpu(cpu);
                }
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|source| CoreError::Runtime {
                        name: thread_name,
                        source,
                    });
                match rt {
                    Ok(rt) => {
                        let _ = handle_tx.send(Ok(rt.handle().clone()));
                        rt.block_on(async {
                            let _ = stop_rx.await;
                        });
                    }
                    Err(e) => {
                        let _ = handle_tx.send(Err(e));
                    }
                }
            })
            .map_err(|source| CoreError::Spawn {
                name: name.clone(),
                source,
            })?;
        let handle = handle_rx.recv().map_err(|_| CoreError::Exited { name })??;
        Ok(Core {
            handle,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }
}

impl Drop for Core {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn pin_to_cpu(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; CPU_ZERO/CPU_SET write inside it and
    // sched_setaffinity(0, ..) only reads it for the calling thread.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc != 0 {
        tracing::warn!(cpu, error = %std::io::Error::last_os_error(), "cannot pin core thread");
    }
}
