//! The load generator and the scenario runner against real synthetic node
//! processes: every sent request is accounted for under exactly one status,
//! refusals are recorded as such, the CLI's JSON adds up, the address guard
//! refuses, and the runner's faults and capacity search do what they say.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Output;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bench::load::{Arrival, Choices, LiveCounters, Load, LoadSpec, Mix, Target, arrival_offsets, summarize};
use mesh_proto::v1::FinishReason;
use mesh_tests::{NodeProcess, bin_dir};
use serde_json::Value;

/// Synthetic node with room for 4 running and 4 queued requests at 100
/// tokens/s per stream: a 10-token request holds a slot ~0.1 s, so it
/// serves roughly 35 requests/s and refuses the rest at once.
async fn small_node() -> NodeProcess {
    NodeProcess::start(&[
        "--backend",
        "synthetic",
        "--synthetic-tokens-per-sec",
        "100",
        "--max-running",
        "4",
        "--max-queued",
        "4",
    ])
    .await
}

fn mesh_bench(args: &[&str]) -> Output {
    std::process::Command::new(bin_dir().join("mesh-bench"))
        .args(args)
        .output()
        .expect("running mesh-bench (build it first: cargo build --release -p bench)")
}

fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mesh-bench-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn counts(v: &Value) -> BTreeMap<String, u64> {
    v.as_object().unwrap().iter().map(|(k, n)| (k.clone(), n.as_u64().unwrap())).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn open_loop_past_capacity_accounts_for_every_request() {
    let node = small_node().await;
    let (seed, rate, duration, deadline) = (42, 80.0, Duration::from_secs(2), Duration::from_secs(5));
    let spec = LoadSpec {
        targets: vec![Target::loopback(node.addr).unwrap()],
        arrival: Arrival::Open { rate },
        duration,
        max_requests: 10_000,
        deadline,
        mix: Mix::new(Choices::one(8), Choices::one(10)).unwrap(),
        model: String::new(),
        tenant: "load-test".into(),
        connections: 2,
        seed,
    };
    let scheduled = arrival_offsets(seed, rate, duration, 10_000).len() as u64;
    assert!(scheduled > 100, "{scheduled} arrivals scheduled");
    let load = Load::connect(spec).await.unwrap();
    let live = Arc::new(LiveCounters::default());
    let result = load.run(&live).await.unwrap();

    // Every scheduled arrival was sent once and recorded once.
    assert!(result.records.iter().map(|r| r.id).eq(0..scheduled), "ids are not 0..{scheduled}");
    assert_eq!(live.sent.load(Ordering::Relaxed), scheduled);
    assert_eq!(live.ok.load(Ordering::Relaxed) + live.failed.load(Ordering::Relaxed), scheduled);

    let s = summarize(&result.records, result.elapsed, deadline);
    assert_eq!(s.sent, scheduled);
    assert_eq!(s.status_counts.values().sum::<u64>(), scheduled);
    let (ok, refused) = (s.count("OK"), s.count("RESOURCE_EXHAUSTED"));
    assert_eq!(ok + refused, scheduled, "unexpected statuses: {:?}", s.status_counts);
    assert!(ok >= 40, "{:?}", s.status_counts);
    assert!(refused >= 20, "80/s against ~35/s of capacity must refuse: {:?}", s.status_counts);

    for r in &result.records {
        if r.status.is_ok() {
            assert_eq!((r.tokens(), r.finish_reason), (10, FinishReason::Length), "request {}", r.id);
            assert!(r.ttft().is_some_and(|t| t <= r.total));
        } else {
            assert_eq!(r.tokens(), 0, "a refused request got tokens");
            assert!(r.retry_after_ms.is_some(), "refusal {} without retry-after-ms", r.id);
            assert!(r.total < Duration::from_millis(500), "refusal {} took {:?}", r.id, r.total);
        }
    }
    assert_eq!(s.tokens, ok * 10);
    assert_eq!(s.goodput.requests, ok);
    assert_eq!(s.ttft.count, ok);
    assert_eq!(s.inter_token.count, ok * 9);
    let t = &s.timeline;
    assert_eq!(t.iter().map(|x| x.sent).sum::<u64>(), scheduled);
    assert_eq!(t.iter().map(|x| x.ok).sum::<u64>(), ok);
    assert_eq!(t.iter().map(|x| x.errors).sum::<u64>(), refused);
    assert_eq!(t.iter().map(|x| x.tokens).sum::<u64>(), s.tokens);
}

#[tokio::test(flavor = "multi_thread")]
async fn cli_closed_loop_json_adds_up_and_plots() {
    let node = small_node().await;
    let dir = scratch_dir("cli");
    let svg = dir.join("load.svg");
    let addr = node.addr.to_string();
    let out = mesh_bench(&[
        "load",
        "--target",
        &addr,
        "--concurrency",
        "3",
        "--duration",
        "1s",
        "--max-tokens",
        "5",
        "--prompt-words",
        "4:1,8:1",
        "--json",
        "--quiet",
        "--plot",
        svg.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    let s = &report["summary"];
    let sent = s["sent"].as_u64().unwrap();
    let statuses = counts(&s["status_counts"]);
    // Three streams never exceed the node's four slots: all OK, back to back.
    assert_eq!(statuses, BTreeMap::from([("OK".to_string(), sent)]));
    assert!(sent >= 9, "3 streams of ~60 ms requests for 1 s sent only {sent}");
    assert_eq!(s["tokens"].as_u64(), Some(sent * 5));
    assert_eq!(s["goodput"]["requests"].as_u64(), Some(sent));
    assert_eq!(report["spec"]["mode"], "closed");
    let svg_text = std::fs::read_to_string(&svg).expect("plot written");
    assert!(svg_text.contains("<svg") && svg_text.contains("p99 time to first token"));
}

#[test]
fn cli_refuses_addresses_outside_loopback_and_broad_networks() {
    let out = mesh_bench(&["load", "--target", "8.8.8.8:53", "--rate", "1", "--duration", "1s"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("refusing to send load to 8.8.8.8"), "{err}");

    let out = mesh_bench(&["load", "--target", "10.1.2.3:50051", "--allow-net", "10.0.0.0/8", "--rate", "1"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("too broad"), "{err}");
}

#[test]
fn fault_scenario_kill_fails_only_the_victims_requests() {
    let dir = scratch_dir("fault");
    let out = mesh_bench(&[
        "scenario",
        "fault",
        "--fault",
        "kill",
        "--nodes",
        "2",
        "--rate",
        "30",
        "--duration",
        "3s",
        "--at",
        "1s",
        "--deadline",
        "2s",
        "--max-tokens",
        "5",
        "--quiet",
        "--out",
        dir.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("fault-kill.json")).unwrap()).unwrap();
    assert!(dir.join("fault-kill.svg").exists());
    assert_eq!(report["load"]["marks"][0]["label"], "SIGKILL node 1");
    let at = report["fault_at_s"].as_f64().unwrap();
    assert!((0.95..1.5).contains(&at), "fault at {at} s");

    let per_target = report["per_target"].as_array().unwrap();
    let (survivor, victim) = (&per_target[0], &per_target[1]);
    assert_eq!(victim["victim"], true);
    let after = counts(&victim["sent_after_fault"]);
    assert!(after.values().sum::<u64>() >= 10, "{after:?}");
    assert_eq!(after.get("OK"), None, "a killed node answered: {after:?}");
    let survivor_after = counts(&survivor["sent_after_fault"]);
    assert_eq!(survivor_after.keys().collect::<Vec<_>>(), vec!["OK"], "{survivor_after:?}");

    // Everything sent is accounted for exactly once, per target and overall.
    let summary = &report["load"]["summary"];
    let sent = summary["sent"].as_u64().unwrap();
    let per_target_total: u64 = per_target
        .iter()
        .flat_map(|t| [counts(&t["sent_before_fault"]), counts(&t["sent_after_fault"])])
        .map(|c| c.values().sum::<u64>())
        .sum();
    assert_eq!(per_target_total, sent);
    assert_eq!(counts(&summary["status_counts"]).values().sum::<u64>(), sent);
}

/// A stopped node never answers: its requests must still end at their
/// deadline, counted as DEADLINE_EXCEEDED, and the run must end by itself.
#[test]
fn fault_scenario_stop_ends_the_victims_requests_at_their_deadline() {
    let dir = scratch_dir("stop");
    let started = std::time::Instant::now();
    let out = mesh_bench(&[
        "scenario",
        "fault",
        "--fault",
        "stop",
        "--nodes",
        "2",
        "--rate",
        "20",
        "--duration",
        "2s",
        "--at",
        "500ms",
        "--deadline",
        "1s",
        "--max-tokens",
        "5",
        "--quiet",
        "--out",
        dir.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Load 2 s, the last deadline 1 s later, plus start-up: well under 10 s.
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
    let report: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("fault-stop.json")).unwrap()).unwrap();
    assert_eq!(report["load"]["marks"][0]["label"], "SIGSTOP node 1");
    let per_target = report["per_target"].as_array().unwrap();
    let after = counts(&per_target[1]["sent_after_fault"]);
    assert_eq!(after.keys().collect::<Vec<_>>(), vec!["DEADLINE_EXCEEDED"], "{after:?}");
    assert!(after["DEADLINE_EXCEEDED"] >= 5, "{after:?}");
    assert_eq!(counts(&per_target[0]["sent_after_fault"]).keys().collect::<Vec<_>>(), vec!["OK"]);
    let summary = &report["load"]["summary"];
    assert_eq!(summary["goodput"]["requests"], summary["status_counts"]["OK"]);
    // Nothing outlived its deadline by more than scheduling noise.
    assert!(summary["elapsed_s"].as_f64().unwrap() < 2.0 + 1.0 + 0.5, "{}", summary["elapsed_s"]);
}

#[test]
fn baseline_scenario_finds_the_step_where_refusals_start() {
    let dir = scratch_dir("baseline");
    // 10/s fits the node (~35/s); 80/s does not. The TTFT criterion is
    // unit-tested; here a huge factor leaves only the error criterion.
    let out = mesh_bench(&[
        "scenario",
        "baseline",
        "--nodes",
        "1",
        "--tokens-per-sec",
        "100",
        "--max-running",
        "4",
        "--max-queued",
        "4",
        "--prompt-words",
        "8",
        "--max-tokens",
        "10",
        "--probe-rate",
        "5",
        "--probe-duration",
        "1s",
        "--start-rate",
        "10",
        "--step-factor",
        "8",
        "--max-steps",
        "2",
        "--refine-steps",
        "0",
        "--step-duration",
        "1500ms",
        "--ttft-factor",
        "1000",
        "--quiet",
        "--out",
        dir.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("baseline.json")).unwrap()).unwrap();
    assert!(dir.join("baseline.svg").exists());
    let steps = report["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 2, "{steps:?}");
    assert_eq!((steps[0]["rate_per_s"].as_f64(), steps[0]["pass"].as_bool()), (Some(10.0), Some(true)));
    assert_eq!((steps[1]["rate_per_s"].as_f64(), steps[1]["pass"].as_bool()), (Some(80.0), Some(false)));
    assert!(counts(&steps[1]["status_counts"]).get("RESOURCE_EXHAUSTED").is_some_and(|n| *n > 0));
    assert_eq!(report["capacity_per_s"].as_f64(), Some(10.0));
    assert_eq!(report["saturated"], true);
    assert!(String::from_utf8_lossy(&out.stdout).contains("capacity: 10.0 requests/s"));
}
