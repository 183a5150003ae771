//! Measurements through the real engine (scheduler + batched forward).

use std::sync::Arc;
use std::time::Instant;

use candle_transformers::generation::Sampling;
use node::scheduler::{Request, Scheduler};
use node::text::{SpecialTokens, TextCodec};

use super::PROMPT;

fn greedy(prompt: &[u32], max_tokens: usize) -> Request {
    Request {
        prompt: prompt.to_vec(),
        continued: 0,
        max_tokens,
        sampling: Sampling::ArgMax,
        seed: 0,
        stop: vec![],
        priority: 1,
        deadline: None,
        span: tracing::Span::none(),
    }
}

/// Aggregate decode tokens/s of `streams` concurrent greedy streams, counted
/// from the moment every stream has its first token.
pub async fn decode_rate(scheduler: &Scheduler, prompt: &[u32], streams: usize, tokens: usize) -> anyhow::Result<f64> {
    let mut rxs = Vec::new();
    for _ in 0..streams {
        rxs.push(scheduler.submit(greedy(prompt, tokens)).map_err(|e| anyhow::anyhow!("{e}"))?.0);
    }
    let tasks: Vec<_> = rxs
        .into_iter()
        .map(|mut rx| {
            tokio::spawn(async move {
                let mut times = Vec::new();
                while let Some(msg) = rx.recv().await {
                    if !msg?.token_ids.is_empty() {
                        times.push(Instant::now());
                    }
                }
                Ok::<_, tonic::Status>(times)
            })
        })
        .collect();
    let mut stamps: Vec<Vec<Instant>> = Vec::with_capacity(streams);
    for t in tasks {
        stamps.push(t.await??);
    }
    let start = stamps.iter().filter_map(|s| s.first()).max().copied().unwrap_or_else(Instant::now);
    let end = stamps.iter().filter_map(|s| s.last()).max().copied().unwrap_or(start);
    let counted: usize = stamps.iter().map(|s| s.iter().filter(|t| **t > start).count()).sum();
    Ok(counted as f64 / end.duration_since(start).as_secs_f64().max(1e-9))
}

/// A `len`-token prompt made of the benchmark prompt's tokens.
pub fn long_prompt(codec: &Arc<dyn TextCodec>, len: usize) -> anyhow::Result<Vec<u32>> {
    let base = codec.encode(PROMPT, SpecialTokens::AsText)?;
    Ok((0..len).map(|i| base[i % base.len()]).collect())
}

/// Milliseconds to the first token of `prompt`, `samples` times one after
/// another; sorted.
pub async fn ttfts(scheduler: &Scheduler, prompt: &[u32], samples: usize) -> anyhow::Result<Vec<f64>> {
    let mut ttft = Vec::new();
    for _ in 0..samples {
        let start = Instant::now();
        let (mut rx, _) = scheduler.submit(greedy(prompt, 1)).map_err(|e| anyhow::anyhow!("{e}"))?;
        rx.recv().await;
        ttft.push(start.elapsed().as_secs_f64() * 1e3);
        while rx.recv().await.is_some() {}
    }
    ttft.sort_by(f64::total_cmp);
    Ok(ttft)
}

/// Prompt tokens/s of a 128-token prompt prefilled alone (median of `samples`).
pub async fn prefill_rate(scheduler: &Scheduler, codec: &Arc<dyn TextCodec>, samples: usize) -> anyhow::Result<f64> {
    let ttft = ttfts(scheduler, &long_prompt(codec, 128)?, samples.max(1)).await?;
    Ok(128.0 / (percentile(&ttft, 0.5) / 1e3))
}

/// What `ttft_under_load` measures: `prompt`-token prompts, one at a time,
/// while `streams` others keep decoding (up to `tokens` each).
pub struct UnderLoad {
    pub prompt: usize,
    pub streams: usize,
    pub tokens: usize,
}

/// Time to first token under load (see `UnderLoad`). Returns (p50, p99)
/// in milliseconds.
pub async fn ttft_under_load(
    scheduler: &Scheduler,
    codec: &Arc<dyn TextCodec>,
    samples: usize,
    load: &UnderLoad,
) -> anyhow::Result<(f64, f64)> {
    let background = codec.encode(PROMPT, SpecialTokens::AsText)?;
    let mut keep = Vec::new();
    for _ in 0..load.streams {
        let (rx, _) = scheduler.submit(greedy(&background, load.tokens)).map_err(|e| anyhow::anyhow!("{e}"))?;
        keep.push(rx);
    }
    for rx in &mut keep {
        rx.recv().await; // decoding has started
    }
    let prompt = long_prompt(codec, load.prompt)?;
    // One untimed sample first: the first step of this shape pays one-time
    // costs (a GPU's kernel workspaces grow to the new batch once).
    ttfts(scheduler, &prompt, 1).await?;
    let ttft = ttfts(scheduler, &prompt, samples).await?;
    drop(keep);
    Ok((percentile(&ttft, 0.5), percentile(&ttft, 0.99)))
}

/// Nearest-rank percentile of sorted values.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

/// Prefix-cache TTFT on a scheduler with the cache on: `samples` times, a
/// 544-token prompt never seen (its first token differs each time) is
/// timed cold, then one with the same first 512 tokens and another 32-token
/// ending (a shared system prompt, a new question) is timed warm. Returns
/// the p50s in ms.
pub async fn prefix_ttft(
    scheduler: &Scheduler,
    codec: &Arc<dyn TextCodec>,
    samples: usize,
) -> anyhow::Result<(f64, f64)> {
    const SHARED: usize = 512;
    let long = long_prompt(codec, SHARED + 32)?;
    let (mut cold, mut warm) = (Vec::new(), Vec::new());
    for i in 0..samples.max(1) {
        let mut first = long.clone();
        first[0] = 1000 + i as u32;
        let mut second = first.clone();
        second[SHARED..].reverse();
        cold.extend(ttfts(scheduler, &first, 1).await?);
        warm.extend(ttfts(scheduler, &second, 1).await?);
    }
    cold.sort_by(f64::total_cmp);
    warm.sort_by(f64::total_cmp);
    Ok((percentile(&cold, 0.5), percentile(&warm, 0.5)))
}
