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
}
