//! One controller per cluster: a lease of this process, and the leader key
//! `{prefix}autoscale/leader` created under it only while absent. The key
//! goes with the lease (a killed controller's within one TTL), and a
//! waiting controller, watching the key, takes over at once. Every write
//! the leader makes is a transaction conditional on the leader key still
//! being the one it created: a controller that lost its lease (paused,
//! cut off) is refused by etcd itself, so it never acts without it.

use std::time::Duration;

use anyhow::{Context, bail};
use etcd_client::{Client, Compare, CompareOp, EventType, PutOptions, Txn, TxnOp, WatchOptions};
use registry::EtcdConfig;
use tokio::task::JoinHandle;

pub fn leader_key(prefix: &str) -> String {
    format!("{prefix}autoscale/leader")
}

/// This controller's lease.
pub struct Session {
    pub client: Client,
    pub lease: i64,
}

/// The task keeping the lease alive, stopped when dropped.
pub struct Keeper(JoinHandle<anyhow::Error>);

impl Drop for Keeper {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Keeper {
    /// Resolves when the lease can no longer be kept, with why.
    pub async fn lost(&mut self) -> anyhow::Error {
        match (&mut self.0).await {
            Ok(e) => e,
            Err(e) => anyhow::anyhow!("keep-alive task: {e}"),
        }
    }
}

/// The leadership held: writes go through [`Lead::write`].
pub struct Lead {
    key: String,
    revision: i64,
}

impl Session {
    pub async fn open(config: &EtcdConfig) -> anyhow::Result<(Session, Keeper)> {
        let mut client = config.connect().await?;
        let ttl = config.lease_ttl.as_secs().max(1) as i64;
        let lease = client.lease_grant(ttl, None).await?.id();
        let (mut keeper, mut replies) = client.lease_keep_alive(lease).await?;
        let ttl = Duration::from_secs(ttl as u64);
        let keeper = tokio::spawn(async move {
            // A slow answer is waited for until the TTL since the last one
            // runs out: only then may the lease be gone.
            let mut answered = tokio::time::Instant::now();
            loop {
                if let Err(e) = keeper.keep_alive().await {
                    return e.into();
                }
                match tokio::time::timeout(ttl / 3, replies.message()).await {
                    Ok(Ok(Some(r))) if r.ttl() > 0 => answered = tokio::time::Instant::now(),
                    Ok(Ok(Some(_))) => return anyhow::anyhow!("the lease expired"),
                    Ok(Err(e)) => return e.into(),
                    Ok(Ok(None)) => return anyhow::anyhow!("the keep-alive stream ended"),
                    Err(_) if answered.elapsed() >= ttl => {
                        return anyhow::anyhow!("keep-alives unanswered for {ttl:?}");
                    }
                    Err(_) => {}
                }
                tokio::time::sleep(ttl / 3).await;
            }
        });
        Ok((Session { client, lease }, Keeper(keeper)))
    }

    /// Waits until this session leads: creates the leader key if absent,
    /// else waits for it to be deleted and tries again.
    pub async fn campaign(&mut self, prefix: &str, id: &str) -> anyhow::Result<Lead> {
        let key = leader_key(prefix);
        loop {
            let put = TxnOp::put(key.as_str(), id, Some(PutOptions::new().with_lease(self.lease)));
            let create = Txn::new()
                .when([Compare::version(key.as_str(), CompareOp::Equal, 0)])
                .and_then([put])
                .or_else([TxnOp::get(key.as_str(), None)]);
            let resp = self.client.txn(create).await?;
            let revision = resp.header().context("etcd answered without a header")?.revision();
            if resp.succeeded() {
                return Ok(Lead { key, revision });
            }
            self.wait_deleted(&key, revision + 1).await?;
        }
    }

    async fn wait_deleted(&mut self, key: &str, from: i64) -> anyhow::Result<()> {
        let opts = WatchOptions::new().with_start_revision(from);
        let mut stream = self.client.watch(key, Some(opts)).await?;
        while let Some(resp) = stream.message().await? {
            if resp.events().iter().any(|e| e.event_type() == EventType::Delete) {
                return Ok(());
            }
        }
        bail!("the watch of {key} ended")
    }
}

impl Lead {
    /// Carries out `ops` only while this is still the leader key etcd holds.
    pub async fn write(&self, client: &mut Client, ops: Vec<TxnOp>) -> anyhow::Result<()> {
        let held = Compare::create_revision(self.key.as_str(), CompareOp::Equal, self.revision);
        if !client.txn(Txn::new().when([held]).and_then(ops)).await?.succeeded() {
            bail!("no longer the leader: {} is gone or another controller's", self.key);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_deposed_leader_cannot_write_and_the_next_one_can() {
        let etcd = harness::Etcd::start("etcd".as_ref()).await.expect("etcd (scripts/setup.sh installs it)");
        let mut config = EtcdConfig::new(vec![etcd.url()]);
        config.lease_ttl = Duration::from_secs(30);
        let (mut first, _keeper) = Session::open(&config).await.unwrap();
        let lead = first.campaign(&config.prefix, "first").await.unwrap();
        let put = |v: &str| vec![TxnOp::put("/mesh/v1/standby/chat/a", v, None)];
        lead.write(&mut first.client, put("active")).await.unwrap();

        // The first's lease ends (as when it is paused past its TTL): the
        // second leads, and the first's writes are refused by etcd.
        let (mut second, _kept) = Session::open(&config).await.unwrap();
        first.client.lease_revoke(first.lease).await.unwrap();
        let next = second.campaign(&config.prefix, "second").await.unwrap();
        let refused = lead.write(&mut first.client, put("standby")).await.unwrap_err();
        assert!(refused.to_string().contains("no longer the leader"), "{refused}");
        next.write(&mut second.client, put("standby")).await.unwrap();
        let value = second.client.get("/mesh/v1/standby/chat/a", None).await.unwrap();
        assert_eq!(value.kvs()[0].value(), b"standby");
        assert_eq!(second.client.get(leader_key(&config.prefix), None).await.unwrap().kvs()[0].value(), b"second");
    }
}
