//! Turns a wire request into a runnable one, or into INVALID_ARGUMENT /
//! NOT_FOUND naming the field and the limit.

use candle_transformers::generation::Sampling;
use mesh_proto::v1::{GenerateRequest, Priority, generate_request::Input};
use tonic::Status;

use crate::scheduler::Request;
use crate::text::{ChatTurn, SpecialTokens, TextCodec, TextError};

/// Most stop strings per request, and bytes per stop string.
pub const MAX_STOP_STRINGS: usize = 8;
pub const MAX_STOP_BYTES: usize = 256;
const ROLES: [&str; 3] = ["system", "user", "assistant"];

/// Prompt bytes allowed per token of the context length, checked before the
/// prompt is tokenized (tokenizing costs about 1 µs per byte, so a 3 MB prompt
/// used to cost 3 s of node CPU before its length was refused). Byte-level
/// BPE vocabularies average about 4 bytes of English per token and 1 to 3 for
/// other scripts; 8 leaves room for code and whitespace runs, so a prompt this
/// check refuses would not have fitted the context anyway (only text averaging
/// over 8 bytes per token, such as long runs of one repeated character, is
/// refused early rather than by its token count).
pub const PROMPT_BYTES_PER_TOKEN: usize = 8;

/// Bytes of a request besides the prompt: model, tenant, request id, stop
/// strings (8 × 256 bytes at most) and framing.
const REQUEST_OVERHEAD_BYTES: usize = 64 * 1024;

/// The largest encoded `GenerateRequest` the node's gRPC server decodes: the
/// largest request that could still be valid, so size alone refuses nothing
/// the checks below would accept. Per token of context: 8 prompt bytes, up to
/// 5 bytes of a continuation token id (a varint), and up to 19 bytes of chat
/// framing (one message per token at most, each with its role); plus
/// `REQUEST_OVERHEAD_BYTES`. 320 KiB at a context of 8192, where tonic's
/// default is 4 MiB whatever the context: a larger message is refused with
/// OUT_OF_RANGE naming the limit as soon as its length prefix arrives,
/// before its bytes are buffered.
pub fn max_request_bytes(context_length: usize) -> usize {
    context_length.saturating_mul(PROMPT_BYTES_PER_TOKEN + 5 + 19).saturating_add(REQUEST_OVERHEAD_BYTES)
}

pub struct Rules<'a> {
    pub model_name: &'a str,
    pub context_length: usize,
    pub default_max_tokens: usize,
    pub vocab_size: usize,
}

pub fn check(req: GenerateRequest, rules: &Rules<'_>, codec: &dyn TextCodec) -> Result<Request, Status> {
    if !req.model.is_empty() && req.model != rules.model_name {
        return Err(Status::not_found(format!(
            "model {:?} is not served here; this node serves {:?}",
            req.model, rules.model_name
        )));
    }
    let p = req.sampling.unwrap_or_default();
    if !(p.temperature >= 0.0 && p.temperature.is_finite()) {
        return Err(invalid(format!("sampling.temperature must be >= 0 (got {})", p.temperature)));
    }
    let top_p = p.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(invalid(format!("sampling.top_p must be in (0, 1] (got {top_p})")));
    }
    if p.stop.len() > MAX_STOP_STRINGS {
        return Err(invalid(format!("sampling.stop has {} strings; the limit is {MAX_STOP_STRINGS}", p.stop.len())));
    }
    if let Some(s) = p.stop.iter().find(|s| s.is_empty() || s.len() > MAX_STOP_BYTES) {
        return Err(invalid(format!(
            "sampling.stop strings must be 1 to {MAX_STOP_BYTES} bytes (got {} bytes)",
            s.len()
        )));
    }
    let special = if req.allow_special_tokens { SpecialTokens::Parsed } else { SpecialTokens::AsText };
    let mut prompt = encode_input(req.input, special, rules, codec)?;
    if prompt.is_empty() {
        return Err(invalid("prompt encodes to zero tokens"));
    }
    let continued = req.continuation_token_ids.len();
    if let Some(bad) = req.continuation_token_ids.iter().find(|&&t| t as usize >= rules.vocab_size) {
        return Err(invalid(format!(
            "continuation_token_ids has {bad}, outside the vocabulary of {}",
            rules.vocab_size
        )));
    }
    let ctx = rules.context_length;
    let room = ctx.saturating_sub(prompt.len());
    let max_tokens = match p.max_tokens as usize {
        0 => rules.default_max_tokens.min(room),
        n => n,
    };
    if max_tokens == 0 || prompt.len() + max_tokens > ctx {
        return Err(invalid(format!(
            "prompt ({} tokens) + sampling.max_tokens ({max_tokens}) exceeds the context length {ctx}",
            prompt.len()
        )));
    }
    if continued >= max_tokens {
        return Err(invalid(format!(
            "continuation_token_ids has {continued} tokens; sampling.max_tokens ({max_tokens}) leaves none to generate"
        )));
    }
    prompt.extend_from_slice(&req.continuation_token_ids);
    let temperature = f64::from(p.temperature);
    let sampling = match (temperature, p.top_k as usize, f64::from(top_p)) {
        (0.0, _, _) => Sampling::ArgMax,
        (temperature, 0, p) if p >= 1.0 => Sampling::All { temperature },
        (temperature, 0, p) => Sampling::TopP { p, temperature },
        (temperature, k, p) if p >= 1.0 => Sampling::TopK { k, temperature },
        (temperature, k, p) => Sampling::TopKThenTopP { k, p, temperature },
    };
    let priority = match Priority::try_from(req.priority).unwrap_or(Priority::Unspecified) {
        Priority::Low => 0,
        Priority::Unspecified | Priority::Normal => 1,
        Priority::High => 2,
    };
    Ok(Request {
        prompt,
        continued,
        max_tokens,
        sampling,
        seed: p.seed.unwrap_or_else(rand::random),
        stop: p.stop,
        priority,
        deadline: None,
        span: tracing::Span::none(),
    })
}

/// The prompt's tokens: its bytes checked first (tokenizing is the costly
/// part), then the raw prompt or the chat rendered and tokenized.
fn encode_input(
    input: Option<Input>,
    special: SpecialTokens,
    rules: &Rules<'_>,
    codec: &dyn TextCodec,
) -> Result<Vec<u32>, Status> {
    let max_bytes = rules.context_length.saturating_mul(PROMPT_BYTES_PER_TOKEN);
    let too_long = |field: &str, bytes: usize| {
        invalid(format!(
            "{field} is {bytes} bytes; the limit is {max_bytes} bytes ({PROMPT_BYTES_PER_TOKEN} per token of the \
             context length {})",
            rules.context_length
        ))
    };
    let encoded = match input {
        None => return Err(invalid("input is required: set prompt or chat")),
        Some(Input::Prompt(p)) if p.is_empty() => return Err(invalid("prompt must not be empty")),
        Some(Input::Prompt(p)) if p.len() > max_bytes => return Err(too_long("prompt", p.len())),
        Some(Input::Prompt(p)) => codec.encode(&p, special),
        Some(Input::Chat(c)) if c.messages.is_empty() => return Err(invalid("chat.messages must not be empty")),
        Some(Input::Chat(c)) => {
            if c.messages.len() > rules.context_length {
                return Err(invalid(format!(
                    "chat.messages has {} messages; the limit is the context length {}",
                    c.messages.len(),
                    rules.context_length
                )));
            }
            let bytes = c.messages.iter().map(|m| m.content.len()).sum();
            if bytes > max_bytes {
                return Err(too_long("chat.messages[].content (all messages)", bytes));
            }
            if let Some(m) = c.messages.iter().find(|m| !ROLES.contains(&m.role.as_str())) {
                return Err(invalid(format!("chat.messages[].role {:?} is not one of {ROLES:?}", m.role)));
            }
            let turns: Vec<ChatTurn> =
                c.messages.into_iter().map(|m| ChatTurn { role: m.role, content: m.content }).collect();
            codec.encode_chat(&turns, special)
        }
    };
    // A template that refuses the turns (say, roles that must alternate) is the caller's to fix.
    encoded.map_err(|e| match e {
        TextError::Template(_) => invalid(format!("chat.messages: {e}")),
        e => Status::internal(e.to_string()),
    })
}

fn invalid(msg: impl Into<String>) -> Status {
    Status::invalid_argument(msg)
}
