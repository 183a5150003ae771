//! The official `openai` Python package (pinned in
//! clients/python/requirements.txt, installed by scripts/python-env.sh)
//! against the edge: tests/python/openai_edge.py does the calls and checks
//! what the SDK sees; here, that it ran clean, that its figures are the
//! mesh's, and that its greedy chat equals the gRPC path's.

use std::path::{Path, PathBuf};
use std::time::Duration;

use mesh_proto::v1::generate_request::Input;
use mesh_proto::v1::{ChatMessage, ChatMessages, GenerateRequest, SamplingParams};
use mesh_tests::Completion;
use serde_json::Value;
use tonic::metadata::MetadataValue;

use super::{KEY, LIMITED_KEY, Mesh};

const MAX_TOKENS: u32 = 16;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ sits in the workspace").to_path_buf()
}

/// Runs the SDK script; its stdout is one JSON object.
async fn openai_script(base_url: &str) -> Value {
    let python = repo().join(".venv/bin/python");
    assert!(python.exists(), "{} is missing: run `bash scripts/python-env.sh`", python.display());
    let mut cmd = tokio::process::Command::new(python);
    cmd.arg(repo().join("tests/python/openai_edge.py"))
        .args(["--base-url", base_url, "--key", KEY, "--limited-key", LIMITED_KEY])
        .args(["--max-tokens", &MAX_TOKENS.to_string()])
        .kill_on_drop(true);
    let out =
        tokio::time::timeout(Duration::from_secs(120), cmd.output()).await.expect("the script ends").expect("runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "openai_edge.py failed ({}): {stderr}", out.status);
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

/// The script's greedy chat, asked through the client sidecar's gRPC side.
async fn grpc_chat(mesh: &Mesh) -> Completion {
    let message = ChatMessage { role: "user".into(), content: "Name three colors.".into() };
    let sampling = SamplingParams { max_tokens: MAX_TOKENS, temperature: 0.0, ..Default::default() };
    let req = GenerateRequest {
        model: "chat".into(),
        input: Some(Input::Chat(ChatMessages { messages: vec![message] })),
        sampling: Some(sampling),
        ..Default::default()
    };
    let mut request = tonic::Request::new(req);
    request.metadata_mut().insert("authorization", MetadataValue::try_from(format!("Bearer {KEY}")).unwrap());
    let mut stream = mesh.edge.client().await.generate(request).await.expect("served").into_inner();
    let mut out = Completion::default();
    while let Some(msg) = stream.message().await.expect("a message") {
        out.absorb(msg);
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn the_openai_sdk_streams_lists_and_gets_the_errors_it_expects() {
    let mesh = Mesh::real_model().await;
    let seen = openai_script(&format!("http://{}/v1", mesh.http())).await;
    eprintln!("openai SDK saw: {seen}");

    assert_eq!(seen["models"], serde_json::json!(["chat"]));
    assert_eq!(seen["auth_status"], 401);
    let retry_after: u64 = seen["retry_after"].as_str().and_then(|s| s.parse().ok()).expect("Retry-After in seconds");
    assert!((1..=2).contains(&retry_after), "one request per 2 s: come back within 2 s, not {retry_after}");
    assert_eq!(seen["limit_error"]["code"], "rate_limit_exceeded");
    assert!(seen["limit_error"]["message"].as_str().unwrap().contains("requests_per_sec"), "{seen}");
    assert!(seen["chunks"].as_u64().unwrap() >= 2, "streamed in pieces: {seen}");

    let grpc = grpc_chat(&mesh).await;
    assert_eq!(seen["streamed"], grpc.text.as_str(), "the edge's greedy chat is the gRPC path's");
    assert_eq!(seen["prompt_tokens"], grpc.usage.as_ref().unwrap().prompt_tokens);
}
