//! An OpenAI request body, read into the mesh's `GenerateRequest`.
//!
//! Defaults follow OpenAI's API, not the gRPC contract's: `temperature`
//! is 1 when absent (send 0 for greedy), and `/v1/completions` generates
//! 16 tokens unless `max_tokens` says otherwise. The mesh's own fields go
//! in one object, `"mesh": {"priority": "low" | "normal" | "high",
//! "top_k": N}` (`extra_body` in OpenAI's SDKs).

use mesh_proto::v1::generate_request::Input;
use mesh_proto::v1::{ChatMessage, ChatMessages, GenerateRequest, Priority, SamplingParams};
use serde_json::{Value, json};

use super::error::ApiError;
use super::fields::{Fields, kind};

/// Which API a body came in on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Api {
    Chat,
    Completions,
}

/// What a request asks of the edge besides the generation itself.
#[derive(Debug)]
pub struct Parsed {
    pub req: GenerateRequest,
    pub stream: bool,
    /// `stream_options.include_usage`: a last chunk with the usage.
    pub include_usage: bool,
    /// The caller's end-user id: recorded in the log, never used for limits.
    pub user: Option<String>,
}

/// OpenAI allows at most four stop sequences.
const MAX_STOP: usize = 4;
/// OpenAI's default `max_tokens` for `/v1/completions`.
const COMPLETIONS_MAX_TOKENS: u32 = 16;

pub fn parse(api: Api, body: &[u8]) -> Result<Parsed, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::new(axum::http::StatusCode::BAD_REQUEST, format!("body is not valid JSON: {e}")))?;
    let mut f = Fields::new("", value)?;
    let model = f.required_string("model")?;
    let input = match api {
        Api::Chat => Input::Chat(messages(&mut f)?),
        Api::Completions => Input::Prompt(prompt(&mut f)?),
    };
    let mut sampling = sampling(&mut f, api)?;
    let stream = f.bool("stream")?.unwrap_or(false);
    let include_usage = stream_options(&mut f, stream)?;
    let user = f.string("user")?;
    let priority = mesh_extension(&mut f, &mut sampling)?;
    unsupported(&mut f, api)?;
    f.finish()?;
    let req = GenerateRequest {
        model,
        input: Some(input),
        sampling: Some(sampling),
        priority: priority as i32,
        ..Default::default()
    };
    Ok(Parsed { req, stream, include_usage, user })
}

fn messages(f: &mut Fields) -> Result<ChatMessages, ApiError> {
    let items = match f.take("messages") {
        Some(Value::Array(items)) if !items.is_empty() => items,
        Some(Value::Array(_)) => return Err(ApiError::field("messages", "must hold at least one message")),
        Some(other) => return Err(ApiError::field("messages", format!("must be an array, not {}", kind(&other)))),
        None => return Err(ApiError::field("messages", "is required")),
    };
    let messages = items.into_iter().enumerate().map(|(i, m)| message(format!("messages[{i}]"), m));
    Ok(ChatMessages { messages: messages.collect::<Result<_, _>>()? })
}

fn message(at: String, value: Value) -> Result<ChatMessage, ApiError> {
    let mut m = Fields::new(at, value)?;
    let role = match m.required_string("role")?.as_str() {
        // OpenAI's newer name for the system turn.
        "system" | "developer" => "system",
        "user" => "user",
        "assistant" => "assistant",
        other => {
            return Err(ApiError::field(
                &m.path("role"),
                format!("{other:?}: only system, developer, user and assistant are served (no tools)"),
            ));
        }
    };
    let content = content(&m.path("content"), m.take("content"))?;
    m.finish()?;
    Ok(ChatMessage { role: role.into(), content })
}

/// A message's text: a string, or text parts (joined); images and audio are refused.
fn content(at: &str, value: Option<Value>) -> Result<String, ApiError> {
    match value {
        Some(Value::String(s)) => Ok(s),
        Some(Value::Array(parts)) => {
            let texts = parts.into_iter().enumerate().map(|(i, part)| {
                let mut p = Fields::new(format!("{at}[{i}]"), part)?;
                match p.required_string("type")?.as_str() {
                    "text" => {}
                    other => {
                        return Err(ApiError::field(&p.path("type"), format!("{other:?}: only text parts are served")));
                    }
                }
                let text = p.required_string("text")?;
                p.finish().map(|()| text)
            });
            Ok(texts.collect::<Result<Vec<_>, _>>()?.concat())
        }
        Some(other) => {
            Err(ApiError::field(at, format!("must be a string or an array of text parts, not {}", kind(&other))))
        }
        None => Err(ApiError::field(at, "is required")),
    }
}

fn prompt(f: &mut Fields) -> Result<String, ApiError> {
    match f.take("prompt") {
        Some(Value::String(s)) => Ok(s),
        // A list of one string is what some SDKs send; token ids and batches are not served.
        Some(Value::Array(items)) => match <[Value; 1]>::try_from(items) {
            Ok([Value::String(s)]) => Ok(s),
            _ => {
                Err(ApiError::field("prompt", "must be one string (or a list of one string; not token ids or a batch)"))
            }
        },
        Some(other) => Err(ApiError::field("prompt", format!("must be a string, not {}", kind(&other)))),
        None => Err(ApiError::field("prompt", "is required")),
    }
}

fn sampling(f: &mut Fields, api: Api) -> Result<SamplingParams, ApiError> {
    let mut max_tokens = f.integer("max_tokens", 1, u32::MAX.into())?;
    if api == Api::Chat
        && let Some(n) = f.integer("max_completion_tokens", 1, u32::MAX.into())?
    {
        if max_tokens.is_some_and(|m| m != n) {
            return Err(ApiError::field("max_completion_tokens", "differs from max_tokens: send one of them"));
        }
        max_tokens = Some(n);
    }
    let default_max = if api == Api::Completions { COMPLETIONS_MAX_TOKENS } else { 0 }; // 0: the node's default
    let top_p = f.number("top_p", 0.0, 1.0)?;
    if top_p == Some(0.0) {
        return Err(ApiError::field("top_p", "must be above 0 (use temperature 0 for greedy)"));
    }
    Ok(SamplingParams {
        max_tokens: max_tokens.map_or(default_max, |n| n as u32),
        temperature: f.number("temperature", 0.0, 2.0)?.unwrap_or(1.0) as f32,
        top_p: top_p.map(|p| p as f32),
        top_k: 0,
        seed: f.integer("seed", 0, u64::MAX)?,
        stop: stop(f)?,
    })
}

fn stop(f: &mut Fields) -> Result<Vec<String>, ApiError> {
    let stops = match f.take("stop") {
        None => vec![],
        Some(Value::String(s)) => vec![s],
        Some(Value::Array(items)) if items.len() <= MAX_STOP => items
            .into_iter()
            .map(|s| match s {
                Value::String(s) => Ok(s),
                other => Err(ApiError::field("stop", format!("must hold strings, not {}", kind(&other)))),
            })
            .collect::<Result<_, _>>()?,
        Some(Value::Array(_)) => return Err(ApiError::field("stop", format!("at most {MAX_STOP} sequences"))),
        Some(other) => {
            return Err(ApiError::field(
                "stop",
                format!("must be a string or a list of strings, not {}", kind(&other)),
            ));
        }
    };
    Ok(stops)
}

fn stream_options(f: &mut Fields, stream: bool) -> Result<bool, ApiError> {
    let Some(options) = f.take("stream_options") else { return Ok(false) };
    if !stream {
        return Err(ApiError::field("stream_options", "is only allowed with stream: true"));
    }
    let mut o = Fields::new("stream_options", options)?;
    let include_usage = o.bool("include_usage")?.unwrap_or(false);
    o.finish()?;
    Ok(include_usage)
}

/// `"mesh": {"priority", "top_k"}`: the mesh's own fields.
fn mesh_extension(f: &mut Fields, sampling: &mut SamplingParams) -> Result<Priority, ApiError> {
    let Some(value) = f.take("mesh") else { return Ok(Priority::Unspecified) };
    let mut m = Fields::new("mesh", value)?;
    let priority = match m.string("priority")?.as_deref() {
        None => Priority::Unspecified,
        Some("low") => Priority::Low,
        Some("normal") => Priority::Normal,
        Some("high") => Priority::High,
        Some(other) => return Err(ApiError::field("mesh.priority", format!("{other:?}: must be low, normal or high"))),
    };
    sampling.top_k = m.integer("top_k", 0, u32::MAX.into())?.unwrap_or(0) as u32;
    m.finish()?;
    Ok(priority)
}

/// OpenAI fields the mesh does not implement: accepted only with a value
/// that changes nothing; anything else is a 400 naming the field.
fn unsupported(f: &mut Fields, api: Api) -> Result<(), ApiError> {
    f.only("n", &[json!(1)], "only n = 1 is served (one choice per request)")?;
    f.only("presence_penalty", &[json!(0), json!(0.0)], "penalties are not implemented; send 0 or leave it out")?;
    f.only("frequency_penalty", &[json!(0), json!(0.0)], "penalties are not implemented; send 0 or leave it out")?;
    f.only("logit_bias", &[json!({})], "logit bias is not implemented")?;
    match api {
        Api::Chat => {
            f.only("logprobs", &[json!(false)], "log probabilities are not implemented")?;
            f.only("top_logprobs", &[json!(0)], "log probabilities are not implemented")?;
            f.only("tools", &[json!([])], "tools are not implemented")?;
            f.only("tool_choice", &[json!("none"), json!("auto")], "tools are not implemented")?;
            f.only("parallel_tool_calls", &[json!(true), json!(false)], "tools are not implemented")?;
            f.only("response_format", &[json!({"type": "text"})], "only text responses are served")?;
            f.only("modalities", &[json!(["text"])], "only text is served")?;
            f.only("store", &[json!(false)], "responses are not stored")?;
        }
        Api::Completions => {
            f.only("best_of", &[json!(1)], "only best_of = 1 is served")?;
            f.only("echo", &[json!(false)], "echo is not implemented")?;
            f.only("logprobs", &[json!(0)], "log probabilities are not implemented")?;
        }
    }
    Ok(())
}
