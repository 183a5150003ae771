//! Relaying a stream to the caller, token messages as they arrive; on a
//! server-side failure mid-way, the stream moves to another instance and
//! continues from the tokens already sent. Dropping the stream (the caller
//! left) drops the upstream one, which cancels the call there too.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use mesh_proto::v1::{GenerateRequest, GenerateResponse};
use tonic::Status;

use super::Route;
use super::attempt::{Attempt, classify, of_our_making};
use crate::outbound::instance::Outcome;
use crate::stack::{Call, TokenStream};

struct Relay {
    route: Arc<Route>,
    req: GenerateRequest,
    deadline: Option<Instant>,
    span: tracing::Span,
    attempt: Attempt,
    /// A message received but not yet passed on (an attempt's first).
    pending: Option<GenerateResponse>,
    /// Every token sent so far, the continuation if the stream moves.
    sent: Vec<u32>,
    migrations: u32,
    done: bool,
}

pub(super) fn stream(route: Arc<Route>, call: Call, (attempt, first): (Attempt, GenerateResponse)) -> TokenStream {
    let relay = Relay {
        route,
        req: call.req,
        deadline: call.deadline,
        span: call.span,
        attempt,
        pending: Some(first),
        sent: Vec::new(),
        migrations: 0,
        done: false,
    };
    Box::pin(futures_util::stream::unfold(relay, Relay::next))
}

impl Relay {
    async fn next(mut self) -> Option<(Result<GenerateResponse, Status>, Self)> {
        if self.done {
            return None;
        }
        loop {
            let status = match self.receive().await {
                Ok(msg) => return Some((Ok(self.pass(msg)), self)),
                Err(status) => status,
            };
            if let Err(status) = self.migrate(status).await {
                self.done = true;
                return Some((Err(status), self));
            }
        }
    }

    async fn receive(&mut self) -> Result<GenerateResponse, Status> {
        if let Some(msg) = self.pending.take() {
            return Ok(msg);
        }
        let idle = self.route.routing.idle_timeout;
        match tokio::time::timeout(idle, self.attempt.stream.message()).await {
            Ok(Ok(Some(msg))) => Ok(msg),
            Ok(Ok(None)) => Err(Status::unavailable("stream ended without a finish reason")),
            Ok(Err(status)) => Err(status),
            Err(_) => Err(Status::unavailable(format!("no token for {idle:?}"))),
        }
    }

    fn pass(&mut self, msg: GenerateResponse) -> GenerateResponse {
        self.sent.extend_from_slice(&msg.token_ids);
        if msg.finish_reason != 0 {
            self.route.balancer.record(&self.attempt.ep, Outcome::Success, "");
            self.span.record("migrations", self.migrations);
            self.done = true;
        }
        msg
    }

    /// Moves the stream off a failed instance, or says why it cannot go on.
    async fn migrate(&mut self, status: Status) -> Result<(), Status> {
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
        let mut exclude = HashSet::from([self.attempt.ep.record.instance_id.clone()]);
        match route.open(&self.req, &self.sent, self.deadline, &mut exclude, &self.span).await {
            Ok((next, first)) => {
                tracing::info!(
                    from = %self.attempt.ep.record.instance_id,
                    to = %next.ep.record.instance_id,
                    tokens = self.sent.len(),
                    "stream moved to another instance"
                );
                self.attempt = next;
                self.pending = Some(first);
                Ok(())
            }
            Err(e) => Err(Status::unavailable(format!(
                "stream interrupted after {} tokens ({}) and could not continue elsewhere: {}",
                self.sent.len(),
                status.message(),
                e.message()
            ))),
        }
    }
}
