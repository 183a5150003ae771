//! A node's sidecar is ready only once its record is in etcd; a client
//! sidecar drains the streams it relays (gRPC and HTTP edge) when it is
//! stopped. (A node's crash and restart under systemd, which restarts its
//! sidecar with it, is in systemd_units.rs.)

use std::time::{Duration, Instant};

use mesh_proto::v1::{FinishReason, GenerateRequest};
use mesh_tests::etcd::Etcd;
use mesh_tests::mesh::{SidecarProcess, signal};
use mesh_tests::{NodeProcess, generate, prompt_request};
use registry::EtcdConfig;

fn chat(max_tokens: u32) -> GenerateRequest {
    GenerateRequest { model: "chat".into(), ..prompt_request("coupling", max_tokens) }
}

const NODE: [&str; 6] = ["--backend", "synthetic", "--model-name", "chat", "--synthetic-tokens-per-sec", "20"];

#[tokio::test(flavor = "multi_thread")]
async fn a_sidecar_is_ready_only_once_its_record_is_in_etcd() {
    let etcd = Etcd::start().await;
    let node = NodeProcess::start(&NODE).await;
    let inbound = SidecarProcess::start(&etcd, Some(&node), "").await;
    // Ready means routable: the record is in etcd when the ready line is out.
    let advertised = inbound.inbound.unwrap().to_string();
    let records = registry::etcd::fetch_all(&EtcdConfig::new(vec![etcd.url()])).await.unwrap();
    assert!(records.iter().any(|r| r.address == advertised), "ready before registered: {records:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_client_sidecar_finishes_its_streams_and_takes_no_new_calls() {
    let etcd = Etcd::start().await;
    let node = NodeProcess::start(&NODE).await;
    let _inbound = SidecarProcess::start(&etcd, Some(&node), "").await;
    let mut client = SidecarProcess::start_edge(&etcd, "", &[]).await;
    client.wait_for_instances("chat", 1).await;
    // 2 s streams at 20 tokens/s: four over gRPC, one through the HTTP edge.
    let mut streams = Vec::new();
    for _ in 0..4 {
        let mut c = client.client().await;
        streams.push(tokio::spawn(async move { generate(&mut c, chat(40)).await }));
    }
    let body = r#"{"model":"chat","messages":[{"role":"user","content":"drain"}],"max_tokens":40,"stream":true,"stream_options":{"include_usage":true}}"#;
    let edge = tokio::process::Command::new("curl")
        .args(["-sN", "-H", "content-type: application/json", "-d", body])
        .arg(format!("http://{}/v1/chat/completions", client.http.unwrap()))
        .output();
    let edge = tokio::spawn(edge);
    while client.instances().await.iter().map(|i| i.in_flight).sum::<u32>() < 5 {
        tokio::task::yield_now().await;
    }
    signal(client.process(), "TERM");
    let stopped = Instant::now();
    while client.logged("draining") == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let late = tokio::time::timeout(Duration::from_secs(2), async {
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{}", client.outbound)).unwrap();
        let Ok(channel) = endpoint.connect().await else { return Err("connection refused".to_string()) };
        let mut late = mesh_proto::v1::generation_client::GenerationClient::new(channel);
        late.generate(chat(2)).await.map(drop).map_err(|s| s.to_string())
    });
    let late = late.await;
    assert!(matches!(late, Ok(Err(_))), "a call after SIGTERM was taken: {late:?}");
    for s in streams {
        let out = s.await.unwrap().expect("streams in flight finish during the drain");
        assert_eq!((out.finish_reason, out.token_ids.len()), (FinishReason::Length as i32, 40));
    }
    let sse = String::from_utf8(edge.await.unwrap().unwrap().stdout).unwrap();
    assert!(sse.contains(r#""completion_tokens":40"#) && sse.ends_with("data: [DONE]\n\n"), "the edge stream: {sse}");
    let status = tokio::time::timeout(Duration::from_secs(5), client.process().wait()).await.unwrap().unwrap();
    eprintln!("client sidecar: SIGTERM to exit {:?}", stopped.elapsed());
    assert_eq!(status.code(), Some(0));
}
