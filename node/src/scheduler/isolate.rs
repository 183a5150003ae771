//! Fault isolation for forward steps: a step that errs or panics fails only
//! the sequences at fault, and the engine thread keeps serving.

use std::any::Any;
use std::panic::{AssertUnwindSafe, catch_unwind};

use candle_core::Tensor;

use crate::backend::{Backend, SeqStep};
use crate::metrics::NodeMetrics;

/// What one sequence got from a step: its next-token logits (when it asked
/// for them), or why the step failed for it.
pub type SeqOutcome = Result<Option<Tensor>, String>;

/// Runs `steps`, a panic caught as an error. When a step of several
/// sequences fails, each runs again alone (a failed step advanced nothing:
/// see `Backend::step`), so one poisoned sequence fails alone instead of
/// taking every stream in the batch with it. Returns one outcome per step.
pub fn run(backend: &mut dyn Backend, steps: &[SeqStep<'_>], metrics: &NodeMetrics) -> Vec<SeqOutcome> {
    match guarded(backend, steps, metrics) {
        Ok(logits) => rows(logits, steps),
        Err(e) if steps.len() == 1 => vec![Err(e)],
        Err(_) => steps
            .iter()
            .map(|s| {
                let alone = std::slice::from_ref(s);
                guarded(backend, alone, metrics).and_then(|logits| rows(logits, alone).remove(0))
            })
            .collect(),
    }
}

/// Calls `f`; a panic becomes an error carrying its message.
pub fn catch<T>(f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|panic| Err(format!("panic: {}", panic_message(&*panic))))
}

fn guarded(backend: &mut dyn Backend, steps: &[SeqStep<'_>], metrics: &NodeMetrics) -> Result<Option<Tensor>, String> {
    let out = catch(|| backend.step(steps));
    if let Err(e) = &out {
        metrics.engine_step_failures.inc();
        let ids: Vec<u64> = steps.iter().map(|s| s.id).collect();
        tracing::error!(error = %e, sequences = ?ids, "engine step failed");
    }
    out
}

/// The batch's logits, one row per step that asked for one.
fn rows(logits: Option<Tensor>, steps: &[SeqStep<'_>]) -> Vec<SeqOutcome> {
    let mut row = 0;
    steps
        .iter()
        .map(|s| {
            if !s.want_logits {
                return Ok(None);
            }
            row += 1;
            match &logits {
                Some(l) => l.get(row - 1).map(Some).map_err(|e| e.to_string()),
                None => Err("backend returned no logits".into()),
            }
        })
        .collect()
}

fn panic_message(panic: &(dyn Any + Send)) -> &str {
    panic.downcast_ref::<&str>().copied().or_else(|| panic.downcast_ref::<String>().map(String::as_str)).unwrap_or("?")
}
