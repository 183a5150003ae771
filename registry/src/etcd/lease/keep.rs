//! Keeping one lease alive until it has really run out.
//!
//! A keep-alive goes out every TTL/3 on the lease's keep-alive stream. When
//! the stream breaks (etcd restarted, the connection dropped) or a
//! keep-alive stays unanswered for `request_timeout` (etcd or this host
//! overloaded), the stream is opened again over a fresh connection after a
//! jittered backoff, for the same lease: nothing is rewritten, so a fleet
//! that loses etcd together comes back without a burst of writes, and
//! without reconnecting in lockstep. If the TTL runs out since the last
//! answered keep-alive, the records may be gone: the registrar reports
//! itself disconnected, but still asks etcd about the same lease, since
//! etcd extends every lease when it restarts with its data. Only etcd's
//! answer that the lease is gone (TTL 0: expired, revoked, or a wiped
//! store) ends it, and a new one is granted.

use std::collections::VecDeque;
use std::time::Duration;

use etcd_client::{Client, LeaseKeepAliveResponse, LeaseKeepAliveStream, LeaseKeeper};
use tokio::sync::oneshot;
use tokio::time::{Instant, sleep_until};

use super::{Command, Ended, Registrar};
use crate::RegistryError;
use crate::backoff::Backoff;
use crate::etcd::{EtcdConfig, with_timeout};

/// A lease being kept.
pub(super) struct Held {
    id: i64,
    ttl: Duration,
    /// `request_timeout`: longest wait for an answer before a retry.
    limit: Duration,
    client: Client,
    /// The keep-alive stream; `None` while waiting to open it again.
    link: Option<Link>,
    /// The next keep-alive (with a link) or the next try to open one.
    due: Instant,
    /// When the last keep-alive that etcd answered was sent: the lease
    /// lasts at least until this plus the TTL.
    answered: Instant,
}

type Reply = Result<Option<LeaseKeepAliveResponse>, etcd_client::Error>;

struct Link {
    keeper: LeaseKeeper,
    replies: LeaseKeepAliveStream,
    /// When each keep-alive not yet answered was sent (etcd answers in order).
    sent: VecDeque<Instant>,
}

impl Link {
    async fn open(client: &mut Client, id: i64, limit: Duration) -> Result<Link, RegistryError> {
        let (keeper, replies) = with_timeout(limit, client.lease_keep_alive(id)).await?;
        Ok(Link { keeper, replies, sent: VecDeque::new() })
    }
}

impl Held {
    /// Starts keeping lease `id`, granted by a request sent at `asked`.
    /// Without a keep-alive stream when it cannot be opened now: then the
    /// first keep-alive opens it.
    pub(super) async fn open(mut client: Client, id: i64, ttl: Duration, asked: Instant, limit: Duration) -> Held {
        let link = Link::open(&mut client, id, limit).await.ok();
        let due = if link.is_some() { Instant::now() + ttl / 3 } else { Instant::now() };
        Held { id, ttl, limit, client, link, due, answered: asked }
    }

    pub(super) fn linked(&self) -> bool {
        self.link.is_some()
    }

    /// Waits for etcd's next answer, or until the next keep-alive or
    /// retry is due (`None`).
    async fn next(&mut self) -> Option<Reply> {
        let Some(link) = self.link.as_mut() else {
            sleep_until(self.due).await;
            return None;
        };
        tokio::select! {
            reply = link.replies.message() => Some(reply),
            _ = sleep_until(self.due) => None,
        }
    }

    /// Sends the next keep-alive. `Err` when the stream is broken, or when
    /// the oldest keep-alive has waited `limit` for its answer.
    async fn send(&mut self) -> Result<(), RegistryError> {
        let Some(link) = self.link.as_mut() else { return Ok(()) };
        let now = Instant::now();
        if link.sent.front().is_some_and(|sent| now - *sent > self.limit) {
            return Err(RegistryError::Timeout(self.limit));
        }
        with_timeout(self.limit, link.keeper.keep_alive()).await?;
        link.sent.push_back(now);
        self.due = now + self.ttl / 3;
        Ok(())
    }

    /// Notes etcd's answer to the oldest keep-alive: the lease is alive.
    fn answered(&mut self) {
        if let Some(sent) = self.link.as_mut().and_then(|l| l.sent.pop_front()) {
            self.answered = self.answered.max(sent);
        }
    }

    fn unlink(&mut self, retry_in: Duration) {
        self.link = None;
        self.due = Instant::now() + retry_in;
    }

    /// Opens the keep-alive stream again, over a fresh connection (the
    /// client's balanced channel drops an endpoint whose connection
    /// failed, and would wait for it forever), and sends a keep-alive at
    /// once.
    async fn relink(&mut self, config: &EtcdConfig) -> Result<(), RegistryError> {
        let mut client = config.connect().await?;
        self.link = Some(Link::open(&mut client, self.id, self.limit).await?);
        self.client = client;
        self.send().await
    }
}

/// What interrupts the keeping of a lease.
enum Trouble {
    /// The keep-alive stream failed: retried while the lease lasts.
    Link(RegistryError),
    End(Ended),
}

impl Trouble {
    /// The client refuses to open a keep-alive stream for a lease etcd
    /// does not know: that ends the lease, it is not a link to retry.
    fn relinking(e: RegistryError) -> Self {
        match &e {
            RegistryError::Etcd(etcd_client::Error::LeaseKeepAliveError(m)) if m.contains("not found") => {
                Trouble::End(Ended::Lost(e))
            }
            _ => Trouble::Link(e),
        }
    }
}

impl From<RegistryError> for Trouble {
    fn from(e: RegistryError) -> Self {
        Trouble::Link(e)
    }
}

impl From<etcd_client::Error> for Trouble {
    fn from(e: etcd_client::Error) -> Self {
        Trouble::Link(e.into())
    }
}

impl Registrar {
    /// Keeps `held` alive, and its records written, until etcd says the
    /// lease is gone or the process shuts down.
    pub(super) async fn keep(&mut self, mut held: Held, backoff: &mut Backoff) -> Ended {
        loop {
            let lapse = held.answered + held.ttl;
            let registered = self.is_registered();
            let step = tokio::select! {
                next = held.next() => match next {
                    Some(reply) => self.on_reply(&mut held, reply, backoff).await,
                    None if held.link.is_some() => held.send().await.map_err(Trouble::from),
                    None => held.relink(&self.config).await.map_err(Trouble::relinking),
                },
                _ = sleep_until(lapse), if registered => {
                    // No answer within the TTL: the records may be gone.
                    self.lost(RegistryError::Timeout(held.ttl));
                    Ok(())
                }
                cmd = self.commands.recv() => self.command(&mut held, cmd).await,
            };
            match step {
                Ok(()) => {}
                Err(Trouble::Link(e)) => self.broke(&mut held, e, backoff),
                Err(Trouble::End(ended)) => return ended,
            }
        }
    }

    async fn on_reply(&mut self, held: &mut Held, reply: Reply, backoff: &mut Backoff) -> Result<(), Trouble> {
        let Some(reply) = reply? else {
            let closed = "etcd closed the keep-alive stream".to_string();
            return Err(etcd_client::Error::LeaseKeepAliveError(closed).into());
        };
        if reply.ttl() <= 0 {
            let gone = format!("lease {} expired, was revoked, or etcd lost it", held.id);
            return Err(Trouble::End(Ended::Lost(etcd_client::Error::LeaseKeepAliveError(gone).into())));
        }
        held.answered();
        backoff.reset();
        if self.dirty() {
            self.flush(&mut held.client, held.id).await?;
        }
        let ended = self.link_trouble.end(Instant::now().into_std());
        if !self.is_registered() {
            self.registered(held.id);
        } else if let Some(ended) = ended {
            let after = format!("{:.1}s", ended.lasted.as_secs_f64());
            tracing::info!(lease = held.id, "registry: etcd answers keep-alives again after {after}; lease kept");
        }
        Ok(())
    }

    /// A failed keep-alive: retried after a jittered backoff, counted as a
    /// failed registration only once the lease may have run out, or at
    /// once when etcd refused (no permission for the lease or the records).
    fn broke(&mut self, held: &mut Held, e: RegistryError, backoff: &mut Backoff) {
        held.unlink(backoff.next_delay());
        if !self.is_registered() || e.is_refusal() {
            return self.lost(e);
        }
        if self.link_trouble.occur(Instant::now().into_std()) {
            tracing::info!(lease = held.id, error = %e, "registry: keep-alive failed; retrying while the lease lasts");
        } else {
            tracing::debug!(lease = held.id, error = %e, "registry: keep-alive retry failed");
        }
    }

    async fn command(&mut self, held: &mut Held, cmd: Option<Command>) -> Result<(), Trouble> {
        match cmd {
            None => Err(Trouble::End(self.revoke(held, None).await)),
            Some(Command::Shutdown(done)) => Err(Trouble::End(self.revoke(held, Some(done)).await)),
            Some(cmd) => {
                self.apply(cmd);
                // Unlinked or lapsed: written once etcd answers again.
                if held.link.is_some() && self.is_registered() {
                    self.flush(&mut held.client, held.id).await?;
                }
                Ok(())
            }
        }
    }

    /// Revoking removes every record of this process at once.
    async fn revoke(&mut self, held: &mut Held, done: Option<oneshot::Sender<()>>) -> Ended {
        if let Err(e) = with_timeout(held.limit, held.client.lease_revoke(held.id)).await {
            tracing::warn!(error = %e, "registry: lease revoke failed; records expire with the TTL");
        }
        Ended::Shutdown(done)
    }
}
