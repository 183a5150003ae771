//! The registry against a real etcd process: registration and watches,
//! lease expiry of a killed process, etcd outages and wipes, compaction,
//! and many registrants at once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use mesh_tests::bin_dir;
use mesh_tests::etcd::Etcd;
use mesh_tests::proxy::Proxy;
use registry::etcd::RegistrarState;
use registry::{EtcdConfig, EtcdRegistry, InstanceRecord, Registry, View};
use tokio::sync::watch;

const TTL: Duration = Duration::from_secs(2);

fn config(url: &str) -> EtcdConfig {
    let mut c = EtcdConfig::new(vec![url.to_string()]);
    c.lease_ttl = TTL;
    c.request_timeout = Duration::from_secs(1);
    c.backoff = (Duration::from_millis(50), Duration::from_millis(500));
    c
}

/// Waits until `pred` holds for the view; returns how long that took.
async fn wait_view(rx: &mut watch::Receiver<Arc<View>>, limit: Duration, pred: impl Fn(&View) -> bool) -> Duration {
    let start = Instant::now();
    let converged = tokio::time::timeout(limit, rx.wait_for(|v| pred(v))).await.map(|r| r.is_ok());
    assert_eq!(converged, Ok(true), "view did not converge within {limit:?}: {:?}", rx.borrow());
    start.elapsed()
}

fn has(v: &View, id: &str) -> bool {
    v.service("chat").any(|r| r.instance_id == id)
}

#[tokio::test(flavor = "multi_thread")]
async fn watcher_sees_registration_and_deregistration() {
    let etcd = Etcd::start().await;
    let registrant = EtcdRegistry::start(config(&etcd.url())).unwrap();
    let watcher = EtcdRegistry::start(config(&etcd.url())).unwrap();
    let mut view = watcher.watch();

    let mut rec = InstanceRecord::new("chat", "node-a", "127.0.0.1:7001");
    rec.weight = 3;
    registrant.register(rec.clone()).await.unwrap();
    wait_view(&mut view, Duration::from_secs(5), |v| has(v, "node-a")).await;
    assert_eq!(view.borrow().service("chat").next(), Some(&rec));
    assert!(view.borrow().etcd_reachable);

    // Operators see the same record through meshctl.
    let out = tokio::process::Command::new(bin_dir().join("meshctl"))
        .args(["status", "--json", "--etcd", &etcd.url()])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let listed = String::from_utf8(out.stdout).unwrap();
    assert!(listed.contains("\"instance_id\": \"node-a\"") && listed.contains("\"weight\": 3"), "{listed}");

    registrant.deregister("chat", "node-a").await.unwrap();
    wait_view(&mut view, Duration::from_secs(5), |v| !has(v, "node-a")).await;

    // A graceful stop revokes the lease: every record goes at once.
    registrant.register(InstanceRecord::new("chat", "node-b", "127.0.0.1:7002")).await.unwrap();
    wait_view(&mut view, Duration::from_secs(5), |v| has(v, "node-b")).await;
    registrant.shutdown().await.unwrap();
    let gone = wait_view(&mut view, Duration::from_secs(5), |v| !has(v, "node-b")).await;
    assert!(gone < TTL, "revoked record lingered {gone:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_registrant_disappears_within_ttl_plus_one_second() {
    let etcd = Etcd::start().await;
    let watcher = EtcdRegistry::start(config(&etcd.url())).unwrap();
    let mut view = watcher.watch();
    let mut child = tokio::process::Command::new(bin_dir().join("meshctl"))
        .args(["register", "--etcd", &etcd.url(), "--lease-ttl", &TTL.as_secs().to_string()])
        .args(["--service", "chat", "--instance", "doomed", "--address", "127.0.0.1:7003"])
        .kill_on_drop(true)
        .spawn()
        .expect("spawning meshctl register");
    wait_view(&mut view, Duration::from_secs(10), |v| has(v, "doomed")).await;

    child.start_kill().unwrap(); // SIGKILL: no chance to revoke
    let killed = Instant::now();
    child.wait().await.unwrap();
    wait_view(&mut view, TTL + Duration::from_secs(2), |v| !has(v, "doomed")).await;
    let gone = killed.elapsed();
    eprintln!("SIGKILL to removal: {gone:?} (TTL {TTL:?})");
    assert!(gone <= TTL + Duration::from_secs(1), "record outlived the lease: {gone:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn etcd_outage_keeps_views_and_a_wiped_etcd_gets_records_back() {
    let mut etcd = Etcd::start().await;
    let registrant = EtcdRegistry::start(config(&etcd.url())).unwrap();
    let watcher = EtcdRegistry::start(config(&etcd.url())).unwrap();
    let mut view = watcher.watch();
    // Churn first, so the watcher's revision is far above a fresh store's.
    for round in 0..20 {
        registrant.register(InstanceRecord::new("chat", "churn", format!("127.0.0.1:{round}"))).await.unwrap();
    }
    registrant.deregister("chat", "churn").await.unwrap();
    registrant.register(InstanceRecord::new("chat", "survivor", "127.0.0.1:7004")).await.unwrap();
    wait_view(&mut view, Duration::from_secs(5), |v| has(v, "survivor") && !has(v, "churn")).await;

    etcd.stop().await;
    wait_view(&mut view, Duration::from_secs(10), |v| !v.etcd_reachable).await;
    // Ten seconds without etcd: the watcher keeps its view, nobody exits.
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(has(&view.borrow(), "survivor"), "view emptied during the outage");
    assert!(!view.borrow().etcd_reachable);

    etcd.restart(true).await; // a wiped data dir: the old lease and record are gone
    let back = Instant::now();
    // The record is in etcd again (read fresh, not from a kept view).
    let in_etcd = tokio::time::timeout(2 * TTL + Duration::from_secs(3), async {
        loop {
            if let Ok(records) = registry::etcd::fetch_all(&config(&etcd.url())).await
                && records.iter().any(|r| r.instance_id == "survivor")
            {
                return back.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("record re-registered");
    eprintln!("etcd restart (wiped) to re-registration: {in_etcd:?} (TTL {TTL:?})");
    assert!(in_etcd <= 2 * TTL, "re-registration took {in_etcd:?}");
    // The old watcher follows the new store: it sees a newcomer written at a
    // revision lower than any it saw before the wipe.
    let newcomer = EtcdRegistry::start(config(&etcd.url())).unwrap();
    newcomer.register(InstanceRecord::new("chat", "newcomer", "127.0.0.1:7005")).await.unwrap();
    wait_view(&mut view, 2 * TTL, |v| v.etcd_reachable && has(v, "survivor") && has(v, "newcomer")).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn watcher_behind_a_compaction_resyncs_and_converges() {
    let etcd = Etcd::start().await;
    let upstream = etcd.url().trim_start_matches("http://").parse().unwrap();
    let proxy = Proxy::start(upstream).await;
    let watcher = EtcdRegistry::start(config(&format!("http://{}", proxy.addr))).unwrap();
    let mut view = watcher.watch();
    let writer = EtcdRegistry::start(config(&etcd.url())).unwrap();
    for i in 0..5 {
        writer.register(InstanceRecord::new("chat", format!("old-{i}"), "127.0.0.1:1")).await.unwrap();
    }
    wait_view(&mut view, Duration::from_secs(5), |v| v.service("chat").count() == 5).await;

    // Partition the watcher, change everything, compact the history away.
    proxy.cut();
    wait_view(&mut view, Duration::from_secs(10), |v| !v.etcd_reachable).await;
    for i in 0..5 {
        writer.deregister("chat", &format!("old-{i}")).await.unwrap();
        writer.register(InstanceRecord::new("chat", format!("new-{i}"), "127.0.0.1:2")).await.unwrap();
    }
    let mut client = config(&etcd.url()).connect().await.unwrap();
    // Wait until the writes landed, then compact at the current revision.
    let revision = loop {
        let opts = etcd_client_get_prefix();
        let resp = client.get("/mesh/v1/services/", Some(opts)).await.unwrap();
        if resp.kvs().len() == 5 && resp.kvs().iter().all(|kv| kv.key_str().unwrap().contains("new-")) {
            break resp.header().unwrap().revision();
        }
        tokio::task::yield_now().await;
    };
    client.compact(revision, None).await.unwrap();
    assert!(has(&view.borrow(), "old-0"), "the partitioned watcher kept its last view");

    proxy.restore();
    wait_view(&mut view, Duration::from_secs(10), |v| {
        v.etcd_reachable
            && v.service("chat").map(|r| r.instance_id.as_str()).eq(["new-0", "new-1", "new-2", "new-3", "new-4"])
    })
    .await;
}

fn etcd_client_get_prefix() -> registry::etcd::GetOptions {
    registry::etcd::GetOptions::new().with_prefix()
}

#[tokio::test(flavor = "multi_thread")]
async fn two_hundred_instances_registering_at_once_reach_every_watcher() {
    let etcd = Etcd::start().await;
    let watchers: Vec<EtcdRegistry> = (0..3).map(|_| EtcdRegistry::start(config(&etcd.url())).unwrap()).collect();
    let registrants: Vec<EtcdRegistry> = (0..200).map(|_| EtcdRegistry::start(config(&etcd.url())).unwrap()).collect();
    let started = Instant::now();
    futures_join(registrants.iter().enumerate().map(|(i, r)| {
        r.register(InstanceRecord::new("chat", format!("n{i:03}"), format!("127.0.0.1:{}", 10_000 + i)))
    }))
    .await;
    for w in &watchers {
        let mut view = w.watch();
        wait_view(&mut view, Duration::from_secs(30), |v| v.service("chat").count() == 200).await;
    }
    eprintln!("200 registrations seen by 3 watchers in {:?}", started.elapsed());
}

async fn futures_join<F: std::future::Future<Output = Result<(), registry::RegistryError>>>(
    futs: impl Iterator<Item = F>,
) {
    for f in futs.collect::<Vec<_>>() {
        f.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_claim_of_one_instance_is_refused_until_the_first_lets_go() {
    let etcd = Etcd::start().await;
    let first = EtcdRegistry::start(config(&etcd.url())).unwrap();
    let second = EtcdRegistry::start(config(&etcd.url())).unwrap();
    let mut view = first.watch();
    let mut mine = InstanceRecord::new("chat", "10.77.0.11:7101", "10.77.0.11:7101");
    mine.host = "gpu-1".into();
    let theirs = InstanceRecord { host: "gpu-2".into(), ..mine.clone() };
    first.register(mine.clone()).await.unwrap();
    wait_view(&mut view, Duration::from_secs(5), |v| v.service("chat").next() == Some(&mine)).await;

    // A second host with the same address: refused, saying why, and the
    // first host's record stays as it was.
    second.register(theirs.clone()).await.unwrap();
    let mut state = second.registrar_state();
    let held =
        |s: &RegistrarState| matches!(s, RegistrarState::Disconnected(why) if why.contains("held by another process"));
    // The borrow `wait_for` returns is dropped at once: held, it would
    // block the registrar's next state change.
    let refused = tokio::time::timeout(Duration::from_secs(5), state.wait_for(held)).await.is_ok_and(|r| r.is_ok());
    assert!(refused, "the second claim was not refused: {:?}", *second.registrar_state().borrow());
    assert_eq!(view.borrow().service("chat").collect::<Vec<_>>(), vec![&mine]);

    // Once the first lets go, the second's record goes in.
    first.shutdown().await.unwrap();
    wait_view(&mut view, Duration::from_secs(5), |v| v.service("chat").next() == Some(&theirs)).await;
}
