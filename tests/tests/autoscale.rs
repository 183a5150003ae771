//! Standby capacity through the whole mesh: a spare `chat` instance
//! registers on standby and is not routed to; the controller (`meshctl
//! autoscale`) activates it when `chat` stays busy and hands it back when
//! `chat` stays idle, once each way; one controller leads, and a second
//! takes over within one lease TTL when the first is killed.

use std::time::{Duration, Instant};

use harness::Spawned;
use mesh_proto::v1::generation_client::GenerationClient;
use mesh_proto::v1::{GenerateRequest, InstanceState};
use mesh_tests::etcd::Etcd;
use mesh_tests::mesh::SidecarProcess;
use mesh_tests::{NodeProcess, bin_dir, prompt_request};
use tonic::transport::Channel;

/// Reports every 200 ms, so the controller sees load within a tick or two.
const REPORTS: &str = "load_report_interval = \"200ms\"\n";
const SPARE: &str = "standby = true\nload_report_interval = \"200ms\"\n";
const LEASE_TTL: Duration = Duration::from_secs(2);

fn controller(etcd: &Etcd, id: &str, extra: &[&str]) -> Spawned {
    let mut cmd = tokio::process::Command::new(bin_dir().join("meshctl"));
    cmd.args(["autoscale", "--etcd", &etcd.url(), "--service", "chat", "--id", id, "--tick", "100ms"]);
    cmd.args(["--lease-ttl", &LEASE_TTL.as_secs().to_string()]).args(extra);
    Spawned::spawn(format!("controller {id}"), cmd).expect("starting meshctl autoscale")
}

async fn chat_node() -> NodeProcess {
    let args =
        ["--backend", "synthetic", "--model-name", "chat", "--synthetic-tokens-per-sec", "20", "--max-running", "2"];
    NodeProcess::start(&args).await
}

/// Streams `n` calls of `tokens` tokens each (20 tokens a second) at once,
/// in tasks (a queued call's headers come only once it has a slot).
fn streams(client: &GenerationClient<Channel>, n: usize, tokens: u32) -> Vec<tokio::task::JoinHandle<()>> {
    let call = |i: usize| {
        let mut client = client.clone();
        let req = GenerateRequest { model: "chat".into(), ..prompt_request(&format!("busy {i}"), tokens) };
        async move {
            if let Ok(response) = client.generate(req).await {
                let mut stream = response.into_inner();
                while let Ok(Some(_)) = stream.message().await {}
            }
        }
    };
    (0..n).map(|i| tokio::spawn(call(i))).collect()
}

async fn spare_state(client: &SidecarProcess, spare: &str) -> Option<u32> {
    client.instances().await.into_iter().find(|i| i.instance_id == spare).map(|i| i.in_flight)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_busy_service_wakes_its_spare_once_and_hands_it_back_once_idle() {
    let etcd = Etcd::start().await;
    let (primary, spare_node) = (chat_node().await, chat_node().await);
    let _a = SidecarProcess::start(&etcd, Some(&primary), REPORTS).await;
    let s = SidecarProcess::start(&etcd, Some(&spare_node), SPARE).await;
    let spare = s.inbound.expect("inbound").to_string();
    let c = SidecarProcess::start(&etcd, None, "").await;
    c.wait_for_instances("chat", 1).await;
    assert_eq!(spare_state(&c, &spare).await, None, "a standby instance is not routed to");
    let ctl = controller(&etcd, "one", &["--window", "1s", "--cooldown", "2s"]);
    ctl.wait_logged("autoscale: leading", Duration::from_secs(10)).await.unwrap();

    // Four long streams on two slots: utilisation 2.0 (two running, two
    // queued at the sidecar). The spare must take traffic within the 1 s
    // window plus a report interval and a tick or two.
    let client = c.client().await;
    let busy_since = Instant::now();
    let first = streams(&client, 4, 60);
    ctl.wait_logged("autoscale: activated", Duration::from_secs(5)).await.unwrap();
    c.wait_for_instances("chat", 2).await;
    let took = busy_since.elapsed();
    eprintln!("spare routed {took:?} after the load began");
    assert!(took < Duration::from_millis(2000), "the spare took traffic {took:?} after the load began");
    let more = streams(&client, 2, 40);
    c.wait_for_instances("chat", 2).await;
    let serving = |all: &[InstanceState]| all.iter().any(|i| i.instance_id == spare && i.in_flight > 0);
    c.wait_for("new calls on the activated spare", serving).await;

    // Idle: after the 2 s cooldown the spare goes back, once.
    first.iter().chain(&more).for_each(|t| t.abort());
    ctl.wait_logged("autoscale: returned", Duration::from_secs(10)).await.unwrap();
    c.wait_for_instances("chat", 1).await;
    assert_eq!(spare_state(&c, &spare).await, None);
    assert_eq!(
        (ctl.logged("autoscale: activated"), ctl.logged("autoscale: returned")),
        (1, 1),
        "{:?}",
        ctl.log_tail(20)
    );
    let status = meshctl_status(&etcd).await;
    assert!(status.contains("STANDBY (spare) [decided]"), "{status}");
    assert!(status.contains("chat: 1 activations, 1 returns"), "{status}");
}

async fn meshctl_status(etcd: &Etcd) -> String {
    let out = tokio::process::Command::new(bin_dir().join("meshctl"))
        .args(["status", "--etcd", &etcd.url()])
        .output()
        .await
        .expect("meshctl status");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_controller_leads_within_one_lease_ttl_of_the_first_being_killed() {
    let etcd = Etcd::start().await;
    let mut first = controller(&etcd, "first", &[]);
    first.wait_logged("autoscale: leading", Duration::from_secs(10)).await.unwrap();
    let second = controller(&etcd, "second", &[]);
    // Give the second time to campaign; it must not lead while the first does.
    let waiting = second.wait_logged("autoscale: leading", LEASE_TTL).await;
    assert!(waiting.is_err(), "two controllers led at once");
    first.kill().unwrap();
    let killed = Instant::now();
    second.wait_logged("autoscale: leading", LEASE_TTL * 2).await.unwrap();
    let took = killed.elapsed();
    // The lease outlives its last keep-alive (sent at most TTL/3 before the
    // kill) by the TTL; etcd checks expiries every 500 ms.
    assert!(took <= LEASE_TTL + Duration::from_millis(700), "took over {took:?} after the kill (TTL {LEASE_TTL:?})");
    let status = meshctl_status(&etcd).await;
    assert!(status.contains("autoscale: leader second"), "{status}");
}
