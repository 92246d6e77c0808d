//! History: every user's interactions with their item embeddings, and the item catalog.
//!
//! Two stores with different jobs. LanceDB ([`lance`]) is the durable record: an `items` table and an
//! `interactions` table, appended in micro-batches and deduplicated by `event_id`, so a replayed event
//! changes nothing. Redis ([`hot`]) is a cache in front of it: each user's newest-N window, an item
//! cache and idempotency keys for published outputs. `store::History` combines the two and keeps
//! working from LanceDB alone while Redis is unreachable.

use std::sync::Arc;

use crate::event::Action;

pub mod hot;
#[cfg(feature = "lance")]
pub mod lance;
#[cfg(feature = "lance")]
pub mod stage;
#[cfg(feature = "lance")]
pub mod store;

/// One interaction of a user with an item, with the item's embedding at the time.
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryEntry {
    pub event_id: String,
    pub user_id: String,
    pub item_id: String,
    pub action: Action,
    /// Event time, milliseconds since the Unix epoch; "newest" means the largest `(ts_ms, event_id)`.
    pub ts_ms: i64,
    pub embedding: Arc<[f32]>,
}

/// A catalog item as stored: its embedding and, when it has one, its image as PNG bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    pub item_id: String,
    /// The event that last wrote this item.
    pub event_id: String,
    pub text: Option<String>,
    pub category: Option<String>,
    pub image_png: Option<Arc<[u8]>>,
    pub embedding: Arc<[f32]>,
    pub ts_ms: i64,
}

/// Orders entries newest first: by `ts_ms` descending, then `event_id` descending.
pub fn newest_first(a: &HistoryEntry, b: &HistoryEntry) -> std::cmp::Ordering {
    b.ts_ms
        .cmp(&a.ts_ms)
        .then_with(|| b.event_id.cmp(&a.event_id))
}
