//! `ragar produce`: sends events from a JSON-lines file to a topic, keyed as the contract says
//! (items by `item_id`, every other event by `user_id`), through an idempotent producer.
//!
//! The file is read and checked first (each line a JSON object with its key field), so a bad line
//! stops the run before anything is sent and the error names the line. Deliveries are awaited in
//! windows, so the broker has every message when [`produce_file`] returns.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use futures::future::try_join_all;
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::config::KafkaConfig;
use crate::ingest::base_client_config;

/// Messages whose delivery is awaited together.
const WINDOW: usize = 2_000;

/// The partition key of an event: `item_id` for items, `user_id` for every other type.
pub fn key_of(event: &serde_json::Value) -> Result<&str, String> {
    let field = match event.get("type").and_then(|t| t.as_str()) {
        Some("item") => "item_id",
        Some(_) => "user_id",
        None => return Err("no string `type`".into()),
    };
    event
        .get(field)
        .and_then(|k| k.as_str())
        .ok_or_else(|| format!("no string `{field}` to key it by"))
}

/// The non-empty lines of `path` with their keys; the first bad line is an error naming it.
pub fn read_lines(path: &Path) -> anyhow::Result<Vec<(String, String)>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not JSON", path.display(), i + 1))?;
        let key = key_of(&value)
            .map_err(|e| anyhow::anyhow!("{}:{}: {e}", path.display(), i + 1))?
            .to_string();
        out.push((key, line.to_string()));
    }
    Ok(out)
}

/// An idempotent producer (`acks=all`) for `kafka`'s brokers and options.
pub fn producer(kafka: &KafkaConfig) -> anyhow::Result<FutureProducer> {
    base_client_config(kafka)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create()
        .context("creating the Kafka producer")
}

/// Sends `lines` (key, payload) to `topic`; `sent` is called with the running count.
pub async fn send_lines(
    producer: &FutureProducer,
    topic: &str,
    lines: &[(String, String)],
    mut sent: impl FnMut(usize),
) -> anyhow::Result<usize> {
    let mut done = 0;
    for window in lines.chunks(WINDOW) {
        let deliveries = window.iter().map(|(key, payload)| {
            producer.send(
                FutureRecord::to(topic).key(key).payload(payload),
                Duration::from_secs(30),
            )
        });
        if let Err((e, _)) = try_join_all(deliveries).await {
            bail!("sending to {topic}: {e}");
        }
        done += window.len();
        sent(done);
    }
    Ok(done)
}

/// Reads `path` and sends every line to `topic`; returns how many were sent.
pub async fn produce_file(
    kafka: &KafkaConfig,
    topic: &str,
    path: &Path,
    progress: bool,
) -> anyhow::Result<usize> {
    let lines = read_lines(path)?;
    let producer = producer(kafka)?;
    let bar = if progress {
        indicatif::ProgressBar::new(lines.len() as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    let n = send_lines(&producer, topic, &lines, |n| bar.set_position(n as u64)).await?;
    bar.finish_and_clear();
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_contract_and_bad_lines_are_named() {
        let item = serde_json::json!({"type": "item", "item_id": "i1", "user_id": "u"});
        assert_eq!(key_of(&item).unwrap(), "i1");
        let display = serde_json::json!({"type": "display", "user_id": "u7"});
        assert_eq!(key_of(&display).unwrap(), "u7");
        assert!(key_of(&serde_json::json!({"type": "display"}))
            .unwrap_err()
            .contains("user_id"));

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        std::fs::write(
            &path,
            "{\"type\":\"interaction\",\"user_id\":\"u1\"}\n\n{\"type\":\"item\",\"item_id\":\"i\"}\n",
        )
        .unwrap();
        let lines = read_lines(&path).unwrap();
        assert_eq!(
            lines.iter().map(|l| l.0.as_str()).collect::<Vec<_>>(),
            ["u1", "i"]
        );
        std::fs::write(&path, "{\"type\":\"item\",\"item_id\":\"i\"}\nnot json\n").unwrap();
        let err = format!("{:#}", read_lines(&path).unwrap_err());
        assert!(
            err.contains("events.jsonl:2") && err.contains("not JSON"),
            "{err}"
        );
    }
}
