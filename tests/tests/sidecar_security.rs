//! Mutual TLS between sidecars and to the node, certificates from
//! `meshctl`, and API keys where calls enter the mesh.

use mesh_proto::v1::GenerateRequest;
use mesh_proto::v1::generation_client::GenerationClient;
use mesh_tests::etcd::Etcd;
use mesh_tests::mesh::SidecarProcess;
use mesh_tests::pki::Pki;
use mesh_tests::{NodeProcess, prompt_request};
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

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
    let pki = Pki::new().await;
    // Both hosts run a sidecar; the intruder is a client host's certificate.
    pki.issue("node-host", "sidecar").await.issue("client-host", "sidecar").await.issue("intruder", "client").await;
    let etcd = Etcd::start().await;
    let (cert, key, ca) = (pki.path("node-host.pem"), pki.path("node-host.key"), pki.path("ca.pem"));
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
    let b = SidecarProcess::start(&etcd, Some(&node), &pki.tls_section("node-host")).await;
    let keys = format!(
        "{}[[api_keys]]\ntenant = \"acme\"\nsha256 = \"{}\"\nservices = [\"chat\"]\n[[api_keys]]\ntenant = \"other\"\nsha256 = \"{}\"\nservices = [\"code\"]\n",
        pki.tls_section("client-host"),
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
    // A certificate from the same CA passes the handshake, but the inbound
    // side serves sidecars only: a client host's identity is refused, named.
    let refused = call(&mut GenerationClient::new(pki.channel(inbound, "intruder")), None).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    assert!(refused.message().contains("spiffe://mesh/host/intruder/role/client may not call here"), "{refused:?}");
}

/// `meshctl hash-key`, the key on stdin.
async fn hash(key: &str) -> String {
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
