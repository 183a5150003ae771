//! `meshctl status` from etcd: every record, and the addresses claimed by
//! more than one (two hosts that advertise one address receive each
//! other's traffic; the registry refuses a second claim of one key, but
//! records of different keys can still name one address).

use std::collections::BTreeMap;

use anyhow::Context;
use registry::signals::{load_key, mode_key};
use registry::{EtcdConfig, InstanceRecord, LoadReport};

use crate::autoscale::{ServiceStatus, leader_key, status_prefix};

/// Everything under the mesh's prefix, read at once.
type Keys = BTreeMap<String, Vec<u8>>;

pub async fn from_etcd(config: &EtcdConfig, json: bool) -> anyhow::Result<()> {
    let mut client = config.connect().await.context("reading the registry from etcd")?;
    let all = client.get(config.prefix.as_str(), Some(registry::etcd::GetOptions::new().with_prefix())).await?;
    let keys: Keys =
        all.kvs().iter().map(|kv| (String::from_utf8_lossy(kv.key()).into_owned(), kv.value().to_vec())).collect();
    let services = registry::services_prefix(&config.prefix);
    let records: Vec<InstanceRecord> =
        keys.iter().filter(|(k, _)| k.starts_with(&services)).filter_map(|(_, v)| InstanceRecord::decode(v)).collect();
    if json {
        println!("{}", serde_json::to_string_pretty(&records)?);
    } else {
        print(&records, &config.prefix, &keys);
        print_autoscale(&config.prefix, &keys);
    }
    let conflicts = conflicts(&records);
    for (address, claims) in &conflicts {
        eprintln!("CONFLICT: {address} is claimed by {}", claims.join(", "));
    }
    anyhow::ensure!(conflicts.is_empty(), "{} addresses claimed by more than one record", conflicts.len());
    Ok(())
}

fn print(records: &[InstanceRecord], prefix: &str, keys: &Keys) {
    let mut service = "";
    for r in records {
        if r.service != service {
            service = &r.service;
            println!("{service}");
        }
        println!(
            "  {:<24} {:<22} {} host={} zone={} weight={} max_running={} context={} version={}{}",
            r.instance_id,
            r.address,
            state(r, prefix, keys),
            r.host,
            r.zone,
            r.weight,
            r.max_running,
            r.context_length,
            r.version,
            load(r, prefix, keys)
        );
    }
    if records.is_empty() {
        println!("no instances registered under {prefix}");
    }
}

/// `active`, `STANDBY`, with `(spare)` and who decided when not the config.
fn state(r: &InstanceRecord, prefix: &str, keys: &Keys) -> String {
    let mut s = if r.standby { "STANDBY".to_string() } else { "active".to_string() };
    if r.spare {
        s.push_str(" (spare)");
    }
    if keys.contains_key(&mode_key(prefix, &r.service, &r.instance_id)) {
        s.push_str(" [decided]");
    }
    s
}

fn load(r: &InstanceRecord, prefix: &str, keys: &Keys) -> String {
    match keys.get(&load_key(prefix, &r.service, &r.instance_id)).and_then(|v| LoadReport::decode(v)) {
        Some(l) => format!(" running={} queued={} utilisation={:.2}", l.running, l.queued, l.utilisation()),
        None => String::new(),
    }
}

/// The controller leading now, and its last decision per service.
fn print_autoscale(prefix: &str, keys: &Keys) {
    let statuses = status_prefix(prefix);
    let decided: Vec<(&str, ServiceStatus)> =
        keys.iter().filter_map(|(k, v)| Some((k.strip_prefix(&statuses)?, ServiceStatus::decode(v)?))).collect();
    let leader = keys.get(&leader_key(prefix)).map(|v| String::from_utf8_lossy(v).into_owned());
    if leader.is_none() && decided.is_empty() {
        return;
    }
    println!("autoscale: {}", leader.map_or("no controller leading".into(), |l| format!("leader {l}")));
    for (service, s) in decided {
        println!(
            "  {service}: {} activations, {} returns, {} hook-only; last: {} {} ({}, utilisation {:.2}) at {} ms",
            s.activations,
            s.returns,
            s.hook_only,
            s.last_action,
            s.last_instance,
            s.last_reason,
            s.utilisation,
            s.last_at_ms
        );
    }
}

/// Addresses named by more than one record, each with its claimants
/// (`service/instance (host)`).
fn conflicts(records: &[InstanceRecord]) -> Vec<(String, Vec<String>)> {
    let mut by_address: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for r in records {
        let claim = format!("{}/{} (host {})", r.service, r.instance_id, r.host);
        by_address.entry(r.address.as_str()).or_default().push(claim);
    }
    by_address.into_iter().filter(|(_, c)| c.len() > 1).map(|(a, c)| (a.to_string(), c)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_records_naming_one_address_are_a_conflict() {
        let mut a = InstanceRecord::new("chat", "gpu-1", "10.77.0.11:7101");
        a.host = "gpu-1".into();
        let mut b = InstanceRecord::new("chat", "gpu-2", "10.77.0.11:7101");
        b.host = "gpu-2".into();
        let c = InstanceRecord::new("chat", "10.77.0.12:7101", "10.77.0.12:7101");
        assert!(conflicts(&[a.clone(), c.clone()]).is_empty());
        let found = conflicts(&[a, b, c]);
        assert_eq!(
            found,
            vec![(
                "10.77.0.11:7101".to_string(),
                vec!["chat/gpu-1 (host gpu-1)".into(), "chat/gpu-2 (host gpu-2)".into()]
            )]
        );
    }
}
