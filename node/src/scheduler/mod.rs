//! Continuous batching. The engine is an actor on its own thread that owns
//! the batch; `Scheduler` is the cloneable handle callers use. Admission is
//! decided on the caller's side, under a small lock, so a full node answers
//! at once even while a step is running.

mod allot;
mod engine;
mod isolate;
mod prefix;
mod refusal;
mod sequence;
mod stop;
mod wait;

use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use candle_transformers::generation::Sampling;
use tokio::sync::{mpsc::UnboundedReceiver, watch};

use crate::backend::Backend;
use crate::metrics::NodeMetrics;
use crate::text::TextCodec;
use engine::{Command, Engine};
use prefix::{BLOCK_TOKENS, Namer, PrefixIndex, SeqBlocks};
pub use refusal::AdmitError;
pub use sequence::Reply;
use sequence::{Admitted, Sequence};
use wait::{Backlog, Pace};

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
    /// Longest a request may wait before its prompt starts being read: one
    /// that would wait longer is refused at admission, one that has waited
    /// this long is ended, both with RESOURCE_EXHAUSTED and a retry-after.
    pub max_queue_wait: Duration,
    /// Keep computed prompt blocks for later requests (`prefix`), where the
    /// backend can.
    pub prefix_cache: bool,
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
    /// When the caller stops waiting (its gRPC deadline), if it said: the
    /// queue-wait bound is the sooner of this and `max_queue_wait`.
    pub deadline: Option<Instant>,
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

#[derive(Debug)]
struct Accounting {
    /// Admitted and not yet finished (running + queued).
    admitted: usize,
    running: usize,
    /// KV tokens committed to admitted requests alone; the prefix cache's
    /// blocks count in `prefix`.
    kv_committed: usize,
    prefix: PrefixIndex,
    /// Prompt tokens of admitted requests not yet fed to the model.
    prefill_backlog: usize,
    draining: bool,
    pace: Pace,
    next_id: u64,
}

struct Shared {
    limits: Limits,
    metrics: NodeMetrics,
    accounting: Mutex<Accounting>,
    /// Whether the prefix cache is on (`Limits::prefix_cache` and a
    /// backend that can keep blocks); `namer` names blocks for it.
    caching: bool,
    namer: Namer,
    /// Admitted count, watched by the drain.
    admitted: watch::Sender<usize>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Accounting> {
        self.accounting.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn load(&self, acc: &Accounting) -> Load {
        Load { running: acc.running, queued: acc.admitted - acc.running, kv_free: self.kv_free(acc) }
    }

    /// KV tokens free for a new request: idle cached blocks count as free.
    fn kv_free(&self, acc: &Accounting) -> usize {
        self.limits.max_kv_tokens.saturating_sub(acc.kv_committed + acc.prefix.held_tokens())
    }

    /// How long until a slot is likely free: the queue ahead, served
    /// `max_running` at a time, at the recent average service time.
    fn retry_after(&self, acc: &Accounting) -> Duration {
        let waves = (acc.admitted - acc.running + 1) as f64 / self.limits.max_running as f64;
        let (lo, hi) = wait::RETRY_AFTER_RANGE;
        acc.pace.service.mul_f64(waves.max(0.1)).clamp(lo, hi)
    }

    /// The expected wait of a request admitted now (see `wait::expected`).
    fn expected_wait(&self, acc: &Accounting) -> Duration {
        let backlog = Backlog {
            queued: acc.admitted - acc.running,
            free_slots: self.limits.max_running.saturating_sub(acc.running),
            prefill_tokens: acc.prefill_backlog,
        };
        wait::expected(backlog, acc.pace, &self.limits)
    }

    /// The refusal of a request that waited `waited` against `bound` without starting.
    fn waited_too_long(&self, waited: Duration, bound: Duration) -> tonic::Status {
        let acc = self.lock();
        let retry_after = wait::retry_after(self.expected_wait(&acc), self.limits.max_queue_wait);
        AdmitError::Waited { waited, bound, retry_after }.status(self.load(&acc))
    }

    /// Called by the engine after each step: `prefilled` prompt tokens were
    /// read, `interval` after the step before (if the engine was busy since).
    fn stepped(&self, prefilled: usize, interval: Option<Duration>) {
        let mut acc = self.lock();
        acc.prefill_backlog -= prefilled;
        if let Some(interval) = interval {
            acc.pace.observe_step(interval);
        }
    }

    /// Whether a request needing `need` KV tokens, that may wait `bound`
    /// before its prompt is read, fits now.
    fn check(&self, acc: &Accounting, need: usize, bound: Duration) -> Result<(), AdmitError> {
        let limits = &self.limits;
        if acc.draining {
            return Err(AdmitError::Draining);
        }
        if acc.admitted >= limits.max_running + limits.max_queued {
            let queued = acc.admitted - acc.running;
            return Err(AdmitError::QueueFull { queued, limit: limits.max_queued, retry_after: self.retry_after(acc) });
        }
        let free = self.kv_free(acc);
        if need > free {
            let retry_after = self.retry_after(acc);
            return Err(AdmitError::KvFull { need, free, limit: limits.max_kv_tokens, retry_after });
        }
        let wait = self.expected_wait(acc);
        if wait > bound {
            return Err(AdmitError::WouldWait { wait, bound, retry_after: wait::retry_after(wait, bound) });
        }
        Ok(())
    }

    /// Called by the engine when a sequence leaves (finished, failed or abandoned).
    /// `service` is its time in the running batch, if it got there.
    fn release(&self, seq: &Sequence, service: Option<Duration>) {
        let mut acc = self.lock();
        acc.admitted -= 1;
        acc.kv_committed -= seq.kv_private;
        acc.prefix.release(&seq.blocks.held);
        acc.prefill_backlog -= seq.unfed_prompt();
        if let Some(service) = service {
            acc.running -= 1;
            acc.pace.service = acc.pace.service.mul_f64(0.9) + service.mul_f64(0.1);
        }
        self.admitted.send_replace(acc.admitted);
    }

    /// Admission under the lock: the cached blocks `req` starts with (all
    /// but its last prompt token may come from the cache), then the check
    /// and the commitment of the rest.
    fn admit(&self, req: &Request, mut blocks: SeqBlocks, bound: Duration) -> Result<(Admitted, Load), AdmitError> {
        let need = req.prompt.len() + req.max_tokens - req.continued;
        let reusable = blocks.chain.len().min(req.prompt.len().saturating_sub(1) / BLOCK_TOKENS);
        let mut acc = self.lock();
        let (hits, idle) = acc.prefix.probe(&blocks.chain[..reusable]);
        let kv_private = need - hits * BLOCK_TOKENS;
        self.check(&acc, kv_private + idle, bound)?;
        blocks.reuse = acc.prefix.take(&blocks.chain[..hits]);
        blocks.held = blocks.chain[..hits].to_vec();
        blocks.settled = hits;
        let outside = self.limits.max_kv_tokens - acc.kv_committed - acc.prefix.cached_tokens();
        let evicted = acc.prefix.make_room(kv_private, outside);
        acc.admitted += 1;
        acc.kv_committed += kv_private;
        acc.prefill_backlog += req.prompt.len() - hits * BLOCK_TOKENS;
        acc.next_id += 1;
        self.admitted.send_replace(acc.admitted);
        self.metrics.prefix_counted(hits * BLOCK_TOKENS, req.prompt.len(), evicted);
        let admitted = Admitted { id: acc.next_id, kv_private, blocks, wait_bound: bound };
        Ok((admitted, self.load(&acc)))
    }

    fn mark_running(&self) {
        self.lock().running += 1;
    }

    /// Publishes the load gauges.
    fn export_load(&self) {
        let (load, cached) = {
            let acc = self.lock();
            (self.load(&acc), acc.prefix.cached_tokens())
        };
        self.metrics.running.set(load.running as i64);
        self.metrics.queued.set(load.queued as i64);
        self.metrics.kv_tokens_free.set(load.kv_free as i64);
        self.metrics.prefix_blocks.set((cached / BLOCK_TOKENS) as i64);
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
        let caching = limits.prefix_cache && backend.caches_prefixes();
        tracing::info!(prefix_cache = caching, block_tokens = BLOCK_TOKENS, "prefix cache");
        metrics.max_running.set(limits.max_running as i64);
        metrics.max_queued.set(limits.max_queued as i64);
        let shared = Arc::new(Shared {
            limits,
            metrics,
            accounting: Mutex::new(Accounting {
                admitted: 0,
                running: 0,
                kv_committed: 0,
                prefix: PrefixIndex::new(caching),
                prefill_backlog: 0,
                draining: false,
                // A second per stream until measured: a guess that refuses
                // little (the wait bound ends what it lets in wrongly).
                pace: Pace { step: None, service: Duration::from_secs(1) },
                next_id: 0,
            }),
            admitted: watch::channel(0).0,
            caching,
            namer: Namer::default(),
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
        let now = Instant::now();
        let max_wait = self.shared.limits.max_queue_wait;
        let wait_bound = req.deadline.map_or(max_wait, |d| max_wait.min(d.saturating_duration_since(now)));
        let mut blocks = SeqBlocks::default();
        if self.shared.caching {
            self.shared.namer.extend(&mut blocks.chain, &req.prompt);
        }
        let (admitted, load) = self.shared.admit(&req, blocks, wait_bound)?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let seq = Sequence::new(admitted, req, tx, self.codec.as_ref());
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
