//! Cache-aware routing (`routing.policy = "cache-aware"`): a request goes
//! where its prompt's prefix was recently sent, so the node there skips
//! prefilling it, unless that instance is loaded enough to cost more than
//! the prefill saves.
//!
//! The rule prices both sides in the load score's own unit, the expected
//! wait for a first token. `Instance::load` is `(streams + queue + 1) × t`,
//! with `t` the instance's TTFT per unit of weight: one typical request's
//! worth. A request whose first `m` blocks an instance holds skips their
//! prefill there; if a typical request of the service has `n̄` blocks and a
//! whole prefill of one takes `c` (the service's cold TTFT: a moving
//! average of first tokens of requests sent where none of their blocks
//! were), the `m` blocks are worth `m / n̄ × c`. So each contender costs
//!
//! ```text
//! cost = load − m / n̄ × c
//! ```
//!
//! Priced at the instance's own `t` instead (before a cold TTFT is
//! measured, it still is), the credit shrank as the cache worked: warm
//! first tokens are a tenth of cold ones, so a holder with one stream more
//! than an idle peer lost the request to it, and three nodes hit no more
//! often than under least-loaded (62.9% against 61.2% in `scenario prefix`).
//!
//! and the cheapest wins (ties to the longer match). The contenders are the
//! two instances power-of-two-choices drew, as under least-loaded, plus
//! every instance the index says holds the first block. Consequences:
//! - no match anywhere: the request is placed ([`place`]): among instances
//!   whose load is within its own prefill of the lightest, the one whose
//!   node cache (as [`resident`] replays it) has room, or else pushes out
//!   the least recently used blocks; least-loaded's order where no cache
//!   tells them apart;
//! - a hot prefix stays on its instance while that one is no more loaded
//!   than the others by `m / n̄` typical requests, and spreads to another
//!   past that (which then holds it too, and both compete on load); an
//!   instance whose replayed cache has no room for the copy costs one
//!   prefill of it more ([`eviction`]: what it pushes out is asked for
//!   again), so a spread goes where it evicts nothing when it can;
//! - a long conversation (`m` several times `n̄`) is worth several queued
//!   requests: resending its history to a fresh instance would prefill all
//!   of it again.
//!
//! `n̄` is a moving average over the service's requests, measured, so the
//! rule needs no per-hardware constant.
//!
//! What the nodes evict, the index learns from the replay of each node's
//! cache ([`resident`]), not from the nodes: their blocks are token blocks
//! the sidecar cannot name. So the index is as stale as that replay is
//! wrong; a wrong guess costs one prefill (a request sent where its blocks
//! were evicted computes them, as it would have anywhere else).

mod blocks;
mod index;
mod resident;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use mesh_proto::v1::GenerateRequest;

pub use blocks::{BLOCK_BYTES, BlockNamer, MAX_BLOCKS};
pub use index::{HOLDERS, PrefixIndex, WAYS, new_holder_id};
use resident::Resident;

use super::instance::Instance;
use crate::metrics::SidecarMetrics;

/// Weight of the newest request in a service's typical block count: about
/// the last 20 requests count.
const TYPICAL_WEIGHT: f64 = 0.05;

/// Weight of the newest cold first token in a service's cold TTFT: about
/// the last 10 cold requests count.
const COLD_WEIGHT: f64 = 0.1;

pub struct PrefixRouting {
    namer: BlockNamer,
    state: Mutex<State>,
    metrics: SidecarMetrics,
}

struct State {
    index: PrefixIndex,
    /// Per service: blocks of a typical request (`n̄`).
    typical: HashMap<String, f64>,
    /// Per service: time to first token of a request sent where none of
    /// its blocks were (a whole prefill), seconds, a moving average.
    cold: HashMap<String, f64>,
    /// Each instance's node cache, replayed.
    resident: Resident,
    /// Blocks recorded so far: the replay's clock.
    clock: u64,
}

/// What the index said about one request's candidates.
pub struct Matches {
    /// The longest run any candidate holds.
    best: usize,
    /// Holder id and run of each candidate holding the first block.
    runs: Vec<(u32, usize)>,
}

impl PrefixRouting {
    /// Routing over an index of at most `index_blocks` blocks.
    pub fn new(index_blocks: usize, metrics: SidecarMetrics) -> Self {
        let state = State {
            index: PrefixIndex::new(index_blocks),
            typical: HashMap::new(),
            cold: HashMap::new(),
            resident: Resident::default(),
            clock: 0,
        };
        Self { namer: BlockNamer::default(), state: Mutex::new(state), metrics }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The request's prefix blocks.
    pub fn blocks(&self, req: &GenerateRequest) -> Vec<u64> {
        self.namer.blocks(req)
    }

    /// Reorders least-loaded's `order` (its two drawn instances first) by
    /// cost, with every instance holding a prefix of `blocks` among the
    /// contenders; when none holds one, places the request ([`place`]).
    pub fn rank(&self, service: &str, order: &mut Vec<&Arc<Instance>>, blocks: &[u64]) -> Matches {
        let ids: Vec<u32> = order.iter().map(|e| e.prefix_holder()).collect();
        let (runs, typical, cold, victims) = {
            let state = self.lock();
            let typical = state.typical.get(service).copied().unwrap_or(blocks.len() as f64);
            let runs = state.index.runs(blocks, &ids);
            // Each instance's replayed cache: what taking the blocks would evict.
            let age = |&id: &u32| state.resident.victim_age(id, blocks.len(), state.clock);
            (runs, typical.max(1.0), state.cold.get(service).copied(), ids.iter().map(age).collect::<Vec<_>>())
        };
        let best = runs.iter().copied().max().unwrap_or(0);
        let matches = Matches { best, runs: ids.into_iter().zip(runs.iter().copied()).filter(|m| m.1 > 0).collect() };
        if best == 0 {
            place(order, &victims, blocks.len() as f64 / typical, cold);
            return matches;
        }
        let over = past_balance(order);
        let size = blocks.len() as f64 / typical;
        let (mut contenders, mut rest, mut demoted) = (Vec::new(), Vec::new(), Vec::new());
        for (i, ((ep, run), over)) in order.drain(..).zip(runs).zip(over).enumerate() {
            // A copy sent where the cache is full pushes out blocks that
            // are likely asked for again: priced as one more prefill.
            let evicts = run == 0 && victims[i] != u64::MAX;
            match (over, i < 2 || run > 0) {
                (true, _) => demoted.push(ep),
                (false, true) => {
                    contenders.push((cost(ep, run, typical, cold) + eviction(ep, evicts, size, cold), run, ep))
                }
                (false, false) => rest.push(ep),
            }
        }
        contenders.sort_by(|a, b| a.0.total_cmp(&b.0).then(b.1.cmp(&a.1)));
        order.extend(contenders.into_iter().map(|c| c.2));
        order.extend(rest);
        order.extend(demoted);
        matches
    }

    /// Counts how the request was routed and records its blocks as held by
    /// `chosen`. True when `chosen` held none of them: its first token
    /// measures a whole prefill ([`PrefixRouting::observe_cold`]).
    pub fn routed(&self, service: &str, blocks: &[u64], matches: &Matches, chosen: &Instance) -> bool {
        let id = chosen.prefix_holder();
        let run = matches.runs.iter().find(|m| m.0 == id).map_or(0, |m| m.1);
        let outcome = match (matches.best, run) {
            (0, _) => "miss",
            (best, run) if run == best => "hit",
            _ => "spread",
        };
        self.metrics.prefix_routed.get_or_create(&self.metrics.prefix(service, outcome)).inc();
        if blocks.is_empty() {
            // Too short to name a block: nothing to record, and not a
            // request length that should make blocks look dear.
            return false;
        }
        let mut state = self.lock();
        state.index.record(blocks, id);
        let now = state.clock;
        for name in state.resident.touch(id, chosen.record.kv_tokens, blocks, now) {
            state.index.forget(name, id);
        }
        state.clock += blocks.len() as u64;
        let n = blocks.len() as f64;
        match state.typical.get_mut(service) {
            Some(typical) => *typical += (n - *typical) * TYPICAL_WEIGHT,
            None => drop(state.typical.insert(service.to_string(), n)),
        }
        self.metrics.prefix_index_blocks.set(state.index.len() as i64);
        run == 0
    }

    /// The first token of a request that was sent where none of its blocks
    /// were: what a whole prefill takes.
    pub fn observe_cold(&self, service: &str, ttft: Duration) {
        let t = ttft.as_secs_f64();
        let mut state = self.lock();
        let cold = state.cold.entry(service.to_string()).or_insert(t);
        *cold += (t - *cold) * COLD_WEIGHT;
    }
}

/// Most streams an instance may carry, as a share of the mean over the
/// service's available instances (this request included), and one more,
/// while a request that matches a cached prefix is routed: past it, an
/// instance goes last, so a hot prefix spreads however light its holder
/// looks (its TTFT, lowered by those very hits, keeps its load score
/// light while it takes ever more).
const BALANCE: f64 = 1.5;
const BALANCE_SLACK: f64 = 1.0;

/// Which of `order` carry more than the balance bound.
fn past_balance(order: &[&Arc<Instance>]) -> Vec<bool> {
    let pending: Vec<f64> = order.iter().map(|e| f64::from(e.pending())).collect();
    let mean_after = (pending.iter().sum::<f64>() + 1.0) / pending.len().max(1) as f64;
    pending.into_iter().map(|p| p + 1.0 > BALANCE * mean_after + BALANCE_SLACK).collect()
}

/// Instances a request none of whose blocks are cached is placed among:
/// the two power-of-two drew and two more.
const PLACES: usize = 4;

/// Places a request no instance holds a block of (its `size` in typical
/// requests): among the first [`PLACES`] of least-loaded's `order` not past
/// the balance bound, those within one such prefill of the lightest's load
/// are as good as each other on wait, and of those the one whose cache
/// loses least goes first: room to spare, else the least recently used
/// victim (`victims`: each one's age, [`Resident::victim_age`]). So new
/// prompts fill idle caches before they push out another prompt's blocks.
/// Where no cache tells the instances apart, least-loaded's order stands.
fn place(order: &mut [&Arc<Instance>], victims: &[u64], size: f64, cold: Option<f64>) {
    let head = order.len().min(PLACES).min(victims.len());
    if victims[..head].iter().all(|&v| v == victims[0]) {
        return; // no cache tells them apart: least-loaded's order stands
    }
    let over = past_balance(order);
    let loads: Vec<f64> = order[..head].iter().map(|e| e.load()).collect();
    let within = |i: usize| !over[i];
    let Some(lightest) = (0..head).filter(|&i| within(i)).map(|i| loads[i]).min_by(f64::total_cmp) else { return };
    let best = (0..head)
        .filter(|&i| within(i) && loads[i] <= lightest + size * prefill_per_request(order[i], cold))
        .min_by(|&a, &b| victims[b].cmp(&victims[a]).then(loads[a].total_cmp(&loads[b])));
    if let Some(best) = best {
        order[..=best].rotate_right(1);
    }
}

/// What sending `size` typical requests' blocks to `ep` costs later when
/// its cache has no room for them: the blocks they push out are computed
/// again when next asked for, about one prefill of that size.
fn eviction(ep: &Instance, evicts: bool, size: f64, cold: Option<f64>) -> f64 {
    match evicts {
        true => size * prefill_per_request(ep, cold),
        false => 0.0,
    }
}

/// One typical request's whole prefill at `ep`: the service's cold TTFT
/// once measured, else the instance's own estimate.
fn prefill_per_request(ep: &Instance, cold: Option<f64>) -> f64 {
    cold.unwrap_or_else(|| ep.ttft_estimate().as_secs_f64()) / f64::from(ep.record.weight.max(1))
}

/// Expected wait for a first token at `ep` less the prefill its `run`
/// cached blocks save (see the module's documentation): priced at the
/// service's cold TTFT, a whole prefill, once one was measured.
fn cost(ep: &Instance, run: usize, typical: f64, cold: Option<f64>) -> f64 {
    ep.load() - run as f64 / typical * prefill_per_request(ep, cold)
}

#[cfg(test)]
mod tests;
