//! How `meshctl` reaches etcd (endpoints, TLS, user), shared by every
//! command that reads or writes the registry, and `etcd-enable-auth`, which
//! turns on etcd's RBAC for the mesh.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use registry::etcd::auth::{self, MeshGrant};
use registry::{Credentials, EtcdConfig, TlsFiles};

#[derive(clap::Args)]
pub struct EtcdArgs {
    /// etcd endpoints, comma-separated (https:// with --etcd-ca).
    #[arg(long, env = "MESH_ETCD", value_delimiter = ',', default_value = "http://127.0.0.1:2379")]
    etcd: Vec<String>,
    #[arg(long, env = "MESH_ETCD_PREFIX", default_value = "/mesh/v1/")]
    prefix: String,
    /// Lease TTL in seconds.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=3600))]
    lease_ttl: u64,
    /// CA certificate (PEM) of etcd's server certificate: TLS to etcd.
    #[arg(long, env = "MESH_ETCD_CA")]
    etcd_ca: Option<PathBuf>,
    /// Client certificate and key (PEM) for etcd's `--client-cert-auth`.
    #[arg(long, env = "MESH_ETCD_CERT", requires_all = ["etcd_key", "etcd_ca"])]
    etcd_cert: Option<PathBuf>,
    #[arg(long, env = "MESH_ETCD_KEY", requires = "etcd_cert")]
    etcd_key: Option<PathBuf>,
    /// etcd user; its password is read from --etcd-password-file.
    #[arg(long, env = "MESH_ETCD_USER", requires = "etcd_password_file")]
    etcd_user: Option<String>,
    /// File whose first line is the etcd password (never the password on
    /// the command line, where `ps` and shell history show it).
    #[arg(long, env = "MESH_ETCD_PASSWORD_FILE", requires = "etcd_user")]
    etcd_password_file: Option<PathBuf>,
}

impl EtcdArgs {
    pub fn config(&self) -> EtcdConfig {
        let mut c = EtcdConfig::new(self.etcd.clone());
        c.prefix = self.prefix.clone();
        c.lease_ttl = Duration::from_secs(self.lease_ttl);
        let identity = self.etcd_cert.clone().zip(self.etcd_key.clone());
        c.tls = self.etcd_ca.clone().map(|ca| TlsFiles { ca, identity });
        c.credentials = self
            .etcd_user
            .clone()
            .zip(self.etcd_password_file.clone())
            .map(|(user, password_file)| Credentials { user, password_file });
        c
    }
}

/// Arguments of `meshctl etcd-enable-auth`.
#[derive(clap::Args)]
pub struct EnableAuth {
    #[command(flatten)]
    etcd: EtcdArgs,
    /// File holding the password to give etcd's `root` user.
    #[arg(long)]
    root_password_file: PathBuf,
    /// The mesh's user (and role): read and write under --prefix, nothing else.
    #[arg(long, default_value = "mesh")]
    mesh_user: String,
    /// File holding the mesh user's password (the sidecars' `etcd.password_file`).
    #[arg(long)]
    mesh_password_file: PathBuf,
}

/// Creates `root`, the mesh's role and user, and enables auth.
pub async fn enable_auth(args: &EnableAuth) -> anyhow::Result<()> {
    let password = |file: &PathBuf| Credentials { user: String::new(), password_file: file.clone() }.password();
    let (root, mesh) = (password(&args.root_password_file)?, password(&args.mesh_password_file)?);
    let config = args.etcd.config();
    let grant = MeshGrant { prefix: &config.prefix, role: &args.mesh_user, user: &args.mesh_user, password: &mesh };
    auth::enable(&config, &root, &grant).await.context("enabling etcd auth")?;
    println!("etcd auth enabled: user {0} (role {0}) may read and write under {1}", args.mesh_user, config.prefix);
    Ok(())
}
