//! A token message as the sidecar relays it.

use bytes::Bytes;
use prost::Message;

/// One `GenerateResponse` as it arrived: its encoded bytes, written out
/// again unchanged, and the two fields the sidecar reads.
#[derive(Debug, Clone)]
pub struct Relayed {
    encoded: Bytes,
    token_ids: Vec<u32>,
    finish_reason: i32,
}

/// The fields of `GenerateResponse` the sidecar reads, with the same tags;
/// prost skips the others (`text`, `usage`) without copying them.
#[derive(Clone, PartialEq, Message)]
struct Read {
    #[prost(uint32, repeated, tag = "2")]
    token_ids: Vec<u32>,
    #[prost(int32, tag = "3")]
    finish_reason: i32,
}

impl Relayed {
    /// Reads the fields the sidecar needs from an encoded `GenerateResponse`.
    pub fn decode(encoded: Bytes) -> Result<Self, prost::DecodeError> {
        let Read { token_ids, finish_reason } = Read::decode(encoded.as_ref())?;
        Ok(Self { encoded, token_ids, finish_reason })
    }

    /// The message as it arrived, to be sent on as it is.
    pub fn encoded(&self) -> &[u8] {
        &self.encoded
    }

    /// Token ids sampled since the previous message.
    pub fn token_ids(&self) -> &[u32] {
        &self.token_ids
    }

    /// Whether this is the stream's last message (it carries a finish reason).
    pub fn is_last(&self) -> bool {
        self.finish_reason != 0
    }

    /// The `FinishReason` it carries (0 before the last message).
    pub fn finish_reason(&self) -> i32 {
        self.finish_reason
    }
}

#[cfg(test)]
mod tests {
    use mesh_proto::v1::{FinishReason, GenerateResponse, Usage};

    use super::*;

    #[test]
    fn reads_tokens_and_finish_and_keeps_every_byte() {
        let full = GenerateResponse {
            text: " héllo".into(),
            token_ids: vec![7, 300, 70_000],
            finish_reason: FinishReason::Length as i32,
            usage: Some(Usage {
                prompt_tokens: 3,
                completion_tokens: 3,
                queue_time_us: 9,
                time_to_first_token_us: 11,
                cached_prompt_tokens: 2,
            }),
            model: "chat-small".into(),
        };
        let relayed = Relayed::decode(full.encode_to_vec().into()).unwrap();
        assert_eq!(relayed.token_ids(), [7, 300, 70_000]);
        assert!(relayed.is_last());
        assert_eq!(GenerateResponse::decode(relayed.encoded()).unwrap(), full, "text, usage and model pass through");

        let middle = GenerateResponse { text: "a".into(), token_ids: vec![1], ..Default::default() };
        assert!(!Relayed::decode(middle.encode_to_vec().into()).unwrap().is_last());
    }

    #[test]
    fn a_malformed_message_is_an_error() {
        // Field 2 (token ids, packed) claims 5 bytes but has 1.
        assert!(Relayed::decode(Bytes::from_static(&[0x12, 0x05, 0x01])).is_err());
    }
}
