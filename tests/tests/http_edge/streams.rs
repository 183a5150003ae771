//! Event streams: a client that goes away mid-stream frees its node slot
//! at once, and a thousand streaming clients at once all get every event.

use std::time::{Duration, Instant};

use mesh_tests::NodeProcess;
use serde_json::json;

use super::client::{Events, open, request};
use super::{KEY, Mesh};

const CLIENTS: usize = 1000;
const TOKENS: u64 = 16;

fn streamed(max_tokens: u64) -> String {
    json!({
        "model": "chat", "messages": [{"role": "user", "content": "Tell me a long story."}],
        "max_tokens": max_tokens, "temperature": 0, "stream": true, "stream_options": {"include_usage": true},
    })
    .to_string()
}

/// The node's `name` metric, summed over its labels.
async fn node_metric(mesh: &Mesh, name: &str) -> f64 {
    let scraped = mesh_tests::scrape(&mesh.node.metrics.unwrap().to_string()).await;
    scraped.iter().filter(|(k, _)| k.split('{').next() == Some(name)).map(|(_, v)| v).sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_disconnects_mid_stream_frees_its_node_slot() {
    let mesh = Mesh::real_model().await;
    let response = open(mesh.http(), request("POST", "/v1/chat/completions", Some(KEY), streamed(400))).await;
    let mut events = Events::new(response);
    for _ in 0..3 {
        events.next().await.expect("an event");
    }
    assert_eq!(node_metric(&mesh, "mesh_node_running_sequences").await, 1.0);
    let tokens_at_drop = node_metric(&mesh, "mesh_node_generated_tokens_total").await;
    drop(events); // the connection closes
    let dropped = Instant::now();
    while node_metric(&mesh, "mesh_node_running_sequences").await > 0.0 {
        assert!(dropped.elapsed() < Duration::from_secs(5), "the node still runs the abandoned stream");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let after = node_metric(&mesh, "mesh_node_generated_tokens_total").await - tokens_at_drop;
    eprintln!("slot freed {:?} after the disconnect; {after} tokens generated meanwhile", dropped.elapsed());
    assert!(after <= 2.0, "the slot is freed within a step or two of the disconnect, not after {after} more tokens");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_thousand_streaming_clients_at_once_get_every_event() {
    let node = NodeProcess::start(&[
        "--backend",
        "synthetic",
        "--model-name",
        "chat",
        "--max-running",
        "1200",
        "--max-step-tokens",
        "100000",
        "--synthetic-tokens-per-sec",
        "20",
        "--metrics-listen",
        "127.0.0.1:0",
    ])
    .await;
    let bulkhead =
        "[[services]]\nname = \"chat\"\nmax_concurrency = 1200\nmax_queue = 1200\nmax_queue_wait = \"10s\"\n";
    let mesh = Mesh::start(node, bulkhead).await;
    let edge = mesh.http();
    let started = Instant::now();
    let clients = (0..CLIENTS).map(|_| {
        tokio::spawn(async move {
            let response = open(edge, request("POST", "/v1/chat/completions", Some(KEY), streamed(TOKENS))).await;
            let status = response.status().as_u16();
            if status != 200 {
                return Err(format!("status {status}"));
            }
            let (chunks, done) = Events::new(response).all().await;
            let content = chunks.iter().filter(|c| c["choices"][0]["delta"]["content"].is_string()).count();
            let usage = chunks.last().map(|c| c["usage"]["completion_tokens"].clone());
            match (done, usage) {
                (true, Some(n)) if n == TOKENS && content > 0 => Ok(()),
                other => Err(format!("stream ended without content, [DONE] and its usage: {other:?}")),
            }
        })
    });
    let mut errors = Vec::new();
    for client in clients.collect::<Vec<_>>() {
        if let Err(e) = client.await.expect("a client task") {
            errors.push(e);
        }
    }
    eprintln!("{CLIENTS} streaming clients in {:?}; {} errors", started.elapsed(), errors.len());
    assert!(errors.is_empty(), "{} of {CLIENTS} streams failed, first: {}", errors.len(), errors[0]);
    assert_eq!(node_metric(&mesh, "mesh_node_running_sequences").await, 0.0);
}
