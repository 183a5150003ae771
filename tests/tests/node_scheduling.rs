//! Continuous batching as callers see it: a long prompt is prefilled in
//! chunks while running streams keep streaming, and a freed slot goes to the
//! highest priority waiting (synthetic backend: one step per 1/rate s).

use std::time::Instant;

use mesh_proto::v1::{GenerateRequest, Priority};
use mesh_tests::{NodeProcess, prompt_request};

#[tokio::test(flavor = "multi_thread")]
async fn running_stream_keeps_streaming_while_a_long_prompt_is_prefilled() {
    // 4 prompt tokens per step: a 40-word prompt takes 10 steps to read.
    let node =
        NodeProcess::start(&["--backend", "synthetic", "--synthetic-tokens-per-sec", "100", "--max-step-tokens", "4"])
            .await;
    let mut client = node.client().await;
    let mut running = client.generate(prompt_request("short", 200)).await.unwrap().into_inner();
    running.message().await.unwrap().expect("first token");

    let reader = tokio::spawn(async move {
        let mut stamps = Vec::new();
        while let Some(msg) = running.message().await.unwrap() {
            stamps.extend(msg.token_ids.iter().map(|_| Instant::now()));
        }
        stamps
    });

    let long_prompt = vec!["word"; 40].join(" ");
    let sent = Instant::now();
    let mut long = client.generate(prompt_request(&long_prompt, 5)).await.unwrap().into_inner();
    long.message().await.unwrap().expect("first token of the long prompt");
    let first_token = Instant::now();
    let mut usage = None;
    while let Some(msg) = long.message().await.unwrap() {
        usage = msg.usage.or(usage);
    }
    assert_eq!(usage.expect("usage").prompt_tokens, 40);

    let stamps = reader.await.unwrap();
    let during = stamps.iter().filter(|t| **t > sent && **t < first_token).count();
    // Ten prefill steps of 4 tokens: the running stream got a token in each.
    assert!(during >= 9, "running stream got {during} tokens while the long prompt was read");
}

fn with_priority(prompt: &str, p: Priority) -> GenerateRequest {
    GenerateRequest { priority: p as i32, ..prompt_request(prompt, 3) }
}

#[tokio::test(flavor = "multi_thread")]
async fn freed_slot_goes_to_the_highest_priority_waiting() {
    let node =
        NodeProcess::start(&["--backend", "synthetic", "--synthetic-tokens-per-sec", "50", "--max-running", "1"]).await;
    let mut client = node.client().await;
    let mut blocker = client.generate(prompt_request("blocker", 1000)).await.unwrap().into_inner();
    blocker.message().await.unwrap().expect("running");
    // Queued in this order: low, then high.
    let low = client.generate(with_priority("low", Priority::Low)).await.unwrap().into_inner();
    let high = client.generate(with_priority("high", Priority::High)).await.unwrap().into_inner();
    drop(blocker);
    let finish_time = |mut s: tonic::Streaming<mesh_proto::v1::GenerateResponse>| async move {
        let mut queue_time = 0;
        while let Some(msg) = s.message().await.unwrap() {
            if let Some(u) = msg.usage {
                queue_time = u.queue_time_us;
            }
        }
        queue_time
    };
    let (low_wait, high_wait) = tokio::join!(finish_time(low), finish_time(high));
    // High ran first; low waited for high's three steps on top.
    assert!(high_wait < low_wait, "high waited {high_wait} us, low {low_wait} us");
    assert!(low_wait - high_wait >= 3 * 20_000 - 5_000, "low started only {} us after high", low_wait - high_wait);
}
