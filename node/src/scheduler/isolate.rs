//! Fault isolation for forward steps: a step that errs or panics fails only
//! the sequences at fault, and the engine thread keeps serving.

use std::any::Any;
use std::panic::{AssertUnwindSafe, catch_unwind};

use candle_core::{D, Device, Tensor};

use crate::backend::{Backend, SeqStep};
use crate::metrics::NodeMetrics;

/// What one sequence got from a step (when it asked for logits), or why the
/// step failed for it.
pub type SeqOutcome = Result<Option<Next>, String>;

/// A sequence's next token to be: its logits row on the host, or the
/// greedy pick already made on the device.
pub enum Next {
    Logits(Tensor),
    Token(u32),
}

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

/// The batch's logits, one row per step that asked for one. Logits on a
/// device stay there but for the rows sampled on the host: greedy rows are
/// picked by one argmax over the batch, so a step moves token ids, not
/// `rows x vocab` floats, and the host does not scan each row.
fn rows(logits: Option<Tensor>, steps: &[SeqStep<'_>]) -> Vec<SeqOutcome> {
    let Some(logits) = logits else {
        return steps
            .iter()
            .map(|s| if s.want_logits { Err("backend returned no logits".into()) } else { Ok(None) })
            .collect();
    };
    let on_device = !logits.device().is_cpu();
    split(&logits, steps, on_device)
}

/// One outcome per step; with `pick_greedy`, greedy rows come back as the
/// argmax token, the others as host logits rows.
fn split(logits: &Tensor, steps: &[SeqStep<'_>], pick_greedy: bool) -> Vec<SeqOutcome> {
    let picks = match pick_greedy {
        false => Ok(None),
        true => logits.argmax(D::Minus1).and_then(|t| t.to_vec1::<u32>()).map(Some).map_err(|e| e.to_string()),
    };
    let mut row = 0;
    steps
        .iter()
        .map(|s| {
            if !s.want_logits {
                return Ok(None);
            }
            row += 1;
            match picks.as_ref()? {
                Some(picks) if s.greedy => Ok(Some(Next::Token(picks[row - 1]))),
                _ => logits.get(row - 1).and_then(|r| r.to_device(&Device::Cpu)).map(|r| Some(Next::Logits(r))),
            }
            .map_err(|e| e.to_string())
        })
        .collect()
}

fn panic_message(panic: &(dyn Any + Send)) -> &str {
    panic.downcast_ref::<&str>().copied().or_else(|| panic.downcast_ref::<String>().map(String::as_str)).unwrap_or("?")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_rows_come_back_as_their_argmax_and_the_others_as_logits() {
        let logits = Tensor::new(&[[0.1f32, 0.9, 0.3], [2.0, 1.0, 0.5], [0.0, 0.2, 0.7]], &Device::Cpu).unwrap();
        let step = |greedy, want_logits| SeqStep {
            id: 0,
            tokens: &[],
            start_pos: 0,
            want_logits,
            capacity: 1,
            prompt_len: 0,
            greedy,
            reuse: &[],
        };
        let steps = [step(true, true), step(false, false), step(false, true), step(true, true)];
        let out = split(&logits, &steps, true);
        assert!(matches!(out[0], Ok(Some(Next::Token(1)))));
        assert!(matches!(out[1], Ok(None)));
        let Ok(Some(Next::Logits(row))) = &out[2] else { panic!("logits row expected") };
        assert_eq!(row.to_vec1::<f32>().unwrap(), [2.0, 1.0, 0.5]);
        assert!(matches!(out[3], Ok(Some(Next::Token(2)))));
        // Without picking, every wanted row is logits (the CPU path).
        assert!(split(&logits, &steps, false).iter().all(|o| !matches!(o, Ok(Some(Next::Token(_))))));
    }
}
