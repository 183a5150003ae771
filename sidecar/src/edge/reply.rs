//! The mesh's token messages, written as OpenAI responses: one JSON object
//! for a whole completion, or server-sent events (`data: {chunk}`, ...,
//! `data: [DONE]`) as the tokens arrive.

use std::convert::Infallible;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use mesh_proto::v1::{FinishReason, GenerateResponse, Usage};
use prost::Message;
use serde_json::{Value, json};
use tonic::Status;

use super::error::ApiError;
use super::request::Api;
use crate::stack::TokenStream;
use crate::wire::Relayed;

/// What every object of one response repeats.
pub struct Envelope {
    pub api: Api,
    /// `chatcmpl-<request id>` or `cmpl-<request id>`.
    pub id: String,
    pub created: u64,
    pub model: String,
}

impl Envelope {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.api, chunk) {
            (Api::Chat, false) => "chat.completion",
            (Api::Chat, true) => "chat.completion.chunk",
            (Api::Completions, _) => "text_completion",
        }
    }

    fn wrap(&self, chunk: bool, choices: Value) -> Value {
        json!({"id": self.id, "object": self.object(chunk), "created": self.created, "model": self.model, "choices": choices})
    }

    /// The whole completion, for a request without `stream`.
    pub fn whole(&self, text: String, finish: &str, usage: Option<&Usage>) -> Value {
        let choice = match self.api {
            Api::Chat => {
                json!({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": null, "finish_reason": finish})
            }
            Api::Completions => json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish}),
        };
        let mut body = self.wrap(false, json!([choice]));
        body["usage"] = usage.map_or(Value::Null, usage_json);
        body
    }

    /// One streamed chunk; a chat stream's first says the role.
    fn chunk(&self, text: &str, finish: Option<&str>, first: bool) -> Value {
        let choice = match self.api {
            Api::Chat if first => {
                json!({"index": 0, "delta": {"role": "assistant", "content": text}, "logprobs": null, "finish_reason": finish})
            }
            Api::Chat => json!({"index": 0, "delta": {"content": text}, "logprobs": null, "finish_reason": finish}),
            Api::Completions => json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish}),
        };
        self.wrap(true, json!([choice]))
    }
}

fn usage_json(u: &Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_prompt_tokens},
    })
}

/// A token message from the stack, decoded in full (the sidecar relays
/// only the fields it reads; the edge needs the text and usage too).
pub fn decode(item: Option<Result<Relayed, Status>>) -> Result<GenerateResponse, ApiError> {
    let bad_gateway = |why: String| ApiError::new(axum::http::StatusCode::BAD_GATEWAY, why);
    match item {
        None => Err(bad_gateway("the stream ended before its last message".into())),
        Some(Err(status)) => Err(ApiError::from_status(&status)),
        Some(Ok(relayed)) => {
            GenerateResponse::decode(relayed.encoded()).map_err(|e| bad_gateway(format!("bad token message: {e}")))
        }
    }
}

/// OpenAI's `finish_reason` of a last message, `None` before the last.
/// A stream the server cut short (a drain that ran out of time) is an
/// error to retry, not a finish.
pub fn finish(msg: &GenerateResponse) -> Result<Option<&'static str>, ApiError> {
    match FinishReason::try_from(msg.finish_reason) {
        Ok(FinishReason::Unspecified) => Ok(None),
        Ok(FinishReason::Stop) => Ok(Some("stop")),
        Ok(FinishReason::Length) => Ok(Some("length")),
        Ok(FinishReason::Cancelled) | Err(_) => Err(ApiError::new(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "the server stopped the stream before it finished (it is draining); retry",
        )),
    }
}

/// Reads the rest of a stream into one completion object.
pub async fn collect(envelope: &Envelope, mut msg: GenerateResponse, mut rest: TokenStream) -> Result<Value, ApiError> {
    let mut text = String::new();
    loop {
        text.push_str(&msg.text);
        if let Some(reason) = finish(&msg)? {
            return Ok(envelope.whole(text, reason, msg.usage.as_ref()));
        }
        msg = decode(rest.next().await)?;
    }
}

/// Where a stream of events is.
struct Events {
    envelope: Envelope,
    include_usage: bool,
    rest: TokenStream,
    first: bool,
    done: bool,
}

/// The server-sent events of a stream whose first message is `first`,
/// each sent as soon as its message arrives. Dropping this stream (the
/// client went away) drops the upstream one, which cancels the call at
/// the node.
pub fn events(
    envelope: Envelope,
    include_usage: bool,
    first: GenerateResponse,
    rest: TokenStream,
) -> impl Stream<Item = Result<Bytes, Infallible>> + Send {
    let state = Events { envelope, include_usage, rest, first: true, done: false };
    futures_util::stream::unfold((state, Some(Ok(first))), |(mut ev, pending)| async move {
        if ev.done {
            return None;
        }
        let msg = match pending {
            Some(msg) => msg,
            None => decode(ev.rest.next().await),
        };
        let (bytes, done) = event(&ev.envelope, msg, ev.first, ev.include_usage);
        (ev.first, ev.done) = (false, done);
        Some((Ok(bytes), (ev, None)))
    })
}

/// The event(s) for one message, and whether the stream is over.
fn event(
    envelope: &Envelope,
    msg: Result<GenerateResponse, ApiError>,
    first: bool,
    include_usage: bool,
) -> (Bytes, bool) {
    let msg = msg.and_then(|m| finish(&m).map(|reason| (m, reason)));
    let (msg, reason) = match msg {
        Ok(ok) => ok,
        // Mid-stream, the status line is sent: OpenAI's SDKs raise an error event.
        Err(e) => return (sse(&e.body()), true),
    };
    let mut out = sse(&envelope.chunk(&msg.text, reason, first)).to_vec();
    if reason.is_none() {
        return (out.into(), false);
    }
    if include_usage && let Some(u) = &msg.usage {
        let mut last = envelope.wrap(true, json!([]));
        last["usage"] = usage_json(u);
        out.extend_from_slice(&sse(&last));
    }
    out.extend_from_slice(b"data: [DONE]\n\n");
    (out.into(), true)
}

fn sse(value: &Value) -> Bytes {
    format!("data: {value}\n\n").into()
}
