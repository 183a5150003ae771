//! A request's prompt as prefix blocks, named over text.
//!
//! The node caches keys and values per block of tokens, named by a hash
//! chained over every token up to the block's end. The sidecar has no
//! tokenizer, so it names blocks of the request's *text* the same way: equal
//! leading text gives equal leading names, which is what routing needs to
//! send a request where its prefix was computed. It is an approximation:
//! text blocks do not line up with token blocks, so a match is a strong
//! hint that the node holds most of that prefix, not a promise of every
//! block.

use std::hash::{BuildHasher, RandomState};

use mesh_proto::v1::GenerateRequest;
use mesh_proto::v1::generate_request::Input;

/// Bytes per block: about 32 tokens at the ~4 bytes per token BPE
/// tokenizers average on English text, the node's own cache block
/// (`BLOCK_TOKENS` = 32). Smaller blocks would match no more precisely
/// (text and token boundaries differ anyway) but cost more hashing and
/// index entries per request; larger ones would drop up to a block of a
/// shared prefix at its end.
pub const BLOCK_BYTES: usize = 128;

/// Blocks read from one request at most: its first 64 KiB (~16k tokens).
/// Two prompts that share that much are routed as equals; the cap bounds
/// the hashing (about 70 µs at the cap, 4.6 µs for 32 blocks, on a shared
/// EPYC core) and the index entries one request writes.
pub const MAX_BLOCKS: usize = 512;

/// Names the blocks of requests: keyed SipHash (std's `RandomState`,
/// keys drawn at start, so a caller cannot aim its prompt at a collision),
/// 64 bits per name: about 3·10⁻⁸ odds of any collision at a million
/// blocks, and a collision only misroutes a hint.
#[derive(Clone, Default)]
pub struct BlockNamer(RandomState);

impl BlockNamer {
    /// The names of the request's full blocks, in order, each chained over
    /// everything before it. Seeded with the service and the input's kind
    /// (the node tokenizes a raw prompt, a chat and special tokens
    /// differently), so equal text under another service or kind never
    /// matches.
    pub fn blocks(&self, req: &GenerateRequest) -> Vec<u64> {
        let Some(input) = &req.input else { return Vec::new() };
        let kind = match input {
            Input::Prompt(_) => 'p',
            Input::Chat(_) => 'c',
        };
        let seed = self.0.hash_one((req.model.as_str(), kind, req.allow_special_tokens));
        let mut chain = Chain { namer: &self.0, seed, block: [0; BLOCK_BYTES], filled: 0, names: Vec::new() };
        match input {
            Input::Prompt(text) => chain.feed(text.as_bytes()),
            Input::Chat(chat) => {
                // Each field after its length: however the same characters
                // are split over messages or roles, the bytes differ.
                for m in &chat.messages {
                    for field in [&m.role, &m.content] {
                        chain.feed(&(field.len() as u64).to_le_bytes());
                        chain.feed(field.as_bytes());
                    }
                }
            }
        }
        chain.names
    }
}

/// Cuts a byte stream into blocks and names each full one.
struct Chain<'a> {
    namer: &'a RandomState,
    seed: u64,
    block: [u8; BLOCK_BYTES],
    filled: usize,
    names: Vec<u64>,
}

impl Chain<'_> {
    fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() && self.names.len() < MAX_BLOCKS {
            let take = (BLOCK_BYTES - self.filled).min(bytes.len());
            self.block[self.filled..self.filled + take].copy_from_slice(&bytes[..take]);
            self.filled += take;
            bytes = &bytes[take..];
            if self.filled == BLOCK_BYTES {
                let prev = self.names.last().copied().unwrap_or(self.seed);
                self.names.push(self.namer.hash_one((prev, &self.block)));
                self.filled = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use mesh_proto::v1::{ChatMessage, ChatMessages};

    use super::*;

    fn prompt(text: &str) -> GenerateRequest {
        GenerateRequest { model: "chat".into(), input: Some(Input::Prompt(text.into())), ..Default::default() }
    }

    fn chat(turns: &[(&str, &str)]) -> GenerateRequest {
        let messages = turns.iter().map(|(r, c)| ChatMessage { role: r.to_string(), content: c.to_string() }).collect();
        GenerateRequest {
            model: "chat".into(),
            input: Some(Input::Chat(ChatMessages { messages })),
            ..Default::default()
        }
    }

    fn text(len: usize) -> String {
        (0..len).map(|i| char::from(b'a' + (i * 7 % 26) as u8)).collect()
    }

    #[test]
    fn only_full_blocks_count_and_the_work_is_capped() {
        let n = BlockNamer::default();
        assert!(n.blocks(&prompt(&text(BLOCK_BYTES - 1))).is_empty());
        assert_eq!(n.blocks(&prompt(&text(3 * BLOCK_BYTES + 5))).len(), 3);
        assert_eq!(n.blocks(&prompt(&text(1 << 20))).len(), MAX_BLOCKS);
        assert!(n.blocks(&GenerateRequest::default()).is_empty());
    }

    #[test]
    fn a_shared_prefix_gives_the_same_leading_names() {
        let n = BlockNamer::default();
        let base = text(10 * BLOCK_BYTES);
        let a = n.blocks(&prompt(&format!("{}{}", &base[..4 * BLOCK_BYTES + 10], "one ending")));
        let b = n.blocks(&prompt(&base));
        assert_eq!(a.len(), 4);
        assert_eq!(a[..], b[..4]);
    }

    #[test]
    fn one_changed_byte_changes_its_block_and_every_later_one() {
        let n = BlockNamer::default();
        let base = text(8 * BLOCK_BYTES);
        let mut changed = base.clone().into_bytes();
        changed[3 * BLOCK_BYTES + 17] = b'Z';
        let (a, b) = (n.blocks(&prompt(&base)), n.blocks(&prompt(std::str::from_utf8(&changed).unwrap())));
        assert_eq!(a[..3], b[..3]);
        assert!((3..8).all(|i| a[i] != b[i]), "blocks 3.. must all differ");
    }

    #[test]
    fn the_service_and_the_input_kind_are_in_the_seed() {
        let n = BlockNamer::default();
        let t = text(4 * BLOCK_BYTES);
        let other = GenerateRequest { model: "code".into(), ..prompt(&t) };
        assert_ne!(n.blocks(&prompt(&t))[0], n.blocks(&other)[0]);
        let special = GenerateRequest { allow_special_tokens: true, ..prompt(&t) };
        assert_ne!(n.blocks(&prompt(&t))[0], n.blocks(&special)[0]);
        assert_ne!(n.blocks(&prompt(&t))[0], n.blocks(&chat(&[("", &t)]))[0]);
    }

    #[test]
    fn chat_splits_never_collide_and_history_is_a_prefix() {
        let n = BlockNamer::default();
        let (x, y) = (text(300), text(200));
        let joined = format!("{x}{y}");
        let splits = [
            n.blocks(&chat(&[("user", &joined)])),
            n.blocks(&chat(&[("user", &x), ("user", &y)])),
            n.blocks(&chat(&[("user", &x[..299]), ("user", &format!("{}{y}", &x[299..]))])),
            n.blocks(&chat(&[("use", &format!("r{joined}"))])),
        ];
        for (i, a) in splits.iter().enumerate() {
            for b in &splits[i + 1..] {
                assert_ne!(a.last(), b.last(), "splits {i} collide");
            }
        }
        // The next turn resends the history: its blocks start with the last turn's.
        let turn1 = n.blocks(&chat(&[("system", &x), ("user", &y)]));
        let turn2 = n.blocks(&chat(&[("system", &x), ("user", &y), ("assistant", &x), ("user", &y)]));
        assert_eq!(turn1[..], turn2[..turn1.len()]);
    }
}
