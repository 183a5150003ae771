//! Overflow through the whole mesh: `chat` has one slot and no queue,
//! `chat-small` is its overflow service in the client sidecar's
//! `[[routing.overflow]]`. A call `chat` can take is never degraded; one it
//! cannot take is served by `chat-small`, which the response says (metadata
//! and the last message) and the client sidecar counts; a HIGH-priority call
//! is refused instead.

use std::collections::HashMap;

use mesh_proto::metadata as md;
use mesh_proto::v1::generation_client::GenerationClient;
use mesh_proto::v1::{GenerateRequest, Priority};
use mesh_tests::etcd::Etcd;
use mesh_tests::mesh::SidecarProcess;
use mesh_tests::{NodeProcess, free_port, prompt_request, scrape};
use tonic::Code;
use tonic::transport::Channel;

/// One slot at `chat`'s node and no queue: a single long stream fills it.
const ONE_SLOT_NO_QUEUE: &str = r#"
[[services]]
name = "chat"
max_concurrency = 1
max_queue = 0
max_queue_wait = "1s"
"#;

const OVERFLOW_RULE: &str = r#"
[[routing.overflow]]
service = "chat"
to = "chat-small"
"#;

fn chat(prompt: &str, max_tokens: u32, priority: Priority) -> GenerateRequest {
    GenerateRequest { model: "chat".into(), priority: priority as i32, ..prompt_request(prompt, max_tokens) }
}

async fn node(name: &str, tokens_per_sec: &str) -> NodeProcess {
    let args = ["--backend", "synthetic", "--model-name", name, "--synthetic-tokens-per-sec", tokens_per_sec];
    NodeProcess::start(&args).await
}

/// Streams `req` to its end: who served it, per the `x-mesh-served-by`
/// metadata and the last message's `model`.
async fn served_by(
    client: &mut GenerationClient<Channel>,
    req: GenerateRequest,
) -> Result<(String, String), tonic::Status> {
    let response = client.generate(req).await?;
    let said = response.metadata().get(md::SERVED_BY).map(|v| v.to_str().unwrap().to_string());
    let mut stream = response.into_inner();
    let mut model = None;
    while let Some(msg) = stream.message().await? {
        if msg.finish_reason != 0 {
            model = Some(msg.model);
        }
    }
    Ok((said.expect("x-mesh-served-by on the response"), model.expect("a last message")))
}

fn overflowed(metrics: &HashMap<String, f64>) -> f64 {
    let labels = "mesh_sidecar_overflowed_requests_total{service=\"chat\",reason=\"full\"}";
    metrics.get(labels).copied().unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_primary_degrades_low_and_normal_calls_never_high_and_never_when_it_could_serve() {
    let etcd = Etcd::start().await;
    let primary = node("chat", "20").await;
    let small = node("chat-small", "200").await;
    let _b = SidecarProcess::start(&etcd, Some(&primary), ONE_SLOT_NO_QUEUE).await;
    let _c = SidecarProcess::start(&etcd, Some(&small), "").await;
    let metrics = format!("127.0.0.1:{}", free_port());
    let a = SidecarProcess::start_with_args(&etcd, None, OVERFLOW_RULE, &["--metrics-listen", &metrics]).await;
    a.wait_for_instances("chat", 1).await;
    a.wait_for_instances("chat-small", 1).await;
    let mut client = a.client().await;

    // (1) The primary is free: it serves, whatever the priority.
    for p in [Priority::Low, Priority::Unspecified] {
        let served = served_by(&mut client, chat("free", 3, p)).await.unwrap();
        assert_eq!(served, ("chat".into(), "chat".into()), "{p:?} degraded while the primary could serve");
    }
    assert_eq!(overflowed(&scrape(&metrics).await), 0.0);

    // (2) A 2-second stream takes the primary's only slot: LOW and NORMAL
    // calls are served by the overflow service, and say so.
    let mut long = client.generate(chat("long", 40, Priority::Normal)).await.unwrap().into_inner();
    long.message().await.unwrap().expect("first message of the long stream");
    for p in [Priority::Low, Priority::Normal] {
        let served = served_by(&mut client, chat("busy", 3, p)).await.unwrap();
        assert_eq!(served, ("chat-small".into(), "chat-small".into()), "{p:?}");
    }
    assert_eq!(overflowed(&scrape(&metrics).await), 2.0);

    // (3) HIGH is never degraded: refused, with the primary's retry-after.
    let refused = served_by(&mut client, chat("urgent", 3, Priority::High)).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.metadata().get(md::RETRY_AFTER_MS).is_some(), "{refused:?}");
    assert_eq!(overflowed(&scrape(&metrics).await), 2.0);

    while long.message().await.unwrap().is_some() {}
}
