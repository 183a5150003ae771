//! The hostile-input suite: one mesh as it is deployed (mutual TLS between
//! hosts with workload identities, a node that serves only its own
//! sidecar, API keys at the edge, metrics on every process) and every
//! attack on it, each asserting its exact outcome. Afterwards every
//! process must still serve, and no instance may have been ejected.
//!
//! Cases that need a mesh set up otherwise live beside it: etcd with
//! client certificates and RBAC (etcd_trust.rs), identity rules and who a
//! call is charged to under tenant limits (identity.rs), the node alone
//! (node_hostile.rs: prompts at its length limits, forged chat turns, a
//! panicking step, out-of-range flags), and config files with every
//! numeric key out of range (the sidecar's config tests).

mod identity;
mod inputs;
mod surfaces;
mod wire;

use std::net::SocketAddr;

use mesh_proto::v1::GenerateRequest;
use mesh_proto::v1::generation_client::GenerationClient;
use mesh_tests::etcd::Etcd;
use mesh_tests::mesh::SidecarProcess;
use mesh_tests::pki::Pki;
use mesh_tests::{NodeProcess, Spawned, prompt_request};
use tonic::transport::Channel;

const METRICS: [&str; 2] = ["--metrics-listen", "127.0.0.1:0"];

/// Words that make the node's synthetic engine panic in the step that reads them.
const POISON: &str = "poison pill here";

/// The edge's keys: `acme` may call `chat`, `other` only `code`, `ops` is
/// an admin key, `raw` may send special tokens.
const KEYS: [(&str, &str, &str); 4] = [
    ("acme", "acme-key", "services = [\"chat\"]"),
    ("other", "code-key", "services = [\"code\"]"),
    ("ops", "ops-key", "admin = true"),
    ("raw", "raw-key", "allow_special_tokens = true"),
];

/// Plaintext listeners close a silent or partial preface after this.
const PREFACE_TIMEOUT: &str = "1s";

struct Mesh {
    pki: Pki,
    _etcd: Etcd,
    /// Serves only `gpu`'s sidecar identity.
    node: NodeProcess,
    /// The GPU host's sidecar, fronting the node.
    gpu: SidecarProcess,
    /// A client host's sidecar, where calls enter with API keys.
    edge: SidecarProcess,
}

impl Mesh {
    async fn start() -> Mesh {
        let pki = Pki::new().await;
        for (name, role) in [("gpu", "sidecar"), ("gpu-node", "node"), ("edge", "sidecar"), ("laptop", "client")] {
            pki.issue(name, role).await;
        }
        let etcd = Etcd::start().await;
        let node = NodeProcess::start(&Self::node_args(&pki).iter().map(String::as_str).collect::<Vec<_>>()).await;
        let http2 = format!("[http2]\npreface_timeout = \"{PREFACE_TIMEOUT}\"\n");
        let gpu_config = pki.tls_section("gpu") + &http2;
        let gpu = SidecarProcess::start_with_args(&etcd, Some(&node), &gpu_config, &METRICS).await;
        let mut keys = String::new();
        for (tenant, key, extra) in KEYS {
            let digest = hash_key(key).await;
            keys += &format!("[[api_keys]]\ntenant = \"{tenant}\"\nsha256 = \"{digest}\"\n{extra}\n");
        }
        let edge_config = format!("{}{http2}{keys}", pki.tls_section("edge"));
        let edge = SidecarProcess::start_with_args(&etcd, None, &edge_config, &METRICS).await;
        edge.wait_for_instances("chat", 1).await;
        Mesh { pki, _etcd: etcd, node, gpu, edge }
    }

    fn node_args(pki: &Pki) -> Vec<String> {
        let flags = [
            ("--backend", "synthetic".to_string()),
            ("--model-name", "chat".into()),
            ("--metrics-listen", "127.0.0.1:0".into()),
            ("--synthetic-panic-marker", POISON.into()),
            ("--tls-cert", pki.path("gpu-node.pem")),
            ("--tls-key", pki.path("gpu-node.key")),
            ("--tls-client-ca", pki.path("ca.pem")),
            ("--tls-allow-peer", "spiffe://mesh/host/gpu/role/sidecar".into()),
        ];
        flags.into_iter().flat_map(|(k, v)| [k.to_string(), v]).collect()
    }

    /// Every gRPC port, with the process behind it and, for TLS ports, the
    /// certificate that port serves.
    fn grpc_ports(&self) -> Vec<Port<'_>> {
        vec![
            Port { name: "node", addr: self.node.addr, process: &self.node.process, tls_as: Some("gpu") },
            Port {
                name: "gpu inbound",
                addr: self.gpu.inbound.unwrap(),
                process: self.gpu.spawned(),
                tls_as: Some("edge"),
            },
            Port { name: "gpu outbound", addr: self.gpu.outbound, process: self.gpu.spawned(), tls_as: None },
            Port { name: "edge outbound", addr: self.edge.outbound, process: self.edge.spawned(), tls_as: None },
        ]
    }

    fn metrics_ports(&self) -> Vec<(&'static str, SocketAddr)> {
        vec![
            ("node metrics", self.node.metrics.unwrap()),
            ("gpu sidecar metrics", self.gpu.metrics().unwrap()),
            ("edge sidecar metrics", self.edge.metrics().unwrap()),
        ]
    }

    /// A streamed call through both sidecars completes with a good key, and
    /// every metrics endpoint answers.
    async fn serves(&self, after: &str) {
        let tokens = call(&self.edge_client().await, chat(3), Some("acme-key")).await;
        assert_eq!(tokens.unwrap_or_else(|e| panic!("after {after}: a good call failed: {e}")), 3, "after {after}");
        for (name, addr) in self.metrics_ports() {
            let (status, _) = harness::http_get(addr, "/metrics").await.expect(name);
            assert_eq!(status, 200, "after {after}: {name}");
        }
    }

    async fn edge_client(&self) -> GenerationClient<Channel> {
        self.edge.client().await
    }

    /// The sum of every series of `metric` on the edge sidecar.
    async fn edge_metric(&self, metric: &str) -> f64 {
        let metrics = mesh_tests::scrape(&self.edge.metrics().unwrap().to_string()).await;
        metrics.iter().filter(|(k, _)| k.starts_with(metric)).map(|(_, v)| v).sum()
    }
}

/// `meshctl hash-key`, as an operator runs it: the key on stdin.
async fn hash_key(key: &str) -> String {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new(mesh_tests::bin_dir().join("meshctl"))
        .arg("hash-key")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("meshctl");
    child.stdin.take().expect("stdin").write_all(key.as_bytes()).await.expect("writing the key");
    let out = child.wait_with_output().await.expect("meshctl hash-key");
    assert!(out.status.success(), "meshctl hash-key failed");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// One listening gRPC port.
struct Port<'a> {
    name: &'static str,
    addr: SocketAddr,
    process: &'a Spawned,
    /// The PKI name whose certificate passes this TLS port's rule; `None`: plaintext.
    tls_as: Option<&'static str>,
}

fn chat(max_tokens: u32) -> GenerateRequest {
    GenerateRequest { model: "chat".into(), ..prompt_request("hostile", max_tokens) }
}

/// One generation call with `key` as its bearer; the tokens streamed.
async fn call(
    client: &GenerationClient<Channel>,
    req: GenerateRequest,
    key: Option<&str>,
) -> Result<usize, tonic::Status> {
    let mut req = tonic::Request::new(req);
    if let Some(k) = key {
        req.metadata_mut().insert("authorization", format!("Bearer {k}").parse().unwrap());
    }
    let mut stream = client.clone().generate(req).await?.into_inner();
    let mut tokens = 0;
    while let Some(m) = stream.message().await? {
        tokens += m.token_ids.len();
    }
    Ok(tokens)
}

#[tokio::test(flavor = "multi_thread")]
async fn every_attack_gets_its_exact_answer_and_the_mesh_keeps_serving() {
    let mesh = Mesh::start().await;
    mesh.serves("start").await;
    identity::refused_at_the_handshake_or_by_identity(&mesh).await;
    surfaces::every_outbound_method_takes_a_key(&mesh).await;
    inputs::oversized_forged_and_random(&mesh).await;
    wire::hostile_bytes_on_every_port(&mesh).await;
    inputs::poisoned_requests(&mesh).await;

    mesh.serves("the whole suite").await;
    assert!(mesh.edge.instances().await.iter().all(|i| !i.ejected), "an instance was ejected");
    assert_eq!(mesh.edge_metric("mesh_sidecar_ejections_total").await, 0.0, "ejected by the suite");
    assert_eq!(mesh.edge_metric("mesh_sidecar_ejections_skipped_total").await, 0.0, "the instance was charged");
}
