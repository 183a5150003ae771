//! A child process: spawned with stdout and stderr on pipes, ready when it
//! says so (a JSON line on stdout) or when a probe succeeds, killed when
//! dropped. Its stderr log is kept, for error messages and for tests that
//! look for a line.

use std::collections::VecDeque;
use std::future::Future;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};
use tokio::sync::Notify;

use crate::ready::Addresses;
use crate::{Error, Result};

/// Log lines kept per process: enough for every line of a test's run, and
/// a bound so a long benchmark's chatty sidecar cannot grow without limit.
const KEPT_LINES: usize = 100_000;

/// Log lines shown in an error message.
const SHOWN_LINES: usize = 20;

/// How often a readiness probe is retried.
const PROBE_INTERVAL: Duration = Duration::from_millis(50);

/// A started process. Dropping it kills the process (SIGKILL).
pub struct Spawned {
    name: String,
    child: Child,
    pid: u32,
    log: Arc<Log>,
    stdout: Option<Lines<BufReader<ChildStdout>>>,
}

impl Spawned {
    /// Starts `cmd` with stdin closed and stdout and stderr piped; its
    /// stderr is read into the log from now on. `name` says what it is in
    /// messages ("node 0", "etcd").
    pub fn spawn(name: impl Into<String>, mut cmd: Command) -> Result<Spawned> {
        let name = name.into();
        let mut child =
            cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true).spawn().map_err(
                |source| Error::Spawn {
                    name: name.clone(),
                    program: cmd.as_std().get_program().to_string_lossy().into_owned(),
                    source,
                },
            )?;
        let pid = child.id().ok_or_else(|| Error::io(&name, "reading its pid", std::io::ErrorKind::NotFound.into()))?;
        let log = Arc::new(Log::default());
        if let Some(stderr) = child.stderr.take() {
            tokio::spawn(collect(stderr, log.clone()));
        }
        let stdout = child.stdout.take().map(|s| BufReader::new(s).lines());
        Ok(Spawned { name, child, pid, log, stdout })
    }

    /// Waits (up to `timeout`) for the ready line of a daemon of `role`
    /// on stdout and returns the addresses it names. Stdout keeps being
    /// read afterwards, so the process never blocks on a full pipe.
    pub async fn announced(&mut self, role: &str, timeout: Duration) -> Result<Addresses> {
        let Some(mut stdout) = self.stdout.take() else {
            return Err(self.exited("its stdout was already read").await);
        };
        let (name, log) = (self.name.clone(), self.log.clone());
        let read = async {
            while let Some(line) = stdout.next_line().await.map_err(|e| Error::io(&name, "reading stdout", e))? {
                if let Some(addresses) = Addresses::parse(&name, role, &line)? {
                    return Ok(Some(addresses));
                }
                log.push(line);
            }
            Ok(None)
        };
        match tokio::time::timeout(timeout, read).await {
            Ok(Ok(Some(addresses))) => {
                tokio::spawn(async move { while let Ok(Some(_)) = stdout.next_line().await {} });
                Ok(addresses)
            }
            Ok(Ok(None)) => Err(self.exited("stdout closed").await),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(self.not_ready(timeout)),
        }
    }

    /// Waits (up to `timeout`) until `probe` says the process serves, for
    /// programs that do not announce themselves (etcd).
    pub async fn probed<F, Fut>(&mut self, timeout: Duration, mut probe: F) -> Result<()>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        // Nothing reads stdout of a program that does not announce itself.
        if let Some(mut stdout) = self.stdout.take() {
            tokio::spawn(async move { while let Ok(Some(_)) = stdout.next_line().await {} });
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if probe().await {
                return Ok(());
            }
            if let Ok(Some(_)) = self.child.try_wait() {
                return Err(self.exited("while probed").await);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(self.not_ready(timeout));
            }
            tokio::time::sleep(PROBE_INTERVAL).await;
        }
    }

    /// What the process is, in messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Log lines (stderr, and any stray stdout) containing `text`.
    pub fn logged(&self, text: &str) -> usize {
        self.log.lines().iter().filter(|l| l.contains(text)).count()
    }

    /// Waits (up to `timeout`) until a log line contains `text`.
    pub async fn wait_logged(&self, text: &str, timeout: Duration) -> Result<()> {
        let waited = tokio::time::timeout(timeout, async {
            loop {
                let pushed = self.log.pushed.notified();
                if self.logged(text) > 0 {
                    return;
                }
                pushed.await;
            }
        });
        waited.await.map_err(|_| Error::NotLogged {
            name: self.name.clone(),
            text: text.to_string(),
            timeout,
            log: self.shown(),
        })
    }

    /// The last `n` lines of its log.
    pub fn log_tail(&self, n: usize) -> Vec<String> {
        let lines = self.log.lines();
        lines.iter().skip(lines.len().saturating_sub(n)).cloned().collect()
    }

    /// SIGKILL now, without waiting.
    pub fn kill(&mut self) -> Result<()> {
        self.child.start_kill().map_err(|e| Error::io(&self.name, "killing it", e))
    }

    /// Waits for the process to exit.
    pub async fn wait(&mut self) -> Result<ExitStatus> {
        self.child.wait().await.map_err(|e| Error::io(&self.name, "waiting for it", e))
    }

    /// Sends `signal` (`TERM`, `STOP`, `CONT`, `KILL`) with `kill(1)`: std
    /// has no portable way to send STOP/CONT, and one short-lived `kill`
    /// per signal costs nothing here.
    pub fn signal(&self, signal: &str) -> Result<()> {
        let what = format!("kill -{signal} {}", self.pid);
        let status = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid.to_string())
            .status()
            .map_err(|e| Error::io(&self.name, &what, e))?;
        if status.success() {
            Ok(())
        } else {
            Err(Error::io(&self.name, what, std::io::Error::other(status.to_string())))
        }
    }

    /// Its memory now, from `/proc/PID/status`.
    pub fn memory(&self) -> Option<Memory> {
        Memory::of(&self.name, self.pid)
    }

    /// CPU time it has used so far (see `cpu_seconds`).
    pub fn cpu_seconds(&self) -> Option<f64> {
        cpu_seconds(self.pid)
    }

    fn not_ready(&self, timeout: Duration) -> Error {
        Error::NotReady { name: self.name.clone(), timeout, log: self.shown() }
    }

    /// The error for a process that went away before it was ready, with
    /// its exit status and the end of its log (given a moment to arrive).
    async fn exited(&mut self, why: &str) -> Error {
        let status = match tokio::time::timeout(Duration::from_secs(2), self.child.wait()).await {
            Ok(Ok(status)) => status.to_string(),
            _ => why.to_string(),
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), self.log.closed()).await;
        Error::Exited { name: self.name.clone(), status, log: self.shown() }
    }

    fn shown(&self) -> String {
        self.log_tail(SHOWN_LINES).join("\n")
    }
}

/// The lines a process logged, the oldest dropped past `KEPT_LINES`.
#[derive(Default)]
struct Log {
    lines: Mutex<VecDeque<String>>,
    /// Set (and notified) when the stream ends.
    done: Mutex<bool>,
    ended: Notify,
    /// Notified at every line.
    pushed: Notify,
}

impl Log {
    fn push(&self, line: String) {
        let mut lines = self.lines();
        if lines.len() == KEPT_LINES {
            lines.pop_front();
        }
        lines.push_back(line);
        drop(lines);
        self.pushed.notify_waiters();
    }

    fn lines(&self) -> MutexGuard<'_, VecDeque<String>> {
        // A panic while holding the lock leaves whole lines behind: still readable.
        self.lines.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn end(&self) {
        *self.done.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.ended.notify_waiters();
    }

    async fn closed(&self) {
        loop {
            let ended = self.ended.notified();
            if *self.done.lock().unwrap_or_else(|p| p.into_inner()) {
                return;
            }
            ended.await;
        }
    }
}

async fn collect(stream: impl AsyncRead + Unpin, log: Arc<Log>) {
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        log.push(line);
    }
    log.end();
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
    /// system has no `/proc` (a report then says so instead of guessing).
    pub fn of(process: &str, pid: u32) -> Option<Memory> {
        let status = std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("status")).ok()?;
        let field = |key: &str| -> Option<u64> {
            let line = status.lines().find(|l| l.starts_with(key))?;
            line[key.len()..].trim().trim_end_matches("kB").trim().parse().ok()
        };
        Some(Memory { process: process.to_string(), pid, peak_rss_kib: field("VmHWM:")?, rss_kib: field("VmRSS:")? })
    }
}

/// Clock ticks per second of `/proc/PID/stat` times: Linux's `USER_HZ`,
/// fixed at 100 by its ABI whatever the kernel's own tick rate.
const USER_HZ: f64 = 100.0;

/// CPU seconds (user + system) a process has used, from `/proc/PID/stat`;
/// None when it is gone or there is no `/proc`.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("stat")).ok()?;
    // The command name, in parentheses, may hold spaces: count fields after it.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace();
    // Fields 14 and 15 of stat(5); the first after the name is field 3.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / USER_HZ)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_its_own_cpu_time() {
        let before = cpu_seconds(std::process::id()).expect("/proc/self/stat");
        let spin = std::time::Instant::now();
        let mut x = 0u64;
        while spin.elapsed() < Duration::from_millis(100) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let after = cpu_seconds(std::process::id()).unwrap();
        assert!(after >= before + 0.05, "{before} -> {after}");
        assert_eq!(cpu_seconds(u32::MAX), None);
    }

    #[test]
    fn reads_its_own_memory() {
        let me = Memory::of("self", std::process::id()).expect("/proc/self/status");
        assert!(me.peak_rss_kib >= me.rss_kib && me.rss_kib > 0, "{me:?}");
        assert_eq!(Memory::of("gone", u32::MAX), None);
    }

    fn sh(script: &str) -> Command {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", script]);
        cmd
    }

    #[tokio::test]
    async fn ready_from_the_json_line_with_the_log_kept() {
        let script = r#"echo starting >&2; echo '{"event":"ready","role":"node","addresses":{"grpc":"127.0.0.1:7"}}'; echo served >&2; sleep 5"#;
        let mut p = Spawned::spawn("sh", sh(script)).unwrap();
        let addresses = p.announced("node", Duration::from_secs(5)).await.unwrap();
        assert_eq!(addresses.get("grpc"), Some("127.0.0.1:7".parse().unwrap()));
        tokio::time::timeout(Duration::from_secs(5), async {
            while p.logged("served") == 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .unwrap();
        assert_eq!(p.logged("starting"), 1);
    }

    #[tokio::test]
    async fn exiting_before_ready_shows_the_log() {
        let mut p = Spawned::spawn("sh", sh("echo 'bad flag' >&2; exit 3")).unwrap();
        let err = p.announced("node", Duration::from_secs(5)).await.unwrap_err().to_string();
        assert!(err.contains("exited before it was ready") && err.contains("bad flag"), "{err}");
        let mut p = Spawned::spawn("sh", sh("sleep 5")).unwrap();
        let err = p.announced("node", Duration::from_millis(100)).await.unwrap_err();
        assert!(matches!(err, Error::NotReady { .. }), "{err}");
    }
}
