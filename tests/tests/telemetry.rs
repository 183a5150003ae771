//! One request through sidecar A, sidecar B and a node is one trace in an
//! OTLP collector; each process's Prometheus counters move by the right amounts.

use std::collections::HashMap;
use std::time::Duration;

use mesh_proto::v1::{GenerateRequest, SamplingParams};
use mesh_tests::etcd::Etcd;
use mesh_tests::mesh::SidecarProcess;
use mesh_tests::otlp::{CollectedSpan, Collector};
use mesh_tests::{NodeProcess, free_port, generate, metrics_text, prompt_request, scrape};

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
    let spans = collector.wait_for(&wanted).await;

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
    // The two sidecars are told apart: each hop says which side it is, and
    // each process has its own instance id.
    assert_eq!(by_name["sidecar.route"].attributes["mesh.role"], "client-side");
    assert_eq!(by_name["sidecar.inbound"].attributes["mesh.role"], "node-side");
    assert_ne!(by_name["sidecar.route"].instance, by_name["sidecar.inbound"].instance);
    assert!(!by_name["sidecar.route"].instance.is_empty());
    // A span covers its children: node.generate ends with its stream.
    let (decode, generate) = (by_name["node.decode"].end_ns, by_name["node.generate"].end_ns);
    assert!(decode <= generate, "node.decode outlives node.generate by {} ns", decode as i128 - generate as i128);
    assert!(by_name["sidecar.admit"].end_ns <= by_name["sidecar.inbound"].end_ns);
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

/// Metric families a process declares (`# TYPE name kind`).
async fn families(addr: &str) -> Vec<String> {
    let text = metrics_text(addr).await;
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .map(String::from)
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
    // A stream's status is counted just after its last message goes out:
    // wait (bounded) for each process to have counted all four calls.
    let settled = |addr: String, key: &'static str, want: f64, base: HashMap<String, f64>| async move {
        tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                let now = scrape(&addr).await;
                if delta(&base, &now, key) >= want {
                    return now;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{key} never reached +{want} on {addr}"))
    };
    let after = (
        settled(node_metrics.clone(), r#"mesh_node_requests_total{model="chat",code="OK"}"#, 3.0, before.0.clone())
            .await,
        settled(
            b_metrics.clone(),
            r#"mesh_sidecar_requests_total{direction="inbound",service="chat",code="OK"}"#,
            3.0,
            before.1.clone(),
        )
        .await,
        settled(
            a_metrics.clone(),
            r#"mesh_sidecar_requests_total{direction="outbound",service="chat",code="OK"}"#,
            3.0,
            before.2.clone(),
        )
        .await,
    );

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

/// Metric names registered in a process's metrics module (the single place
/// where names are defined): `prefix_name`.
fn registered(path: &str) -> Vec<String> {
    let text = std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path)).unwrap();
    let mut prefix = String::new();
    let mut names = Vec::new();
    let mut pending = false; // a register( call whose name is on the next line
    for line in text.lines() {
        let literal = line.split('"').nth(1);
        if line.contains("sub_registry_with_prefix(") {
            prefix = literal.unwrap_or_default().to_string();
        } else if line.trim_start().starts_with("r.register(") || line.trim_start().starts_with("reg.register(") {
            match literal {
                Some(name) => names.push(format!("{prefix}_{name}")),
                None => pending = true,
            }
        } else if pending && let Some(name) = literal {
            names.push(format!("{prefix}_{name}"));
            pending = false;
        }
    }
    names
}

/// Alerts and dashboards that name a metric nobody exports never fire and
/// stay empty: every `mesh_*` name in deploy/observability must be one the
/// node or the sidecar registers, and the ones a live process shows must
/// match what the modules register.
#[tokio::test(flavor = "multi_thread")]
async fn deploy_files_name_only_exported_metrics() {
    let mut known = registered("../node/src/metrics.rs");
    known.extend(registered("../sidecar/src/metrics.rs"));
    assert!(known.len() >= 20, "{known:?}");
    // The parse is right: a live node shows its families under these names.
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let _node = NodeProcess::start(&["--backend", "synthetic", "--metrics-listen", &addr]).await;
    for live in families(&addr).await {
        assert!(known.contains(&live), "{live} is exported but not found in the metrics module");
    }

    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/observability");
    let mut checked = 0;
    for file in ["alerts.yml", "grafana-dashboard.json"] {
        let text = std::fs::read_to_string(dir.join(file)).unwrap();
        if file.ends_with(".json") {
            serde_json::from_str::<serde_json::Value>(&text).expect("dashboard is valid JSON");
        }
        for word in text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if !word.starts_with("mesh_") {
                continue;
            }
            let base =
                ["_total", "_bucket", "_count", "_sum"].iter().find_map(|s| word.strip_suffix(s)).unwrap_or(word);
            assert!(known.iter().any(|k| k == base), "{file} names {word}, which no process exports");
            checked += 1;
        }
    }
    assert!(checked >= 15, "only {checked} metric references found");
}
