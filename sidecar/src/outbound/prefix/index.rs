//! Which instances recently received which prefix blocks: a fixed-size,
//! set-associative table (like a CPU cache), so its memory is set once by
//! `routing.prefix_index_blocks` and never grows.
//!
//! A block's name picks a set of [`WAYS`] entries; a new name replaces the
//! set's least recently used entry. Each entry remembers up to [`HOLDERS`]
//! instances with when each last received the block, the oldest replaced
//! first. An entry costs 8 bytes of name, 4 of last use and 8 per holder,
//! 44 bytes: 44 MB at a million blocks. Names, uses and holders sit apart,
//! so looking a name up reads one cache line (a set's eight names), a hit
//! one more, and choosing the entry to replace one more (a set's uses).
//!
//! Instances are remembered by a holder id ([`new_holder_id`]) that an
//! instance drops when it leaves or is ejected (its node's cache is then
//! presumed lost): entries naming it are not deleted but no candidate
//! matches them any more, and they age out like any other.

use std::sync::atomic::{AtomicU32, Ordering};

/// Entries per set: eight names fill one 64-byte cache line.
pub const WAYS: usize = 8;

/// Instances remembered per block: a hot prefix spreads to a few instances
/// when one is saturated; more would cost memory for prefixes that rarely
/// live on more than a handful of instances at once.
pub const HOLDERS: usize = 4;

/// A new id for an instance as a holder of prefix blocks; never 0 (an empty
/// holder). After 2^32 - 1 instances and ejections a stale id could come
/// back: it would only misdirect a hint.
pub fn new_holder_id() -> u32 {
    static NEXT: AtomicU32 = AtomicU32::new(1);
    loop {
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        if id != 0 {
            return id;
        }
    }
}

pub struct PrefixIndex {
    /// Block names, `WAYS` per set; 0 is an empty entry.
    names: Vec<u64>,
    /// Per entry: when it was last recorded (a tick).
    used_at: Vec<u32>,
    /// Per entry: holders packed as `id << 32 | tick`; 0 is none.
    holders: Vec<[u64; HOLDERS]>,
    sets: usize,
    /// Counts recordings; ages are differences (wrapping), so a wrap after
    /// 2^32 requests misjudges only entries older than 2^31 of them.
    tick: u32,
    used: usize,
}

impl PrefixIndex {
    /// An index of at most `blocks` entries (rounded down to whole sets).
    /// Zeroed memory: the system commits its pages as entries fill them.
    pub fn new(blocks: usize) -> Self {
        let sets = (blocks / WAYS).max(1);
        let entries = sets * WAYS;
        Self {
            names: vec![0; entries],
            used_at: vec![0; entries],
            holders: vec![[0; HOLDERS]; entries],
            sets,
            tick: 0,
            used: 0,
        }
    }

    /// Entries in use.
    pub fn len(&self) -> usize {
        self.used
    }

    pub fn is_empty(&self) -> bool {
        self.used == 0
    }

    /// The bytes its tables take, whether the pages are committed yet or not.
    pub fn bytes(&self) -> usize {
        self.names.capacity() * size_of::<u64>()
            + self.used_at.capacity() * size_of::<u32>()
            + self.holders.capacity() * size_of::<[u64; HOLDERS]>()
    }

    /// For each holder id in `ids`, how many of `blocks` from the first on
    /// it holds in a row (0 for an id not holding the first block).
    pub fn runs(&self, blocks: &[u64], ids: &[u32]) -> Vec<usize> {
        let mut runs = vec![0; ids.len()];
        // Candidates still matching: at most `HOLDERS` after the first block.
        let mut alive: Vec<usize> = (0..ids.len()).collect();
        for (i, &name) in blocks.iter().enumerate() {
            let Some(entry) = self.find(key(name)) else { break };
            let held = &self.holders[entry];
            alive.retain(|&c| held.iter().any(|&h| h != 0 && holder(h) == ids[c]));
            if alive.is_empty() {
                break;
            }
            alive.iter().for_each(|&c| runs[c] = i + 1);
        }
        runs
    }

    /// Notes that the instance `id` has just received `blocks`.
    pub fn record(&mut self, blocks: &[u64], id: u32) {
        self.tick = self.tick.wrapping_add(1);
        let packed = u64::from(id) << 32 | u64::from(self.tick);
        for &name in blocks {
            let entry = match self.find(key(name)) {
                Some(entry) => entry,
                None => self.claim(key(name)),
            };
            self.used_at[entry] = self.tick;
            let held = &mut self.holders[entry];
            let slot = match held.iter().position(|&h| h != 0 && holder(h) == id) {
                Some(slot) => slot,
                None => oldest(held, self.tick),
            };
            held[slot] = packed;
        }
    }

    /// Notes that the instance `id` no longer holds the block `name`.
    pub fn forget(&mut self, name: u64, id: u32) {
        if let Some(entry) = self.find(key(name)) {
            self.holders[entry].iter_mut().filter(|h| **h != 0 && holder(**h) == id).for_each(|h| *h = 0);
        }
    }

    fn set(&self, key: u64) -> std::ops::Range<usize> {
        // Fibonacci hashing spreads even names that are not hashes (tests'
        // 1, 2, 3...); its high bits scaled to the set count (any count).
        let mixed = key.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let set = ((u128::from(mixed) * self.sets as u128) >> 64) as usize;
        set * WAYS..(set + 1) * WAYS
    }

    fn find(&self, key: u64) -> Option<usize> {
        let set = self.set(key);
        let start = set.start;
        self.names[set].iter().position(|&n| n == key).map(|way| start + way)
    }

    /// An entry for a new name: an empty one, or the set's least recently used.
    fn claim(&mut self, key: u64) -> usize {
        let set = self.set(key);
        let tick = self.tick;
        let entry = set.max_by_key(|&e| match self.names[e] {
            0 => u32::MAX,
            _ => tick.wrapping_sub(self.used_at[e]),
        });
        let entry = entry.expect("a set is never empty");
        if self.names[entry] == 0 {
            self.used += 1;
        }
        self.names[entry] = key;
        self.holders[entry] = [0; HOLDERS];
        entry
    }
}

/// A name as stored: never 0, which marks an empty entry.
fn key(name: u64) -> u64 {
    name.max(1)
}

fn holder(packed: u64) -> u32 {
    (packed >> 32) as u32
}

/// Recordings since `packed` was written; an empty holder is oldest.
fn age(packed: u64, tick: u32) -> u32 {
    match packed {
        0 => u32::MAX,
        _ => tick.wrapping_sub(packed as u32),
    }
}

/// The holder to replace: an empty one, or the one not refreshed longest.
fn oldest(held: &[u64; HOLDERS], tick: u32) -> usize {
    (0..HOLDERS).max_by_key(|&i| age(held[i], tick)).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(from: u64, n: u64) -> Vec<u64> {
        (from..from + n).map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15)).collect()
    }

    #[test]
    fn runs_count_leading_blocks_per_holder() {
        let mut index = PrefixIndex::new(1024);
        let prompt = names(1, 10);
        index.record(&prompt[..6], 7);
        index.record(&prompt[..3], 8);
        index.record(&prompt[4..], 9);
        assert_eq!(index.runs(&prompt, &[7, 8, 9, 10]), vec![6, 3, 0, 0]);
        assert_eq!(index.len(), 10);
        assert_eq!(index.runs(&names(100, 4), &[7]), vec![0]);
    }

    #[test]
    fn the_table_never_holds_more_than_its_size_and_keeps_the_recent() {
        let mut index = PrefixIndex::new(4096);
        let bytes = index.bytes();
        assert_eq!(bytes, 4096 * 44);
        for i in 0..100 {
            index.record(&names(i * 1000, 1000), 1);
        }
        assert!(index.len() <= 4096, "{} entries", index.len());
        assert_eq!(index.bytes(), bytes, "the tables never grow");
        // The last request's blocks survived the churn (each replaced an
        // older entry of its set); the first request's mostly did not.
        let last = names(99_000, 1000);
        assert_eq!(index.runs(&last, &[1]), vec![1000]);
        assert!(index.runs(&names(0, 1000), &[1])[0] < 10);
    }

    #[test]
    fn a_hot_block_keeps_its_most_recent_holders() {
        let mut index = PrefixIndex::new(1024);
        let hot = names(5, 2);
        for id in 1..=6 {
            index.record(&hot, id);
        }
        index.record(&hot, 3); // refreshed: it stays
        index.record(&hot, 7);
        assert_eq!(index.runs(&hot, &[1, 2, 3, 4, 5, 6, 7]), vec![0, 0, 2, 0, 2, 2, 2]);
    }

    #[test]
    fn a_forgotten_block_ends_the_holders_run() {
        let mut index = PrefixIndex::new(1024);
        let prompt = names(1, 6);
        index.record(&prompt, 7);
        index.record(&prompt, 8);
        index.forget(prompt[3], 7);
        assert_eq!(index.runs(&prompt, &[7, 8]), vec![3, 6]);
    }

    #[test]
    fn a_dropped_holder_id_matches_nothing() {
        let mut index = PrefixIndex::new(1024);
        let (old, renewed) = (new_holder_id(), new_holder_id());
        let prompt = names(1, 4);
        index.record(&prompt, old);
        assert_ne!(old, renewed);
        assert_eq!(index.runs(&prompt, &[renewed]), vec![0]);
    }
}
