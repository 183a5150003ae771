//! Stop strings, matched on generated text, also across token boundaries:
//! text that could be the start of a stop string is held back until the
//! next tokens show whether it is.

pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        Self { stops, held: String::new() }
    }

    /// Adds generated text; returns the text that is safe to emit and
    /// whether a stop string was found (the text before it is emitted, the
    /// stop string and anything after are dropped).
    pub fn push(&mut self, text: &str) -> (String, bool) {
        self.held.push_str(text);
        if let Some(at) = self.stops.iter().filter_map(|s| self.held.find(s.as_str())).min() {
            let out = self.held[..at].to_string();
            self.held.clear();
            return (out, true);
        }
        let keep = self.stops.iter().map(|s| partial_match(self.held.as_bytes(), s.as_bytes())).max().unwrap_or(0);
        // A stop string starts on a character boundary, so `cut` is one too.
        let cut = self.held.len() - keep;
        let out = self.held[..cut].to_string();
        self.held.drain(..cut);
        (out, false)
    }

    /// Text still held back, released when generation ends for another reason.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of `stop`.
fn partial_match(text: &[u8], stop: &[u8]) -> usize {
    (1..stop.len()).rev().find(|&k| text.ends_with(&stop[..k])).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            let (text, hit) = m.push(p);
            out.push_str(&text);
            if hit {
                return (out, true);
            }
        }
        out.push_str(&m.flush());
        (out, false)
    }

    #[test]
    fn stop_inside_one_piece_cuts_before_it() {
        assert_eq!(run(&["END"], &["abcENDdef"]), ("abc".into(), true));
    }

    #[test]
    fn stop_split_across_pieces_is_found() {
        assert_eq!(run(&["\n\nUser:"], &["Hi", "\n", "\nUs", "er:", " more"]), ("Hi".into(), true));
    }

    #[test]
    fn near_miss_is_released_whole() {
        assert_eq!(run(&["STOP"], &["ST", "x"]), ("STx".into(), false));
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        assert_eq!(run(&["b", "a"], &["xxab"]), ("xx".into(), true));
    }

    #[test]
    fn held_text_is_flushed_at_the_end() {
        assert_eq!(run(&["STOP"], &["the ST"]), ("the ST".into(), false));
    }
}
