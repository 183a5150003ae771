//! What each instance's node still holds, as the router models it.
//!
//! A node keeps prefix blocks within its KV budget (`max_kv_tokens`, which
//! its sidecar registers) and evicts the least recently used. The index
//! alone remembers every block it ever sent an instance, so once a node's
//! share of prompts outgrows its budget the index keeps sending requests
//! to blocks long evicted there, and the node keeps evicting the next
//! prompt to recompute them. Replaying the node's LRU on the blocks the
//! router sends it tells the router two things: which blocks the node has
//! most likely dropped (the index forgets them for that instance), and
//! what sending a new prompt there would push out (an idle node's cache
//! has room; a busy one's least recent block may be in use every minute).
//!
//! The replay is approximate: text blocks stand for the node's 32-token
//! blocks one for one, running sequences' own blocks are not counted, and
//! another router sending the same node blocks is not seen. A wrong guess
//! costs what no model costs: a request sent where its blocks were evicted
//! prefills them, and one sent elsewhere prefills them there.
//!
//! Written here rather than taken from a crate (as the response cache's
//! store): no LRU crate is in the lockfile, and this is a hash map and an
//! ordered map of last uses.

use std::collections::{BTreeMap, HashMap};

/// Tokens per node cache block: what one text block stands for.
pub const TOKENS_PER_BLOCK: u64 = 32;

/// Blocks modeled per instance at most (512k tokens): about 80 bytes each
/// (a hash map entry and an ordered map entry), 1.3 MB for an instance
/// with that much cache. A larger cache is modeled as this large: the
/// model then forgets blocks the node may still hold.
pub const MAX_MODELED_BLOCKS: usize = 16 * 1024;

/// Instances modeled at most; past it the one sent nothing longest is
/// dropped (an instance that left, or an id renewed by an ejection).
pub const MAX_MODELS: usize = 256;

#[derive(Default)]
pub struct Resident {
    models: HashMap<u32, Lru>,
}

struct Lru {
    capacity: usize,
    /// Block name -> when last sent there.
    at: HashMap<u64, u64>,
    /// The same, by time: the least recent first.
    order: BTreeMap<u64, u64>,
    last: u64,
}

impl Lru {
    fn new(capacity: usize) -> Self {
        Self { capacity, at: HashMap::new(), order: BTreeMap::new(), last: 0 }
    }

    /// Marks `blocks` used at `now` (which grows by at least one per
    /// block); returns the blocks they evict, least recent first.
    fn touch(&mut self, blocks: &[u64], now: u64) -> Vec<u64> {
        for (k, &name) in blocks.iter().enumerate() {
            let at = now + k as u64;
            if let Some(old) = self.at.insert(name, at) {
                self.order.remove(&old);
            }
            self.order.insert(at, name);
        }
        self.last = now + blocks.len() as u64;
        let mut evicted = Vec::new();
        while self.at.len() > self.capacity {
            let Some((_, name)) = self.order.pop_first() else { break };
            self.at.remove(&name);
            evicted.push(name);
        }
        evicted
    }

    /// When the block that `incoming` new blocks would evict was last
    /// used; `None` while there is room for them.
    fn victim(&self, incoming: usize) -> Option<u64> {
        let over = (self.at.len() + incoming).checked_sub(self.capacity).filter(|&o| o > 0)?;
        self.order.keys().nth(over.min(self.order.len()).saturating_sub(1)).copied()
    }
}

impl Resident {
    /// Notes that `id`, whose node caches `kv_tokens` (0: unknown, not
    /// modeled), was sent `blocks` at `now`; returns the blocks the node
    /// has most likely evicted for them.
    pub fn touch(&mut self, id: u32, kv_tokens: u64, blocks: &[u64], now: u64) -> Vec<u64> {
        let capacity = (kv_tokens / TOKENS_PER_BLOCK).min(MAX_MODELED_BLOCKS as u64) as usize;
        if capacity == 0 {
            return Vec::new();
        }
        if !self.models.contains_key(&id) && self.models.len() >= MAX_MODELS {
            let stalest = self.models.iter().min_by_key(|(_, m)| m.last).map(|(&id, _)| id);
            stalest.map(|id| self.models.remove(&id));
        }
        let model = self.models.entry(id).or_insert_with(|| Lru::new(capacity));
        model.capacity = capacity;
        model.touch(blocks, now)
    }

    /// How long before `now` the block that `incoming` new blocks would
    /// evict at `id` was last used: `u64::MAX` while the node has room
    /// (or is not modeled).
    pub fn victim_age(&self, id: u32, incoming: usize, now: u64) -> u64 {
        let victim = self.models.get(&id).and_then(|m| m.victim(incoming));
        victim.map_or(u64::MAX, |at| now.saturating_sub(at))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_past_the_budget_are_evicted_least_recent_first() {
        let mut r = Resident::default();
        let kv = 4 * TOKENS_PER_BLOCK;
        assert!(r.touch(1, kv, &[10, 11, 12], 0).is_empty());
        assert_eq!(r.victim_age(1, 1, 3), u64::MAX, "room for one more");
        // 10 is used again: 11 is now the least recent.
        assert!(r.touch(1, kv, &[10], 3).is_empty());
        assert_eq!(r.victim_age(1, 2, 4), 4 - 1, "two new blocks push out 11, last used at 1");
        assert_eq!(r.touch(1, kv, &[20, 21], 4), vec![11]);
        assert_eq!(r.touch(1, kv, &[22, 23, 24], 6), vec![12, 10, 20]);
    }

    #[test]
    fn an_unknown_budget_is_not_modeled() {
        let mut r = Resident::default();
        assert!(r.touch(1, 0, &[1, 2, 3], 0).is_empty());
        assert_eq!(r.victim_age(1, 100, 10), u64::MAX);
    }

    #[test]
    fn models_are_bounded_in_count() {
        let mut r = Resident::default();
        for id in 0..MAX_MODELS as u32 + 10 {
            r.touch(id, 1024, &[u64::from(id)], u64::from(id));
        }
        assert_eq!(r.models.len(), MAX_MODELS);
        assert!(!r.models.contains_key(&0), "the instance sent nothing longest went first");
        assert!(r.models.contains_key(&(MAX_MODELS as u32 + 9)));
    }
}
