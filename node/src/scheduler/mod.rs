//! Continuous batching. The engine is an actor on its own thread that owns
//! the batch; `Scheduler` is the cloneable handle callers use. Admission is
//! decided on the caller's side, under a small lock, so a full node answers
//! at once even while a step is running.

mod engine;
mod sequence;
mod stop;

use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use candle_transformers::generation::Sampling;
use tokio::sync::{mpsc::UnboundedReceiver, watch};

use crate::backend::Backend;
use crate::metrics::NodeMetrics;
use crate::text::TextCodec;
use engine::{Command, Engine};
pub use sequence::Reply;
use sequence::Sequence;

/// The node's capacity, fixed at start.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Sequences decoded together in one step.
    pub max_running: usize,
    /// Admitted requests waiting for a running slot.
    pub max_queued: usize,
    /// KV-cache tokens committed to admitted requests (prompt + max_tokens each).
    pub max_kv_tokens: usize,
    /// Prompt tokens prefilled per step, across all sequences, so running
    /// streams keep streaming while a long prompt is read.
    pub max_step_tokens: usize,
    pub context_length: usize,
}

/// A validated request, ready to run.
pub struct Request {
    /// The prompt, followed by the continuation tokens if any.
    pub prompt: Vec<u32>,
    /// How many trailing tokens of `prompt` were generated earlier (and count
    /// as completion tokens).
    pub continued: usize,
    /// Completion tokens in all, the continued ones included.
    pub max_tokens: usize,
    pub sampling: Sampling,
    pub seed: u64,
    pub stop: Vec<String>,
    /// 0 (low) to 2 (high); higher runs first.
    pub priority: usize,
    /// The request's span; the engine adds queue, prefill and decode spans under it.
    pub span: tracing::Span,
}

/// The load a node reports to its callers, for least-loaded routing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Load {
    pub running: usize,
    pub queued: usize,
    pub kv_free: usize,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AdmitError {
    #[error("node is draining; send new requests elsewhere")]
    Draining,
    #[error("node queue is full ({queued} requests waiting, limit {limit}); retry after {retry_after:?}")]
    QueueFull { queued: usize, limit: usize, retry_after: Duration },
    #[error(
        "node KV cache is full: request needs {need} tokens (prompt + max_tokens), {free} of {limit} free; retry after {retry_after:?}"
    )]
    KvFull { need: usize, free: usize, limit: usize, retry_after: Duration },
}

impl AdmitError {
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Draining => None,
            Self::QueueFull { retry_after, .. } | Self::KvFull { retry_after, .. } => Some(*retry_after),
        }
    }
}

#[derive(Debug)]
struct Accounting {
    /// Admitted and not yet finished (running + queued).
    admitted: usize,
    running: usize,
    kv_committed: usize,
    draining: bool,
    /// Decaying average of admission-to-finish time, for retry-after hints.
    ewma_service: Duration,
    next_id: u64,
}

struct Shared {
    limits: Limits,
    metrics: NodeMetrics,
    accounting: Mutex<Accounting>,
    /// Admitted count, watched by the drain.
    admitted: watch::Sender<usize>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Accounting> {
        self.accounting.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn load(&self, acc: &Accounting) -> Load {
        Load {
            running: acc.running,
            queued: acc.admitted - acc.running,
            kv_free: self.limits.max_kv_tokens - acc.kv_committed,
        }
    }

    /// How long until a slot is likely free: the queue ahead, served
    /// `max_running` at a time, at the recent average service time.
    fn retry_after(&self, acc: &Accounting) -> Duration {
        let waves = (acc.admitted - acc.running + 1) as f64 / self.limits.max_running as f64;
        acc.ewma_service.mul_f64(waves.max(0.1)).clamp(Duration::from_millis(50), Duration::from_secs(30))
    }

    /// Called by the engine when a sequence leaves (finished, failed or abandoned).
    /// `service` is its time in the running batch, if it got there.
    fn release(&self, seq: &Sequence, service: Option<Duration>) {
        let mut acc = self.lock();
        acc.admitted -= 1;
        acc.kv_committed -= seq.kv_need;
        if let Some(service) = service {
            acc.running -= 1;
            acc.ewma_service = acc.ewma_service.mul_f64(0.9) + service.mul_f64(0.1);
        }
        self.admitted.send_replace(acc.admitted);
    }

    fn mark_running(&self) {
        self.lock().running += 1;
    }

    /// Publishes the load gauges.
    fn export_load(&self) {
        let load = self.load(&self.lock());
        self.metrics.running.set(load.running as i64);
        self.metrics.queued.set(load.queued as i64);
        self.metrics.kv_tokens_free.set(load.kv_free as i64);
    }
}

#[derive(Clone)]
pub struct Scheduler {
    shared: Arc<Shared>,
    commands: mpsc::Sender<Command>,
    codec: Arc<dyn TextCodec>,
}

impl Scheduler {
    /// Starts the engine thread over `backend`.
    pub fn start(limits: Limits, backend: Box<dyn Backend>, codec: Arc<dyn TextCodec>, metrics: NodeMetrics) -> Self {
        let (tx, rx) = mpsc::channel();
        metrics.max_running.set(limits.max_running as i64);
        metrics.max_queued.set(limits.max_queued as i64);
        let shared = Arc::new(Shared {
            limits,
            metrics,
            accounting: Mutex::new(Accounting {
                admitted: 0,
                running: 0,
                kv_committed: 0,
                draining: false,
                ewma_service: Duration::from_secs(1),
                next_id: 0,
            }),
            admitted: watch::channel(0).0,
        });
        let engine = Engine::new(shared.clone(), backend, codec.clone(), rx);
        // The engine runs on a worker of its own compute pool, so the
        // parallel parts of each step run on the calling thread plus the
        // others, without waking and parking a foreign thread every time.
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("batch-engine-{i}"))
            .build()
            .expect("building the engine's thread pool");
        let pool = Arc::new(pool);
        let keep_alive = pool.clone();
        // The job owns the pool: it lives as long as the engine runs.
        pool.spawn(move || {
            engine.run();
            drop(keep_alive);
        });
        Self { shared, commands: tx, codec }
    }

    pub fn limits(&self) -> &Limits {
        &self.shared.limits
    }

    pub fn metrics(&self) -> &NodeMetrics {
        &self.shared.metrics
    }

    pub fn load(&self) -> Load {
        self.shared.load(&self.shared.lock())
    }

    /// Admits `req` or refuses it at once. On success returns the stream of
    /// replies and the load right after admission.
    pub fn submit(&self, req: Request) -> Result<(UnboundedReceiver<Reply>, Load), AdmitError> {
        let limits = &self.shared.limits;
        let need = req.prompt.len() + req.max_tokens - req.continued;
        let (id, load) = {
            let mut acc = self.shared.lock();
            if acc.draining {
                return Err(AdmitError::Draining);
            }
            let queued = acc.admitted - acc.running;
            if acc.admitted >= limits.max_running + limits.max_queued {
                let retry_after = self.shared.retry_after(&acc);
                return Err(AdmitError::QueueFull { queued, limit: limits.max_queued, retry_after });
            }
            let free = limits.max_kv_tokens - acc.kv_committed;
            if need > free {
                let retry_after = self.shared.retry_after(&acc);
                return Err(AdmitError::KvFull { need, free, limit: limits.max_kv_tokens, retry_after });
            }
            acc.admitted += 1;
            acc.kv_committed += need;
            acc.next_id += 1;
            self.shared.admitted.send_replace(acc.admitted);
            (acc.next_id, self.shared.load(&acc))
        };
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let seq = Sequence::new(id, req, tx, self.codec.as_ref());
        if let Err(mpsc::SendError(Command::Submit(seq))) = self.commands.send(Command::Submit(Box::new(seq))) {
            // The engine is gone (only after a fatal error): undo and refuse.
            self.shared.release(&seq, None);
            return Err(AdmitError::Draining);
        }
        Ok((rx, load))
    }

    /// Stops admitting: every later `submit` fails with `Draining`.
    pub fn drain(&self) {
        self.shared.lock().draining = true;
    }

    /// Resolves when no admitted request is left.
    pub async fn idle(&self) {
        let mut rx = self.shared.admitted.subscribe();
        let _ = rx.wait_for(|&n| n == 0).await;
    }

    /// Ends every stream now with finish reason CANCELLED.
    pub fn cancel_all(&self) {
        let _ = self.commands.send(Command::CancelAll);
    }
}
