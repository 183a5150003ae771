//! The real model through a real node process: greedy text, sampling,
//! stop strings, limits of length.

use mesh_proto::v1::{FinishReason, SamplingParams};
use mesh_tests::{NodeProcess, chat_request, generate, prompt_request};

#[tokio::test(flavor = "multi_thread")]
async fn greedy_chat_is_repeatable_and_english() {
    let node = NodeProcess::start_model(&[]).await;
    let mut client = node.client().await;
    let req = chat_request("What is the capital of France? Answer in one sentence.", 24);
    let first = generate(&mut client, req.clone()).await.unwrap();
    let second = generate(&mut client, req).await.unwrap();
    eprintln!("{:?}", first.text);
    assert_eq!(first.text, second.text);
    assert_eq!(first.token_ids, second.token_ids);
    assert!(first.text.contains("Paris"), "{:?}", first.text);
    // The second read its prompt's full blocks (all but the last token)
    // from the prefix cache; the output above is the same.
    let (cold, warm) = (first.usage.unwrap(), second.usage.unwrap());
    assert_eq!(cold.cached_prompt_tokens, 0);
    assert_eq!(warm.cached_prompt_tokens, (warm.prompt_tokens - 1) / 32 * 32);
    assert!(warm.cached_prompt_tokens >= 32, "{warm:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn prefix_cache_off_computes_every_prompt() {
    let node = NodeProcess::start_model(&["--prefix-cache", "off"]).await;
    let mut client = node.client().await;
    let req = chat_request("What is the capital of France? Answer in one sentence.", 4);
    for _ in 0..2 {
        let out = generate(&mut client, req.clone()).await.unwrap();
        assert_eq!(out.usage.unwrap().cached_prompt_tokens, 0);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn seeded_sampling_repeats_and_seeds_differ() {
    let node = NodeProcess::start_model(&[]).await;
    let mut client = node.client().await;
    let sampled = |seed| {
        let mut req = prompt_request("Once upon a time, in a small village,", 24);
        req.sampling = Some(SamplingParams {
            max_tokens: 24,
            temperature: 1.0,
            top_p: Some(0.95),
            top_k: 50,
            seed: Some(seed),
            ..Default::default()
        });
        req
    };
    let a = generate(&mut client, sampled(7)).await.unwrap();
    let b = generate(&mut client, sampled(7)).await.unwrap();
    let c = generate(&mut client, sampled(8)).await.unwrap();
    assert_eq!(a.token_ids, b.token_ids, "same seed, same tokens");
    assert_ne!(a.token_ids, c.token_ids, "another seed, other tokens");
}

#[tokio::test(flavor = "multi_thread")]
async fn stop_string_across_tokens_ends_the_stream_before_it() {
    let node = NodeProcess::start_model(&[]).await;
    let mut client = node.client().await;
    let req = chat_request("What is the capital of France? Answer in one sentence.", 24);
    let full = generate(&mut client, req.clone()).await.unwrap();
    // "capital of" spans several tokens; the stream must end just before it.
    let at = full.text.find("capital of").expect("greedy answer mentions the capital");
    let mut stopped = req;
    stopped.sampling.as_mut().unwrap().stop = vec!["capital of".into(), "never appears".into()];
    let out = generate(&mut client, stopped).await.unwrap();
    assert_eq!(out.text, full.text[..at]);
    assert_eq!(out.finish_reason, FinishReason::Stop as i32);
    assert!(out.token_ids.len() < full.token_ids.len());
}

#[tokio::test(flavor = "multi_thread")]
async fn max_tokens_ends_with_length_and_usage_counts() {
    let node = NodeProcess::start_model(&[]).await;
    let mut client = node.client().await;
    let out = generate(&mut client, prompt_request("Count: one, two, three,", 5)).await.unwrap();
    let usage = out.usage.expect("usage on the last message");
    assert_eq!(out.finish_reason, FinishReason::Length as i32);
    assert_eq!(usage.completion_tokens, 5);
    assert_eq!(out.token_ids.len(), 5);
    assert_eq!(usage.prompt_tokens, 8);
    assert!(usage.time_to_first_token_us >= usage.queue_time_us);
}

#[tokio::test(flavor = "multi_thread")]
async fn end_of_sequence_finishes_with_stop() {
    let node = NodeProcess::start_model(&[]).await;
    let mut client = node.client().await;
    let out = generate(&mut client, chat_request("Say only the word yes.", 64)).await.unwrap();
    assert_eq!(out.finish_reason, FinishReason::Stop as i32, "{out:?}");
    let usage = out.usage.unwrap();
    // The end-of-sequence token is counted but neither streamed nor shown.
    assert_eq!(usage.completion_tokens as usize, out.token_ids.len() + 1);
    assert!(!out.text.contains("<|im_end|>"));
}

#[tokio::test(flavor = "multi_thread")]
async fn continuation_tokens_resume_a_greedy_stream_exactly() {
    let node = NodeProcess::start_model(&[]).await;
    let mut client = node.client().await;
    let req = chat_request("Name three colours of the rainbow.", 20);
    let mut stream = client.generate(req.clone()).await.unwrap().into_inner();
    let mut messages = Vec::new();
    while let Some(msg) = stream.message().await.unwrap() {
        messages.push(msg);
    }
    let full: Vec<u32> = messages.iter().flat_map(|m| m.token_ids.clone()).collect();
    let full_text: String = messages.iter().map(|m| m.text.as_str()).collect();
    let k = 7;
    let sent_text: String = messages[..k].iter().map(|m| m.text.as_str()).collect();

    let mut resumed = req;
    resumed.continuation_token_ids = full[..k].to_vec();
    let rest = generate(&mut client, resumed).await.unwrap();
    assert_eq!(rest.token_ids, full[k..]);
    assert_eq!(format!("{sent_text}{}", rest.text), full_text);
    let usage = rest.usage.unwrap();
    assert_eq!(usage.completion_tokens as usize, full.len());
    assert_eq!(rest.finish_reason, FinishReason::Length as i32);
}
