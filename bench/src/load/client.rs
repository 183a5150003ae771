//! One request, start to end: send, stream, classify.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use mesh_proto::metadata as md;
use mesh_proto::v1::generation_client::GenerationClient;
use mesh_proto::v1::{FinishReason, GenerateRequest};
use tonic::Code;
use tonic::transport::Channel;

use super::engine::LiveCounters;
use super::record::{Chunk, PromptUsage, Status};

/// What `send` observed; the engine adds the run-level fields.
pub(crate) struct Observed {
    pub status: Status,
    pub chunks: Vec<Chunk>,
    pub total: Duration,
    pub finish_reason: FinishReason,
    pub retry_after_ms: Option<u64>,
    pub usage: Option<PromptUsage>,
    /// The streamed text, for a conversation's history.
    pub text: String,
}

/// Sends `req` and reads its stream until it ends or `deadline` passes.
///
/// The deadline goes to the server as `grpc-timeout` so it can refuse work it
/// cannot finish in time, and is enforced here as well: a server that stops
/// answering (SIGSTOP, a hung process) never sends DEADLINE_EXCEEDED itself,
/// and the caller must still see the request end on time.
pub(crate) async fn send(
    mut client: GenerationClient<Channel>,
    req: GenerateRequest,
    deadline: Duration,
    live: &LiveCounters,
) -> Observed {
    let sent = Instant::now();
    let mut chunks = Vec::new();
    let mut finish = FinishReason::Unspecified;
    let (mut usage, mut text) = (None, String::new());
    let mut request = tonic::Request::new(req);
    request.set_timeout(deadline);
    let streamed = tokio::time::timeout(deadline, async {
        let mut stream = client.generate(request).await?.into_inner();
        while let Some(msg) = stream.message().await? {
            let tokens = u32::try_from(msg.token_ids.len()).unwrap_or(u32::MAX);
            if tokens > 0 {
                chunks.push(Chunk { at: sent.elapsed(), tokens });
                live.tokens.fetch_add(u64::from(tokens), Ordering::Relaxed);
            }
            text.push_str(&msg.text);
            if let Some(u) = msg.usage {
                usage =
                    Some(PromptUsage { prompt_tokens: u.prompt_tokens, cached_prompt_tokens: u.cached_prompt_tokens });
            }
            if msg.finish_reason != 0 {
                // An unknown (newer) finish reason is still a finish.
                finish = FinishReason::try_from(msg.finish_reason).unwrap_or(FinishReason::Stop);
            }
        }
        Ok::<(), tonic::Status>(())
    })
    .await;
    let total = sent.elapsed();
    let (status, retry_after_ms) = match streamed {
        Err(_elapsed) => (Status::Grpc(Code::DeadlineExceeded), None),
        // tonic's client applies `grpc-timeout` to the wait for response
        // headers itself and reports its expiry as CANCELLED ("Timeout
        // expired"); a request that ran out of time is DEADLINE_EXCEEDED here
        // whichever timer noticed first.
        Ok(Err(e)) if e.code() == Code::Cancelled && total >= deadline => (Status::Grpc(Code::DeadlineExceeded), None),
        Ok(Err(e)) => (Status::Grpc(e.code()), retry_after(&e)),
        Ok(Ok(())) if finish == FinishReason::Unspecified => (Status::Incomplete, None),
        Ok(Ok(())) => (Status::Grpc(Code::Ok), None),
    };
    Observed { status, chunks, total, finish_reason: finish, retry_after_ms, usage, text }
}

/// The server's retry hint; absent or malformed reads as no hint.
fn retry_after(status: &tonic::Status) -> Option<u64> {
    status.metadata().get(md::RETRY_AFTER_MS)?.to_str().ok()?.trim().parse().ok()
}
