//! Offset tracking: which consumed messages are done, and how far each partition may be committed.
//!
//! Messages complete out of order (a DLQ write can finish before the history batch that preceded
//! it), but an offset may only be stored once *every* earlier message of its partition is done:
//! the contiguous completed watermark. [`Acks`] is shared by the consumer (which registers offsets
//! as it hands messages out) and every stage that finishes a message (which completes them); the
//! consumer stores the advanced watermarks, and the rebalance callback waits on it to drain
//! revoked partitions.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// A topic and partition.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicPartition {
    pub topic: String,
    pub partition: i32,
}

impl TopicPartition {
    pub fn new(topic: impl Into<String>, partition: i32) -> Self {
        TopicPartition {
            topic: topic.into(),
            partition,
        }
    }
}

/// One consumed message, to be completed exactly once when all its effects are durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckToken {
    pub tp: TopicPartition,
    pub offset: i64,
}

/// Offsets of one partition in flight.
#[derive(Debug, Default, Clone)]
pub struct PartitionTracker {
    pending: BTreeSet<i64>,
    /// One past the highest offset handed out; the watermark when nothing is pending.
    next: Option<i64>,
    /// The watermark last reported by [`PartitionTracker::take_advanced`].
    reported: Option<i64>,
}

impl PartitionTracker {
    pub fn start(&mut self, offset: i64) {
        self.pending.insert(offset);
        self.next = Some(self.next.map_or(offset + 1, |n| n.max(offset + 1)));
    }

    /// Marks `offset` done; unknown offsets (already done, or from before a reassignment) are ignored.
    pub fn complete(&mut self, offset: i64) -> bool {
        self.pending.remove(&offset)
    }

    /// The next offset to consume after everything contiguous is done: the offset to commit.
    pub fn watermark(&self) -> Option<i64> {
        match self.pending.first() {
            Some(&lowest) => Some(lowest),
            None => self.next,
        }
    }

    /// The watermark, if it moved since the last call.
    pub fn take_advanced(&mut self) -> Option<i64> {
        let w = self.watermark()?;
        if self.reported.is_some_and(|r| r >= w) {
            return None;
        }
        self.reported = Some(w);
        Some(w)
    }

    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }
}

/// Shared completion state of every assigned partition.
#[derive(Default)]
pub struct Acks {
    partitions: Mutex<HashMap<TopicPartition, PartitionTracker>>,
    /// Wakes a rebalance callback waiting for revoked partitions to drain.
    drained: Condvar,
    /// Wakes the consumer loop to store advanced watermarks and maybe resume.
    pub notify: tokio::sync::Notify,
}

impl Acks {
    pub fn new() -> Self {
        Acks::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<TopicPartition, PartitionTracker>> {
        // A panic while holding this lock cannot leave a tracker half-updated: each change is a
        // single insert/remove (a panic partway through `complete_all` leaves some of its tokens
        // pending, which holds the watermark back and loses nothing).
        self.partitions.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn start(&self, tp: &TopicPartition, offset: i64) -> AckToken {
        let mut map = self.lock();
        match map.get_mut(tp) {
            Some(t) => t.start(offset),
            None => map.entry(tp.clone()).or_default().start(offset),
        }
        AckToken {
            tp: tp.clone(),
            offset,
        }
    }

    pub fn complete(&self, token: &AckToken) {
        self.complete_all(std::slice::from_ref(token));
    }

    /// Completes many tokens under one lock, with one wake-up of the waiters (a write group's
    /// thousands of messages: a wake per message was a futex call each).
    pub fn complete_all<'a>(&self, tokens: impl IntoIterator<Item = &'a AckToken>) {
        let mut map = self.lock();
        for token in tokens {
            if let Some(t) = map.get_mut(&token.tp) {
                t.complete(token.offset);
            }
        }
        drop(map);
        self.drained.notify_all();
        self.notify.notify_one();
    }

    /// Messages handed out and not completed, over all partitions.
    pub fn in_flight(&self) -> usize {
        self.lock().values().map(PartitionTracker::in_flight).sum()
    }

    /// The watermarks that moved since the last call, to be stored.
    pub fn take_advanced(&self) -> Vec<(TopicPartition, i64)> {
        let mut map = self.lock();
        map.iter_mut()
            .filter_map(|(tp, t)| t.take_advanced().map(|w| (tp.clone(), w)))
            .collect()
    }

    /// Current watermarks of every tracked partition (for the final commit).
    pub fn watermarks(&self) -> Vec<(TopicPartition, i64)> {
        self.lock()
            .iter()
            .filter_map(|(tp, t)| t.watermark().map(|w| (tp.clone(), w)))
            .collect()
    }

    /// Waits until none of `tps` has work in flight, or until `deadline`. Returns whether they drained.
    /// Blocking: called from the rebalance callback, which librdkafka runs synchronously.
    pub fn wait_drained(&self, tps: &[TopicPartition], deadline: Instant) -> bool {
        self.wait_until(deadline, |map| {
            let busy = tps
                .iter()
                .any(|tp| map.get(tp).is_some_and(|t| t.in_flight() > 0));
            (!busy).then_some(())
        })
        .is_some()
    }

    /// Re-evaluates `done` on every completion until it yields a value or `deadline` passes.
    fn wait_until<R>(
        &self,
        deadline: Instant,
        mut done: impl FnMut(&HashMap<TopicPartition, PartitionTracker>) -> Option<R>,
    ) -> Option<R> {
        let mut map = self.lock();
        loop {
            if let Some(r) = done(&map) {
                return Some(r);
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            let wait = (deadline - now).min(Duration::from_millis(100));
            map = self
                .drained
                .wait_timeout(map, wait)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Per partition, the offset below which everything has been handed out (a transaction
    /// barrier: exactly-once mode commits at such a point once all of it is complete).
    pub fn positions(&self) -> Vec<(TopicPartition, i64)> {
        self.lock()
            .iter()
            .filter_map(|(tp, t)| t.next.map(|n| (tp.clone(), n)))
            .collect()
    }

    /// Waits until every message below `barrier` is complete, or until `deadline`; returns the
    /// part of `barrier` still assigned (revoked partitions drop out), or `None` on timeout.
    /// Blocking, like [`Acks::wait_drained`].
    pub fn wait_reached(
        &self,
        barrier: &[(TopicPartition, i64)],
        deadline: Instant,
    ) -> Option<Vec<(TopicPartition, i64)>> {
        self.wait_until(deadline, |map| {
            let behind = barrier.iter().any(|(tp, offset)| {
                map.get(tp)
                    .is_some_and(|t| t.watermark().is_some_and(|w| w < *offset))
            });
            (!behind).then(|| {
                barrier
                    .iter()
                    .filter(|(tp, _)| map.contains_key(tp))
                    .cloned()
                    .collect()
            })
        })
    }

    /// Forgets every partition (after the final commit), so closing the consumer waits for nothing.
    pub fn clear(&self) {
        self.lock().clear();
        self.drained.notify_all();
    }

    /// Watermarks of `tps`, then forgets them (they were revoked); later completions are ignored.
    pub fn remove(&self, tps: &[TopicPartition]) -> Vec<(TopicPartition, i64)> {
        let mut map = self.lock();
        tps.iter()
            .filter_map(|tp| {
                map.remove(tp)
                    .and_then(|t| t.watermark().map(|w| (tp.clone(), w)))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watermark_is_contiguous() {
        let mut t = PartitionTracker::default();
        assert_eq!(t.watermark(), None);
        for o in 10..15 {
            t.start(o);
        }
        assert_eq!(t.watermark(), Some(10));
        t.complete(12);
        t.complete(11);
        assert_eq!(t.watermark(), Some(10), "a gap at 10 holds the watermark");
        t.complete(10);
        assert_eq!(t.watermark(), Some(13));
        t.complete(13);
        t.complete(14);
        assert_eq!(t.watermark(), Some(15), "all done: one past the last");
        assert!(!t.complete(14), "completing twice is ignored");
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn advanced_is_reported_once() {
        let mut t = PartitionTracker::default();
        t.start(0);
        t.start(1);
        assert_eq!(t.take_advanced(), Some(0));
        assert_eq!(t.take_advanced(), None);
        t.complete(1);
        assert_eq!(t.take_advanced(), None, "0 still pending");
        t.complete(0);
        assert_eq!(t.take_advanced(), Some(2));
    }

    #[test]
    fn acks_track_partitions_and_revocation() {
        let acks = Acks::new();
        let a = TopicPartition::new("t", 0);
        let b = TopicPartition::new("t", 1);
        let t1 = acks.start(&a, 5);
        let t2 = acks.start(&b, 7);
        assert_eq!(acks.in_flight(), 2);
        acks.complete(&t1);
        let mut adv = acks.take_advanced();
        adv.sort();
        assert_eq!(adv, vec![(a.clone(), 6), (b.clone(), 7)]);
        assert!(acks.wait_drained(std::slice::from_ref(&a), Instant::now()));
        assert!(!acks.wait_drained(
            std::slice::from_ref(&b),
            Instant::now() + Duration::from_millis(20)
        ));
        assert_eq!(acks.remove(std::slice::from_ref(&b)), vec![(b.clone(), 7)]);
        acks.complete(&t2); // after revocation: ignored
        assert_eq!(acks.in_flight(), 0);
    }

    #[test]
    fn complete_all_completes_every_token_across_partitions() {
        let acks = Acks::new();
        let a = TopicPartition::new("t", 0);
        let b = TopicPartition::new("t", 1);
        let tokens: Vec<AckToken> = (0..3)
            .map(|o| acks.start(&a, o))
            .chain((10..12).map(|o| acks.start(&b, o)))
            .collect();
        let gone = TopicPartition::new("t", 2);
        let revoked = acks.start(&gone, 7);
        acks.remove(std::slice::from_ref(&gone));
        // The first of `a` stays pending; a revoked partition's token is ignored.
        acks.complete_all(tokens[1..].iter().chain([&revoked]));
        assert_eq!(acks.in_flight(), 1);
        let mut marks = acks.watermarks();
        marks.sort();
        assert_eq!(marks, vec![(a.clone(), 0), (b.clone(), 12)]);
        acks.complete_all([&tokens[0]]);
        assert_eq!(
            acks.watermarks().iter().find(|(tp, _)| *tp == a),
            Some(&(a, 3))
        );
    }

    #[test]
    fn drain_wakes_on_completion() {
        let acks = std::sync::Arc::new(Acks::new());
        let tp = TopicPartition::new("t", 0);
        let token = acks.start(&tp, 1);
        let other = acks.clone();
        let h = std::thread::spawn(move || other.complete(&token));
        assert!(acks.wait_drained(&[tp], Instant::now() + Duration::from_secs(10)));
        h.join().unwrap();
    }

    #[test]
    fn barrier_is_reached_when_everything_below_it_completes() {
        let acks = std::sync::Arc::new(Acks::new());
        let a = TopicPartition::new("t", 0);
        let b = TopicPartition::new("t", 1);
        let first = acks.start(&a, 3);
        let second = acks.start(&a, 4);
        let other = acks.start(&b, 9);
        let mut barrier = acks.positions();
        barrier.sort();
        assert_eq!(barrier, vec![(a.clone(), 5), (b.clone(), 10)]);
        let later = acks.start(&a, 5); // after the barrier: not waited for
        acks.complete(&second);
        acks.complete(&other);
        assert_eq!(
            acks.wait_reached(&barrier, Instant::now()),
            None,
            "3 is pending"
        );
        let waiter = acks.clone();
        let h = std::thread::spawn(move || waiter.complete(&first));
        let mut reached = acks
            .wait_reached(&barrier, Instant::now() + Duration::from_secs(10))
            .expect("reached");
        reached.sort();
        assert_eq!(reached, barrier);
        h.join().unwrap();
        acks.remove(std::slice::from_ref(&b));
        assert_eq!(
            acks.wait_reached(&barrier, Instant::now()),
            Some(vec![(a.clone(), 5)]),
            "a revoked partition drops out"
        );
        acks.complete(&later);
    }
}
