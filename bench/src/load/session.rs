//! One sender's stream of requests: what it asks next, and, for a
//! conversation, what it was answered. Each closed-loop stream has its own
//! session (a user); the open loop has one for all its arrivals.

use mesh_proto::v1::generate_request::Input;
use mesh_proto::v1::{ChatMessage, ChatMessages};
use rand::SeedableRng;
use rand::rngs::StdRng;

use super::conversation::Conversation;
use super::mix::{Mix, Prompts};

/// The next request's content.
#[derive(Debug, Clone, PartialEq)]
pub struct Planned {
    pub input: Input,
    pub max_tokens: u32,
    /// Its turn in a conversation (1-based), when the mix is conversations.
    pub turn: Option<u32>,
}

pub struct Session {
    mix: Mix,
    rng: StdRng,
    /// The user's conversation, once a conversation mix has begun one.
    conversation: Option<Conversation>,
}

impl Session {
    pub fn new(mix: &Mix, seed: u64) -> Session {
        Session { mix: mix.clone(), rng: StdRng::seed_from_u64(seed), conversation: None }
    }

    pub fn plan(&mut self) -> Planned {
        let rng = &mut self.rng;
        let (input, turn) = match self.mix.prompts() {
            Prompts::Lengths { words, texts } => (Input::Prompt(texts[words.sample_index(rng)].to_string()), None),
            Prompts::SharedPrefixes(prefixes) => (chat(prefixes.messages(rng)), None),
            Prompts::Conversations(shape) => {
                let conversation = self.conversation.get_or_insert_with(|| Conversation::new(*shape));
                let (turn, messages) = conversation.ask(rng);
                (chat(messages), Some(turn))
            }
        };
        Planned { input, max_tokens: self.mix.sample_max_tokens(rng), turn }
    }

    /// How the last request ended: its text when it finished OK, else None.
    pub fn answered(&mut self, reply: Option<String>) {
        if let Some(conversation) = &mut self.conversation {
            conversation.answered(reply);
        }
    }
}

fn chat(messages: Vec<ChatMessage>) -> Input {
    Input::Chat(ChatMessages { messages })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::Choices;
    use crate::load::conversation::Conversations;
    use crate::load::prefix::SharedPrefixes;

    fn messages(p: &Planned) -> &[ChatMessage] {
        match &p.input {
            Input::Chat(c) => &c.messages,
            Input::Prompt(_) => panic!("a prompt where chat was expected"),
        }
    }

    #[test]
    fn a_conversation_session_carries_the_replies_it_was_given() {
        let mix = Mix::conversations(Conversations::new(2, 4).unwrap(), Choices::one(8)).unwrap();
        let mut s = Session::new(&mix, 1);
        let first = s.plan();
        assert_eq!((first.turn, first.max_tokens, messages(&first).len()), (Some(1), 8, 1));
        s.answered(Some("the reply".into()));
        let second = s.plan();
        assert_eq!(second.turn, Some(2));
        assert_eq!(messages(&second)[1].content, "the reply");
        s.answered(Some("again".into()));
        assert_eq!(s.plan().turn, Some(1));
    }

    #[test]
    fn plain_and_shared_prefix_sessions_have_no_turns() {
        let plain = Mix::new(Choices::one(3), Choices::one(8)).unwrap();
        let p = Session::new(&plain, 1).plan();
        assert_eq!((p.input, p.turn), (Input::Prompt("the mesh serves".into()), None));
        let shared = Mix::shared_prefixes(SharedPrefixes::new(4, 16, 1.0, 4, 1).unwrap(), Choices::one(8)).unwrap();
        let mut s = Session::new(&shared, 1);
        let p = s.plan();
        assert_eq!((p.turn, messages(&p).len()), (None, 2));
        // Same seed, same requests.
        assert_eq!(Session::new(&shared, 1).plan(), p);
    }
}
