//! etcd as a trust boundary: a real etcd serving TLS only to clients with a
//! certificate of its CA (`--client-cert-auth`), with auth on and one user
//! whose role may touch only the mesh's prefix. A sidecar with the right
//! certificate and password registers, a client sidecar watches it and
//! routes a stream to it, `meshctl status` reads it; a certificate of
//! another CA, no certificate, a wrong password or no user at all are
//! refused by etcd, and the refused sidecar says so, naming etcd.

use std::ffi::OsStr;
use std::path::PathBuf;
use std::time::Duration;

use harness::{EtcdTls, MeshGrant, Sidecar, SidecarConfig};
use mesh_proto::v1::GenerateRequest;
use mesh_proto::v1::generation_client::GenerationClient;
use mesh_tests::{NodeProcess, Spawned, bin_dir, free_port, generate, prompt_request};
use registry::{Credentials, EtcdConfig, TlsFiles};

const PREFIX: &str = "/mesh/v1/";
/// etcd's TLS alert when a client certificate is missing or not of its CA;
/// under TLS 1.3 the client may have sent its first request before the
/// alert arrives, and then reads a closed connection instead.
const BAD_CERT: &[&str] = &[
    "error=etcd: transport error: connection error: received fatal alert: BadCertificate",
    "error=etcd: operation was canceled: transport error: connection closed",
    "error=etcd: transport error: connection error: stream closed because of a broken pipe",
];
const BAD_PASSWORD: &[&str] = &["error=etcd: etcdserver: authentication failed, invalid user ID or password"];
const NO_ROLE: &[&str] = &["error=etcd: etcdserver: permission denied"];

async fn meshctl<S: AsRef<OsStr>>(args: impl IntoIterator<Item = S>) -> std::process::Output {
    tokio::process::Command::new(bin_dir().join("meshctl")).args(args).output().await.unwrap()
}

/// Certificates of two CAs (`mesh/` and `rogue/`), and password files.
struct Pki(PathBuf);

impl Pki {
    async fn new() -> Pki {
        let root = std::env::temp_dir().join(format!("mesh-etcd-trust-{}-{}", std::process::id(), free_port()));
        for (ca, names) in [("mesh", &["etcd", "admin", "gpu", "client"][..]), ("rogue", &["gpu"][..])] {
            let dir = root.join(ca);
            let d = dir.to_str().unwrap();
            assert!(meshctl(["certs-ca", "--out", d]).await.status.success());
            for n in names {
                let out =
                    meshctl(["certs-issue", "--ca-dir", d, "--name", n, "--san", "127.0.0.1,localhost", "--out", d]);
                let out = out.await;
                assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            }
        }
        for (file, password) in [("root.pw", "root-secret"), ("mesh.pw", "mesh-secret\n"), ("wrong.pw", "guess")] {
            std::fs::write(root.join(file), password).unwrap();
        }
        Pki(root)
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.0.join(rel)
    }

    /// `[etcd]` keys: the mesh CA, the client certificate `cert`
    /// (`CA/NAME`), and the user `mesh` with the password in `password`.
    fn etcd_keys(&self, cert: Option<&str>, password: Option<&str>) -> String {
        let mut keys = format!("ca = \"{}\"\n", self.path("mesh/ca.pem").display());
        if let Some(c) = cert {
            let (pem, key) = (self.path(&format!("{c}.pem")), self.path(&format!("{c}.key")));
            keys += &format!("cert = \"{}\"\nkey = \"{}\"\n", pem.display(), key.display());
        }
        if let Some(p) = password {
            keys += &format!("user = \"mesh\"\npassword_file = \"{}\"\n", self.path(p).display());
        }
        keys
    }

    fn tls(&self, cert: &str) -> TlsFiles {
        let identity = Some((self.path(&format!("{cert}.pem")), self.path(&format!("{cert}.key"))));
        TlsFiles { ca: self.path("mesh/ca.pem"), identity }
    }

    /// `meshctl` flags for etcd at `url` as the mesh user with `cert`.
    fn flags(&self, url: &str, cert: Option<&str>) -> Vec<String> {
        let mut f =
            vec!["--etcd".into(), url.into(), "--etcd-ca".into(), self.path("mesh/ca.pem").display().to_string()];
        if let Some(c) = cert {
            f.extend(["--etcd-cert".into(), self.path(&format!("{c}.pem")).display().to_string()]);
            f.extend(["--etcd-key".into(), self.path(&format!("{c}.key")).display().to_string()]);
        }
        f.extend(["--etcd-user".into(), "mesh".into(), "--etcd-password-file".into()]);
        f.push(self.path("mesh.pw").display().to_string());
        f
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn sidecar(name: &str, etcd: &str, node: Option<&NodeProcess>, etcd_keys: &str) -> Sidecar {
    let bin = harness::workspace_bin("mesh-sidecar", None, "cargo build --release").unwrap();
    let mut config = SidecarConfig::new(etcd).with_etcd(etcd_keys);
    if let Some(n) = node {
        config = config.fronting(n.addr);
    }
    Sidecar::start(name, &bin, &config, Vec::<&str>::new()).await.unwrap_or_else(|e| panic!("{e}"))
}

/// Waits (up to 10 s) for the sidecar's log line saying it could not
/// register, and returns it.
async fn refusal(sidecar: &Spawned) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let lines = sidecar.log_tail(200);
        if let Some(line) = lines.iter().find(|l| l.contains("not registered in etcd")) {
            return line.clone();
        }
        assert!(tokio::time::Instant::now() < deadline, "{} never failed to register: {lines:#?}", sidecar.name());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn etcd_with_client_certificates_and_rbac_admits_only_the_mesh_user() {
    let pki = Pki::new().await;
    let tls = EtcdTls { ca: pki.path("mesh/ca.pem"), cert: pki.path("mesh/etcd.pem"), key: pki.path("mesh/etcd.key") };
    let etcd = harness::Etcd::start_tls("etcd".as_ref(), tls).await.expect("etcd (scripts/setup.sh installs it)");
    let grant = MeshGrant { prefix: PREFIX, role: "mesh", user: "mesh", password: "mesh-secret" };
    etcd.enable_auth(pki.tls("mesh/admin"), "root-secret", &grant).await.unwrap();
    let url = etcd.url();
    let node = NodeProcess::start(&["--backend", "synthetic", "--model-name", "chat"]).await;

    // The right certificate and password: registered, watched, routed to.
    let gpu = sidecar("gpu sidecar", &url, Some(&node), &pki.etcd_keys(Some("mesh/gpu"), Some("mesh.pw"))).await;
    let client = sidecar("client sidecar", &url, None, &pki.etcd_keys(Some("mesh/client"), Some("mesh.pw"))).await;
    let one = |all: &[mesh_proto::v1::InstanceState]| all.iter().filter(|i| i.service == "chat").count() == 1;
    client.wait_for_instances(Duration::from_secs(10), one).await.unwrap();
    let mut caller = GenerationClient::new(client.channel().await.unwrap());
    let req = GenerateRequest { model: "chat".into(), ..prompt_request("trust", 5) };
    let done = generate(&mut caller, req).await.expect("a stream through the registered instance");
    assert_eq!((done.token_ids.len(), done.usage.map(|u| u.completion_tokens)), (5, Some(5)), "{done:?}");

    // Refused by etcd: each says why, naming etcd, and never appears.
    let cases = [
        ("another CA's certificate", pki.etcd_keys(Some("rogue/gpu"), Some("mesh.pw")), BAD_CERT),
        ("no certificate", pki.etcd_keys(None, Some("mesh.pw")), BAD_CERT),
        ("a wrong password", pki.etcd_keys(Some("mesh/gpu"), Some("wrong.pw")), BAD_PASSWORD),
        ("no user (the certificate's name, gpu, has no role)", pki.etcd_keys(Some("mesh/gpu"), None), NO_ROLE),
    ];
    for (what, keys, wanted) in cases {
        let bin = harness::workspace_bin("mesh-sidecar", None, "cargo build --release").unwrap();
        let config = SidecarConfig::new(&url).with_etcd(&keys).fronting(node.addr);
        let (refused, _config) =
            Sidecar::launch(format!("sidecar with {what}"), &bin, &config, Vec::<&str>::new()).unwrap();
        let line = refusal(&refused).await;
        eprintln!("{what}: {line}");
        assert!(wanted.iter().any(|w| line.contains(w)), "{what}: {line}");
    }
    let seen = client.instances().await.unwrap();
    assert_eq!(seen.len(), 1, "only the sidecar with the right certificate and password registered: {seen:?}");

    // meshctl reads the registry with the same flags, and not without a certificate.
    let flags = pki.flags(&url, Some("mesh/client"));
    let status = meshctl(["status", "--json"].iter().copied().chain(flags.iter().map(String::as_str))).await;
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(status.status.success(), "meshctl status: {}", String::from_utf8_lossy(&status.stderr));
    assert_eq!(text.matches("\"instance_id\"").count(), 1, "{text}");
    let no_cert = pki.flags(&url, None);
    let refused = meshctl(["status"].iter().copied().chain(no_cert.iter().map(String::as_str))).await;
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && err.contains("etcd"), "meshctl status without a certificate: {err}");

    // The role covers the mesh's prefix and nothing else.
    let mut outside = EtcdConfig::new(vec![url.clone()]);
    outside.tls = Some(pki.tls("mesh/client"));
    outside.credentials = Some(Credentials { user: "mesh".into(), password_file: pki.path("mesh.pw") });
    outside.prefix = "/elsewhere/".into();
    let denied = registry::etcd::fetch_all(&outside).await.unwrap_err().to_string();
    assert!(denied.contains("permission denied"), "{denied}");

    // A graceful stop revokes the lease (etcd checks write permission on
    // its keys): the record is gone when the process has exited, not a TTL later.
    let mut gpu = gpu;
    gpu.process.signal("TERM").unwrap();
    gpu.process.wait().await.unwrap();
    let after = meshctl(["status", "--json"].iter().copied().chain(flags.iter().map(String::as_str))).await;
    assert_eq!(String::from_utf8_lossy(&after.stdout).matches("\"instance_id\"").count(), 0, "{after:?}");
}
