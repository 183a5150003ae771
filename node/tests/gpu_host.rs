//! deploy/gpu-host: render.sh gives every GPU its own node on its own CUDA
//! device and ports, and a systemd drop-in that systemd accepts on top of
//! deploy/systemd/mesh-node@.service.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn temp(name: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    let d = std::env::temp_dir().join(format!("mesh-{name}-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `key=value` or `key = "value"` of a config text.
fn value(text: &str, key: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(key)?.trim_start();
        Some(rest.strip_prefix('=')?.trim().trim_matches('"').to_owned())
    })
}

#[test]
fn render_gives_each_gpu_its_device_ports_and_a_drop_in_that_systemd_accepts() {
    let dir = temp("gpu-host");
    let (etc, units) = (dir.join("etc"), dir.join("units"));
    let out = Command::new("bash")
        .arg(deploy().join("gpu-host/render.sh"))
        .args(["2", "10.77.0.11"])
        .arg(&etc)
        .arg("--units")
        .arg(&units)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let unit = std::fs::read_to_string(deploy().join("systemd/mesh-node@.service"))
        .unwrap()
        .replace("/usr/local/bin/mesh-node", env!("CARGO_BIN_EXE_mesh-node"));
    let verify = dir.join("verify");
    std::fs::create_dir_all(&verify).unwrap();
    let mut ports = HashSet::new();
    let mut instances = Vec::new();
    for i in 0..2 {
        let env = std::fs::read_to_string(etc.join(format!("node-gpu{i}.env"))).unwrap();
        let devices: Vec<_> = env.lines().filter(|l| l.starts_with("MESH_NODE_DEVICE=")).collect();
        assert_eq!(devices, [format!("MESH_NODE_DEVICE=cuda:{i}")], "gpu{i}: one device line, its own GPU");
        assert!(!env.contains("MESH_NODE_CUDA_DEVICE"), "gpu{i}: the deprecated variable is gone");
        let sidecar = std::fs::read_to_string(etc.join(format!("sidecar-gpu{i}.toml"))).unwrap();
        let node = value(&env, "MESH_NODE_LISTEN").unwrap();
        assert_eq!(value(&sidecar, "address"), Some(node.clone()), "gpu{i}: the sidecar fronts its node");
        for addr in [
            node,
            value(&env, "MESH_NODE_METRICS_LISTEN").unwrap(),
            value(&sidecar, "metrics_listen").unwrap(),
            value(&sidecar, "outbound").unwrap(),
            value(&sidecar, "inbound").unwrap(),
        ] {
            let port = addr.rsplit(':').next().unwrap().to_owned();
            assert!(ports.insert(port), "gpu{i}: port of {addr} taken twice");
        }

        let name = format!("mesh-node@gpu{i}.service");
        let dropin = std::fs::read_to_string(units.join(format!("{name}.d/gpu.conf"))).unwrap();
        assert!(!dropin.contains("@GPU@"), "gpu{i}: placeholder left");
        for line in [
            format!("ExecStartPre=+-/usr/bin/nvidia-modprobe -u -c={i}"),
            "DevicePolicy=closed".into(),
            "DeviceAllow=char-nvidia-uvm rwm".into(),
            "CacheDirectory=mesh-node/%i".into(),
            "Environment=CUDA_CACHE_PATH=%C/mesh-node/%i".into(),
        ] {
            assert!(dropin.lines().any(|l| l == line), "gpu{i} drop-in lacks {line}");
        }
        std::fs::write(verify.join(&name), &unit).unwrap();
        std::fs::create_dir_all(verify.join(format!("{name}.d"))).unwrap();
        std::fs::write(verify.join(format!("{name}.d/gpu.conf")), &dropin).unwrap();
        instances.push(verify.join(name));
    }

    let out = Command::new("systemd-analyze").arg("verify").args(&instances).output().expect("systemd-analyze");
    let errors = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && errors.trim().is_empty(), "systemd-analyze verify: {errors}");

    // The check reads the drop-ins: a broken one is reported.
    let broken = verify.join("mesh-node@gpu0.service.d/gpu.conf");
    let text = std::fs::read_to_string(&broken).unwrap();
    std::fs::write(&broken, text.replace("DeviceAllow=char-nvidia-uvm rwm", "DeviceAllow=char-nvidia-uvm rwx"))
        .unwrap();
    let out = Command::new("systemd-analyze").arg("verify").arg(&instances[0]).output().unwrap();
    let errors = String::from_utf8_lossy(&out.stderr);
    assert!(errors.contains("gpu.conf") && errors.contains("rwx"), "the drop-in was not read: {errors}");
    let _ = std::fs::remove_dir_all(&dir);
}
