//! Cache-aware routing, measured: the prefix index's memory at a million
//! distinct blocks and more, and what routing one request costs (naming
//! its blocks, scoring, recording) over 3 and 64 instances. Prints
//! numbers; asserts nothing (not a test, so CI never times it).
//!
//! `cargo run --release -j1 -p sidecar --example prefix_routing`

use std::collections::{HashSet, VecDeque};
use std::time::{Duration, Instant};

use mesh_proto::v1::GenerateRequest;
use mesh_proto::v1::generate_request::Input;
use registry::{InstanceRecord, View};
use sidecar::config::{Outlier, Policy, Routing};
use sidecar::metrics::SidecarMetrics;
use sidecar::outbound::balancer::Balancer;
use sidecar::outbound::prefix::{BLOCK_BYTES, BlockNamer, PrefixIndex};
use sidecar::upstream::Dialer;

/// Blocks per measured request: 24 shared with other requests (one of
/// `PREFIXES` system prompts or conversations), 8 its own.
const SHARED: usize = 24;
const OWN: usize = 8;
const PREFIXES: usize = 1000;
const MEASURED: usize = 100_000;

fn main() {
    println!("cpu: {}", cpu());
    index_memory(1_000_000);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
    rt.block_on(async {
        naming();
        for instances in [3, 64] {
            routing(instances);
        }
    });
}

/// The index sized for 1M blocks, filled with 1M and then 2M distinct ones.
fn index_memory(blocks: usize) {
    let before = rss();
    let mut index = PrefixIndex::new(blocks);
    let mut name = 0x1234_5678_u64;
    for round in 1..=2 {
        let started = Instant::now();
        for request in 0..blocks / 32 {
            let names: Vec<u64> = (0..32).map(|_| next(&mut name)).collect();
            index.record(&names, (request % 64) as u32 + 1);
        }
        let per = started.elapsed() / (blocks / 32) as u32;
        println!(
            "index: {} distinct blocks recorded, {} held, tables {:.1} MiB ({} B/block by design), RSS +{:.1} MiB; {per:?} per 32-block record",
            round * blocks,
            index.len(),
            index.bytes() as f64 / (1 << 20) as f64,
            index.bytes() / blocks,
            (rss() - before) as f64 / (1 << 20) as f64,
        );
    }
}

/// Naming a request's blocks alone, for 32 blocks and the 512-block cap.
fn naming() {
    let namer = BlockNamer::default();
    for blocks in [32, 512] {
        let req = request(text(blocks * BLOCK_BYTES, 1));
        let started = Instant::now();
        let n: usize = (0..10_000).map(|_| namer.blocks(&req).len()).sum();
        println!("naming {} blocks: {:?} per request", n / 10_000, started.elapsed() / 10_000);
    }
}

/// Per request: its blocks, the pick and the recording, with the index
/// first filled to ~1M blocks and a rolling set of streams held open so
/// loads differ and hot prefixes spread.
fn routing(instances: usize) {
    let metrics = SidecarMetrics::new();
    let routing = Routing { policy: Policy::CacheAware, ..Routing::default() };
    let balancer = Balancer::new(&routing, Outlier::default(), metrics.clone(), Dialer::default());
    balancer.update(&view(instances));
    let prefixes: Vec<String> = (0..PREFIXES).map(|i| text(SHARED * BLOCK_BYTES, i as u64)).collect();
    let mut open = VecDeque::new();
    let mut times = Vec::with_capacity(MEASURED);
    let warm_up = 1_000_000 / OWN;
    for i in 0..warm_up + MEASURED {
        // Popular prefixes more often: the square of a uniform draw.
        let u = (i * 7919 % PREFIXES) as f64 / PREFIXES as f64;
        let shared = &prefixes[(u * u * PREFIXES as f64) as usize];
        let req = request(format!("{shared}{}", text(OWN * BLOCK_BYTES, 1_000_000 + i as u64)));
        let started = Instant::now();
        let blocks = balancer.prefix_blocks(&req);
        let chosen = balancer.pick("chat", &HashSet::new(), &blocks).expect("an instance").instance;
        let took = started.elapsed();
        if i >= warm_up {
            times.push(took);
        }
        open.push_back(chosen.start());
        if open.len() > 4 * instances {
            open.pop_front();
        }
    }
    times.sort();
    let at = |q: f64| times[((times.len() - 1) as f64 * q) as usize];
    let outcome = |o| metrics.prefix_routed.get_or_create(&metrics.prefix("chat", o)).get();
    println!(
        "routing over {instances} instances, {} blocks a request, index at {} blocks: p50 {:?} p99 {:?} max {:?}; hit {} spread {} miss {}",
        SHARED + OWN,
        metrics.prefix_index_blocks.get(),
        at(0.5),
        at(0.99),
        times.last().copied().unwrap_or(Duration::ZERO),
        outcome("hit"),
        outcome("spread"),
        outcome("miss"),
    );
}

/// `n` instances whose nodes hold the node's default 65,536 KV tokens, so
/// routing replays their caches too.
fn view(n: usize) -> View {
    let instances = (0..n)
        .map(|i| {
            let mut r = InstanceRecord::new("chat", format!("i{i}"), format!("127.0.0.1:{}", 9000 + i));
            r.kv_tokens = 65_536;
            (("chat".to_string(), r.instance_id.clone()), r)
        })
        .collect();
    View { instances, etcd_reachable: true, synced_at: None }
}

fn request(prompt: String) -> GenerateRequest {
    GenerateRequest { model: "chat".into(), input: Some(Input::Prompt(prompt)), ..Default::default() }
}

/// `len` letters drawn from `seed`.
fn text(len: usize, seed: u64) -> String {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len).map(|_| char::from(b'a' + (next(&mut state) % 26) as u8)).collect()
}

/// xorshift64*.
fn next(state: &mut u64) -> u64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_F491_4F6C_DD1D)
}

/// Resident memory in bytes (Linux; 0 elsewhere).
fn rss() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    statm.split_whitespace().nth(1).and_then(|p| p.parse::<usize>().ok()).unwrap_or(0) * 4096
}

fn cpu() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = info.lines().find(|l| l.starts_with("model name"));
    model.and_then(|l| l.split(':').nth(1)).unwrap_or("unknown").trim().to_string()
}
