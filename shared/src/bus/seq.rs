//! Sequence tracking for sequenced streams (revocations, keys): every event carries the next
//! number of its stream, so a consumer notices a deleted or lost event as a gap and reconciles
//! with the database, the source of truth.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqCheck {
    /// The next expected number (or the first one seen).
    InOrder,
    /// Already seen (a redelivery or a replay): skip it.
    Duplicate,
    /// Numbers `expected..got` are missing: reconcile.
    Gap { expected: i64, got: i64 },
}

#[derive(Debug, Clone, Default)]
pub struct SeqTracker {
    last: Option<i64>,
}

impl SeqTracker {
    /// Start after `last` (e.g. the value read from the database at reconciliation).
    pub fn starting_after(last: i64) -> Self {
        SeqTracker { last: Some(last) }
    }

    pub fn last(&self) -> Option<i64> {
        self.last
    }

    pub fn observe(&mut self, seq: i64) -> SeqCheck {
        match self.last {
            None => {
                self.last = Some(seq);
                SeqCheck::InOrder
            }
            Some(l) if seq <= l => SeqCheck::Duplicate,
            Some(l) if seq == l + 1 => {
                self.last = Some(seq);
                SeqCheck::InOrder
            }
            Some(l) => {
                self.last = Some(seq);
                SeqCheck::Gap {
                    expected: l + 1,
                    got: seq,
                }
            }
        }
    }

    /// After reconciling, continue from `last`.
    pub fn reset_to(&mut self, last: i64) {
        self.last = Some(self.last.map_or(last, |l| l.max(last)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_and_duplicates() {
        let mut t = SeqTracker::starting_after(0);
        assert_eq!(t.observe(1), SeqCheck::InOrder);
        assert_eq!(t.observe(2), SeqCheck::InOrder);
        assert_eq!(t.observe(2), SeqCheck::Duplicate);
        assert_eq!(t.observe(5), SeqCheck::Gap { expected: 3, got: 5 });
        assert_eq!(t.observe(6), SeqCheck::InOrder);
        assert_eq!(t.observe(1), SeqCheck::Duplicate);
    }
}
