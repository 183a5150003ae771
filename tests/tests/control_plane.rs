//! The control plane stays quiet: an idle mesh against a real etcd keeps
//! its watch and its lease on one connection, with no break and no
//! re-registration, for a minute.

use std::time::Duration;

use mesh_tests::NodeProcess;
use mesh_tests::etcd::Etcd;
use mesh_tests::mesh::SidecarProcess;

/// Long enough for many keep-alive rounds (etcd closes a connection that
/// pings more often than its `--grpc-keepalive-min-time`, 5 s by default).
const IDLE: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_mesh_keeps_its_etcd_watch_and_lease_for_a_minute() {
    let etcd = Etcd::start().await;
    let node = NodeProcess::start(&["--backend", "synthetic", "--model-name", "chat"]).await;
    let b = SidecarProcess::start(&etcd, Some(&node), "").await;
    let a = SidecarProcess::start(&etcd, None, "").await;
    a.wait_for_instances("chat", 1).await;
    tokio::time::sleep(IDLE).await;
    for (who, sidecar) in [("client sidecar", &a), ("node sidecar", &b)] {
        assert_eq!(sidecar.logged("watch of etcd broken"), 0, "{who}: the watch broke while idle");
        assert_eq!(sidecar.logged("not registered in etcd"), 0, "{who}: the lease broke while idle");
    }
    assert_eq!(b.logged("registered in etcd"), 1, "the node sidecar registered more than once");
}
