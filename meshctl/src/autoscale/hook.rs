//! The operator's hook: a shell command run on each scale decision (start
//! a unit, call a cloud API), in the background, so a slow one never holds
//! up the controller; its end is logged.

use std::process::Stdio;
use std::time::Duration;

/// A hook still running after this is killed.
const HOOK_TIMEOUT: Duration = Duration::from_secs(120);

pub fn run(command: &str, service: &str, instance: &str, action: &str, utilisation: f64) {
    let mut cmd = tokio::process::Command::new("sh");
    cmd.arg("-c").arg(command).stdin(Stdio::null()).kill_on_drop(true);
    cmd.env("MESH_SERVICE", service)
        .env("MESH_INSTANCE", instance)
        .env("MESH_ACTION", action)
        .env("MESH_UTILISATION", format!("{utilisation:.3}"));
    let (command, service) = (command.to_string(), service.to_string());
    tokio::spawn(async move {
        let ran = match cmd.spawn() {
            Ok(mut child) => tokio::time::timeout(HOOK_TIMEOUT, child.wait()).await,
            Err(e) => return tracing::warn!(%command, error = %e, "autoscale: hook did not start"),
        };
        match ran {
            Ok(Ok(status)) if status.success() => tracing::info!(%command, %service, "autoscale: hook done"),
            Ok(Ok(status)) => tracing::warn!(%command, %service, %status, "autoscale: hook failed"),
            Ok(Err(e)) => tracing::warn!(%command, %service, error = %e, "autoscale: hook failed"),
            Err(_) => tracing::warn!(%command, %service, "autoscale: hook killed after {HOOK_TIMEOUT:?}"),
        }
    });
}
