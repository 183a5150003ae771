//! The layer with a mock upstream: hits, opt-outs, single-flight, and
//! what a failed or abandoned flight leaves behind.

use std::time::Duration;

use mesh_proto::v1::generate_request::Input;
use mesh_proto::v1::{FinishReason, GenerateResponse, SamplingParams};
use tokio::sync::Semaphore;
use tokio_stream::StreamExt;
use tonic::Code;

use super::*;
use crate::stack::testing::{Calls, messages, ok_inner, read_to_end, refusing, relayed};
use crate::stack::{TokenStream, last};

fn cache(cfg: Config) -> ResponseCache {
    ResponseCache::new(&Config { enabled: true, ..cfg }, ResponseCacheMetrics::default())
}

fn on() -> ResponseCache {
    cache(Config::default())
}

fn greedy(prompt: &str) -> Call {
    let mut call = crate::stack::testing::call("chat");
    call.req.input = Some(Input::Prompt(prompt.into()));
    call
}

fn sampled() -> Call {
    let mut call = greedy("hi");
    call.req.sampling = Some(SamplingParams { temperature: 0.8, ..Default::default() });
    call
}

fn marker(reply: &Reply) -> &str {
    reply.metadata.get(md::RESPONSE_CACHE).map_or("none", |v| v.to_str().unwrap())
}

/// Every message's bytes, in order.
async fn bytes(mut stream: TokenStream) -> Vec<Vec<u8>> {
    let mut all = Vec::new();
    while let Some(msg) = stream.next().await {
        all.push(msg.unwrap().encoded().to_vec());
    }
    all
}

/// An upstream that streams 3 tokens once each of its permits is released.
fn gated() -> (Next, Calls, Arc<Semaphore>) {
    let calls = Calls::default();
    let gate = Arc::new(Semaphore::new(0));
    let (counted, open) = (calls.clone(), gate.clone());
    let next = last(move |_: Call| {
        counted.add();
        let open = open.clone();
        let stream = tokio_stream::iter(messages(3)).then(move |msg| {
            let open = open.clone();
            async move {
                open.acquire().await.unwrap().forget();
                Ok(msg)
            }
        });
        async move { Ok(Reply { metadata: MetadataMap::new(), stream: Box::pin(stream) as TokenStream }) }
    });
    (next, calls, gate)
}

#[tokio::test]
async fn a_repeated_greedy_request_is_replayed_byte_for_byte_without_going_upstream() {
    let cache = on();
    let (next, calls) = ok_inner(4);
    let first = cache.call(greedy("hi"), next.clone()).await.unwrap();
    assert_eq!(marker(&first), "miss");
    let original = bytes(first.stream).await;
    let again = cache.call(greedy("hi"), next.clone()).await.unwrap();
    assert_eq!(marker(&again), "hit");
    assert_eq!(bytes(again.stream).await, original, "the same messages, in the same chunks");
    assert_eq!(calls.get(), 1);
    let m = &cache.shared.metrics;
    assert_eq!((m.hits.get(), m.misses.get()), (1, 1));
    assert!(m.bytes.get() > 0);
    cache.call(greedy("other"), next).await.unwrap();
    assert_eq!(calls.get(), 2, "another prompt is another key");
}

#[tokio::test]
async fn sampled_opted_out_and_switched_off_requests_always_go_upstream() {
    let cfg = Config { services_off: vec!["chat".into()], ..Config::default() };
    let tenants = Config { tenants_off: vec!["acme".into()], ..Config::default() };
    let no_cache = || {
        let mut call = greedy("hi");
        call.metadata.insert(md::CACHE_CONTROL, "No-Cache".parse().unwrap());
        call
    };
    let acme = || {
        let mut call = greedy("hi");
        call.req.tenant = "acme".into();
        call
    };
    for (cache, make) in
        [(on(), sampled as fn() -> Call), (on(), no_cache), (cache(cfg), || greedy("hi")), (cache(tenants), acme)]
    {
        let (next, calls) = ok_inner(2);
        for _ in 0..3 {
            let mut reply = cache.call(make(), next.clone()).await.unwrap();
            assert_eq!(marker(&reply), "none");
            assert_eq!(read_to_end(&mut reply.stream).await.unwrap(), 2);
        }
        assert_eq!(calls.get(), 3);
        assert_eq!(cache.shared.metrics.bytes.get(), 0, "nothing stored");
    }
}

#[tokio::test]
async fn identical_calls_in_flight_share_one_upstream_stream_from_its_start() {
    let cache = Arc::new(on());
    let (next, calls, gate) = gated();
    let leader = cache.call(greedy("hi"), next.clone()).await.unwrap();
    let mut leader_stream = leader.stream;
    gate.add_permits(1);
    assert_eq!(leader_stream.next().await.unwrap().unwrap().token_ids(), [1]);
    let mut followers = Vec::new();
    for _ in 0..100 {
        let reply = cache.call(greedy("hi"), next.clone()).await.unwrap();
        assert_eq!(marker(&reply), "coalesced");
        followers.push(tokio::spawn(async move { read_to_end(&mut { reply.stream }).await }));
    }
    gate.add_permits(2);
    assert_eq!(read_to_end(&mut leader_stream).await.unwrap(), 2);
    for follower in followers {
        assert_eq!(follower.await.unwrap().unwrap(), 3, "a late follower still gets every token");
    }
    assert_eq!(calls.get(), 1);
    assert_eq!(cache.shared.metrics.coalesced.get(), 100);
    assert_eq!(marker(&cache.call(greedy("hi"), next).await.unwrap()), "hit");
}

#[tokio::test]
async fn the_stream_outlives_its_first_caller_while_others_follow_it() {
    let cache = on();
    let (next, calls, gate) = gated();
    let leader = cache.call(greedy("hi"), next.clone()).await.unwrap();
    let mut follower = cache.call(greedy("hi"), next.clone()).await.unwrap();
    drop(leader);
    gate.add_permits(3);
    assert_eq!(read_to_end(&mut follower.stream).await.unwrap(), 3);
    assert_eq!(marker(&cache.call(greedy("hi"), next).await.unwrap()), "hit", "the whole answer was stored");
    assert_eq!(calls.get(), 1);
}

#[tokio::test]
async fn a_stream_everyone_left_is_cancelled_and_not_stored() {
    let cache = on();
    let (next, calls, gate) = gated();
    let mut leader = cache.call(greedy("hi"), next.clone()).await.unwrap();
    gate.add_permits(1);
    assert!(leader.stream.next().await.unwrap().is_ok());
    drop(leader);
    tokio::time::sleep(Duration::from_millis(20)).await; // the pump sees nobody follows
    assert!(cache.shared.state().flights.is_empty(), "the flight was abandoned");
    gate.add_permits(3);
    let mut again = cache.call(greedy("hi"), next).await.unwrap();
    assert_eq!(marker(&again), "miss");
    assert_eq!(read_to_end(&mut again.stream).await.unwrap(), 3);
    assert_eq!(calls.get(), 2);
}

#[tokio::test]
async fn followers_of_a_failed_flight_get_its_status_and_nothing_is_stored() {
    let cache = on();
    let (next, calls) = refusing(Code::ResourceExhausted);
    let refused = cache.call(greedy("hi"), next.clone()).await.err().unwrap();
    assert_eq!(refused.code(), Code::ResourceExhausted);

    let broken = last(|_: Call| async {
        let items = vec![Ok(messages(3).remove(0)), Err(Status::unavailable("node went away"))];
        Ok(Reply { metadata: MetadataMap::new(), stream: Box::pin(tokio_stream::iter(items)) as TokenStream })
    });
    let mut leader = cache.call(greedy("hi"), broken.clone()).await.unwrap();
    let mut follower = cache.call(greedy("hi"), broken).await.unwrap();
    for reply in [&mut leader, &mut follower] {
        assert_eq!(read_to_end(&mut reply.stream).await.unwrap_err().code(), Code::Unavailable);
    }
    assert_eq!(cache.shared.metrics.bytes.get(), 0);
    assert!(cache.call(greedy("hi"), next).await.is_err(), "nothing was stored: upstream again");
    assert_eq!(calls.get(), 2);
}

#[tokio::test]
async fn a_stream_the_server_cut_short_is_not_stored() {
    let cache = on();
    let cut = last(|_: Call| async {
        let msg = GenerateResponse {
            token_ids: vec![1],
            finish_reason: FinishReason::Cancelled as i32,
            ..Default::default()
        };
        Ok(Reply {
            metadata: MetadataMap::new(),
            stream: Box::pin(tokio_stream::iter([Ok(relayed(msg))])) as TokenStream,
        })
    });
    let mut reply = cache.call(greedy("hi"), cut.clone()).await.unwrap();
    assert_eq!(read_to_end(&mut reply.stream).await.unwrap(), 1);
    assert_eq!(marker(&cache.call(greedy("hi"), cut).await.unwrap()), "miss");
}
