//! The node's configuration: flags, each with an environment override.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, ValueEnum};

use crate::device::{DeviceChoice, DeviceSetting};
use crate::model::qgemm::Kernel;
use crate::scheduler::Limits;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendKind {
    /// A llama-architecture GGUF file (`--model`).
    Gguf,
    /// Deterministic words at `--synthetic-tokens-per-sec`, no weights.
    Synthetic,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Switch {
    On,
    Off,
}

#[derive(Debug, Clone, Parser)]
#[command(name = "mesh-node", version, about = "Serves one LLM over gRPC with continuous batching.")]
pub struct NodeConfig {
    /// Address to serve gRPC on; port 0 picks a free port (logged at start).
    #[arg(long, env = "MESH_NODE_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,

    #[arg(long, env = "MESH_NODE_BACKEND", value_enum, default_value = "gguf")]
    pub backend: BackendKind,

    /// Path of the GGUF model file (gguf backend).
    #[arg(long, env = "MESH_NODE_MODEL")]
    pub model: Option<PathBuf>,

    /// Name callers use for the model; defaults to the file stem, or "synthetic".
    #[arg(long, env = "MESH_NODE_MODEL_NAME")]
    pub model_name: Option<String>,

    /// Sequences decoded together in one step.
    #[arg(long, env = "MESH_NODE_MAX_RUNNING", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=MAX_COUNT))]
    pub max_running: u32,

    /// Admitted requests that may wait for a running slot.
    #[arg(long, env = "MESH_NODE_MAX_QUEUED", default_value_t = 128, value_parser = clap::value_parser!(u32).range(0..=MAX_COUNT))]
    pub max_queued: u32,

    /// KV-cache tokens (prompt + max_tokens of every admitted request) the node commits at most.
    #[arg(long, env = "MESH_NODE_MAX_KV_TOKENS", default_value_t = 65_536, value_parser = clap::value_parser!(u64).range(1..=MAX_TOKENS))]
    pub max_kv_tokens: u64,

    /// Prompt tokens prefilled per step, so running streams keep streaming during long prompts.
    #[arg(long, env = "MESH_NODE_MAX_STEP_TOKENS", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=MAX_COUNT))]
    pub max_step_tokens: u32,

    /// Longest a request may wait in the node before its prompt starts being
    /// read: one the queue ahead would hold longer (or past its gRPC
    /// deadline) is refused at admission, one that has waited this long is
    /// ended, both with RESOURCE_EXHAUSTED and `retry-after-ms`. 3 s: under
    /// the sidecar's 10 s `routing.attempt_timeout` even after its inbound
    /// bulkhead's 5 s `max_queue_wait`, so a saturated node answers "busy"
    /// while the caller still has time to go elsewhere, and is never timed
    /// out and charged as a failing instance.
    #[arg(long, env = "MESH_NODE_MAX_QUEUE_WAIT", default_value = "3s", value_parser = queue_wait)]
    pub max_queue_wait: Duration,

    /// max_tokens for requests that leave it 0.
    #[arg(long, env = "MESH_NODE_DEFAULT_MAX_TOKENS", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=MAX_COUNT))]
    pub default_max_tokens: u32,

    /// Context length cap; defaults to the model's own.
    #[arg(long, env = "MESH_NODE_CONTEXT_LENGTH", value_parser = clap::value_parser!(u32).range(1..=MAX_COUNT))]
    pub context_length: Option<u32>,

    /// On SIGTERM, how long in-flight streams may run before they are cancelled:
    /// a duration with its unit, as `30s`, `500ms` or `1m 30s` (a bare number is
    /// refused: say the unit).
    #[arg(long, env = "MESH_NODE_DRAIN_GRACE", default_value = "30s", value_parser = drain_grace)]
    pub drain_grace: Duration,

    /// Keep the keys and values of computed prompt blocks (32 tokens) for
    /// later requests that start with the same tokens, in the
    /// --max-kv-tokens budget (idle blocks are evicted, least recently used
    /// first, when a request needs their room). Not the synthetic backend.
    #[arg(long, env = "MESH_NODE_PREFIX_CACHE", value_enum, default_value = "on")]
    pub prefix_cache: Switch,

    /// Tokens per second per stream of the synthetic backend.
    #[arg(long, env = "MESH_NODE_SYNTHETIC_TOKENS_PER_SEC", default_value_t = 50.0, value_parser = tokens_per_sec)]
    pub synthetic_tokens_per_sec: f64,

    /// For fault-isolation tests only: the synthetic backend panics in any
    /// step that reads a prompt containing these words (matched as the
    /// synthetic word ids, so use several words).
    #[arg(long, env = "MESH_NODE_SYNTHETIC_PANIC_MARKER")]
    pub synthetic_panic_marker: Option<String>,

    /// Serve Prometheus metrics on this address (`/metrics`); port 0 picks one (logged).
    #[arg(long, env = "MESH_NODE_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// A file holding the bearer token scrapes of `/metrics` must send
    /// (without it, keep --metrics-listen on loopback).
    #[arg(long, env = "MESH_NODE_METRICS_TOKEN_FILE", requires = "metrics_listen")]
    pub metrics_token_file: Option<PathBuf>,

    #[command(flatten)]
    pub trace: telemetry::TraceArgs,

    /// Serve over TLS with this certificate (PEM); needs --tls-key.
    #[arg(long, env = "MESH_NODE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    #[arg(long, env = "MESH_NODE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (PEM): only the mesh's
    /// sidecars may call.
    #[arg(long, env = "MESH_NODE_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// Serve only this identity (`spiffe://mesh/host/<host>/role/sidecar`:
    /// the node's own sidecar); repeatable; others get PERMISSION_DENIED.
    /// Without it, any certificate from --tls-client-ca is served.
    #[arg(
        long = "tls-allow-peer",
        env = "MESH_NODE_TLS_ALLOW_PEER",
        value_delimiter = ',',
        requires = "tls_client_ca"
    )]
    pub tls_allow_peer: Vec<daemon::tls::PeerPattern>,

    /// Serve callers off loopback without mutual TLS (plaintext, or TLS
    /// without --tls-client-ca): on a network trusted end to end only; the
    /// node logs a warning at start. Without it, such a --listen is refused.
    #[arg(long, env = "MESH_NODE_INSECURE_ANYWHERE")]
    pub insecure_anywhere: bool,

    /// On a GPU, run every step op by op instead of replaying decode steps
    /// recorded as CUDA graphs (one recording per batch size, made at its
    /// first step): for comparison, or if a driver misbehaves with graphs.
    #[arg(long, env = "MESH_NODE_EAGER")]
    pub eager: bool,

    /// Matmul kernel for the CPU; defaults to the fastest this CPU supports
    /// (avx512, then avx2, then scalar). Forcing one the CPU lacks is an error.
    #[arg(long, env = "MESH_NODE_KERNEL", value_enum)]
    pub kernel: Option<Kernel>,

    /// Where the model runs: `cpu`, or `cuda:N` for CUDA device N (needs
    /// the CUDA build, scripts/build-cuda.sh). Without it, the CPU; the start
    /// log names the device either way. A node told `cuda:N` never falls
    /// back to the CPU: a build without CUDA, or a device that cannot be
    /// opened, stops it at start, before the model is read.
    #[arg(long, env = "MESH_NODE_DEVICE", value_parser = device_choice)]
    pub device: Option<DeviceChoice>,

    /// Deprecated: `--device cuda:N` (same rules; warned at start).
    #[arg(long, env = "MESH_NODE_CUDA_DEVICE", hide = true)]
    pub cuda_device: Option<usize>,

    /// How the device settings were given (flag or environment), for
    /// errors that name the line to change; set by `from_matches`.
    #[arg(skip)]
    pub sources: DeviceSources,
}

/// Whether `--device` and `--cuda-device` came from the command line or
/// the environment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceSources {
    pub device_from_env: bool,
    pub cuda_device_from_env: bool,
}

impl NodeConfig {
    /// Parses the process's flags and environment (exiting on errors, as
    /// clap does), noting where the device settings came from.
    pub fn from_process() -> Self {
        let matches = Self::command().get_matches();
        Self::from_matches(&matches).unwrap_or_else(|e| e.exit())
    }

    pub fn from_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        let mut cfg = Self::from_arg_matches(matches)?;
        let from_env = |id| matches.value_source(id) == Some(ValueSource::EnvVariable);
        cfg.sources =
            DeviceSources { device_from_env: from_env("device"), cuda_device_from_env: from_env("cuda_device") };
        Ok(cfg)
    }

    /// The device the model runs on, and the setting that chose it, with a
    /// warning for the deprecated `--cuda-device`. `--device` and
    /// `--cuda-device` together must agree.
    pub fn device_setting(&self) -> Result<(DeviceSetting, Option<String>), String> {
        let said = |from_env: bool, flag: &str, var: &str, value: &dyn std::fmt::Display| match from_env {
            true => format!("{var}={value}"),
            false => format!("{flag} {value}"),
        };
        let device = self.device.map(|d| (d, said(self.sources.device_from_env, "--device", "MESH_NODE_DEVICE", &d)));
        let alias = self.cuda_device.map(|n| {
            let old = said(self.sources.cuda_device_from_env, "--cuda-device", "MESH_NODE_CUDA_DEVICE", &n);
            (DeviceChoice::Cuda(n), old)
        });
        match (device, alias) {
            (None, None) => Ok((DeviceSetting::default_cpu(), None)),
            (Some((choice, said_by)), None) => Ok((DeviceSetting { choice, said_by }, None)),
            (device, Some((choice, old))) => {
                if let Some((other, said_by)) = &device
                    && *other != choice
                {
                    return Err(format!("{said_by} and {old} disagree; drop {old} (deprecated)"));
                }
                let warning = format!("{old} is deprecated: say MESH_NODE_DEVICE={choice} (or --device {choice})");
                let said_by = device.map_or(old, |(_, said_by)| said_by);
                Ok((DeviceSetting { choice, said_by }, Some(warning)))
            }
        }
    }

    /// Whether callers who are not this host's must prove a mesh identity:
    /// `Err` when they need not and `--insecure-anywhere` was not given,
    /// `Ok(Some(warning))` when it was.
    pub fn exposure(&self) -> Result<Option<String>, String> {
        let open = match (&self.tls_cert, &self.tls_client_ca) {
            (None, _) => "plaintext",
            (Some(_), None) => "TLS without client certificates (--tls-client-ca)",
            (Some(_), Some(_)) => return Ok(None),
        };
        if self.listen.ip().is_loopback() {
            return Ok(None);
        }
        let problem = format!("--listen {} is not a loopback address and serves {open}", self.listen);
        match self.insecure_anywhere {
            true => Ok(Some(format!("{problem}: anyone who reaches it may call (--insecure-anywhere)"))),
            false => Err(format!("{problem}; add --tls-cert, --tls-key and --tls-client-ca, or --insecure-anywhere")),
        }
    }

    pub fn limits(&self, model_context: usize) -> Limits {
        let context_length = self.context_length.map_or(model_context, |c| (c as usize).min(model_context));
        Limits {
            max_running: self.max_running as usize,
            max_queued: self.max_queued as usize,
            max_kv_tokens: self.max_kv_tokens as usize,
            max_step_tokens: self.max_step_tokens as usize,
            context_length,
            max_queue_wait: self.max_queue_wait,
            prefix_cache: self.prefix_cache == Switch::On,
        }
    }
}

/// A duration as humantime writes it (`30s`, `500ms`, `1m 30s`): the one way
/// every mesh flag and config file says a duration.
fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (a duration like 30s, 500ms or 1m 30s)"))
}

/// Every flag is range-checked when parsed (clap then exits 2 naming the
/// flag), so no value reaches arithmetic that would overflow or panic: a
/// deadline `Instant + Duration`, a `Duration` from float seconds.
///
/// Counts (sequences, queued requests, tokens per step or request, context
/// length): 1 Mi, beyond any one node's memory.
const MAX_COUNT: i64 = 1 << 20;
/// KV tokens committed: 4 Gi, beyond any one node's memory.
const MAX_TOKENS: u64 = 1 << 32;
/// The longest `--max-queue-wait`: one hour, past any caller's patience.
const MAX_QUEUE_WAIT: Duration = Duration::from_secs(3600);
/// The longest `--drain-grace`: one day, past any deploy's stop timeout.
const MAX_DRAIN_GRACE: Duration = Duration::from_secs(24 * 3600);
/// Synthetic tokens per second per stream: a token per 1000 s to a token per µs.
const TOKENS_PER_SEC: std::ops::RangeInclusive<f64> = 0.001..=1_000_000.0;

fn duration_within(s: &str, min: Duration, max: Duration) -> Result<Duration, String> {
    let d = duration(s)?;
    if d < min || d > max {
        let show = |d| humantime::format_duration(d).to_string();
        return Err(format!("{s:?} is out of range: from {} to {}", show(min), show(max)));
    }
    Ok(d)
}

fn queue_wait(s: &str) -> Result<Duration, String> {
    duration_within(s, Duration::from_millis(1), MAX_QUEUE_WAIT)
}

fn drain_grace(s: &str) -> Result<Duration, String> {
    duration_within(s, Duration::ZERO, MAX_DRAIN_GRACE)
}

/// `cpu` or `cuda:N`; clap names the flag, this names the variable too.
fn device_choice(s: &str) -> Result<DeviceChoice, String> {
    s.parse().map_err(|e| format!("{e} (--device / MESH_NODE_DEVICE)"))
}

fn tokens_per_sec(s: &str) -> Result<f64, String> {
    let (lo, hi) = (TOKENS_PER_SEC.start(), TOKENS_PER_SEC.end());
    s.parse::<f64>()
        .ok()
        .filter(|v| TOKENS_PER_SEC.contains(v))
        .ok_or_else(|| format!("{s:?} is out of range: a number from {lo} to {hi}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_mutual_tls_serves_beyond_loopback_unless_insecure_is_said() {
        let parse = |args: &[&str]| NodeConfig::try_parse_from([&["mesh-node"][..], args].concat()).unwrap();
        assert_eq!(parse(&[]).exposure(), Ok(None), "loopback by default");
        let open = parse(&["--listen", "0.0.0.0:50051"]).exposure().unwrap_err();
        assert!(open.starts_with("--listen 0.0.0.0:50051 is not a loopback address and serves plaintext"), "{open}");
        let tls_only = ["--listen", "10.0.0.1:1", "--tls-cert", "c", "--tls-key", "k"];
        assert!(parse(&tls_only).exposure().unwrap_err().contains("TLS without client certificates"));
        let mutual = [&tls_only[..], &["--tls-client-ca", "ca"]].concat();
        assert_eq!(parse(&mutual).exposure(), Ok(None));
        let warned = parse(&["--listen", "0.0.0.0:1", "--insecure-anywhere"]).exposure().unwrap().unwrap();
        assert!(warned.contains("anyone who reaches it may call"), "{warned}");
    }

    #[test]
    fn durations_need_a_unit() {
        assert_eq!(duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(duration("1m 30s"), Ok(Duration::from_secs(90)));
        // A bare number is refused rather than guessed as seconds or millis.
        let err = duration("2").unwrap_err();
        assert!(err.contains("30s"), "{err}");
        assert!(duration("soon").is_err());
        let cfg = NodeConfig::try_parse_from(["mesh-node", "--drain-grace", "300ms"]).unwrap();
        assert_eq!(cfg.drain_grace, Duration::from_millis(300));
        assert_eq!(cfg.max_queue_wait, Duration::from_secs(3));
        let err = NodeConfig::try_parse_from(["mesh-node", "--max-queue-wait", "0s"]).unwrap_err().to_string();
        assert!(err.contains("--max-queue-wait") && err.contains("out of range: from 1ms to 1h"), "{err}");
    }

    #[test]
    fn the_device_is_cpu_unless_said_and_the_old_flag_is_an_alias() {
        let setting = |args: &[&str]| {
            let matches = NodeConfig::command().try_get_matches_from([&["mesh-node"][..], args].concat()).unwrap();
            NodeConfig::from_matches(&matches).unwrap().device_setting()
        };
        let (cpu, warning) = setting(&[]).unwrap();
        assert_eq!((cpu.choice, warning), (DeviceChoice::Cpu, None));
        assert!(cpu.said_by.contains("the default"), "{}", cpu.said_by);
        let (gpu, _) = setting(&["--device", "cuda:3"]).unwrap();
        assert_eq!(gpu, DeviceSetting { choice: DeviceChoice::Cuda(3), said_by: "--device cuda:3".into() });
        let (old, warning) = setting(&["--cuda-device", "2"]).unwrap();
        assert_eq!(old, DeviceSetting { choice: DeviceChoice::Cuda(2), said_by: "--cuda-device 2".into() });
        assert!(warning.unwrap().contains("deprecated: say MESH_NODE_DEVICE=cuda:2"));
        let (both, _) = setting(&["--device", "cuda:1", "--cuda-device", "1"]).unwrap();
        assert_eq!(both.said_by, "--device cuda:1");
        let err = setting(&["--device", "cpu", "--cuda-device", "1"]).unwrap_err();
        assert_eq!(err, "--device cpu and --cuda-device 1 disagree; drop --cuda-device 1 (deprecated)");
    }

    #[test]
    fn a_device_that_is_not_cpu_or_cuda_n_is_refused_naming_flag_variable_and_forms() {
        for bad in ["gpu", "cuda", "cuda:one", "0"] {
            let err = NodeConfig::try_parse_from(["mesh-node", "--device", bad]).unwrap_err().to_string();
            for part in ["--device", "MESH_NODE_DEVICE", "`cpu` or `cuda:N`"] {
                assert!(err.contains(part), "{bad:?}: {err}");
            }
        }
    }

    #[test]
    fn gguf_backend_requires_a_model_path() {
        let cfg = NodeConfig::try_parse_from(["mesh-node"]).unwrap();
        let cpu = candle_core::Device::Cpu;
        let err = crate::server::load_model(&cfg, &cpu).err().expect("no model path").to_string();
        assert!(err.contains("--model is required"), "{err}");
        let cfg = NodeConfig::try_parse_from(["mesh-node", "--backend", "synthetic"]).unwrap();
        assert!(crate::server::load_model(&cfg, &cpu).is_ok());
    }
}
