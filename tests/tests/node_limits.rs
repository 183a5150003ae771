//! Every invalid field and every limit of a node returns its status code,
//! with a message naming the field or limit (synthetic backend: the
//! scheduler and limits are the real ones, only the model is not).

use std::time::Duration;

use mesh_proto::metadata as md;
use mesh_proto::v1::{
    ChatMessage, ChatMessages, GenerateRequest, ListModelsRequest, SamplingParams, generate_request::Input,
};
use mesh_tests::{NodeProcess, generate, prompt_request};
use tonic::Code;

fn synthetic(extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = ["--backend", "synthetic", "--context-length", "64"].map(String::from).to_vec();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

async fn start(extra: &[&str]) -> NodeProcess {
    let args = synthetic(extra);
    NodeProcess::start(&args.iter().map(String::as_str).collect::<Vec<_>>()).await
}

fn with_sampling(p: SamplingParams) -> GenerateRequest {
    GenerateRequest { sampling: Some(p), ..prompt_request("the mesh serves tokens", 0) }
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_fields_are_refused_naming_field_and_limit() {
    let node = start(&[]).await;
    let mut client = node.client().await;
    let chat = |messages| GenerateRequest { input: Some(Input::Chat(ChatMessages { messages })), ..Default::default() };
    let cases: Vec<(GenerateRequest, Code, &str)> = vec![
        (GenerateRequest::default(), Code::InvalidArgument, "input is required"),
        (prompt_request("", 4), Code::InvalidArgument, "prompt must not be empty"),
        (chat(vec![]), Code::InvalidArgument, "chat.messages must not be empty"),
        (
            chat(vec![ChatMessage { role: "robot".into(), content: "hi".into() }]),
            Code::InvalidArgument,
            "chat.messages[].role",
        ),
        (
            with_sampling(SamplingParams { temperature: -0.5, ..Default::default() }),
            Code::InvalidArgument,
            "sampling.temperature must be >= 0",
        ),
        (
            with_sampling(SamplingParams { top_p: Some(0.0), ..Default::default() }),
            Code::InvalidArgument,
            "sampling.top_p must be in (0, 1]",
        ),
        (
            with_sampling(SamplingParams { top_p: Some(1.5), ..Default::default() }),
            Code::InvalidArgument,
            "sampling.top_p must be in (0, 1]",
        ),
        (
            with_sampling(SamplingParams { max_tokens: 61, ..Default::default() }),
            Code::InvalidArgument,
            "prompt (4 tokens) + sampling.max_tokens (61) exceeds the context length 64",
        ),
        (
            with_sampling(SamplingParams { stop: vec!["x".into(); 9], ..Default::default() }),
            Code::InvalidArgument,
            "sampling.stop has 9 strings; the limit is 8",
        ),
        (
            with_sampling(SamplingParams { stop: vec![String::new()], ..Default::default() }),
            Code::InvalidArgument,
            "sampling.stop strings must be 1 to 256 bytes",
        ),
        (
            GenerateRequest { continuation_token_ids: vec![1, 2, 3, 4], ..prompt_request("hi", 4) },
            Code::InvalidArgument,
            "continuation_token_ids has 4 tokens; sampling.max_tokens (4) leaves none to generate",
        ),
        (
            GenerateRequest { continuation_token_ids: vec![1, 99], ..prompt_request("hi", 4) },
            Code::InvalidArgument,
            "continuation_token_ids has 99, outside the vocabulary of 32",
        ),
        (
            GenerateRequest { model: "gpt-9".into(), ..prompt_request("hi", 4) },
            Code::NotFound,
            "model \"gpt-9\" is not served here",
        ),
    ];
    for (req, code, text) in cases {
        let err = generate(&mut client, req.clone()).await.expect_err(&format!("{req:?} must fail"));
        assert_eq!(err.code(), code, "{req:?}: {err:?}");
        assert!(err.message().contains(text), "{:?} lacks {text:?}", err.message());
    }
    // The largest request that fits is accepted.
    let ok = generate(&mut client, with_sampling(SamplingParams { max_tokens: 60, ..Default::default() })).await;
    assert_eq!(ok.unwrap().token_ids.len(), 60);
}

fn retry_after_ms(status: &tonic::Status) -> u64 {
    status.metadata().get(md::RETRY_AFTER_MS).expect("retry-after-ms").to_str().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn full_queue_refuses_at_once_with_retry_after() {
    let node = start(&["--max-running", "1", "--max-queued", "1", "--synthetic-tokens-per-sec", "20"]).await;
    let mut client = node.client().await;
    let running = client.generate(prompt_request("one", 60)).await.unwrap();
    let queued = client.generate(prompt_request("two", 60)).await.unwrap();
    // Both are admitted: one running (or about to be), one waiting.
    let load = |k: &str| queued.metadata().get(k).unwrap().to_str().unwrap().parse::<u32>().unwrap();
    assert_eq!(load(md::LOAD_RUNNING) + load(md::LOAD_QUEUED), 2);
    let started = std::time::Instant::now();
    let err = client.generate(prompt_request("three", 60)).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(1), "refusal took {:?}", started.elapsed());
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(err.message().contains("queue is full (1 requests waiting, limit 1)"), "{}", err.message());
    assert!(retry_after_ms(&err) >= 50);
    drop((running, queued));
}

#[tokio::test(flavor = "multi_thread")]
async fn kv_token_budget_refuses_what_does_not_fit() {
    let node = start(&["--max-kv-tokens", "100", "--synthetic-tokens-per-sec", "20"]).await;
    let mut client = node.client().await;
    let first = client.generate(prompt_request("a b c d e f g h i j", 50)).await.unwrap();
    assert_eq!(first.metadata().get(md::LOAD_KV_FREE).unwrap(), "40");
    let err = client.generate(prompt_request("a b c d e f g h i j", 50)).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(err.message().contains("needs 60 tokens (prompt + max_tokens), 40 of 100 free"), "{}", err.message());
    assert!(retry_after_ms(&err) > 0);
    // What still fits is admitted.
    generate(&mut client, prompt_request("a b c d e f g h i j", 30)).await.unwrap();
    drop(first);
}

#[tokio::test(flavor = "multi_thread")]
async fn cancelled_stream_frees_its_slot() {
    let node = start(&["--max-running", "1", "--max-queued", "0", "--synthetic-tokens-per-sec", "20"]).await;
    let mut client = node.client().await;
    let mut stream = client.generate(prompt_request("long", 60)).await.unwrap().into_inner();
    stream.message().await.unwrap().expect("first token");
    let err = client.generate(prompt_request("waiting", 4)).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);

    drop(stream);
    // The node reports its load on every response; wait for the slot to free.
    let freed = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            let r = client.list_models(ListModelsRequest {}).await.unwrap();
            if r.metadata().get(md::LOAD_RUNNING).unwrap() == "0" {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(freed.is_ok(), "slot still taken 2 s after the client left");
    let out = generate(&mut client, prompt_request("next", 4)).await.unwrap();
    assert_eq!(out.token_ids.len(), 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn model_info_lists_the_limits() {
    let node = start(&["--max-running", "3", "--max-queued", "5", "--max-kv-tokens", "999"]).await;
    let models = node.client().await.list_models(ListModelsRequest {}).await.unwrap().into_inner().models;
    assert_eq!(models.len(), 1);
    let m = &models[0];
    assert_eq!((m.name.as_str(), m.backend.as_str()), ("synthetic", "synthetic"));
    assert_eq!((m.context_length, m.max_running, m.max_queued, m.max_kv_tokens), (64, 3, 5, 999));
}
