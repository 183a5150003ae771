//! Where a device step's time goes: the host issuing the step's kernels
//! (`Backend::step` returns once they are queued), the wait for the device
//! to finish them (the greedy picks coming back), and, by difference with
//! the engine's rate, the engine's own work per step (sampling, detokenizing,
//! streaming every sequence's token). Each batch size is timed op by op and
//! replayed from a CUDA graph, in the same run.

use std::sync::Arc;
use std::time::Instant;

use candle_core::D;
use node::backend::{Backend, PagedBackend, SeqStep};
use node::model::LlamaModel;
use serde_json::{Value, json};

/// Decode steps timed per batch size (after one untimed warm-up).
const STEPS: usize = 16;

/// Times `STEPS` decode steps of `streams` sequences, each `context` tokens
/// long, driving the backend directly (replayed from graphs with
/// `graphs`). Returns the medians of (issue ms, wait ms), the mean whole
/// step and the steps replayed.
pub fn decode_step(
    model: Arc<LlamaModel>,
    streams: usize,
    context: usize,
    graphs: bool,
    profile: bool,
) -> anyhow::Result<(f64, f64, f64, usize)> {
    let capacity = context + STEPS + 1;
    let mut backend = PagedBackend::new(model, streams * capacity, streams)?;
    if graphs {
        // The first step reads every prompt at once.
        backend = backend.with_graphs(streams * context)?;
    }
    let prompt: Vec<u32> = (0..context as u32).map(|i| 1 + i % 1000).collect();
    let step = |tokens, pos| steps(tokens, pos, streams, capacity);
    wait(backend.step(&step(&prompt, 0)).map_err(anyhow::Error::msg)?)?;
    let (mut issue, mut waited) = (Vec::new(), Vec::new());
    for i in 0..=STEPS {
        let start = Instant::now();
        let last = profile && i == STEPS;
        let issued = profiled(last, || {
            let logits = backend.step(&step(&[42], context + i)).map_err(anyhow::Error::msg)?;
            let issued = Instant::now();
            wait(logits).map(|()| issued)
        })?;
        if i > 0 {
            issue.push(issued.duration_since(start).as_secs_f64() * 1e3);
            waited.push(issued.elapsed().as_secs_f64() * 1e3);
        }
    }
    let mean = issue.iter().chain(&waited).sum::<f64>() / STEPS as f64;
    Ok((median(&mut issue), median(&mut waited), mean, backend.replayed_steps()))
}

/// Every one of `streams` sequences feeding `tokens` at `pos`.
fn steps(tokens: &[u32], pos: usize, streams: usize, capacity: usize) -> Vec<SeqStep<'_>> {
    let step = |id| SeqStep {
        id,
        tokens,
        start_pos: pos,
        want_logits: true,
        capacity,
        prompt_len: 0,
        greedy: true,
        reuse: &[],
    };
    (0..streams as u64).map(step).collect()
}

/// Runs `f` between a profiler start and stop when `on` (a CUDA profiler
/// attached with `--profile-from-start off` then sees that step alone).
fn profiled<T>(on: bool, f: impl FnOnce() -> T) -> T {
    #[cfg(feature = "cuda")]
    if on {
        use candle_core::cuda_backend::cudarc::driver::{profiler_start, profiler_stop};
        let _ = profiler_start();
        let out = f();
        let _ = profiler_stop();
        return out;
    }
    let _ = on;
    f()
}

/// The greedy picks on the host: the step's end.
fn wait(logits: Option<candle_core::Tensor>) -> anyhow::Result<()> {
    if let Some(l) = logits {
        l.argmax(D::Minus1)?.to_vec1::<u32>()?;
    }
    Ok(())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The anatomy at each batch size, op by op and replayed; `engine_rates`
/// are the engine's aggregate tokens/s at the same sizes (its step time is
/// `streams / rate`). The last step of `profile` streams runs under a
/// CUDA profiler's start and stop, op by op and replayed.
pub fn report(
    model: Arc<LlamaModel>,
    context: usize,
    engine_rates: &[(usize, f64)],
    profile: Option<usize>,
) -> anyhow::Result<Value> {
    let mut rows = Vec::new();
    for &(streams, rate) in engine_rates {
        let engine = streams as f64 / rate * 1e3;
        for (graphs, how) in [(false, "op by op"), (true, "replayed")] {
            let profile = profile == Some(streams);
            let (issue, wait, mean, replayed) = decode_step(model.clone(), streams, context, graphs, profile)?;
            println!(
                "step anatomy, {streams} streams, {how}: host issues {issue:.2} ms, then waits for the device \
                 {wait:.2} ms (medians; mean step {mean:.2} ms, {:.0} tokens/s; {replayed} steps replayed)",
                streams as f64 / mean * 1e3
            );
            rows.push(json!({
                "streams": streams, "graphs": graphs, "replayed_steps": replayed, "issue_ms": issue, "wait_ms": wait,
                "mean_step_ms": mean, "engine_step_ms": engine,
            }));
        }
        println!("engine step, {streams} streams: {engine:.2} ms (mean)");
    }
    Ok(Value::Array(rows))
}
