//! A real etcd process for tests (`harness::Etcd`): free ports, its own
//! data directory, stopped with the test.

pub struct Etcd(harness::Etcd);

impl Etcd {
    pub async fn start() -> Etcd {
        let etcd = harness::Etcd::start("etcd".as_ref()).await;
        Etcd(etcd.expect("starting etcd (install etcd-server: scripts/setup.sh)"))
    }

    /// `http://127.0.0.1:PORT`, for clients.
    pub fn url(&self) -> String {
        self.0.url()
    }

    /// Kills etcd (SIGKILL) and waits for it to be gone.
    pub async fn stop(&mut self) {
        self.0.stop().await;
    }

    /// Starts etcd again on the same ports, with its data or with none.
    pub async fn restart(&mut self, wipe: bool) {
        self.0.restart(wipe).await.expect("restarting etcd");
    }
}
