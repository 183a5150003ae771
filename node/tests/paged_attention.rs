//! The device attention (KV block pool, attention in candle ops: what runs
//! on a GPU) computes what the host attention computes, on the real model,
//! run here on candle's CPU device so CI exercises the GPU code path.
//!
//! Both backends are driven through the same steps: sequences that join at
//! different times, prompts read in chunks of `CHUNK` tokens beside
//! sequences that decode one token a step. Every logits row of the device
//! path must be within `MAX_DIFF` / `MEAN_DIFF` of the host's (they sum in
//! different orders: candle's matmul against the host's loops), and greedy
//! picks the same token unless the host's top two logits are closer than
//! that row's largest difference (a near-tie).

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::Device;
use node::backend::{Backend, GgufBackend, PagedBackend, SeqStep};
use node::model::LlamaModel;
use node::model::qgemm::Kernel;
use node::text::{ChatTurn, GgufText, SpecialTokens, TextCodec};

const CHUNK: usize = 16;
const DECODE: usize = 12;
/// Logit differences allowed, largest and mean over a row. The linear
/// layers quantize their inputs to 8 bits, so a difference in the last bit
/// of an attention output can move a quantized activation a whole step, and
/// 30 layers amplify it: measured over these runs up to 2.19 and 0.58
/// (AMD EPYC Zen 3, avx2 kernel) and 1.60 and 0.77 (Zen 4, avx512 kernel
/// with four rows folded per register: the same trajectory, other last
/// bits), about what two CPU kernels differ by (see tests/batching.rs).
/// The attention itself agrees with the host's to 1e-5 (`model::paged`
/// unit test); a wrong mask, row or position moves logits by many units.
const MAX_DIFF: f32 = 3.0;
const MEAN_DIFF: f32 = 0.9;

fn model_path() -> PathBuf {
    std::env::var_os("MESH_TEST_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf"))
}

struct Seq {
    id: u64,
    tokens: Vec<u32>,
    prompt: usize,
    fed: usize,
    joins_at: usize,
}

impl Seq {
    fn done(&self) -> bool {
        self.tokens.len() >= self.prompt + DECODE
    }
}

/// The host backend, the device one (decode steps from recorded-step
/// inputs with `graphs`, op by op here either way) and the text codec.
fn backends(graphs: bool) -> (GgufBackend, PagedBackend, GgufText) {
    let kernel = Kernel::choose(None).unwrap();
    let (model, content) = LlamaModel::load(&model_path(), &Device::Cpu, kernel).unwrap();
    let model = Arc::new(model);
    let mut paged = PagedBackend::new(model.clone(), 4096, 8).unwrap();
    if graphs {
        paged = paged.with_graphs(CHUNK).unwrap();
    }
    (GgufBackend::new(model), paged, GgufText::from_metadata(&content.metadata).unwrap())
}

/// Runs every step on both backends; returns (rows compared, largest
/// difference, tokens decoded).
fn lockstep(mut seqs: Vec<Seq>, graphs: bool) -> (usize, f32, usize) {
    let (mut host, mut device, _) = backends(graphs);
    let (mut rows, mut worst, mut decoded) = (0, 0f32, 0);
    for step in 0.. {
        let active: Vec<usize> = (0..seqs.len()).filter(|&i| seqs[i].joins_at <= step && !seqs[i].done()).collect();
        if active.is_empty() && seqs.iter().all(Seq::done) {
            break;
        }
        let steps: Vec<SeqStep<'_>> = active
            .iter()
            .map(|&i| {
                let s = &seqs[i];
                let take = if s.fed < s.prompt { CHUNK.min(s.prompt - s.fed) } else { 1 };
                let tokens = &s.tokens[s.fed..s.fed + take];
                let want_logits = s.fed + take >= s.prompt;
                let capacity = s.prompt + DECODE;
                SeqStep {
                    id: s.id,
                    tokens,
                    start_pos: s.fed,
                    want_logits,
                    capacity,
                    prompt_len: s.prompt,
                    greedy: false,
                    reuse: &[],
                }
            })
            .collect();
        let fed: Vec<(usize, bool)> = steps.iter().map(|s| (s.tokens.len(), s.want_logits)).collect();
        let want = host.step(&steps).unwrap().map(|t| t.to_vec2::<f32>().unwrap()).unwrap_or_default();
        let got = device.step(&steps).unwrap().map(|t| t.to_device(&Device::Cpu).unwrap().to_vec2::<f32>().unwrap());
        let got = got.unwrap_or_default();
        drop(steps);
        assert_eq!(want.len(), got.len(), "step {step}: logits rows");
        let mut row = 0;
        for (&i, (n, wanted)) in active.iter().zip(fed) {
            seqs[i].fed += n;
            if !wanted {
                continue;
            }
            let (w, g) = (&want[row], &got[row]);
            let diff = w.iter().zip(g).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            let mean = w.iter().zip(g).map(|(a, b)| (a - b).abs()).sum::<f32>() / w.len() as f32;
            assert!(
                diff <= MAX_DIFF && mean <= MEAN_DIFF,
                "step {step}, sequence {i}: logits differ by up to {diff}, {mean} on average"
            );
            let (top, second) = top_two(w);
            let picked = top_two(g).0;
            assert!(
                picked.0 == top.0 || top.1 - second.1 <= diff,
                "step {step}, sequence {i}: device picks {} over {} (gap {})",
                picked.0,
                top.0,
                top.1 - second.1
            );
            worst = worst.max(diff);
            (rows, decoded) = (rows + 1, decoded + 1);
            seqs[i].tokens.push(top.0);
            row += 1;
        }
    }
    // The last steps decode every sequence left, from device inputs.
    assert_eq!(graphs, device.replayed_steps() > 0, "replayed steps: {}", device.replayed_steps());
    (rows, worst, decoded)
}

/// The best and second-best `(token, logit)`.
fn top_two(row: &[f32]) -> ((u32, f32), (u32, f32)) {
    let mut best = [(0u32, f32::NEG_INFINITY); 2];
    for (i, &l) in row.iter().enumerate() {
        if l > best[0].1 {
            best = [(i as u32, l), best[0]];
        } else if l > best[1].1 {
            best[1] = (i as u32, l);
        }
    }
    (best[0], best[1])
}

fn prompt(codec: &GgufText, text: &str) -> Vec<u32> {
    codec.encode_chat(&[ChatTurn { role: "user".into(), content: text.into() }], SpecialTokens::AsText).unwrap()
}

fn seq(id: u64, tokens: Vec<u32>, joins_at: usize) -> Seq {
    Seq { id, prompt: tokens.len(), tokens, fed: 0, joins_at }
}

#[test]
fn device_attention_alone_matches_the_host_over_chunked_prefill_and_decode() {
    let (_, _, codec) = backends(false);
    let tokens = prompt(&codec, "Explain in two sentences why the sky is blue during the day.");
    assert!(tokens.len() > 2 * CHUNK, "the prompt spans several chunks: {}", tokens.len());
    let (rows, worst, decoded) = lockstep(vec![seq(1, tokens, 0)], false);
    assert_eq!(decoded, DECODE);
    eprintln!("alone: {rows} logits rows, largest difference {worst}");
}

/// With decode steps as a GPU replays them (`PagedBackend::with_graphs`):
/// inputs from one device buffer, padded to a power of two (5 sequences
/// decode as 8 rows).
#[test]
fn device_attention_in_a_mixed_batch_matches_the_host() {
    let (_, _, codec) = backends(false);
    let texts = [
        "Name three colours of the rainbow.",
        "Write a haiku about autumn leaves falling on a quiet pond.",
        "What is 17 times 3?",
        "Describe the water cycle for a ten year old, step by step, with an example.",
        "Hi.",
    ];
    // Each joins two steps after the one before, so prefill chunks of the
    // later ones share steps with the earlier ones' decoding.
    let seqs = texts.iter().enumerate().map(|(i, t)| seq(i as u64 + 1, prompt(&codec, t), 2 * i)).collect();
    let (rows, worst, decoded) = lockstep(seqs, true);
    assert_eq!(decoded, texts.len() * DECODE);
    eprintln!("mixed batch: {rows} logits rows, largest difference {worst}");
}

/// Decode steps from recorded-step inputs (3 sequences padded to 4 rows)
/// give the logits the same steps give op by op, to rounding.
#[test]
fn replayed_decode_steps_equal_op_by_op_steps() {
    let (_, mut eager, codec) = backends(false);
    let (_, mut replayed, _) = backends(true);
    let texts = ["Hi.", "What is 17 times 3?", "Name three colours of the rainbow."];
    let mut tokens: Vec<Vec<u32>> = texts.iter().map(|t| prompt(&codec, t)).collect();
    let capacity = tokens.iter().map(Vec::len).max().unwrap() + DECODE;
    for round in 0..=DECODE {
        let fed: Vec<usize> = tokens.iter().map(|t| if round == 0 { 0 } else { t.len() - 1 }).collect();
        let steps: Vec<SeqStep<'_>> = tokens
            .iter()
            .zip(&fed)
            .enumerate()
            .map(|(id, (t, &from))| SeqStep {
                id: id as u64,
                tokens: &t[from..],
                start_pos: from,
                want_logits: true,
                capacity,
                prompt_len: 0,
                greedy: true,
                reuse: &[],
            })
            .collect();
        let want = eager.step(&steps).unwrap().unwrap().to_vec2::<f32>().unwrap();
        let got = replayed.step(&steps).unwrap().unwrap().to_vec2::<f32>().unwrap();
        drop(steps);
        for (i, (w, g)) in want.iter().zip(&got).enumerate() {
            let diff = w.iter().zip(g).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(diff <= 1e-3, "round {round}, sequence {i}: logits differ by up to {diff}");
            tokens[i].push(top_two(w).0.0);
        }
    }
    assert_eq!(replayed.replayed_steps(), DECODE, "every decode step went through the device inputs");
}
