//! The durable history store on LanceDB.
//!
//! Two tables live in one database: `interactions` (one row per event, with the item's embedding at
//! the time, so preference retrieval never has to join against a catalog that may have changed since)
//! and `items` (the catalog, one row per `item_id`). Events arrive at least once, so a batch of
//! interactions first asks which of its `event_id`s are stored and appends only the others: a
//! replayed batch is a no-op instead of a duplicate. Items are upserted on `item_id`.
//!
//! Every micro-batch write adds a data fragment, and reads slow down as fragments pile up, so
//! [`LanceStore::optimize`] is meant to run in the background: it compacts both tables, prunes old
//! versions, merges the indices' segments into one and creates the BTree scalar indices that the
//! `user_id` filters, the `event_id` lookups and the `item_id` merge join rely on. Between two
//! compactions, [`LanceStore::index_new_rows`] adds the rows written since as a new index segment
//! (cost: those rows only): a query scans every row no index covers, so without it the stored-id
//! lookup before each write would read everything written since the last compaction.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::{Float32Type, Int64Type};
use arrow_array::{
    Array, ArrayRef, BinaryArray, FixedSizeListArray, Float32Array, Int64Array, RecordBatch,
    RecordBatchIterator, StringArray,
};
use arrow_schema::{ArrowError, DataType, Field, FieldRef, Schema, SchemaRef};
use futures::TryStreamExt;
use lancedb::expr::{col, lit};
use lancedb::index::scalar::BTreeIndexBuilder;
use lancedb::index::{Index, IndexConfig};
use lancedb::query::{ColumnOrdering, ExecutableQuery, QueryBase, Select};
use lancedb::table::{
    CompactionMode, CompactionOptions, NaNVectorBehavior, OptimizeAction, OptimizeOptions,
};
use lancedb::{Connection, DistanceType, Table};

use crate::event::Action;
use crate::history::{newest_first, HistoryEntry, Item};

const INTERACTIONS: &str = "interactions";
const ITEMS: &str = "items";
const EMBEDDING: &str = "embedding";
/// Lance appends this column to vector search results.
const DISTANCE: &str = "_distance";

const INTERACTION_COLUMNS: &[&str] = &[
    "event_id", "user_id", "item_id", "action", "ts_ms", EMBEDDING,
];

/// Scalar indices that [`LanceStore::optimize`] keeps in place: `user_id` serves every per-user
/// filter, `event_id` serves the stored-id lookup of each write, `item_id` is the items' merge key.
const INTERACTION_INDEXED: &[&str] = &["user_id", "event_id"];
/// Event ids per lookup query of [`LanceStore::insert_interactions`] (one `IN` list each).
const EVENT_ID_LOOKUP_CHUNK: usize = 16_384;
const ITEM_INDEXED: &[&str] = &["item_id"];

#[derive(Debug, thiserror::Error)]
pub enum LanceError {
    #[error(transparent)]
    Lance(#[from] lancedb::Error),
    #[error(transparent)]
    Arrow(#[from] ArrowError),
    /// The table exists with an embedding column of another dimension (or none usable): the store
    /// was configured for a different encoder than the one that wrote the data.
    #[error(
        "table `{table}` stores embeddings of dimension {}, but the store is configured for dimension {expected}",
        describe_dim(.found)
    )]
    SchemaMismatch {
        table: String,
        expected: usize,
        /// `None` when the table has no `embedding` column of type FixedSizeList<Float32>.
        found: Option<usize>,
    },
    /// The caller passed data this store cannot write or search with (e.g. a wrong embedding length).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// A stored row cannot be turned back into a [`HistoryEntry`] or [`Item`].
    #[error("table `{table}` holds data that cannot be read back: {detail}")]
    Corrupt { table: String, detail: String },
}

fn describe_dim(found: &Option<usize>) -> String {
    match found {
        Some(dim) => dim.to_string(),
        None => "<none: no FixedSizeList<Float32> `embedding` column>".to_string(),
    }
}

impl LanceError {
    /// Whether running the same operation again may succeed: storage and network failures, timeouts
    /// and commit conflicts with a concurrent writer. Schema, input and data errors are permanent.
    pub fn is_retryable(&self) -> bool {
        match self {
            LanceError::Lance(e) => lancedb_retryable(e),
            LanceError::Arrow(e) => arrow_retryable(e),
            LanceError::SchemaMismatch { .. }
            | LanceError::InvalidInput(_)
            | LanceError::Corrupt { .. } => false,
        }
    }
}

fn lancedb_retryable(e: &lancedb::Error) -> bool {
    use lancedb::Error as E;
    match e {
        // Object-store failures are mostly transient (throttling, connection resets); a permanent one
        // just fails again and the caller's retry budget bounds the cost.
        E::ObjectStore { .. } | E::Timeout { .. } => true,
        // lancedb reports a merge_insert that ran out of time as a Runtime error.
        E::Runtime { message } => message.contains("timed out"),
        E::CreateDir { source, .. } => io_kind_transient(source.kind()),
        E::Arrow { source } => arrow_retryable(source),
        // The `lance` crate is not a direct dependency, so its error variants cannot be named here;
        // their Display prefixes are stable and identify the transient ones.
        E::Lance { source } => {
            lance_message_retryable(&source.to_string()) || chain_has_transient_io(e)
        }
        // Everything else (remote HTTP errors included, when that feature is on) is judged by
        // whether an I/O error sits at its root.
        _ => chain_has_transient_io(e),
    }
}

fn lance_message_retryable(message: &str) -> bool {
    const TRANSIENT: [&str; 6] = [
        "LanceError(IO)",
        // Both "Commit conflict" and "Retryable commit conflict".
        "ommit conflict",
        // A concurrent commit invalidated ours; redoing the operation reads the new version.
        "Incompatible transaction",
        "Too many concurrent writers",
        "Operation timed out",
        "Write rejected by backpressure",
    ];
    TRANSIENT.iter().any(|needle| message.contains(needle))
}

fn arrow_retryable(e: &ArrowError) -> bool {
    match e {
        ArrowError::IoError(_, io) => io_kind_transient(io.kind()),
        ArrowError::ExternalError(source) => chain_has_transient_io(&**source),
        _ => false,
    }
}

fn chain_has_transient_io(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(err);
    while let Some(e) = current {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if io_kind_transient(io.kind()) {
                return true;
            }
        }
        current = e.source();
    }
    false
}

fn io_kind_transient(kind: std::io::ErrorKind) -> bool {
    use std::io::ErrorKind as K;
    matches!(
        kind,
        K::ConnectionRefused
            | K::ConnectionReset
            | K::ConnectionAborted
            | K::NotConnected
            | K::BrokenPipe
            | K::TimedOut
            | K::Interrupted
            | K::WouldBlock
            | K::UnexpectedEof
            | K::HostUnreachable
            | K::NetworkUnreachable
            | K::NetworkDown
            | K::ResourceBusy
            // The volume is full, read-only or not ours right now: an operator fixes it and the
            // worker goes on, having acknowledged nothing it could not write.
            | K::StorageFull
            | K::QuotaExceeded
            | K::ReadOnlyFilesystem
            | K::PermissionDenied
    )
}

/// Handle on the LanceDB database; cheap to clone (the table handles are shared, so every clone
/// sees the writes of the others).
#[derive(Clone)]
pub struct LanceStore {
    conn: Connection,
    interactions: Table,
    items: Table,
    dim: usize,
    interactions_schema: SchemaRef,
    items_schema: SchemaRef,
    /// The child field of the embedding FixedSizeList; batches must reuse it exactly or their schema
    /// would not equal the table's.
    vector_item: FieldRef,
}

impl std::fmt::Debug for LanceStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LanceStore")
            .field("uri", &self.conn.uri())
            .field("dim", &self.dim)
            .finish_non_exhaustive()
    }
}

impl LanceStore {
    /// Opens (creating when missing) the database at `uri` (a local directory path or any lancedb URI)
    /// with tables `items` and `interactions`; embeddings are FixedSizeList<Float32, dim>.
    pub async fn open(uri: &str, dim: usize) -> Result<Self, LanceError> {
        Self::open_with(uri, dim, Some(std::time::Duration::ZERO)).await
    }

    /// Like [`LanceStore::open`], with the interval after which a read checks for other writers'
    /// commits (`Some(ZERO)`: every read; `None`: never, only this handle's own writes are seen).
    pub async fn open_with(
        uri: &str,
        dim: usize,
        read_consistency: Option<std::time::Duration>,
    ) -> Result<Self, LanceError> {
        let dim_i32 = i32::try_from(dim).ok().filter(|d| *d > 0).ok_or_else(|| {
            LanceError::InvalidInput(format!("embedding dimension {dim} is out of range"))
        })?;
        let vector_item: FieldRef = Arc::new(Field::new("item", DataType::Float32, true));
        let embedding = || {
            Field::new(
                EMBEDDING,
                DataType::FixedSizeList(vector_item.clone(), dim_i32),
                false,
            )
        };
        let interactions_schema = Arc::new(Schema::new(vec![
            Field::new("event_id", DataType::Utf8, false),
            Field::new("user_id", DataType::Utf8, false),
            Field::new("item_id", DataType::Utf8, false),
            Field::new("action", DataType::Utf8, false),
            Field::new("ts_ms", DataType::Int64, false),
            embedding(),
        ]));
        let items_schema = Arc::new(Schema::new(vec![
            Field::new("item_id", DataType::Utf8, false),
            Field::new("event_id", DataType::Utf8, false),
            Field::new("text", DataType::Utf8, true),
            Field::new("category", DataType::Utf8, true),
            Field::new("image_png", DataType::Binary, true),
            embedding(),
            Field::new("ts_ms", DataType::Int64, false),
        ]));

        let mut connect = lancedb::connect(uri);
        if let Some(interval) = read_consistency {
            connect = connect.read_consistency_interval(interval);
        }
        let conn = connect.execute().await?;
        let interactions = open_or_create(&conn, INTERACTIONS, interactions_schema.clone()).await?;
        let items = open_or_create(&conn, ITEMS, items_schema.clone()).await?;
        check_dim(&interactions, dim).await?;
        check_dim(&items, dim).await?;

        Ok(Self {
            conn,
            interactions,
            items,
            dim,
            interactions_schema,
            items_schema,
            vector_item,
        })
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Inserts the entries whose event_id is not in the table yet, deduplicating repeated
    /// event_ids inside `rows` first; returns how many rows were inserted. An empty slice is a
    /// no-op.
    ///
    /// The stored ids are looked up by a query on the `event_id` column alone (the BTree index
    /// serves it once maintenance has built it), then the new rows are appended. A merge-insert
    /// on `event_id` did the same in one call, but it moved every row, embeddings included,
    /// through a hash repartition and join (three gathers of each embedding; over a fifth of
    /// the worker's CPU in `benches/ingest.rs`, more once the index existed). Two writers that
    /// commit the same new event at the same moment (only possible across a rebalance whose
    /// drain timed out) can both append it; readers show an event once ([`Self::recent`],
    /// [`Self::nearest`]).
    pub async fn insert_interactions(&self, rows: &[HistoryEntry]) -> Result<u64, LanceError> {
        let fresh = self.fresh_interactions(rows, &[]).await?;
        let fresh: Vec<&HistoryEntry> = fresh.into_iter().map(|i| &rows[i]).collect();
        self.append_interactions(&fresh).await
    }

    /// The positions in `rows` of the interactions to append: the first row of each event id,
    /// leaving out event ids the table holds already and those in `skip` (appends in flight).
    pub async fn fresh_interactions(
        &self,
        rows: &[HistoryEntry],
        skip: &[&HashSet<String>],
    ) -> Result<Vec<usize>, LanceError> {
        let mut seen = HashSet::with_capacity(rows.len());
        let unique: Vec<(usize, &HistoryEntry)> = rows
            .iter()
            .enumerate()
            .filter(|(_, r)| {
                !skip.iter().any(|s| s.contains(&r.event_id)) && seen.insert(r.event_id.as_str())
            })
            .collect();
        if unique.is_empty() {
            return Ok(Vec::new());
        }
        let entries: Vec<&HistoryEntry> = unique.iter().map(|(_, r)| *r).collect();
        let stored = self.stored_event_ids(&entries).await?;
        Ok(unique
            .into_iter()
            .filter(|(_, r)| !stored.contains(r.event_id.as_str()))
            .map(|(i, _)| i)
            .collect())
    }

    /// Appends `rows` as they are (the caller left out the stored ones); returns rows appended.
    pub async fn append_interactions(&self, rows: &[&HistoryEntry]) -> Result<u64, LanceError> {
        if rows.is_empty() {
            return Ok(0);
        }
        let batch = self.interactions_batch(rows)?;
        // Every embedding was checked finite with its length (`check_embedding`): lancedb's own
        // NaN check, a DataFusion function over the whole column, was 2% of the ingest CPU.
        self.interactions
            .add(batch)
            .on_nan_vectors(NaNVectorBehavior::Keep)
            .execute()
            .await?;
        Ok(rows.len() as u64)
    }

    /// The event ids among `rows` that the interactions table holds already.
    async fn stored_event_ids(
        &self,
        rows: &[&HistoryEntry],
    ) -> Result<HashSet<String>, LanceError> {
        let mut stored = HashSet::new();
        for chunk in rows.chunks(EVENT_ID_LOOKUP_CHUNK) {
            // An expression, not SQL text: lancedb tokenizes a SQL filter twice and Lance parses
            // it again, per literal, which was most of this query's CPU at thousands of ids.
            let list = chunk.iter().map(|r| lit(r.event_id.as_str())).collect();
            let batches: Vec<RecordBatch> = self
                .interactions
                .query()
                .only_if_expr(col("event_id").in_list(list, false))
                .select(Select::columns(&["event_id"]))
                .execute()
                .await?
                .try_collect()
                .await?;
            for batch in &batches {
                let ids = batch
                    .column_by_name("event_id")
                    .ok_or_else(|| ArrowError::SchemaError("no event_id column".into()))?
                    .as_string_opt::<i32>()
                    .ok_or_else(|| ArrowError::SchemaError("event_id is not a string".into()))?;
                stored.extend(ids.iter().flatten().map(str::to_string));
            }
        }
        Ok(stored)
    }

    /// Upserts items by item_id (when_matched_update_all + when_not_matched_insert_all); the last one
    /// in `items` wins for duplicate ids.
    pub async fn upsert_items(&self, items: &[Item]) -> Result<(), LanceError> {
        if items.is_empty() {
            return Ok(());
        }
        // A source with two rows for one target row makes the merge ambiguous, so collapse them here.
        let mut last: HashMap<&str, usize> = HashMap::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            last.insert(item.item_id.as_str(), i);
        }
        let unique: Vec<&Item> = items
            .iter()
            .enumerate()
            .filter(|(i, it)| last[it.item_id.as_str()] == *i)
            .map(|(_, it)| it)
            .collect();
        let batch = self.items_batch(&unique)?;

        let mut merge = self.items.merge_insert(&["item_id"]);
        merge
            .when_matched_update_all(None)
            .when_not_matched_insert_all();
        merge
            .execute(Box::new(RecordBatchIterator::new(
                vec![Ok(batch)],
                self.items_schema.clone(),
            )))
            .await?;
        Ok(())
    }

    pub async fn item(&self, item_id: &str) -> Result<Option<Item>, LanceError> {
        let batches: Vec<RecordBatch> = self
            .items
            .query()
            .only_if(format!("item_id = {}", sql_str(item_id)))
            .execute()
            .await?
            .try_collect()
            .await?;
        // Upserts keep ids unique, but two processes upserting the same new id at once can both insert
        // it; the most recent write is the one to believe.
        let mut best: Option<Item> = None;
        for batch in &batches {
            for item in self.decode_items(batch)? {
                let newer = best
                    .as_ref()
                    .is_none_or(|b| (item.ts_ms, &item.event_id) > (b.ts_ms, &b.event_id));
                if newer {
                    best = Some(item);
                }
            }
        }
        Ok(best)
    }

    /// The user's newest `n` interactions, newest first (ts_ms desc, then event_id desc).
    pub async fn recent(&self, user_id: &str, n: usize) -> Result<Vec<HistoryEntry>, LanceError> {
        if n == 0 {
            return Ok(Vec::new());
        }
        let batches: Vec<RecordBatch> = self
            .interactions
            .query()
            .only_if(user_filter(user_id))
            .order_by(Some(vec![
                ColumnOrdering::desc_nulls_last("ts_ms".to_string()),
                ColumnOrdering::desc_nulls_last("event_id".to_string()),
            ]))
            .limit(n)
            .select(Select::columns(INTERACTION_COLUMNS))
            .execute()
            .await?
            .try_collect()
            .await?;
        let mut entries = Vec::new();
        for batch in &batches {
            entries.extend(self.decode_interactions(batch)?);
        }
        // lancedb sorts before applying the limit, so the set is right, but it does not promise the
        // order in which the rows come out of the stream.
        entries.sort_by(newest_first);
        // Writers in separate processes can commit the same event concurrently; show it once.
        entries.dedup_by(|a, b| a.event_id == b.event_id);
        entries.truncate(n);
        Ok(entries)
    }

    /// Vector search restricted to one user: the `k` interactions whose embedding is nearest
    /// (cosine distance) to `query`, nearest first.
    pub async fn nearest(
        &self,
        user_id: &str,
        query: &[f32],
        k: usize,
    ) -> Result<Vec<HistoryEntry>, LanceError> {
        if k == 0 {
            return Ok(Vec::new());
        }
        if query.len() != self.dim {
            return Err(LanceError::InvalidInput(format!(
                "query vector has {} dimensions, the store has {}",
                query.len(),
                self.dim
            )));
        }
        // Prefiltering is lancedb's default (we never call `postfilter`): the user filter runs before
        // the top-k, so a user whose rows are far from the query still gets k results. Bypassing any
        // vector index keeps the search exact; a user's history is small enough for a flat scan.
        let batches: Vec<RecordBatch> = self
            .interactions
            .query()
            .nearest_to(query)?
            .column(EMBEDDING)
            .distance_type(DistanceType::Cosine)
            .bypass_vector_index()
            .only_if(user_filter(user_id))
            .limit(k)
            .select(Select::columns(INTERACTION_COLUMNS))
            .execute()
            .await?
            .try_collect()
            .await?;

        let mut scored: Vec<(f32, HistoryEntry)> = Vec::new();
        for batch in &batches {
            let entries = self.decode_interactions(batch)?;
            let distances: Option<Vec<Option<f32>>> = batch
                .column_by_name(DISTANCE)
                .and_then(|c| c.as_primitive_opt::<Float32Type>())
                .map(|a| a.iter().collect());
            for (i, entry) in entries.into_iter().enumerate() {
                let distance = distances
                    .as_ref()
                    .and_then(|d| d[i])
                    .unwrap_or_else(|| cosine_distance(query, &entry.embedding));
                scored.push((distance, entry));
            }
        }
        scored.sort_by(|(da, a), (db, b)| da.total_cmp(db).then_with(|| newest_first(a, b)));
        let mut seen = HashSet::with_capacity(scored.len());
        let mut out: Vec<HistoryEntry> = Vec::with_capacity(scored.len().min(k));
        for (_, entry) in scored {
            if seen.insert(entry.event_id.clone()) {
                out.push(entry);
            }
        }
        out.truncate(k);
        Ok(out)
    }

    /// Row count of interactions, for one user or all.
    pub async fn count_interactions(&self, user_id: Option<&str>) -> Result<usize, LanceError> {
        Ok(self
            .interactions
            .count_rows(user_id.map(user_filter))
            .await?)
    }

    /// Background maintenance: merges each index's segments (the one built at creation and those
    /// [`Self::index_new_rows`] added) into one that covers the new rows too, compacts both
    /// tables, prunes versions older than 7 days, then creates the BTree scalar indices on
    /// interactions.user_id, interactions.event_id and items.item_id where missing.
    pub async fn optimize(&self) -> Result<(), LanceError> {
        for (table, indexed) in self.indexed_tables() {
            // Nothing to compact, and a scalar index cannot be trained on no rows.
            if table.count_rows(None).await? == 0 {
                continue;
            }
            // Every segment, not lancedb's default of the newest one: segments would pile up, and
            // a lookup searches each. Merged before compacting, because Lance only compacts
            // fragments together that the same index segments cover.
            table
                .optimize(OptimizeAction::Index(OptimizeOptions::merge(usize::MAX)))
                .await?;
            let stats = table
                .optimize(OptimizeAction::Compact {
                    options: compaction_options(),
                    remap_options: None,
                })
                .await?;
            if let Some(c) = stats.compaction {
                tracing::debug!(
                    table = table.name(),
                    fragments_removed = c.fragments_removed,
                    fragments_added = c.fragments_added,
                    "compacted lance table"
                );
            }
            table
                .optimize(OptimizeAction::Prune {
                    older_than: None,
                    delete_unverified: None,
                    error_if_tagged_old_versions: None,
                })
                .await?;
            // Created after compaction so that a new index is built over the compacted fragments
            // instead of being remapped by it.
            ensure_btree_indices(table, indexed).await?;
        }
        Ok(())
    }

    /// Adds the rows written since the last maintenance to each index as a segment of their own,
    /// leaving the existing segments as they are (creating the indices where missing). Cheap
    /// between compactions: the stored-id lookup then searches those rows through the index
    /// instead of scanning them.
    pub async fn index_new_rows(&self) -> Result<(), LanceError> {
        for (table, indexed) in self.indexed_tables() {
            if table.count_rows(None).await? == 0 {
                continue;
            }
            ensure_btree_indices(table, indexed).await?;
            table
                .optimize(OptimizeAction::Index(OptimizeOptions::append()))
                .await?;
        }
        Ok(())
    }

    /// Rows of the interactions table that no `event_id` index segment covers yet (all of them
    /// before the index exists): what a stored-id lookup scans at this moment.
    pub async fn unindexed_rows(&self) -> Result<usize, LanceError> {
        let indices = self.interactions.list_indices().await?;
        let stats = match index_on(&indices, "event_id") {
            Some(ix) => self.interactions.index_stats(&ix.name).await?,
            None => None,
        };
        match stats {
            Some(stats) => Ok(stats.num_unindexed_rows),
            None => Ok(self.interactions.count_rows(None).await?),
        }
    }

    fn indexed_tables(&self) -> [(&Table, &'static [&'static str]); 2] {
        [
            (&self.interactions, INTERACTION_INDEXED),
            (&self.items, ITEM_INDEXED),
        ]
    }

    /// Number of data fragments of the interactions table (for a metric).
    pub async fn fragment_count(&self) -> Result<usize, LanceError> {
        match self.interactions.as_native() {
            // Read from the manifest alone; `stats()` would also count rows and deletions.
            Some(native) => Ok(native.count_fragments().await?),
            None => Ok(self
                .interactions
                .stats()
                .await?
                .fragment_stats
                .num_fragments),
        }
    }

    fn embedding_array(&self, flat: Vec<f32>) -> Result<ArrayRef, LanceError> {
        let size = i32::try_from(self.dim)
            .map_err(|_| LanceError::InvalidInput(format!("dimension {} too large", self.dim)))?;
        let values: ArrayRef = Arc::new(Float32Array::from(flat));
        Ok(Arc::new(FixedSizeListArray::try_new(
            self.vector_item.clone(),
            size,
            values,
            None,
        )?))
    }

    /// Every embedding must be checked on its own: FixedSizeListArray only checks the total length,
    /// so one short and one long vector would silently shift each other's values. Non-finite values
    /// are refused too (no distance to them means anything).
    fn check_embedding(&self, embedding: &[f32], what: &str, id: &str) -> Result<(), LanceError> {
        if embedding.len() != self.dim {
            return Err(LanceError::InvalidInput(format!(
                "{what} `{id}` has an embedding of {} dimensions, the store has {}",
                embedding.len(),
                self.dim
            )));
        }
        if let Some(i) = embedding.iter().position(|v| !v.is_finite()) {
            return Err(LanceError::InvalidInput(format!(
                "{what} `{id}` has a non-finite embedding value at {i}"
            )));
        }
        Ok(())
    }

    fn interactions_batch(&self, rows: &[&HistoryEntry]) -> Result<RecordBatch, LanceError> {
        let mut flat = Vec::with_capacity(rows.len() * self.dim);
        for r in rows {
            self.check_embedding(&r.embedding, "interaction", &r.event_id)?;
            flat.extend_from_slice(&r.embedding);
        }
        let columns: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| r.event_id.as_str()),
            )),
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| r.user_id.as_str()),
            )),
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| r.item_id.as_str()),
            )),
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| r.action.as_str()),
            )),
            Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.ts_ms))),
            self.embedding_array(flat)?,
        ];
        Ok(RecordBatch::try_new(
            self.interactions_schema.clone(),
            columns,
        )?)
    }

    fn items_batch(&self, items: &[&Item]) -> Result<RecordBatch, LanceError> {
        let mut flat = Vec::with_capacity(items.len() * self.dim);
        for it in items {
            self.check_embedding(&it.embedding, "item", &it.item_id)?;
            flat.extend_from_slice(&it.embedding);
        }
        let columns: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from_iter_values(
                items.iter().map(|it| it.item_id.as_str()),
            )),
            Arc::new(StringArray::from_iter_values(
                items.iter().map(|it| it.event_id.as_str()),
            )),
            Arc::new(StringArray::from(
                items
                    .iter()
                    .map(|it| it.text.as_deref())
                    .collect::<Vec<Option<&str>>>(),
            )),
            Arc::new(StringArray::from(
                items
                    .iter()
                    .map(|it| it.category.as_deref())
                    .collect::<Vec<Option<&str>>>(),
            )),
            Arc::new(BinaryArray::from_opt_vec(
                items
                    .iter()
                    .map(|it| it.image_png.as_deref())
                    .collect::<Vec<Option<&[u8]>>>(),
            )),
            self.embedding_array(flat)?,
            Arc::new(Int64Array::from_iter_values(
                items.iter().map(|it| it.ts_ms),
            )),
        ];
        Ok(RecordBatch::try_new(self.items_schema.clone(), columns)?)
    }

    fn decode_interactions(&self, batch: &RecordBatch) -> Result<Vec<HistoryEntry>, LanceError> {
        let t = INTERACTIONS;
        let mut event_ids = strings(batch, t, "event_id")?;
        let mut user_ids = strings(batch, t, "user_id")?;
        let mut item_ids = strings(batch, t, "item_id")?;
        let actions = strings(batch, t, "action")?;
        let ts = int64s(batch, t, "ts_ms")?;
        let mut vectors = embeddings(batch, t, EMBEDDING, self.dim)?;
        let mut out = Vec::with_capacity(batch.num_rows());
        for i in 0..batch.num_rows() {
            let action_str = required(actions[i].as_deref(), t, "action")?;
            let action = Action::parse(action_str)
                .ok_or_else(|| corrupt(t, format!("unknown action `{action_str}`")))?;
            out.push(HistoryEntry {
                event_id: required(event_ids[i].take(), t, "event_id")?,
                user_id: required(user_ids[i].take(), t, "user_id")?,
                item_id: required(item_ids[i].take(), t, "item_id")?,
                action,
                ts_ms: required(ts[i], t, "ts_ms")?,
                embedding: required(vectors[i].take(), t, EMBEDDING)?,
            });
        }
        Ok(out)
    }

    fn decode_items(&self, batch: &RecordBatch) -> Result<Vec<Item>, LanceError> {
        let t = ITEMS;
        let mut item_ids = strings(batch, t, "item_id")?;
        let mut event_ids = strings(batch, t, "event_id")?;
        let mut texts = strings(batch, t, "text")?;
        let mut categories = strings(batch, t, "category")?;
        let mut images = binaries(batch, t, "image_png")?;
        let mut vectors = embeddings(batch, t, EMBEDDING, self.dim)?;
        let ts = int64s(batch, t, "ts_ms")?;
        let mut out = Vec::with_capacity(batch.num_rows());
        for i in 0..batch.num_rows() {
            out.push(Item {
                item_id: required(item_ids[i].take(), t, "item_id")?,
                event_id: required(event_ids[i].take(), t, "event_id")?,
                text: texts[i].take(),
                category: categories[i].take(),
                image_png: images[i].take(),
                embedding: required(vectors[i].take(), t, EMBEDDING)?,
                ts_ms: required(ts[i], t, "ts_ms")?,
            });
        }
        Ok(out)
    }
}

async fn open_or_create(
    conn: &Connection,
    name: &str,
    schema: SchemaRef,
) -> Result<Table, LanceError> {
    match conn.open_table(name).execute().await {
        Ok(table) => return Ok(table),
        Err(lancedb::Error::TableNotFound { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    match conn.create_empty_table(name, schema).execute().await {
        Ok(table) => Ok(table),
        // Another worker created it between our open and our create.
        Err(lancedb::Error::TableAlreadyExists { .. }) => {
            Ok(conn.open_table(name).execute().await?)
        }
        Err(e) => Err(e.into()),
    }
}

async fn check_dim(table: &Table, dim: usize) -> Result<(), LanceError> {
    let schema = table.schema().await?;
    let found = schema
        .field_with_name(EMBEDDING)
        .ok()
        .and_then(|f| match f.data_type() {
            DataType::FixedSizeList(child, n) if child.data_type() == &DataType::Float32 => {
                usize::try_from(*n).ok()
            }
            _ => None,
        });
    if found != Some(dim) {
        return Err(LanceError::SchemaMismatch {
            table: table.name().to_string(),
            expected: dim,
            found,
        });
    }
    Ok(())
}

/// Compaction copies the small fragments' encoded pages into the new files as they are, where
/// Lance can (same file version and schema, no deletions: the append-only interactions), instead
/// of decoding and re-encoding every row; otherwise it re-encodes.
fn compaction_options() -> CompactionOptions {
    CompactionOptions {
        compaction_mode: Some(CompactionMode::TryBinaryCopy),
        ..CompactionOptions::default()
    }
}

/// The index on `column`, whatever its kind or name: any index on it serves the filters.
fn index_on<'a>(indices: &'a [IndexConfig], column: &str) -> Option<&'a IndexConfig> {
    indices
        .iter()
        .find(|ix| ix.columns.iter().any(|c| c == column))
}

async fn ensure_btree_indices(table: &Table, columns: &[&str]) -> Result<(), LanceError> {
    let existing = table.list_indices().await?;
    for column in columns {
        // Don't stack a BTree on top of another kind of index.
        if index_on(&existing, column).is_some() {
            continue;
        }
        table
            .create_index(&[*column], Index::BTree(BTreeIndexBuilder::default()))
            .execute()
            .await?;
        tracing::info!(
            table = table.name(),
            column = *column,
            "created btree index"
        );
    }
    Ok(())
}

/// Quotes a string literal for a lancedb SQL filter. Ids are validated upstream to contain no quote;
/// doubling quotes here keeps a filter injection impossible even if that validation changes.
fn sql_str(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

fn user_filter(user_id: &str) -> String {
    format!("user_id = {}", sql_str(user_id))
}

/// Only used when a backend leaves out the `_distance` column, to still order the results.
fn cosine_distance(a: &[f32], b: &[f32]) -> f32 {
    let (mut dot, mut na, mut nb) = (0.0f32, 0.0f32, 0.0f32);
    for (x, y) in a.iter().zip(b) {
        dot += x * y;
        na += x * x;
        nb += y * y;
    }
    let denom = (na * nb).sqrt();
    if denom == 0.0 {
        return f32::INFINITY;
    }
    1.0 - dot / denom
}

fn corrupt(table: &str, detail: impl Into<String>) -> LanceError {
    LanceError::Corrupt {
        table: table.to_string(),
        detail: detail.into(),
    }
}

fn required<T>(value: Option<T>, table: &str, column: &str) -> Result<T, LanceError> {
    value.ok_or_else(|| corrupt(table, format!("null in non-null column `{column}`")))
}

fn column<'a>(batch: &'a RecordBatch, table: &str, name: &str) -> Result<&'a ArrayRef, LanceError> {
    batch
        .column_by_name(name)
        .ok_or_else(|| corrupt(table, format!("column `{name}` is missing from the result")))
}

fn wrong_type(table: &str, name: &str, found: &DataType, expected: &str) -> LanceError {
    corrupt(
        table,
        format!("column `{name}` has type {found}, expected {expected}"),
    )
}

/// Accepts every string layout, since lance may hand back a different one than was written.
fn strings(
    batch: &RecordBatch,
    table: &str,
    name: &str,
) -> Result<Vec<Option<String>>, LanceError> {
    let col = column(batch, table, name)?;
    if let Some(a) = col.as_string_opt::<i32>() {
        Ok(a.iter().map(|v| v.map(str::to_owned)).collect())
    } else if let Some(a) = col.as_string_opt::<i64>() {
        Ok(a.iter().map(|v| v.map(str::to_owned)).collect())
    } else if let Some(a) = col.as_string_view_opt() {
        Ok(a.iter().map(|v| v.map(str::to_owned)).collect())
    } else {
        Err(wrong_type(table, name, col.data_type(), "a string"))
    }
}

fn binaries(
    batch: &RecordBatch,
    table: &str,
    name: &str,
) -> Result<Vec<Option<Arc<[u8]>>>, LanceError> {
    let col = column(batch, table, name)?;
    if let Some(a) = col.as_binary_opt::<i32>() {
        Ok(a.iter().map(arc_bytes).collect())
    } else if let Some(a) = col.as_binary_opt::<i64>() {
        Ok(a.iter().map(arc_bytes).collect())
    } else if let Some(a) = col.as_binary_view_opt() {
        Ok(a.iter().map(arc_bytes).collect())
    } else {
        Err(wrong_type(table, name, col.data_type(), "binary"))
    }
}

fn arc_bytes(value: Option<&[u8]>) -> Option<Arc<[u8]>> {
    value.map(Arc::<[u8]>::from)
}

fn int64s(batch: &RecordBatch, table: &str, name: &str) -> Result<Vec<Option<i64>>, LanceError> {
    let col = column(batch, table, name)?;
    let a = col
        .as_primitive_opt::<Int64Type>()
        .ok_or_else(|| wrong_type(table, name, col.data_type(), "Int64"))?;
    Ok(a.iter().collect())
}

fn embeddings(
    batch: &RecordBatch,
    table: &str,
    name: &str,
    dim: usize,
) -> Result<Vec<Option<Arc<[f32]>>>, LanceError> {
    let col = column(batch, table, name)?;
    let expected = "FixedSizeList<Float32>";
    let list = col
        .as_fixed_size_list_opt()
        .ok_or_else(|| wrong_type(table, name, col.data_type(), expected))?;
    if usize::try_from(list.value_length()).ok() != Some(dim) {
        return Err(LanceError::SchemaMismatch {
            table: table.to_string(),
            expected: dim,
            found: usize::try_from(list.value_length()).ok(),
        });
    }
    let values = list
        .values()
        .as_primitive_opt::<Float32Type>()
        .ok_or_else(|| wrong_type(table, name, col.data_type(), expected))?
        .values();
    Ok((0..list.len())
        .map(|i| {
            if list.is_null(i) {
                return None;
            }
            let start = list.value_offset(i) as usize;
            Some(Arc::<[f32]>::from(&values[start..start + dim]))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIM: usize = 4;

    fn entry(
        event_id: &str,
        user_id: &str,
        item_id: &str,
        ts_ms: i64,
        embedding: [f32; DIM],
    ) -> HistoryEntry {
        HistoryEntry {
            event_id: event_id.to_string(),
            user_id: user_id.to_string(),
            item_id: item_id.to_string(),
            action: Action::parse("view").unwrap(),
            ts_ms,
            embedding: Arc::from(embedding.to_vec()),
        }
    }

    fn item(
        item_id: &str,
        event_id: &str,
        text: Option<&str>,
        image: Option<&[u8]>,
        ts_ms: i64,
    ) -> Item {
        Item {
            item_id: item_id.to_string(),
            event_id: event_id.to_string(),
            text: text.map(str::to_string),
            category: None,
            image_png: image.map(Arc::<[u8]>::from),
            embedding: Arc::from(vec![0.5f32, 0.25, 0.0, 1.0]),
            ts_ms,
        }
    }

    async fn open(dir: &tempfile::TempDir) -> LanceStore {
        LanceStore::open(dir.path().to_str().unwrap(), DIM)
            .await
            .unwrap()
    }

    fn ids(entries: &[HistoryEntry]) -> Vec<&str> {
        entries.iter().map(|e| e.event_id.as_str()).collect()
    }

    fn sample() -> Vec<HistoryEntry> {
        vec![
            entry("e1", "u1", "i1", 10, [1.0, 0.0, 0.0, 0.0]),
            entry("e2", "u1", "i2", 30, [0.0, 1.0, 0.0, 0.0]),
            entry("e3", "u1", "i3", 20, [0.0, 0.0, 1.0, 0.0]),
            // Same time as e2: the larger event_id is the newer one.
            entry("e4", "u1", "i4", 30, [0.0, 0.0, 0.0, 1.0]),
            entry("e5", "u2", "i1", 40, [1.0, 0.0, 0.0, 0.0]),
        ]
    }

    #[test]
    fn sql_str_doubles_quotes() {
        assert_eq!(sql_str("a'b"), "'a''b'");
        assert_eq!(sql_str("user:1@x"), "'user:1@x'");
    }

    #[tokio::test]
    async fn insert_then_recent_is_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir).await;
        assert_eq!(store.dim(), DIM);
        assert_eq!(store.insert_interactions(&sample()).await.unwrap(), 5);

        let recent = store.recent("u1", 10).await.unwrap();
        assert_eq!(ids(&recent), ["e4", "e2", "e3", "e1"]);
        assert_eq!(recent[1], sample()[1]);
        assert_eq!(ids(&store.recent("u1", 2).await.unwrap()), ["e4", "e2"]);
        assert_eq!(ids(&store.recent("u2", 10).await.unwrap()), ["e5"]);
        assert!(store.recent("nobody", 10).await.unwrap().is_empty());
        assert!(store.recent("u1", 0).await.unwrap().is_empty());

        assert_eq!(store.count_interactions(None).await.unwrap(), 5);
        assert_eq!(store.count_interactions(Some("u1")).await.unwrap(), 4);
        assert_eq!(store.count_interactions(Some("nobody")).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn empty_insert_is_noop() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir).await;
        assert_eq!(store.insert_interactions(&[]).await.unwrap(), 0);
        store.upsert_items(&[]).await.unwrap();
        assert_eq!(store.count_interactions(None).await.unwrap(), 0);
    }

    /// The `event_id` index's (indexed rows, unindexed rows, segments).
    async fn event_id_index(store: &LanceStore) -> (usize, usize, Option<u32>) {
        let indices = store.interactions.list_indices().await.unwrap();
        let index = index_on(&indices, "event_id").expect("the event_id index exists");
        let stats = store
            .interactions
            .index_stats(&index.name)
            .await
            .unwrap()
            .unwrap();
        (
            stats.num_indexed_rows,
            stats.num_unindexed_rows,
            stats.num_indices,
        )
    }

    #[tokio::test]
    async fn new_rows_are_indexed_as_segments_that_compaction_merges() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir).await;
        // Before any maintenance there is no index, and every row is unindexed.
        store.insert_interactions(&sample()).await.unwrap();
        assert_eq!(store.unindexed_rows().await.unwrap(), 5);
        store.index_new_rows().await.unwrap();
        assert_eq!(event_id_index(&store).await, (5, 0, Some(1)));

        // Each round of new rows becomes a segment of its own; the older ones stay as they are.
        let later = |n: usize| entry(&format!("n{n}"), "u3", "i1", 100 + n as i64, [0.0; DIM]);
        store
            .insert_interactions(&[later(1), later(2)])
            .await
            .unwrap();
        assert_eq!(store.unindexed_rows().await.unwrap(), 2);
        store.index_new_rows().await.unwrap();
        assert_eq!(event_id_index(&store).await, (7, 0, Some(2)));
        // Nothing new: no empty segment.
        store.index_new_rows().await.unwrap();
        assert_eq!(event_id_index(&store).await, (7, 0, Some(2)));
        store.insert_interactions(&[later(3)]).await.unwrap();
        store.index_new_rows().await.unwrap();
        assert_eq!(event_id_index(&store).await, (8, 0, Some(3)));

        // The lookup finds stored ids in every segment, and only those.
        let mut replay = sample();
        replay.extend([later(1), later(3), later(4)]);
        let fresh = store.fresh_interactions(&replay, &[]).await.unwrap();
        assert_eq!(fresh, [7]);

        // Compaction merges the segments into one that covers every row, and the fragments of
        // every round (and the unindexed one) into one.
        store.insert_interactions(&[later(4)]).await.unwrap();
        assert_eq!(store.fragment_count().await.unwrap(), 4);
        store.optimize().await.unwrap();
        assert_eq!(event_id_index(&store).await, (9, 0, Some(1)));
        assert_eq!(store.fragment_count().await.unwrap(), 1);
        assert!(store
            .fresh_interactions(&replay, &[])
            .await
            .unwrap()
            .is_empty());
    }

    #[tokio::test]
    async fn reinserting_inserts_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir).await;
        store.insert_interactions(&sample()).await.unwrap();
        assert_eq!(store.insert_interactions(&sample()).await.unwrap(), 0);
        assert_eq!(store.count_interactions(None).await.unwrap(), 5);

        // A batch mixing known and new events inserts only the new one.
        let mut mixed = sample();
        mixed.push(entry("e6", "u2", "i2", 50, [0.0, 1.0, 0.0, 0.0]));
        assert_eq!(store.insert_interactions(&mixed).await.unwrap(), 1);
        assert_eq!(store.count_interactions(None).await.unwrap(), 6);

        // Ids are matched as values, whatever characters they hold.
        let odd = vec![
            entry("it's", "u3", "i1", 60, [1.0, 0.0, 0.0, 0.0]),
            entry("a\"b\\c) OR 1=1 --", "u3", "i1", 61, [1.0, 0.0, 0.0, 0.0]),
        ];
        assert_eq!(store.insert_interactions(&odd).await.unwrap(), 2);
        assert_eq!(store.insert_interactions(&odd).await.unwrap(), 0);
        assert_eq!(store.count_interactions(None).await.unwrap(), 8);
    }

    #[tokio::test]
    async fn fresh_rows_leave_out_stored_ids_ids_in_flight_and_repeats() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir).await;
        store.insert_interactions(&sample()[..2]).await.unwrap();
        // e1 and e2 are stored, e5 is being appended by the write before, e3 comes twice (the
        // first wins).
        let mut rows = sample();
        rows.push(entry("e3", "u1", "i9", 99, [0.0, 0.0, 1.0, 0.0]));
        let skip: HashSet<String> = ["e5".to_string()].into();
        let fresh = store.fresh_interactions(&rows, &[&skip]).await.unwrap();
        assert_eq!(fresh, [2, 3]);
        let fresh: Vec<&HistoryEntry> = fresh.iter().map(|&i| &rows[i]).collect();
        assert_eq!(store.append_interactions(&fresh).await.unwrap(), 2);
        assert_eq!(store.append_interactions(&[]).await.unwrap(), 0);
        assert_eq!(
            ids(&store.recent("u1", 10).await.unwrap()),
            ["e4", "e2", "e3", "e1"]
        );
        assert_eq!(store.count_interactions(None).await.unwrap(), 4);
    }

    #[tokio::test]
    async fn reinserting_a_batch_larger_than_a_lookup_finds_every_stored_id() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir).await;
        // Over one lookup's worth of ids, across several writes, so that the lookup must return
        // every stored id of the batch (no result limit, every chunk, every fragment).
        let n = EVENT_ID_LOOKUP_CHUNK + 100;
        let rows: Vec<HistoryEntry> = (0..n)
            .map(|i| entry(&format!("e{i}"), "u1", "i1", i as i64, [1.0, 0.0, 0.0, 0.0]))
            .collect();
        let (first, second) = rows.split_at(n / 2);
        assert_eq!(
            store.insert_interactions(first).await.unwrap(),
            first.len() as u64
        );
        assert_eq!(
            store.insert_interactions(second).await.unwrap(),
            second.len() as u64
        );
        assert_eq!(store.insert_interactions(&rows).await.unwrap(), 0);
        let mut more = rows.clone();
        more.push(entry("late", "u1", "i1", -1, [0.0, 1.0, 0.0, 0.0]));
        assert_eq!(store.insert_interactions(&more).await.unwrap(), 1);
        assert_eq!(store.count_interactions(None).await.unwrap(), n + 1);
    }

    #[tokio::test]
    async fn duplicate_event_ids_in_one_batch_are_stored_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir).await;
        let a = entry("dup", "u1", "i1", 10, [1.0, 0.0, 0.0, 0.0]);
        let b = entry("other", "u1", "i2", 11, [0.0, 1.0, 0.0, 0.0]);
        assert_eq!(
            store
                .insert_interactions(&[a.clone(), a.clone(), b])
                .await
                .unwrap(),
            2
        );
        assert_eq!(store.count_interactions(Some("u1")).await.unwrap(), 2);
        assert_eq!(
            ids(&store.recent("u1", 10).await.unwrap()),
            ["other", "dup"]
        );
    }

    #[tokio::test]
    async fn wrong_embedding_length_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir).await;
        let mut bad = entry("e1", "u1", "i1", 10, [1.0, 0.0, 0.0, 0.0]);
        bad.embedding = Arc::from(vec![1.0f32, 2.0]);
        let err = store.insert_interactions(&[bad]).await.unwrap_err();
        assert!(matches!(err, LanceError::InvalidInput(_)), "{err}");
        assert!(!err.is_retryable());
        let err = store.nearest("u1", &[1.0, 0.0], 3).await.unwrap_err();
        assert!(matches!(err, LanceError::InvalidInput(_)), "{err}");

        // Non-finite values are refused before LanceDB sees them, and nothing is written.
        for value in [f32::NAN, f32::INFINITY] {
            let bad = entry("e2", "u1", "i1", 10, [1.0, value, 0.0, 0.0]);
            let err = store.insert_interactions(&[bad]).await.unwrap_err();
            assert!(err.to_string().contains("non-finite"), "{err}");
            assert!(!err.is_retryable());
        }
        assert_eq!(store.count_interactions(None).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn nearest_is_per_user_and_nearest_first() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir).await;
        let rows = vec![
            entry("a", "u1", "i1", 1, [0.0, 1.0, 0.0, 0.0]),
            entry("b", "u1", "i2", 2, [0.9, 0.1, 0.0, 0.0]),
            entry("c", "u1", "i3", 3, [0.6, 0.0, 0.8, 0.0]),
            entry("d", "u1", "i4", 4, [-1.0, 0.0, 0.0, 0.0]),
            // Exact matches for the query, but of other users.
            entry("x", "u2", "i1", 5, [1.0, 0.0, 0.0, 0.0]),
            entry("y", "u3", "i1", 6, [2.0, 0.0, 0.0, 0.0]),
        ];
        store.insert_interactions(&rows).await.unwrap();

        let query = [1.0, 0.0, 0.0, 0.0];
        let near = store.nearest("u1", &query, 2).await.unwrap();
        assert_eq!(ids(&near), ["b", "c"]);
        assert!(near.iter().all(|e| e.user_id == "u1"));

        let all = store.nearest("u1", &query, 10).await.unwrap();
        assert_eq!(ids(&all), ["b", "c", "a", "d"]);
        assert_eq!(ids(&store.nearest("u2", &query, 10).await.unwrap()), ["x"]);
        assert!(store
            .nearest("nobody", &query, 10)
            .await
            .unwrap()
            .is_empty());
        assert!(store.nearest("u1", &query, 0).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn items_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir).await;
        let png: &[u8] = &[0x89, b'P', b'N', b'G', 0, 1, 2, 255];
        let mut full = item("it1", "ev1", Some("a red chair"), Some(png), 100);
        full.category = Some("furniture".to_string());
        let bare = item("it2", "ev2", None, None, 200);
        store
            .upsert_items(&[full.clone(), bare.clone()])
            .await
            .unwrap();

        assert_eq!(store.item("it1").await.unwrap(), Some(full.clone()));
        assert_eq!(store.item("it2").await.unwrap(), Some(bare));
        assert_eq!(store.item("missing").await.unwrap(), None);

        // Updates replace the row, and within one call the last write of an id wins.
        let first = item("it1", "ev3", Some("first"), None, 300);
        let last = item("it1", "ev4", Some("last"), Some(&[7u8, 7][..]), 301);
        store.upsert_items(&[first, last.clone()]).await.unwrap();
        assert_eq!(store.item("it1").await.unwrap(), Some(last));
        assert_eq!(store.items.count_rows(None).await.unwrap(), 2);
    }

    #[tokio::test]
    async fn unknown_item_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir).await;
        assert_eq!(store.item("nope").await.unwrap(), None);
    }

    #[tokio::test]
    async fn optimize_is_idempotent_and_keeps_reads_working() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir).await;
        // Separate writes, so that there are several fragments to compact.
        for chunk in sample().chunks(2) {
            store.insert_interactions(chunk).await.unwrap();
        }
        store
            .upsert_items(&[item("it1", "ev1", Some("t"), None, 1)])
            .await
            .unwrap();
        store
            .upsert_items(&[item("it2", "ev2", None, Some(&[1u8, 2, 3][..]), 2)])
            .await
            .unwrap();
        let before = store.fragment_count().await.unwrap();
        assert!(before >= 3, "{before} fragments");

        store.optimize().await.unwrap();
        store.optimize().await.unwrap();

        let after = store.fragment_count().await.unwrap();
        assert!(
            after >= 1 && after < before,
            "{before} -> {after} fragments"
        );
        for (table, columns) in [
            (&store.interactions, INTERACTION_INDEXED),
            (&store.items, ITEM_INDEXED),
        ] {
            let indices = table.list_indices().await.unwrap();
            for column in columns {
                assert!(
                    indices
                        .iter()
                        .any(|ix| ix.columns.iter().any(|c| c.as_str() == *column)),
                    "no index on {}.{column}: {indices:?}",
                    table.name()
                );
            }
        }

        assert_eq!(
            ids(&store.recent("u1", 10).await.unwrap()),
            ["e4", "e2", "e3", "e1"]
        );
        assert_eq!(
            ids(&store.nearest("u1", &[0.0, 0.0, 0.0, 1.0], 1).await.unwrap()),
            ["e4"]
        );
        assert_eq!(
            store
                .item("it2")
                .await
                .unwrap()
                .unwrap()
                .image_png
                .as_deref(),
            Some(&[1u8, 2, 3][..])
        );

        // Dedup must hold through the event_id index, for indexed and not-yet-indexed rows alike.
        assert_eq!(store.insert_interactions(&sample()).await.unwrap(), 0);
        let fresh = [entry("e7", "u1", "i7", 70, [1.0, 1.0, 0.0, 0.0])];
        assert_eq!(store.insert_interactions(&fresh).await.unwrap(), 1);
        assert_eq!(store.insert_interactions(&fresh).await.unwrap(), 0);
        assert_eq!(store.count_interactions(None).await.unwrap(), 6);
        assert_eq!(ids(&store.recent("u1", 1).await.unwrap()), ["e7"]);
    }

    #[tokio::test]
    async fn optimize_on_empty_tables_succeeds() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir).await;
        store.optimize().await.unwrap();
        assert_eq!(store.count_interactions(None).await.unwrap(), 0);
        assert!(store.recent("u1", 5).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn reopening_keeps_data_and_other_dim_fails() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = open(&dir).await;
            store.insert_interactions(&sample()).await.unwrap();
        }
        let reopened = open(&dir).await;
        assert_eq!(reopened.count_interactions(None).await.unwrap(), 5);

        let err = LanceStore::open(dir.path().to_str().unwrap(), DIM * 2)
            .await
            .unwrap_err();
        match &err {
            LanceError::SchemaMismatch {
                expected, found, ..
            } => {
                assert_eq!(*expected, DIM * 2);
                assert_eq!(*found, Some(DIM));
            }
            other => panic!("expected a schema mismatch, got {other:?}"),
        }
        assert!(!err.is_retryable());
        assert!(err.to_string().contains("dimension 4"), "{err}");
    }

    #[test]
    fn retryable_classification() {
        let timeout = LanceError::Lance(lancedb::Error::Timeout {
            message: "slow".into(),
        });
        assert!(timeout.is_retryable());
        let io = LanceError::Arrow(ArrowError::from(std::io::Error::from(
            std::io::ErrorKind::ConnectionReset,
        )));
        assert!(io.is_retryable());
        let read_only = LanceError::Arrow(ArrowError::from(std::io::Error::from(
            std::io::ErrorKind::ReadOnlyFilesystem,
        )));
        assert!(
            read_only.is_retryable(),
            "an unwritable volume stalls, it does not dead-letter"
        );
        let bad = LanceError::Lance(lancedb::Error::InvalidInput {
            message: "nope".into(),
        });
        assert!(!bad.is_retryable());
        assert!(lance_message_retryable(
            "Retryable commit conflict for version 3: x"
        ));
        assert!(!lance_message_retryable("LanceError(Schema): bad"));
    }
}
