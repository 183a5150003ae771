//! The response cache's entries: bounded in bytes, least recently used
//! evicted first, each served for at most a TTL after it was stored.
//!
//! Written here rather than taken from a crate: no LRU crate is in the
//! lockfile, and what is needed (byte-weighted LRU plus a TTL) is a hash
//! map and an ordered map of last uses, about a hundred lines.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::key::Key;
use crate::wire::Relayed;

/// Bookkeeping per entry beyond its key and messages: the hash map slot
/// (key handle, entry), the order map's node share (tick, key handle) and
/// the message slice's header; rounded up, so the bound errs low.
const ENTRY_OVERHEAD: usize = 160;

/// A response, as the messages it was streamed in.
pub type Response = Arc<[Relayed]>;

struct Entry {
    response: Response,
    bytes: usize,
    stored: Instant,
    /// Its place in the use order.
    tick: u64,
}

pub struct Store {
    max_bytes: usize,
    ttl: Duration,
    entries: HashMap<Key, Entry>,
    /// Entries by last use, oldest first.
    order: BTreeMap<u64, Key>,
    tick: u64,
    bytes: usize,
}

/// Bytes `response` holds under `key`, bookkeeping included.
pub fn weight(key: &Key, response: &[Relayed]) -> usize {
    let messages: usize =
        response.iter().map(|m| size_of::<Relayed>() + m.encoded().len() + size_of_val(m.token_ids())).sum();
    ENTRY_OVERHEAD + key.len() + messages
}

impl Store {
    pub fn new(max_bytes: usize, ttl: Duration) -> Self {
        Self { max_bytes, ttl, entries: HashMap::new(), order: BTreeMap::new(), tick: 0, bytes: 0 }
    }

    /// Bytes held now.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The response under `key`, if stored less than a TTL before `now`;
    /// marks it most recently used. An expired entry is dropped.
    pub fn get(&mut self, key: &Key, now: Instant) -> Option<Response> {
        let entry = self.entries.get(key)?;
        if now.saturating_duration_since(entry.stored) >= self.ttl {
            self.remove(key);
            return None;
        }
        let old = entry.tick;
        self.tick += 1;
        let tick = self.tick;
        let entry = self.entries.get_mut(key)?;
        entry.tick = tick;
        let response = entry.response.clone();
        let moved = self.order.remove(&old)?;
        self.order.insert(tick, moved);
        Some(response)
    }

    /// Stores `response` under `key` (replacing any entry there), evicting
    /// the least recently used entries until it fits. Returns how many were
    /// evicted. A response over an eighth of the cache is not stored: one
    /// long answer must not flush hundreds of short ones.
    pub fn put(&mut self, key: Key, response: Response, now: Instant) -> usize {
        let bytes = weight(&key, &response);
        if bytes > self.max_bytes / 8 {
            return 0;
        }
        self.remove(&key);
        let mut evicted = 0;
        while self.bytes + bytes > self.max_bytes {
            let Some((_, oldest)) = self.order.pop_first() else { break };
            if let Some(gone) = self.entries.remove(&oldest) {
                self.bytes -= gone.bytes;
                evicted += 1;
            }
        }
        self.tick += 1;
        self.order.insert(self.tick, key.clone());
        self.entries.insert(key, Entry { response, bytes, stored: now, tick: self.tick });
        self.bytes += bytes;
        evicted
    }

    fn remove(&mut self, key: &Key) {
        if let Some(gone) = self.entries.remove(key) {
            self.order.remove(&gone.tick);
            self.bytes -= gone.bytes;
        }
    }
}

#[cfg(test)]
mod tests {
    use mesh_proto::v1::GenerateRequest;

    use super::*;
    use crate::stack::testing::messages;

    fn key(n: u32) -> Key {
        Key::of(&GenerateRequest { model: format!("m{n:03}"), ..Default::default() }).unwrap()
    }

    fn response() -> Response {
        messages(4).into()
    }

    /// A store with room for exactly `n` entries like [`response`].
    fn store_of(n: usize, ttl: Duration) -> Store {
        Store::new(n * weight(&key(0), &response()), ttl)
    }

    #[test]
    fn counts_every_byte_it_holds() {
        let mut store = Store::new(1 << 20, Duration::from_secs(60));
        let now = Instant::now();
        store.put(key(1), response(), now);
        store.put(key(2), response(), now);
        assert_eq!(store.bytes(), 2 * weight(&key(0), &response()));
        let payload: usize = response().iter().map(|m| m.encoded().len()).sum();
        assert!(weight(&key(0), &response()) > ENTRY_OVERHEAD + payload + key(0).len());
        store.put(key(2), response(), now);
        assert_eq!(store.bytes(), 2 * weight(&key(0), &response()), "a replaced entry is not counted twice");
    }

    #[test]
    fn evicts_the_least_recently_used_first() {
        let mut store = store_of(8 * 2, Duration::from_secs(60));
        let now = Instant::now();
        for n in 0..16 {
            assert_eq!(store.put(key(n), response(), now), 0);
        }
        assert!(store.get(&key(0), now).is_some(), "0 is now the most recently used");
        assert_eq!(store.put(key(16), response(), now), 1);
        assert!(store.get(&key(1), now).is_none(), "1 was the least recently used");
        assert!(store.get(&key(0), now).is_some() && store.get(&key(2), now).is_some());
        assert!(store.bytes() <= store.max_bytes);
    }

    #[test]
    fn an_entry_expires_after_its_ttl() {
        let mut store = store_of(16, Duration::from_secs(60));
        let now = Instant::now();
        store.put(key(1), response(), now);
        assert!(store.get(&key(1), now + Duration::from_secs(59)).is_some());
        assert!(store.get(&key(1), now + Duration::from_secs(60)).is_none());
        assert_eq!(store.bytes(), 0, "the expired entry is gone");
    }

    #[test]
    fn a_response_over_an_eighth_of_the_cache_is_not_stored() {
        let mut store = store_of(7, Duration::from_secs(60));
        store.put(key(1), response(), Instant::now());
        assert_eq!(store.bytes(), 0);
    }
}
