//! Single-flight: the first request of a key opens the one upstream stream,
//! and every identical request arriving while it runs follows it.
//!
//! The stream is pulled by its own task (the [`pump`]) into a shared
//! [`Progress`], and every caller, the first included, reads it from the
//! start. So no caller's leaving ends the stream for the others: it runs
//! while anyone follows it and is dropped (cancelling it upstream) when the
//! last follower leaves. If it fails, every follower gets its status; they
//! asked the same question under the first caller's deadline and would
//! have been refused or failed alike.

use std::sync::Arc;

use futures_util::StreamExt;
use mesh_proto::v1::FinishReason;
use tokio::sync::watch;
use tonic::Status;
use tonic::metadata::MetadataMap;
use tracing::Instrument;

use super::Shared;
use super::key::Key;
use crate::stack::{Call, Next, TokenStream, pass};
use crate::wire::Relayed;

/// What one upstream stream has produced so far.
#[derive(Default)]
pub struct Progress {
    /// The upstream reply's metadata, or its refusal.
    started: Option<Result<MetadataMap, Status>>,
    messages: Vec<Relayed>,
    /// `Some` once the stream has ended.
    end: Option<Result<(), Status>>,
}

/// The sending side of a flight; the flight table holds one handle, the
/// pump another.
pub type Flight = Arc<watch::Sender<Progress>>;

/// A new flight and its first follower.
pub fn new() -> (Flight, watch::Receiver<Progress>) {
    let (tx, rx) = watch::channel(Progress::default());
    (Arc::new(tx), rx)
}

/// Opens the upstream stream for `call` in its own task, under its span.
pub fn launch(shared: Arc<Shared>, key: Key, flight: Flight, next: Next, call: Call) {
    let span = call.span.clone();
    let landing = Landing { shared, key, flight };
    tokio::spawn(pump(landing, next, call).instrument(span));
}

/// Waits for the upstream reply: its metadata, or the refusal every follower shares.
pub async fn started(rx: &mut watch::Receiver<Progress>) -> Result<MetadataMap, Status> {
    let progress = rx.wait_for(|p| p.started.is_some()).await.map_err(|_| lost())?;
    match &progress.started {
        Some(Ok(metadata)) => Ok(metadata.clone()),
        Some(Err(status)) => Err(status.clone()),
        None => Err(lost()),
    }
}

/// Every message of the flight from its first, then its end.
pub fn follow(rx: watch::Receiver<Progress>) -> TokenStream {
    Box::pin(futures_util::stream::unfold(Some((rx, 0)), |state| async move {
        let (mut rx, at) = state?;
        loop {
            let next = {
                let progress = rx.borrow_and_update();
                match (progress.messages.get(at), &progress.end) {
                    (Some(msg), _) => Some(Ok(msg.clone())),
                    (None, Some(Ok(()))) => return None,
                    (None, Some(Err(status))) => Some(Err(status.clone())),
                    (None, None) => None,
                }
            };
            match next {
                Some(Ok(msg)) => return Some((Ok(msg), Some((rx, at + 1)))),
                Some(Err(status)) => return Some((Err(status), None)),
                None if rx.changed().await.is_err() => return Some((Err(lost()), None)),
                None => {}
            }
        }
    }))
}

fn lost() -> Status {
    Status::internal("the response cache lost the upstream stream it was following")
}

/// Pulls the upstream stream into the flight until it ends or nobody follows.
async fn pump(landing: Landing, next: Next, call: Call) {
    let reply = match pass(next, call).await {
        Ok(reply) => reply,
        Err(status) => return landing.fail(status),
    };
    landing.flight.send_modify(|p| p.started = Some(Ok(reply.metadata)));
    let mut stream = reply.stream;
    loop {
        let item = tokio::select! {
            item = stream.next() => item,
            () = landing.flight.closed() => {
                if landing.shared.abandon_if_unfollowed(&landing.key, &landing.flight) {
                    return; // dropping the stream cancels it upstream
                }
                continue;
            }
        };
        match item {
            Some(Ok(msg)) => {
                let last = msg.is_last();
                landing.flight.send_modify(|p| p.messages.push(msg));
                if last {
                    break;
                }
            }
            Some(Err(status)) => return landing.fail(status),
            None => break,
        }
    }
    landing.complete();
}

/// A flight's end: leaves the flight table, storing a complete response,
/// and tells every follower how it ended, whatever way the pump stops
/// (a panic or the runtime shutting down included).
struct Landing {
    shared: Arc<Shared>,
    key: Key,
    flight: Flight,
}

impl Landing {
    fn fail(self, status: Status) {
        self.shared.land(&self.key, &self.flight, None);
        self.flight.send_modify(|p| {
            p.started.get_or_insert_with(|| Err(status.clone()));
            p.end = Some(Err(status));
        });
    }

    /// Stores the response if it finished on its own (STOP or LENGTH), not
    /// one the server cut short or one that simply stopped.
    fn complete(self) {
        let response: Arc<[Relayed]> = self.flight.borrow().messages.clone().into();
        let finish = response.last().map(Relayed::finish_reason);
        let whole = [FinishReason::Stop as i32, FinishReason::Length as i32];
        let keep = finish.is_some_and(|f| whole.contains(&f)).then_some(response);
        self.shared.land(&self.key, &self.flight, keep);
        self.flight.send_modify(|p| p.end = Some(Ok(())));
    }
}

impl Drop for Landing {
    fn drop(&mut self) {
        self.shared.land(&self.key, &self.flight, None);
        self.flight.send_if_modified(|p| {
            if p.end.is_some() {
                return false;
            }
            p.started.get_or_insert_with(|| Err(lost()));
            p.end = Some(Err(lost()));
            true
        });
    }
}
