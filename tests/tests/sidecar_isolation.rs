//! Routing quality and isolation, measured: least-loaded against round
//! robin on nodes of unequal speed, and a flooded service next to a quiet one.

use std::time::{Duration, Instant};

use mesh_proto::v1::GenerateRequest;
use mesh_tests::etcd::Etcd;
use mesh_tests::mesh::SidecarProcess;
use mesh_tests::{NodeProcess, prompt_request};
use tonic::Code;

fn request(service: &str, max_tokens: u32) -> GenerateRequest {
    GenerateRequest { model: service.into(), ..prompt_request("load", max_tokens) }
}

/// One finished request: its status code and client-side time to first token.
type Sample = (Code, Duration);

/// `workers` callers, each sending requests back to back for `duration`.
async fn closed_loop(sidecar: &SidecarProcess, service: &str, workers: usize, duration: Duration) -> Vec<Sample> {
    let end = Instant::now() + duration;
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let mut client = sidecar.client().await;
        let service = service.to_string();
        tasks.push(tokio::spawn(async move {
            let mut samples = Vec::new();
            while Instant::now() < end {
                samples.push(one(&mut client, request(&service, 5)).await);
            }
            samples
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all
}

async fn one(
    client: &mut mesh_proto::v1::generation_client::GenerationClient<tonic::transport::Channel>,
    req: GenerateRequest,
) -> Sample {
    let start = Instant::now();
    let mut stream = match client.generate(req).await {
        Ok(r) => r.into_inner(),
        Err(e) => return (e.code(), start.elapsed()),
    };
    let ttft = match stream.message().await {
        Ok(Some(_)) => start.elapsed(),
        Ok(None) => return (Code::Internal, start.elapsed()),
        Err(e) => return (e.code(), start.elapsed()),
    };
    loop {
        match stream.message().await {
            Ok(Some(_)) => {}
            Ok(None) => return (Code::Ok, ttft),
            Err(e) => return (e.code(), ttft),
        }
    }
}

fn p99(samples: &[Sample]) -> Duration {
    let mut ok: Vec<Duration> = samples.iter().filter(|(c, _)| *c == Code::Ok).map(|(_, t)| *t).collect();
    ok.sort();
    assert!(!ok.is_empty(), "no successful requests");
    ok[((ok.len() as f64 * 0.99).ceil() as usize).clamp(1, ok.len()) - 1]
}

async fn node(name: &str, rate: &str, extra: &[&str]) -> NodeProcess {
    let mut args = vec!["--backend", "synthetic", "--model-name", name, "--synthetic-tokens-per-sec", rate];
    args.extend_from_slice(extra);
    NodeProcess::start(&args).await
}

#[tokio::test(flavor = "multi_thread")]
async fn least_loaded_beats_round_robin_on_unequal_nodes() {
    let etcd = Etcd::start().await;
    // Two nodes at 100 tokens/s and one 4x slower, 4 streams each at a time.
    let mut nodes = Vec::new();
    let mut sidecars = Vec::new();
    for rate in ["100", "100", "25"] {
        let n = node("chat", rate, &["--max-running", "4"]).await;
        sidecars.push(SidecarProcess::start(&etcd, Some(&n), "").await);
        nodes.push(n);
    }
    let ll = SidecarProcess::start(&etcd, None, "[routing]\npolicy = \"least-loaded\"\n").await;
    let rr = SidecarProcess::start(&etcd, None, "[routing]\npolicy = \"round-robin\"\n").await;
    ll.wait_for_instances("chat", 3).await;
    rr.wait_for_instances("chat", 3).await;

    let workers = 10;
    let rr_samples = closed_loop(&rr, "chat", workers, Duration::from_secs(4)).await;
    let ll_samples = closed_loop(&ll, "chat", workers, Duration::from_secs(4)).await;
    let (p_ll, p_rr) = (p99(&ll_samples), p99(&rr_samples));
    eprintln!(
        "p99 TTFT, {workers} closed-loop callers: least-loaded {p_ll:?} ({} requests), round-robin {p_rr:?} ({} requests)",
        ll_samples.len(),
        rr_samples.len()
    );
    assert!(ll_samples.iter().chain(&rr_samples).all(|(c, _)| *c == Code::Ok));
    assert!(p_ll.mul_f64(1.5) < p_rr, "least-loaded p99 {p_ll:?} is not clearly below round-robin {p_rr:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn flooded_service_does_not_hurt_its_neighbour() {
    let etcd = Etcd::start().await;
    let limits = r#"
[[services]]
name = "a"
max_concurrency = 8
max_queue = 8
max_queue_wait = "1s"
[[services]]
name = "b"
max_concurrency = 8
max_queue = 8
max_queue_wait = "1s"
"#;
    // Each service: one node, 8 streams at 10 tokens/s: 5-token requests
    // take 0.5 s, so capacity is 16 requests/s.
    let node_a = node("a", "10", &["--max-running", "8"]).await;
    let node_b = node("b", "10", &["--max-running", "8"]).await;
    let _sa = SidecarProcess::start(&etcd, Some(&node_a), limits).await;
    let _sb = SidecarProcess::start(&etcd, Some(&node_b), limits).await;
    let client = SidecarProcess::start(&etcd, None, "").await;
    client.wait_for_instances("a", 1).await;
    client.wait_for_instances("b", 1).await;

    // B at half its capacity: 4 callers back to back.
    let quiet = closed_loop(&client, "b", 4, Duration::from_secs(3)).await;

    // A offered ten times its capacity (160 requests/s) while B runs the same.
    let flood_end = Instant::now() + Duration::from_secs(4);
    let flood_client = client.client().await;
    let flood = tokio::spawn(async move {
        let mut sent = Vec::new();
        while Instant::now() < flood_end {
            let mut c = flood_client.clone();
            sent.push(tokio::spawn(async move { one(&mut c, request("a", 5)).await }));
            tokio::time::sleep(Duration::from_micros(6_250)).await;
        }
        let mut codes = Vec::new();
        for s in sent {
            codes.push(s.await.unwrap().0);
        }
        codes
    });
    tokio::time::sleep(Duration::from_millis(500)).await; // the flood is on (a load step at a set time)
    let noisy = closed_loop(&client, "b", 4, Duration::from_secs(3)).await;
    let flood_codes = flood.await.unwrap();

    let refused = flood_codes.iter().filter(|c| **c == Code::ResourceExhausted).count();
    eprintln!(
        "flood on a: {} sent, {} refused with RESOURCE_EXHAUSTED; b p99 TTFT quiet {:?}, during flood {:?}",
        flood_codes.len(),
        refused,
        p99(&quiet),
        p99(&noisy)
    );
    assert!(refused > flood_codes.len() / 2, "the flood was not shed");
    assert!(noisy.iter().all(|(c, _)| *c == Code::Ok), "b saw errors during a's flood");
    assert!(p99(&noisy) <= p99(&quiet).mul_f64(1.5), "b's p99 TTFT grew past 1.5x");
}

#[tokio::test(flavor = "multi_thread")]
async fn outbound_streams_are_capped_per_service() {
    let etcd = Etcd::start().await;
    let node_a = node("a", "20", &[]).await;
    let node_b = node("b", "200", &[]).await;
    let _sa = SidecarProcess::start(&etcd, Some(&node_a), "").await;
    let _sb = SidecarProcess::start(&etcd, Some(&node_b), "").await;
    let client = SidecarProcess::start(&etcd, None, "[routing]\nmax_streams_per_service = 2\n").await;
    client.wait_for_instances("a", 1).await;
    client.wait_for_instances("b", 1).await;
    let mut c = client.client().await;
    let mut open = Vec::new();
    for _ in 0..2 {
        let mut s = c.generate(request("a", 500)).await.unwrap().into_inner();
        s.message().await.unwrap().expect("streaming");
        open.push(s);
    }
    let err = c.generate(request("a", 5)).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(err.message().contains("already has 2 streams open to service \"a\""), "{}", err.message());
    assert!(err.metadata().get("retry-after-ms").is_some());
    // Another service is untouched by a's cap.
    assert_eq!(one(&mut c, request("b", 5)).await.0, Code::Ok);
    // A finished stream frees its slot.
    drop(open.pop());
    let freed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if one(&mut c, request("a", 2)).await.0 == Code::Ok {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(freed.is_ok(), "the slot was never freed");
}
