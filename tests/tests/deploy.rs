//! The deployment files: systemd accepts the units, the install script
//! places a release and links to it (upgrades and rollbacks: upgrade.rs),
//! and the example configs are valid.

use std::path::{Path, PathBuf};

use mesh_tests::{bin_dir, free_port};

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn temp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mesh-{name}-{}-{}", std::process::id(), free_port()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn every_unit_passes_systemd_analyze_verify() {
    let dir = temp("units");
    let mut units = Vec::new();
    for path in unit_files() {
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        // The binaries are checked where this build put them.
        let text =
            std::fs::read_to_string(&path).unwrap().replace("/usr/local/bin/", &format!("{}/", bin_dir().display()));
        // Templates are verified as instances.
        let instances = match name.strip_suffix("@.service") {
            Some(base) => vec![format!("{base}@chat.service"), format!("{base}@client.service")],
            None => vec![name.clone()],
        };
        for unit in instances {
            std::fs::write(dir.join(&unit), &text).unwrap();
            units.push(dir.join(unit));
        }
    }
    assert!(units.len() >= 5, "{units:?}");
    let out =
        std::process::Command::new("systemd-analyze").arg("verify").args(&units).output().expect("systemd-analyze");
    let errors = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && errors.trim().is_empty(), "systemd-analyze verify: {errors}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The units of deploy/systemd (not its drop-ins, `*.conf`).
fn unit_files() -> Vec<PathBuf> {
    let entries = std::fs::read_dir(deploy().join("systemd")).unwrap();
    let paths = entries.map(|e| e.unwrap().path());
    paths.filter(|p| p.extension().is_some_and(|e| e == "service")).collect()
}

#[test]
fn units_are_notify_type_sandboxed_and_restart_on_failure() {
    for path in unit_files() {
        let text = std::fs::read_to_string(&path).unwrap();
        // etcd says READY only with quorum, so its members start as Type=exec.
        let etcd = path.file_name().unwrap().to_str().unwrap().starts_with("mesh-etcd");
        for line in [
            if etcd { "Type=exec" } else { "Type=notify" },
            "Restart=on-failure",
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "PrivateTmp=yes",
            "User=mesh",
            "LimitNOFILE=65536",
            "RestrictAddressFamilies=",
        ] {
            assert!(text.contains(line), "{} lacks {line}", path.display());
        }
    }
}

fn install(root: &Path, args: &[&str]) -> std::process::Output {
    let out = std::process::Command::new("bash")
        .arg(deploy().join("install.sh"))
        .args(["--bin-dir", bin_dir().to_str().unwrap(), "--root", root.to_str().unwrap()])
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "install.sh {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out
}

#[test]
fn install_script_places_a_release_and_links_to_it() {
    let root = temp("root");
    install(&root, &[]);
    // The release is named after the binaries' version (and the checkout's commit).
    let version = std::process::Command::new(bin_dir().join("mesh-sidecar")).arg("--version").output().unwrap();
    let version = String::from_utf8(version.stdout).unwrap().trim().trim_start_matches("mesh-sidecar ").to_string();
    let current = std::fs::read_link(root.join("opt/mesh/current")).unwrap();
    let release = current.file_name().unwrap().to_str().unwrap().to_string();
    assert!(release.starts_with(&version), "release {release} is not named after version {version}");
    let dir = root.join("opt/mesh/releases").join(&release);
    for f in [
        "bin/mesh-node",
        "bin/mesh-sidecar",
        "bin/meshctl",
        "systemd/mesh-node@.service",
        "systemd/mesh-sidecar@.service",
        "systemd/mesh-etcd@.service",
        "config/sidecar-chat.toml",
        "DEPLOY.md",
        "install.sh",
        "gpu-host/render.sh",
    ] {
        assert!(dir.join(f).exists(), "{f} not in the release");
    }
    for b in ["mesh-node", "mesh-sidecar", "meshctl"] {
        let link = root.join("usr/local/bin").join(b);
        assert!(link.symlink_metadata().unwrap().file_type().is_symlink(), "{b} is not a link");
        let target = std::fs::canonicalize(&link).unwrap();
        assert_eq!(target, std::fs::canonicalize(dir.join("bin").join(b)).unwrap(), "{b}");
    }
    for f in [
        "etc/systemd/system/mesh-node@.service",
        "etc/systemd/system/mesh-sidecar@.service",
        "etc/systemd/system/mesh-etcd@.service",
        "etc/mesh/sidecar-chat.toml",
        "etc/mesh/node-chat.env",
        "etc/mesh/etcd.env",
        "usr/local/share/doc/mesh/DEPLOY.md",
    ] {
        assert!(root.join(f).exists(), "{f} not installed");
    }
    // An edited config survives a reinstall, with no `.new` beside it when
    // its example did not change.
    std::fs::write(root.join("etc/mesh/etcd.env"), "edited").unwrap();
    install(&root, &[]);
    assert_eq!(std::fs::read_to_string(root.join("etc/mesh/etcd.env")).unwrap(), "edited");
    assert!(!root.join("etc/mesh/etcd.env.new").exists());
    let listed = install(&root, &["--list"]);
    assert_eq!(String::from_utf8_lossy(&listed.stdout), format!("* {release}\n"));
    // Nothing to roll back to yet.
    let rollback = std::process::Command::new("bash")
        .arg(deploy().join("install.sh"))
        .args(["--rollback", "--root", root.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!rollback.status.success() && String::from_utf8_lossy(&rollback.stderr).contains("no previous release"));
    let _ = std::fs::remove_dir_all(&root);
}

/// A stand-in for /etc/mesh holding the files sidecar configs name
/// (certificates, the etcd password), which are read at start.
fn stand_in_etc(name: &str) -> PathBuf {
    let etc = temp(name);
    std::fs::create_dir_all(etc.join("tls")).unwrap();
    for f in ["tls/ca.pem", "tls/host.pem", "tls/host.key", "etcd-password"] {
        std::fs::write(etc.join(f), "placeholder\n").unwrap();
    }
    etc
}

#[test]
fn example_sidecar_configs_are_valid() {
    let etc = stand_in_etc("etc");
    for name in ["sidecar-chat.toml", "sidecar-client.toml"] {
        let text = std::fs::read_to_string(deploy().join("config").join(name)).unwrap();
        let path = etc.join(name);
        std::fs::write(&path, text.replace("/etc/mesh", etc.to_str().unwrap())).unwrap();
        let cfg = sidecar::config::SidecarConfig::load(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(cfg.version, sidecar::config::CONFIG_VERSION, "{name} is written for this build's config version");
        assert!(cfg.tls.is_some() && !cfg.plaintext, "{name} must use TLS between hosts");
        let etcd = cfg.etcd();
        assert!(etcd.tls.is_some_and(|t| t.identity.is_some()), "{name} must reach etcd with a client certificate");
        assert!(etcd.credentials.is_some(), "{name} must reach etcd as a user");
    }
    let _ = std::fs::remove_dir_all(&etc);
}

#[test]
fn a_host_with_8_gpus_gets_a_node_and_a_sidecar_per_gpu_on_distinct_ports() {
    let etc = stand_in_etc("gpu-host");
    let render = deploy().join("gpu-host/render.sh");
    let ok = std::process::Command::new("bash").arg(render).args(["8", "10.77.0.11"]).arg(&etc).status().unwrap();
    assert!(ok.success());
    let mut ports = std::collections::HashSet::new();
    for i in 0..8 {
        let env = std::fs::read_to_string(etc.join(format!("node-gpu{i}.env"))).unwrap();
        let var = |key: &str| env.lines().find_map(|l| l.strip_prefix(&format!("{key}="))).map(str::to_owned);
        assert_eq!(var("MESH_NODE_DEVICE"), Some(format!("cuda:{i}")));
        let node = var("MESH_NODE_LISTEN").unwrap();
        let path = etc.join(format!("sidecar-gpu{i}.toml"));
        let text = std::fs::read_to_string(&path).unwrap().replace("/etc/mesh", etc.to_str().unwrap());
        std::fs::write(&path, text).unwrap();
        let cfg = sidecar::config::SidecarConfig::load(&path).unwrap_or_else(|e| panic!("gpu{i}: {e}"));
        assert_eq!(
            cfg.node.as_ref().map(|n| n.address.to_string()),
            Some(node.clone()),
            "gpu{i}: the sidecar fronts its node"
        );
        for addr in [
            node,
            var("MESH_NODE_METRICS_LISTEN").unwrap(),
            cfg.listen.outbound.to_string(),
            cfg.listen.inbound.to_string(),
        ] {
            assert!(ports.insert(addr.rsplit(':').next().unwrap().to_owned()), "gpu{i}: port of {addr} taken twice");
        }
    }
    let _ = std::fs::remove_dir_all(&etc);
}
