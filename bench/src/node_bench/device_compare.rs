//! Greedy output on the device against the CPU: the same five prompts,
//! token by token, until the streams first differ.

use std::path::Path;
use std::sync::Arc;

use candle_core::Device;
use node::backend::{Backend, GgufBackend, PagedBackend, SeqStep};
use node::model::LlamaModel;
use node::model::qgemm::Kernel;
use node::text::{ChatTurn, GgufText, SpecialTokens, TextCodec};
use serde_json::{Value, json};

const PROMPTS: [&str; 5] = [
    "Name three colours of the rainbow.",
    "Write a haiku about autumn leaves falling on a quiet pond.",
    "What is 17 times 3?",
    "Describe the water cycle for a ten year old, step by step.",
    "Explain in two sentences why the sky is blue during the day.",
];

/// Logit gap under which a differing pick is a near-tie: two of the node's
/// CPU kernels alone differ by up to 1.5 (node/tests/batching.rs).
const NEAR_TIE: f32 = 1.5;

pub fn run(model_path: &Path, device: &Device, tokens: usize) -> anyhow::Result<Value> {
    let kernel = Kernel::choose(None).map_err(anyhow::Error::msg)?;
    let (cpu_model, content) = LlamaModel::load(model_path, &Device::Cpu, kernel)?;
    let codec = GgufText::from_metadata(&content.metadata)?;
    let (dev_model, _) = LlamaModel::load(model_path, device, kernel)?;
    let mut cpu = GgufBackend::new(Arc::new(cpu_model));
    // Decode steps replayed, as the node runs them (prompts are read whole).
    let mut dev = PagedBackend::new(Arc::new(dev_model), PROMPTS.len() * (256 + tokens), 1)?.with_graphs(256)?;
    let mut results = Vec::new();
    for (i, text) in PROMPTS.iter().enumerate() {
        let turn = ChatTurn { role: "user".into(), content: (*text).into() };
        let prompt = codec.encode_chat(&[turn], SpecialTokens::AsText)?;
        let result = compare(&mut cpu, &mut dev, i as u64, &prompt, tokens)?;
        println!("greedy vs CPU, prompt {i}: {result}");
        results.push(result);
        cpu.release(i as u64);
        dev.release(i as u64);
    }
    println!("greedy vs CPU: {} device steps replayed", dev.replayed_steps());
    Ok(Value::Array(results))
}

/// Decodes `tokens` greedy tokens of `prompt` on both, feeding each the
/// CPU's pick, and reports the first step where the picks differ.
fn compare(
    cpu: &mut GgufBackend,
    dev: &mut PagedBackend,
    id: u64,
    prompt: &[u32],
    tokens: usize,
) -> anyhow::Result<Value> {
    let mut feed = prompt.to_vec();
    let mut pos = 0;
    for step in 0..tokens {
        let s = SeqStep {
            id,
            tokens: &feed,
            start_pos: pos,
            want_logits: true,
            capacity: prompt.len() + tokens,
            prompt_len: prompt.len(),
            greedy: false,
            reuse: &[],
        };
        let c = last_row(cpu.step(std::slice::from_ref(&s)).map_err(anyhow::Error::msg)?)?;
        let d = last_row(dev.step(std::slice::from_ref(&s)).map_err(anyhow::Error::msg)?)?;
        pos += feed.len();
        let (cp, dp) = (argmax(&c), argmax(&d));
        if cp != dp {
            let gap = c[cp as usize] - c[dp as usize];
            return Ok(json!({
                "equal_tokens": step, "first_difference": step, "cpu_token": cp, "device_token": dp,
                "cpu_logit_gap": gap, "near_tie": gap < NEAR_TIE,
            }));
        }
        feed = vec![cp];
    }
    Ok(json!({ "equal_tokens": tokens, "first_difference": null }))
}

fn last_row(logits: Option<candle_core::Tensor>) -> anyhow::Result<Vec<f32>> {
    let logits = logits.ok_or_else(|| anyhow::anyhow!("no logits"))?.to_device(&Device::Cpu)?;
    Ok(logits.to_vec2::<f32>()?.pop().unwrap_or_default())
}

fn argmax(row: &[f32]) -> u32 {
    row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(i, _)| i as u32)
}
