//! Callers without the right certificate: none, another CA's, an expired
//! one, plaintext on a TLS port, and the mesh's own CA with the wrong role.

use mesh_proto::v1::generation_client::GenerationClient;
use mesh_tests::pki::Pki;
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

use super::{Mesh, call, chat};

pub async fn refused_at_the_handshake_or_by_identity(mesh: &Mesh) {
    let (node, inbound) = (mesh.node.addr, mesh.gpu.inbound.unwrap());
    let other = Pki::new().await;
    other.issue("gpu", "sidecar").await;
    mesh.pki.issue_for_days("stale", "sidecar", 0).await;
    let ca = std::fs::read(mesh.pki.path("ca.pem")).unwrap();
    for addr in [node, inbound] {
        let no_cert = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&ca));
        let tls = Channel::from_shared(format!("https://{addr}")).unwrap().tls_config(no_cert).unwrap();
        let cases = [
            ("no certificate", tls.connect_lazy()),
            ("another CA's certificate", other.channel(addr, "gpu")),
            ("an expired certificate", mesh.pki.channel(addr, "stale")),
            ("plaintext", Channel::from_shared(format!("http://{addr}")).unwrap().connect_lazy()),
        ];
        for (what, channel) in cases {
            let refused = call(&GenerationClient::new(channel), chat(1), None).await.expect_err(what);
            // Refused by TLS, before any service: the exact error depends on
            // which side of the handshake saw it first (an alert, a reset).
            let transport = std::error::Error::source(&refused).is_some_and(|e| e.is::<tonic::transport::Error>());
            assert!(transport, "{addr}, {what}: not refused at the handshake: {refused:?}");
        }
    }
    // The mesh CA's certificate, but not an identity the listener serves:
    // refused on every service (reflection too; health only from off
    // loopback), named, and counted.
    let refused = [
        (inbound, "laptop", "spiffe://mesh/host/laptop/role/client may not call here"),
        (node, "edge", "spiffe://mesh/host/edge/role/sidecar may not call here"),
    ];
    for (addr, name, message) in refused {
        let channel = mesh.pki.channel(addr, name);
        let status = call(&GenerationClient::new(channel.clone()), chat(1), None).await.unwrap_err();
        assert_eq!((status.code(), status.message().contains(message)), (Code::PermissionDenied, true), "{status:?}");
        let reflection = super::surfaces::reflection(&channel, None).await.unwrap_err();
        assert_eq!(reflection.code(), Code::PermissionDenied, "reflection on {addr} as {name}: {reflection:?}");
    }
    let gpu_metrics = mesh_tests::scrape(&mesh.gpu.metrics().unwrap().to_string()).await;
    assert_eq!(gpu_metrics.get("mesh_sidecar_refused_requests_total{direction=\"inbound\"}"), Some(&2.0));
    let node_metrics = mesh_tests::scrape(&mesh.node.metrics.unwrap().to_string()).await;
    assert_eq!(node_metrics.get("mesh_node_refused_requests_total"), Some(&2.0));
}
