//! Cache-aware picks through the balancer: where a hot prefix goes as
//! load builds up, and that a request with no match is least-loaded's.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;
use crate::config::{Outlier, Policy, Routing};
use crate::outbound::balancer::Balancer;
use crate::outbound::balancer::tests::view;
use crate::upstream::Dialer;

fn cache_aware(instances: usize) -> (Balancer, SidecarMetrics) {
    let metrics = SidecarMetrics::new();
    let routing = Routing { policy: Policy::CacheAware, prefix_index_blocks: 4096, ..Routing::default() };
    let b = Balancer::new(&routing, Outlier::default(), metrics.clone(), Dialer::default());
    b.update(&view(instances));
    (b, metrics)
}

fn prompt(first: u64, n: u64) -> Vec<u64> {
    (first..first + n).collect()
}

fn pick(b: &Balancer, blocks: &[u64]) -> Arc<Instance> {
    b.pick("chat", &HashSet::new(), blocks).expect("an instance").instance
}

fn routed(metrics: &SidecarMetrics, outcome: &'static str) -> u64 {
    metrics.prefix_routed.get_or_create(&metrics.prefix("chat", outcome)).get()
}

#[tokio::test]
async fn a_hot_prefix_sticks_to_one_instance_under_low_load() {
    let (b, metrics) = cache_aware(3);
    let hot = prompt(1, 32);
    let first = pick(&b, &hot);
    for i in 0..50 {
        // Each prompt shares the first 24 blocks and ends its own way.
        let blocks: Vec<u64> = hot[..24].iter().copied().chain(prompt(1000 + i * 8, 8)).collect();
        assert!(Arc::ptr_eq(&pick(&b, &blocks), &first));
    }
    assert_eq!((routed(&metrics, "miss"), routed(&metrics, "hit")), (1, 50));
    assert_eq!(metrics.prefix_index_blocks.get(), 32 + 50 * 8);
}

#[tokio::test]
async fn a_hot_prefix_spreads_when_its_instance_is_much_more_loaded() {
    let (b, metrics) = cache_aware(3);
    let hot = prompt(1, 32);
    let first = pick(&b, &hot);
    // A full match is worth one typical request: one stream more still sticks...
    let _one = first.start();
    assert!(Arc::ptr_eq(&pick(&b, &hot), &first));
    // ...four more do not.
    let _four: Vec<_> = (0..4).map(|_| first.start()).collect();
    let second = pick(&b, &hot);
    assert!(!Arc::ptr_eq(&second, &first));
    assert_eq!(routed(&metrics, "spread"), 1);
    // The second instance holds it now: it is a hit there.
    assert!(Arc::ptr_eq(&pick(&b, &hot), &second));
    assert_eq!(routed(&metrics, "hit"), 2);
}

#[tokio::test]
async fn a_long_match_outweighs_a_few_queued_requests() {
    let (b, _) = cache_aware(3);
    let conversation = prompt(1, 32);
    let first = pick(&b, &conversation);
    // The service's requests are 8 blocks long, typically.
    for i in 0..100 {
        drop(pick(&b, &prompt(10_000 + i * 8, 8)));
    }
    // A busy service: every instance carries 2 streams.
    let mut streams: Vec<_> = b.all().iter().flat_map(|e| [e.start(), e.start()]).collect();
    // 32 blocks are worth ~4 typical requests: 3 streams more still stick...
    streams.extend((0..3).map(|_| first.start()));
    assert!(Arc::ptr_eq(&pick(&b, &conversation), &first));
    // ...5 do not.
    streams.extend((0..2).map(|_| first.start()));
    assert!(!Arc::ptr_eq(&pick(&b, &conversation), &first));
}

#[tokio::test]
async fn a_holder_made_cheap_by_its_hits_still_spreads_past_the_balance_bound() {
    let (b, metrics) = cache_aware(3);
    let hot = prompt(1, 32);
    let first = pick(&b, &hot);
    // Hits make its first tokens 100x faster than the others' cold ones,
    // so its load score stays light however many streams it takes.
    for ep in b.all() {
        let ttft = if Arc::ptr_eq(&ep, &first) { 10 } else { 1000 };
        (0..50).for_each(|_| ep.observe_ttft(Duration::from_millis(ttft)));
    }
    // One stream more: within 1.5x the mean and one, it sticks...
    let mut streams = vec![first.start()];
    assert!(Arc::ptr_eq(&pick(&b, &hot), &first));
    // ...two are past it: the next goes elsewhere.
    streams.push(first.start());
    assert!(!Arc::ptr_eq(&pick(&b, &hot), &first));
    assert_eq!(routed(&metrics, "spread"), 1);
}

#[tokio::test]
async fn no_match_leaves_least_loaded_s_order() {
    let (b, metrics) = cache_aware(3);
    let routing = PrefixRouting::new(4096, metrics.clone());
    let all = b.all();
    let mut order: Vec<&Arc<Instance>> = all.iter().rev().collect();
    let before: Vec<u32> = order.iter().map(|e| e.prefix_holder()).collect();
    let matches = routing.rank("chat", &mut order, &prompt(1, 32));
    assert_eq!(matches.best, 0);
    assert_eq!(order.iter().map(|e| e.prefix_holder()).collect::<Vec<_>>(), before);
    // Through the balancer: the busy instance is avoided as least-loaded does.
    let busy = pick(&b, &prompt(1, 32));
    let _streams: Vec<_> = (0..10).map(|_| busy.start()).collect();
    for i in 0..20 {
        assert!(!Arc::ptr_eq(&pick(&b, &prompt(100 + i * 32, 32)), &busy));
    }
    assert_eq!(routed(&metrics, "miss"), 21);
}

#[tokio::test]
async fn ejected_and_departed_instances_lose_their_prefixes() {
    let (b, metrics) = cache_aware(3);
    let hot = prompt(1, 32);
    let first = pick(&b, &hot);
    let cfg = Outlier::default();
    first.eject("test".into(), &cfg, Instant::now());
    first.probe_result(true, &cfg, Instant::now());
    // Nobody holds the prefix any more: a miss, least-loaded's pick.
    drop(pick(&b, &prompt(1, 32)));
    assert_eq!(routed(&metrics, "miss"), 2);
}

#[tokio::test]
async fn an_instance_that_leaves_and_comes_back_starts_empty() {
    let (b, metrics) = cache_aware(1);
    let hot = prompt(1, 32);
    drop((pick(&b, &hot), pick(&b, &hot)));
    assert_eq!((routed(&metrics, "miss"), routed(&metrics, "hit")), (1, 1));
    b.update(&view(0));
    b.update(&view(1));
    drop(pick(&b, &hot));
    assert_eq!(routed(&metrics, "miss"), 2);
}

/// Three instances whose nodes cache `blocks` blocks each.
fn cache_aware_with_room(blocks: u64) -> (Balancer, SidecarMetrics) {
    let (b, metrics) = cache_aware(0);
    let mut v = view(3);
    v.instances.values_mut().for_each(|r| r.kv_tokens = blocks * resident::TOKENS_PER_BLOCK);
    b.update(&v);
    (b, metrics)
}

#[tokio::test]
async fn a_new_prompt_goes_where_the_cache_has_room() {
    let (b, _) = cache_aware_with_room(64);
    let (first, second) = (pick(&b, &prompt(1, 48)), pick(&b, &prompt(1000, 48)));
    assert!(!Arc::ptr_eq(&first, &second), "the second prompt fills the other idle cache");
    let third = pick(&b, &prompt(2000, 48));
    assert!(!Arc::ptr_eq(&third, &first) && !Arc::ptr_eq(&third, &second));
    // Every cache is 48 of 64 blocks full: a fourth prompt pushes out the
    // least recently used, the first prompt's.
    assert!(Arc::ptr_eq(&pick(&b, &prompt(3000, 48)), &first));
}

#[tokio::test]
async fn blocks_a_node_has_evicted_no_longer_attract_their_prompt() {
    let (b, metrics) = cache_aware_with_room(64);
    let hot = prompt(1, 48);
    let home = pick(&b, &hot);
    assert!(Arc::ptr_eq(&pick(&b, &hot), &home));
    assert_eq!((routed(&metrics, "miss"), routed(&metrics, "hit")), (1, 1));
    // The others busy, two more prompts go there and push the hot one out.
    let others: Vec<_> = b.all().into_iter().filter(|e| !Arc::ptr_eq(e, &home)).collect();
    let streams: Vec<_> = others.iter().flat_map(|e| (0..8).map(|_| e.start()).collect::<Vec<_>>()).collect();
    assert!(Arc::ptr_eq(&pick(&b, &prompt(1000, 40)), &home));
    assert!(Arc::ptr_eq(&pick(&b, &prompt(2000, 40)), &home));
    drop(streams);
    drop(pick(&b, &hot));
    assert_eq!((routed(&metrics, "miss"), routed(&metrics, "hit")), (4, 1), "the hot prompt is a miss now");
}

#[tokio::test]
async fn a_hot_prefix_spreads_where_a_cache_has_room_before_a_lighter_full_one() {
    let (b, metrics) = cache_aware_with_room(100);
    let routing = PrefixRouting::new(4096, metrics);
    let all = b.all();
    let (home, full, empty) = (&all[0], &all[1], &all[2]);
    let hot = prompt(1, 48);
    for (blocks, to) in [(hot.clone(), home), (prompt(1000, 60), full)] {
        let mut order = vec![to];
        let matches = routing.rank("chat", &mut order, &blocks);
        routing.routed("chat", &blocks, &matches, to);
    }
    // A whole prefill takes a second. The holder is past the balance
    // bound; the empty cache carries a stream more than the full one, out
    // of whose cache the hot prompt would push that one's own prompt.
    routing.observe_cold("chat", Duration::from_secs(1));
    let _streams: Vec<_> = (0..3).map(|_| home.start()).chain([empty.start()]).collect();
    let mut order = vec![full, empty, home];
    assert_eq!(routing.rank("chat", &mut order, &hot).best, 48);
    assert!(Arc::ptr_eq(order[0], empty), "the spread goes where it evicts nothing");
}
