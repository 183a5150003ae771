//! Mutual TLS between sidecars and to the node, certificates from
//! `meshctl`, and API keys where calls enter the mesh.

use std::path::{Path, PathBuf};

use mesh_proto::v1::GenerateRequest;
use mesh_proto::v1::generation_client::GenerationClient;
use mesh_tests::etcd::Etcd;
use mesh_tests::mesh::SidecarProcess;
use mesh_tests::{NodeProcess, bin_dir, free_port, prompt_request};
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

async fn meshctl(args: &[&str]) {
    let out = tokio::process::Command::new(bin_dir().join("meshctl")).args(args).output().await.unwrap();
    assert!(out.status.success(), "meshctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A CA and certificates for `names`, all valid for 127.0.0.1.
async fn pki(names: &[&str]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mesh-pki-{}-{}", std::process::id(), free_port()));
    let d = dir.to_str().unwrap();
    meshctl(&["certs-ca", "--out", d]).await;
    for n in names {
        meshctl(&["certs-issue", "--ca-dir", d, "--name", n, "--san", "127.0.0.1,localhost", "--out", d]).await;
    }
    dir
}

fn tls_section(dir: &Path, name: &str) -> String {
    let p = |f: &str| dir.join(f).display().to_string();
    format!(
        "[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
        p("ca.pem"),
        p(&format!("{name}.pem")),
        p(&format!("{name}.key"))
    )
}

fn chat(max_tokens: u32) -> GenerateRequest {
    GenerateRequest { model: "chat".into(), ..prompt_request("secure", max_tokens) }
}

async fn call(client: &mut GenerationClient<Channel>, key: Option<&str>) -> Result<usize, tonic::Status> {
    let mut req = tonic::Request::new(chat(3));
    if let Some(k) = key {
        req.metadata_mut().insert("authorization", format!("Bearer {k}").parse().unwrap());
    }
    let mut stream = client.generate(req).await?.into_inner();
    let mut tokens = 0;
    while let Some(m) = stream.message().await? {
        tokens += m.token_ids.len();
    }
    Ok(tokens)
}

#[tokio::test(flavor = "multi_thread")]
async fn mutual_tls_between_hosts_and_api_keys_at_the_edge() {
    let dir = pki(&["node-host", "client-host", "intruder"]).await;
    let etcd = Etcd::start().await;
    let p = |f: &str| dir.join(f).display().to_string();
    let (cert, key, ca) = (p("node-host.pem"), p("node-host.key"), p("ca.pem"));
    let node = NodeProcess::start(&[
        "--backend",
        "synthetic",
        "--model-name",
        "chat",
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--tls-client-ca",
        &ca,
    ])
    .await;
    let b = SidecarProcess::start(&etcd, Some(&node), &tls_section(&dir, "node-host")).await;
    let keys = format!(
        "{}[[api_keys]]\ntenant = \"acme\"\nsha256 = \"{}\"\nservices = [\"chat\"]\n[[api_keys]]\ntenant = \"other\"\nsha256 = \"{}\"\nservices = [\"code\"]\n",
        tls_section(&dir, "client-host"),
        hash("good-key").await,
        hash("code-only").await
    );
    let a = SidecarProcess::start(&etcd, None, &keys).await;
    a.wait_for_instances("chat", 1).await;

    // Through A and B over mutual TLS, with a valid key.
    let mut client = a.client().await;
    assert_eq!(call(&mut client, Some("good-key")).await.unwrap(), 3);
    // API keys at the edge.
    assert_eq!(call(&mut client, None).await.unwrap_err().code(), Code::Unauthenticated);
    assert_eq!(call(&mut client, Some("wrong")).await.unwrap_err().code(), Code::Unauthenticated);
    assert_eq!(call(&mut client, Some("code-only")).await.unwrap_err().code(), Code::PermissionDenied);

    // B's inbound and the node refuse callers without a mesh certificate at the handshake.
    let inbound = b.inbound.unwrap();
    for addr in [inbound.to_string(), node.addr.to_string()] {
        let no_cert = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(std::fs::read(&ca).unwrap()));
        let channel = Channel::from_shared(format!("https://{addr}")).unwrap().tls_config(no_cert).unwrap();
        let refused = match channel.connect().await {
            Err(_) => true,
            Ok(ch) => call(&mut GenerationClient::new(ch), None).await.is_err(),
        };
        assert!(refused, "{addr} served a caller without a client certificate");
        // Plaintext is refused too.
        let plain = Channel::from_shared(format!("http://{addr}")).unwrap().connect().await;
        let refused = match plain {
            Err(_) => true,
            Ok(ch) => call(&mut GenerationClient::new(ch), None).await.is_err(),
        };
        assert!(refused, "{addr} served plaintext");
    }
    // A certificate from the same CA is accepted (the check is the chain, not the name).
    let id = Identity::from_pem(std::fs::read(p("intruder.pem")).unwrap(), std::fs::read(p("intruder.key")).unwrap());
    let with_cert =
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(std::fs::read(&ca).unwrap())).identity(id);
    let ch = Channel::from_shared(format!("https://{inbound}"))
        .unwrap()
        .tls_config(with_cert)
        .unwrap()
        .connect()
        .await
        .unwrap();
    assert_eq!(call(&mut GenerationClient::new(ch), None).await.unwrap(), 3);
    let _ = std::fs::remove_dir_all(&dir);
}

async fn hash(key: &str) -> String {
    let out = tokio::process::Command::new(bin_dir().join("meshctl")).args(["hash-key", key]).output().await.unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}
