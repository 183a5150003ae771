//! A stand-in model: deterministic words at a set rate, no weights, so the
//! mesh can be load-tested with thousands of streams on one machine.
//!
//! Every step takes `1 / tokens_per_sec` whatever the batch size (as a
//! batched GPU decode roughly does), and each sequence's next word depends
//! only on its prompt and position, so a stream continued elsewhere from
//! its first tokens goes on exactly as it would have.
//!
//! For fault-isolation tests only, it can be told to panic in any step that
//! reads a prompt containing a marker (`--synthetic-panic-marker`).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};

use super::{Backend, SeqStep};
use crate::text::synthetic_words;

pub struct SyntheticBackend {
    step_time: Duration,
    next_step_at: Instant,
    /// Per sequence: a hash of its prompt.
    seeds: HashMap<u64, u64>,
    /// Token ids whose appearance in a prompt chunk makes the step panic.
    panic_marker: Vec<u32>,
}

impl SyntheticBackend {
    /// `panic_marker`: the word ids of the test marker (empty: never panic).
    pub fn new(tokens_per_sec: f64, panic_marker: Vec<u32>) -> Self {
        Self {
            step_time: Duration::from_secs_f64(1.0 / tokens_per_sec),
            next_step_at: Instant::now(),
            seeds: HashMap::new(),
            panic_marker,
        }
    }

    /// Panics if a prompt chunk of `seqs` holds the marker, before anything
    /// changes: as the backend contract asks, a failed step advances nothing.
    fn panic_on_marker(&self, seqs: &[SeqStep<'_>]) {
        let n = self.panic_marker.len();
        let poisoned = |s: &SeqStep<'_>| {
            let prompt = &s.tokens[..s.prompt_len.saturating_sub(s.start_pos).min(s.tokens.len())];
            n > 0 && prompt.windows(n).any(|w| w == self.panic_marker)
        };
        if let Some(s) = seqs.iter().find(|s| poisoned(s)) {
            panic!("synthetic backend: sequence {} holds the test panic marker", s.id);
        }
    }
}

impl Backend for SyntheticBackend {
    fn step(&mut self, seqs: &[SeqStep<'_>]) -> Result<Option<Tensor>, String> {
        let now = Instant::now();
        if self.next_step_at > now {
            std::thread::sleep(self.next_step_at - now);
        }
        self.next_step_at = Instant::now().max(self.next_step_at) + self.step_time;
        self.panic_on_marker(seqs);
        let vocab = synthetic_words::VOCAB;
        let mut logits = Vec::new();
        for s in seqs {
            let seed = self.seeds.entry(s.id).or_insert(0x9e37_79b9_7f4a_7c15);
            let prompt_part = s.prompt_len.saturating_sub(s.start_pos).min(s.tokens.len());
            for &t in &s.tokens[..prompt_part] {
                *seed = seed.rotate_left(5) ^ u64::from(t).wrapping_mul(0x100_0000_01b3);
            }
            if s.want_logits {
                let pos = (s.start_pos + s.tokens.len()) as u64;
                let mix = (*seed ^ pos.wrapping_mul(0x9e37_79b9_7f4a_7c15)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                // Never the end-of-sequence word: synthetic streams run to max_tokens.
                let word = 1 + (mix >> 33) as usize % (vocab - 1);
                logits.extend((0..vocab).map(|i| if i == word { 30.0f32 } else { 0.0 }));
            }
        }
        if logits.is_empty() {
            return Ok(None);
        }
        let rows = logits.len() / vocab;
        Tensor::from_vec(logits, (rows, vocab), &Device::Cpu).map(Some).map_err(|e| e.to_string())
    }

    fn release(&mut self, id: u64) {
        self.seeds.remove(&id);
    }
}
