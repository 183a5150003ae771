//! What the standby arm watches while the load runs: every 100 ms, the
//! client sidecar's view of the primary's instances (admin `Instances`:
//! streams it has open to each) and how many activations and returns the
//! controller has logged so far. From these the report reads when the
//! standby took traffic, how busy the primary was when it did, and whether
//! the controller flapped.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::peak_mesh::{ACTIVATED, ArmMesh, RETURNED};

/// How often the watcher looks.
pub const INTERVAL: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Sample {
    /// From the start of the load.
    pub t_s: f64,
    /// Streams the client sidecar has open to the always-active primary nodes.
    pub primary_in_flight: u32,
    /// The standby's instance is in the client sidecar's view, not ejected.
    pub standby_listed: bool,
    /// Streams the client sidecar has open to the standby.
    pub standby_in_flight: u32,
    /// Controller log lines so far: activations, returns to standby.
    pub activated: usize,
    pub returned: usize,
}

/// Samples until `done` is set, then for `tail` more (a return to standby
/// comes a cooldown after the load falls).
pub async fn watch(mesh: &ArmMesh, service: &str, started: Instant, done: &AtomicBool, tail: Duration) -> Vec<Sample> {
    let mut samples = Vec::new();
    let mut ends = None;
    loop {
        let now = Instant::now();
        match (done.load(Ordering::Relaxed), ends) {
            (true, None) => ends = Some(now + tail),
            (_, Some(end)) if now >= end => return samples,
            _ => {}
        }
        samples.push(sample(mesh, service, started).await);
        tokio::time::sleep_until((now + INTERVAL).into()).await;
    }
}

async fn sample(mesh: &ArmMesh, service: &str, started: Instant) -> Sample {
    let t_s = started.elapsed().as_secs_f64();
    let (activated, returned) = match &mesh.autoscale {
        Some(p) => (p.logged(ACTIVATED), p.logged(RETURNED)),
        None => (0, 0),
    };
    let mut s = Sample { t_s, activated, returned, ..Sample::default() };
    // A failed look reads as an empty view for that sample.
    for i in mesh.client.instances().await.unwrap_or_default() {
        if i.service != service {
            continue;
        }
        if mesh.standby_addr.as_deref() == Some(i.address.as_str()) {
            s.standby_listed = !i.ejected;
            s.standby_in_flight = i.in_flight;
        } else if mesh.primary_addrs.contains(&i.address) {
            s.primary_in_flight += i.in_flight;
        }
    }
    s
}

/// The controller's lines, without terminal colours, for the report.
pub fn controller_log(mesh: &ArmMesh) -> Vec<String> {
    let Some(p) = &mesh.autoscale else { return Vec::new() };
    let lines = p.log_tail(10_000);
    lines.iter().filter(|l| l.contains("autoscale")).map(|l| strip_ansi(l)).collect()
}

fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters, ending in a letter.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colours_are_stripped() {
        let line = "\u{1b}[2m2025\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m autoscale: activated x of chat";
        assert_eq!(strip_ansi(line), "2025  INFO autoscale: activated x of chat");
    }
}
