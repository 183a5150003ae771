//! The real mesh-node binary and its device setting: the CPU unless told
//! otherwise (and said so at start), and a `cuda:N` it cannot have stops it
//! at start, before the model is read, never serving on the CPU instead.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A node with only `env` (no inherited MESH_NODE_* of the caller's shell)
/// and a model path that does not exist: a node that read its model first
/// would fail on the file instead.
fn node(env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mesh-node"));
    cmd.env_clear()
        .env("RUST_LOG", "info")
        .env("MESH_NODE_LISTEN", "127.0.0.1:0")
        .env("MESH_NODE_MODEL", "/nonexistent/model.gguf")
        .envs(env.iter().copied());
    cmd
}

fn run(env: &[(&str, &str)]) -> (Output, Duration) {
    let started = Instant::now();
    let out = node(env).output().expect("run mesh-node");
    (out, started.elapsed())
}

#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_on_a_build_without_cuda_exits_at_start_naming_the_setting() {
    for (var, value, said) in [
        ("MESH_NODE_DEVICE", "cuda:0", "MESH_NODE_DEVICE=cuda:0"),
        ("MESH_NODE_CUDA_DEVICE", "0", "MESH_NODE_CUDA_DEVICE=0"),
    ] {
        let (out, took) = run(&[(var, value)]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{var}={value}: {stderr}");
        let expected = format!("{said} but this mesh-node was built without CUDA (scripts/build-cuda.sh)");
        assert!(stderr.contains(&expected), "{var}={value}: {stderr}");
        assert!(!stderr.contains("nonexistent"), "the device is checked before the model is read: {stderr}");
        assert!(out.stdout.is_empty(), "never ready: {}", String::from_utf8_lossy(&out.stdout));
        assert!(took < Duration::from_secs(10), "{var}={value} took {took:?}");
    }
}

#[test]
fn a_device_that_is_neither_cpu_nor_cuda_n_is_a_usage_error_naming_the_variable() {
    let (out, _) = run(&[("MESH_NODE_DEVICE", "gpu0")]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    for part in ["gpu0", "MESH_NODE_DEVICE", "`cpu` or `cuda:N`"] {
        assert!(stderr.contains(part), "lacks {part}: {stderr}");
    }
}

#[test]
fn disagreeing_device_and_deprecated_cuda_device_are_refused() {
    let (out, _) = run(&[("MESH_NODE_DEVICE", "cpu"), ("MESH_NODE_CUDA_DEVICE", "1")]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("MESH_NODE_DEVICE=cpu and MESH_NODE_CUDA_DEVICE=1 disagree"), "{stderr}");
}

/// Without a device setting the node serves on the CPU, and says so in its
/// start log and in `mesh_node_device_info`.
#[test]
fn no_device_setting_runs_on_the_cpu_and_says_so() {
    let mut child = node(&[("MESH_NODE_BACKEND", "synthetic"), ("MESH_NODE_METRICS_LISTEN", "127.0.0.1:0")])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn mesh-node");
    let mut ready = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut ready).unwrap();
    let scraped = ready_address(&ready, "metrics").map(scrape);
    child.kill().unwrap();
    child.wait().unwrap();
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert!(ready.contains("\"event\":\"ready\""), "not ready: {ready:?}; {stderr}");
    let line =
        stderr.lines().find(|l| l.contains("model device")).unwrap_or_else(|| panic!("no device line: {stderr}"));
    assert!(line.contains("device=cpu") && line.contains("the default"), "{line}");
    let metrics = scraped.expect("metrics address in the ready line");
    assert!(metrics.lines().any(|l| l == "mesh_node_device_info{device=\"cpu\"} 1"), "{metrics}");
}

/// `"name":"127.0.0.1:PORT"` of the ready line.
fn ready_address(ready: &str, name: &str) -> Option<String> {
    let rest = ready.split(&format!("\"{name}\":\"")).nth(1)?;
    Some(rest.split('"').next()?.to_owned())
}

fn scrape(addr: String) -> String {
    let mut conn = TcpStream::connect(&addr).expect("connect to metrics");
    conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(conn, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut body = String::new();
    conn.read_to_string(&mut body).unwrap();
    body
}
