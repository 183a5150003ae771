//! Helpers for the end-to-end tests: start real node processes on free
//! ports (through `harness`, as the bench does), connect the generated
//! client, collect streams.

use std::net::SocketAddr;
use std::path::PathBuf;

pub use harness::Spawned;
use mesh_proto::v1::generation_client::GenerationClient;
use mesh_proto::v1::{
    ChatMessage, ChatMessages, GenerateRequest, GenerateResponse, SamplingParams, Usage, generate_request::Input,
};
use tonic::transport::Channel;

pub mod etcd;
pub mod mesh;
pub mod netns;
pub mod otlp;
pub mod pki;
pub mod proxy;

/// A port that was free a moment ago (see `harness::free_port`).
pub fn free_port() -> u16 {
    harness::free_port().expect("free port")
}

/// The directory holding the workspace's built binaries.
pub fn bin_dir() -> PathBuf {
    harness::bin_dir().expect("target/<profile>")
}

/// The default model, fetched by `scripts/fetch-model.sh` (the test command runs it).
pub fn model_path() -> PathBuf {
    let p = harness::default_model();
    assert!(p.exists(), "{} is missing: run scripts/fetch-model.sh", p.display());
    p
}

/// A node process (started by `harness`), killed when dropped.
pub struct NodeProcess {
    pub process: Spawned,
    pub addr: SocketAddr,
    /// Its metrics address, when started with `--metrics-listen`.
    pub metrics: Option<SocketAddr>,
}

impl NodeProcess {
    /// Starts `mesh-node` with `args` on a free port and waits until it is ready.
    pub async fn start(args: &[&str]) -> NodeProcess {
        let bin = harness::workspace_bin("mesh-node", None, "cargo build --release").expect("mesh-node");
        let node = harness::Node::start("mesh-node", &bin, args).await.expect("starting mesh-node");
        NodeProcess { process: node.process, addr: node.addr, metrics: node.metrics }
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
    let addr = addr.parse().expect("metrics address");
    harness::http_get(addr, "/metrics").await.expect("metrics endpoint").1
}

/// `GET /metrics`, parsed into `name{labels}` -> value.
pub async fn scrape(addr: &str) -> std::collections::HashMap<String, f64> {
    let body = metrics_text(addr).await;
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.rsplit_once(' ').and_then(|(k, v)| v.parse().ok().map(|v| (k.to_string(), v))))
        .collect()
}
