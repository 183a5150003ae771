//! The deployment files: systemd accepts the units, the install script
//! places everything, and the example configs are valid.

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
    for entry in std::fs::read_dir(deploy().join("systemd")).unwrap() {
        let path = entry.unwrap().path();
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

#[test]
fn units_are_notify_type_sandboxed_and_restart_on_failure() {
    for entry in std::fs::read_dir(deploy().join("systemd")).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        for line in [
            "Type=notify",
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

#[test]
fn install_script_places_binaries_units_and_configs() {
    let root = temp("root");
    let out = std::process::Command::new("bash")
        .arg(deploy().join("install.sh"))
        .args(["--bin-dir", bin_dir().to_str().unwrap(), "--root", root.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for f in [
        "usr/local/bin/mesh-node",
        "usr/local/bin/mesh-sidecar",
        "usr/local/bin/meshctl",
        "etc/systemd/system/mesh-node@.service",
        "etc/systemd/system/mesh-sidecar@.service",
        "etc/systemd/system/mesh-etcd.service",
        "etc/mesh/sidecar-chat.toml",
        "etc/mesh/node-chat.env",
        "etc/mesh/etcd.env",
    ] {
        assert!(root.join(f).exists(), "{f} not installed");
    }
    // An edited config survives a reinstall.
    std::fs::write(root.join("etc/mesh/etcd.env"), "edited").unwrap();
    let again = std::process::Command::new("bash")
        .arg(deploy().join("install.sh"))
        .args(["--bin-dir", bin_dir().to_str().unwrap(), "--root", root.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(again.success());
    assert_eq!(std::fs::read_to_string(root.join("etc/mesh/etcd.env")).unwrap(), "edited");
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
        assert_eq!(var("MESH_NODE_CUDA_DEVICE"), Some(i.to_string()));
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
