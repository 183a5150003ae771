//! An upgrade and a rollback with deploy/install.sh, under a temporary
//! root: release 1.0.0 is installed and an operator edits a config; release
//! 1.1.0 (a copy of deploy/ whose client config example gains a key and
//! says `version = "1.1"`) is installed beside it, keeps the edited config
//! and writes the new example as `.new`; the operator merges the new key;
//! `--rollback` returns to 1.0.0 (its units too), whose sidecar reads the
//! 1.1 config, ignoring the new key with a warning instead of exiting 2.
//! At every step a mesh started from the installed files serves.
//!
//! Both releases hold the same binaries (this build), which read config
//! version 1.0; what differs between them is what install.sh installs.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mesh_proto::v1::generation_client::GenerationClient;
use mesh_proto::v1::sidecar_admin_client::SidecarAdminClient;
use mesh_proto::v1::{GenerateRequest, InstancesRequest};
use mesh_tests::etcd::Etcd;
use mesh_tests::{Completion, Spawned, bin_dir, chat_request, free_port};
use tonic::transport::Channel;

/// The keys of deploy/config/sidecar-client.toml (tenant `app`, and the
/// operator's admin key).
const API_KEY: &str = "dev-key-change-me";
const ADMIN_KEY: &str = "dev-admin-key-change-me";

/// The key release 1.1.0 adds (config version 1.1), unknown to this build.
const NEW_KEY: &str = "hedge_after = \"250ms\"";

/// The operator's own change to the client config, which upgrades keep.
const OPERATOR_EDIT: &str =
    "\n# Operator: app's limit.\n[tenants.app]\nrequests_per_sec = 40.0\ntokens_per_min = 200000.0\n";

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// The host: a temporary directory standing for `/`.
struct Host {
    root: PathBuf,
}

impl Host {
    fn new() -> Host {
        let root = std::env::temp_dir().join(format!("mesh-upgrade-{}-{}", std::process::id(), free_port()));
        std::fs::create_dir_all(&root).unwrap();
        Host { root }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.root.join(p.trim_start_matches('/'))
    }

    fn read(&self, p: &str) -> String {
        std::fs::read_to_string(self.path(p)).unwrap_or_else(|e| panic!("{p}: {e}"))
    }

    /// Runs `script` (an install.sh) with `args` and `--root`; panics unless it succeeds.
    fn install(&self, script: &Path, args: &[&str]) -> String {
        let out =
            std::process::Command::new("bash").arg(script).args(args).arg("--root").arg(&self.root).output().unwrap();
        assert!(out.status.success(), "{} {args:?}: {}", script.display(), text(&out.stderr));
        text(&out.stdout)
    }

    /// The release `/opt/mesh/<link>` points at.
    fn release(&self, link: &str) -> String {
        let target = std::fs::read_link(self.path(&format!("opt/mesh/{link}"))).unwrap();
        target.file_name().unwrap().to_str().unwrap().to_string()
    }

    /// The program of the installed unit's `ExecStart` (`/usr/local/bin/...`),
    /// under the root: a symlink through `/opt/mesh/current`.
    fn exec_start(&self, unit: &str) -> PathBuf {
        let text = self.read(&format!("etc/systemd/system/{unit}"));
        let exec = text.lines().find_map(|l| l.strip_prefix("ExecStart=")).expect("ExecStart");
        self.path(exec.split_whitespace().next().unwrap())
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A copy of deploy/ as release 1.1.0 would ship it: the client config
/// example at version 1.1 with `NEW_KEY` in `[routing]`, and a sidecar unit
/// that differs (so the test can tell which release's units are installed).
fn next_release(dir: &Path) -> PathBuf {
    let copy = dir.join("deploy-1.1.0");
    let ok = std::process::Command::new("cp").arg("-r").arg(deploy()).arg(&copy).status().unwrap();
    assert!(ok.success());
    let example = copy.join("config/sidecar-client.toml");
    let old = std::fs::read_to_string(&example).unwrap();
    let new = old.replacen("version = \"1.0\"", "version = \"1.1\"", 1).replacen(
        "[routing]\n",
        &format!("[routing]\n# 1.1: hedge a slow first token.\n{NEW_KEY}\n"),
        1,
    );
    assert!(new.contains("version = \"1.1\"") && new.contains(NEW_KEY), "the example changed: {new}");
    std::fs::write(&example, new).unwrap();
    let unit = copy.join("systemd/mesh-sidecar@.service");
    let text = std::fs::read_to_string(&unit).unwrap();
    std::fs::write(&unit, format!("{text}# release 1.1.0\n")).unwrap();
    // 1.1.0 renames a unit: the old name must not stay installed.
    std::fs::rename(copy.join("systemd/mesh-etcd@.service"), copy.join("systemd/mesh-kv@.service")).unwrap();
    copy
}

/// `config` (an installed sidecar config) made runnable in this test: etcd
/// at `etcd` in plaintext, listeners on free loopback ports, `node` as its
/// node; every other key, `version` and unknown ones included, as written.
fn runnable(config: &str, etcd: &str, node: Option<SocketAddr>) -> String {
    let mut t: toml::Table = config.parse().unwrap_or_else(|e| panic!("{e}\n{config}"));
    t.remove("tls");
    t.insert("plaintext".into(), true.into());
    t.insert("metrics_listen".into(), "127.0.0.1:0".into());
    let mut listen = toml::Table::new();
    listen.insert("outbound".into(), "127.0.0.1:0".into());
    listen.insert("inbound".into(), "127.0.0.1:0".into());
    t.insert("listen".into(), listen.into());
    let mut e = toml::Table::new();
    e.insert("endpoints".into(), toml::Value::Array(vec![etcd.into()]));
    e.insert("lease_ttl".into(), "2s".into());
    t.insert("etcd".into(), e.into());
    if let (Some(addr), Some(toml::Value::Table(n))) = (node, t.get_mut("node")) {
        n.insert("address".into(), addr.to_string().into());
    }
    toml::to_string(&t).unwrap()
}

/// A mesh started from the installed files: the node and both sidecars run
/// the programs of the installed units' `ExecStart`, the sidecars with the
/// installed configs (made runnable).
struct Mesh {
    node: Spawned,
    chat: Spawned,
    client: Spawned,
    outbound: SocketAddr,
}

impl Mesh {
    /// Stops it as systemd would (SIGTERM, sidecars first): a draining
    /// sidecar revokes its lease, so the next mesh's client never sees this
    /// one's chat instance. (Dropped on a panic instead, each is killed.)
    async fn stop(mut self) {
        for p in [&mut self.client, &mut self.chat, &mut self.node] {
            p.signal("TERM").unwrap();
            let exited = tokio::time::timeout(Duration::from_secs(20), p.wait()).await;
            assert!(exited.is_ok_and(|s| s.is_ok_and(|s| s.success())), "{} did not drain and exit", p.name());
        }
    }
}

async fn start_mesh(host: &Host, etcd: &Etcd) -> Mesh {
    let node_bin = host.exec_start("mesh-node@.service");
    let node_args = ["--backend", "synthetic", "--model-name", "chat", "--synthetic-tokens-per-sec", "2000"];
    let node = harness::Node::start("mesh-node", &node_bin, node_args).await.unwrap_or_else(|e| panic!("{e}"));
    let (chat, _) = start_sidecar(host, "chat", &etcd.url(), Some(node.addr)).await;
    let (client, outbound) = start_sidecar(host, "client", &etcd.url(), None).await;
    let mesh = Mesh { node: node.process, chat, client, outbound };
    wait_for_chat(mesh.outbound).await;
    mesh
}

/// `mesh-sidecar@NAME` from the installed unit and `/etc/mesh/sidecar-NAME.toml`.
async fn start_sidecar(host: &Host, name: &str, etcd: &str, node: Option<SocketAddr>) -> (Spawned, SocketAddr) {
    let config = runnable(&host.read(&format!("etc/mesh/sidecar-{name}.toml")), etcd, node);
    let file = host.path(&format!("run/sidecar-{name}.toml"));
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    std::fs::write(&file, config).unwrap();
    let mut cmd = tokio::process::Command::new(host.exec_start("mesh-sidecar@.service"));
    cmd.arg("--config").arg(&file).env("RUST_LOG", "info");
    let mut process = Spawned::spawn(format!("mesh-sidecar@{name}"), cmd).unwrap_or_else(|e| panic!("{e}"));
    let ready = process.announced("sidecar", Duration::from_secs(30)).await.unwrap_or_else(|e| panic!("{e}"));
    let outbound = ready.require(process.name(), "outbound").unwrap();
    (process, outbound)
}

/// Waits until the client sidecar sees the chat instance (its admin
/// service, with the operator's key of the same config).
async fn wait_for_chat(outbound: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(15);
    let channel = channel(outbound).await;
    loop {
        let mut request = tonic::Request::new(InstancesRequest {});
        request.metadata_mut().insert("authorization", format!("Bearer {ADMIN_KEY}").parse().unwrap());
        let seen = SidecarAdminClient::new(channel.clone()).instances(request).await;
        if seen.is_ok_and(|r| r.into_inner().instances.iter().any(|i| i.service == "chat")) {
            return;
        }
        assert!(Instant::now() < deadline, "the client sidecar never saw the chat instance");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap()
}

/// One completion of 8 tokens through the client sidecar, as tenant `app`.
async fn serves(mesh: &Mesh, step: &str) {
    let mut client = GenerationClient::new(channel(mesh.outbound).await);
    let mut request = tonic::Request::new(GenerateRequest { model: "chat".into(), ..chat_request("Hello", 8) });
    request.metadata_mut().insert("authorization", format!("Bearer {API_KEY}").parse().unwrap());
    let completion = async {
        let mut stream = client.generate(request).await?.into_inner();
        let mut done = Completion::default();
        while let Some(msg) = stream.message().await? {
            done.absorb(msg);
        }
        Ok::<_, tonic::Status>(done)
    };
    let done = completion.await.unwrap_or_else(|s| panic!("{step}: the mesh did not serve: {s}"));
    assert!(done.usage.is_some_and(|u| u.completion_tokens == 8), "{step}: {done:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upgrade_keeps_edited_configs_and_a_rollback_reads_the_newer_config() {
    let started = Instant::now();
    let host = Host::new();
    let bin = bin_dir();
    let bin = bin.to_str().unwrap();
    let etcd = Etcd::start().await;

    // Release 1.0.0, and the operator's edit of the client config.
    host.install(&deploy().join("install.sh"), &["--bin-dir", bin, "--version", "1.0.0"]);
    assert_eq!(host.release("current"), "1.0.0");
    let sidecar = std::fs::canonicalize(host.path("usr/local/bin/mesh-sidecar")).unwrap();
    assert_eq!(sidecar, std::fs::canonicalize(host.path("opt/mesh/releases/1.0.0/bin/mesh-sidecar")).unwrap());
    let installed = host.read("etc/mesh/sidecar-client.toml");
    assert!(installed.contains("version = \"1.0\""), "{installed}");
    let edited = format!("{installed}{OPERATOR_EDIT}");
    std::fs::write(host.path("etc/mesh/sidecar-client.toml"), &edited).unwrap();
    let mesh = start_mesh(&host, &etcd).await;
    serves(&mesh, "1.0.0").await;
    mesh.stop().await;

    // Release 1.1.0: the edited config is kept, its new example beside it.
    let next = next_release(&host.root);
    let said = host.install(&next.join("install.sh"), &["--bin-dir", bin, "--version", "1.1.0"]);
    assert_eq!((host.release("current"), host.release("previous")), ("1.1.0".into(), "1.0.0".into()));
    assert_eq!(host.read("etc/mesh/sidecar-client.toml"), edited, "an upgrade overwrote the operator's config");
    let example = host.read("etc/mesh/sidecar-client.toml.new");
    assert_eq!(example, host.read("opt/mesh/releases/1.1.0/config/sidecar-client.toml"));
    assert!(said.contains("sidecar-client.toml.new"), "install.sh did not say so: {said}");
    assert!(!host.path("etc/mesh/sidecar-chat.toml.new").exists(), "an unchanged example was offered as new");
    let renamed =
        (host.path("etc/systemd/system/mesh-etcd@.service"), host.path("etc/systemd/system/mesh-kv@.service"));
    assert!(!renamed.0.exists() && renamed.1.exists(), "a unit the release renamed stayed installed");
    let units_1_1 = host.read("etc/systemd/system/mesh-sidecar@.service");
    assert_eq!(units_1_1, host.read("opt/mesh/releases/1.1.0/systemd/mesh-sidecar@.service"));

    // The operator merges the new key: the config is now version 1.1.
    let merged = edited.replacen("version = \"1.0\"", "version = \"1.1\"", 1).replacen(
        "[routing]\n",
        &format!("[routing]\n{NEW_KEY}\n"),
        1,
    );
    std::fs::write(host.path("etc/mesh/sidecar-client.toml"), &merged).unwrap();
    let mesh = start_mesh(&host, &etcd).await;
    serves(&mesh, "1.1.0").await;
    mesh.stop().await;

    // Rollback, with the installed release's own script.
    let said = host.install(&host.path("opt/mesh/current/install.sh"), &["--rollback"]);
    assert!(said.contains("rolled back from 1.1.0 to 1.0.0"), "{said}");
    assert_eq!((host.release("current"), host.release("previous")), ("1.0.0".into(), "1.1.0".into()));
    let units = host.read("etc/systemd/system/mesh-sidecar@.service");
    assert_eq!(units, host.read("opt/mesh/releases/1.0.0/systemd/mesh-sidecar@.service"), "1.0.0's units are back");
    assert_ne!(units, units_1_1);
    assert!(renamed.0.exists() && !renamed.1.exists(), "the rollback did not restore 1.0.0's unit names");
    assert_eq!(host.read("etc/mesh/sidecar-client.toml"), merged, "a rollback leaves configs alone");
    let listed = host.install(&deploy().join("install.sh"), &["--list"]);
    assert_eq!(listed, "* 1.0.0\n  1.1.0 (previous)\n");
    let sidecar = std::fs::canonicalize(host.exec_start("mesh-sidecar@.service")).unwrap();
    assert_eq!(sidecar, std::fs::canonicalize(host.path("opt/mesh/releases/1.0.0/bin/mesh-sidecar")).unwrap());

    // 1.0.0's sidecar reads the 1.1 config: the new key is ignored, and said.
    let mesh = start_mesh(&host, &etcd).await;
    serves(&mesh, "rolled back to 1.0.0").await;
    let warning =
        "ignoring keys unknown to this version (config version 1.1, this binary reads 1.0): routing.hedge_after";
    assert_eq!(mesh.client.logged(warning), 1, "{:?}", mesh.client.log_tail(20));
    assert_eq!(mesh.chat.logged("ignoring keys"), 0, "the chat config (1.0, unchanged) has no unknown key");
    mesh.stop().await;
    eprintln!("upgrade and rollback: {:.1} s", started.elapsed().as_secs_f64());
}
