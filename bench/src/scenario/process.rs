//! A child process a scenario starts: spawned with its log on a pipe, ready
//! when a line of that log says so, killed when dropped, and its memory
//! readable from `/proc` so a report can show it stayed bounded.
//!
//! Readiness comes from the log, not from polling a port: every process the
//! runner starts (node, sidecar, etcd) logs the line that means "serving",
//! and the address it bound to when it was given port 0.

use std::collections::VecDeque;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// Log lines kept per process, for error messages.
const TAIL_LINES: usize = 20;

/// A started process. Dropping it kills the process (SIGKILL).
pub struct Spawned {
    /// What the process is, for messages and reports ("node 0", "etcd").
    pub name: String,
    child: Child,
    pub pid: u32,
    tail: Arc<Mutex<VecDeque<String>>>,
}

impl Spawned {
    /// Starts `cmd` (stdout discarded, stderr read) and feeds each stderr
    /// line to `ready` until it returns `Some`, within `timeout`. The log
    /// keeps being read afterwards so the process never blocks on a full pipe.
    pub async fn start<T>(
        name: impl Into<String>,
        mut cmd: Command,
        timeout: Duration,
        mut ready: impl FnMut(&str) -> anyhow::Result<Option<T>>,
    ) -> anyhow::Result<(Spawned, T)> {
        let name = name.into();
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("spawning {name} ({:?})", cmd.as_std().get_program()))?;
        let pid = child.id().with_context(|| format!("{name} exited at once"))?;
        let stderr = child.stderr.take().with_context(|| format!("{name}: no stderr"))?;
        let mut lines = BufReader::new(stderr).lines();
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        let waited = tokio::time::timeout(timeout, async {
            while let Some(line) = lines.next_line().await? {
                remember(&tail, &line);
                if let Some(value) = ready(&line)? {
                    return Ok::<_, anyhow::Error>(Some(value));
                }
            }
            Ok(None)
        })
        .await;
        let shown = || tail_text(&tail);
        let value = match waited {
            Ok(Ok(Some(value))) => value,
            Ok(Ok(None)) => bail!("{name} exited before it was ready; its log:\n{}", shown()),
            Ok(Err(e)) => bail!("{name}: {e:#}; its log:\n{}", shown()),
            Err(_) => bail!("{name} was not ready within {timeout:?}; its log:\n{}", shown()),
        };
        let keep = tail.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                remember(&keep, &line);
            }
        });
        Ok((Spawned { name, child, pid, tail }, value))
    }

    /// The last lines of its log.
    pub fn log_tail(&self) -> Vec<String> {
        self.tail.lock().map(|t| t.iter().cloned().collect()).unwrap_or_default()
    }

    /// SIGKILL now, without waiting.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        self.child.start_kill().with_context(|| format!("killing {}", self.name))
    }

    /// Its memory now, from `/proc/PID/status`.
    pub fn memory(&self) -> Option<Memory> {
        Memory::of(&self.name, self.pid)
    }
}

fn remember(tail: &Mutex<VecDeque<String>>, line: &str) {
    if let Ok(mut t) = tail.lock() {
        if t.len() == TAIL_LINES {
            t.pop_front();
        }
        t.push_back(line.to_string());
    }
}

fn tail_text(tail: &Mutex<VecDeque<String>>) -> String {
    tail.lock().map(|t| t.iter().cloned().collect::<Vec<_>>().join("\n")).unwrap_or_default()
}

/// A process's resident memory: now and at its peak since it started.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Memory {
    pub process: String,
    pub pid: u32,
    /// `VmHWM`: the peak resident set, in KiB.
    pub peak_rss_kib: u64,
    /// `VmRSS`: the resident set now, in KiB.
    pub rss_kib: u64,
}

impl Memory {
    /// Reads `/proc/PID/status`; None when the process is gone or the
    /// system has no `/proc` (the report then says so instead of guessing).
    pub fn of(process: &str, pid: u32) -> Option<Memory> {
        let status = std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("status")).ok()?;
        let field = |key: &str| -> Option<u64> {
            let line = status.lines().find(|l| l.starts_with(key))?;
            line[key.len()..].trim().trim_end_matches("kB").trim().parse().ok()
        };
        Some(Memory { process: process.to_string(), pid, peak_rss_kib: field("VmHWM:")?, rss_kib: field("VmRSS:")? })
    }
}

/// Where a workspace binary is: `explicit` if given, else beside the running
/// executable (or one directory up, when running from `target/<profile>/deps`
/// as the tests do).
pub fn workspace_bin(name: &str, explicit: Option<&Path>, build_hint: &str) -> anyhow::Result<std::path::PathBuf> {
    if let Some(bin) = explicit {
        return Ok(bin.to_path_buf());
    }
    let exe = std::env::current_exe().context("locating mesh-bench")?;
    let dir = exe.parent().context("mesh-bench has no directory")?;
    let candidates = [dir.join(name), dir.join("..").join(name)];
    match candidates.iter().find(|p| p.exists()) {
        Some(p) => Ok(p.clone()),
        None => bail!("{name} not found beside {}: build it ({build_hint}) or give its path", dir.display()),
    }
}

/// A loopback port that was free a moment ago (bound to port 0, then
/// released): for etcd, which cannot be told to pick its own and report it.
pub fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_its_own_memory() {
        let me = Memory::of("self", std::process::id()).expect("/proc/self/status");
        assert!(me.peak_rss_kib >= me.rss_kib && me.rss_kib > 0, "{me:?}");
        assert_eq!(Memory::of("gone", u32::MAX), None);
    }
}
