//! The prefix cache changes nothing but speed: greedy tokens of a request
//! that reuses cached blocks equal those of the same request on a cold node
//! (cache off), for hits of 0, 1, many and all but the last prompt block,
//! for blocks written while generating, and under eviction pressure, on the
//! host backend and on the device backend's code run on the CPU. The
//! tolerance is zero: the kernels compute every row the same way whatever
//! the step it is in (see `tests/batching.rs`).

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::Device;
use candle_transformers::generation::Sampling;
use mesh_proto::v1::Usage;
use node::backend::{Backend, GgufBackend, PagedBackend};
use node::metrics::NodeMetrics;
use node::model::LlamaModel;
use node::model::qgemm::Kernel;
use node::scheduler::{Limits, Request, Scheduler};
use node::text::{GgufText, SpecialTokens, TextCodec};

const MAX_TOKENS: usize = 12;
const BLOCK: usize = 32;

fn model_path() -> PathBuf {
    std::env::var_os("MESH_TEST_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf"))
}

struct Fixture {
    model: Arc<LlamaModel>,
    codec: Arc<GgufText>,
}

impl Fixture {
    fn load() -> Self {
        let kernel = Kernel::choose(None).unwrap();
        let (model, content) = LlamaModel::load(&model_path(), &Device::Cpu, kernel).unwrap();
        Self { model: Arc::new(model), codec: Arc::new(GgufText::from_metadata(&content.metadata).unwrap()) }
    }

    fn tokens(&self, text: &str) -> Vec<u32> {
        self.codec.encode(text, SpecialTokens::AsText).unwrap()
    }

    fn node(&self, paged: bool, prefix_cache: bool, max_kv_tokens: usize) -> (Scheduler, NodeMetrics) {
        let backend: Box<dyn Backend> = match paged {
            true => Box::new(PagedBackend::new(self.model.clone(), max_kv_tokens, 8).unwrap()),
            false => Box::new(GgufBackend::new(self.model.clone())),
        };
        let limits = Limits {
            max_running: 8,
            max_queued: 64,
            max_kv_tokens,
            max_step_tokens: 512,
            context_length: 2048,
            max_queue_wait: std::time::Duration::from_secs(600),
            prefix_cache,
        };
        let metrics = NodeMetrics::new("test", "test");
        (Scheduler::start(limits, backend, self.codec.clone(), metrics.clone()), metrics)
    }
}

/// Greedy tokens of `prompt` and the final usage.
async fn generate(node: &Scheduler, prompt: &[u32]) -> (Vec<u32>, Usage) {
    let req = Request {
        prompt: prompt.to_vec(),
        continued: 0,
        max_tokens: MAX_TOKENS,
        sampling: Sampling::ArgMax,
        seed: 0,
        stop: vec![],
        priority: 1,
        deadline: None,
        span: tracing::Span::none(),
    };
    let (mut rx, _) = node.submit(req).expect("admitted");
    let mut tokens = Vec::new();
    while let Some(reply) = rx.recv().await {
        let msg = reply.expect("no error");
        tokens.extend(msg.token_ids);
        if let Some(usage) = msg.usage {
            return (tokens, usage);
        }
    }
    panic!("stream ended without usage");
}

/// Prompts sharing `base`'s first `shared` tokens, then going their own way.
fn branch(base: &[u32], shared: usize, tail: &[u32]) -> Vec<u32> {
    [&base[..shared], tail].concat()
}

async fn hits_give_cold_tokens(paged: bool) {
    let f = Fixture::load();
    let base = f.tokens(&"The quick brown fox jumps over the lazy dog while the cat watches. ".repeat(16));
    let (tail_a, tail_b) = (f.tokens(" Tell me a story."), f.tokens(" What colour is the fox?"));
    let (cold, _) = f.node(paged, false, 8192);
    let (hot, metrics) = f.node(paged, true, 8192);
    // (prompt, prompt tokens cached when it runs, after the ones before it)
    let long = branch(&base, 6 * BLOCK + 5, &tail_a);
    let cases = [
        (branch(&base, BLOCK + 3, &tail_a), 0),
        (branch(&base, BLOCK + 1, &tail_b), BLOCK),
        (long.clone(), BLOCK),
        (branch(&base, 6 * BLOCK + 5, &tail_b), 6 * BLOCK),
        (long.clone(), (long.len() - 1) / BLOCK * BLOCK),
    ];
    for (i, (prompt, cached)) in cases.iter().enumerate() {
        let (want, _) = generate(&cold, prompt).await;
        let (got, usage) = generate(&hot, prompt).await;
        assert_eq!(usage.cached_prompt_tokens as usize, *cached, "case {i}: cached tokens");
        assert_eq!(got, want, "case {i}: {cached} cached tokens change the output");
    }
    // Blocks completed while generating are cached too: a 216-token prompt
    // fills its seventh block (to 224) with its 11th token fed, so a next
    // turn resending the reply reuses 7 blocks, not 6.
    let prompt = branch(&base, 216 - tail_a.len(), &tail_a);
    let (reply, _) = generate(&hot, &prompt).await;
    assert_eq!(reply.len(), MAX_TOKENS);
    let next = [prompt, reply, tail_b.clone()].concat();
    let (want, _) = generate(&cold, &next).await;
    let (got, usage) = generate(&hot, &next).await;
    assert_eq!(usage.cached_prompt_tokens as usize, 7 * BLOCK);
    assert_eq!(got, want, "reusing generated blocks changes the output");
    assert!(metrics.prefix_hit_tokens.get() > 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn host_backend_hits_give_cold_tokens() {
    hits_give_cold_tokens(false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn device_backend_hits_give_cold_tokens() {
    hits_give_cold_tokens(true).await;
}

/// A budget of 1024 tokens: 6 prompts of ~250 tokens leave their blocks
/// cached, so later ones evict; a request needing nearly the whole budget
/// is still admitted (idle blocks count as free), and outputs stay cold.
#[tokio::test(flavor = "multi_thread")]
async fn eviction_frees_room_and_keeps_outputs_exact() {
    let f = Fixture::load();
    let (cold, _) = f.node(false, false, 1024);
    let (hot, metrics) = f.node(false, true, 1024);
    let prompts: Vec<Vec<u32>> = (0..6)
        .map(|i| f.tokens(&format!("Topic {i}: {}", "Rivers carry water to the sea across the plains. ".repeat(20))))
        .collect();
    for prompt in prompts.iter().chain(&prompts[..2]) {
        let (want, _) = generate(&cold, prompt).await;
        let (got, _) = generate(&hot, prompt).await;
        assert_eq!(got, want);
    }
    assert!(metrics.prefix_evicted_blocks.get() > 0, "the budget forced evictions");
    let cached = metrics.prefix_blocks.get() as usize * BLOCK;
    assert!(cached <= 1024, "the cache stays in the budget: {cached} tokens");
    let big = f.tokens(&"Mountains rise above the clouds in the morning light. ".repeat(110))[..1000].to_vec();
    let (want, _) = generate(&cold, &big).await;
    let (got, _) = generate(&hot, &big).await;
    assert_eq!(got, want);
}
