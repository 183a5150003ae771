//! A saturated node refuses fast: a request the queue ahead would hold past
//! its bound is refused at admission, and one admitted before the node knew
//! its pace is ended at its bound, both RESOURCE_EXHAUSTED with
//! `retry-after-ms`, never left to wait until the caller gives up.
//!
//! The node here reads one 4-token prompt per 100 ms step (10 starts/s,
//! synthetic backend: the scheduler is the real one) with a 1 s bound.

use std::time::{Duration, Instant};

use candle_transformers::generation::Sampling;
use mesh_proto::metadata as md;
use node::loaded_model::LoadedModel;
use node::metrics::NodeMetrics;
use node::scheduler::{AdmitError, Limits, Request, Scheduler};
use node::text::SpecialTokens;
use tonic::Code;

const BOUND: Duration = Duration::from_secs(1);
const STEP: Duration = Duration::from_millis(100);

fn node() -> (Scheduler, Vec<u32>) {
    let model = LoadedModel::synthetic("synthetic".into(), 1.0 / STEP.as_secs_f64(), 256, None);
    let prompt = model.codec.encode("one two three four", SpecialTokens::AsText).unwrap();
    assert_eq!(prompt.len(), 4);
    let limits = Limits {
        max_running: 1000,
        max_queued: 1000,
        max_kv_tokens: 1 << 20,
        max_step_tokens: 4,
        context_length: 256,
        max_queue_wait: BOUND,
        prefix_cache: false,
    };
    let metrics = NodeMetrics::new("synthetic", "none");
    (Scheduler::start(limits, model.backend, model.codec, metrics), prompt)
}

fn request(prompt: &[u32], deadline: Option<Instant>) -> Request {
    Request {
        prompt: prompt.to_vec(),
        continued: 0,
        max_tokens: 2,
        sampling: Sampling::ArgMax,
        seed: 0,
        stop: vec![],
        priority: 1,
        deadline,
        span: tracing::Span::none(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_admitted_before_the_pace_was_known_is_ended_at_its_bound() {
    let (scheduler, prompt) = node();
    // 40 at once, before any step: each is admitted (no pace measured yet),
    // but only about 10 can start within the bound.
    let sent = Instant::now();
    let streams: Vec<_> = (0..40).map(|_| scheduler.submit(request(&prompt, None)).unwrap().0).collect();
    let mut ok = 0;
    let mut refused = Vec::new();
    for mut rx in streams {
        match rx.recv().await.expect("a first reply") {
            Ok(_) => ok += 1,
            Err(status) => refused.push((status, sent.elapsed())),
        }
    }
    assert!((8..=14).contains(&ok), "{ok} started within {BOUND:?} at 10 starts/s");
    assert_eq!(ok + refused.len(), 40);
    for (status, after) in refused {
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert!(status.message().contains("waited") && status.message().contains("--max-queue-wait"), "{status:?}");
        assert!(status.metadata().get(md::RETRY_AFTER_MS).is_some(), "{status:?}");
        // The bound, kept to within a step or two under a loaded machine.
        assert!(after >= BOUND && after < BOUND + 5 * STEP, "refused after {after:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn once_the_pace_is_known_a_request_that_would_wait_too_long_is_refused_at_once() {
    let (scheduler, prompt) = node();
    let mut first = scheduler.submit(request(&prompt, None)).unwrap().0;
    // Two tokens are two steps: the interval between them is the pace.
    first.recv().await.unwrap().unwrap();
    first.recv().await.unwrap().unwrap();
    // Each admitted prompt is one more step (100 ms) of reading ahead; past
    // ten of them the next would wait over the 1 s bound.
    let mut held = Vec::new();
    let refusal = loop {
        match scheduler.submit(request(&prompt, None)) {
            Ok((rx, _)) => held.push(rx),
            Err(e) => break e,
        }
        assert!(held.len() < 30, "30 admitted at 10 starts/s with a 1 s bound");
    };
    assert!((8..=13).contains(&held.len()), "{} admitted before the refusal", held.len());
    let AdmitError::WouldWait { wait, bound, retry_after } = refusal else { panic!("{refusal:?}") };
    assert_eq!(bound, BOUND);
    assert!(wait > BOUND && retry_after >= Duration::from_millis(50), "{refusal:?}");
    let status = refusal.status(scheduler.load());
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(status.metadata().get(md::RETRY_AFTER_MS).is_some());

    // A deadline shorter than the bound is the bound: 300 ms is 3 steps.
    let deadline = Some(Instant::now() + Duration::from_millis(300));
    let err = scheduler.submit(request(&prompt, deadline)).unwrap_err();
    assert!(matches!(err, AdmitError::WouldWait { bound, .. } if bound <= Duration::from_millis(300)), "{err:?}");
}
