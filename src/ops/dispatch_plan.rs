//! The host dispatch plan: the (token, slot) pairs of a routing grouped by expert, with an optional
//! expert capacity; the plain twin of [`expert_sort`](super::expert_sort).
//!
//! Order is deterministic: slot-major (every token's first choice before any second choice, as in
//! GShard), tokens in order within a slot, so with a capacity the first choices are kept first.

/// The plan for one MoE layer call.
#[derive(Clone, Debug, Default)]
pub struct Plan {
    /// Per expert: the token rows it processes.
    pub tokens: Vec<Vec<u32>>,
    /// Per expert: the flat (token * m + slot) index of each of those rows in the weights.
    pub slots: Vec<Vec<u32>>,
    /// Token-slots dropped because their expert was full.
    pub dropped: usize,
}

/// Expert capacity for `n` token-slots over `e` experts; 0 = unlimited (dropless).
pub fn capacity(capacity_factor: f64, n: usize, e: usize) -> usize {
    if capacity_factor <= 0.0 {
        0
    } else {
        ((capacity_factor * n as f64 / e as f64).ceil() as usize).max(1)
    }
}

/// indices: (T, m) row-major expert ids -> per-expert token lists.
pub fn plan(indices: &[u32], t: usize, m: usize, e: usize, cap: usize) -> Plan {
    let mut p = Plan { tokens: vec![Vec::new(); e], slots: vec![Vec::new(); e], dropped: 0 };
    for slot in 0..m {
        for tok in 0..t {
            let flat = tok * m + slot;
            let ex = indices[flat] as usize;
            if cap > 0 && p.tokens[ex].len() >= cap {
                p.dropped += 1;
                continue;
            }
            p.tokens[ex].push(tok as u32);
            p.slots[ex].push(flat as u32);
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_by_expert_and_drops_over_capacity() {
        // 4 tokens, m = 1, experts 0,1,0,0 with capacity 2: the third token of expert 0 is dropped.
        let p = plan(&[0, 1, 0, 0], 4, 1, 2, 2);
        assert_eq!(p.tokens, vec![vec![0, 2], vec![1]]);
        assert_eq!(p.slots, vec![vec![0, 2], vec![1]]);
        assert_eq!(p.dropped, 1);
        assert_eq!(capacity(1.0, 4, 2), 2);
        assert_eq!(capacity(0.0, 4, 2), 0);
    }

    #[test]
    fn first_choices_have_priority() {
        // 2 tokens, m = 2: token 1's first choice (expert 0) beats token 0's second choice.
        let p = plan(&[1, 0, 0, 1], 2, 2, 2, 1);
        assert_eq!(p.tokens, vec![vec![1], vec![0]]);
        assert_eq!(p.dropped, 2);
    }
}
