//! How one step's prompt-token budget (`--max-step-tokens`) is shared
//! among the running sequences.
//!
//! Every decoding sequence reads its one token. Prompts share the budget
//! shortest unread part first, so a request whose prompt is mostly cached
//! (a prefix-cache hit has a question's worth of tokens left) or short is
//! read in the next step instead of after every chunk of the long prompts
//! ahead of it: with a 544-token prompt being read 256 tokens a step, a hit
//! arriving behind it waited three steps, and now waits one. SGLang orders
//! its waiting queue by cached prefix for the same reason.
//!
//! Shortest-first alone could keep a long prompt waiting for as long as
//! short ones keep arriving, so the prompt that has run longest takes a
//! quarter of the budget first, every step: it always advances.

use std::time::Instant;

/// Share of the budget the longest-running prompt takes first: 1 / this.
const OLDEST_SHARE: usize = 4;

/// One running sequence, as the allotment sees it.
pub struct Want {
    pub decoding: bool,
    /// Prompt tokens not yet read (for a decoding sequence, its last token).
    pub unread: usize,
    /// When it joined the running batch.
    pub joined: Instant,
}

/// Which sequences read how many tokens this step, as (index into
/// `wants`, tokens): decoding ones first, then prompts shortest first.
pub fn allot(wants: &[Want], budget: usize) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = (0..wants.len()).filter(|&i| wants[i].decoding).map(|i| (i, 1)).collect();
    let mut prompts: Vec<usize> = (0..wants.len()).filter(|&i| !wants[i].decoding && wants[i].unread > 0).collect();
    let Some(&oldest) = prompts.iter().min_by_key(|&&i| wants[i].joined) else { return out };
    let mut take = vec![0; wants.len()];
    take[oldest] = wants[oldest].unread.min((budget / OLDEST_SHARE).max(1)).min(budget);
    let mut left = budget - take[oldest];
    // Stable: equal lengths keep their batch order.
    prompts.sort_by_key(|&i| wants[i].unread);
    for &i in &prompts {
        let more = (wants[i].unread - take[i]).min(left);
        take[i] += more;
        left -= more;
    }
    out.extend(prompts.into_iter().filter(|&i| take[i] > 0).map(|i| (i, take[i])));
    out
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn want(decoding: bool, unread: usize, joined_ms: u64, t0: Instant) -> Want {
        Want { decoding, unread, joined: t0 + Duration::from_millis(joined_ms) }
    }

    #[test]
    fn decodes_read_one_token_and_short_prompts_go_before_long_ones() {
        let t0 = Instant::now();
        // A long prompt running first, a decode, a cache hit's 48 tokens.
        let wants = [want(false, 544, 0, t0), want(true, 1, 1, t0), want(false, 48, 2, t0)];
        // The oldest takes its quarter (64), the hit all its 48, the oldest the rest.
        assert_eq!(allot(&wants, 256), vec![(1, 1), (2, 48), (0, 208)]);
    }

    #[test]
    fn the_oldest_prompt_advances_however_many_short_ones_wait() {
        let t0 = Instant::now();
        let mut wants: Vec<Want> = (0..10).map(|i| want(false, 40, 10 + i, t0)).collect();
        wants.push(want(false, 1000, 0, t0));
        let taken = allot(&wants, 256);
        assert!(taken.contains(&(10, 64)), "{taken:?}");
        assert_eq!(taken.iter().map(|t| t.1).sum::<usize>(), 256);
        assert_eq!(&taken[..4], &[(0, 40), (1, 40), (2, 40), (3, 40)]);
    }

    #[test]
    fn a_budget_smaller_than_the_share_still_moves_the_oldest() {
        let t0 = Instant::now();
        let wants = [want(false, 10, 5, t0), want(false, 10, 0, t0)];
        assert_eq!(allot(&wants, 2), vec![(0, 1), (1, 1)]);
        assert!(allot(&[], 256).is_empty());
    }
}
