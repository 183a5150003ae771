//! The overload scenario, short, against real processes (etcd, synthetic
//! nodes, sidecars): twice the mesh's measured capacity through the mesh and
//! straight to the nodes. Asserts what must hold on any machine: every
//! request is accounted for, the mesh refuses only with RESOURCE_EXHAUSTED
//! and a retry-after hint, its goodput stays at capacity, and its admitted
//! callers wait less than the direct run's. Sub-10 ms latencies are printed,
//! not asserted: this machine is too noisy for that.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bench::load::{Choices, RequestRecord, Status};
use bench::scenario::mesh::MeshArgs;
use bench::scenario::nodes::NodeArgs;
use bench::scenario::{OutArgs, Workload, overload};
use tonic::Code;

fn scratch_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("mesh-overload-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Two synthetic nodes of 32 slots at 50 tokens/s; 32-token requests hold a
/// slot ~0.7 s, so the mesh serves ~94 requests/s and is offered ~188/s.
/// (With 16 slots per node each node sees half the arrivals, a freed slot
/// idles twice as long, and goodput measured 92-94%: too close to 90%.)
fn short_args(out: std::path::PathBuf) -> overload::Args {
    overload::Args {
        nodes: NodeArgs::synthetic(2, 50.0, 32, 128),
        mesh: MeshArgs::new(),
        out: OutArgs { out },
        capacity: None,
        capacity_duration: Duration::from_secs(3),
        load_factor: 2.0,
        duration: Duration::from_secs(4),
        warmup: Duration::from_secs(1),
        probe_rate: 10.0,
        probe_duration: Duration::from_secs(2),
        // Short, so the direct run's queued requests end by 4 + 3 s at the latest.
        deadline: Duration::from_secs(3),
        max_concurrency: None,
        max_queue: 0,
        max_queue_wait: Duration::from_secs(1),
        workload: Workload { prompt_words: Choices::one(8), max_tokens: Choices::one(32), seed: 7, quiet: true },
    }
}

/// Ids 0..scheduled, each once, and one status each.
fn assert_all_accounted_for(path: &str, records: &[RequestRecord], p: &overload::PathReport) {
    let s = &p.load.summary;
    assert!(p.scheduled > 100, "{path}: only {} arrivals scheduled", p.scheduled);
    assert!(records.iter().map(|r| r.id).eq(0..p.scheduled), "{path}: ids are not 0..{}", p.scheduled);
    assert_eq!(s.sent, p.scheduled, "{path}");
    assert_eq!(s.status_counts.values().sum::<u64>(), p.scheduled, "{path}: {:?}", s.status_counts);
}

#[tokio::test(flavor = "multi_thread")]
async fn overload_through_the_mesh_keeps_goodput_and_refuses_fast() {
    let started = Instant::now();
    let dir = scratch_dir("overload");
    let out = overload::run(short_args(dir.clone())).await.expect("overload scenario");
    let r = &out.report;
    println!("took {:?}", started.elapsed());

    assert!(dir.join("overload.json").exists() && dir.join("overload.svg").exists());
    assert_all_accounted_for("mesh", &out.mesh_records, &r.mesh);
    assert_all_accounted_for("direct", &out.direct_records, &r.direct);
    assert!(r.capacity.run.is_some(), "capacity was measured");
    assert!(
        r.capacity.requests_per_s > 40.0,
        "capacity {:.1}/s: the mesh serves far less than its nodes",
        r.capacity.requests_per_s
    );

    // The mesh refuses what it cannot serve, and says when to come back.
    let mut mesh_not_ok: BTreeMap<&str, u64> = BTreeMap::new();
    for rec in out.mesh_records.iter().filter(|rec| !rec.status.is_ok()) {
        *mesh_not_ok.entry(rec.status.label()).or_default() += 1;
        match rec.status {
            Status::Grpc(Code::ResourceExhausted) => {
                assert!(rec.retry_after_ms.is_some(), "mesh refusal {} without retry-after-ms", rec.id);
                assert_eq!(rec.tokens(), 0, "refused request {} got tokens", rec.id);
            }
            Status::Grpc(Code::DeadlineExceeded) => {}
            other => panic!("mesh request {} ended {other:?}; not OK overall: {mesh_not_ok:?}", rec.id),
        }
    }
    let refused = r.mesh.refusals.by_status.get("RESOURCE_EXHAUSTED").copied().unwrap_or(0);
    assert!(refused * 5 >= r.mesh.scheduled, "2x capacity must refuse a good share: {mesh_not_ok:?}");

    // Goodput at capacity despite the refusals.
    assert!(
        r.mesh.goodput_share >= overload::GOODPUT_SHARE_TARGET,
        "mesh goodput {:.1}% of capacity ({:.0} of {:.0} tokens/s)",
        r.mesh.goodput_share * 100.0,
        r.mesh.goodput.tokens_per_s,
        r.capacity.tokens_per_s
    );

    // Admitted callers of the mesh wait less than those of unprotected nodes.
    assert!(r.mesh.admitted_ttft.count > 0 && r.direct.admitted_ttft.count > 0);
    assert!(
        r.mesh.admitted_ttft.p99_ms < r.direct.admitted_ttft.p99_ms,
        "admitted p99 TTFT: mesh {:.1} ms, direct {:.1} ms",
        r.mesh.admitted_ttft.p99_ms,
        r.direct.admitted_ttft.p99_ms
    );

    // Printed, not asserted (timing on a shared 2-core machine).
    for p in [&r.mesh, &r.direct] {
        println!(
            "{}: refusals {} (p50 {:.2} ms, p99 {:.2} ms, {} over 10 ms); admitted TTFT p99 {:.1} ms = {:.2}x unloaded",
            p.path,
            p.refusals.count,
            p.refusals.latency.p50_ms,
            p.refusals.latency.p99_ms,
            p.refusals.slow,
            p.admitted_ttft.p99_ms,
            p.ttft_multiple
        );
        for c in &p.checks {
            println!("  {}", c.line());
        }
    }
    assert!(started.elapsed() < Duration::from_secs(40), "took {:?}", started.elapsed());
}
