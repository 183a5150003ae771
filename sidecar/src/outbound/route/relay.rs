//! Relaying a stream to the caller, token messages as they arrive; on a
//! server-side failure mid-way, the stream moves to another instance and
//! continues from the tokens already sent. Dropping the stream (the caller
//! left) drops the upstream one, which cancels the call there too.
//!
//! The relay is a hand-written `Stream`, polled by the caller's response
//! body: a message goes from the instance's stream to the caller with no
//! task hop, lock, allocation or timer registration of its own. The idle
//! timer is set once per idle period, not once per message: a message only
//! notes its arrival time, and when the timer fires it is moved on to
//! `idle_timeout` after the last message, or the stream has hung.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use futures_core::Stream;
use mesh_proto::v1::GenerateRequest;
use tokio::time::Sleep;
use tonic::Status;

use super::Route;
use super::attempt::{Attempt, Bounds, classify, of_our_making};
use crate::outbound::instance::Outcome;
use crate::stack::{Call, TokenStream};
use crate::wire::Relayed;

struct Relay {
    route: Arc<Route>,
    req: GenerateRequest,
    deadline: Option<Instant>,
    span: tracing::Span,
    attempt: Attempt,
    state: State,
    /// Every token sent so far, the continuation if the stream moves.
    sent: Vec<u32>,
    migrations: u32,
    /// When the attempt's last message arrived.
    last: tokio::time::Instant,
    /// Fires `idle_timeout` after `last` (or earlier, then it is moved on).
    idle: Pin<Box<Sleep>>,
}

/// The stream to the next attempt with its first message, once opened.
type Opening = Pin<Box<dyn Future<Output = Result<(Attempt, Relayed), Status>> + Send>>;

enum State {
    /// A message received but not yet passed on (an attempt's first).
    Pending(Relayed),
    Relaying,
    /// Opening the stream on another instance (rare, so boxed: a stream
    /// that never moves does not carry the opening's state).
    Moving(Opening),
    Done,
}

pub(super) fn stream(route: Arc<Route>, call: Call, (attempt, first): (Attempt, Relayed)) -> TokenStream {
    let last = tokio::time::Instant::now();
    let idle = Box::pin(tokio::time::sleep_until(last + route.routing.idle_timeout));
    let call = call.into_parts();
    Box::pin(Relay {
        route,
        req: call.req,
        deadline: call.deadline,
        span: call.span,
        attempt,
        state: State::Pending(first),
        sent: Vec::new(),
        migrations: 0,
        last,
        idle,
    })
}

impl Stream for Relay {
    type Item = Result<Relayed, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            let failure = match std::mem::replace(&mut this.state, State::Relaying) {
                State::Done => {
                    this.state = State::Done;
                    return Poll::Ready(None);
                }
                State::Pending(msg) => return Poll::Ready(Some(Ok(this.pass(msg)))),
                State::Relaying => match this.poll_attempt(cx) {
                    Poll::Ready(Ok(msg)) => return Poll::Ready(Some(Ok(this.pass(msg)))),
                    Poll::Ready(Err(status)) => status,
                    Poll::Pending => return Poll::Pending,
                },
                State::Moving(mut opening) => match opening.as_mut().poll(cx) {
                    Poll::Ready(Ok((next, first))) => {
                        this.moved(next);
                        return Poll::Ready(Some(Ok(this.pass(first))));
                    }
                    Poll::Ready(Err(status)) => {
                        this.state = State::Done;
                        return Poll::Ready(Some(Err(status)));
                    }
                    Poll::Pending => {
                        this.state = State::Moving(opening);
                        return Poll::Pending;
                    }
                },
            };
            match this.migrate(failure) {
                Ok(opening) => this.state = State::Moving(opening),
                Err(status) => {
                    this.state = State::Done;
                    return Poll::Ready(Some(Err(status)));
                }
            }
        }
    }
}

impl Relay {
    /// The attempt's next message, or why the attempt is over.
    fn poll_attempt(&mut self, cx: &mut Context<'_>) -> Poll<Result<Relayed, Status>> {
        match Pin::new(&mut self.attempt.stream).poll_next(cx) {
            Poll::Ready(Some(Ok(msg))) => {
                self.last = tokio::time::Instant::now();
                return Poll::Ready(Ok(msg));
            }
            Poll::Ready(Some(Err(status))) => return Poll::Ready(Err(status)),
            Poll::Ready(None) => return Poll::Ready(Err(Status::unavailable("stream ended without a finish reason"))),
            Poll::Pending => {}
        }
        let idle = self.route.routing.idle_timeout;
        while self.idle.as_mut().poll(cx).is_ready() {
            let due = self.last + idle;
            if tokio::time::Instant::now() >= due {
                return Poll::Ready(Err(Status::unavailable(format!("no token for {idle:?}"))));
            }
            self.idle.as_mut().reset(due);
        }
        Poll::Pending
    }

    fn pass(&mut self, msg: Relayed) -> Relayed {
        self.sent.extend_from_slice(msg.token_ids());
        if msg.is_last() {
            self.route.balancer.record(&self.attempt.ep, Outcome::Success, "");
            self.span.record("migrations", self.migrations);
            self.state = State::Done;
        }
        msg
    }

    /// Moves the stream off a failed instance, or says why it cannot go on.
    fn migrate(&mut self, status: Status) -> Result<Opening, Status> {
        let route = self.route.clone();
        let outcome = classify(&status);
        route.balancer.record(&self.attempt.ep, outcome, status.message());
        telemetry::propagation::record_status(&self.attempt.span, &status);
        let can_move = (outcome == Outcome::Failure || of_our_making(&status))
            && self.migrations < route.routing.max_migrations
            && route.withdraw(&self.req.model);
        if !can_move {
            return Err(status);
        }
        self.migrations += 1;
        route.metrics.migrations.inc();
        let from = self.attempt.ep.record.instance_id.clone();
        let (req, sent, deadline, span) = (self.req.clone(), self.sent.clone(), self.deadline, self.span.clone());
        Ok(Box::pin(async move {
            let mut exclude = HashSet::from([from.clone()]);
            let bounds = Bounds { deadline, queue_wait: None };
            let (next, first) = route.open(&req, &sent, bounds, &mut exclude, &span).await.map_err(|e| {
                Status::unavailable(format!(
                    "stream interrupted after {} tokens ({}) and could not continue elsewhere: {}",
                    sent.len(),
                    status.message(),
                    e.message()
                ))
            })?;
            let to = &next.ep.record.instance_id;
            tracing::info!(%from, %to, tokens = sent.len(), "stream moved to another instance");
            Ok((next, first))
        }))
    }

    /// Relays from `next` from now on.
    fn moved(&mut self, next: Attempt) {
        self.attempt = next;
        self.last = tokio::time::Instant::now();
        self.idle.as_mut().reset(self.last + self.route.routing.idle_timeout);
    }
}
