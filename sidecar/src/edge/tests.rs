//! The edge's reading of OpenAI bodies and its writing of responses.

use mesh_proto::v1::generate_request::Input;
use mesh_proto::v1::{GenerateResponse, Priority, Usage};
use serde_json::{Value, json};

use super::reply::{Envelope, finish};
use super::request::{Api, Parsed, parse};

fn chat(body: Value) -> Result<Parsed, String> {
    parse(Api::Chat, body.to_string().as_bytes()).map_err(|e| e.message)
}

fn completion(body: Value) -> Result<Parsed, String> {
    parse(Api::Completions, body.to_string().as_bytes()).map_err(|e| e.message)
}

#[test]
fn a_chat_request_becomes_a_generate_request() {
    let parsed = chat(json!({
        "model": "chat",
        "messages": [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
        "max_completion_tokens": 8, "temperature": 0, "top_p": 0.5, "seed": 7, "stop": "\n",
        "stream": true, "stream_options": {"include_usage": true}, "user": "u-1",
        "n": 1, "logprobs": false, "tools": [], "mesh": {"priority": "high", "top_k": 40},
    }))
    .unwrap();
    let Some(Input::Chat(messages)) = &parsed.req.input else { panic!("a chat") };
    assert_eq!(messages.messages[0].role, "system");
    assert_eq!(messages.messages[1].content, "Hi");
    let s = parsed.req.sampling.unwrap();
    assert_eq!((s.max_tokens, s.temperature, s.top_p, s.top_k, s.seed), (8, 0.0, Some(0.5), 40, Some(7)));
    assert_eq!(s.stop, ["\n"]);
    assert_eq!(parsed.req.priority, Priority::High as i32);
    assert!(parsed.stream && parsed.include_usage);
    assert_eq!(parsed.user.as_deref(), Some("u-1"));
}

#[test]
fn defaults_are_openai_s() {
    let parsed = completion(json!({"model": "m", "prompt": ["Once"]})).unwrap();
    let s = parsed.req.sampling.unwrap();
    assert_eq!((s.max_tokens, s.temperature), (16, 1.0), "16 tokens, temperature 1");
    assert!(matches!(parsed.req.input, Some(Input::Prompt(p)) if p == "Once"));
    let s = chat(json!({"model": "m", "messages": [{"role": "user", "content": "x"}]})).unwrap().req.sampling.unwrap();
    assert_eq!(s.max_tokens, 0, "the node's default");
}

#[test]
fn fields_that_would_change_the_output_are_refused_by_name() {
    let base = || json!({"model": "m", "messages": [{"role": "user", "content": "x"}]});
    let with = |key: &str, value: Value| {
        let mut body = base();
        body[key] = value;
        chat(body).unwrap_err()
    };
    assert_eq!(with("n", json!(2)), "n: only n = 1 is served (one choice per request)");
    assert!(with("logprobs", json!(true)).starts_with("logprobs: "));
    assert!(with("tools", json!([{"type": "function"}])).starts_with("tools: "));
    assert!(with("presence_penalty", json!(0.5)).starts_with("presence_penalty: "));
    assert_eq!(with("reasoning_effort", json!("low")), "reasoning_effort: is not supported by this server");
    let image = json!([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]);
    assert_eq!(with("messages", image), "messages[0].content[0].type: \"image_url\": only text parts are served");
    let tool = json!([{"role": "tool", "content": "x"}]);
    assert!(with("messages", tool).starts_with("messages[0].role: \"tool\""));
    let echo = completion(json!({"model": "m", "prompt": "x", "echo": true})).unwrap_err();
    assert!(echo.starts_with("echo: "), "{echo}");
    let ids = completion(json!({"model": "m", "prompt": [1, 2]})).unwrap_err();
    assert!(ids.starts_with("prompt: must be one string"), "{ids}");
}

#[test]
fn wrong_types_and_values_name_the_field_and_limit() {
    let m = |extra: Value| {
        let mut body = json!({"model": "m", "prompt": "x"});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        completion(body).unwrap_err()
    };
    assert_eq!(m(json!({"max_tokens": "9"})), "max_tokens: must be an integer, not a string");
    assert_eq!(m(json!({"max_tokens": 0})), "max_tokens: must be an integer from 1 to 4294967295, not 0");
    assert_eq!(m(json!({"temperature": 2.5})), "temperature: must be from 0 to 2, not 2.5");
    assert_eq!(m(json!({"stop": ["a", "b", "c", "d", "e"]})), "stop: at most 4 sequences");
    assert_eq!(
        m(json!({"stream_options": {"include_usage": true}})),
        "stream_options: is only allowed with stream: true"
    );
    assert_eq!(m(json!({"mesh": {"priority": "urgent"}})), "mesh.priority: \"urgent\": must be low, normal or high");
    assert_eq!(completion(json!({"prompt": "x"})).unwrap_err(), "model: is required");
    let bad = parse(Api::Chat, b"{\"model\": ").unwrap_err();
    assert!(bad.message.starts_with("body is not valid JSON: "), "{}", bad.message);
}

#[test]
fn a_whole_completion_and_its_usage_take_openai_s_shape() {
    let envelope = Envelope { api: Api::Chat, id: "chatcmpl-1".into(), created: 5, model: "chat".into() };
    let usage = Usage { prompt_tokens: 10, completion_tokens: 3, cached_prompt_tokens: 8, ..Default::default() };
    let body = envelope.whole("Hello".into(), "stop", Some(&usage));
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["choices"][0]["message"], json!({"role": "assistant", "content": "Hello"}));
    assert_eq!(body["usage"]["total_tokens"], 13);
    assert_eq!(body["usage"]["prompt_tokens_details"]["cached_tokens"], 8);
}

#[test]
fn a_stream_cut_short_by_the_server_is_an_error_to_retry() {
    let msg = |reason: i32| GenerateResponse { finish_reason: reason, ..Default::default() };
    assert_eq!(finish(&msg(0)).unwrap(), None);
    assert_eq!(finish(&msg(2)).unwrap(), Some("length"));
    assert_eq!(finish(&msg(3)).unwrap_err().status, 503);
}

#[tokio::test]
async fn an_overflowed_call_names_the_service_that_served_it() {
    use axum::body::Body;
    use axum::http::HeaderMap;
    use mesh_proto::metadata as md;

    use crate::stack::testing::reply;
    use crate::stack::{Call, ListModels, Reply, last};

    let generate = last(|_: Call| async {
        let mut served = reply(2);
        served.metadata.insert(md::SERVED_BY, "chat-small".parse().unwrap());
        Ok::<Reply, tonic::Status>(served)
    });
    let list_models = ListModels::new(tower::service_fn(|_| async { Ok(Default::default()) }));
    let keys = crate::outbound::authenticate::ApiKeys::new(&[]);
    let edge = super::Edge { generate, list_models, keys, max_body: 1 << 20, requests: Default::default() };
    let body = Body::from(json!({"model": "chat", "prompt": "x"}).to_string());
    let response = edge.generate(Api::Completions, "1", HeaderMap::new(), body).await.unwrap();
    assert_eq!(response.headers()[md::SERVED_BY], "chat-small");
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap();
    let body: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(body["model"], "chat-small", "{body}");
}
