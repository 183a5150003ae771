//! `meshctl standby`: an operator's standby decision for one instance,
//! written where the controller writes its own (`registry::signals`); the
//! instance's sidecar follows it within a moment. The controller may later
//! decide again for a spare; other instances only an operator moves.

use anyhow::Context;
use registry::signals::mode_key;
use registry::{InstanceRecord, Mode};

use crate::etcd::EtcdArgs;

#[derive(clap::Args)]
pub struct StandbyArgs {
    #[command(flatten)]
    etcd: EtcdArgs,
    #[arg(long)]
    service: String,
    /// The instance id (`meshctl status` lists them).
    #[arg(long)]
    instance: String,
    /// `standby` (stop routing to it), `active` (route to it), or `clear`
    /// (drop the decision: the sidecar's `[node] standby` holds again).
    #[arg(value_parser = ["standby", "active", "clear"])]
    decision: String,
}

pub async fn run(args: &StandbyArgs) -> anyhow::Result<()> {
    let config = args.etcd.config();
    let records = registry::etcd::fetch_all(&config).await.context("reading the registry from etcd")?;
    let known = records.iter().any(|r: &InstanceRecord| r.service == args.service && r.instance_id == args.instance);
    if !known {
        eprintln!("warning: {}/{} is not registered now; the decision waits for it", args.service, args.instance);
    }
    let key = mode_key(&config.prefix, &args.service, &args.instance);
    let mut client = config.connect().await?;
    match args.decision.as_str() {
        "clear" => _ = client.delete(key.as_str(), None).await?,
        "active" => _ = client.put(key.as_str(), Mode::Active.as_str(), None).await?,
        _ => _ = client.put(key.as_str(), Mode::Standby.as_str(), None).await?,
    }
    println!("{}/{}: {}", args.service, args.instance, args.decision);
    Ok(())
}
