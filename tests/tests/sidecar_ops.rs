//! Operating sidecars: a graceful stop deregisters and drains; meshctl
//! shows a sidecar's live view of every instance; reflection (v1 and
//! v1alpha) lists what each listener serves.

use std::time::{Duration, Instant};

use mesh_proto::v1::{FinishReason, GenerateRequest};
use mesh_tests::etcd::Etcd;
use mesh_tests::mesh::{SidecarProcess, signal};
use mesh_tests::{NodeProcess, bin_dir, generate, prompt_request};
use tonic::transport::Channel;
use tonic_reflection::pb::{v1, v1alpha};

fn chat(max_tokens: u32) -> GenerateRequest {
    GenerateRequest { model: "chat".into(), ..prompt_request("ops", max_tokens) }
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_deregisters_at_once_finishes_streams_and_exits_zero() {
    let etcd = Etcd::start().await;
    let mut nodes = Vec::new();
    let mut inbound = Vec::new();
    for _ in 0..2 {
        let n =
            NodeProcess::start(&["--backend", "synthetic", "--model-name", "chat", "--synthetic-tokens-per-sec", "20"])
                .await;
        inbound.push(SidecarProcess::start(&etcd, Some(&n), "").await);
        nodes.push(n);
    }
    let client = SidecarProcess::start(&etcd, None, "").await;
    client.wait_for_instances("chat", 2).await;
    let mut streams = Vec::new();
    for _ in 0..6 {
        let mut c = client.client().await;
        streams.push(tokio::spawn(async move { generate(&mut c, chat(30)).await }));
    }
    while client.instances().await.iter().map(|i| i.in_flight).sum::<u32>() < 6 {
        tokio::task::yield_now().await;
    }

    signal(inbound[0].process(), "TERM");
    let stopped = Instant::now();
    client.wait_for_instances("chat", 1).await;
    let gone = stopped.elapsed();
    eprintln!("SIGTERM to the instance leaving the client's view: {gone:?}");
    assert!(gone < Duration::from_secs(1), "deregistration took {gone:?} (lease TTL is 2 s)");
    // New work goes to the remaining instance.
    assert_eq!(generate(&mut client.client().await, chat(3)).await.unwrap().token_ids.len(), 3);
    for s in streams {
        let out = s.await.unwrap().expect("in-flight streams finish during the drain");
        assert_eq!((out.finish_reason, out.token_ids.len()), (FinishReason::Length as i32, 30));
    }
    let status = tokio::time::timeout(Duration::from_secs(10), inbound[0].process().wait()).await.unwrap().unwrap();
    assert_eq!(status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn meshctl_shows_load_and_ejections_of_a_sidecar() {
    let etcd = Etcd::start().await;
    let config = "[outlier]\nconsecutive_failures = 2\nhealth_interval = \"200ms\"\n";
    let mut nodes = Vec::new();
    let mut inbound = Vec::new();
    for _ in 0..2 {
        let n = NodeProcess::start(&["--backend", "synthetic", "--model-name", "chat"]).await;
        inbound.push(SidecarProcess::start(&etcd, Some(&n), config).await);
        nodes.push(n);
    }
    let client = SidecarProcess::start(&etcd, None, config).await;
    client.wait_for_instances("chat", 2).await;
    nodes[1].process.kill().unwrap();
    let dead = inbound[1].inbound.unwrap().to_string();
    let json = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let _ = generate(&mut client.client().await, chat(2)).await;
            let out = tokio::process::Command::new(bin_dir().join("meshctl"))
                .args(["status", "--json", "--sidecar", &format!("http://{}", client.outbound)])
                .output()
                .await
                .unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            let text = String::from_utf8(out.stdout).unwrap();
            if text.contains("\"ejected\": true") {
                return text;
            }
        }
    })
    .await
    .expect("meshctl shows the ejection");
    assert!(json.contains(&format!("\"instance_id\": \"{dead}\"")), "{json}");
    assert!(json.contains("consecutive failures") || json.contains("health probe"), "{json}");
    assert!(json.contains("\"etcd_reachable\": true"), "{json}");
}

#[tokio::test(flavor = "multi_thread")]
async fn caller_cancellation_reaches_the_node_at_once() {
    let etcd = Etcd::start().await;
    let node =
        NodeProcess::start(&["--backend", "synthetic", "--model-name", "chat", "--synthetic-tokens-per-sec", "20"])
            .await;
    let _inbound = SidecarProcess::start(&etcd, Some(&node), "").await;
    let client = SidecarProcess::start(&etcd, None, "").await;
    client.wait_for_instances("chat", 1).await;
    let mut stream = client.client().await.generate(chat(1000)).await.unwrap().into_inner();
    stream.message().await.unwrap().expect("streaming");
    drop(stream);
    let dropped = Instant::now();
    let mut direct = node.client().await;
    let freed = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            let r = direct.list_models(mesh_proto::v1::ListModelsRequest {}).await.unwrap();
            if r.metadata().get(mesh_proto::metadata::LOAD_RUNNING).unwrap() == "0" {
                return dropped.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the node's slot is freed");
    eprintln!("caller cancel to the node freeing the slot: {freed:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn tenant_over_its_rate_is_refused_with_retry_after() {
    let etcd = Etcd::start().await;
    let node =
        NodeProcess::start(&["--backend", "synthetic", "--model-name", "chat", "--synthetic-tokens-per-sec", "500"])
            .await;
    let limits = "[tenants.default]\nrequests_per_sec = 2.0\ntokens_per_min = 100000.0\n";
    let _inbound = SidecarProcess::start(&etcd, Some(&node), limits).await;
    let client = SidecarProcess::start(&etcd, None, "").await;
    client.wait_for_instances("chat", 1).await;
    let mut c = client.client().await;
    let req = || GenerateRequest { tenant: "acme".into(), ..chat(2) };
    generate(&mut c, req()).await.unwrap();
    generate(&mut c, req()).await.unwrap();
    let err = generate(&mut c, req()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted);
    assert!(err.message().contains("tenant \"acme\" is over its requests_per_sec limit of 2"), "{}", err.message());
    let after: u64 = err.metadata().get("retry-after-ms").unwrap().to_str().unwrap().parse().unwrap();
    assert!((1..=500).contains(&after), "retry after {after} ms");
    // Another tenant has its own bucket.
    generate(&mut c, GenerateRequest { tenant: "other".into(), ..chat(2) }).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_configuration_is_refused_naming_the_key() {
    let path = std::env::temp_dir().join(format!("bad-sidecar-{}.toml", std::process::id()));
    let text = "[listen]\noutbound = \"127.0.0.1:0\"\ninbound = \"127.0.0.1:0\"\n[etcd]\nendpoints = []\n";
    std::fs::write(&path, text).unwrap();
    let out =
        tokio::process::Command::new(bin_dir().join("mesh-sidecar")).arg("--config").arg(&path).output().await.unwrap();
    let _ = std::fs::remove_file(&path);
    assert_eq!(out.status.code(), Some(2));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("etcd.endpoints: needs at least one endpoint"), "{log}");
}

/// The sorted names `ListServices` answers over `$version`'s client.
macro_rules! list_services {
    ($version:ident, $channel:expr) => {{
        use $version::server_reflection_client::ServerReflectionClient;
        use $version::server_reflection_request::MessageRequest;
        use $version::server_reflection_response::MessageResponse;
        let ask = $version::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut client = ServerReflectionClient::new($channel.clone());
        let mut answers = client.server_reflection_info(tokio_stream::once(ask)).await.unwrap().into_inner();
        match answers.message().await.unwrap().and_then(|a| a.message_response) {
            Some(MessageResponse::ListServicesResponse(list)) => {
                let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
                names.sort();
                names
            }
            other => panic!("{} answered {other:?}", stringify!($version)),
        }
    }};
}

/// What every listener serves beside its own services.
const ALWAYS_SERVED: [&str; 3] =
    ["grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"];

#[tokio::test(flavor = "multi_thread")]
async fn reflection_lists_what_each_listener_serves_in_both_versions() {
    let etcd = Etcd::start().await;
    let node = NodeProcess::start(&["--backend", "synthetic", "--model-name", "chat"]).await;
    let sidecar = SidecarProcess::start(&etcd, Some(&node), "").await;
    let (generation, admin) = ("mesh.v1.Generation", "mesh.v1.SidecarAdmin");
    for (listener, addr, own) in [
        ("node", node.addr, vec![generation]),
        ("inbound", sidecar.inbound.unwrap(), vec![generation]),
        ("outbound", sidecar.outbound, vec![generation, admin]),
    ] {
        let mut want: Vec<&str> = own.into_iter().chain(ALWAYS_SERVED).collect();
        want.sort();
        let channel = Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
        assert_eq!(list_services!(v1, channel), want, "{listener} over v1");
        assert_eq!(list_services!(v1alpha, channel), want, "{listener} over v1alpha");
    }
}
