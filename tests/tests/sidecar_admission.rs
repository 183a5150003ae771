//! Admission through the whole mesh: a request whose deadline the queue
//! ahead makes impossible is refused at once, before the node sees it; and
//! a service that loses its last instance reads zero instances, so the
//! "no healthy instance" alert can fire.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use mesh_proto::v1::GenerateRequest;
use mesh_tests::etcd::Etcd;
use mesh_tests::mesh::{SidecarProcess, signal};
use mesh_tests::{NodeProcess, free_port, prompt_request, scrape};
use tonic::Code;

/// One slot at the node, so a single long stream fills it.
const ONE_SLOT: &str = r#"
[[services]]
name = "chat"
max_concurrency = 1
max_queue = 8
max_queue_wait = "30s"
"#;

fn chat(prompt: &str, max_tokens: u32) -> GenerateRequest {
    GenerateRequest { model: "chat".into(), ..prompt_request(prompt, max_tokens) }
}

fn sum(metrics: &HashMap<String, f64>, prefix: &str) -> f64 {
    metrics.iter().filter(|(k, _)| k.starts_with(prefix)).map(|(_, v)| v).sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_impossible_deadline_is_refused_at_once_and_never_reaches_the_node() {
    let etcd = Etcd::start().await;
    let node_metrics = format!("127.0.0.1:{}", free_port());
    let node = NodeProcess::start(&[
        "--backend",
        "synthetic",
        "--model-name",
        "chat",
        "--synthetic-tokens-per-sec",
        "20",
        "--metrics-listen",
        &node_metrics,
    ])
    .await;
    let _b = SidecarProcess::start(&etcd, Some(&node), ONE_SLOT).await;
    let a = SidecarProcess::start(&etcd, None, "").await;
    a.wait_for_instances("chat", 1).await;

    // A 2-second stream takes the only slot.
    let mut client = a.client().await;
    let mut long = client.generate(chat("long", 40)).await.unwrap().into_inner();
    long.message().await.unwrap().expect("first message of the long stream");

    // The queue ahead (about a second: the bulkhead's starting estimate of
    // a stream's hold time) outlasts a 500 ms deadline.
    let mut req = tonic::Request::new(chat("hurried", 4));
    req.set_timeout(Duration::from_millis(500));
    let sent = Instant::now();
    let err = client.generate(req).await.expect_err("an impossible deadline must be refused");
    let took = sent.elapsed();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(err.message().contains("cannot start this request before its deadline"), "{err:?}");
    assert!(took < Duration::from_millis(250), "refused after {took:?}, not at once");

    while long.message().await.unwrap().is_some() {}
    let seen = sum(&scrape(&node_metrics).await, "mesh_node_requests_total");
    assert_eq!(seen, 1.0, "the node saw the refused request");
}

#[tokio::test(flavor = "multi_thread")]
async fn instance_gauges_fall_to_zero_when_the_last_instance_leaves() {
    let etcd = Etcd::start().await;
    let node = NodeProcess::start(&["--backend", "synthetic", "--model-name", "chat"]).await;
    let mut b = SidecarProcess::start(&etcd, Some(&node), "").await;
    let a_metrics = format!("127.0.0.1:{}", free_port());
    let a = SidecarProcess::start_with_args(&etcd, None, "", &["--metrics-listen", &a_metrics]).await;
    a.wait_for_instances("chat", 1).await;
    let instances = |m: &HashMap<String, f64>| {
        m.iter()
            .find(|(k, _)| k.starts_with("mesh_registry_instances{") && k.contains("service=\"chat\""))
            .map(|(_, v)| *v)
    };
    assert_eq!(instances(&scrape(&a_metrics).await), Some(1.0));

    signal(b.process(), "TERM");
    a.wait_for_instances("chat", 0).await;
    assert_eq!(instances(&scrape(&a_metrics).await), Some(0.0), "the gauge must read 0, not vanish or stay at 1");
}
