//! Helpers for the end-to-end tests: start real node processes on free
//! ports, connect the generated client, collect streams.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use mesh_proto::v1::generation_client::GenerationClient;
use mesh_proto::v1::{
    ChatMessage, ChatMessages, GenerateRequest, GenerateResponse, SamplingParams, Usage, generate_request::Input,
};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tonic::transport::Channel;

pub mod etcd;
pub mod mesh;
pub mod netns;
pub mod otlp;
pub mod proxy;

/// A port that was free a moment ago (bound to 127.0.0.1:0, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port()
}

/// The directory holding the workspace's built binaries (the test binary
/// lives in `<target>/<profile>/deps`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    exe.parent().and_then(|d| d.parent()).expect("target/<profile>").to_path_buf()
}

/// The default model, fetched by `scripts/fetch-model.sh` (the test command runs it).
pub fn model_path() -> PathBuf {
    if let Some(p) = std::env::var_os("MESH_TEST_MODEL") {
        return p.into();
    }
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.exists(), "{} is missing: run scripts/fetch-model.sh", p.display());
    p
}

/// A node process, killed when dropped.
pub struct NodeProcess {
    pub child: Child,
    pub addr: SocketAddr,
}

impl NodeProcess {
    /// Starts `mesh-node` with `args` on a free port and waits for it to listen.
    pub async fn start(args: &[&str]) -> NodeProcess {
        let mut child = Command::new(bin_dir().join("mesh-node"))
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawning mesh-node (build it first: cargo build --release)");
        let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
        let addr = tokio::time::timeout(Duration::from_secs(120), async {
            while let Some(line) = lines.next_line().await.expect("reading node log") {
                if let Some(addr) = line.split("listening on ").nth(1) {
                    return addr.trim().parse().expect("listen address");
                }
            }
            panic!("node exited before listening");
        })
        .await
        .expect("node did not start listening");
        // Keep draining the log so the node never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        NodeProcess { child, addr }
    }

    /// Starts a node serving the default GGUF model.
    pub async fn start_model(extra: &[&str]) -> NodeProcess {
        let model = model_path();
        let mut args = vec!["--model", model.to_str().expect("utf-8 path")];
        args.extend_from_slice(extra);
        Self::start(&args).await
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr)).unwrap().connect().await.expect("connecting to node")
    }

    pub async fn client(&self) -> GenerationClient<Channel> {
        GenerationClient::new(self.channel().await)
    }
}

/// A request for `prompt` with greedy decoding and `max_tokens`.
pub fn prompt_request(prompt: &str, max_tokens: u32) -> GenerateRequest {
    GenerateRequest {
        input: Some(Input::Prompt(prompt.into())),
        sampling: Some(SamplingParams { max_tokens, ..Default::default() }),
        ..Default::default()
    }
}

/// A one-turn chat request with greedy decoding and `max_tokens`.
pub fn chat_request(user: &str, max_tokens: u32) -> GenerateRequest {
    GenerateRequest {
        input: Some(Input::Chat(ChatMessages {
            messages: vec![ChatMessage { role: "user".into(), content: user.into() }],
        })),
        sampling: Some(SamplingParams { max_tokens, ..Default::default() }),
        ..Default::default()
    }
}

/// Everything one stream delivered.
#[derive(Debug, Default, Clone)]
pub struct Completion {
    pub text: String,
    pub token_ids: Vec<u32>,
    pub messages: usize,
    pub finish_reason: i32,
    pub usage: Option<Usage>,
}

impl Completion {
    pub fn absorb(&mut self, msg: GenerateResponse) {
        self.text.push_str(&msg.text);
        self.token_ids.extend(msg.token_ids);
        self.messages += 1;
        if msg.finish_reason != 0 {
            self.finish_reason = msg.finish_reason;
            self.usage = msg.usage;
        }
    }
}

/// Runs `req` to completion; Err carries the status that ended it.
pub async fn generate(
    client: &mut GenerationClient<Channel>,
    req: GenerateRequest,
) -> Result<Completion, tonic::Status> {
    let mut stream = client.generate(req).await?.into_inner();
    let mut out = Completion::default();
    while let Some(msg) = stream.message().await? {
        out.absorb(msg);
    }
    Ok(out)
}

/// The body of `GET /metrics` from `addr`.
pub async fn metrics_text(addr: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(addr).await.expect("metrics endpoint");
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut text = String::new();
    conn.read_to_string(&mut text).await.unwrap();
    text.split_once("\r\n\r\n").expect("HTTP body").1.to_string()
}

/// `GET /metrics`, parsed into `name{labels}` -> value.
pub async fn scrape(addr: &str) -> std::collections::HashMap<String, f64> {
    let body = metrics_text(addr).await;
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.rsplit_once(' ').and_then(|(k, v)| v.parse().ok().map(|v| (k.to_string(), v))))
        .collect()
}
