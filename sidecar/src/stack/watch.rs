//! Watching a token stream to its end, so a layer can count what passed,
//! hold a permit for the stream's life, or refund what was not used.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use futures_core::Stream;
use mesh_proto::v1::GenerateResponse;
use tonic::{Code, Status};

use super::TokenStream;

/// How a stream ended.
pub enum End<'a> {
    /// Its last message (one with a finish reason) went out.
    Finished,
    Failed(&'a Status),
    /// The caller left before the end.
    Cancelled,
}

impl End<'_> {
    pub fn code(&self) -> Code {
        match self {
            End::Finished => Code::Ok,
            End::Failed(status) => status.code(),
            End::Cancelled => Code::Cancelled,
        }
    }
}

/// Told about each message and, exactly once, about the end.
pub trait Watch: Send + Unpin + 'static {
    fn message(&mut self, _msg: &GenerateResponse) {}
    fn end(self, _end: End<'_>)
    where
        Self: Sized,
    {
    }
}

struct Watched<W: Watch> {
    inner: TokenStream,
    /// `None` once the stream has ended.
    watch: Option<W>,
}

pub(super) fn watched(inner: TokenStream, watch: impl Watch) -> TokenStream {
    Box::pin(Watched { inner, watch: Some(watch) })
}

impl<W: Watch> Watched<W> {
    fn end(&mut self, end: End<'_>) {
        if let Some(w) = self.watch.take() {
            w.end(end);
        }
    }
}

impl<W: Watch> Stream for Watched<W> {
    type Item = Result<GenerateResponse, Status>;

    /// Ends after the message that carries a finish reason, so the stream
    /// below is dropped (and its resources freed) with that message.
    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let Some(watch) = this.watch.as_mut() else { return Poll::Ready(None) };
        let item = ready!(this.inner.as_mut().poll_next(cx));
        match &item {
            Some(Ok(msg)) => {
                watch.message(msg);
                if msg.finish_reason != 0 {
                    this.end(End::Finished);
                }
            }
            Some(Err(status)) => this.end(End::Failed(status)),
            None => this.end(End::Finished),
        }
        Poll::Ready(item)
    }
}

impl<W: Watch> Drop for Watched<W> {
    /// A stream dropped before its end: the caller left.
    fn drop(&mut self) {
        self.end(End::Cancelled);
    }
}
