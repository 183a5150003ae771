//! One request through sidecar A, sidecar B and a node is one trace in an
//! OTLP collector; each process's Prometheus counters move by the right amounts.

use std::collections::HashMap;
use std::time::Duration;

use mesh_proto::v1::{GenerateRequest, SamplingParams};
use mesh_tests::etcd::Etcd;
use mesh_tests::mesh::SidecarProcess;
use mesh_tests::otlp::{CollectedSpan, Collector};
use mesh_tests::{NodeProcess, free_port, generate, prompt_request};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn chat(max_tokens: u32) -> GenerateRequest {
    GenerateRequest { model: "chat".into(), tenant: "acme".into(), ..prompt_request("trace me", max_tokens) }
}

#[tokio::test(flavor = "multi_thread")]
async fn one_request_is_one_trace_across_two_sidecars_and_the_node() {
    let collector = Collector::start().await;
    let endpoint = collector.endpoint();
    let etcd = Etcd::start().await;
    let node =
        NodeProcess::start(&["--backend", "synthetic", "--model-name", "chat", "--otlp-endpoint", &endpoint]).await;
    let trace = ["--otlp-endpoint", endpoint.as_str()];
    let _b = SidecarProcess::start_with_args(&etcd, Some(&node), "", &trace).await;
    let a = SidecarProcess::start_with_args(&etcd, None, "", &trace).await;
    a.wait_for_instances("chat", 1).await;

    // The caller's own trace context is continued.
    let caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut req = tonic::Request::new(chat(4));
    req.metadata_mut().insert("traceparent", format!("00-{caller_trace}-00f067aa0ba902b7-01").parse().unwrap());
    let mut stream = a.client().await.generate(req).await.unwrap().into_inner();
    while stream.message().await.unwrap().is_some() {}

    let wanted = [
        "sidecar.route",
        "sidecar.attempt",
        "sidecar.inbound",
        "sidecar.admit",
        "node.generate",
        "node.queue",
        "node.prefill",
        "node.decode",
    ];
    let spans = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let spans = collector.spans();
            if wanted.iter().all(|w| spans.iter().any(|s| s.name == *w)) {
                return spans;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("spans missing: {:?}", collector.spans().iter().map(|s| &s.name).collect::<Vec<_>>()));

    let by_name: HashMap<&str, &CollectedSpan> = spans.iter().map(|s| (s.name.as_str(), s)).collect();
    assert!(spans.iter().all(|s| s.trace_id == caller_trace), "{spans:#?}");
    let parent = |child: &str, parent: &str| {
        assert_eq!(by_name[child].parent_span_id, by_name[parent].span_id, "{child} is not under {parent}");
    };
    assert_eq!(by_name["sidecar.route"].parent_span_id, "00f067aa0ba902b7", "route continues the caller's span");
    parent("sidecar.attempt", "sidecar.route");
    parent("sidecar.inbound", "sidecar.attempt");
    parent("sidecar.admit", "sidecar.inbound");
    parent("node.generate", "sidecar.inbound");
    parent("node.queue", "node.generate");
    parent("node.prefill", "node.generate");
    parent("node.decode", "node.generate");
    // Three processes, named.
    assert_eq!(by_name["sidecar.route"].service, "mesh-sidecar");
    assert_eq!(by_name["node.decode"].service, "mesh-node");
    // Key attributes.
    assert_eq!(by_name["sidecar.route"].attributes["service"], "chat");
    assert_eq!(by_name["sidecar.route"].attributes["tenant"], "acme");
    assert_eq!(by_name["sidecar.admit"].attributes["outcome"], "admitted");
    assert!(by_name["sidecar.admit"].attributes.contains_key("queue_wait_ms"));
    assert_eq!(by_name["node.generate"].attributes["model"], "chat");
    assert_eq!(by_name["node.prefill"].attributes["prompt_tokens"], "2");
    assert_eq!(by_name["node.decode"].attributes["completion_tokens"], "4");
    assert_eq!(by_name["node.decode"].attributes["finish_reason"], "FINISH_REASON_LENGTH");
    assert!(by_name["sidecar.attempt"].attributes.contains_key("instance"));
}

#[tokio::test(flavor = "multi_thread")]
async fn failures_mark_spans_with_the_grpc_code() {
    let collector = Collector::start().await;
    let endpoint = collector.endpoint();
    let node = NodeProcess::start(&["--backend", "synthetic", "--otlp-endpoint", &endpoint]).await;
    let bad = GenerateRequest {
        sampling: Some(SamplingParams { temperature: -1.0, ..Default::default() }),
        ..prompt_request("x", 2)
    };
    let err = generate(&mut node.client().await, bad).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let span = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if let Some(s) = collector.spans().into_iter().find(|s| s.name == "node.generate") {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the failed request's span");
    assert_eq!(span.status_code, 2, "error status");
    assert_eq!(span.attributes["rpc.grpc.status_code"], "3");
}

/// `GET /metrics`, parsed into `name{labels}` -> value.
async fn scrape(addr: &str) -> HashMap<String, f64> {
    let mut conn = tokio::net::TcpStream::connect(addr).await.expect("metrics endpoint");
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut text = String::new();
    conn.read_to_string(&mut text).await.unwrap();
    let body = text.split("\r\n\r\n").nth(1).expect("HTTP body");
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.rsplit_once(' ').and_then(|(k, v)| v.parse().ok().map(|v| (k.to_string(), v))))
        .collect()
}

fn delta(before: &HashMap<String, f64>, after: &HashMap<String, f64>, key: &str) -> f64 {
    after.get(key).copied().unwrap_or(0.0) - before.get(key).copied().unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread")]
async fn counters_and_histograms_move_by_the_right_amounts() {
    let etcd = Etcd::start().await;
    let (node_port, b_port, a_port) = (free_port(), free_port(), free_port());
    let node_metrics = format!("127.0.0.1:{node_port}");
    let node =
        NodeProcess::start(&["--backend", "synthetic", "--model-name", "chat", "--metrics-listen", &node_metrics])
            .await;
    let b_metrics = format!("127.0.0.1:{b_port}");
    let a_metrics = format!("127.0.0.1:{a_port}");
    let _b = SidecarProcess::start_with_args(&etcd, Some(&node), "", &["--metrics-listen", &b_metrics]).await;
    let a = SidecarProcess::start_with_args(&etcd, None, "", &["--metrics-listen", &a_metrics]).await;
    a.wait_for_instances("chat", 1).await;

    let before = (scrape(&node_metrics).await, scrape(&b_metrics).await, scrape(&a_metrics).await);
    let mut client = a.client().await;
    for _ in 0..3 {
        assert_eq!(generate(&mut client, chat(5)).await.unwrap().token_ids.len(), 5);
    }
    let bad = GenerateRequest { sampling: Some(SamplingParams { top_p: Some(2.0), ..Default::default() }), ..chat(5) };
    assert!(generate(&mut client, bad).await.is_err());
    let after = (scrape(&node_metrics).await, scrape(&b_metrics).await, scrape(&a_metrics).await);

    let node_d = |k: &str| delta(&before.0, &after.0, k);
    assert_eq!(node_d(r#"mesh_node_requests_total{model="chat",code="OK"}"#), 3.0);
    assert_eq!(node_d(r#"mesh_node_requests_total{model="chat",code="INVALID_ARGUMENT"}"#), 1.0);
    assert_eq!(node_d("mesh_node_generated_tokens_total"), 15.0);
    assert_eq!(node_d("mesh_node_time_to_first_token_seconds_count"), 3.0);
    assert_eq!(node_d("mesh_node_inter_token_seconds_count"), 12.0);
    assert!(node_d("mesh_node_batch_size_count") >= 5.0);

    let b_d = |k: &str| delta(&before.1, &after.1, k);
    assert_eq!(b_d(r#"mesh_sidecar_requests_total{direction="inbound",service="chat",code="OK"}"#), 3.0);
    assert_eq!(b_d(r#"mesh_sidecar_requests_total{direction="inbound",service="chat",code="INVALID_ARGUMENT"}"#), 1.0);
    assert_eq!(b_d(r#"mesh_sidecar_time_to_first_token_seconds_count{direction="inbound"}"#), 3.0);

    let a_d = |k: &str| delta(&before.2, &after.2, k);
    assert_eq!(a_d(r#"mesh_sidecar_requests_total{direction="outbound",service="chat",code="OK"}"#), 3.0);
    assert_eq!(a_d(r#"mesh_sidecar_requests_total{direction="outbound",service="chat",code="INVALID_ARGUMENT"}"#), 1.0);
    assert_eq!(a_d(r#"mesh_sidecar_time_to_first_token_seconds_count{direction="outbound"}"#), 3.0);
    assert_eq!(a_d(r#"mesh_sidecar_inter_token_seconds_count{direction="outbound"}"#), 12.0);
    assert_eq!(after.2["mesh_registry_etcd_reachable"], 1.0);
    assert_eq!(after.2[r#"mesh_registry_instances{service="chat"}"#], 1.0);
    assert_eq!(after.2[r#"mesh_sidecar_ejected_instances{service="chat"}"#], 0.0);
}
