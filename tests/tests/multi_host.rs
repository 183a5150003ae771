//! Hosts in network namespaces (three etcd hosts, two GPU hosts, a client
//! host) run exactly the command lines of deploy/systemd with the configs of
//! deploy/config (paths moved into a per-host directory), with mutual TLS,
//! and a 3-member etcd cluster over TLS with client certificates and auth.
//! The two GPU hosts get the same config files: only their certificates
//! (their identity) differ, and each advertises its own address.
//! A client streams completions through its sidecar while one etcd member
//! dies and one GPU host's link is cut and restored.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mesh_tests::netns::Lab;
use mesh_tests::{Spawned, bin_dir, free_port, model_path};

const HOSTS: [(&str, &str); 6] = [
    ("etcd-1", "10.77.0.1/24"),
    ("etcd-2", "10.77.0.2/24"),
    ("etcd-3", "10.77.0.3/24"),
    ("gpu1", "10.77.0.11/24"),
    ("gpu2", "10.77.0.12/24"),
    ("client", "10.77.0.21/24"),
];
const ETCD: [&str; 3] = ["etcd-1", "etcd-2", "etcd-3"];
const API_KEY: &str = "dev-key-change-me";
/// The operator's key in the same config (`admin = true`).
const ADMIN_KEY: &str = "dev-admin-key-change-me";

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// A host's `/etc/mesh`, with the example configs and its certificates.
struct HostDir(PathBuf);

impl HostDir {
    fn localize(&self, text: &str) -> String {
        text.replace("/etc/mesh", self.0.to_str().unwrap())
            .replace("/var/lib/mesh/models/SmolLM2-135M-Instruct.Q4_1.gguf", model_path().to_str().unwrap())
            .replace("/var/lib/mesh/etcd", self.0.join("etcd-data").to_str().unwrap())
            .replace("/usr/local/bin/", &format!("{}/", bin_dir().display()))
    }
}

/// `ExecStart` and environment of `unit` (instance `instance`), as systemd
/// would run it on the host whose `/etc/mesh` is `dir`.
fn unit_command(unit: &str, instance: &str, dir: &HostDir) -> (Vec<String>, HashMap<String, String>) {
    let text = std::fs::read_to_string(deploy().join("systemd").join(unit)).unwrap().replace("%i", instance);
    let text = dir.localize(&text);
    let mut exec = Vec::new();
    let mut env = HashMap::new();
    for line in text.lines() {
        if let Some(cmd) = line.strip_prefix("ExecStart=") {
            exec = cmd.split_whitespace().map(String::from).collect();
        }
        if let Some(file) = line.strip_prefix("EnvironmentFile=") {
            let (optional, file) = match file.strip_prefix('-') {
                Some(f) => (true, f),
                None => (false, file),
            };
            match std::fs::read_to_string(file) {
                Ok(vars) => {
                    for l in vars.lines().filter(|l| !l.trim_start().starts_with('#')) {
                        if let Some((k, v)) = l.split_once('=') {
                            env.insert(k.trim().to_string(), v.trim().to_string());
                        }
                    }
                }
                Err(e) => assert!(optional, "{file}: {e}"),
            }
        }
    }
    assert!(!exec.is_empty(), "{unit} has no ExecStart");
    (exec, env)
}

/// How a unit says it serves.
enum Ready {
    /// A mesh daemon's ready line (see `harness`), from this role.
    Announced(&'static str),
    /// etcd's `/health` on its loopback metrics URL, asked from its own
    /// host (the test runs outside the lab's network).
    EtcdHealth,
}

/// Starts a unit's command on a host and waits until it is ready.
async fn start(lab: &Lab, host: &str, unit: &str, instance: &str, dir: &HostDir, ready: Ready) -> Spawned {
    let (exec, env) = unit_command(unit, instance, dir);
    let mut cmd = lab.command(host, &exec[0]);
    cmd.args(&exec[1..]).envs(env).env("RUST_LOG", "info");
    if unit.starts_with("mesh-node") {
        // The one host-specific override: this lab has no GPU
        // (node-chat.env describes a GPU host).
        cmd.env("MESH_NODE_DEVICE", "cpu");
    }
    let mut process = Spawned::spawn(format!("{unit} on {host}"), cmd).unwrap_or_else(|e| panic!("{e}"));
    let timeout = Duration::from_secs(60);
    let ready = match ready {
        Ready::Announced(role) => process.announced(role, timeout).await.map(drop),
        Ready::EtcdHealth => {
            let healthy = || async {
                let out = run(lab, host, "curl", &["-s", "http://127.0.0.1:2381/health"]).await;
                String::from_utf8_lossy(&out.stdout).contains(r#""health":"true""#)
            };
            process.probed(timeout, healthy).await
        }
    };
    ready.unwrap_or_else(|e| panic!("{e}"));
    process
}

async fn run(lab: &Lab, host: &str, program: &str, args: &[&str]) -> std::process::Output {
    lab.command(host, program).args(args).output().await.unwrap()
}

/// One streamed completion from the client host; true when it succeeded.
async fn complete(lab: &Lab, key: &str) -> std::process::Output {
    let meshctl = bin_dir().join("meshctl");
    run(
        lab,
        "client",
        meshctl.to_str().unwrap(),
        &[
            "--addr",
            "http://127.0.0.1:7100",
            "generate",
            "--model",
            "chat",
            "--max-tokens",
            "12",
            "--api-key",
            key,
            "--raw",
            "The mesh",
        ],
    )
    .await
}

/// DEPLOY.md's one-time step on the etcd host: `root`, and the user `mesh`
/// limited to the mesh's prefix, whose password every host's config names.
async fn enable_etcd_auth(lab: &Lab, dir: &HostDir) {
    std::fs::write(dir.0.join("etcd-root-password"), "root-multi-host\n").unwrap();
    let p = |f: &str| dir.0.join(f).to_str().unwrap().to_string();
    let (ca, cert, key) = (p("tls/ca.pem"), p("tls/host.pem"), p("tls/host.key"));
    let (root, mesh) = (p("etcd-root-password"), p("etcd-password"));
    let meshctl = bin_dir().join("meshctl");
    let args = [
        "etcd-enable-auth",
        "--etcd",
        "https://10.77.0.1:2379",
        "--etcd-ca",
        &ca,
        "--etcd-cert",
        &cert,
        "--etcd-key",
        &key,
        "--root-password-file",
        &root,
        "--mesh-password-file",
        &mesh,
    ];
    let out = run(lab, "etcd-1", meshctl.to_str().unwrap(), &args).await;
    assert!(out.status.success(), "meshctl etcd-enable-auth: {}", String::from_utf8_lossy(&out.stderr));
}

async fn instances_seen(lab: &Lab) -> String {
    let meshctl = bin_dir().join("meshctl");
    let out = run(
        lab,
        "client",
        meshctl.to_str().unwrap(),
        &["status", "--json", "--sidecar", "http://127.0.0.1:7100", "--api-key", ADMIN_KEY],
    )
    .await;
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn node_requests(lab: &Lab, host: &str) -> f64 {
    let out = run(lab, host, "curl", &["-s", "http://127.0.0.1:9101/metrics"]).await;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.starts_with("mesh_node_requests_total{") && l.contains("code=\"OK\""))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread")]
async fn two_gpu_hosts_behind_mutual_tls_survive_a_cut_link() {
    let root = std::env::temp_dir().join(format!("mesh-hosts-{}-{}", std::process::id(), free_port()));
    let pki = root.join("pki");
    let meshctl = bin_dir().join("meshctl");
    let ok = std::process::Command::new(&meshctl).args(["certs-ca", "--out", pki.to_str().unwrap()]).status().unwrap();
    assert!(ok.success());
    let mut dirs = HashMap::new();
    for (host, addr) in HOSTS {
        let dir = HostDir(root.join(host));
        std::fs::create_dir_all(dir.0.join("tls")).unwrap();
        for entry in std::fs::read_dir(deploy().join("config")).unwrap() {
            let path = entry.unwrap().path();
            let text = dir.localize(&std::fs::read_to_string(&path).unwrap());
            std::fs::write(dir.0.join(path.file_name().unwrap()), text).unwrap();
        }
        let ip = addr.split('/').next().unwrap();
        let issued = std::process::Command::new(&meshctl)
            .args(["certs-issue", "--ca-dir", pki.to_str().unwrap(), "--name", "host", "--san"])
            .arg(format!("{ip},127.0.0.1"))
            .args(["--out", dir.0.join("tls").to_str().unwrap()])
            .status()
            .unwrap();
        assert!(issued.success());
        std::fs::copy(pki.join("ca.pem"), dir.0.join("tls/ca.pem")).unwrap();
        std::fs::write(dir.0.join("etcd-password"), "mesh-multi-host\n").unwrap();
        dirs.insert(host, dir);
    }

    let lab = Lab::new(&HOSTS);
    // All three members at once: none serves before the cluster has quorum.
    let member = |m: &'static str| start(&lab, m, "mesh-etcd@.service", m, &dirs[m], Ready::EtcdHealth);
    let (mut etcd_1, _etcd_2, _etcd_3) = tokio::join!(member(ETCD[0]), member(ETCD[1]), member(ETCD[2]));
    enable_etcd_auth(&lab, &dirs["etcd-1"]).await;
    let mut procs: Vec<Spawned> = Vec::new();
    for gpu in ["gpu1", "gpu2"] {
        procs.push(start(&lab, gpu, "mesh-node@.service", "chat", &dirs[gpu], Ready::Announced("node")).await);
        procs.push(start(&lab, gpu, "mesh-sidecar@.service", "chat", &dirs[gpu], Ready::Announced("sidecar")).await);
    }
    let client = start(&lab, "client", "mesh-sidecar@.service", "client", &dirs["client"], Ready::Announced("sidecar"));
    procs.push(client.await);
    let both = tokio::time::timeout(Duration::from_secs(20), async {
        while instances_seen(&lab).await.matches("\"instance_id\"").count() < 2 {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    assert!(both.is_ok(), "client never saw both GPU hosts: {}", instances_seen(&lab).await);

    // Edge checks: a bad key, and a caller without a client certificate.
    let bad = complete(&lab, "wrong-key").await;
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("unknown API key"), "{bad:?}");
    let ca = dirs["client"].0.join("tls/ca.pem");
    let no_cert = run(
        &lab,
        "client",
        "curl",
        &["-s", "--http2-prior-knowledge", "--cacert", ca.to_str().unwrap(), "https://10.77.0.11:7101/"],
    )
    .await;
    // 35: handshake failed; 55/56: the server's alert arrived after the
    // TLS 1.3 handshake (curl's view of a rejected client certificate).
    assert!(matches!(no_cert.status.code(), Some(35 | 55 | 56)), "TLS without a client certificate: {no_cert:?}");
    let tls = dirs["client"].0.join("tls");
    let (cert, key) = (tls.join("host.pem"), tls.join("host.key"));
    let with_cert = run(
        &lab,
        "client",
        "curl",
        &[
            "-s",
            "-o",
            "/dev/null",
            "--http2-prior-knowledge",
            "--cacert",
            ca.to_str().unwrap(),
            "--cert",
            cert.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
            "https://10.77.0.11:7101/",
        ],
    )
    .await;
    assert_eq!(with_cert.status.code(), Some(0), "the same call with the mesh certificate: {with_cert:?}");

    // Steady traffic from three callers for the whole test.
    let results: Arc<Mutex<Vec<(Instant, bool, String)>>> = Arc::default();
    let stop = Instant::now() + Duration::from_secs(28);
    let lab = Arc::new(lab);
    let mut callers = Vec::new();
    for _ in 0..3 {
        let (lab, results) = (lab.clone(), results.clone());
        callers.push(tokio::spawn(async move {
            while Instant::now() < stop {
                let out = complete(&lab, API_KEY).await;
                let err = String::from_utf8_lossy(&out.stderr).into_owned();
                results.lock().unwrap().push((Instant::now(), out.status.success(), err));
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(3)).await; // both hosts serving (a fault at a set time)
    // The first etcd member (every sidecar's first endpoint) dies: two of
    // three keep quorum, and every lease, watch and later registration
    // goes on through them.
    etcd_1.kill().unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let gpu2_before_cut = node_requests(&lab, "gpu2").await;
    assert!(gpu2_before_cut > 0.0, "gpu2 took no traffic before the cut");
    lab.cut("gpu2");
    let cut_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(10)).await; // traffic runs on gpu1 alone
    lab.restore("gpu2");
    let restored_at = Instant::now();
    let gpu2_at_restore = node_requests(&lab, "gpu2").await;
    for c in callers {
        c.await.unwrap();
    }
    let gpu2_after = node_requests(&lab, "gpu2").await;

    let results = results.lock().unwrap().clone();
    let during = results.iter().filter(|(t, _, _)| *t > cut_at && *t < restored_at).count();
    let failed: Vec<&(Instant, bool, String)> = results.iter().filter(|r| !r.1).collect();
    eprintln!(
        "{} completions ({during} while gpu2 was cut), {} failed; gpu2 served {gpu2_before_cut} before the cut, {} after the restore",
        results.len(),
        failed.len(),
        gpu2_after - gpu2_at_restore
    );
    assert!(failed.is_empty(), "requests failed: {:?}", failed.iter().map(|f| &f.2).collect::<Vec<_>>());
    assert!(during >= 3, "traffic stalled while gpu2 was cut ({during} completions)");
    // gpu2's lease expired while it was cut: it came back by registering
    // again through the two members left.
    if gpu2_after <= gpu2_at_restore {
        for p in &procs[3..] {
            eprintln!("--- {}:\n{}", p.name(), p.log_tail(40).join("\n"));
        }
    }
    assert!(gpu2_after > gpu2_at_restore, "traffic did not spread back to gpu2 after the restore");
    let seen = instances_seen(&lab).await;
    assert!(seen.contains("\"etcd_reachable\": true"), "the client lost etcd with one member down: {seen}");
    for gpu in ["10.77.0.11:7101", "10.77.0.12:7101"] {
        assert!(seen.contains(&format!("\"instance_id\": \"{gpu}\"")), "{gpu} is not advertised: {seen}");
    }
    drop(procs);
    let _ = std::fs::remove_dir_all(&root);
}
