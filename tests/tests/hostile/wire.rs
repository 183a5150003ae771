//! Hostile bytes on every listening port: garbage, a truncated HTTP/2
//! preface and an HTTP/1.1 request (each closed, and the process serves
//! the next good call), a rapid-reset flood of 10,000 streams on one
//! connection (the CVE-2023-44487 pattern: memory stays bounded) and 1 MB
//! of metadata (refused).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mesh_proto::v1::generation_client::GenerationClient;
use mesh_tests::pki::Pki;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};
use tonic::transport::Channel;

use super::{Mesh, Port, chat};

/// Streams opened and reset at once on one connection.
const RESETS: usize = 10_000;

/// What the flood may add to a process's resident memory: the server keeps
/// no state for a reset stream past `max_pending_accept_resets`.
const FLOOD_RSS_MIB: u64 = 64;

/// How soon a port must close a connection that cannot be gRPC: the
/// plaintext ones' preface timeout (1 s here) with room for a loaded host.
const CLOSED_WITHIN: Duration = Duration::from_secs(3);

pub async fn hostile_bytes_on_every_port(mesh: &Mesh) {
    let inputs: [(&str, Vec<u8>); 3] = [
        ("garbage", garbage()),
        ("a truncated HTTP/2 preface", b"PRI * HTTP/2.0\r\n".to_vec()),
        ("an HTTP/1.1 request", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
    ];
    for (what, bytes) in &inputs {
        for port in mesh.grpc_ports() {
            assert!(closed_after(port.addr, bytes).await, "{} held {what} open past {CLOSED_WITHIN:?}", port.name);
            mesh.serves(&format!("{what} on {}", port.name)).await;
        }
        for (name, addr) in mesh.metrics_ports() {
            closed_after(addr, bytes).await;
            mesh.serves(&format!("{what} on {name}")).await;
        }
    }
    for port in mesh.grpc_ports() {
        let before = rss_kib(&port);
        match port.tls_as {
            None => rapid_reset(port.addr, TcpStream::connect(port.addr).await.expect("connect")).await,
            Some(name) => rapid_reset(port.addr, tls(&mesh.pki, name, port.addr).await).await,
        }
        mesh.serves(&format!("a rapid-reset flood on {}", port.name)).await;
        let grown = rss_kib(&port).saturating_sub(before) / 1024;
        println!("{}: rapid-reset flood of {RESETS} streams grew RSS by {grown} MiB", port.name);
        assert!(grown <= FLOOD_RSS_MIB, "{}: RSS grew {grown} MiB", port.name);
    }
    for port in mesh.grpc_ports() {
        let channel = match port.tls_as {
            None => Channel::from_shared(format!("http://{}", port.addr)).unwrap().connect_lazy(),
            Some(name) => mesh.pki.channel(port.addr, name),
        };
        huge_metadata(port.name, channel).await;
        mesh.serves(&format!("1 MB of metadata on {}", port.name)).await;
    }
}

/// Sends `bytes` on a fresh connection; whether the peer closed it within
/// [`CLOSED_WITHIN`] (reading whatever it answers first).
async fn closed_after(addr: SocketAddr, bytes: &[u8]) -> bool {
    let mut conn = TcpStream::connect(addr).await.expect("connect");
    let _ = conn.write_all(bytes).await;
    let mut sink = vec![0u8; 64 << 10];
    let read_all = async {
        while let Ok(n) = conn.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    };
    tokio::time::timeout(CLOSED_WITHIN, read_all).await.is_ok()
}

fn garbage() -> Vec<u8> {
    // Deterministic noise: no RNG dependency for a test.
    (0u32..4096).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect()
}

/// A TLS connection to `addr` presenting `name`'s certificate, speaking h2.
async fn tls(pki: &Pki, name: &str, addr: SocketAddr) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut roots = RootCertStore::empty();
    roots.add(CertificateDer::from_pem_file(pki.path("ca.pem")).unwrap()).unwrap();
    let certs: Vec<_> =
        CertificateDer::pem_file_iter(pki.path(&format!("{name}.pem"))).unwrap().map(Result::unwrap).collect();
    let key = PrivateKeyDer::from_pem_file(pki.path(&format!("{name}.key"))).unwrap();
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider).with_safe_default_protocol_versions().unwrap();
    let mut config = builder.with_root_certificates(roots).with_client_auth_cert(certs, key).unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let server = ServerName::IpAddress(addr.ip().into());
    tokio_rustls::TlsConnector::from(Arc::new(config)).connect(server, tcp).await.expect("TLS handshake")
}

/// Opens `RESETS` streams on one HTTP/2 connection, resetting each at
/// once, as fast as the connection takes them.
async fn rapid_reset<T: AsyncRead + AsyncWrite + Unpin + Send + 'static>(addr: SocketAddr, io: T) {
    let Ok((mut client, conn)) = h2::client::handshake(io).await else { return };
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
async fn huge_metadata(name: &str, channel: Channel) {
    let mut req = tonic::Request::new(chat(1));
    let value = "v".repeat(1 << 20).parse().expect("ascii metadata");
    req.metadata_mut().insert("x-padding", value);
    let answer = tokio::time::timeout(Duration::from_secs(10), GenerationClient::new(channel).generate(req)).await;
    let answer = answer.unwrap_or_else(|_| panic!("{name}: no answer within 10 s to 1 MB of metadata"));
    assert!(answer.is_err(), "{name} accepted 1 MB of metadata");
}

fn rss_kib(port: &Port<'_>) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", port.process.pid())).expect("process status");
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS");
    line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).expect("VmRSS in kB")
}
