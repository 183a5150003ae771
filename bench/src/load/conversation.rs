//! Multi-turn conversations: each virtual user (a closed-loop stream) runs
//! conversations of a set number of turns, and every turn resends the whole
//! history (its questions and the assistant's actual replies) plus a new
//! question, as a chat client does. With a prefix cache, a turn's prompt
//! starts with the previous turn's, so only the new part needs computing.

use mesh_proto::v1::ChatMessage;
use rand::Rng;

use super::mix::{MAX_PROMPT_WORDS, MixError};
use super::prefix::{message, seeded_text};

/// Most turns per conversation: the history must stay within a context.
pub const MAX_TURNS: u32 = 64;

/// What every conversation looks like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conversations {
    turns: u32,
    question_words: u32,
}

impl Conversations {
    pub fn new(turns: u32, question_words: u32) -> Result<Conversations, MixError> {
        if turns == 0 || turns > MAX_TURNS {
            return Err(MixError::OutOfRange { what: "turns", value: turns, max: MAX_TURNS });
        }
        if question_words == 0 || question_words > MAX_PROMPT_WORDS {
            return Err(MixError::OutOfRange { what: "question tokens", value: question_words, max: MAX_PROMPT_WORDS });
        }
        Ok(Conversations { turns, question_words })
    }

    pub fn turns(&self) -> u32 {
        self.turns
    }

    pub fn describe(&self) -> String {
        format!("conversations of {} turns, {}-word questions, whole history resent", self.turns, self.question_words)
    }
}

/// One user's conversation in progress.
#[derive(Debug, Clone)]
pub struct Conversation {
    shape: Conversations,
    history: Vec<ChatMessage>,
    /// The turn last asked (1-based); 0 before the first.
    turn: u32,
}

impl Conversation {
    pub fn new(shape: Conversations) -> Conversation {
        Conversation { shape, history: Vec::new(), turn: 0 }
    }

    /// The next turn's number (1-based) and messages: the history so far and
    /// a new question. After the last turn, a new conversation begins.
    pub fn ask(&mut self, rng: &mut impl Rng) -> (u32, Vec<ChatMessage>) {
        if self.turn == self.shape.turns {
            self.restart();
        }
        self.turn += 1;
        self.history.push(message("user", seeded_text(rng, self.shape.question_words)));
        (self.turn, self.history.clone())
    }

    /// How the last turn ended: its reply joins the history; a failed turn
    /// (None) ends the conversation, as a user would give up on it, and the
    /// next turn starts a new one.
    pub fn answered(&mut self, reply: Option<String>) {
        match reply {
            Some(text) => self.history.push(message("assistant", text)),
            None => self.restart(),
        }
    }

    fn restart(&mut self) {
        self.history.clear();
        self.turn = 0;
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;

    fn roles(messages: &[ChatMessage]) -> Vec<&str> {
        messages.iter().map(|m| m.role.as_str()).collect()
    }

    #[test]
    fn history_grows_and_carries_the_replies() {
        let mut c = Conversation::new(Conversations::new(3, 8).unwrap());
        let mut rng = StdRng::seed_from_u64(1);
        let (turn, first) = c.ask(&mut rng);
        assert_eq!((turn, roles(&first)), (1, vec!["user"]));
        assert_eq!(first[0].content.split(' ').count(), 8);
        c.answered(Some("first reply".into()));
        let (turn, second) = c.ask(&mut rng);
        assert_eq!((turn, roles(&second)), (2, vec!["user", "assistant", "user"]));
        assert_eq!(second[..1], first[..], "a turn resends the previous one's messages");
        assert_eq!(second[1].content, "first reply");
        assert_ne!(second[2].content, second[0].content);
        c.answered(Some("second reply".into()));
        let (turn, third) = c.ask(&mut rng);
        assert_eq!((turn, third.len()), (3, 5));
        assert_eq!(third[..3], second[..]);
        assert_eq!(third[3].content, "second reply");
        c.answered(Some("third reply".into()));
        // Three turns done: the next request opens a new conversation.
        let (turn, fresh) = c.ask(&mut rng);
        assert_eq!((turn, roles(&fresh)), (1, vec!["user"]));
    }

    #[test]
    fn a_failed_turn_ends_the_conversation() {
        let mut c = Conversation::new(Conversations::new(8, 4).unwrap());
        let mut rng = StdRng::seed_from_u64(2);
        c.ask(&mut rng);
        c.answered(Some("ok".into()));
        assert_eq!(c.ask(&mut rng).0, 2);
        c.answered(None);
        let (turn, messages) = c.ask(&mut rng);
        assert_eq!((turn, messages.len()), (1, 1));
        assert!(Conversations::new(0, 4).is_err() && Conversations::new(65, 4).is_err());
    }
}
