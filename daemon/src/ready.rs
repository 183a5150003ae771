//! Readiness, said twice: to systemd (`Type=notify`) and, for launchers and
//! scripts, as one JSON line on stdout (logs go to stderr):
//!
//! `{"event":"ready","role":"sidecar","addresses":{"outbound":"127.0.0.1:4000","inbound":"127.0.0.1:4001"}}`
//!
//! The shape is fixed: `event` is always `"ready"`, `role` names the daemon,
//! `addresses` maps each listener's name to the address it bound.

use std::io::Write;
use std::net::SocketAddr;

/// Announces that the daemon serves on `addresses`.
pub fn announce(role: &str, addresses: &[(&str, SocketAddr)]) {
    let line = ready_line(role, addresses);
    let mut out = std::io::stdout().lock();
    if let Err(e) = writeln!(out, "{line}").and_then(|()| out.flush()) {
        tracing::debug!(error = %e, "cannot write the ready line to stdout");
    }
    notify(sd_notify::NotifyState::Ready);
}

/// Tells systemd the daemon is stopping.
pub fn stopping() {
    notify(sd_notify::NotifyState::Stopping);
}

fn ready_line(role: &str, addresses: &[(&str, SocketAddr)]) -> String {
    let addresses: serde_json::Map<String, serde_json::Value> =
        addresses.iter().map(|(name, addr)| (name.to_string(), addr.to_string().into())).collect();
    serde_json::json!({ "event": "ready", "role": role, "addresses": addresses }).to_string()
}

/// A no-op outside systemd.
fn notify(state: sd_notify::NotifyState<'_>) {
    if let Err(e) = sd_notify::notify(&[state]) {
        tracing::debug!(error = %e, "sd_notify");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ready_line_has_the_fixed_shape() {
        let addr: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        let line: serde_json::Value = serde_json::from_str(&ready_line("node", &[("grpc", addr)])).unwrap();
        assert_eq!(line["event"], "ready");
        assert_eq!(line["role"], "node");
        assert_eq!(line["addresses"]["grpc"], "127.0.0.1:4000");
    }
}
