//! Automatic prefix caching: which blocks of keys and values the node keeps
//! after the sequences that computed them have left, and for which tokens.
//!
//! A block is `BLOCK_TOKENS` positions of every layer. A full block is named
//! by a hash chained over every token up to its end, so equal names mean
//! equal prefixes (up to a 64-bit collision: keyed SipHash with a key drawn
//! at start, so callers cannot aim for one; about 3·10⁻⁸ at a million
//! blocks). A new request reuses the longest run of cached blocks its prompt
//! starts with and prefills only the rest.
//!
//! Accounting, in the node's KV budget (`--max-kv-tokens`): a cached block
//! counts once, however many sequences read it; a block no admitted request
//! holds is idle and counts as free, evicted least recently used when a
//! request needs its room. So the cache never refuses a request that would
//! fit without it. The index lives under the scheduler's lock (admission
//! decides hits); the backend keeps the blocks' contents under the same ids.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, RandomState};

use crate::backend::BlockId;

/// Positions per cached block: the host cache's chunk (a block there is one
/// chunk of every layer; the device pool uses two of its blocks).
pub const BLOCK_TOKENS: usize = crate::model::KV_CHUNK;

/// Names blocks: the chained hash of each full block of a token sequence.
#[derive(Clone, Default)]
pub struct Namer(RandomState);

impl Namer {
    /// Extends `chain` (the names of `tokens`' first blocks) over every
    /// full block of `tokens`.
    pub fn extend(&self, chain: &mut Vec<u64>, tokens: &[u32]) {
        for block in tokens.chunks_exact(BLOCK_TOKENS).skip(chain.len()) {
            let prev = chain.last().copied().unwrap_or(0);
            chain.push(self.0.hash_one((prev, block)));
        }
    }
}

/// A sequence's blocks as the prefix cache sees them.
#[derive(Default)]
pub struct SeqBlocks {
    /// Names of its full blocks so far (its prompt's, then as it grows).
    pub chain: Vec<u64>,
    /// Cached blocks it started from.
    pub reuse: Vec<BlockId>,
    /// Names of the blocks it holds in the index (reused or published).
    pub held: Vec<u64>,
    /// Leading blocks already reused or offered to the cache.
    pub settled: usize,
}

#[derive(Debug)]
struct Entry {
    id: BlockId,
    /// Admitted requests holding it (reading it, or having written it).
    users: u32,
    /// Its key in `idle` while `users` is 0.
    idle_since: u64,
}

#[derive(Debug)]
pub struct PrefixIndex {
    enabled: bool,
    entries: HashMap<u64, Entry>,
    /// Blocks nobody holds, least recently released first: tick → name.
    idle: BTreeMap<u64, u64>,
    tick: u64,
    next_id: BlockId,
    /// Blocks dropped from the index whose contents the backend still holds.
    evicted: Vec<BlockId>,
}

impl PrefixIndex {
    pub fn new(enabled: bool) -> Self {
        Self { enabled, entries: HashMap::new(), idle: BTreeMap::new(), tick: 0, next_id: 0, evicted: Vec::new() }
    }

    /// Positions in cached blocks.
    pub fn cached_tokens(&self) -> usize {
        self.entries.len() * BLOCK_TOKENS
    }

    /// Positions in cached blocks some admitted request holds.
    pub fn held_tokens(&self) -> usize {
        (self.entries.len() - self.idle.len()) * BLOCK_TOKENS
    }

    /// The leading run of `chain` that is cached: its length, and the
    /// positions of its idle blocks (which taking them would hold).
    pub fn probe(&self, chain: &[u64]) -> (usize, usize) {
        let hits: Vec<&Entry> = chain.iter().map_while(|name| self.entries.get(name)).collect();
        let idle = hits.iter().filter(|e| e.users == 0).count();
        (hits.len(), idle * BLOCK_TOKENS)
    }

    /// Holds the blocks `chain` names (all cached: a run `probe` found) for
    /// a request; returns their ids.
    pub fn take(&mut self, chain: &[u64]) -> Vec<BlockId> {
        chain.iter().map(|name| self.hold(*name)).collect()
    }

    fn hold(&mut self, name: u64) -> BlockId {
        let entry = self.entries.get_mut(&name).expect("probed block");
        if entry.users == 0 {
            self.idle.remove(&entry.idle_since);
        }
        entry.users += 1;
        entry.id
    }

    /// Evicts idle blocks, oldest first, until `tokens` positions are free
    /// of a budget with `free` positions outside the cache's; returns how
    /// many blocks went.
    pub fn make_room(&mut self, tokens: usize, mut free: usize) -> usize {
        let mut evicted = 0;
        while free < tokens {
            let Some((_, name)) = self.idle.pop_first() else { break };
            let entry = self.entries.remove(&name).expect("idle block is cached");
            self.evicted.push(entry.id);
            free += BLOCK_TOKENS;
            evicted += 1;
        }
        evicted
    }

    /// Caches a block a request just wrote, held by that request; `None`
    /// when the cache is off or already has it (from another request).
    pub fn publish(&mut self, name: u64) -> Option<BlockId> {
        if !self.enabled || self.entries.contains_key(&name) {
            return None;
        }
        let id = self.next_id;
        self.next_id += 1;
        self.entries.insert(name, Entry { id, users: 1, idle_since: 0 });
        Some(id)
    }

    /// Takes back a block `publish` just cached (the backend could not keep it).
    pub fn withdraw(&mut self, name: u64) {
        self.entries.remove(&name);
    }

    /// A request that held these blocks (`names`, in chain order) has left.
    /// A chain's last block becomes idle first, so eviction shortens a
    /// cached prefix from its end: a chain without its first block could
    /// never be hit again.
    pub fn release(&mut self, names: &[u64]) {
        for name in names.iter().rev() {
            let Some(entry) = self.entries.get_mut(name) else { continue };
            entry.users -= 1;
            if entry.users == 0 {
                self.tick += 1;
                entry.idle_since = self.tick;
                self.idle.insert(self.tick, *name);
            }
        }
    }

    /// Ids of evicted blocks whose contents the backend may now drop.
    pub fn take_evicted(&mut self) -> Vec<BlockId> {
        std::mem::take(&mut self.evicted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(namer: &Namer, tokens: &[u32]) -> Vec<u64> {
        let mut chain = Vec::new();
        namer.extend(&mut chain, tokens);
        chain
    }

    #[test]
    fn names_chain_over_every_earlier_token() {
        let namer = Namer::default();
        let a: Vec<u32> = (0..100).collect();
        let mut b = a.clone();
        b[40] = 7; // in the second block
        let (ca, cb) = (chain(&namer, &a), chain(&namer, &b));
        assert_eq!(ca.len(), 3, "only full blocks are named");
        assert_eq!(ca[0], cb[0]);
        assert_ne!(ca[1], cb[1]);
        assert_ne!(ca[2], cb[2], "a change names every later block anew");
        let mut grown = ca.clone();
        namer.extend(&mut grown, &(0..130).collect::<Vec<u32>>());
        assert_eq!(&grown[..3], &ca[..], "extending keeps the names it has");
        assert_eq!(grown.len(), 4);
    }

    #[test]
    fn idle_blocks_count_as_free_and_go_oldest_first() {
        let mut index = PrefixIndex::new(true);
        let first = index.publish(1).unwrap();
        index.publish(2).unwrap();
        assert_eq!(index.publish(2), None, "cached once");
        assert_eq!(index.held_tokens(), 2 * BLOCK_TOKENS);
        index.release(&[1]);
        index.release(&[2]);
        assert_eq!((index.held_tokens(), index.cached_tokens()), (0, 2 * BLOCK_TOKENS));
        assert_eq!(index.probe(&[1, 2, 3]), (2, 2 * BLOCK_TOKENS));
        assert_eq!(index.take(&[2]).len(), 1);
        assert_eq!(index.make_room(BLOCK_TOKENS, 0), 1);
        assert_eq!(index.take_evicted(), [first], "the idle block went, the held one stayed");
        assert_eq!(index.probe(&[1, 2]), (0, 0));
        assert_eq!(index.probe(&[2]), (1, 0));
        assert_eq!(index.make_room(BLOCK_TOKENS, 0), 0, "a held block is never evicted");
    }

    #[test]
    fn eviction_shortens_a_prefix_from_its_end() {
        let mut index = PrefixIndex::new(true);
        let chain = [10, 11, 12];
        for name in chain {
            index.publish(name).unwrap();
        }
        index.release(&chain);
        assert_eq!(index.make_room(BLOCK_TOKENS, 0), 1);
        assert_eq!(index.probe(&chain), (2, 2 * BLOCK_TOKENS), "the first two blocks still hit");
    }

    #[test]
    fn off_caches_nothing() {
        let mut index = PrefixIndex::new(false);
        assert_eq!(index.publish(1), None);
        assert_eq!(index.probe(&[1]), (0, 0));
    }
}
