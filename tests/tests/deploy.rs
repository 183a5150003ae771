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

#[test]
fn example_sidecar_configs_are_valid() {
    // The files they name (certificates, the etcd password) are read at
    // start: placed in a stand-in for /etc/mesh.
    let etc = temp("etc");
    std::fs::create_dir_all(etc.join("tls")).unwrap();
    for f in ["tls/ca.pem", "tls/host.pem", "tls/host.key", "etcd-password"] {
        std::fs::write(etc.join(f), "placeholder\n").unwrap();
    }
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
