//! The shipped alert rules fire when they should: a real Prometheus runs the
//! shipped `prometheus.yml` and `alerts.yml` (targets, intervals, `for:` and
//! rate windows shortened, nothing else) against a live mesh of etcd, a
//! synthetic node, its sidecar and a client sidecar holding API keys, and
//! the set of firing alerts is checked in three situations:
//! a healthy mesh with traffic, a total outage of its only service, and a
//! flood of calls with a bad key.
//!
//! Prometheus comes from `scripts/fetch-prometheus.sh` (Debian's package,
//! unpacked into `.tools/`, no service started).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command as StdCommand;
use std::time::{Duration, Instant};

use mesh_proto::v1::GenerateRequest;
use mesh_tests::etcd::Etcd;
use mesh_tests::mesh::SidecarProcess;
use mesh_tests::{NodeProcess, Spawned, free_port, prompt_request};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;
use tokio::task::JoinHandle;

/// Every `for:` of the shipped rules, in the test: long enough that an
/// alert is pending for a couple of evaluations before it fires.
const FOR: &str = "2s";
/// Every rate window of the shipped rules, in the test: 15 scrapes.
const WINDOW: &str = "15s";
/// How long a situation's alerts may take to settle (windows fill or drain,
/// leases expire, `for:` passes).
const SETTLE: Duration = Duration::from_secs(60);
/// How long the expected set must then hold, unchanged and with nothing
/// else pending: over two `for:` periods and many evaluations, so an
/// unexpected alert would show at least as pending.
const HOLD: Duration = Duration::from_secs(5);

const GOOD_KEY: &str = "alerts-test-good-key";
const BAD_KEY: &str = "alerts-test-revoked-key";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `prometheus` or `promtool` from `.tools/`, or a failure naming the script.
fn tool(name: &str) -> PathBuf {
    let bin = repo_root().join(".tools/prometheus/usr/bin").join(name);
    assert!(bin.exists(), "{} is missing: run scripts/fetch-prometheus.sh", bin.display());
    bin
}

/// A directory removed when dropped (after the processes using it, which
/// are declared before it).
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        let dir = std::env::temp_dir().join(format!("mesh-alerts-{}-{}", std::process::id(), free_port()));
        std::fs::create_dir_all(&dir).expect("creating the temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Rewrites the value of every line `key: ...` (any indentation) to `value`.
fn set_key(text: &str, key: &str, value: &str) -> String {
    let mut hits = 0;
    let out = lines_map(text, |line| {
        let trimmed = line.trim_start();
        trimmed.strip_prefix(key)?.strip_prefix(':')?;
        hits += 1;
        Some(format!("{}{key}: {value}", &line[..line.len() - trimmed.len()]))
    });
    assert!(hits > 0, "no `{key}:` line to rewrite in\n{text}");
    out
}

fn lines_map(text: &str, mut f: impl FnMut(&str) -> Option<String>) -> String {
    text.lines().map(|l| f(l).unwrap_or_else(|| l.to_string()) + "\n").collect()
}

/// The shipped `prometheus.yml` for this mesh: 1 s intervals, each job's
/// `targets:` line pointed at `jobs[job]` (every job must be named, so a
/// job added to the file is added here too), the Alertmanager at an unused
/// port, and no `authorization` (the test's processes serve metrics
/// without a token: the harness writes no top-level sidecar key).
fn test_prometheus_yml(shipped: &str, jobs: &BTreeMap<&str, Vec<SocketAddr>>, alertmanager: SocketAddr) -> String {
    let text = set_key(shipped, "scrape_interval", "1s");
    let text = set_key(&text, "evaluation_interval", "1s");
    let mut job: Option<String> = None;
    let mut seen = BTreeSet::new();
    let mut skip_credentials = false;
    let mut out = String::new();
    for line in text.lines() {
        let trimmed = line.trim_start();
        let indent = &line[..line.len() - trimmed.len()];
        if skip_credentials {
            skip_credentials = false;
            assert!(trimmed.starts_with("credentials_file:"), "authorization without credentials_file: {line}");
            continue;
        }
        if trimmed == "authorization:" {
            skip_credentials = true;
            continue;
        }
        if trimmed.starts_with("alerting:") {
            job = None;
        }
        if let Some(name) = trimmed.strip_prefix("- job_name:") {
            job = Some(name.trim().trim_matches('"').to_string());
        }
        if trimmed.starts_with("- targets:") {
            let targets = match &job {
                None => vec![alertmanager],
                Some(name) => {
                    seen.insert(name.clone());
                    jobs.get(name.as_str()).unwrap_or_else(|| panic!("the test has no targets for job {name}")).clone()
                }
            };
            let list: Vec<String> = targets.iter().map(|t| format!("\"{t}\"")).collect();
            out += &format!("{indent}- targets: [{}]\n", list.join(", "));
            continue;
        }
        out += line;
        out += "\n";
    }
    let wanted: BTreeSet<String> = jobs.keys().map(|k| k.to_string()).collect();
    assert_eq!(seen, wanted, "the shipped jobs and the test's differ");
    out
}

/// The shipped `alerts.yml` with every `for:` at [`FOR`] and every rate
/// window at [`WINDOW`].
fn test_alerts_yml(shipped: &str) -> String {
    let text = set_key(shipped, "for", FOR);
    let mut out = String::new();
    let mut rest = text.as_str();
    let mut windows = 0;
    while let Some(open) = rest.find('[') {
        out += &rest[..open];
        let after = &rest[open + 1..];
        let close = after.find(']');
        let inner = close.map(|c| &after[..c]);
        let is_window = inner.is_some_and(|w| {
            w.len() > 1 && w[..w.len() - 1].chars().all(|c| c.is_ascii_digit()) && w.ends_with(['s', 'm', 'h'])
        });
        match (is_window, close) {
            (true, Some(c)) => {
                out += &format!("[{WINDOW}]");
                rest = &after[c + 1..];
                windows += 1;
            }
            _ => {
                out += "[";
                rest = after;
            }
        }
    }
    out += rest;
    assert!(windows > 0, "no rate window in the shipped rules");
    out
}

/// Runs promtool; fails the test with its output unless it succeeds.
fn promtool(args: &[&str]) {
    let out = StdCommand::new(tool("promtool")).args(args).output().expect("running promtool");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
}

/// `GET path` over HTTP/1.0, so the answer is never chunked: status, body.
async fn get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let exchange = async {
        let mut conn = tokio::net::TcpStream::connect(addr).await?;
        conn.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes()).await?;
        let mut text = String::new();
        conn.read_to_string(&mut text).await?;
        Ok::<_, std::io::Error>(text)
    };
    let text = tokio::time::timeout(Duration::from_secs(5), exchange).await.map_err(std::io::Error::other)??;
    let bad = || std::io::Error::other(format!("not an HTTP response: {text:?}"));
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(bad)?;
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or_else(bad)?;
    Ok((status, body.to_string()))
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// An alert as Prometheus's API lists it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Alert {
    name: String,
    severity: String,
    service: String,
    firing: bool,
}

struct Prometheus {
    process: Spawned,
    addr: SocketAddr,
}

impl Prometheus {
    async fn start(dir: &Path, config: &Path) -> Prometheus {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut cmd = Command::new(tool("prometheus"));
        cmd.arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("tsdb").display()))
            .arg(format!("--web.listen-address={addr}"));
        let process = Spawned::spawn("prometheus", cmd).expect("starting prometheus");
        let p = Prometheus { process, addr };
        p.wait("ready", || async { matches!(get(addr, "/-/ready").await, Ok((200, _))) }).await;
        p
    }

    async fn api(&self, path: &str) -> Value {
        let (status, body) = get(self.addr, path).await.unwrap_or_else(|e| panic!("GET {path}: {e}"));
        assert_eq!(status, 200, "GET {path}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"));
        assert_eq!(v["status"], "success", "GET {path}: {body}");
        v["data"].clone()
    }

    /// The value of an instant query returning one number (`None` when empty).
    async fn query(&self, promql: &str) -> Option<f64> {
        let data = self.api(&format!("/api/v1/query?query={}", url_encode(promql))).await;
        let result = data["result"].as_array()?.first()?.clone();
        result["value"][1].as_str()?.parse().ok()
    }

    /// Pending and firing alerts.
    async fn alerts(&self) -> BTreeSet<Alert> {
        let data = self.api("/api/v1/alerts").await;
        let label = |a: &Value, k: &str| a["labels"][k].as_str().unwrap_or_default().to_string();
        data["alerts"]
            .as_array()
            .expect("alerts")
            .iter()
            .map(|a| Alert {
                name: label(a, "alertname"),
                severity: label(a, "severity"),
                service: label(a, "service"),
                firing: a["state"] == "firing",
            })
            .collect()
    }

    /// Polls `ready` until it holds, or fails after [`SETTLE`] with the log.
    async fn wait<F: std::future::Future<Output = bool>>(&self, what: &str, mut ready: impl FnMut() -> F) {
        let deadline = Instant::now() + SETTLE;
        while !ready().await {
            assert!(Instant::now() < deadline, "prometheus: {what} not within {SETTLE:?}; log:\n{:?}", self.log());
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn log(&self) -> Vec<String> {
        self.process.log_tail(20)
    }

    /// Waits until the active (pending or firing) alerts are exactly
    /// `expected`, all firing, then checks they stay so for [`HOLD`].
    async fn settle(&self, situation: &str, expected: &[(&str, &str, &str)]) -> Duration {
        let expected: BTreeSet<Alert> = expected
            .iter()
            .map(|(name, severity, service)| Alert {
                name: name.to_string(),
                severity: severity.to_string(),
                service: service.to_string(),
                firing: true,
            })
            .collect();
        let started = Instant::now();
        let deadline = started + SETTLE;
        loop {
            let now = self.alerts().await;
            if now == expected {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{situation}: the alerts never became exactly {expected:#?}\nlast seen (pending and firing): {now:#?}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let settled = started.elapsed();
        let hold_until = Instant::now() + HOLD;
        while Instant::now() < hold_until {
            let now = self.alerts().await;
            assert_eq!(now, expected, "{situation}: the set changed within {HOLD:?} of settling");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        eprintln!("{situation}: {} alert(s) firing after {settled:?}", expected.len());
        settled
    }
}

fn chat() -> GenerateRequest {
    GenerateRequest { model: "chat".into(), ..prompt_request("alert me", 2) }
}

/// Calls `chat` through `sidecar` with `key` every `pause`, until aborted.
fn traffic(sidecar: &SidecarProcess, key: &'static str, pause: Duration) -> JoinHandle<()> {
    let outbound = sidecar.outbound;
    tokio::spawn(async move {
        let channel = tonic::transport::Channel::from_shared(format!("http://{outbound}")).unwrap().connect_lazy();
        let mut client = mesh_proto::v1::generation_client::GenerationClient::new(channel);
        loop {
            let mut req = tonic::Request::new(chat());
            req.metadata_mut().insert("authorization", format!("Bearer {key}").parse().unwrap());
            let _ = async {
                let mut stream = client.generate(req).await?.into_inner();
                while stream.message().await?.is_some() {}
                Ok::<_, tonic::Status>(())
            }
            .await;
            tokio::time::sleep(pause).await;
        }
    })
}

/// Aborts its task when dropped, also on a panic.
struct Traffic(JoinHandle<()>);

impl Drop for Traffic {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn shipped_alerts_fire_exactly_when_they_should() {
    let started = Instant::now();
    let shipped = repo_root().join("deploy/observability");
    let shipped_config = shipped.join("prometheus.yml");
    let shipped_rules = shipped.join("alerts.yml");
    promtool(&["check", "config", "--syntax-only", shipped_config.to_str().unwrap()]);
    promtool(&["check", "rules", shipped_rules.to_str().unwrap()]);

    let etcd = Etcd::start().await;
    let metrics = ["--metrics-listen", "127.0.0.1:0"];
    let node = NodeProcess::start(&["--backend", "synthetic", "--model-name", "chat", metrics[0], metrics[1]]).await;
    let node_sidecar = SidecarProcess::start_with_args(&etcd, Some(&node), "", &metrics).await;
    let keys = format!("[[api_keys]]\ntenant = \"acme\"\nsha256 = \"{}\"\n", mesh_proto::api_key::digest(GOOD_KEY));
    let client = SidecarProcess::start_with_args(&etcd, None, &keys, &metrics).await;
    client.wait_for_instances("chat", 1).await;
    // Held in Options: the outage drops (kills) them.
    let (mut node, mut node_sidecar) = (Some(node), Some(node_sidecar));

    let etcd_addr: SocketAddr = etcd.url().trim_start_matches("http://").parse().expect("etcd address");
    let jobs = BTreeMap::from([
        ("mesh-node", vec![node.as_ref().unwrap().metrics.expect("node metrics")]),
        (
            "mesh-sidecar",
            vec![
                node_sidecar.as_ref().unwrap().metrics().expect("sidecar metrics"),
                client.metrics().expect("client metrics"),
            ],
        ),
        // etcd serves /metrics on its client port too.
        ("etcd", vec![etcd_addr]),
    ]);
    let unused_alertmanager: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let dir = TempDir::new();
    let config = dir.0.join("prometheus.yml");
    let rules = dir.0.join("alerts.yml");
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    std::fs::write(&config, test_prometheus_yml(&read(&shipped_config), &jobs, unused_alertmanager)).unwrap();
    std::fs::write(&rules, test_alerts_yml(&read(&shipped_rules))).unwrap();
    promtool(&["check", "config", config.to_str().unwrap()]);

    let _good = Traffic(traffic(&client, GOOD_KEY, Duration::from_millis(50)));
    let prometheus = Prometheus::start(&dir.0, &config).await;

    // (a) Healthy, with traffic: every target up, calls succeed, rules
    // evaluated on that: nothing pending, nothing firing.
    let targets = jobs.values().map(Vec::len).sum::<usize>() as f64;
    prometheus.wait("every target up", || async { prometheus.query("sum(up)").await == Some(targets) }).await;
    let ok = r#"sum(rate(mesh_sidecar_requests_total{direction="outbound",service="chat",code="OK"}[15s]))"#;
    prometheus.wait("successful calls seen", || async { prometheus.query(ok).await.is_some_and(|r| r > 1.0) }).await;
    prometheus.settle("(a) healthy mesh with traffic", &[]).await;

    // (c) A client with a revoked key floods the mesh while the good
    // client goes on: a ticket, no page.
    let flood = Traffic(traffic(&client, BAD_KEY, Duration::from_millis(10)));
    prometheus.settle("(c) a flood of calls with a bad key", &[("MeshClientErrorsHigh", "ticket", "chat")]).await;
    drop(flood);

    // (b) The service's only instance is gone while the client calls it:
    // the client sidecar answers UNAVAILABLE, which pages, as does the
    // service with no healthy instance; the two processes' targets are
    // down (a warning); the ticket drains away.
    drop(node_sidecar.take());
    drop(node.take());
    let outage = [
        ("MeshErrorRatioHigh", "page", "chat"),
        ("ServiceHasNoHealthyInstance", "page", "chat"),
        ("MeshTargetDown", "warning", ""),
    ];
    prometheus.settle("(b) the service's only instance gone", &outage).await;
    let unavailable = r#"sum(mesh_sidecar_requests_total{direction="outbound",service="chat",code="UNAVAILABLE"})"#;
    assert!(prometheus.query(unavailable).await.is_some_and(|n| n > 0.0), "the outage must read UNAVAILABLE");
    let not_found = r#"sum(mesh_sidecar_requests_total{direction="outbound",code="NOT_FOUND"})"#;
    assert_eq!(prometheus.query(not_found).await, None, "an outage is not NOT_FOUND");
    eprintln!("alerts test: {:?} in all", started.elapsed());
}
