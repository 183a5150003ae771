//! The batching loop. Between steps it takes new requests, drops abandoned
//! ones and fills free slots by priority; each step feeds every running
//! sequence one token (or a prefill chunk under the step's token budget).

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::time::Instant;

use mesh_proto::v1::FinishReason;
use tonic::Status;

use super::allot::{Want, allot};
use super::prefix::BLOCK_TOKENS;
use super::{Sequence, Shared, isolate};
use crate::backend::{Backend, SeqStep};
use crate::text::TextCodec;

pub enum Command {
    Submit(Box<Sequence>),
    CancelAll,
}

/// Priority levels, low to high (see `Request::priority`).
const PRIORITIES: usize = 3;

pub struct Engine {
    shared: Arc<Shared>,
    backend: Box<dyn Backend>,
    codec: Arc<dyn TextCodec>,
    commands: Receiver<Command>,
    /// One FIFO per priority; the highest non-empty one is served first.
    waiting: [VecDeque<Box<Sequence>>; PRIORITIES],
    running: Vec<(Box<Sequence>, Instant)>,
    /// When the last step ended, while the engine has been busy since: the
    /// pace is the interval between step ends (the loop, the step and any
    /// pacing inside it), not counting a first step after idling.
    last_step: Option<Instant>,
}

impl Engine {
    pub fn new(
        shared: Arc<Shared>,
        backend: Box<dyn Backend>,
        codec: Arc<dyn TextCodec>,
        commands: Receiver<Command>,
    ) -> Self {
        Self { shared, backend, codec, commands, waiting: Default::default(), running: Vec::new(), last_step: None }
    }

    pub fn run(mut self) {
        loop {
            let idle = self.running.is_empty() && self.waiting.iter().all(VecDeque::is_empty);
            if idle {
                self.last_step = None;
                match self.commands.recv() {
                    Ok(cmd) => self.handle(cmd),
                    Err(_) => return,
                }
            }
            loop {
                match self.commands.try_recv() {
                    Ok(cmd) => self.handle(cmd),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) if self.running.is_empty() => return,
                    Err(TryRecvError::Disconnected) => break,
                }
            }
            self.reap();
            self.fill_slots();
            if !self.running.is_empty() {
                self.step();
            }
            self.shared.export_load();
        }
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Submit(seq) => {
                let p = seq.priority.min(PRIORITIES - 1);
                self.waiting[p].push_back(seq);
            }
            Command::CancelAll => {
                for (seq, started) in std::mem::take(&mut self.running) {
                    self.shared.metrics.count(tonic::Code::Ok);
                    self.leave(seq, Some(started), |s| s.finish(FinishReason::Cancelled));
                }
                for queue in std::mem::take(&mut self.waiting) {
                    for seq in queue {
                        self.shared.metrics.count(tonic::Code::Ok);
                        self.leave(seq, None, |s| s.finish(FinishReason::Cancelled));
                    }
                }
            }
        }
    }

    /// Before each step: a caller that disconnected frees its slot, and a
    /// sequence past its queue-wait bound without a prompt token read is
    /// refused (RESOURCE_EXHAUSTED, retry-after) rather than left to wait
    /// until its caller gives up. The check runs between steps, so a bound
    /// is kept to within one step.
    fn reap(&mut self) {
        let now = Instant::now();
        let doomed = |s: &Sequence| s.is_abandoned() || s.overdue(now).is_some();
        let (gone, kept): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.running).into_iter().partition(|(s, _)| doomed(s));
        self.running = kept;
        for (seq, started) in gone {
            self.end_early(seq, Some(started), now);
        }
        for p in 0..PRIORITIES {
            let (gone, kept): (VecDeque<_>, VecDeque<_>) =
                std::mem::take(&mut self.waiting[p]).into_iter().partition(|s| doomed(s));
            self.waiting[p] = kept;
            for seq in gone {
                self.end_early(seq, None, now);
            }
        }
    }

    /// Ends an abandoned or overdue sequence.
    fn end_early(&mut self, seq: Box<Sequence>, started: Option<Instant>, now: Instant) {
        match seq.overdue(now) {
            Some((waited, bound)) if !seq.is_abandoned() => {
                self.shared.metrics.count(tonic::Code::ResourceExhausted);
                let status = self.shared.waited_too_long(waited, bound);
                self.leave(seq, started, |s| s.fail(status));
            }
            _ => {
                self.shared.metrics.count(tonic::Code::Cancelled);
                self.leave(seq, started, drop);
            }
        }
    }

    fn fill_slots(&mut self) {
        while self.running.len() < self.shared.limits.max_running {
            let Some(mut seq) = self.waiting.iter_mut().rev().find_map(VecDeque::pop_front) else {
                break;
            };
            seq.start();
            self.shared.mark_running();
            self.running.push((seq, Instant::now()));
        }
    }

    fn step(&mut self) {
        let evicted = self.shared.lock().prefix.take_evicted();
        if !evicted.is_empty() {
            self.backend.forget(&evicted);
        }
        let wants: Vec<Want> = self
            .running
            .iter()
            .map(|(seq, joined)| Want { decoding: seq.is_decoding(), unread: seq.unread(), joined: *joined })
            .collect();
        // Per step: (running index, tokens fed, whether they are prompt tokens).
        let mut fed = Vec::with_capacity(wants.len());
        let mut steps = Vec::with_capacity(wants.len());
        for (i, take) in allot(&wants, self.shared.limits.max_step_tokens) {
            let seq = &self.running[i].0;
            let (tokens, start_pos, want_logits) = seq.next_chunk(take);
            fed.push((i, tokens.len(), !seq.is_decoding()));
            steps.push(SeqStep {
                id: seq.id,
                tokens,
                start_pos,
                want_logits,
                capacity: seq.capacity,
                prompt_len: seq.original_prompt_len(),
                greedy: seq.greedy,
                reuse: &seq.blocks.reuse,
            });
        }
        self.shared.metrics.batch_size.observe(steps.len() as f64);
        let outcomes = isolate::run(self.backend.as_mut(), &steps, &self.shared.metrics);
        let ended = Instant::now();
        let interval = self.last_step.replace(ended).map(|prev| ended - prev);
        drop(steps);
        // Before the sequences advance, so a backlog count never goes below
        // zero; a failed sequence's chunk was not read (it leaves unfed).
        let prefilled = fed.iter().zip(&outcomes).filter(|((_, _, p), o)| *p && o.is_ok()).map(|((_, n, _), _)| n);
        self.shared.stepped(prefilled.sum(), interval);
        let mut finished = Vec::new();
        for ((i, n, _), outcome) in fed.into_iter().zip(outcomes) {
            let row = match outcome {
                Err(e) => {
                    finished.push((i, Err(format!("engine step failed: {e}"))));
                    continue;
                }
                Ok(row) => row,
            };
            self.running[i].0.advance(n);
            self.publish(i);
            let Some(row) = row else { continue };
            let seq = &mut self.running[i].0;
            let (codec, metrics, context) =
                (self.codec.as_ref(), &self.shared.metrics, self.shared.limits.context_length);
            match isolate::catch(|| seq.sample(&row, codec, context, metrics)) {
                Ok(None) => {}
                Ok(Some(reason)) => finished.push((i, Ok(reason))),
                Err(e) => finished.push((i, Err(format!("sampling failed: {e}")))),
            }
        }
        self.retire(finished);
    }

    /// Offers the prefix cache the blocks running sequence `i` completed in
    /// this step: each one the cache takes moves from the sequence's own KV
    /// commitment to the cache's.
    fn publish(&mut self, i: usize) {
        if !self.shared.caching {
            return;
        }
        let seq = &mut self.running[i].0;
        let completed = seq.completed_blocks(&self.shared.namer);
        if completed.is_empty() {
            return;
        }
        let mut acc = self.shared.lock();
        for (block, name) in completed {
            let Some(slot) = acc.prefix.publish(name) else { continue };
            if !self.backend.publish(seq.id, block, slot) {
                acc.prefix.withdraw(name);
                continue;
            }
            seq.blocks.held.push(name);
            seq.kv_private -= BLOCK_TOKENS;
            acc.kv_committed -= BLOCK_TOKENS;
        }
    }

    /// Takes the sequences that ended in a step out of the batch: `finished`
    /// holds their running indexes and how they ended.
    fn retire(&mut self, mut finished: Vec<(usize, Result<FinishReason, String>)>) {
        finished.sort_by_key(|(i, _)| std::cmp::Reverse(*i));
        for (i, outcome) in finished {
            let (seq, started) = self.running.swap_remove(i);
            match outcome {
                Ok(reason) => {
                    self.shared.metrics.count(tonic::Code::Ok);
                    self.leave(seq, Some(started), |s| s.finish(reason))
                }
                Err(e) => {
                    self.shared.metrics.count(tonic::Code::Internal);
                    self.leave(seq, Some(started), |s| s.fail(request_fault(e)))
                }
            }
        }
    }

    /// Takes a sequence out for good: frees its cache and its admission
    /// accounting, then lets `last_words` send its final message.
    /// `started` is when it joined the running batch, if it did.
    fn leave(&mut self, seq: Box<Sequence>, started: Option<Instant>, last_words: impl FnOnce(Sequence)) {
        self.backend.release(seq.id);
        self.shared.release(&seq, started.map(|s| s.elapsed()));
        last_words(*seq);
    }
}

/// INTERNAL, marked as this request's own fault (`REQUEST_FAULT`): its step
/// failed when run alone, so another instance would fail it too.
fn request_fault(message: String) -> Status {
    let mut status = Status::internal(message);
    status.metadata_mut().insert(mesh_proto::metadata::REQUEST_FAULT, tonic::metadata::MetadataValue::from_static("1"));
    status
}
