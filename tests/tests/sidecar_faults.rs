//! Sidecars under faults, with real etcd, nodes and sidecars: a node
//! killed or hung under steady load, and clients sending bad requests.

use std::time::{Duration, Instant};

use mesh_proto::v1::{FinishReason, GenerateRequest, SamplingParams};
use mesh_tests::etcd::Etcd;
use mesh_tests::mesh::{SidecarProcess, signal};
use mesh_tests::{NodeProcess, generate, prompt_request};
use tonic::Code;

const OUTLIER: &str = r#"
[routing]
attempt_timeout = "1s"
idle_timeout = "1s"
[outlier]
consecutive_failures = 3
base_ejection = "1s"
max_ejection = "4s"
health_interval = "200ms"
health_timeout = "200ms"
"#;

struct Mesh {
    _etcd: Etcd,
    nodes: Vec<NodeProcess>,
    _inbound: Vec<SidecarProcess>,
    client: SidecarProcess,
}

/// Three synthetic nodes of service "chat", each behind its sidecar, and a
/// client-side sidecar.
async fn mesh(tokens_per_sec: &str) -> Mesh {
    let etcd = Etcd::start().await;
    let mut nodes = Vec::new();
    let mut inbound = Vec::new();
    for _ in 0..3 {
        let node = NodeProcess::start(&[
            "--backend",
            "synthetic",
            "--model-name",
            "chat",
            "--synthetic-tokens-per-sec",
            tokens_per_sec,
        ])
        .await;
        inbound.push(SidecarProcess::start(&etcd, Some(&node), OUTLIER).await);
        nodes.push(node);
    }
    let client = SidecarProcess::start(&etcd, None, OUTLIER).await;
    client.wait_for_instances("chat", 3).await;
    Mesh { _etcd: etcd, nodes, _inbound: inbound, client }
}

fn chat(prompt: &str, max_tokens: u32) -> GenerateRequest {
    GenerateRequest { model: "chat".into(), ..prompt_request(prompt, max_tokens) }
}

#[tokio::test(flavor = "multi_thread")]
async fn streams_through_two_sidecars_match_the_node_directly() {
    let m = mesh("200").await;
    let direct = generate(&mut m.nodes[0].client().await, chat("the mesh serves tokens", 12)).await.unwrap();
    let via = generate(&mut m.client.client().await, chat("the mesh serves tokens", 12)).await.unwrap();
    assert_eq!(via.token_ids, direct.token_ids);
    assert_eq!(via.text, direct.text);
    assert_eq!(via.finish_reason, FinishReason::Length as i32);
    let err = generate(&mut m.client.client().await, GenerateRequest { model: "nope".into(), ..chat("x", 2) })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

/// Runs `n` streams of `max_tokens` each; returns the results.
async fn load(
    m: &Mesh,
    n: usize,
    max_tokens: u32,
) -> Vec<tokio::task::JoinHandle<Result<mesh_tests::Completion, tonic::Status>>> {
    let mut tasks = Vec::new();
    for i in 0..n {
        let mut client = m.client.client().await;
        tasks.push(tokio::spawn(async move { generate(&mut client, chat(&format!("request {i}"), max_tokens)).await }));
    }
    tasks
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_node_loses_no_request_streams_migrate_and_it_is_ejected_fast() {
    let mut m = mesh("20").await;
    // 2 s streams, so many are mid-way when the node dies.
    let first_wave = load(&m, 12, 40).await;
    tokio::time::sleep(Duration::from_millis(700)).await; // streams are mid-way (a fault injected at a set time)
    let victim = m.nodes[1].addr;
    m.nodes[1].process.kill().unwrap();
    let killed = Instant::now();
    let second_wave = load(&m, 12, 10).await;

    // The dead instance is ejected within a second of the kill.
    let ejected_after = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            let all = m.client.instances().await;
            if all.iter().any(|i| i.ejected) {
                return killed.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("dead instance ejected");
    eprintln!("node SIGKILL to ejection: {ejected_after:?} (victim node {victim})");
    assert!(ejected_after <= Duration::from_secs(1), "ejected only after {ejected_after:?}");

    let waves: Vec<_> = first_wave.into_iter().chain(second_wave).collect();
    for (i, t) in waves.into_iter().enumerate() {
        let out = t.await.unwrap().unwrap_or_else(|e| panic!("request {i} failed: {e:?}"));
        assert_eq!(out.finish_reason, FinishReason::Length as i32, "request {i}");
        let want = if i < 12 { 40 } else { 10 };
        assert_eq!(out.token_ids.len(), want, "request {i} lost or repeated tokens");
        assert_eq!(out.usage.unwrap().completion_tokens as usize, want);
    }
    let moved = m.client.logged("stream moved to another instance");
    eprintln!("streams moved off the killed node: {moved}");
    assert!(moved >= 1, "no in-flight stream was migrated");
}

#[tokio::test(flavor = "multi_thread")]
async fn migrated_stream_is_identical_to_an_uninterrupted_one() {
    let m = mesh("20").await;
    let reference = generate(&mut m.nodes[0].client().await, chat("same words every time", 40)).await.unwrap();
    // Six streams of the same request spread over the nodes; kill one node mid-way.
    let streams = {
        let mut v = Vec::new();
        for _ in 0..6 {
            let mut client = m.client.client().await;
            v.push(tokio::spawn(async move { generate(&mut client, chat("same words every time", 40)).await }));
        }
        v
    };
    tokio::time::sleep(Duration::from_millis(600)).await;
    signal(&m.nodes[2].process, "KILL");
    for s in streams {
        let out = s.await.unwrap().unwrap();
        assert_eq!(out.token_ids, reference.token_ids);
        assert_eq!(out.text, reference.text);
    }
    assert!(m.client.logged("stream moved to another instance") >= 1, "no stream was on the killed node");
}

#[tokio::test(flavor = "multi_thread")]
async fn hung_node_stops_getting_requests_and_returns_after_sigcont() {
    let m = mesh("100").await;
    signal(&m.nodes[0].process, "STOP");
    let stopped = Instant::now();
    let hung = m.nodes[0].addr;
    // Keep traffic going: every request still succeeds (timeouts move them on).
    let mut client = m.client.client().await;
    let ejected = loop {
        let out = generate(&mut client, chat("keep going", 5)).await.expect("requests succeed around a hung node");
        assert_eq!(out.token_ids.len(), 5);
        if m.client.instances().await.iter().any(|i| i.ejected) {
            break stopped.elapsed();
        }
        assert!(stopped.elapsed() < Duration::from_secs(5), "hung node {hung} not ejected in 5 s");
    };
    eprintln!("node SIGSTOP to ejection: {ejected:?}");

    signal(&m.nodes[0].process, "CONT");
    let back = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if m.client.instances().await.iter().all(|i| !i.ejected) {
                return;
            }
            let _ = generate(&mut client, chat("keep going", 2)).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(back.is_ok(), "resumed node never returned: {:?}", m.client.instances().await);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_at_high_rate_never_eject_an_instance() {
    let m = mesh("200").await;
    let mut client = m.client.client().await;
    for _ in 0..200 {
        let bad = GenerateRequest {
            sampling: Some(SamplingParams { temperature: -1.0, max_tokens: 4, ..Default::default() }),
            ..chat("bad", 4)
        };
        let err = generate(&mut client, bad).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains("sampling.temperature"), "{}", err.message());
    }
    let states = m.client.instances().await;
    assert!(states.iter().all(|i| !i.ejected), "{states:?}");
    assert_eq!(generate(&mut client, chat("fine", 3)).await.unwrap().token_ids.len(), 3);
}
