//! What each process costs while a load runs: its peak resident set
//! (sampled, since `VmHWM` is a peak over the whole life and a ramp wants
//! each step's) and the CPU seconds it used, both from `/proc`.

use std::future::Future;
use std::time::Duration;

use serde::Serialize;

/// How often resident memory is sampled during a load.
const SAMPLE_EVERY: Duration = Duration::from_millis(250);

/// A process to watch: its name in reports and its id.
#[derive(Debug, Clone)]
pub struct Watched {
    pub name: String,
    pub pid: u32,
}

/// One process over one load.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Usage {
    pub process: String,
    /// The largest `VmRSS` seen, KiB; 0 when `/proc` could not be read.
    pub peak_rss_kib: u64,
    /// CPU seconds (user + system) used during the load.
    pub cpu_s: f64,
}

/// Runs `work` while sampling `procs`; returns its output and each process's usage.
pub async fn during<F: Future>(procs: &[Watched], work: F) -> (F::Output, Vec<Usage>) {
    let cpu = |p: &Watched| harness::cpu_seconds(p.pid).unwrap_or(0.0);
    let before: Vec<f64> = procs.iter().map(cpu).collect();
    let mut peak = vec![0u64; procs.len()];
    let sample = |peak: &mut Vec<u64>| {
        for (p, max) in procs.iter().zip(peak.iter_mut()) {
            let rss = harness::Memory::of(&p.name, p.pid).map_or(0, |m| m.rss_kib);
            *max = (*max).max(rss);
        }
    };
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tokio::pin!(work);
    let out = loop {
        tokio::select! {
            out = &mut work => break out,
            _ = tick.tick() => sample(&mut peak),
        }
    };
    sample(&mut peak);
    let usage = procs
        .iter()
        .zip(before)
        .zip(peak)
        .map(|((p, before), peak_rss_kib)| Usage { process: p.name.clone(), peak_rss_kib, cpu_s: cpu(p) - before })
        .collect();
    (out, usage)
}

/// The resident set of each process now, KiB (the idle baseline of a ramp).
pub fn rss_now(procs: &[Watched]) -> Vec<u64> {
    procs.iter().map(|p| harness::Memory::of(&p.name, p.pid).map_or(0, |m| m.rss_kib)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn measures_this_process_while_it_works() {
        let me = [Watched { name: "self".into(), pid: std::process::id() }];
        let busy = async {
            let spin = std::time::Instant::now();
            let mut x = 0u64;
            while spin.elapsed() < Duration::from_millis(60) {
                x = std::hint::black_box(x.wrapping_add(1));
            }
            x
        };
        let (_, usage) = during(&me, busy).await;
        assert!(usage[0].peak_rss_kib > 0 && usage[0].cpu_s >= 0.03, "{usage:?}");
        assert!(rss_now(&me)[0] > 0);
    }
}
