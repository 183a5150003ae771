//! Bad HTTP input gets a 4xx in OpenAI's error shape, naming what is
//! wrong, and never reaches the node; a good request's id is echoed.

use serde_json::json;

use super::client::{Answer, raw, request, send};
use super::{KEY, Mesh};

const CHAT: &str = "/v1/chat/completions";

fn chat(extra: serde_json::Value) -> Vec<u8> {
    let mut body = json!({"model": "chat", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2});
    body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    body.to_string().into_bytes()
}

/// The answer is `status` with an OpenAI error whose message contains `says`.
fn refused(answer: &Answer, status: u16, says: &str, what: &str) {
    let error = &answer.body["error"];
    assert_eq!(answer.status, status, "{what}: {}", answer.body);
    assert!(error["message"].as_str().unwrap().contains(says), "{what}: {}", answer.body);
    assert!(error["type"].is_string(), "{what}: OpenAI's shape: {}", answer.body);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_http_input_gets_openai_errors_and_never_reaches_the_node() {
    let mesh = Mesh::real_model().await;
    let (edge, key) = (mesh.http(), Some(KEY));
    let before = mesh.node_requests().await;

    let cases: Vec<(&str, _, u16, &str)> = vec![
        ("malformed JSON", request("POST", CHAT, key, "{\"model\": \"chat\","), 400, "body is not valid JSON"),
        (
            "a wrong type",
            request("POST", CHAT, key, chat(json!({"max_tokens": "two"}))),
            400,
            "max_tokens: must be an integer",
        ),
        (
            "out of range",
            request("POST", CHAT, key, chat(json!({"temperature": 9}))),
            400,
            "temperature: must be from 0 to 2",
        ),
        ("n > 1", request("POST", CHAT, key, chat(json!({"n": 3}))), 400, "n: only n = 1"),
        ("tools", request("POST", CHAT, key, chat(json!({"tools": [{"type": "function"}]}))), 400, "tools: "),
        (
            "an unknown field",
            request("POST", CHAT, key, chat(json!({"frobnicate": 1}))),
            400,
            "frobnicate: is not supported",
        ),
        ("an unknown route", request("POST", "/v1/embeddings", key, "{}"), 404, "no such route"),
        ("a wrong method", request("GET", CHAT, key, ""), 405, "method not allowed"),
        ("no key", request("POST", CHAT, None, chat(json!({}))), 401, "missing API key"),
        ("a bad key", request("POST", CHAT, Some("nope"), chat(json!({}))), 401, "unknown API key"),
        ("an unknown model", request("POST", CHAT, key, chat(json!({"model": "nope"}))), 404, "nope"),
    ];
    for (what, req, status, says) in cases {
        refused(&send(edge, req).await, status, says, what);
    }
    let mut timeout = request("POST", CHAT, key, chat(json!({})));
    timeout.headers_mut().insert("x-request-timeout", "soon".parse().unwrap());
    refused(&send(edge, timeout).await, 400, "x-request-timeout: must be seconds", "a bad deadline header");

    // 10 MB announced, refused before it is sent (the client need not send it all).
    let big = format!(
        "POST {CHAT} HTTP/1.1\r\nHost: edge\r\nAuthorization: Bearer {KEY}\r\nContent-Length: {}\r\n\r\n",
        10 << 20
    );
    let big = raw(edge, format!("{big}{}", " ".repeat(64 << 10)).as_bytes()).await;
    assert!(big.starts_with("HTTP/1.1 413") && big.contains("over 2097152 bytes"), "{big}");
    let http10 = raw(edge, b"POST /v1/chat/completions HTTP/1.0\r\nContent-Length: 2\r\n\r\n{}").await;
    assert!(http10.starts_with("HTTP/1.0 426") || http10.starts_with("HTTP/1.1 426"), "{http10}");
    assert!(http10.contains("\"type\":\"invalid_request_error\""), "{http10}");
    let garbage = raw(edge, b"\x16\x03\x01 not http at all\r\n\r\n").await;
    assert!(garbage.starts_with("HTTP/1.1 400") || garbage.is_empty(), "{garbage}");

    assert_eq!(mesh.node_requests().await, before, "no bad request reached the node");

    // A good one, for contrast: served, its id echoed.
    let mut good =
        request("POST", "/v1/completions", key, json!({"model": "chat", "prompt": "Hi", "max_tokens": 2}).to_string());
    good.headers_mut().insert("x-request-id", "edge-test-1".parse().unwrap());
    let answer = send(edge, good).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.headers["x-request-id"], "edge-test-1");
    assert_eq!(answer.body["id"], "cmpl-edge-test-1");
    assert_eq!(answer.body["usage"]["completion_tokens"], 2);
    assert_eq!(mesh.node_requests().await, before + 1.0);
}
