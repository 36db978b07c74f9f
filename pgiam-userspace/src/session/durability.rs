//! What a batch of forwarded messages waits for from the audit log, by durability mode.
//!
//! The records of a batch are in the kernel before any of it is forwarded (the caller appends
//! them first); this decides what more the device flush must do first. The rule: nothing a
//! statement changes in the database, and (with `always`) nothing a client is answered, comes
//! before the record that decided it is on the device.

use crate::audit::{Durability, Position};
use crate::sql::Effect;

/// What to do about the device flush for a batch whose records end at `end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// Nothing: the records are in the kernel, the periodic flush takes them (a transaction
    /// block's row changes too: they commit only with the COMMIT, which waits for them).
    Nothing,
    /// Forward now; the answer waits for the flush (`always`, a read).
    Answer(Position),
    /// The flush up to here before anything is forwarded.
    Forward(Position),
}

/// The wait for a batch of `records` records ending at `end`, of which the first `must_sync`
/// decide messages changing something by themselves, that can change `effect` at most;
/// `in_block`: the session sits in an open transaction block, nothing else pending.
pub fn wait_for(
    durability: Durability,
    effect: Effect,
    in_block: bool,
    end: Position,
    records: usize,
    must_sync: usize,
) -> Wait {
    match (durability, effect, in_block) {
        (Durability::Buffered, ..) => Wait::Nothing,
        (Durability::Always, Effect::None, _)
        | (Durability::Always, Effect::Transactional, true) => Wait::Answer(end),
        (Durability::Always, ..) => Wait::Forward(end),
        (Durability::Changes, Effect::None, _) => Wait::Nothing,
        // Starting the flush of a block's change at once (so COMMIT's wait overlaps the block)
        // was measured: on TPC-B it costs a flush per UPDATE, ~20 % of throughput at 16 clients,
        // where one flush at COMMIT covers the whole block.
        (Durability::Changes, Effect::Transactional, true) => Wait::Nothing,
        // The block's changes are on the device before they commit; the COMMIT's own record
        // (and those of reads beside it) goes with the next flush: COMMIT does not wait for a
        // flush of its own while the block holds its row locks.
        (Durability::Changes, Effect::Commits, true) => {
            Wait::Forward(end.before(records.saturating_sub(must_sync)))
        }
        (Durability::Changes, ..) => Wait::Forward(end),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(n: u64) -> Position {
        Position::default().after(n)
    }

    #[test]
    fn reads_never_wait_for_a_flush_except_with_always() {
        use Durability::*;
        assert_eq!(
            wait_for(Changes, Effect::None, false, at(5), 1, 0),
            Wait::Nothing
        );
        assert_eq!(
            wait_for(Changes, Effect::None, true, at(5), 1, 0),
            Wait::Nothing
        );
        assert_eq!(
            wait_for(Always, Effect::None, false, at(5), 1, 0),
            Wait::Answer(at(5))
        );
        assert_eq!(
            wait_for(Buffered, Effect::Immediate, false, at(5), 1, 1),
            Wait::Nothing
        );
    }

    #[test]
    fn changes_wait_before_they_are_forwarded() {
        use Durability::*;
        for d in [Changes, Always] {
            assert_eq!(
                wait_for(d, Effect::Immediate, true, at(7), 2, 2),
                Wait::Forward(at(7))
            );
            // An autocommit row change commits at once.
            assert_eq!(
                wait_for(d, Effect::Transactional, false, at(7), 1, 1),
                Wait::Forward(at(7))
            );
            // A COMMIT outside a block (or with pending requests) is not trusted to be empty.
            assert_eq!(
                wait_for(d, Effect::Commits, false, at(7), 1, 0),
                Wait::Forward(at(7))
            );
        }
        assert_eq!(
            wait_for(Always, Effect::Transactional, true, at(7), 1, 1),
            Wait::Answer(at(7))
        );
    }

    #[test]
    fn a_commit_waits_for_the_block_and_not_for_itself() {
        use Durability::*;
        assert_eq!(
            wait_for(Changes, Effect::Transactional, true, at(9), 1, 1),
            Wait::Nothing
        );
        // COMMIT alone: everything before it.
        assert_eq!(
            wait_for(Changes, Effect::Commits, true, at(10), 1, 0),
            Wait::Forward(at(9))
        );
        // UPDATE and COMMIT in one batch: the UPDATE's record too.
        assert_eq!(
            wait_for(Changes, Effect::Commits, true, at(12), 2, 1),
            Wait::Forward(at(11))
        );
        // With `always` the COMMIT waits for its own record.
        assert_eq!(
            wait_for(Always, Effect::Commits, true, at(10), 1, 0),
            Wait::Forward(at(10))
        );
    }
}
