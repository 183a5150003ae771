//! The response cache (`[response_cache]`): the client sidecar answers a
//! repeated deterministic request (greedy, or seeded) from the complete
//! response it streamed before, replayed in the original messages at no
//! node's expense, and identical requests in flight together share one
//! upstream stream ([`flight`]).
//!
//! It sits after authentication, so a hit is still made with a valid key
//! that may use the service (and the tenant is known, for the key and the
//! opt-outs), and before the service slot: a hit or a follower opens no
//! upstream stream, so it takes no stream slot and is never refused for a
//! full one; only the one stream a flight opens does. A hit does not reach
//! the instance's sidecar, so it is not charged to the tenant's limits
//! there: those meter node work, and a hit costs none.
//!
//! Never cached: sampled requests, continuations, failed or cancelled
//! streams, services in `services_off`, tenants in `tenants_off`, and a
//! request sent with `cache-control: no-cache` (or `no-store`), which
//! neither reads, joins nor stores (it goes upstream as if the cache were off).

mod flight;
mod key;
mod store;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use mesh_proto::metadata as md;
use tokio::sync::watch;
use tonic::Status;
use tonic::metadata::{MetadataMap, MetadataValue};

use crate::config::ResponseCache as Config;
use crate::metrics::ResponseCacheMetrics;
use crate::stack::{Call, Next, Reply, Step, pass};
use flight::{Flight, Progress};
use key::Key;
use store::{Response, Store};

/// The outbound layer.
pub struct ResponseCache {
    shared: Arc<Shared>,
    services_off: HashSet<String>,
    tenants_off: HashSet<String>,
}

/// What every call and every flight's pump share.
pub struct Shared {
    state: Mutex<State>,
    metrics: ResponseCacheMetrics,
}

struct State {
    store: Store,
    /// Upstream streams open now, by key.
    flights: HashMap<Key, Flight>,
}

/// Where a cacheable call's answer comes from.
enum Source {
    Hit(Response),
    Follow(watch::Receiver<Progress>),
    Lead(Flight, watch::Receiver<Progress>),
}

impl ResponseCache {
    pub fn new(cfg: &Config, metrics: ResponseCacheMetrics) -> Self {
        let state = State { store: Store::new(cfg.max_bytes, cfg.ttl), flights: HashMap::new() };
        Self {
            shared: Arc::new(Shared { state: Mutex::new(state), metrics }),
            services_off: cfg.services_off.iter().cloned().collect(),
            tenants_off: cfg.tenants_off.iter().cloned().collect(),
        }
    }

    /// The call's key, unless the cache must stay out of it.
    fn key(&self, call: &Call) -> Option<Key> {
        let opted_out = call.metadata.get(md::CACHE_CONTROL).and_then(|v| v.to_str().ok()).is_some_and(|v| {
            v.split(',').any(|d| matches!(d.trim().to_ascii_lowercase().as_str(), "no-cache" | "no-store"))
        });
        let off = self.services_off.contains(&call.req.model) || self.tenants_off.contains(&call.req.tenant);
        if opted_out || off { None } else { Key::of(&call.req) }
    }
}

impl Step for ResponseCache {
    async fn call(&self, call: Call, next: Next) -> Result<Reply, Status> {
        let Some(key) = self.key(&call) else { return pass(next, call).await };
        let m = &self.shared.metrics;
        let (mut rx, marker) = match self.shared.source(&key) {
            Source::Hit(response) => {
                m.hits.inc();
                let replay = tokio_stream::iter((0..response.len()).map(move |i| Ok(response[i].clone())));
                return Ok(Reply { metadata: marked(MetadataMap::new(), "hit"), stream: Box::pin(replay) });
            }
            Source::Follow(rx) => {
                m.coalesced.inc();
                (rx, "coalesced")
            }
            Source::Lead(flight, rx) => {
                m.misses.inc();
                flight::launch(self.shared.clone(), key, flight, next, call);
                (rx, "miss")
            }
        };
        let metadata = flight::started(&mut rx).await?;
        Ok(Reply { metadata: marked(metadata, marker), stream: flight::follow(rx) })
    }
}

fn marked(mut metadata: MetadataMap, marker: &'static str) -> MetadataMap {
    metadata.insert(md::RESPONSE_CACHE, MetadataValue::from_static(marker));
    metadata
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A stored response, else the flight to follow, else a new flight to
    /// lead: decided under one lock, so identical calls open one stream.
    fn source(&self, key: &Key) -> Source {
        let mut state = self.state();
        let stored = state.store.get(key, Instant::now());
        self.metrics.bytes.set(state.store.bytes() as i64); // an expired entry may have gone
        if let Some(response) = stored {
            return Source::Hit(response);
        }
        if let Some(flight) = state.flights.get(key) {
            return Source::Follow(flight.subscribe());
        }
        let (flight, rx) = flight::new();
        state.flights.insert(key.clone(), flight.clone());
        Source::Lead(flight, rx)
    }

    /// Ends `flight` (if it is still the one under `key`), storing its
    /// response if given; a later call of the key then hits or leads anew.
    fn land(&self, key: &Key, flight: &Flight, keep: Option<Response>) {
        let mut state = self.state();
        if !state.flights.get(key).is_some_and(|f| Arc::ptr_eq(f, flight)) {
            return;
        }
        state.flights.remove(key);
        if let Some(response) = keep {
            let evicted = state.store.put(key.clone(), response, Instant::now());
            self.metrics.evictions.inc_by(evicted as u64);
            self.metrics.bytes.set(state.store.bytes() as i64);
        }
    }

    /// Ends `flight` if nobody follows it any more. Checked under the lock
    /// new followers join under, so none joins a flight being abandoned.
    fn abandon_if_unfollowed(&self, key: &Key, flight: &Flight) -> bool {
        let mut state = self.state();
        if flight.receiver_count() > 0 {
            return false;
        }
        if state.flights.get(key).is_some_and(|f| Arc::ptr_eq(f, flight)) {
            state.flights.remove(key);
        }
        true
    }
}

#[cfg(test)]
mod tests;
