use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mesh_proto::api_key::digest;
use tonic::metadata::MetadataMap;

use super::*;
use crate::config::ApiKey;
use crate::stack::testing::{call, read_to_end, reply};
use crate::stack::{Call, last};

/// The models the fake stack below was asked for, in order, with the
/// deadline each call carried.
type Seen = Arc<Mutex<Vec<(String, Option<Instant>)>>>;

/// A stack below the step where `chat` answers with `primary` (a reply
/// when `None`) and `chat-small` with `small`.
fn below(primary: Option<fn() -> Status>, small: Option<fn() -> Status>) -> (Next, Seen) {
    let seen = Seen::default();
    let log = seen.clone();
    let next = last(move |c: Call| {
        log.lock().unwrap().push((c.req.model.clone(), c.deadline));
        let answer = if c.req.model == "chat" { primary } else { small };
        async move { answer.map_or_else(|| Ok(reply(2)), |refuse| Err(refuse())) }
    });
    (next, seen)
}

fn full() -> Status {
    crate::stack::retry_later(Code::ResourceExhausted, "bulkhead full".into(), Duration::from_millis(300))
}

fn rule() -> OverflowRule {
    OverflowRule {
        service: "chat".into(),
        to: "chat-small".into(),
        priorities: vec![Degradable::Low, Degradable::Normal],
        tenants_never: vec!["vip".into()],
        queue_wait: Duration::from_millis(50),
    }
}

fn overflow(metrics: &SidecarMetrics) -> Overflow {
    Overflow::new(&[rule()], ApiKeys::new(&[]), metrics.clone())
}

fn overflowed(metrics: &SidecarMetrics, reason: &'static str) -> u64 {
    metrics.overflowed.get_or_create(&OverflowLabels { service: "chat".into(), reason }).get()
}

fn models(seen: &Seen) -> Vec<String> {
    seen.lock().unwrap().iter().map(|(m, _)| m.clone()).collect()
}

fn with_priority(p: Priority) -> Call {
    let mut c = call("chat");
    c.req.priority = p as i32;
    c
}

#[tokio::test]
async fn a_primary_that_serves_is_never_degraded_and_says_so() {
    let metrics = SidecarMetrics::new();
    let (next, seen) = below(None, None);
    let mut served = overflow(&metrics).call(call("chat"), next).await.unwrap();
    assert_eq!(served.metadata.get(md::SERVED_BY).unwrap(), "chat");
    assert_eq!(read_to_end(&mut served.stream).await.unwrap(), 2);
    assert_eq!(models(&seen), ["chat"]);
    assert_eq!(overflowed(&metrics, "full"), 0);
}

#[tokio::test]
async fn a_full_primary_overflows_with_the_same_deadline_and_is_counted() {
    let metrics = SidecarMetrics::new();
    let (next, seen) = below(Some(full), None);
    let mut c = with_priority(Priority::Low);
    let deadline = Instant::now() + Duration::from_secs(5);
    c.deadline = Some(deadline);
    let served = overflow(&metrics).call(c, next).await.unwrap();
    assert_eq!(served.metadata.get(md::SERVED_BY).unwrap(), "chat-small");
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen, [("chat".into(), Some(deadline)), ("chat-small".into(), Some(deadline))]);
    assert_eq!(overflowed(&metrics, "full"), 1);
}

#[tokio::test]
async fn no_healthy_primary_or_a_queue_past_the_deadline_overflow_too() {
    let metrics = SidecarMetrics::new();
    let (next, _) = below(Some(|| Status::unavailable("no healthy instance")), None);
    assert!(overflow(&metrics).call(call("chat"), next).await.is_ok());
    assert_eq!(overflowed(&metrics, "unavailable"), 1);

    let (next, seen) = below(Some(|| Status::deadline_exceeded("queue too long")), None);
    let mut c = call("chat");
    c.deadline = Some(Instant::now() + Duration::from_secs(5));
    assert!(overflow(&metrics).call(c, next.clone()).await.is_ok());
    assert_eq!(overflowed(&metrics, "deadline"), 1);
    // Without a deadline, or once it has passed, there is nothing to try.
    assert_eq!(overflow(&metrics).call(call("chat"), next.clone()).await.err().unwrap().code(), Code::DeadlineExceeded);
    let mut late = call("chat");
    late.deadline = Some(Instant::now() - Duration::from_millis(1));
    assert!(overflow(&metrics).call(late, next).await.is_err());
    assert_eq!(models(&seen), ["chat", "chat-small", "chat", "chat"]);
}

#[tokio::test]
async fn high_priority_and_excluded_tenants_are_refused_not_degraded() {
    let metrics = SidecarMetrics::new();
    let (next, seen) = below(Some(full), None);
    let refused = overflow(&metrics).call(with_priority(Priority::High), next.clone()).await.err().unwrap();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(refused.metadata().get(md::RETRY_AFTER_MS).is_some(), "the primary's refusal, as it was");
    let mut vip = call("chat");
    vip.req.tenant = "vip".into();
    assert!(overflow(&metrics).call(vip, next.clone()).await.is_err());
    let normal_only = OverflowRule { priorities: vec![Degradable::Normal], ..rule() };
    let strict = Overflow::new(&[normal_only], ApiKeys::new(&[]), metrics.clone());
    assert!(strict.call(with_priority(Priority::Low), next.clone()).await.is_err());
    // An unset priority counts as normal.
    assert!(strict.call(call("chat"), next).await.is_ok());
    assert_eq!(models(&seen), ["chat", "chat", "chat", "chat", "chat-small"]);
}

#[tokio::test]
async fn client_errors_request_faults_and_rate_limits_do_not_overflow() {
    let metrics = SidecarMetrics::new();
    let refusals: [fn() -> Status; 6] = [
        || Status::invalid_argument("max_tokens over the limit"),
        || Status::not_found("no instances of service \"chat\""),
        || Status::permission_denied("tenant may not use chat"),
        || Status::internal("engine step failed"),
        || marked_fault(),
        || marked_limit(),
    ];
    fn marked_fault() -> Status {
        Status::with_metadata(Code::Internal, "poisoned", meta(md::REQUEST_FAULT))
    }
    fn marked_limit() -> Status {
        Status::with_metadata(Code::ResourceExhausted, "tenant over its limit", meta(md::TENANT_LIMITED))
    }
    for refuse in refusals {
        let (next, seen) = below(Some(refuse), None);
        let refused = overflow(&metrics).call(call("chat"), next).await.err().unwrap();
        assert_eq!(refused.code(), refuse().code());
        assert_eq!(models(&seen), ["chat"], "{refused:?}");
    }
}

fn meta(key: &'static str) -> MetadataMap {
    let mut m = MetadataMap::new();
    m.insert(key, "1".parse().unwrap());
    m
}

#[tokio::test]
async fn an_overflow_that_refuses_too_returns_the_primary_s_refusal() {
    let metrics = SidecarMetrics::new();
    let (next, seen) = below(Some(full), Some(|| Status::resource_exhausted("small one full")));
    let refused = overflow(&metrics).call(call("chat"), next).await.err().unwrap();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(refused.metadata().get(md::RETRY_AFTER_MS).is_some());
    assert!(refused.message().contains("bulkhead full") && refused.message().contains("small one full"), "{refused:?}");
    assert_eq!(models(&seen), ["chat", "chat-small"]);
    assert_eq!(overflowed(&metrics, "full"), 0, "only calls the overflow served count");
}

#[tokio::test]
async fn a_key_that_may_not_use_the_overflow_service_is_not_degraded_to_it() {
    let key = |tenant: &str, services: Vec<String>| ApiKey {
        tenant: tenant.into(),
        sha256: digest(tenant),
        services,
        admin: false,
        allow_special_tokens: false,
    };
    let keys = ApiKeys::new(&[key("chat-only", vec!["chat".into()]), key("both", vec![])]);
    let step = Overflow::new(&[rule()], keys, SidecarMetrics::new());
    let (next, seen) = below(Some(full), None);
    let as_tenant = |tenant: &str| {
        let mut c = call("chat");
        c.metadata.insert("authorization", format!("Bearer {tenant}").parse().unwrap());
        c
    };
    assert!(step.call(as_tenant("chat-only"), next.clone()).await.is_err());
    assert!(step.call(as_tenant("both"), next).await.is_ok());
    assert_eq!(models(&seen), ["chat", "chat", "chat-small"]);
}

/// A model asked for, and the bound on queueing its call carried.
type Waited = (String, Option<Duration>);

#[tokio::test]
async fn only_calls_that_may_be_degraded_have_their_queueing_at_the_primary_bounded() {
    let seen: Arc<Mutex<Vec<Waited>>> = Arc::default();
    let log = seen.clone();
    let next = last(move |c: Call| {
        log.lock().unwrap().push((c.req.model.clone(), c.queue_wait()));
        let full = c.req.model == "chat";
        async move { if full { Err(super::tests::full()) } else { Ok(reply(1)) } }
    });
    let step = overflow(&SidecarMetrics::new());
    let ms = |n| Some(Duration::from_millis(n));
    step.call(with_priority(Priority::Normal), next.clone()).await.unwrap();
    let mut hurried = with_priority(Priority::Low);
    hurried.metadata.insert(md::MAX_QUEUE_WAIT_MS, MetadataValue::from(20u64));
    step.call(hurried, next.clone()).await.unwrap();
    assert!(step.call(with_priority(Priority::High), next).await.is_err());
    let seen = seen.lock().unwrap().clone();
    let expected = [
        ("chat", ms(50)),
        ("chat-small", None), // the overflow service queues it as it queues anything
        ("chat", ms(20)),     // the caller's own, shorter bound stands
        ("chat-small", ms(20)),
        ("chat", None), // HIGH is never degraded: it waits as long as the primary allows
    ];
    assert_eq!(seen, expected.map(|(m, w)| (m.to_string(), w)));
}
