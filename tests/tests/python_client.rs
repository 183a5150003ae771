//! The generated Python client (`clients/python`, from
//! `scripts/gen-python-client.sh`) against a real mesh: etcd, a real-model
//! node, its sidecar and a client sidecar with API keys. Its example gets
//! the tokens and text the Rust client gets for the same greedy request
//! through the same sidecar, and is refused without its key.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use mesh_proto::v1::{FinishReason, GenerateRequest};
use mesh_tests::etcd::Etcd;
use mesh_tests::mesh::SidecarProcess;
use mesh_tests::{Completion, NodeProcess, prompt_request};
use tonic::metadata::MetadataValue;

const KEY: &str = "python-client-key";
const PROMPT: &str = "The capital of France is";
const MAX_TOKENS: u32 = 24;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ sits in the workspace").to_path_buf()
}

/// The tests' Python, which `scripts/python-env.sh` makes (scripts/test.sh
/// runs it); a missing one fails the test rather than skipping it.
fn venv_python() -> PathBuf {
    let python = repo().join(".venv/bin/python");
    assert!(python.exists(), "{} is missing: run `bash scripts/python-env.sh`", python.display());
    python
}

/// `example.py --json` for the greedy request, with `key` as MESH_API_KEY.
async fn python_example(addr: &str, key: Option<&str>) -> Output {
    let mut cmd = tokio::process::Command::new(venv_python());
    cmd.arg(repo().join("clients/python/example.py"))
        .arg(addr)
        .args(["--json", "--model", "chat", "--prompt", PROMPT, "--temperature", "0"])
        .args(["--max-tokens", &MAX_TOKENS.to_string()])
        .env_remove("MESH_ADDR")
        .env_remove("MESH_API_KEY")
        .kill_on_drop(true);
    if let Some(key) = key {
        cmd.env("MESH_API_KEY", key);
    }
    let run = tokio::time::timeout(Duration::from_secs(60), cmd.output());
    run.await.expect("example.py finished within 60 s").expect("running example.py")
}

#[tokio::test(flavor = "multi_thread")]
async fn python_example_streams_what_the_rust_client_gets() {
    venv_python();
    let etcd = Etcd::start().await;
    let node = NodeProcess::start_model(&["--model-name", "chat"]).await;
    let _inbound = SidecarProcess::start(&etcd, Some(&node), "").await;
    let keys = format!("[[api_keys]]\ntenant = \"py\"\nsha256 = \"{}\"\n", mesh_proto::api_key::digest(KEY));
    let client = SidecarProcess::start(&etcd, None, &keys).await;
    client.wait_for_instances("chat", 1).await;
    let addr = client.outbound.to_string();

    // The Rust generated client, through the same sidecar with the same key.
    let mut request =
        tonic::Request::new(GenerateRequest { model: "chat".into(), ..prompt_request(PROMPT, MAX_TOKENS) });
    let bearer = MetadataValue::try_from(format!("Bearer {KEY}")).unwrap();
    request.metadata_mut().insert("authorization", bearer);
    let mut stream = client.client().await.generate(request).await.unwrap().into_inner();
    let mut rust = Completion::default();
    while let Some(msg) = stream.message().await.unwrap() {
        rust.absorb(msg);
    }
    // The model may stop early (end of sequence); both clients must agree either way.
    let count = rust.token_ids.len();
    assert!(count > 0 && count <= MAX_TOKENS as usize && rust.finish_reason != 0, "{rust:?}");

    let started = Instant::now();
    let out = python_example(&addr, Some(KEY)).await;
    eprintln!("example.py --json, interpreter start to exit: {:?}", started.elapsed());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "example.py failed ({}): {stderr}", out.status);
    let py: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout is not one JSON object ({e}): {}", String::from_utf8_lossy(&out.stdout)));
    let token_ids: Vec<u32> = serde_json::from_value(py["token_ids"].clone()).expect("token_ids: [u32]");
    assert_eq!(token_ids, rust.token_ids);
    assert_eq!(py["text"], rust.text.as_str());
    let finish = FinishReason::try_from(rust.finish_reason).unwrap();
    assert_eq!(py["finish_reason"], finish.as_str_name());
    let usage = rust.usage.unwrap();
    assert_eq!(py["usage"]["prompt_tokens"], usage.prompt_tokens);
    assert_eq!(py["usage"]["completion_tokens"], usage.completion_tokens);

    // Without MESH_API_KEY the example sends no key: the sidecar refuses it.
    let refused = python_example(&addr, None).await;
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("error: UNAUTHENTICATED"), "{stderr}");
}
