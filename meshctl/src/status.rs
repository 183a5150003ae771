//! `meshctl status` from etcd: every record, and the addresses claimed by
//! more than one (two hosts that advertise one address receive each
//! other's traffic; the registry refuses a second claim of one key, but
//! records of different keys can still name one address).

use std::collections::BTreeMap;

use anyhow::Context;
use registry::{EtcdConfig, InstanceRecord};

pub async fn from_etcd(config: &EtcdConfig, json: bool) -> anyhow::Result<()> {
    let records = registry::etcd::fetch_all(config).await.context("reading the registry from etcd")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&records)?);
    } else {
        print(&records, &config.prefix);
    }
    let conflicts = conflicts(&records);
    for (address, claims) in &conflicts {
        eprintln!("CONFLICT: {address} is claimed by {}", claims.join(", "));
    }
    anyhow::ensure!(conflicts.is_empty(), "{} addresses claimed by more than one record", conflicts.len());
    Ok(())
}

fn print(records: &[InstanceRecord], prefix: &str) {
    let mut service = "";
    for r in records {
        if r.service != service {
            service = &r.service;
            println!("{service}");
        }
        println!(
            "  {:<24} {:<22} host={} zone={} weight={} max_running={} context={} version={}",
            r.instance_id, r.address, r.host, r.zone, r.weight, r.max_running, r.context_length, r.version
        );
    }
    if records.is_empty() {
        println!("no instances registered under {prefix}");
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
