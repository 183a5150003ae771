//! Hostile bytes on every listening port of a running mesh (node, both
//! sides of two sidecars, every metrics endpoint): garbage, a truncated
//! HTTP/2 preface, an HTTP/1.1 request, a rapid-reset flood of 10,000
//! streams on one connection (the CVE-2023-44487 pattern) and 1 MB of
//! metadata. Each process must keep serving the next good call, bounded in
//! memory, and no instance may be ejected.

use std::net::SocketAddr;
use std::time::Duration;

use mesh_proto::v1::generation_client::GenerationClient;
use mesh_tests::etcd::Etcd;
use mesh_tests::mesh::SidecarProcess;
use mesh_tests::{NodeProcess, Spawned, prompt_request};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;

const METRICS: [&str; 2] = ["--metrics-listen", "127.0.0.1:0"];

/// Words that make the node's synthetic engine panic in the step that reads them.
const POISON: &str = "poison pill here";

/// Streams opened and reset at once on one connection.
const RESETS: usize = 10_000;

/// What the flood may add to a process's resident memory: the server keeps
/// no state for a reset stream past `max_pending_accept_resets`.
const FLOOD_RSS_MIB: u64 = 64;

struct Mesh {
    _etcd: Etcd,
    node: NodeProcess,
    b: SidecarProcess,
    a: SidecarProcess,
}

impl Mesh {
    async fn start() -> Mesh {
        let etcd = Etcd::start().await;
        let args = ["--backend", "synthetic", "--model-name", "chat", "--metrics-listen", "127.0.0.1:0"];
        let node = NodeProcess::start(&[&args[..], &["--synthetic-panic-marker", POISON]].concat()).await;
        let b = SidecarProcess::start_with_args(&etcd, Some(&node), "", &METRICS).await;
        let a = SidecarProcess::start_with_args(&etcd, None, "", &METRICS).await;
        a.wait_for_instances("chat", 1).await;
        Mesh { _etcd: etcd, node, b, a }
    }

    /// Every gRPC port, with the process behind it.
    fn grpc_ports(&self) -> Vec<(&'static str, SocketAddr, &Spawned)> {
        vec![
            ("node", self.node.addr, &self.node.process),
            ("node sidecar inbound", self.b.inbound.unwrap(), self.b.spawned()),
            ("node sidecar outbound", self.b.outbound, self.b.spawned()),
            ("client sidecar outbound", self.a.outbound, self.a.spawned()),
        ]
    }

    fn metrics_ports(&self) -> Vec<(&'static str, SocketAddr)> {
        vec![
            ("node metrics", self.node.metrics.unwrap()),
            ("node sidecar metrics", self.b.metrics().unwrap()),
            ("client sidecar metrics", self.a.metrics().unwrap()),
        ]
    }

    /// A streamed call through both sidecars completes, and every metrics
    /// endpoint answers.
    async fn serves(&self, after: &str) {
        let mut client = self.a.client().await;
        let tokens = call(&mut client).await.unwrap_or_else(|e| panic!("after {after}: a good call failed: {e}"));
        assert_eq!(tokens, 3, "after {after}");
        for (name, addr) in self.metrics_ports() {
            let (status, _) = harness::http_get(addr, "/metrics").await.expect(name);
            assert_eq!(status, 200, "after {after}: {name}");
        }
    }
}

async fn call(client: &mut GenerationClient<Channel>) -> Result<usize, tonic::Status> {
    let req = mesh_proto::v1::GenerateRequest { model: "chat".into(), ..prompt_request("hostile", 3) };
    let mut stream = client.generate(req).await?.into_inner();
    let mut tokens = 0;
    while let Some(m) = stream.message().await? {
        tokens += m.token_ids.len();
    }
    Ok(tokens)
}

/// Sends `bytes` on a fresh connection and reads until the peer closes,
/// or for a second: a server may also wait for more (a truncated preface
/// is held open today: see README, "Hostile input").
async fn send_raw(addr: SocketAddr, bytes: &[u8]) {
    let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let _ = conn.write_all(bytes).await;
    let mut sink = vec![0u8; 64 << 10];
    let read_all = async {
        while let Ok(n) = conn.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), read_all).await;
}

fn garbage() -> Vec<u8> {
    // Deterministic noise: no RNG dependency for a test.
    (0u32..4096).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_bytes_on_every_port_leave_every_process_serving() {
    let mesh = Mesh::start().await;
    mesh.serves("start").await;
    let inputs: [(&str, Vec<u8>); 3] = [
        ("garbage", garbage()),
        ("a truncated HTTP/2 preface", b"PRI * HTTP/2.0\r\n".to_vec()),
        ("an HTTP/1.1 request", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
    ];
    let ports: Vec<(&str, SocketAddr)> =
        mesh.grpc_ports().into_iter().map(|(name, addr, _)| (name, addr)).chain(mesh.metrics_ports()).collect();
    for (what, bytes) in &inputs {
        for (name, addr) in &ports {
            send_raw(*addr, bytes).await;
            mesh.serves(&format!("{what} on {name}")).await;
        }
    }
    for (name, addr, process) in mesh.grpc_ports() {
        let before = rss_kib(process);
        rapid_reset(addr).await;
        mesh.serves(&format!("a rapid-reset flood on {name}")).await;
        let grown = rss_kib(process).saturating_sub(before) / 1024;
        println!("{name}: rapid-reset flood of {RESETS} streams grew RSS by {grown} MiB");
        assert!(grown <= FLOOD_RSS_MIB, "{name}: RSS grew {grown} MiB");
    }
    for (name, addr, _) in mesh.grpc_ports() {
        huge_metadata(name, addr).await;
        mesh.serves(&format!("1 MB of metadata on {name}")).await;
    }
    poisoned_requests(&mesh).await;
    assert!(mesh.a.instances().await.iter().all(|i| !i.ejected), "an instance was ejected");
    let metrics = mesh_tests::scrape(&mesh.a.metrics().unwrap().to_string()).await;
    let ejections: f64 =
        metrics.iter().filter(|(k, _)| k.starts_with("mesh_sidecar_ejections_total")).map(|(_, v)| v).sum();
    assert_eq!(ejections, 0.0, "no instance is ejected by any of it");
}

/// Requests that break the engine end INTERNAL at the caller, and the
/// instance is not charged: 20 such failures in a row would be past the
/// outlier threshold (5) were they counted.
async fn poisoned_requests(mesh: &Mesh) {
    let mut client = mesh.a.client().await;
    let prompt = format!("the mesh {POISON} tokens");
    for _ in 0..20 {
        let req = mesh_proto::v1::GenerateRequest { model: "chat".into(), ..prompt_request(&prompt, 3) };
        let status = match client.generate(req).await {
            Err(status) => status,
            Ok(reply) => reply.into_inner().message().await.expect_err("a poisoned request fails"),
        };
        assert_eq!(status.code(), tonic::Code::Internal, "{status:?}");
    }
    mesh.serves("20 requests that break the engine").await;
    let metrics = mesh_tests::scrape(&mesh.a.metrics().unwrap().to_string()).await;
    let skipped: f64 =
        metrics.iter().filter(|(k, _)| k.starts_with("mesh_sidecar_ejections_skipped_total")).map(|(_, v)| v).sum();
    assert_eq!(skipped, 0.0, "the instance was charged for requests that broke the engine");
}

/// Opens `RESETS` streams on one HTTP/2 connection, resetting each at
/// once, as fast as the connection takes them.
async fn rapid_reset(addr: SocketAddr) {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let Ok((mut client, conn)) = h2::client::handshake(tcp).await else { return };
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut sent = 0;
    for _ in 0..RESETS {
        sent += 1;
        let req = http::Request::post(format!("http://{addr}/mesh.v1.Generation/Generate"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .expect("request");
        if std::future::poll_fn(|cx| client.poll_ready(cx)).await.is_err() {
            break;
        }
        let Ok((_, mut body)) = client.send_request(req, false) else { break };
        body.send_reset(h2::Reason::CANCEL);
    }
    println!("{addr}: {sent} streams opened and reset before the server closed the connection");
    drop(client);
    let _ = tokio::time::timeout(Duration::from_secs(5), driver).await;
}

/// One call carrying a 1 MB metadata value: refused (any status), no crash.
async fn huge_metadata(name: &str, addr: SocketAddr) {
    let channel = Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.expect(name);
    let mut req =
        tonic::Request::new(mesh_proto::v1::GenerateRequest { model: "chat".into(), ..prompt_request("x", 1) });
    let value = "v".repeat(1 << 20).parse().expect("ascii metadata");
    req.metadata_mut().insert("x-padding", value);
    let answer = tokio::time::timeout(Duration::from_secs(10), GenerationClient::new(channel).generate(req)).await;
    let answer = answer.unwrap_or_else(|_| panic!("{name}: no answer within 10 s to 1 MB of metadata"));
    assert!(answer.is_err(), "{name} accepted 1 MB of metadata");
}

fn rss_kib(process: &Spawned) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", process.pid())).expect("process status");
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS");
    line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).expect("VmRSS in kB")
}
