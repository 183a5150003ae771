//! A real etcd process for tests: free ports, its own data directory,
//! stopped with the test.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::free_port;

pub struct Etcd {
    child: Option<Child>,
    client_port: u16,
    peer_port: u16,
    data_dir: PathBuf,
}

impl Etcd {
    pub async fn start() -> Etcd {
        let data_dir = std::env::temp_dir().join(format!("mesh-etcd-{}-{}", std::process::id(), free_port()));
        let mut etcd = Etcd { child: None, client_port: free_port(), peer_port: free_port(), data_dir };
        etcd.launch().await;
        etcd
    }

    /// `http://127.0.0.1:PORT`, for clients.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    async fn launch(&mut self) {
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut child = Command::new("etcd")
            .args(["--name", "test", "--data-dir"])
            .arg(&self.data_dir)
            .args(["--listen-client-urls", &self.url(), "--advertise-client-urls", &self.url()])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("test={peer}")])
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawning etcd (install etcd-server: scripts/setup.sh)");
        let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
        tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await.expect("etcd log") {
                if line.contains("ready to serve client requests") {
                    return;
                }
            }
            panic!("etcd exited before it was ready");
        })
        .await
        .expect("etcd did not become ready");
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        self.child = Some(child);
    }

    /// Kills etcd (SIGKILL) and waits for it to be gone.
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// Starts etcd again on the same ports, with its data or with none.
    pub async fn restart(&mut self, wipe: bool) {
        self.stop().await;
        if wipe {
            let _ = std::fs::remove_dir_all(&self.data_dir);
        }
        self.launch().await;
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}
