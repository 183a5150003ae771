//! `meshctl autoscale`'s flags (each also read from `MESH_AUTOSCALE_*`, for
//! the systemd unit's environment file) and the policy they describe.

use std::time::Duration;

use super::policy::Policy;
use crate::etcd::EtcdArgs;

#[derive(clap::Args)]
pub struct AutoscaleArgs {
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// Services to scale (repeat or comma-separate).
    #[arg(long, env = "MESH_AUTOSCALE_SERVICES", value_delimiter = ',', required = true)]
    pub service: Vec<String>,
    /// Activate a spare when utilisation averages above this over --window.
    #[arg(long, env = "MESH_AUTOSCALE_SCALE_OUT_ABOVE", default_value_t = 0.8)]
    pub scale_out_above: f64,
    /// Return an activated spare when utilisation averages below this over --cooldown.
    #[arg(long, env = "MESH_AUTOSCALE_SCALE_IN_BELOW", default_value_t = 0.4)]
    pub scale_in_below: f64,
    #[arg(long, env = "MESH_AUTOSCALE_WINDOW", default_value = "2s", value_parser = humantime::parse_duration)]
    pub window: Duration,
    #[arg(long, env = "MESH_AUTOSCALE_COOLDOWN", default_value = "60s", value_parser = humantime::parse_duration)]
    pub cooldown: Duration,
    /// Active instances never fewer than this per service.
    #[arg(long, env = "MESH_AUTOSCALE_MIN_ACTIVE", default_value_t = 1)]
    pub min_active: usize,
    /// Shell command run on each scale-out (also when no spare is left),
    /// with MESH_SERVICE, MESH_INSTANCE (empty without a spare),
    /// MESH_ACTION and MESH_UTILISATION set.
    #[arg(long, env = "MESH_AUTOSCALE_ON_SCALE_OUT")]
    pub on_scale_out: Option<String>,
    /// Shell command run after a spare returns to standby.
    #[arg(long, env = "MESH_AUTOSCALE_ON_SCALE_IN")]
    pub on_scale_in: Option<String>,
    /// How often the policy looks at the mesh.
    #[arg(long, env = "MESH_AUTOSCALE_TICK", default_value = "250ms", value_parser = humantime::parse_duration)]
    pub tick: Duration,
    /// Serve Prometheus metrics here (loopback unless --metrics-token-file).
    #[arg(long, env = "MESH_AUTOSCALE_METRICS_LISTEN")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// File holding the bearer token scrapers must send.
    #[arg(long, env = "MESH_AUTOSCALE_METRICS_TOKEN_FILE")]
    pub metrics_token_file: Option<std::path::PathBuf>,
    /// This controller's name in the leader key (default: host and pid).
    #[arg(long, env = "MESH_AUTOSCALE_ID")]
    pub id: Option<String>,
}

/// The policy the flags describe, checked.
pub fn policy(args: &AutoscaleArgs) -> anyhow::Result<Policy> {
    let (above, below) = (args.scale_out_above, args.scale_in_below);
    anyhow::ensure!(above.is_finite() && above > 0.0, "--scale-out-above: must be a number above 0 (got {above})");
    anyhow::ensure!(
        below.is_finite() && (0.0..above).contains(&below),
        "--scale-in-below: must be at least 0 and under --scale-out-above ({above}), got {below}"
    );
    anyhow::ensure!(!args.tick.is_zero(), "--tick: must be above zero");
    Ok(Policy {
        above,
        below,
        window: args.window,
        cooldown: args.cooldown,
        min_active: args.min_active,
        hook_without_spare: args.on_scale_out.is_some(),
    })
}
