//! `meshctl`: talk to a node (or, later, a sidecar) from the shell.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::{Parser, Subcommand};
use etcd::EtcdArgs;
use mesh_proto::v1::InstancesRequest;
use mesh_proto::v1::generation_client::GenerationClient;
use mesh_proto::v1::sidecar_admin_client::SidecarAdminClient;
use mesh_proto::v1::{
    ChatMessage, ChatMessages, FinishReason, GenerateRequest, ListModelsRequest, SamplingParams,
    generate_request::Input,
};
use registry::{EtcdConfig, EtcdRegistry, InstanceRecord, Registry};

#[derive(Parser)]
#[command(name = "meshctl", version, about = "Operator CLI for the model-serving mesh.")]
struct Cli {
    /// gRPC address of a node or sidecar.
    #[arg(long, env = "MESH_ADDR", default_value = "http://127.0.0.1:50051", global = true)]
    addr: String,
    /// API key for a sidecar with `[[api_keys]]`, sent as `authorization:
    /// Bearer KEY` (`status --sidecar` takes one with `admin = true`).
    #[arg(long, env = "MESH_API_KEY", hide_env_values = true, global = true)]
    api_key: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Stream a completion to stdout (a chat turn by default, or --raw prompt).
    Generate {
        /// What to ask.
        text: String,
        /// Send the text as a raw prompt instead of a chat message.
        #[arg(long)]
        raw: bool,
        #[arg(long)]
        model: Option<String>,
        #[arg(long, default_value_t = 128)]
        max_tokens: u32,
        /// 0 is greedy.
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        #[arg(long)]
        seed: Option<u64>,
    },
    /// List the models a server serves, with their limits.
    Models,
    /// Print the SHA-256 of an API key read from stdin (one line), for a
    /// sidecar's `[[api_keys]]`; never from argv, which other users of the
    /// host can read in the process list and shells keep in history.
    HashKey,
    /// Create a development CA (`ca.pem`, `ca.key`) in DIR.
    CertsCa {
        #[arg(long)]
        out: PathBuf,
    },
    /// Issue a host certificate (`NAME.pem`, `NAME.key`) signed by the CA in --ca-dir.
    CertsIssue {
        #[arg(long)]
        ca_dir: PathBuf,
        #[arg(long)]
        name: String,
        /// IP addresses or DNS names the host is reached by (repeat or comma-separate).
        #[arg(long, value_delimiter = ',', required = true)]
        san: Vec<String>,
        #[arg(long)]
        out: PathBuf,
        /// What the holder is (sidecar, client, node, operator): the role in
        /// its identity `spiffe://mesh/host/<host>/role/<role>`. Default
        /// sidecar, what every mesh host runs.
        #[arg(long, default_value = "sidecar")]
        role: daemon::tls::Role,
        /// The host in its identity (default: --name).
        #[arg(long)]
        host: Option<String>,
        /// Days the certificate is valid (0: already expired, for rehearsing
        /// a rotation); reissue before then (deploy/DEPLOY.md, rotation).
        #[arg(long, default_value_t = 365, value_parser = clap::value_parser!(u32).range(0..=3650))]
        days: u32,
    },
    /// Services, instances and their records, read from etcd (exits 1,
    /// naming them, when two records claim one address); with
    /// `--sidecar`, that sidecar's live view (load, in-flight, ejections).
    Status {
        #[command(flatten)]
        etcd: EtcdArgs,
        /// A sidecar's outbound address, e.g. http://127.0.0.1:7100.
        #[arg(long)]
        sidecar: Option<String>,
        /// Print JSON (one array of records) for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Register an instance in etcd under a lease until stopped (SIGTERM or
    /// Ctrl-C revokes it; if killed, the record expires with the lease).
    Register {
        #[command(flatten)]
        etcd: EtcdArgs,
        #[arg(long)]
        service: String,
        #[arg(long)]
        instance: String,
        /// Where callers reach the instance (host:port).
        #[arg(long)]
        address: String,
        #[arg(long, default_value_t = 1)]
        weight: u32,
    },
    /// Turn on etcd's auth for the mesh: a `root` user, and a user and role
    /// that may read and write only under the prefix.
    EtcdEnableAuth(etcd::EnableAuth),
    /// Run the autoscale controller: activate standby instances of busy
    /// services and return them when idle (one leads per cluster).
    Autoscale(autoscale::AutoscaleArgs),
    /// Put an instance on standby (not routed to) or activate it, by its
    /// decision key in etcd, which its sidecar follows.
    Standby(standby::StandbyArgs),
}

mod autoscale;
mod certs;
mod etcd;
mod standby;
mod status;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let connect = || async {
        GenerationClient::connect(cli.addr.clone()).await.with_context(|| format!("connecting to {}", cli.addr))
    };
    match cli.command {
        Command::HashKey => println!("{}", mesh_proto::api_key::digest(&key_from_stdin()?)),
        Command::CertsCa { ref out } => {
            certs::create_ca(out)?;
            println!("wrote {0}/ca.pem and {0}/ca.key", out.display());
        }
        Command::CertsIssue { ref ca_dir, ref name, ref san, ref out, role, ref host, days } => {
            let id = daemon::tls::WorkloadId::new(host.as_deref().unwrap_or(name), role)
                .map_err(|e| anyhow::anyhow!("--host (default --name): {e}"))?;
            certs::issue(ca_dir, name, &id, san, out, days)?;
            println!("wrote {0}/{name}.pem and {0}/{name}.key for {id}", out.display());
        }
        Command::Status { ref sidecar, json, .. } if sidecar.is_some() => {
            sidecar_status(sidecar.as_deref().unwrap_or_default(), cli.api_key.as_deref(), json).await?
        }
        Command::Status { ref etcd, json, .. } => status::from_etcd(&etcd.config(), json).await?,
        Command::Register { ref etcd, ref service, ref instance, ref address, weight } => {
            let mut rec = InstanceRecord::new(service, instance, address);
            rec.weight = weight;
            register(etcd.config(), rec).await?
        }
        Command::EtcdEnableAuth(ref args) => etcd::enable_auth(args).await?,
        Command::Autoscale(args) => {
            tracing_subscriber::fmt().with_writer(std::io::stderr).with_env_filter(log_filter()).init();
            autoscale::run(args).await?
        }
        Command::Standby(ref args) => standby::run(args).await?,
        Command::Models => {
            let mut client = connect().await?;
            let request = keyed(ListModelsRequest {}, cli.api_key.as_deref())?;
            for m in client.list_models(request).await?.into_inner().models {
                println!(
                    "{}\tbackend={} context={} max_running={} max_queued={} max_kv_tokens={}",
                    m.name, m.backend, m.context_length, m.max_running, m.max_queued, m.max_kv_tokens
                );
            }
        }
        Command::Generate { ref text, raw, ref model, max_tokens, temperature, seed } => {
            let mut client = connect().await?;
            let (text, model) = (text.clone(), model.clone());
            let input = match raw {
                true => Input::Prompt(text),
                false => {
                    Input::Chat(ChatMessages { messages: vec![ChatMessage { role: "user".into(), content: text }] })
                }
            };
            let req = GenerateRequest {
                model: model.unwrap_or_default(),
                input: Some(input),
                sampling: Some(SamplingParams { max_tokens, temperature, seed, ..Default::default() }),
                ..Default::default()
            };
            let started = Instant::now();
            let mut stream = client.generate(keyed(req, cli.api_key.as_deref())?).await?.into_inner();
            let mut stdout = std::io::stdout();
            while let Some(msg) = stream.message().await? {
                write!(stdout, "{}", msg.text)?;
                stdout.flush()?;
                if let Some(u) = msg.usage {
                    let reason = FinishReason::try_from(msg.finish_reason).map_or("?", |r| r.as_str_name());
                    eprintln!(
                        "\n[{reason}] prompt {} tokens ({} cached), completion {} tokens, ttft {:.1} ms, total {:.1} ms",
                        u.prompt_tokens,
                        u.cached_prompt_tokens,
                        u.completion_tokens,
                        u.time_to_first_token_us as f64 / 1e3,
                        started.elapsed().as_secs_f64() * 1e3
                    );
                }
            }
        }
    }
    Ok(())
}

async fn register(config: EtcdConfig, record: InstanceRecord) -> anyhow::Result<()> {
    let registry = EtcdRegistry::start(config)?;
    registry.register(record).await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    registry.shutdown().await?;
    Ok(())
}

/// `message` with the API key, if any, as `authorization: Bearer KEY`.
fn keyed<T>(message: T, api_key: Option<&str>) -> anyhow::Result<tonic::Request<T>> {
    let mut request = tonic::Request::new(message);
    if let Some(key) = api_key {
        let value = format!("Bearer {key}").parse().context("--api-key: not a valid header value")?;
        request.metadata_mut().insert("authorization", value);
    }
    Ok(request)
}

async fn sidecar_status(addr: &str, api_key: Option<&str>, json: bool) -> anyhow::Result<()> {
    let mut admin =
        SidecarAdminClient::connect(addr.to_string()).await.with_context(|| format!("connecting to {addr}"))?;
    let view = admin.instances(keyed(InstancesRequest {}, api_key)?).await?.into_inner();
    if json {
        let rows: Vec<serde_json::Value> = view
            .instances
            .iter()
            .map(|i| {
                serde_json::json!({
                    "service": i.service, "instance_id": i.instance_id, "address": i.address,
                    "weight": i.weight, "in_flight": i.in_flight, "ewma_ttft_ms": i.ewma_ttft_ms,
                    "reported_queued": i.reported_queued, "ejected": i.ejected,
                    "ejected_reason": i.ejected_reason, "ejected_for_ms": i.ejected_for_ms,
                })
            })
            .collect();
        let out = serde_json::json!({ "etcd_reachable": view.etcd_reachable, "instances": rows });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    if !view.etcd_reachable {
        println!("etcd unreachable: routing on the last view");
    }
    for i in &view.instances {
        let state = match (i.ejected, i.ejected_reason.is_empty()) {
            (true, _) => format!("EJECTED {} ms: {}", i.ejected_for_ms, i.ejected_reason),
            (false, false) => i.ejected_reason.clone(),
            (false, true) => "ok".into(),
        };
        println!(
            "{:<12} {:<22} in_flight={:<3} queued={:<3} ttft={:>7.1}ms weight={} {state}",
            i.service, i.instance_id, i.in_flight, i.reported_queued, i.ewma_ttft_ms, i.weight
        );
    }
    Ok(())
}

/// `RUST_LOG`, else info.
fn log_filter() -> tracing_subscriber::EnvFilter {
    tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into())
}

/// The first line of stdin, trimmed; refused when empty.
fn key_from_stdin() -> anyhow::Result<String> {
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).context("reading the key from stdin")?;
    let key = line.trim();
    anyhow::ensure!(!key.is_empty(), "no key on stdin: run `printf %s KEY | meshctl hash-key`");
    Ok(key.to_string())
}
