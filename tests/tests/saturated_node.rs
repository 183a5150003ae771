//! A saturated node is refused fast, not timed out: a node that can start
//! only about 10 requests a second (one 4-word prompt per 100 ms step) is
//! flooded through two sidecars. Every request ends OK or
//! RESOURCE_EXHAUSTED with `retry-after-ms`; a refusal comes within the
//! node's 1 s `--max-queue-wait` plus 1 s of slack (the first wave, which
//! arrives before the node has measured its pace) or within 500 ms (the
//! second wave, refused at admission), against the 10 s attempt timeout a
//! caller waited out before; and the instance is never charged for it.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use mesh_proto::metadata as md;
use mesh_proto::v1::GenerateRequest;
use mesh_proto::v1::generation_client::GenerationClient;
use mesh_tests::etcd::Etcd;
use mesh_tests::mesh::SidecarProcess;
use mesh_tests::{NodeProcess, free_port, prompt_request, scrape};
use tonic::Code;
use tonic::transport::Channel;

const WAVE: usize = 100;

const NODE_SIDECAR: &str = r#"
[[services]]
name = "chat"
max_concurrency = 1000
max_queue = 0
max_queue_wait = "5s"
"#;

/// How one request ended, and when it was answered.
struct Answer {
    code: Code,
    after: Duration,
    retry_after: bool,
}

async fn one(mut client: GenerationClient<Channel>, req: GenerateRequest) -> Answer {
    let sent = Instant::now();
    let first = match client.generate(req).await {
        Ok(response) => {
            let mut stream = response.into_inner();
            let first = stream.message().await;
            while let Ok(Some(_)) = stream.message().await {}
            first.map(|_| ())
        }
        Err(status) => Err(status),
    };
    let after = sent.elapsed();
    match first {
        Ok(()) => Answer { code: Code::Ok, after, retry_after: false },
        Err(s) => Answer { code: s.code(), after, retry_after: s.metadata().get(md::RETRY_AFTER_MS).is_some() },
    }
}

async fn wave(client: &GenerationClient<Channel>) -> Vec<Answer> {
    let req = GenerateRequest { model: "chat".into(), ..prompt_request("one two three four", 2) };
    let tasks: Vec<_> = (0..WAVE).map(|_| tokio::spawn(one(client.clone(), req.clone()))).collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// Checks one wave: only OK and RESOURCE_EXHAUSTED, both in number, every
/// refusal with retry-after and within `within`.
fn check(name: &str, answers: &[Answer], within: Duration) {
    let ok = answers.iter().filter(|a| a.code == Code::Ok).count();
    let refused: Vec<_> = answers.iter().filter(|a| a.code == Code::ResourceExhausted).collect();
    assert_eq!(ok + refused.len(), WAVE, "{name}: other codes: {:?}", codes(answers));
    assert!(ok >= 3 && refused.len() >= WAVE / 2, "{name}: {ok} OK, {} refused", refused.len());
    assert!(refused.iter().all(|a| a.retry_after), "{name}: a refusal without retry-after-ms");
    let slowest = refused.iter().map(|a| a.after).max().unwrap();
    eprintln!("{name}: {ok} OK, {} RESOURCE_EXHAUSTED, slowest refusal {slowest:?}", refused.len());
    assert!(slowest <= within, "{name}: a refusal took {slowest:?}, over {within:?}");
}

fn codes(answers: &[Answer]) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    for a in answers {
        *out.entry(format!("{:?}", a.code)).or_default() += 1;
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn a_saturated_node_is_refused_fast_and_its_instance_is_not_charged() {
    let etcd = Etcd::start().await;
    let node = NodeProcess::start(&[
        "--backend",
        "synthetic",
        "--model-name",
        "chat",
        "--synthetic-tokens-per-sec",
        "10",
        "--max-step-tokens",
        "4",
        "--max-running",
        "1000",
        "--max-queued",
        "1000",
        "--max-queue-wait",
        "1s",
    ])
    .await;
    let _b = SidecarProcess::start(&etcd, Some(&node), NODE_SIDECAR).await;
    let a_metrics = format!("127.0.0.1:{}", free_port());
    let a = SidecarProcess::start_with_args(&etcd, None, "", &["--metrics-listen", &a_metrics]).await;
    a.wait_for_instances("chat", 1).await;
    let client = a.client().await;

    // Before the node has timed a step, it admits the whole wave and ends
    // what has not started at its 1 s bound.
    check("first wave", &wave(&client).await, Duration::from_secs(2));
    // Now it knows its pace: what would wait past 1 s is refused at admission.
    check("second wave", &wave(&client).await, Duration::from_millis(500));

    let instances = a.instances().await;
    assert!(instances.iter().all(|i| !i.ejected), "{instances:?}");
    let metrics = scrape(&a_metrics).await;
    let count = |prefix: &str| metrics.iter().filter(|(k, _)| k.starts_with(prefix)).map(|(_, v)| v).sum::<f64>();
    assert_eq!(count("mesh_sidecar_ejections_total"), 0.0);
    assert_eq!(count("mesh_sidecar_ejections_skipped_total"), 0.0, "a refusal was charged as a failure");
}
