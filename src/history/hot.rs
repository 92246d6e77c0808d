//! The Redis side of history: each user's newest-N window, the item cache and output idempotency keys.
//!
//! Keys (all under the configured prefix):
//! - `{p}:win:{user}`: sorted set, score = event time in ms, member = one encoded [`HistoryEntry`].
//!   A window holds a sentinel member (empty, score −inf) once it is *complete*, that is, built
//!   from LanceDB. Appends only touch windows that exist, so a window never silently misses older
//!   history; a missing window is rebuilt from LanceDB on the next read. Appends are plain
//!   pipelined commands (one EXISTS per user, then ZADD, trim and expire): a window that expires
//!   between the two is re-created without its sentinel, and reads treat a window without the
//!   sentinel as missing. Re-adding an entry is a no-op (same member), which makes replays
//!   harmless.
//! - `{p}:item:{item}`: hash with the item's embedding, image and text.
//! - `{p}:out:{request}`: set once a display's output is published, so a replay skips it.
//! - `{p}:lease:{name}`: a lease (the holder's id, with an expiry) that lets one worker of
//!   several run a shared task at a time: LanceDB maintenance, whose concurrent commits conflict.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::AsyncCommands;

use super::{HistoryEntry, Item};
use crate::event::Action;

fn client(cfg: &crate::config::RedisConfig) -> redis::RedisResult<redis::Client> {
    if cfg.tls_ca_file.is_none() && cfg.tls_cert_file.is_none() {
        return redis::Client::open(cfg.url.as_str());
    }
    let read = |key: &'static str, path: &std::path::Path| {
        std::fs::read(path).map_err(|e| {
            redis::RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                key,
                format!("{}: {e}", path.display()),
            ))
        })
    };
    let root_cert = cfg
        .tls_ca_file
        .as_deref()
        .map(|p| read("redis.tls_ca_file", p))
        .transpose()?;
    let client_tls = match (&cfg.tls_cert_file, &cfg.tls_key_file) {
        (Some(cert), Some(key)) => Some(redis::ClientTlsConfig {
            client_cert: read("redis.tls_cert_file", cert)?,
            client_key: read("redis.tls_key_file", key)?,
        }),
        _ => None,
    };
    redis::Client::build_with_tls(
        cfg.url.as_str(),
        redis::TlsCertificates {
            client_tls,
            root_cert,
        },
    )
}

/// The Redis connection and key layout. Every call can fail; the caller decides what a failure means.
#[derive(Clone)]
pub struct Hot {
    conn: ConnectionManager,
    prefix: Arc<str>,
    window: usize,
    window_ttl_ms: u64,
    output_ttl_ms: u64,
    item_ttl_ms: u64,
}

impl Hot {
    /// A lazily connecting client: creating it never fails because Redis is down. A `rediss://`
    /// URL connects over TLS (rustls), trusting `tls_ca_file` when set, else the system's roots,
    /// and presenting `tls_cert_file`/`tls_key_file` when set (mutual TLS).
    pub fn new(cfg: &crate::config::RedisConfig) -> redis::RedisResult<Hot> {
        let client = client(cfg)?;
        let mgr_cfg = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(cfg.timeout))
            .set_response_timeout(Some(cfg.timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(100));
        let conn = ConnectionManager::new_lazy_with_config(client, mgr_cfg)?;
        Ok(Hot {
            conn,
            prefix: cfg.key_prefix.as_str().into(),
            window: cfg.window,
            window_ttl_ms: cfg.window_ttl.as_millis().max(1) as u64,
            output_ttl_ms: cfg.output_ttl.as_millis().max(1) as u64,
            item_ttl_ms: cfg.item_ttl.as_millis().max(1) as u64,
        })
    }

    pub fn window_size(&self) -> usize {
        self.window
    }

    pub fn window_key(&self, user_id: &str) -> String {
        format!("{}:win:{user_id}", self.prefix)
    }

    fn item_key(&self, item_id: &str) -> String {
        format!("{}:item:{item_id}", self.prefix)
    }

    fn output_key(&self, request_id: &str) -> String {
        format!("{}:out:{request_id}", self.prefix)
    }

    pub async fn ping(&self) -> redis::RedisResult<()> {
        let mut c = self.conn.clone();
        redis::cmd("PING")
            .query_async::<String>(&mut c)
            .await
            .map(|_| ())
    }

    /// Adds entries to the windows that are complete; returns how many were added.
    pub async fn append(&self, entries: &[&HistoryEntry]) -> redis::RedisResult<usize> {
        if entries.is_empty() {
            return Ok(0);
        }
        // Group by user, keeping first-seen order of users and the order of each user's entries.
        let mut slot: HashMap<&str, usize> = HashMap::new();
        let mut users: Vec<Vec<&HistoryEntry>> = Vec::new();
        for e in entries {
            let i = *slot.entry(e.user_id.as_str()).or_insert_with(|| {
                users.push(Vec::new());
                users.len() - 1
            });
            users[i].push(e);
        }
        let keys: Vec<String> = users
            .iter()
            .map(|group| self.window_key(&group[0].user_id))
            .collect();
        let mut c = self.conn.clone();
        let mut exists = redis::pipe();
        for key in &keys {
            exists.exists(key);
        }
        let present: Vec<bool> = exists.query_async(&mut c).await?;
        // Each user's entries: one ZADD, then the trim to the newest `window` above the sentinel
        // (rank 0) and the expiry.
        let mut p = redis::pipe();
        let mut added = 0;
        for ((key, group), present) in keys.iter().zip(&users).zip(present) {
            if !present {
                continue;
            }
            let members: Vec<(i64, Vec<u8>)> =
                group.iter().map(|e| (e.ts_ms, encode_member(e))).collect();
            p.zadd_multiple(key, &members)
                .ignore()
                .zremrangebyrank(key, 1, -(self.window as isize + 1))
                .ignore()
                .pexpire(key, self.window_ttl_ms as i64)
                .ignore();
            added += group.len();
        }
        if added > 0 {
            p.query_async::<()>(&mut c).await?;
        }
        Ok(added)
    }

    /// The user's window, newest first; `None` when it is not cached (not complete).
    pub async fn window(&self, user_id: &str) -> redis::RedisResult<Option<Vec<HistoryEntry>>> {
        let mut c = self.conn.clone();
        let key = self.window_key(user_id);
        let members: Vec<Vec<u8>> = c.zrevrange(&key, 0, -1).await?;
        if members.is_empty() {
            return Ok(None);
        }
        if members.last().is_some_and(|m| !m.is_empty()) {
            // No sentinel: an append re-created the window after it expired, so older history
            // is missing from it.
            c.del::<_, ()>(&key).await?;
            return Ok(None);
        }
        let mut out: Vec<HistoryEntry> = Vec::with_capacity(members.len());
        // Event ids as the members spell them (the bytes before the first NUL), not copied.
        let mut seen: std::collections::HashSet<&[u8]> =
            std::collections::HashSet::with_capacity(members.len());
        for m in members.iter().filter(|m| !m.is_empty()) {
            let event_id = m.split(|b| *b == 0).next().unwrap_or_default();
            // One event can be two members when a replay resolved another embedding or time;
            // the newest wins, as LanceDB keeps one row per event.
            if !seen.insert(event_id) {
                continue;
            }
            match decode_member(user_id, m) {
                Some(e) => out.push(e),
                None => {
                    tracing::warn!(
                        user_id,
                        "malformed hot window dropped; it is rebuilt from LanceDB"
                    );
                    c.del::<_, ()>(self.window_key(user_id)).await?;
                    return Ok(None);
                }
            }
        }
        Ok(Some(out))
    }

    /// Replaces the user's window with `entries` (newest first, as from LanceDB) and marks it complete.
    pub async fn fill_window(
        &self,
        user_id: &str,
        entries: &[HistoryEntry],
    ) -> redis::RedisResult<()> {
        let key = self.window_key(user_id);
        let mut p = redis::pipe();
        p.atomic()
            .del(&key)
            .ignore()
            .zadd(&key, "", "-inf")
            .ignore();
        for e in entries.iter().take(self.window) {
            p.zadd(&key, encode_member(e), e.ts_ms).ignore();
        }
        p.pexpire(&key, self.window_ttl_ms as i64).ignore();
        let mut c = self.conn.clone();
        p.query_async::<()>(&mut c).await
    }

    /// Drops windows (they are rebuilt from LanceDB on the next read).
    pub async fn invalidate_windows(&self, users: &[String]) -> redis::RedisResult<()> {
        if users.is_empty() {
            return Ok(());
        }
        let keys: Vec<String> = users.iter().map(|u| self.window_key(u)).collect();
        let mut c = self.conn.clone();
        c.del::<_, ()>(keys).await
    }

    /// Drops every window and cached item under this prefix.
    pub async fn invalidate_all(&self) -> redis::RedisResult<usize> {
        Ok(self.drop_matching("win").await? + self.drop_matching("item").await?)
    }

    async fn drop_matching(&self, kind: &str) -> redis::RedisResult<usize> {
        let pattern = format!("{}:{kind}:*", self.prefix);
        let mut c = self.conn.clone();
        let mut cursor: u64 = 0;
        let mut dropped = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut c)
                .await?;
            if !keys.is_empty() {
                dropped += keys.len();
                c.del::<_, ()>(keys).await?;
            }
            if next == 0 {
                return Ok(dropped);
            }
            cursor = next;
        }
    }

    /// Drops cached items (they are read from LanceDB again).
    pub async fn forget_items(&self, item_ids: &[String]) -> redis::RedisResult<()> {
        if item_ids.is_empty() {
            return Ok(());
        }
        let keys: Vec<String> = item_ids.iter().map(|i| self.item_key(i)).collect();
        let mut c = self.conn.clone();
        c.del::<_, ()>(keys).await
    }

    pub async fn put_items(&self, items: &[&Item]) -> redis::RedisResult<()> {
        if items.is_empty() {
            return Ok(());
        }
        let mut p = redis::pipe();
        for it in items {
            let key = self.item_key(&it.item_id);
            let mut fields: Vec<(&str, Vec<u8>)> = vec![
                ("emb", f32s_to_bytes(&it.embedding).into_owned()),
                ("ev", it.event_id.as_bytes().to_vec()),
                ("ts", it.ts_ms.to_string().into_bytes()),
            ];
            if let Some(img) = &it.image_png {
                fields.push(("img", img.to_vec()));
            }
            if let Some(t) = &it.text {
                fields.push(("text", t.as_bytes().to_vec()));
            }
            if let Some(c) = &it.category {
                fields.push(("cat", c.as_bytes().to_vec()));
            }
            p.del(&key)
                .ignore()
                .hset_multiple(&key, &fields)
                .ignore()
                .pexpire(&key, self.item_ttl_ms as i64)
                .ignore();
        }
        let mut c = self.conn.clone();
        p.query_async::<()>(&mut c).await
    }

    pub async fn item(&self, item_id: &str) -> redis::RedisResult<Option<Item>> {
        let mut c = self.conn.clone();
        let mut h: HashMap<String, Vec<u8>> = c.hgetall(self.item_key(item_id)).await?;
        let Some(emb) = h.remove("emb") else {
            return Ok(None);
        };
        let text = |v: Option<Vec<u8>>| v.and_then(|b| String::from_utf8(b).ok());
        Ok(Some(Item {
            item_id: item_id.to_string(),
            event_id: text(h.remove("ev")).unwrap_or_default(),
            text: text(h.remove("text")),
            category: text(h.remove("cat")),
            image_png: h.remove("img").map(Into::into),
            embedding: crate::event::f32s_from_le_bytes(&emb),
            ts_ms: text(h.remove("ts"))
                .and_then(|s| s.parse().ok())
                .unwrap_or(0),
        }))
    }

    pub async fn output_done(&self, request_id: &str) -> redis::RedisResult<bool> {
        let mut c = self.conn.clone();
        c.exists(self.output_key(request_id)).await
    }

    fn lease_key(&self, name: &str) -> String {
        format!("{}:lease:{name}", self.prefix)
    }

    /// Runs the lease script `lua` on the lease `name` with `holder` as ARGV[1] and, when given,
    /// `ttl` in milliseconds as ARGV[2]; its integer answer.
    async fn lease_script(
        &self,
        lua: &str,
        name: &str,
        holder: &str,
        ttl: Option<Duration>,
    ) -> redis::RedisResult<i64> {
        let script = redis::Script::new(lua);
        let mut call = script.key(self.lease_key(name));
        call.arg(holder);
        if let Some(ttl) = ttl {
            call.arg(ttl.as_millis().max(1) as u64);
        }
        call.invoke_async(&mut self.conn.clone()).await
    }

    /// Takes the lease `name` for `holder` for `ttl` when nobody holds it; true when `holder` has
    /// it now. Holding it already counts as taking it (and renews it). One round trip.
    pub async fn take_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> redis::RedisResult<bool> {
        let lua = "local held = redis.call('GET', KEYS[1]) \
             if held == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end \
             if held then return 0 end \
             redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1";
        Ok(self.lease_script(lua, name, holder, Some(ttl)).await? == 1)
    }

    /// Extends the lease `name` to `ttl` from now if `holder` holds it; false otherwise.
    pub async fn renew_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> redis::RedisResult<bool> {
        let lua = "if redis.call('GET', KEYS[1]) == ARGV[1] then \
               return redis.call('PEXPIRE', KEYS[1], ARGV[2]) else return 0 end";
        Ok(self.lease_script(lua, name, holder, Some(ttl)).await? == 1)
    }

    /// Gives the lease `name` up if `holder` holds it (another holder's is left alone).
    pub async fn release_lease(&self, name: &str, holder: &str) -> redis::RedisResult<()> {
        let lua = "if redis.call('GET', KEYS[1]) == ARGV[1] then \
               return redis.call('DEL', KEYS[1]) else return 0 end";
        self.lease_script(lua, name, holder, None).await.map(|_| ())
    }

    pub async fn mark_output_done(&self, request_id: &str) -> redis::RedisResult<()> {
        let mut c = self.conn.clone();
        redis::cmd("SET")
            .arg(self.output_key(request_id))
            .arg(1)
            .arg("PX")
            .arg(self.output_ttl_ms)
            .query_async::<()>(&mut c)
            .await
    }
}

/// `event_id \0 item_id \0 action \0 ts(i64 LE) embedding(f32 LE…)`. Ids cannot contain NUL, and
/// putting the event id first makes Redis's tie order on equal times match LanceDB's.
pub fn encode_member(e: &HistoryEntry) -> Vec<u8> {
    let mut m = Vec::with_capacity(e.event_id.len() + e.item_id.len() + 20 + e.embedding.len() * 4);
    m.extend_from_slice(e.event_id.as_bytes());
    m.push(0);
    m.extend_from_slice(e.item_id.as_bytes());
    m.push(0);
    m.extend_from_slice(e.action.as_str().as_bytes());
    m.push(0);
    m.extend_from_slice(&e.ts_ms.to_le_bytes());
    m.extend_from_slice(&f32s_to_bytes(&e.embedding));
    m
}

pub fn decode_member(user_id: &str, m: &[u8]) -> Option<HistoryEntry> {
    let mut parts = m.splitn(4, |b| *b == 0);
    let event_id = std::str::from_utf8(parts.next()?).ok()?;
    let item_id = std::str::from_utf8(parts.next()?).ok()?;
    let action = Action::parse(std::str::from_utf8(parts.next()?).ok()?)?;
    let rest = parts.next()?;
    if rest.len() < 8 || (rest.len() - 8) % 4 != 0 {
        return None;
    }
    let ts_ms = i64::from_le_bytes(rest[..8].try_into().ok()?);
    Some(HistoryEntry {
        event_id: event_id.to_string(),
        user_id: user_id.to_string(),
        item_id: item_id.to_string(),
        action,
        ts_ms,
        embedding: crate::event::f32s_from_le_bytes(&rest[8..]),
    })
}

/// Little-endian f32s: the values' own bytes on little-endian machines (one copy; converting
/// value by value was 3% of the worker's ingest CPU).
fn f32s_to_bytes(v: &[f32]) -> std::borrow::Cow<'_, [u8]> {
    if cfg!(target_endian = "little") {
        std::borrow::Cow::Borrowed(bytemuck::cast_slice(v))
    } else {
        std::borrow::Cow::Owned(v.iter().flat_map(|x| x.to_le_bytes()).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, ts: i64) -> HistoryEntry {
        HistoryEntry {
            event_id: id.into(),
            user_id: "u".into(),
            item_id: "item-1".into(),
            action: Action::Purchase,
            ts_ms: ts,
            embedding: vec![0.5, -1.0, 0.0].into(),
        }
    }

    #[test]
    fn member_round_trip() {
        // A timestamp whose bytes contain NUL must survive the split.
        let e = entry("ev-1", 256);
        assert_eq!(decode_member("u", &encode_member(&e)), Some(e));
        assert_eq!(decode_member("u", b"a\0b\0view\0short"), None);
        assert_eq!(decode_member("u", b"a\0b\0stare\0\0\0\0\0\0\0\0\0"), None);
    }
}
