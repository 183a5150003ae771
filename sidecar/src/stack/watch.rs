//! Watching a token stream to its end, so a layer can count what passed,
//! hold a permit for the stream's life, or refund what was not used.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use futures_core::Stream;
use tonic::{Code, Status};

use super::TokenStream;
use crate::wire::Relayed;

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
    fn message(&mut self, _msg: &Relayed) {}
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
    type Item = Result<Relayed, Status>;

    /// Ends after the message that carries a finish reason, so the stream
    /// below is dropped (and its resources freed) with that message.
    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let Some(watch) = this.watch.as_mut() else { return Poll::Ready(None) };
        let item = ready!(this.inner.as_mut().poll_next(cx));
        match &item {
            Some(Ok(msg)) => {
                watch.message(msg);
                if msg.is_last() {
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    use tokio_stream::StreamExt;

    use super::*;
    use mesh_proto::v1::GenerateResponse;

    use crate::stack::testing::{messages, relayed};

    /// Writes down what it is told: one line per message and per end.
    #[derive(Clone, Default)]
    struct Log(Arc<Mutex<Vec<String>>>);

    impl Log {
        fn lines(&self) -> Vec<String> {
            self.0.lock().unwrap().clone()
        }
    }

    impl Watch for Log {
        fn message(&mut self, msg: &Relayed) {
            self.0.lock().unwrap().push(format!("message {:?}", msg.token_ids()));
        }

        fn end(self, end: End<'_>) {
            let line = match end {
                End::Finished => "finished".to_string(),
                End::Failed(status) => format!("failed {:?}", status.code()),
                End::Cancelled => "cancelled".to_string(),
            };
            self.0.lock().unwrap().push(line);
        }
    }

    /// `items` as a stream that counts how many of them were polled out.
    fn counted(items: Vec<Result<Relayed, Status>>) -> (TokenStream, Arc<AtomicUsize>) {
        let polled = Arc::new(AtomicUsize::new(0));
        let count = polled.clone();
        let stream = tokio_stream::iter(items).map(move |item| {
            count.fetch_add(1, Ordering::SeqCst);
            item
        });
        (Box::pin(stream), polled)
    }

    #[tokio::test]
    async fn ends_with_the_finishing_message_without_polling_further() {
        let mut items: Vec<_> = messages(2).into_iter().map(Ok).collect();
        items.push(Ok(relayed(GenerateResponse { token_ids: vec![99], ..Default::default() })));
        let (inner, polled) = counted(items);
        let log = Log::default();
        let mut stream = watched(inner, log.clone());
        assert_eq!(stream.next().await.unwrap().unwrap().token_ids(), [1]);
        assert_eq!(stream.next().await.unwrap().unwrap().token_ids(), [2]);
        assert!(stream.next().await.is_none());
        assert!(stream.next().await.is_none());
        drop(stream);
        assert_eq!(polled.load(Ordering::SeqCst), 2, "the message after the finish was never polled");
        assert_eq!(log.lines(), ["message [1]", "message [2]", "finished"]);
    }

    #[tokio::test]
    async fn an_error_ends_it_once_as_failed() {
        let items = vec![Ok(messages(2).remove(0)), Err(Status::unavailable("node went away"))];
        let log = Log::default();
        let mut stream = watched(Box::pin(tokio_stream::iter(items)), log.clone());
        assert!(stream.next().await.unwrap().is_ok());
        assert_eq!(stream.next().await.unwrap().unwrap_err().code(), Code::Unavailable);
        assert!(stream.next().await.is_none());
        drop(stream);
        assert_eq!(log.lines(), ["message [1]", "failed Unavailable"]);
    }

    #[tokio::test]
    async fn a_stream_dropped_before_its_end_is_cancelled_once() {
        let log = Log::default();
        let mut stream = watched(Box::pin(tokio_stream::iter(messages(3).into_iter().map(Ok))), log.clone());
        assert!(stream.next().await.unwrap().is_ok());
        drop(stream);
        assert_eq!(log.lines(), ["message [1]", "cancelled"]);
    }

    #[tokio::test]
    async fn a_stream_that_stops_without_a_finish_reason_is_finished_once() {
        let first = messages(2).remove(0);
        let log = Log::default();
        let mut stream = watched(Box::pin(tokio_stream::iter(vec![Ok(first)])), log.clone());
        assert!(stream.next().await.unwrap().is_ok());
        assert!(stream.next().await.is_none());
        drop(stream);
        assert_eq!(log.lines(), ["message [1]", "finished"]);
    }
}
