//! Writing one record under this process's lease without ever taking a
//! key another live lease holds. The key is the instance id (the advertise
//! address), so two hosts that advertise one address would otherwise
//! overwrite each other's record in turn and each receive the other's
//! traffic; the second is refused instead, and says why.

use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, PutOptions, Txn, TxnOp, TxnOpResponse};

use super::with_timeout;
use crate::{InstanceRecord, RegistryError};

/// Writes `rec` at `key` under `lease`: created when absent, rewritten when
/// this lease holds it with another value, left alone when it already holds
/// exactly this (a retried write costs no event to every watcher), refused
/// when another lease holds it (it frees when that lease is revoked or
/// expires, e.g. a crashed predecessor's within its TTL).
pub async fn claim(
    client: &mut Client,
    key: &str,
    rec: &InstanceRecord,
    lease: i64,
    limit: Duration,
) -> Result<(), RegistryError> {
    let value = rec.encode();
    let put = || TxnOp::put(key, value.clone(), Some(PutOptions::new().with_lease(lease)));
    let create = Txn::new()
        .when([Compare::version(key, CompareOp::Equal, 0)])
        .and_then([put()])
        .or_else([TxnOp::get(key, None)]);
    let resp = with_timeout(limit, client.txn(create)).await?;
    if resp.succeeded() {
        return Ok(());
    }
    let held = resp.op_responses().into_iter().find_map(|r| match r {
        TxnOpResponse::Get(g) => g.kvs().first().map(|kv| (kv.lease(), kv.value() == value.as_bytes())),
        _ => None,
    });
    match held {
        Some((holder, true)) if holder == lease => Ok(()),
        Some((holder, _)) if holder != lease => Err(RegistryError::Claimed { key: key.into(), lease: holder }),
        // Ours with another value, or gone since: write it if still so.
        _ => {
            let ours = Compare::lease(key, CompareOp::Equal, lease);
            let absent = Compare::version(key, CompareOp::Equal, 0);
            let rewrite = Txn::new().when([ours]).and_then([put()]);
            let written = with_timeout(limit, client.txn(rewrite)).await?.succeeded()
                || with_timeout(limit, client.txn(Txn::new().when([absent]).and_then([put()]))).await?.succeeded();
            match written {
                true => Ok(()),
                false => Err(RegistryError::Claimed { key: key.into(), lease: 0 }),
            }
        }
    }
}
