//! A live progress bar while a run goes: elapsed against the duration, and
//! the throughput of the last tick with running counts of OK and failed
//! requests, so an overload is visible before the summary.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

use super::engine::{LiveCounters, Load, LoadError, RunResult};

/// Runs `load`, drawing a bar on stderr when `show` (indicatif draws nothing
/// when stderr is not a terminal, so logs and pipes stay clean).
pub async fn run_with_progress(load: &Load, show: bool, label: &str) -> Result<RunResult, LoadError> {
    let live = Arc::new(LiveCounters::default());
    let total_ms = u64::try_from(load.spec().duration.as_millis()).unwrap_or(u64::MAX);
    let bar = if show { ProgressBar::new(total_ms) } else { ProgressBar::hidden() };
    if let Ok(style) = ProgressStyle::with_template("{prefix} [{elapsed_precise}] {wide_bar} {msg}") {
        bar.set_style(style);
    }
    bar.set_prefix(label.to_string());
    let started = Instant::now();
    let run = load.run(&live);
    tokio::pin!(run);
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let (mut last_tokens, mut last_at) = (0u64, Instant::now());
    loop {
        tokio::select! {
            result = &mut run => {
                bar.finish_and_clear();
                return result;
            }
            _ = tick.tick() => {
                let tokens = live.tokens.load(Ordering::Relaxed);
                let dt = last_at.elapsed().as_secs_f64();
                let rate = if dt > 0.0 { (tokens - last_tokens) as f64 / dt } else { 0.0 };
                (last_tokens, last_at) = (tokens, Instant::now());
                bar.set_position(u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX).min(total_ms));
                let (sent, ok, failed) = (
                    live.sent.load(Ordering::Relaxed),
                    live.ok.load(Ordering::Relaxed),
                    live.failed.load(Ordering::Relaxed),
                );
                let in_flight = sent.saturating_sub(ok + failed);
                bar.set_message(format!(
                    "sent {sent}  in flight {in_flight}  ok {ok}  failed {failed}  {rate:.0} tokens/s"
                ));
            }
        }
    }
}
