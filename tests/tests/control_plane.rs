//! The control plane stays quiet: an idle mesh against a real etcd keeps
//! its watch and its lease on one connection, with no break and no
//! re-registration, for a minute.

use std::time::Duration;

use mesh_tests::etcd::Etcd;
use mesh_tests::mesh::SidecarProcess;
use mesh_tests::{NodeProcess, free_port, scrape};

/// Long enough for many keep-alive rounds (etcd closes a connection that
/// pings more often than its `--grpc-keepalive-min-time`, 5 s by default).
const IDLE: Duration = Duration::from_secs(60);

/// The registry's counts of trouble with etcd, as a sidecar exports them.
const TROUBLE: [&str; 3] =
    ["mesh_registry_watch_breaks_total", "mesh_registry_reconnects_total", "mesh_registry_registration_failures_total"];

async fn sidecar(etcd: &Etcd, node: Option<&NodeProcess>) -> (SidecarProcess, String) {
    let metrics = format!("127.0.0.1:{}", free_port());
    (SidecarProcess::start_with_args(etcd, node, "", &["--metrics-listen", &metrics]).await, metrics)
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_mesh_keeps_its_etcd_watch_and_lease_for_a_minute() {
    let etcd = Etcd::start().await;
    let node = NodeProcess::start(&["--backend", "synthetic", "--model-name", "chat"]).await;
    let (b, b_metrics) = sidecar(&etcd, Some(&node)).await;
    let (a, a_metrics) = sidecar(&etcd, None).await;
    a.wait_for_instances("chat", 1).await;
    tokio::time::sleep(IDLE).await;
    for (who, metrics) in [("client sidecar", &a_metrics), ("node sidecar", &b_metrics)] {
        let now = scrape(metrics).await;
        for name in TROUBLE {
            assert_eq!(now.get(name).copied(), Some(0.0), "{who}: {name} while idle");
        }
    }
    assert_eq!(a.logged("etcd unreachable"), 0, "the client sidecar lost etcd while idle");
    assert_eq!(b.logged("registered in etcd"), 1, "the node sidecar registered more than once");
}
