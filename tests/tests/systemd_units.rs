//! The units under a real systemd: a container (systemd-nspawn, systemd as
//! its PID 1, the host's /usr read-only, everything else a tmpfs, only a
//! loopback network) gets the three binaries in /usr/local/bin and the units
//! of deploy/systemd in /etc/systemd/system, as install.sh puts them, and
//! runs etcd, a synthetic node and two sidecars through `systemctl`:
//! - readiness: `systemctl start` returns once the process said READY=1, so
//!   the node answers and the sidecar's record is already in etcd;
//! - drain on stop: a stream in flight when `systemctl stop mesh-node@chat`
//!   runs (its sidecar stops with it, mesh-sidecar-node.conf) finishes whole,
//!   both units end `Result=success` and the record is gone;
//! - restart on crash: a node or sidecar killed with SIGKILL is started again
//!   by Restart=on-failure, after its RestartSec=, and the mesh serves again.
//!
//! Needs root and systemd-nspawn (Debian: systemd-container).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use mesh_tests::{bin_dir, free_port};

/// Tokens per second of the synthetic node: the drained stream below lasts
/// `DRAINED_TOKENS / TOKENS_PER_SEC` = 2 s, long enough to be mid-stream
/// when the stop comes, short enough for the test.
const TOKENS_PER_SEC: u32 = 50;
const DRAINED_TOKENS: u32 = 100;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// A booted container; powered off and its files removed when dropped.
struct Container {
    nspawn: Child,
    /// The container's PID 1 (systemd), as the host sees it.
    leader: u32,
    machine: String,
    stage: PathBuf,
}

impl Container {
    /// Boots systemd in a container that sees `stage` at /mnt/stage and
    /// `stage/bin` at /usr/local/bin.
    fn boot(stage: &Path, machine: &str) -> Container {
        let nspawn = Command::new("systemd-nspawn")
            .args(["--quiet", "--directory=/", "--volatile=yes", "--private-network", "--register=no", "--keep-unit"])
            .arg(format!("--machine={machine}"))
            .arg("--console=pipe")
            .arg(format!("--bind-ro={}:/mnt/stage", stage.display()))
            .arg(format!("--bind-ro={}:/usr/local/bin", stage.join("bin").display()))
            .arg("--boot")
            .arg("--")
            // Booted with an empty /etc, systemd enables every installed
            // service (presets): basic.target keeps the host's daemons out.
            // A container with only loopback is never "online": the wait
            // would hold the units (After=network-online.target) for 2 min.
            .args([
                "systemd.unit=basic.target",
                "systemd.firstboot=off",
                "systemd.mask=systemd-networkd-wait-online.service",
                "systemd.mask=etcd.service",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("systemd-nspawn: install systemd-container (apt-get install systemd-container)");
        let mut container = Container { leader: 0, machine: machine.into(), stage: stage.into(), nspawn };
        container.leader = container.wait_for_leader();
        // is-system-running --wait returns once boot is done: "running", or
        // "degraded" where a unit of the host's that has no business in a
        // container failed; either way PID 1 takes jobs.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = container.exec(&["systemctl", "is-system-running", "--wait"]);
            let state = String::from_utf8_lossy(&out.stdout).trim().to_string();
            if state == "running" || state == "degraded" {
                break;
            }
            assert!(Instant::now() < deadline, "container did not boot: {state:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
        container
    }

    fn wait_for_leader(&mut self) -> u32 {
        let pid = self.nspawn.id();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self.nspawn.try_wait().unwrap() {
                panic!("systemd-nspawn exited at start: {status}");
            }
            let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
            if let Some(leader) = children.split_whitespace().next().and_then(|c| c.parse().ok()) {
                let comm = std::fs::read_to_string(format!("/proc/{leader}/comm")).unwrap_or_default();
                if comm.trim() == "systemd" {
                    return leader;
                }
            }
            assert!(Instant::now() < deadline, "no systemd in the container");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `args` run inside the container (all its namespaces).
    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("nsenter");
        c.args(["-t", &self.leader.to_string(), "-a", "--"]).args(args);
        c
    }

    fn exec(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("nsenter")
    }

    /// `args` in the container; their stdout, or a panic with their stderr.
    fn run(&self, args: &[&str]) -> String {
        let out = self.exec(args);
        assert!(
            out.status.success(),
            "{}: {}{}\n{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.journal()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn systemctl(&self, args: &[&str]) -> String {
        self.run(&[&["systemctl"], args].concat())
    }

    /// One property of `unit` (`systemctl show -p NAME --value`).
    fn show(&self, unit: &str, property: &str) -> String {
        self.systemctl(&["show", "-p", property, "--value", unit]).trim().to_string()
    }

    /// The mesh's units' log, for failure messages.
    fn journal(&self) -> String {
        let out = self.exec(&["journalctl", "--no-pager", "-n", "60", "-u", "mesh-*"]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Instances of `service` registered in etcd (`meshctl status --json`).
    fn records(&self, service: &str) -> usize {
        let json = self.run(&["/usr/local/bin/meshctl", "status", "--json"]);
        let records: Vec<serde_json::Value> = serde_json::from_str(&json).expect("meshctl status --json");
        records.iter().filter(|r| r["service"] == service).count()
    }

    /// One completion of `max_tokens` through the client's sidecar.
    fn generate(&self, max_tokens: u32) -> Command {
        let max_tokens = max_tokens.to_string();
        let args = ["/usr/local/bin/meshctl", "--addr", "http://127.0.0.1:7200", "generate", "--model", "chat"];
        let mut c = self.command(&args);
        c.args(["--raw", "--max-tokens", &max_tokens, "one two three"]);
        c
    }

    /// Whether a short completion through the client's sidecar succeeds.
    fn serves(&self) -> bool {
        self.generate(5).output().is_ok_and(|out| out.status.success())
    }

    /// Polls `done` every 50 ms for up to `limit`; how long it took.
    fn wait_until(&self, what: &str, limit: Duration, mut done: impl FnMut() -> bool) -> Duration {
        let start = Instant::now();
        while !done() {
            assert!(start.elapsed() < limit, "{what}: not within {limit:?}\n{}", self.journal());
            std::thread::sleep(Duration::from_millis(50));
        }
        start.elapsed()
    }

    /// SIGKILLs `unit`'s main process; how long until systemd has it active
    /// again under a new PID.
    fn crash(&self, unit: &str) -> Duration {
        let before = self.show(unit, "MainPID");
        let restarts: u32 = self.show(unit, "NRestarts").parse().unwrap();
        self.systemctl(&["kill", "--signal=SIGKILL", "--kill-whom=main", unit]);
        let took = self.wait_until(&format!("{unit} active again"), Duration::from_secs(15), || {
            self.show(unit, "ActiveState") == "active"
                && !["0", before.as_str()].contains(&self.show(unit, "MainPID").as_str())
        });
        assert_eq!(self.show(unit, "NRestarts"), (restarts + 1).to_string(), "{unit}: one restart");
        took
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = self.exec(&["systemctl", "poweroff"]);
        let deadline = Instant::now() + Duration::from_secs(20);
        while matches!(self.nspawn.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        if matches!(self.nspawn.try_wait(), Ok(None)) {
            let _ = self.nspawn.kill();
            let _ = self.nspawn.wait();
        }
        // systemd-nspawn leaves this (empty) where /run is not a tmpfs.
        let _ = std::fs::remove_dir(format!("/run/systemd/nspawn/propagate/{}", self.machine));
        let _ = std::fs::remove_dir_all(&self.stage);
    }
}

/// What the container gets: the binaries, the units (the node drop-in on the
/// chat sidecar only, as DEPLOY.md installs it) and configs for one host
/// running everything on loopback, in plaintext.
fn stage() -> PathBuf {
    let stage = std::env::temp_dir().join(format!("mesh-systemd-{}-{}", std::process::id(), free_port()));
    let (bin, units, etc) = (stage.join("bin"), stage.join("units"), stage.join("mesh"));
    let dropin = units.join("mesh-sidecar@chat.service.d");
    for d in [&bin, &dropin, &etc] {
        std::fs::create_dir_all(d).unwrap();
    }
    for name in ["mesh-node", "mesh-sidecar", "meshctl"] {
        std::fs::copy(bin_dir().join(name), bin.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    for unit in ["mesh-node@.service", "mesh-sidecar@.service", "mesh-etcd@.service"] {
        std::fs::copy(deploy().join("systemd").join(unit), units.join(unit)).unwrap();
    }
    std::fs::copy(deploy().join("systemd/mesh-sidecar-node.conf"), dropin.join("node.conf")).unwrap();
    let files = [
        (
            "node-chat.env",
            format!(
                "MESH_NODE_LISTEN=127.0.0.1:50051\nMESH_NODE_BACKEND=synthetic\nMESH_NODE_MODEL_NAME=chat\n\
                 MESH_NODE_SYNTHETIC_TOKENS_PER_SEC={TOKENS_PER_SEC}\nMESH_NODE_DRAIN_GRACE=20s\n"
            ),
        ),
        (
            "etcd.env",
            "ETCD_INITIAL_CLUSTER=etcd-1=http://127.0.0.1:2380\nETCD_INITIAL_CLUSTER_TOKEN=mesh-systemd-test\n\
             ETCD_INITIAL_CLUSTER_STATE=new\nETCD_DATA_DIR=/var/lib/mesh/etcd\n"
                .into(),
        ),
        (
            "etcd-etcd-1.env",
            "ETCD_NAME=etcd-1\nETCD_LISTEN_CLIENT_URLS=http://127.0.0.1:2379\n\
             ETCD_ADVERTISE_CLIENT_URLS=http://127.0.0.1:2379\nETCD_LISTEN_PEER_URLS=http://127.0.0.1:2380\n\
             ETCD_INITIAL_ADVERTISE_PEER_URLS=http://127.0.0.1:2380\n"
                .into(),
        ),
        (
            "sidecar-chat.toml",
            "version = \"1.0\"\ndrain_grace = \"20s\"\nplaintext = true\n\
             [listen]\noutbound = \"127.0.0.1:7100\"\ninbound = \"127.0.0.1:7101\"\n\
             [node]\naddress = \"127.0.0.1:50051\"\nservice = \"chat\"\n\
             [etcd]\nendpoints = [\"http://127.0.0.1:2379\"]\nlease_ttl = \"5s\"\n\
             [[services]]\nname = \"chat\"\nmax_concurrency = 32\nmax_queue = 16\nmax_queue_wait = \"1s\"\n"
                .into(),
        ),
        (
            "sidecar-client.toml",
            "version = \"1.0\"\ndrain_grace = \"20s\"\nplaintext = true\n\
             [listen]\noutbound = \"127.0.0.1:7200\"\ninbound = \"127.0.0.1:7201\"\n\
             [etcd]\nendpoints = [\"http://127.0.0.1:2379\"]\nlease_ttl = \"5s\"\n"
                .into(),
        ),
    ];
    for (name, text) in files {
        std::fs::write(etc.join(name), text).unwrap();
    }
    stage
}

#[test]
fn units_start_ready_drain_on_stop_and_restart_on_crash() {
    let started = Instant::now();
    let stage = stage();
    let machine = format!("mesh-sd-{}", std::process::id());
    let c = Container::boot(&stage, &machine);
    eprintln!("systemd_units: container booted in {:?}", started.elapsed());

    // Installed as install.sh does: user, directories, units, configs.
    c.run(&[
        "sh",
        "-ec",
        "useradd --system --user-group --no-create-home --home-dir /var/lib/mesh --shell /usr/sbin/nologin mesh
         install -d -o mesh -g mesh /var/lib/mesh
         install -d -m 0700 -o mesh -g mesh /var/lib/mesh/etcd
         install -d /var/lib/mesh/models /etc/mesh
         cp -r /mnt/stage/units/. /etc/systemd/system/
         cp /mnt/stage/mesh/* /etc/mesh/
         systemctl daemon-reload",
    ]);

    // Readiness: each start returns once its unit is active and serving.
    c.systemctl(&["start", "mesh-etcd@etcd-1", "mesh-node@chat"]);
    for unit in ["mesh-etcd@etcd-1", "mesh-node@chat"] {
        assert_eq!(c.show(unit, "ActiveState"), "active", "{unit}\n{}", c.journal());
    }
    c.run(&["/usr/local/bin/meshctl", "--addr", "http://127.0.0.1:50051", "models"]);
    c.systemctl(&["start", "mesh-sidecar@chat"]);
    assert_eq!(c.show("mesh-sidecar@chat", "ActiveState"), "active");
    // READY=1 only once the record is in etcd: no wait here.
    assert_eq!(c.records("chat"), 1, "chat's record when its sidecar's start returned");
    // The client's sidecar is READY once it is registered; its view of the
    // registry (a watch) fills in just after.
    c.systemctl(&["start", "mesh-sidecar@client"]);
    let sees = c.wait_until("the client sidecar serving chat", Duration::from_secs(5), || c.serves());
    eprintln!("systemd_units: the client's sidecar served chat {sees:?} after its start returned");

    // Drain on stop: a stream that has begun finishes whole.
    let mut stream = c.generate(DRAINED_TOKENS).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut first = [0u8; 1];
    stream.stdout.as_mut().unwrap().read_exact(&mut first).expect("the stream's first token");
    let stopping = Instant::now();
    c.systemctl(&["stop", "mesh-node@chat"]);
    let stop_took = stopping.elapsed();
    let out = stream.wait_with_output().unwrap();
    let summary = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the stream in flight at stop: {summary}\n{}", c.journal());
    assert!(summary.contains(&format!("completion {DRAINED_TOKENS} tokens")), "{summary}");
    // The stream had ~2 s left: stop waited for it rather than cutting it.
    assert!(stop_took > Duration::from_secs(1), "stop returned in {stop_took:?}, before the stream ended");
    for unit in ["mesh-node@chat", "mesh-sidecar@chat"] {
        assert_eq!(c.show(unit, "ActiveState"), "inactive", "{unit} after stop");
        assert_eq!(c.show(unit, "Result"), "success", "{unit} after stop\n{}", c.journal());
    }
    assert_eq!(c.records("chat"), 0, "chat's record after its sidecar stopped");
    eprintln!("systemd_units: stop drained a stream in flight in {stop_took:?}");

    // Restart on crash. The node is back after its RestartSec= (3 s). A
    // killed sidecar's record outlives it until its lease (5 s) expires, and
    // its successor, started after RestartSec= (2 s), is READY only once it
    // holds the instance key again: from 2 s, by 5 s plus a margin.
    c.systemctl(&["start", "mesh-node@chat", "mesh-sidecar@chat"]);
    for (unit, earliest, latest) in [("mesh-node@chat", 3, 3), ("mesh-sidecar@chat", 2, 5)] {
        let took = c.crash(unit);
        let (earliest, latest) = (Duration::from_secs(earliest), Duration::from_secs(latest + 2));
        assert!(took >= earliest && took < latest, "{unit} active again after {took:?}\n{}", c.journal());
        // The node's restart restarts its sidecar too (PartOf=, the drop-in).
        let serves = c.wait_until("chat served again", Duration::from_secs(5), || {
            c.show("mesh-sidecar@chat", "ActiveState") == "active" && c.records("chat") == 1 && c.serves()
        });
        eprintln!("systemd_units: {unit} killed with SIGKILL, active again in {took:?}, chat served {serves:?} later");
    }
    drop(c);
    eprintln!("systemd_units: {:?} in all", started.elapsed());
}
