//! One request's life inside the engine: its tokens, sampler, detokenizer,
//! stop matcher and the channel its caller reads.

use std::time::{Duration, Instant};

use candle_transformers::generation::{LogitsProcessor, Sampling};
use mesh_proto::v1::{FinishReason, GenerateResponse, Usage};
use tokio::sync::mpsc::UnboundedSender;
use tonic::Status;

use super::isolate::Next;
use super::prefix::{BLOCK_TOKENS, Namer, SeqBlocks};
use super::{Request, stop::StopMatcher};
use crate::metrics::NodeMetrics;
use crate::text::{IncrementalDecoder, TextCodec};

pub type Reply = Result<GenerateResponse, Status>;

/// What admission decided for a request.
pub struct Admitted {
    pub id: u64,
    pub kv_private: usize,
    pub blocks: SeqBlocks,
    /// How long it may wait for its prompt to start being read.
    pub wait_bound: Duration,
}

pub struct Sequence {
    pub id: u64,
    pub priority: usize,
    /// Positions its cache holds at most (prompt + max_tokens).
    pub capacity: usize,
    /// KV tokens committed to it alone: `capacity` less the blocks it holds
    /// in the prefix cache (counted there once).
    pub kv_private: usize,
    pub blocks: SeqBlocks,
    /// Prompt, then every sampled token.
    tokens: Vec<u32>,
    /// Tokens fed before sampling starts: the prompt and any continuation.
    prompt_len: usize,
    /// Tokens generated elsewhere before this sequence took over.
    continued: usize,
    /// Tokens already in the KV cache.
    prefilled: usize,
    max_tokens: usize,
    sampler: LogitsProcessor,
    /// Samples by argmax (temperature 0).
    pub greedy: bool,
    decoder: IncrementalDecoder,
    stop: StopMatcher,
    tx: UnboundedSender<Reply>,
    admitted_at: Instant,
    /// How long it may wait for its prompt to start being read before it
    /// is ended with a refusal.
    wait_bound: Duration,
    started_at: Option<Instant>,
    first_token_at: Option<Instant>,
    last_token_at: Option<Instant>,
    /// The span of the current phase (queue, then prefill, then decode)
    /// and the request's span above it. Declared in this order so the
    /// phase ends first when a sequence is dropped.
    phase: tracing::Span,
    span: tracing::Span,
}

impl Sequence {
    /// `blocks`: what admission found in the prefix cache; `kv_private` the
    /// tokens it committed.
    pub fn new(admitted: Admitted, req: Request, tx: UnboundedSender<Reply>, codec: &dyn TextCodec) -> Self {
        let prompt_len = req.prompt.len();
        let decoder = IncrementalDecoder::resume(codec, &req.prompt[prompt_len - req.continued..]);
        Self {
            id: admitted.id,
            priority: req.priority,
            capacity: prompt_len + req.max_tokens - req.continued,
            kv_private: admitted.kv_private,
            prefilled: admitted.blocks.reuse.len() * BLOCK_TOKENS,
            blocks: admitted.blocks,
            tokens: req.prompt,
            prompt_len,
            continued: req.continued,
            max_tokens: req.max_tokens,
            greedy: matches!(req.sampling, Sampling::ArgMax),
            sampler: LogitsProcessor::from_sampling(req.seed, req.sampling),
            decoder,
            stop: StopMatcher::new(req.stop),
            tx,
            admitted_at: Instant::now(),
            wait_bound: admitted.wait_bound,
            started_at: None,
            first_token_at: None,
            last_token_at: None,
            phase: tracing::info_span!(parent: &req.span, "node.queue"),
            span: req.span,
        }
    }

    /// The caller went away (cancelled or disconnected).
    pub fn is_abandoned(&self) -> bool {
        self.tx.is_closed()
    }

    /// Not one prompt token read yet, and past its queue-wait bound: how
    /// long it waited, and the bound it had.
    pub fn overdue(&self, now: Instant) -> Option<(Duration, Duration)> {
        let waited = now.saturating_duration_since(self.admitted_at);
        let unread = self.prefilled == self.blocks.reuse.len() * BLOCK_TOKENS;
        (unread && waited >= self.wait_bound).then_some((waited, self.wait_bound))
    }

    /// Prompt tokens not yet fed to the model.
    pub fn unfed_prompt(&self) -> usize {
        self.prompt_len.saturating_sub(self.prefilled)
    }

    pub fn start(&mut self) {
        self.started_at = Some(Instant::now());
        self.phase = tracing::info_span!(parent: &self.span, "node.prefill", prompt_tokens = self.prompt_len);
    }

    /// Whether the sequence is past its prompt (feeds one token per step).
    pub fn is_decoding(&self) -> bool {
        self.prefilled >= self.prompt_len
    }

    /// Length of the caller's own prompt (without continuation tokens).
    pub fn original_prompt_len(&self) -> usize {
        self.prompt_len - self.continued
    }

    /// Tokens not yet in the cache: the prompt's unread part, or while
    /// decoding the last token sampled.
    pub fn unread(&self) -> usize {
        self.tokens.len() - self.prefilled
    }

    /// Tokens not yet in the cache, at most `budget` of them, and whether
    /// they reach the end (so the step must produce this sequence's logits).
    pub fn next_chunk(&self, budget: usize) -> (&[u32], usize, bool) {
        let end = self.tokens.len().min(self.prefilled + budget);
        (&self.tokens[self.prefilled..end], self.prefilled, end == self.tokens.len())
    }

    pub fn advance(&mut self, fed: usize) {
        self.prefilled += fed;
    }

    /// The blocks completed in the cache since the last call, with their
    /// names, for the prefix cache; marks them settled.
    pub fn completed_blocks(&mut self, namer: &Namer) -> Vec<(usize, u64)> {
        let b = &mut self.blocks;
        namer.extend(&mut b.chain, &self.tokens[..self.prefilled]);
        let done = self.prefilled / BLOCK_TOKENS;
        let new = (b.settled..done).map(|i| (i, b.chain[i])).collect();
        b.settled = b.settled.max(done);
        new
    }

    /// Prompt tokens served from the prefix cache.
    fn cached_prompt_tokens(&self) -> usize {
        (self.blocks.reuse.len() * BLOCK_TOKENS).min(self.original_prompt_len())
    }

    /// Samples the next token (or takes the device's greedy pick) and
    /// streams what it completes. Returns the finish reason when the
    /// sequence is done.
    pub fn sample(
        &mut self,
        next: &Next,
        codec: &dyn TextCodec,
        context_length: usize,
        metrics: &NodeMetrics,
    ) -> Result<Option<FinishReason>, String> {
        let token = match next {
            Next::Logits(logits) => self.sampler.sample(logits).map_err(|e| e.to_string())?,
            Next::Token(token) => *token,
        };
        let now = Instant::now();
        match self.last_token_at.replace(now) {
            Some(prev) => metrics.inter_token.observe(now.duration_since(prev).as_secs_f64()),
            None => {
                self.first_token_at = Some(now);
                metrics.time_to_first_token.observe(now.duration_since(self.admitted_at).as_secs_f64());
                self.phase = tracing::info_span!(
                    parent: &self.span,
                    "node.decode",
                    completion_tokens = tracing::field::Empty,
                    finish_reason = tracing::field::Empty
                );
            }
        }
        metrics.generated_tokens.inc();
        self.tokens.push(token);
        if codec.eos_ids().contains(&token) {
            return Ok(Some(FinishReason::Stop));
        }
        let delta = self.decoder.push(codec, token).map_err(|e| e.to_string())?;
        let (text, stopped) = self.stop.push(&delta);
        self.send(GenerateResponse { text, token_ids: vec![token], ..Default::default() });
        if stopped {
            Ok(Some(FinishReason::Stop))
        } else if self.generated() >= self.max_tokens || self.tokens.len() >= context_length {
            Ok(Some(FinishReason::Length))
        } else {
            Ok(None)
        }
    }

    /// Completion tokens so far, the continued ones included.
    fn generated(&self) -> usize {
        self.tokens.len() - self.original_prompt_len()
    }

    /// Sends the last message: held-back text, finish reason and usage.
    pub fn finish(mut self, reason: FinishReason) {
        let micros = |t: Option<Instant>| t.map_or(0, |t| t.duration_since(self.admitted_at).as_micros() as u64);
        let usage = Usage {
            prompt_tokens: self.original_prompt_len() as u32,
            completion_tokens: self.generated() as u32,
            queue_time_us: micros(self.started_at),
            time_to_first_token_us: micros(self.first_token_at),
            cached_prompt_tokens: self.cached_prompt_tokens() as u32,
        };
        // Empty after a stop-string match; otherwise text held back as a
        // possible stop-string start that never completed.
        let text = self.stop.flush();
        self.phase.record("completion_tokens", usage.completion_tokens);
        self.phase.record("finish_reason", reason.as_str_name());
        self.phase = tracing::Span::none(); // decoding is over before the last message goes out
        self.send(GenerateResponse {
            text,
            token_ids: Vec::new(),
            finish_reason: reason.into(),
            usage: Some(usage),
            ..Default::default()
        });
    }

    pub fn fail(self, status: Status) {
        telemetry::propagation::record_status(&self.span, &status);
        let _ = self.tx.send(Err(status));
    }

    /// A failed send means the caller left; the next reap removes the sequence.
    fn send(&self, msg: GenerateResponse) {
        let _ = self.tx.send(Ok(msg));
    }
}
