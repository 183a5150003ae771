//! `mesh-bench up`: a local mesh that stays up for a person or a script:
//! etcd, nodes each behind their sidecar, and a client sidecar, the same
//! processes a scenario starts. Once the client sidecar routes to every
//! node it prints one JSON line on stdout, then runs until SIGINT or
//! SIGTERM and takes every process down with it:
//!
//! `{"event":"ready","role":"mesh","service":"chat","etcd":"http://127.0.0.1:2379","addresses":{"outbound":"127.0.0.1:4000","http":"127.0.0.1:4003"},"nodes":[{"grpc":"127.0.0.1:4001","sidecar_inbound":"127.0.0.1:4002"}]}`
//!
//! `addresses.outbound` is where gRPC clients send (the client sidecar),
//! `addresses.http` where OpenAI-API clients do (its HTTP edge).

use std::io::Write;

use anyhow::Context;
use tokio::signal::unix::{SignalKind, signal};

use crate::scenario::mesh::{Mesh, MeshArgs};
use crate::scenario::nodes::{NodeArgs, NodeSet};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub nodes: NodeArgs,
    #[command(flatten)]
    pub mesh: MeshArgs,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let mut interrupt = signal(SignalKind::interrupt()).context("listening for SIGINT")?;
    let mut terminate = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
    let start = async {
        let nodes = NodeSet::start(&args.nodes, args.nodes.nodes.unwrap_or(1)).await?;
        Mesh::start_with_edge(&args.mesh, nodes).await
    };
    // A signal while starting drops the half-started mesh, which kills
    // what it started (kill_on_drop), as does one once it is up.
    let mesh = tokio::select! {
        mesh = start => mesh?,
        _ = interrupt.recv() => anyhow::bail!("interrupted while starting; its processes were stopped"),
        _ = terminate.recv() => anyhow::bail!("terminated while starting; its processes were stopped"),
    };
    announce(&mesh)?;
    tokio::select! {
        _ = interrupt.recv() => {}
        _ = terminate.recv() => {}
    }
    drop(mesh);
    Ok(())
}

fn ready_line(mesh: &Mesh) -> anyhow::Result<serde_json::Value> {
    let nodes = (0..mesh.nodes.len())
        .map(|i| {
            let inbound = mesh.node_sidecars.get(i).and_then(|s| s.inbound).map(|a| a.to_string());
            Ok(serde_json::json!({ "grpc": mesh.nodes.addr(i)?.to_string(), "sidecar_inbound": inbound }))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(serde_json::json!({
        "event": "ready",
        "role": "mesh",
        "service": mesh.service,
        "etcd": mesh.etcd.url(),
        "addresses": { "outbound": mesh.client.outbound.to_string(), "http": mesh.client.http.map(|a| a.to_string()) },
        "nodes": nodes,
    }))
}

/// The ready line on stdout, flushed: a script reading it may be blocked on it.
fn announce(mesh: &Mesh) -> anyhow::Result<()> {
    let line = ready_line(mesh)?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").and_then(|()| out.flush()).context("writing the ready line")
}
