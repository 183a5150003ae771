//! SIGTERM drains a node: health goes NOT_SERVING, new calls are refused,
//! in-flight streams finish (or are cancelled when the grace runs out), and
//! the process exits 0. Also: health and reflection are served.

use std::time::Duration;

use mesh_proto::v1::FinishReason;
use mesh_tests::{Completion, NodeProcess, generate, prompt_request};
use tokio_stream::StreamExt;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

fn sigterm(node: &NodeProcess) {
    node.process.signal("TERM").unwrap();
}

async fn health(node: &NodeProcess) -> ServingStatus {
    let mut h = HealthClient::new(node.channel().await);
    let r = h.check(HealthCheckRequest { service: "mesh.v1.Generation".into() }).await.unwrap();
    r.into_inner().status()
}

/// Starts `n` streams and waits until each has its first token.
async fn in_flight(node: &NodeProcess, n: usize, max_tokens: u32) -> Vec<tokio::task::JoinHandle<Completion>> {
    let mut tasks = Vec::new();
    for _ in 0..n {
        let mut stream =
            node.client().await.generate(prompt_request("drain me", max_tokens)).await.unwrap().into_inner();
        let mut out = Completion::default();
        out.absorb(stream.message().await.unwrap().unwrap());
        tasks.push(tokio::spawn(async move {
            while let Some(msg) = stream.message().await.unwrap() {
                out.absorb(msg);
            }
            out
        }));
    }
    tasks
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_lets_streams_finish_refuses_new_calls_and_exits_zero() {
    let mut node = NodeProcess::start(&["--backend", "synthetic", "--synthetic-tokens-per-sec", "20"]).await;
    assert_eq!(health(&node).await, ServingStatus::Serving);
    let streams = in_flight(&node, 3, 30).await;
    sigterm(&node);

    let mut client = node.client().await;
    let refused = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match generate(&mut client, prompt_request("too late", 4)).await {
                Err(e) => return e,
                Ok(_) => tokio::task::yield_now().await, // signal not handled yet
            }
        }
    })
    .await
    .expect("new calls are refused once draining");
    assert_eq!(refused.code(), Code::Unavailable);
    assert!(refused.message().contains("draining"), "{}", refused.message());
    assert_eq!(health(&node).await, ServingStatus::NotServing);

    for s in streams {
        let out = s.await.unwrap();
        assert_eq!(out.finish_reason, FinishReason::Length as i32);
        assert_eq!(out.token_ids.len(), 30);
    }
    let status = tokio::time::timeout(Duration::from_secs(10), node.process.wait()).await.unwrap().unwrap();
    assert_eq!(status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn streams_past_the_grace_period_are_cancelled_then_exit_zero() {
    let mut node =
        NodeProcess::start(&["--backend", "synthetic", "--synthetic-tokens-per-sec", "20", "--drain-grace", "300ms"])
            .await;
    let streams = in_flight(&node, 2, 1000).await;
    sigterm(&node);
    for s in streams {
        let out = s.await.unwrap();
        assert_eq!(out.finish_reason, FinishReason::Cancelled as i32);
        assert!(out.token_ids.len() < 1000);
    }
    let status = tokio::time::timeout(Duration::from_secs(10), node.process.wait()).await.unwrap().unwrap();
    assert_eq!(status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn reflection_lists_the_services() {
    let node = NodeProcess::start(&["--backend", "synthetic"]).await;
    let mut client = ServerReflectionClient::new(node.channel().await);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = client.server_reflection_info(tokio_stream::iter([req])).await.unwrap().into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) = responses.next().await.unwrap().unwrap().message_response
    else {
        panic!("expected a service list");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in ["mesh.v1.Generation", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection"] {
        assert!(names.iter().any(|n| n == want), "{want} missing from {names:?}");
    }
}
