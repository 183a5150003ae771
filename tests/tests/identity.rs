//! Workload identity and authorization with real processes, real TLS and
//! certificates from `meshctl`: who each listener serves, and who a call is
//! charged to.

use std::net::SocketAddr;
use std::time::Duration;

use mesh_proto::v1::GenerateRequest;
use mesh_proto::v1::generation_client::GenerationClient;
use mesh_tests::etcd::Etcd;
use mesh_tests::mesh::SidecarProcess;
use mesh_tests::pki::Pki;
use mesh_tests::{NodeProcess, bin_dir, free_port, prompt_request};
use tokio::io::{AsyncBufReadExt, BufReader};
use tonic::transport::Channel;
use tonic::{Code, Status};

const GPU_SIDECAR: &str = "spiffe://mesh/host/gpu/role/sidecar";

/// `acme` may make 1000 requests a second; everyone else (`default`) one
/// every 5 s, so a second call at once is refused and names its tenant.
const LIMITS: &str = "[tenants.default]\nrequests_per_sec = 0.2\ntokens_per_min = 1000000.0\n\
                      [tenants.acme]\nrequests_per_sec = 1000.0\ntokens_per_min = 1000000.0\n";

/// One generation call; `claim` sets the `x-mesh-tenant` metadata, the
/// body always names `acme`.
async fn call(channel: &Channel, claim: Option<&str>, key: Option<&str>) -> Result<usize, Status> {
    let mut req =
        tonic::Request::new(GenerateRequest { model: "chat".into(), tenant: "acme".into(), ..prompt_request("id", 2) });
    if let Some(c) = claim {
        req.metadata_mut().insert("x-mesh-tenant", c.parse().unwrap());
    }
    if let Some(k) = key {
        req.metadata_mut().insert("authorization", format!("Bearer {k}").parse().unwrap());
    }
    let mut stream = GenerationClient::new(channel.clone()).generate(req).await?.into_inner();
    let mut tokens = 0;
    while let Some(m) = stream.message().await? {
        tokens += m.token_ids.len();
    }
    Ok(tokens)
}

fn refused_naming(result: Result<usize, Status>, code: Code, text: &str) {
    let status = result.expect_err(text);
    assert_eq!(status.code(), code, "{status:?}");
    assert!(status.message().contains(text), "{:?} does not name {text}", status.message());
}

/// A node that serves only the `gpu` sidecar, behind that sidecar.
async fn gpu_host(pki: &Pki, etcd: &Etcd, inbound_peers: &str) -> (NodeProcess, SidecarProcess) {
    let (cert, key, ca) = (pki.path("gpu-node.pem"), pki.path("gpu-node.key"), pki.path("ca.pem"));
    let node = NodeProcess::start(&[
        "--backend",
        "synthetic",
        "--model-name",
        "chat",
        "--synthetic-tokens-per-sec",
        "500",
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--tls-client-ca",
        &ca,
        "--tls-allow-peer",
        GPU_SIDECAR,
    ])
    .await;
    let config = format!("{}inbound_peers = [{inbound_peers}]\n{LIMITS}", pki.tls_section("gpu"));
    let sidecar = SidecarProcess::start(etcd, Some(&node), &config).await;
    (node, sidecar)
}

#[tokio::test(flavor = "multi_thread")]
async fn each_listener_serves_only_its_identities_and_charges_the_caller_it_can_prove() {
    let pki = Pki::new().await;
    for (name, role) in
        [("gpu", "sidecar"), ("gpu-node", "node"), ("edge", "sidecar"), ("laptop", "client"), ("ops", "operator")]
    {
        pki.issue(name, role).await;
    }
    let etcd = Etcd::start().await;
    let peers = "\"spiffe://mesh/host/*/role/sidecar\", \"spiffe://mesh/host/ops/role/operator\"";
    let (node, gpu) = gpu_host(&pki, &etcd, peers).await;
    let inbound = gpu.inbound.unwrap();
    inbound_rules(&pki, inbound).await;
    node_and_handshake_rules(&pki, node.addr, inbound).await;
}

/// The inbound side: who it serves, and who each call is charged to.
async fn inbound_rules(pki: &Pki, inbound: SocketAddr) {
    // A client host's certificate from the same CA is refused, named.
    let laptop = pki.channel(inbound, "laptop");
    refused_naming(
        call(&laptop, Some("acme"), None).await,
        Code::PermissionDenied,
        "spiffe://mesh/host/laptop/role/client",
    );
    // A sidecar's claim is believed: acme's limit lets three calls through at once.
    let edge = pki.channel(inbound, "edge");
    for _ in 0..3 {
        assert_eq!(call(&edge, Some("acme"), None).await.unwrap(), 2);
    }
    // An operator (served here by config) is charged as itself, whatever
    // its body and claim say: `default`'s one request, then refused.
    let ops = pki.channel(inbound, "ops");
    assert_eq!(call(&ops, Some("acme"), None).await.unwrap(), 2);
    refused_naming(
        call(&ops, Some("acme"), None).await,
        Code::ResourceExhausted,
        "tenant \"spiffe://mesh/host/ops/role/operator\"",
    );
    // A sidecar that claims nothing is charged as itself too.
    assert_eq!(call(&edge, None, None).await.unwrap(), 2);
    refused_naming(
        call(&edge, None, None).await,
        Code::ResourceExhausted,
        "tenant \"spiffe://mesh/host/edge/role/sidecar\"",
    );
}

/// The node serves its own sidecar only; a certificate from another CA
/// fails the handshake at both, before any identity is read.
async fn node_and_handshake_rules(pki: &Pki, node: SocketAddr, inbound: SocketAddr) {
    // The node serves its own sidecar only (the inbound side got through above).
    refused_naming(
        call(&pki.channel(node, "edge"), None, None).await,
        Code::PermissionDenied,
        "spiffe://mesh/host/edge/role/sidecar",
    );
    assert_eq!(call(&pki.channel(node, "gpu"), None, None).await.unwrap(), 2);
    let other = Pki::new().await;
    other.issue("gpu", "sidecar").await;
    for addr in [inbound, node] {
        let status = call(&other.channel(addr, "gpu"), Some("acme"), None).await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{addr}: {status:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_edge_sidecar_carries_the_tenant_its_key_proved() {
    let pki = Pki::new().await;
    for (name, role) in [("gpu", "sidecar"), ("gpu-node", "node"), ("edge", "sidecar")] {
        pki.issue(name, role).await;
    }
    let etcd = Etcd::start().await;
    let (_node, _gpu) = gpu_host(&pki, &etcd, "\"spiffe://mesh/host/*/role/sidecar\"").await;
    let hash = mesh_proto::api_key::digest("acme-key");
    let keys = format!("{}[[api_keys]]\ntenant = \"acme\"\nsha256 = \"{hash}\"\n", pki.tls_section("edge"));
    let edge = SidecarProcess::start(&etcd, None, &keys).await;
    edge.wait_for_instances("chat", 1).await;
    let channel = Channel::from_shared(format!("http://{}", edge.outbound)).unwrap().connect().await.unwrap();
    // Through the edge: acme's limits at the instance (default would refuse the second).
    for _ in 0..3 {
        assert_eq!(call(&channel, None, Some("acme-key")).await.unwrap(), 2);
    }
}

/// A sidecar config with plaintext listeners on every interface.
fn plaintext_anywhere(insecure: bool) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("identity-plain-{}-{}.toml", std::process::id(), free_port()));
    let text = format!(
        "plaintext = true\ninsecure_plaintext_anywhere = {insecure}\n[listen]\noutbound = \"0.0.0.0:0\"\n\
         inbound = \"0.0.0.0:0\"\n[etcd]\nendpoints = [\"http://127.0.0.1:{}\"]\n",
        free_port()
    );
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread")]
async fn plaintext_off_loopback_needs_the_insecure_key_and_then_warns() {
    let refused = plaintext_anywhere(false);
    let out = tokio::process::Command::new(bin_dir().join("mesh-sidecar"))
        .arg("--config")
        .arg(&refused)
        .output()
        .await
        .unwrap();
    let _ = std::fs::remove_file(&refused);
    assert_eq!(out.status.code(), Some(2));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains("listen.outbound: 0.0.0.0:0 is not a loopback address")
            && log.contains("insecure_plaintext_anywhere"),
        "{log}"
    );

    let allowed = plaintext_anywhere(true);
    let mut child = tokio::process::Command::new(bin_dir().join("mesh-sidecar"))
        .arg("--config")
        .arg(&allowed)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let warned = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains("WARN") && line.contains("listen.outbound 0.0.0.0:0 serves plaintext") {
                return true;
            }
        }
        false
    });
    let warned = warned.await;
    let _ = std::fs::remove_file(&allowed);
    child.kill().await.unwrap();
    assert_eq!(warned, Ok(true), "no warning at start");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sidecar_dials_only_instances_that_prove_a_sidecars_identity() {
    let pki = Pki::new().await;
    for (name, role) in [("edge", "sidecar"), ("rogue", "client"), ("rogue-node", "node")] {
        pki.issue(name, role).await;
    }
    let etcd = Etcd::start().await;
    // A host that runs a sidecar with a client's certificate: its node
    // (which serves any certificate of the CA) takes it, and it registers.
    let (cert, key, ca) = (pki.path("rogue-node.pem"), pki.path("rogue-node.key"), pki.path("ca.pem"));
    let tls = ["--tls-cert", &cert, "--tls-key", &key, "--tls-client-ca", &ca];
    let node = NodeProcess::start(&[&["--backend", "synthetic", "--model-name", "chat"][..], &tls].concat()).await;
    let _rogue = SidecarProcess::start(&etcd, Some(&node), &pki.tls_section("rogue")).await;
    let edge = SidecarProcess::start(&etcd, None, &pki.tls_section("edge")).await;
    edge.wait_for_instances("chat", 1).await;
    let channel = Channel::from_shared(format!("http://{}", edge.outbound)).unwrap().connect().await.unwrap();
    refused_naming(
        call(&channel, None, None).await,
        Code::Unavailable,
        "server spiffe://mesh/host/rogue/role/client is not a sidecar, as this connection requires",
    );
}
