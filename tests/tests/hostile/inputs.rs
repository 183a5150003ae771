//! Requests that are well-formed gRPC but hostile: a 16 MB prompt, 10,000
//! made-up model names, prompts that break the engine.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mesh_proto::v1::GenerateRequest;
use mesh_tests::prompt_request;
use tonic::Code;

use super::{Mesh, POISON, call};

/// What a prompt may take to be refused for its size, at the edge.
const OVERSIZED_REFUSAL: Duration = Duration::from_millis(50);

/// Made-up model names sent through the edge.
const MADE_UP_MODELS: usize = 10_000;

pub async fn oversized_forged_and_random(mesh: &Mesh) {
    let node_calls = node_requests(mesh).await;
    let took = oversized_prompt(mesh.edge.outbound, 16 << 20).await;
    println!("a 16 MB prompt was refused at the edge in {took:?}");
    assert!(took < OVERSIZED_REFUSAL, "a 16 MB prompt took {took:?} to refuse");
    assert_eq!(node_requests(mesh).await, node_calls, "the oversized prompt reached the node");
    made_up_models(mesh).await;
}

/// Generate calls the node has answered, every status.
async fn node_requests(mesh: &Mesh) -> f64 {
    let metrics = mesh_tests::scrape(&mesh.node.metrics.unwrap().to_string()).await;
    metrics.iter().filter(|(k, _)| k.starts_with("mesh_node_requests_total")).map(|(_, v)| v).sum()
}

/// Sends the first 16 KiB of a Generate call whose message says it is
/// `size` bytes long and returns how long the answer took: it must be
/// OUT_OF_RANGE, decided from the length prefix alone. (Through a client
/// library the time would be mostly the client encoding 16 MB.)
async fn oversized_prompt(addr: SocketAddr, size: u32) -> Duration {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (client, conn) = h2::client::handshake(tcp).await.expect("HTTP/2");
    tokio::spawn(conn);
    let mut client = client.ready().await.expect("ready");
    let req = http::Request::post(format!("http://{addr}/mesh.v1.Generation/Generate"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("authorization", "Bearer acme-key")
        .body(())
        .unwrap();
    let mut frame = vec![0u8];
    frame.extend_from_slice(&size.to_be_bytes());
    frame.resize(16 << 10, b'a');
    let started = Instant::now();
    let (answer, mut body) = client.send_request(req, false).expect("send");
    body.send_data(frame.into(), false).expect("data");
    let answer = tokio::time::timeout(Duration::from_secs(5), answer).await.expect("an answer").expect("a response");
    let took = started.elapsed();
    let status = tonic::Status::from_header_map(answer.headers()).expect("a trailers-only gRPC status");
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(status.message().contains(&(2usize << 20).to_string()), "names the limit: {status:?}");
    took
}

/// 10,000 calls naming models nobody serves: each NOT_FOUND, and the
/// request metric gains one series (`unknown`), not one per name.
async fn made_up_models(mesh: &Mesh) {
    let series = |m: &std::collections::HashMap<String, f64>| {
        m.keys().filter(|k| k.starts_with("mesh_sidecar_requests_total")).count()
    };
    let before = series(&mesh_tests::scrape(&mesh.edge.metrics().unwrap().to_string()).await);
    let client = mesh.edge_client().await;
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..16 {
        let client = client.clone();
        tasks.spawn(async move {
            for i in (worker..MADE_UP_MODELS).step_by(16) {
                let req = GenerateRequest { model: format!("model-{i:x}-{}", i * 7919), ..prompt_request("x", 1) };
                let status = call(&client, req, Some("ops-key")).await.unwrap_err();
                assert_eq!(status.code(), Code::NotFound, "{status:?}");
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("a worker panicked");
    }
    let after = series(&mesh_tests::scrape(&mesh.edge.metrics().unwrap().to_string()).await);
    assert!(after <= before + 1, "{MADE_UP_MODELS} made-up models grew the request series from {before} to {after}");
}

/// Requests that break the engine end INTERNAL at the caller, and the
/// instance is not charged: 20 such failures in a row would be past the
/// outlier threshold (5) were they counted.
pub async fn poisoned_requests(mesh: &Mesh) {
    let client = mesh.edge_client().await;
    let prompt = format!("the mesh {POISON} tokens");
    for _ in 0..20 {
        let req = GenerateRequest { model: "chat".into(), ..prompt_request(&prompt, 3) };
        let status = call(&client, req, Some("acme-key")).await.unwrap_err();
        assert_eq!(status.code(), Code::Internal, "{status:?}");
    }
    mesh.serves("20 requests that break the engine").await;
}
