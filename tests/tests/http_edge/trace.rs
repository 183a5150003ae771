//! A `traceparent` header continues the caller's trace through the edge,
//! as the same metadata does on the gRPC side (tests/tests/telemetry.rs).

use mesh_tests::NodeProcess;
use mesh_tests::etcd::Etcd;
use mesh_tests::mesh::SidecarProcess;
use mesh_tests::otlp::Collector;
use serde_json::json;

use super::client::{request, send};

#[tokio::test(flavor = "multi_thread")]
async fn a_traceparent_header_continues_the_callers_trace() {
    let collector = Collector::start().await;
    let endpoint = collector.endpoint();
    let trace = ["--otlp-endpoint", endpoint.as_str()];
    let etcd = Etcd::start().await;
    let node = NodeProcess::start(&["--backend", "synthetic", "--model-name", "chat", trace[0], trace[1]]).await;
    let _inbound = SidecarProcess::start_with_args(&etcd, Some(&node), "", &trace).await;
    let edge = SidecarProcess::start_edge(&etcd, "", &trace).await;
    edge.wait_for_instances("chat", 1).await;

    let caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let body = json!({"model": "chat", "prompt": "trace me", "max_tokens": 4}).to_string();
    let mut req = request("POST", "/v1/completions", None, body);
    let traceparent = format!("00-{caller_trace}-00f067aa0ba902b7-01");
    req.headers_mut().insert("traceparent", traceparent.parse().unwrap());
    let answer = send(edge.http.unwrap(), req).await;
    assert_eq!(answer.status, 200, "{}", answer.body);

    let wanted = ["sidecar.route", "sidecar.inbound", "node.generate"];
    let spans = collector.wait_for(&wanted).await;
    assert!(spans.iter().all(|s| s.trace_id == caller_trace), "{spans:#?}");
    let route = spans.iter().find(|s| s.name == "sidecar.route").unwrap();
    assert_eq!(route.parent_span_id, "00f067aa0ba902b7", "the edge's route span continues the caller's span");
}
