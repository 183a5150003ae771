//! Which requests the response cache may answer, and the key it files
//! their responses under.

use bytes::Bytes;
use mesh_proto::v1::GenerateRequest;
use prost::Message;

/// Everything that decides a deterministic request's answer: its service,
/// tenant, input, every sampling field and `allow_special_tokens`, as one
/// canonical protobuf encoding. The encoding itself is the key, not a hash
/// of it, so two different requests can never share an answer.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Key(Bytes);

impl Key {
    /// The key of `req`, if its answer is fixed by what it asks: greedy
    /// (temperature 0) or seeded sampling, not a continuation of a stream
    /// moved off another node (those are one-offs, never asked again).
    ///
    /// The tenant is part of the key: tenants never share entries. An
    /// answer one tenant reads from another's entry is one it could have
    /// asked for itself, but a hit is fast and marked, so sharing would tell
    /// a tenant which prompts *another* tenant sent. Priority and request
    /// id do not change the answer and are left out.
    pub fn of(req: &GenerateRequest) -> Option<Key> {
        let sampling = req.sampling.clone().unwrap_or_default();
        let deterministic = sampling.temperature == 0.0 || sampling.seed.is_some();
        if !deterministic || !req.continuation_token_ids.is_empty() {
            return None;
        }
        let canonical = GenerateRequest {
            model: req.model.clone(),
            input: req.input.clone(),
            sampling: Some(sampling),
            tenant: req.tenant.clone(),
            allow_special_tokens: req.allow_special_tokens,
            ..Default::default()
        };
        Some(Key(canonical.encode_to_vec().into()))
    }

    /// Bytes the key holds.
    pub fn len(&self) -> usize {
        self.0.len()
    }
}

#[cfg(test)]
mod tests {
    use mesh_proto::v1::generate_request::Input;
    use mesh_proto::v1::{ChatMessage, ChatMessages, Priority, SamplingParams};

    use super::*;

    fn greedy(prompt: &str) -> GenerateRequest {
        GenerateRequest {
            model: "chat".into(),
            input: Some(Input::Prompt(prompt.into())),
            sampling: Some(SamplingParams { max_tokens: 16, ..Default::default() }),
            ..Default::default()
        }
    }

    fn sampled(temperature: f32, seed: Option<u64>) -> GenerateRequest {
        let mut req = greedy("hi");
        req.sampling = Some(SamplingParams { temperature, seed, ..Default::default() });
        req
    }

    #[test]
    fn only_greedy_or_seeded_requests_that_continue_nothing_are_cached() {
        assert!(Key::of(&greedy("hi")).is_some());
        assert!(Key::of(&GenerateRequest { sampling: None, ..greedy("hi") }).is_some(), "unset sampling is greedy");
        assert!(Key::of(&sampled(0.7, Some(42))).is_some());
        assert!(Key::of(&sampled(0.7, None)).is_none(), "a sampled request is never cached");
        assert!(Key::of(&GenerateRequest { continuation_token_ids: vec![5], ..greedy("hi") }).is_none());
    }

    #[test]
    fn every_field_that_changes_the_answer_changes_the_key() {
        let base = Key::of(&greedy("hi")).unwrap();
        let sampling = |f: fn(&mut SamplingParams)| {
            let mut req = greedy("hi");
            f(req.sampling.as_mut().unwrap());
            Key::of(&req).unwrap()
        };
        let chat =
            Input::Chat(ChatMessages { messages: vec![ChatMessage { role: "user".into(), content: "hi".into() }] });
        let others = [
            Key::of(&greedy("hi!")).unwrap(),
            Key::of(&GenerateRequest { model: "code".into(), ..greedy("hi") }).unwrap(),
            Key::of(&GenerateRequest { input: Some(chat), ..greedy("hi") }).unwrap(),
            Key::of(&GenerateRequest { tenant: "acme".into(), ..greedy("hi") }).unwrap(),
            Key::of(&GenerateRequest { allow_special_tokens: true, ..greedy("hi") }).unwrap(),
            sampling(|s| s.max_tokens = 17),
            sampling(|s| s.top_p = Some(0.9)),
            sampling(|s| s.top_k = 5),
            sampling(|s| s.seed = Some(1)),
            sampling(|s| s.stop = vec!["\n".into()]),
        ];
        for (i, other) in others.iter().enumerate() {
            assert_ne!(&base, other, "change {i} kept the key");
        }
    }

    #[test]
    fn priority_and_request_id_do_not_change_the_key() {
        let mut req = greedy("hi");
        req.priority = Priority::High as i32;
        req.request_id = "r-1".into();
        assert_eq!(Key::of(&req), Key::of(&greedy("hi")));
    }
}
