//! Turning on etcd's RBAC for a mesh: one role that may read and write the
//! mesh's prefix and nothing else, a user holding it, and the `root` user
//! etcd requires before it enables auth.
//!
//! Leases need no grant of their own: etcd lets any authenticated user
//! grant and keep alive a lease, and checks write permission on the keys
//! attached when a lease is revoked, which the prefix's grant covers.

use etcd_client::{Client, Permission};

use super::{EtcdConfig, with_timeout};
use crate::RegistryError;

/// The mesh's grant: `role` may read and write every key under `prefix`.
pub struct MeshGrant<'a> {
    pub prefix: &'a str,
    pub role: &'a str,
    pub user: &'a str,
    pub password: &'a str,
}

/// Creates `root` (with `root_password`) and the mesh's role and user, then
/// enables auth. `config` connects as etcd's admin before auth is on (with
/// `--client-cert-auth`, any certificate of the etcd CA).
pub async fn enable(config: &EtcdConfig, root_password: &str, grant: &MeshGrant<'_>) -> Result<(), RegistryError> {
    let mut client = config.connect().await?;
    let limit = config.request_timeout;
    with_timeout(limit, client.user_add("root", root_password, None)).await?;
    with_timeout(limit, client.user_grant_role("root", "root")).await?;
    add_mesh_user(&mut client, config, grant).await?;
    with_timeout(limit, client.auth_enable()).await?;
    Ok(())
}

async fn add_mesh_user(client: &mut Client, config: &EtcdConfig, g: &MeshGrant<'_>) -> Result<(), RegistryError> {
    let limit = config.request_timeout;
    with_timeout(limit, client.role_add(g.role)).await?;
    let perm = Permission::read_write(g.prefix).with_prefix();
    with_timeout(limit, client.role_grant_permission(g.role, perm)).await?;
    with_timeout(limit, client.user_add(g.user, g.password, None)).await?;
    with_timeout(limit, client.user_grant_role(g.user, g.role)).await?;
    Ok(())
}
