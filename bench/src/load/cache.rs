//! What a run's prompts cost: prompt tokens, how many of them the nodes'
//! prefix caches served (`Usage.cached_prompt_tokens`), how many they had to
//! compute, and, for conversations, TTFT and hits per turn.

use std::collections::BTreeMap;

use serde::Serialize;

use super::record::RequestRecord;
use super::stats::Percentiles;

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct PromptCache {
    /// Requests whose stream reported usage (those that reached a last message).
    pub requests: u64,
    pub prompt_tokens: u64,
    pub cached_tokens: u64,
    /// Prompt tokens the nodes computed: prompt minus cached.
    pub prefill_tokens: u64,
    /// Cached over prompt tokens; 0 without usage.
    pub hit_rate: f64,
    /// One per conversation turn, in order; empty for other mixes.
    pub turns: Vec<Turn>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Turn {
    /// 1-based.
    pub turn: u32,
    /// Of the turn's requests that received a token.
    pub ttft: Percentiles,
    pub prompt_tokens_mean: f64,
    pub hit_rate: f64,
}

/// Token sums of the requests that reported usage.
#[derive(Default)]
struct Tally {
    requests: u64,
    prompt: u64,
    cached: u64,
}

impl Tally {
    fn of<'a>(records: impl Iterator<Item = &'a RequestRecord>) -> Tally {
        let mut t = Tally::default();
        for u in records.filter_map(|r| r.usage) {
            t.requests += 1;
            t.prompt += u64::from(u.prompt_tokens);
            t.cached += u64::from(u.cached_prompt_tokens.min(u.prompt_tokens));
        }
        t
    }

    fn hit_rate(&self) -> f64 {
        if self.prompt == 0 { 0.0 } else { self.cached as f64 / self.prompt as f64 }
    }
}

pub fn prompt_cache(records: &[RequestRecord]) -> PromptCache {
    let all = Tally::of(records.iter());
    let mut by_turn: BTreeMap<u32, Vec<&RequestRecord>> = BTreeMap::new();
    for r in records {
        if let Some(turn) = r.turn {
            by_turn.entry(turn).or_default().push(r);
        }
    }
    let turns = by_turn.into_iter().map(|(turn, rs)| turn_stats(turn, &rs)).collect();
    PromptCache {
        requests: all.requests,
        prompt_tokens: all.prompt,
        cached_tokens: all.cached,
        prefill_tokens: all.prompt - all.cached,
        hit_rate: all.hit_rate(),
        turns,
    }
}

fn turn_stats(turn: u32, records: &[&RequestRecord]) -> Turn {
    let tally = Tally::of(records.iter().copied());
    let prompt_tokens_mean = if tally.requests == 0 { 0.0 } else { tally.prompt as f64 / tally.requests as f64 };
    Turn {
        turn,
        ttft: Percentiles::of(records.iter().filter_map(|r| r.ttft()).collect()),
        prompt_tokens_mean,
        hit_rate: tally.hit_rate(),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use mesh_proto::v1::FinishReason;
    use tonic::Code;

    use super::*;
    use crate::load::{Chunk, PromptUsage, Status};

    fn rec(turn: Option<u32>, ttft_ms: u64, usage: Option<(u32, u32)>) -> RequestRecord {
        RequestRecord {
            id: 0,
            target: 0,
            sent_at: Duration::ZERO,
            status: Status::Grpc(Code::Ok),
            chunks: vec![Chunk { at: Duration::from_millis(ttft_ms), tokens: 1 }],
            total: Duration::from_millis(ttft_ms),
            finish_reason: FinishReason::Length,
            retry_after_ms: None,
            usage: usage
                .map(|(prompt_tokens, cached_prompt_tokens)| PromptUsage { prompt_tokens, cached_prompt_tokens }),
            turn,
        }
    }

    #[test]
    fn hit_rate_and_prefill_come_from_usage() {
        let records = vec![rec(None, 10, Some((600, 512))), rec(None, 90, Some((600, 0))), rec(None, 5, None)];
        let c = prompt_cache(&records);
        assert_eq!((c.requests, c.prompt_tokens, c.cached_tokens, c.prefill_tokens), (2, 1200, 512, 688));
        assert_eq!(c.hit_rate, 512.0 / 1200.0);
        assert!(c.turns.is_empty());
        assert_eq!(prompt_cache(&[]), PromptCache::default());
    }

    #[test]
    fn turns_are_reported_in_order() {
        let records = vec![
            rec(Some(2), 30, Some((200, 160))),
            rec(Some(1), 20, Some((40, 0))),
            rec(Some(2), 50, Some((220, 160))),
            rec(Some(1), 40, Some((40, 0))),
        ];
        let c = prompt_cache(&records);
        let turns: Vec<(u32, u64, f64, f64)> =
            c.turns.iter().map(|t| (t.turn, t.ttft.count, t.ttft.p50_ms, t.prompt_tokens_mean)).collect();
        assert_eq!(turns, vec![(1, 2, 20.0, 40.0), (2, 2, 30.0, 210.0)]);
        assert_eq!((c.turns[0].hit_rate, c.turns[1].hit_rate), (0.0, 320.0 / 420.0));
    }
}
