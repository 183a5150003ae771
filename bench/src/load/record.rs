//! What one request did, as the caller saw it: the raw material every
//! statistic is derived from.

use std::time::Duration;

use mesh_proto::v1::FinishReason;
use tonic::Code;

/// How a request ended. Every sent request gets exactly one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    /// The gRPC status: `Ok` for a stream that ended cleanly with a finish
    /// reason; the server's (or the transport's) code otherwise. A request
    /// that ran past its deadline is `DeadlineExceeded` whoever noticed first.
    Grpc(Code),
    /// The stream ended without an error but also without a finish reason:
    /// the server broke the contract, so it must not count as success.
    Incomplete,
}

impl Status {
    pub fn is_ok(self) -> bool {
        self == Status::Grpc(Code::Ok)
    }

    /// The canonical gRPC name (`RESOURCE_EXHAUSTED`), used as the key in
    /// reports so they read like the contract's error table.
    pub fn label(self) -> &'static str {
        match self {
            Status::Incomplete => "INCOMPLETE",
            Status::Grpc(code) => match code {
                Code::Ok => "OK",
                Code::Cancelled => "CANCELLED",
                Code::Unknown => "UNKNOWN",
                Code::InvalidArgument => "INVALID_ARGUMENT",
                Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
                Code::NotFound => "NOT_FOUND",
                Code::AlreadyExists => "ALREADY_EXISTS",
                Code::PermissionDenied => "PERMISSION_DENIED",
                Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
                Code::FailedPrecondition => "FAILED_PRECONDITION",
                Code::Aborted => "ABORTED",
                Code::OutOfRange => "OUT_OF_RANGE",
                Code::Unimplemented => "UNIMPLEMENTED",
                Code::Internal => "INTERNAL",
                Code::Unavailable => "UNAVAILABLE",
                Code::DataLoss => "DATA_LOSS",
                Code::Unauthenticated => "UNAUTHENTICATED",
            },
        }
    }
}

/// One stream message that carried tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    /// When it arrived, measured from when the request was sent.
    pub at: Duration,
    pub tokens: u32,
}

/// The prompt side of the usage the server reported on the last message.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PromptUsage {
    pub prompt_tokens: u32,
    /// Prompt tokens served from the node's prefix cache, not computed.
    pub cached_prompt_tokens: u32,
}

impl PromptUsage {
    /// Prompt tokens the node computed (prefilled).
    pub fn prefilled(&self) -> u32 {
        self.prompt_tokens.saturating_sub(self.cached_prompt_tokens)
    }
}

/// Everything recorded about one request.
#[derive(Debug, Clone)]
pub struct RequestRecord {
    /// Position in the run's send order (0, 1, 2, ...): unique per run.
    pub id: u64,
    /// Index of the target it was sent to.
    pub target: usize,
    /// When it was sent, measured from the start of the run.
    pub sent_at: Duration,
    pub status: Status,
    /// Token-carrying messages in arrival order.
    pub chunks: Vec<Chunk>,
    /// From send until the stream ended (last message, error or deadline).
    pub total: Duration,
    pub finish_reason: FinishReason,
    /// The `retry-after-ms` hint of a refusal, when the server gave one.
    pub retry_after_ms: Option<u64>,
    /// From the last message's usage; None when the stream carried none.
    pub usage: Option<PromptUsage>,
    /// Its turn in a conversation (1-based), for a conversation mix.
    pub turn: Option<u32>,
}

impl RequestRecord {
    pub fn tokens(&self) -> u64 {
        self.chunks.iter().map(|c| u64::from(c.tokens)).sum()
    }

    /// Time to first token: until the first message that carried one.
    pub fn ttft(&self) -> Option<Duration> {
        self.chunks.iter().find(|c| c.tokens > 0).map(|c| c.at)
    }

    /// Inter-token latencies. Each message after the first spreads the gap
    /// since the previous message evenly over the tokens it carries (a
    /// message with k tokens after a gap g gives k samples of g/k), so the
    /// mean is the decode time per token whatever the server's chunking.
    /// Extra tokens in the first message belong to TTFT and give no sample.
    pub fn inter_token(&self) -> impl Iterator<Item = Duration> + '_ {
        let tokened: Vec<&Chunk> = self.chunks.iter().filter(|c| c.tokens > 0).collect();
        let pairs: Vec<(Duration, u32)> =
            tokened.windows(2).map(|w| (w[1].at.saturating_sub(w[0].at), w[1].tokens)).collect();
        pairs.into_iter().flat_map(|(gap, k)| std::iter::repeat_n(gap / k, k as usize))
    }

    /// Goodput: finished normally (end of sequence, stop string or length)
    /// with status OK, within the deadline. A stream the server cancelled
    /// (drain) delivered tokens but not the answer, so it does not count.
    pub fn is_good(&self, deadline: Duration) -> bool {
        self.status.is_ok()
            && matches!(self.finish_reason, FinishReason::Stop | FinishReason::Length)
            && self.total <= deadline
    }

    /// When the stream ended, measured from the start of the run.
    pub fn ended_at(&self) -> Duration {
        self.sent_at + self.total
    }
}
