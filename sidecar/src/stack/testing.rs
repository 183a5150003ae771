//! Mocks for testing one layer at a time: a call, a reply streaming a few
//! tokens, and inner services that reply or refuse and count their calls.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use mesh_proto::v1::{FinishReason, GenerateRequest, GenerateResponse};
use prost::Message;
use tokio_stream::StreamExt;
use tonic::metadata::MetadataMap;
use tonic::{Code, Status};

use super::{Call, Next, Reply, TokenStream, last};
use crate::wire::Relayed;

/// A call for `model`, as a client sends it.
pub fn call(model: &str) -> Call {
    Call::new(tonic::Request::new(GenerateRequest { model: model.into(), ..Default::default() }))
}

/// `msg` as it arrives from an instance or a node.
pub fn relayed(msg: GenerateResponse) -> Relayed {
    Relayed::decode(msg.encode_to_vec().into()).expect("a message prost encoded decodes")
}

/// One message per token (ids 1, 2, ...), the last with a finish reason.
pub fn messages(tokens: u32) -> Vec<Relayed> {
    (1..=tokens)
        .map(|id| {
            relayed(GenerateResponse {
                text: format!(" t{id}"),
                token_ids: vec![id],
                finish_reason: if id == tokens { FinishReason::Stop as i32 } else { 0 },
                ..Default::default()
            })
        })
        .collect()
}

/// A reply streaming `tokens` tokens, one message each.
pub fn reply(tokens: u32) -> Reply {
    Reply { metadata: MetadataMap::new(), stream: Box::pin(tokio_stream::iter(messages(tokens).into_iter().map(Ok))) }
}

/// How many calls reached a mock inner service.
#[derive(Clone, Default)]
pub struct Calls(Arc<AtomicUsize>);

impl Calls {
    pub fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }

    pub fn add(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// An inner service that streams `tokens` tokens to every call.
pub fn ok_inner(tokens: u32) -> (Next, Calls) {
    let calls = Calls::default();
    let counted = calls.clone();
    let next = last(move |_: Call| {
        counted.add();
        async move { Ok(reply(tokens)) }
    });
    (next, calls)
}

/// An inner service that refuses every call with `code`.
pub fn refusing(code: Code) -> (Next, Calls) {
    let calls = Calls::default();
    let counted = calls.clone();
    let next = last(move |_: Call| {
        counted.add();
        async move { Err(Status::new(code, "refused by the inner service")) }
    });
    (next, calls)
}

/// Reads a stream to its end: how many tokens it carried, or how it failed.
pub async fn read_to_end(stream: &mut TokenStream) -> Result<usize, Status> {
    let mut tokens = 0;
    while let Some(msg) = stream.next().await {
        tokens += msg?.token_ids().len();
    }
    Ok(tokens)
}
