//! Configuration: built-in defaults, then a TOML file, then `RAGAR_*` environment variables.
//!
//! Every section rejects unknown keys, durations are typed (`"250ms"`, `"1m"`), and cross-field
//! checks run at load time. Every error names the key it is about (`kafka.brokers: ...`), so a bad
//! config stops start-up with a message that says what to fix.
//!
//! Environment variables address nested keys with a double underscore:
//! `RAGAR_KAFKA__BROKERS=host:9092` sets `kafka.brokers`, `RAGAR_PREFERENCE__K=8` sets
//! `preference.k`. A value is a string when the key's default is one (and for every
//! `kafka.options` property, where `_` in the name stands for `.`); otherwise it is read as a TOML
//! literal (numbers, booleans, arrays, durations in quotes). Other `RAGAR_*` variables are ignored.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::preference::WeightingMode;

/// Prefix of the environment variables that override the file.
pub const ENV_PREFIX: &str = "RAGAR_";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
    /// A value that does not fit its key; `key` is the dotted path.
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        message: message.into(),
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub kafka: KafkaConfig,
    pub redis: RedisConfig,
    pub lance: LanceConfig,
    pub preference: PreferenceConfig,
    pub generate: GenerateConfig,
    pub models: ModelsConfig,
    pub limits: LimitsConfig,
    pub telemetry: TelemetryConfig,
    pub shutdown: ShutdownConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// `bootstrap.servers`.
    pub brokers: String,
    pub group_id: String,
    /// Topics the worker consumes; every event type is accepted on every one of them.
    pub input_topics: Vec<String>,
    pub output_topic: String,
    pub dlq_topic: String,
    #[serde(with = "humantime_serde")]
    pub session_timeout: Duration,
    /// How often stored offsets are committed.
    #[serde(with = "humantime_serde")]
    pub commit_interval: Duration,
    /// Messages consumed but not yet completed; at this the consumer stops reading.
    pub max_in_flight: usize,
    /// How long the consumer may hold off reading at `max_in_flight` before it pauses its
    /// partitions (pausing drops librdkafka's prefetched messages, to be fetched again on resume).
    #[serde(with = "humantime_serde")]
    pub pause_after: Duration,
    /// How long a revoked partition's in-flight work may take to finish before its offsets are committed.
    #[serde(with = "humantime_serde")]
    pub rebalance_drain: Duration,
    /// Extra librdkafka properties for every client (security.protocol, sasl.*, ssl.*, ...).
    pub options: BTreeMap<String, String>,
    /// Kafka transactions cover each output (and dead letter) together with the consumed offsets
    /// it completes (consume-transform-produce): read_committed consumers see every output once.
    pub exactly_once: bool,
    /// The producer's `transactional.id` in exactly-once mode; stable per instance, unique among
    /// live ones. Empty: `{group_id}-{hostname}`.
    pub transactional_id: String,
    /// `transaction.timeout.ms`: how long an open transaction of a dead instance blocks readers.
    #[serde(with = "humantime_serde")]
    pub transaction_timeout: Duration,
}

impl KafkaConfig {
    /// The `transactional.id` exactly-once mode uses.
    pub fn transactional_id(&self) -> String {
        if !self.transactional_id.is_empty() {
            return self.transactional_id.clone();
        }
        let host = std::env::var("HOSTNAME")
            .ok()
            .filter(|h| !h.is_empty())
            .or_else(|| {
                std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .ok()
                    .map(|h| h.trim().to_string())
            })
            .unwrap_or_else(|| "local".into());
        format!("{}-{host}", self.group_id)
    }
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: "localhost:9092".into(),
            group_id: "ragar".into(),
            input_topics: vec!["ragar.items".into(), "ragar.events".into()],
            output_topic: "ragar.images".into(),
            dlq_topic: "ragar.events.dlq".into(),
            session_timeout: Duration::from_secs(10),
            commit_interval: Duration::from_secs(1),
            max_in_flight: 20_000,
            pause_after: Duration::from_secs(1),
            rebalance_drain: Duration::from_secs(10),
            options: BTreeMap::new(),
            exactly_once: false,
            transactional_id: String::new(),
            transaction_timeout: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    pub url: String,
    /// Prefix of every key the worker writes, so several deployments can share one Redis.
    pub key_prefix: String,
    /// How many of a user's newest interactions the hot window keeps.
    pub window: usize,
    #[serde(with = "humantime_serde")]
    pub window_ttl: Duration,
    /// How long a published request id is remembered, to skip republishing on replay.
    #[serde(with = "humantime_serde")]
    pub output_ttl: Duration,
    #[serde(with = "humantime_serde")]
    pub item_ttl: Duration,
    /// Per-command deadline; a slower Redis counts as down.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// After a failure, how long to serve from LanceDB before trying Redis again.
    #[serde(with = "humantime_serde")]
    pub retry_interval: Duration,
    /// With `rediss://`: a PEM file of the CA(s) to trust instead of the system's roots.
    pub tls_ca_file: Option<PathBuf>,
    /// With `rediss://`: a PEM client certificate (and `tls_key_file`, its key) for mutual TLS.
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: "redis://127.0.0.1:6379/".into(),
            key_prefix: "ragar".into(),
            window: 200,
            window_ttl: Duration::from_secs(7 * 24 * 3600),
            output_ttl: Duration::from_secs(24 * 3600),
            item_ttl: Duration::from_secs(24 * 3600),
            timeout: Duration::from_millis(500),
            retry_interval: Duration::from_secs(1),
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LanceConfig {
    /// A local directory or any LanceDB URI.
    pub uri: String,
    /// Largest micro-batch: the events decoded and applied together, whose interactions go to
    /// Redis in one pipeline and to the LanceDB writer as one group. Under a backlog every batch
    /// is full, and per-batch costs (a Redis command per user and batch, the stored-id query and
    /// append per write) are shared by more events: 8,000 ingested about a fifth more events/s
    /// than 2,000 (README, Benchmarks). Without a backlog, `batch_linger` bounds a batch first.
    pub batch_max_rows: usize,
    /// How long the writer waits to fill a micro-batch once it has one event.
    #[serde(with = "humantime_serde")]
    pub batch_linger: Duration,
    /// Background compaction period (which also merges the indices' segments); `0s` disables it.
    #[serde(with = "humantime_serde")]
    pub compact_interval: Duration,
    /// How often the rows written since are added to the indices as a segment of their own; `0s`
    /// disables it. Each write's stored-id lookup scans the rows no index covers, so at 100k
    /// events/s and only the minute's compaction it would scan up to 6M rows per write.
    #[serde(with = "humantime_serde")]
    pub index_interval: Duration,
    /// How stale a read may be with respect to other workers' writes (`0s`: never stale).
    #[serde(with = "humantime_serde")]
    pub read_consistency: Duration,
}

impl Default for LanceConfig {
    fn default() -> Self {
        LanceConfig {
            uri: "data/lancedb".into(),
            batch_max_rows: 8000,
            batch_linger: Duration::from_millis(20),
            compact_interval: Duration::from_secs(60),
            index_interval: Duration::from_secs(5),
            read_consistency: Duration::from_secs(1),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PreferenceConfig {
    pub mode: WeightingMode,
    /// How many of the most similar history items take part.
    pub k: usize,
    /// Softmax temperature over cosine similarities.
    pub tau: f32,
    /// Halves an item's weight every this long; `0s` turns recency weighting off.
    #[serde(with = "humantime_serde")]
    pub recency_half_life: Duration,
    /// Multiplier per action; 0 leaves the action out of the preference.
    pub action_weights: ActionWeights,
    /// When the hot window is full, also search LanceDB for the user's most similar older items.
    pub deep_search: bool,
    /// Similarity to the reference over the first this many embedding values (0: all of them).
    pub match_dims: usize,
}

impl Default for PreferenceConfig {
    fn default() -> Self {
        PreferenceConfig {
            mode: WeightingMode::Retrieval,
            k: 16,
            tau: 0.1,
            recency_half_life: Duration::ZERO,
            action_weights: ActionWeights::default(),
            deep_search: true,
            match_dims: 0,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ActionWeights {
    pub view: f32,
    pub click: f32,
    pub like: f32,
    pub purchase: f32,
    pub dislike: f32,
}

impl Default for ActionWeights {
    fn default() -> Self {
        ActionWeights {
            view: 1.0,
            click: 1.0,
            like: 1.0,
            purchase: 1.0,
            dislike: 0.0,
        }
    }
}

impl ActionWeights {
    /// The weights in the order of [`crate::event::Action::ALL`].
    pub fn as_array(&self) -> [f32; 5] {
        [
            self.view,
            self.click,
            self.like,
            self.purchase,
            self.dislike,
        ]
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GenerateConfig {
    /// Candidates per display when the event does not say.
    pub candidates: u32,
    /// Display requests generated together at most.
    pub batch_max: usize,
    /// How long the first request of a batch waits for others.
    #[serde(with = "humantime_serde")]
    pub batch_delay: Duration,
    /// Mixed into the seed of displays that carry none, so a deployment can vary its outputs.
    pub seed: u64,
    /// Display jobs waiting for the generator at most; beyond it the history stage waits.
    pub queue: usize,
    /// Put every candidate's image in the output message, not only the published one (for
    /// galleries and debugging; the messages grow by N images).
    pub publish_candidate_images: bool,
}

impl Default for GenerateConfig {
    fn default() -> Self {
        GenerateConfig {
            candidates: 4,
            batch_max: 4,
            batch_delay: Duration::from_millis(10),
            seed: 0,
            queue: 64,
            publish_candidate_images: false,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelsConfig {
    /// Embedding dimension of items, interactions and preferences.
    pub dim: usize,
    /// `none`: items must carry an embedding; `minilm`: items without one are embedded by their
    /// text with all-MiniLM-L6-v2 (needs `dim` = 384 and the weights in `minilm_dir`); `emoji`:
    /// by image and text with the EmojiStyle encoder in `encoder_dir` (`dim` = 416).
    pub encoder: String,
    /// Bundle of the `emoji` encoder (`ragar train encoder` writes `models/emoji-encoder`).
    pub encoder_dir: PathBuf,
    /// Directory of the MiniLM weights (`ragar data fetch --only minilm` fills `data/models/all-MiniLM-L6-v2`).
    pub minilm_dir: PathBuf,
    /// `passthrough`: publish the reference itself (the no-personalization baseline);
    /// `diffusion`: the EmojiStyle diffusion generator in `generator_dir` (needs `encoder =
    /// "emoji"`, whose style block conditions it); `sd`: Stable Diffusion img2img from `sd_dir`
    /// (needs `encoder = "emoji"`, which embeds its candidates for the ranker).
    pub generator: String,
    /// Bundle of the `diffusion` generator (`ragar train generator` writes `models/generator`).
    pub generator_dir: PathBuf,
    /// Sampling steps of the `diffusion` generator; 0 takes the bundle's default.
    pub generator_steps: usize,
    /// Style guidance scale of the `diffusion` generator in [0, 8] (0: none); unset takes the
    /// bundle's default.
    pub generator_guidance: Option<f32>,
    /// Identity guidance scale of the `diffusion` generator in [0, 1000] (0: none): every sampling
    /// step climbs the `emoji` encoder's content cosine to the reference, so what is drawn stays
    /// while the style changes.
    pub generator_identity_guidance: f32,
    /// Encoder style guidance scale of the `diffusion` generator in [0, 1000] (0: none): every
    /// sampling step climbs the `emoji` encoder's style cosine to the preference's style block.
    pub generator_encoder_style_guidance: f32,
    /// Gradient steps of the encoder guidance (identity and style) per sampling step, 1..=16.
    pub generator_guidance_iters: usize,
    /// Fidelity floor of the `diffusion` generator in [0, 1) (0: none): each image's residual is
    /// scaled, in tenths, to the largest share whose `emoji` encoder content cosine to the
    /// reference reaches it.
    pub generator_fidelity_floor: f32,
    /// The largest share of the residual the fidelity floor tries, in [1, 4].
    pub generator_floor_max_share: f32,
    /// Draws per candidate of the `diffusion` generator, 1..=16: each candidate keeps the draw
    /// the `emoji` encoder's style head reads closest to its style condition (the preference's
    /// style block, else the reference's own; 1: one draw).
    pub generator_draws: usize,
    /// An encoder bundle that judges the fidelity floor in place of the `emoji` encoder, which
    /// the guidance climbs (unset: the `emoji` encoder judges); needs a fidelity floor.
    pub generator_guard_dir: Option<PathBuf>,
    /// The agreement ramp of the `diffusion` generator, both or neither set, `0 <= low < high
    /// <= 1`: each image keeps a share of its restyle that grows from 0 at a style agreement of
    /// `low` (of the history behind its preference) to all of it at `high`.
    pub generator_agreement_low: Option<f32>,
    pub generator_agreement_high: Option<f32>,
    /// The style snap of the `diffusion` generator, a temperature in [0, 1] (unset: off): each
    /// preference's style block is replaced by the bundle's style codebook weighted by
    /// `softmax(cos / temperature)`; 0 takes the nearest entry, small temperatures lean toward
    /// it, large ones flatten toward the codebook's mean.
    pub generator_snap: Option<f32>,
    /// The own-style gate of the `diffusion` generator: a candidate whose style condition is
    /// nearest the same codebook entry as its reference's own style is the reference, unchanged.
    pub generator_keep_own_style: bool,
    /// The `sd` generator's model: a Stable Diffusion directory in the diffusers layout
    /// (`unet/`, `vae/`, `text_encoder/`, `tokenizer/tokenizer.json`, `scheduler/`).
    pub sd_dir: PathBuf,
    /// Denoising steps the `sd` generator runs per image (1 for SD-Turbo).
    pub sd_steps: usize,
    /// How far the `sd` generator may move from the reference, in (0, 1]: the share of the noise
    /// schedule its steps cover (1 ignores the reference).
    pub sd_strength: f64,
    /// Classifier-free guidance scale of the `sd` generator; at most 1 turns guidance off (0 for
    /// SD-Turbo).
    pub sd_guidance: f64,
    /// `cosine`: personalization and fidelity as embedding cosines (the feature-consistency baseline);
    /// `learned`: the ranker bundle in `ranker_dir` (needs `encoder = "emoji"`).
    pub ranker: String,
    /// Bundle of the `learned` ranker (`ragar train ranker` writes `models/ranker`).
    pub ranker_dir: PathBuf,
    /// Share of personalization in the ranker's total score; the rest is fidelity.
    pub personalization_weight: f32,
}

impl ModelsConfig {
    /// The `diffusion` generator's agreement ramp, `None` when it is off.
    pub fn agreement_ramp(
        &self,
    ) -> Result<Option<crate::model::diffusion::AgreementRamp>, ConfigError> {
        let (low, high) = (
            "models.generator_agreement_low",
            "models.generator_agreement_high",
        );
        match (self.generator_agreement_low, self.generator_agreement_high) {
            (None, None) => Ok(None),
            (Some(_), None) => Err(invalid(high, "set it too, or unset both")),
            (None, Some(_)) => Err(invalid(low, "set it too, or unset both")),
            (Some(l), Some(h)) => {
                if !(h.is_finite() && h > 0.0 && h <= 1.0) {
                    return Err(invalid(high, format!("{h} must be in (0, 1]")));
                }
                let ramp = crate::model::diffusion::AgreementRamp { low: l, high: h };
                ramp.check().map_err(|e| invalid(low, e))?;
                Ok(Some(ramp))
            }
        }
    }
}

impl Default for ModelsConfig {
    fn default() -> Self {
        ModelsConfig {
            dim: 384,
            encoder: "none".into(),
            encoder_dir: PathBuf::from("models/emoji-encoder"),
            minilm_dir: PathBuf::from("data").join(crate::model::minilm::MINILM_DIR),
            generator: "passthrough".into(),
            generator_dir: PathBuf::from("models/generator"),
            generator_steps: 0,
            generator_guidance: None,
            generator_identity_guidance: 0.0,
            generator_encoder_style_guidance: 0.0,
            generator_guidance_iters: 1,
            generator_fidelity_floor: 0.0,
            generator_floor_max_share: 1.0,
            generator_draws: 1,
            generator_guard_dir: None,
            generator_agreement_low: None,
            generator_agreement_high: None,
            generator_snap: None,
            generator_keep_own_style: false,
            sd_dir: PathBuf::from("models/stable-diffusion"),
            sd_steps: 20,
            sd_strength: 0.6,
            sd_guidance: 7.5,
            ranker: "cosine".into(),
            ranker_dir: PathBuf::from("models/ranker"),
            personalization_weight: 0.5,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    pub max_payload_bytes: usize,
    pub max_image_pixels: u64,
    /// Directories `image.uri` may read from; empty refuses every URI.
    pub image_roots: Vec<PathBuf>,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_payload_bytes: 4 << 20,
            max_image_pixels: 4096 * 4096,
            image_roots: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// Address of the `/metrics`, `/healthz` and `/readyz` listener.
    pub listen: SocketAddr,
    pub log_format: LogFormat,
    /// A `tracing` filter, e.g. `info,ragar=debug`; `RUST_LOG` wins when set.
    pub log_filter: String,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            listen: "127.0.0.1:9464".parse().expect("valid address"),
            log_format: LogFormat::Text,
            log_filter: "info".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// On SIGTERM/SIGINT, how long in-flight work may take to finish before the final commit.
    #[serde(with = "humantime_serde")]
    pub grace: Duration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            grace: Duration::from_secs(30),
        }
    }
}

/// Marks a value that was hidden by [`Config::redacted`].
pub const REDACTED: &str = "<redacted>";

/// Whether a librdkafka property holds a secret (`sasl.password`, `ssl.key.password`,
/// `sasl.oauthbearer.client.secret`, inline PEM keys, ...).
fn is_secret_option(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    [
        "password",
        "secret",
        "token",
        "ssl.key.pem",
        "sasl.jaas.config",
        "oauthbearer.config",
    ]
    .iter()
    .any(|s| k.contains(s))
}

/// `url` with the password (and a user name given alone, which Redis takes as the password) hidden.
fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or("", |(u, _)| u);
            format!("{scheme}://{user}:{REDACTED}@{host}{path}")
        }
        None => url.to_string(),
    }
}

impl Config {
    /// A copy that is safe to print or log: secret Kafka options and the Redis password hidden.
    pub fn redacted(&self) -> Config {
        let mut c = self.clone();
        for (k, v) in c.kafka.options.iter_mut() {
            if is_secret_option(k) {
                *v = REDACTED.into();
            }
        }
        c.redis.url = redact_url(&c.redis.url);
        c
    }

    /// Defaults, then `file` (when given), then the process environment.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        Config::load_from(file, std::env::vars())
    }

    /// Like [`Config::load`] with an explicit environment, for tests.
    pub fn load_from(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut tree = toml::Value::try_from(Config::default()).expect("defaults serialize");
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.into(),
                source,
            })?;
            let value: toml::Table =
                toml::from_str(&text).map_err(|source| ConfigError::Parse {
                    path: path.into(),
                    source,
                })?;
            merge(&mut tree, toml::Value::Table(value));
        }
        // Only `RAGAR_SECTION__KEY` names configuration: other `RAGAR_*` variables (a Kubernetes
        // service named ragar injects `RAGAR_SERVICE_HOST`) are not ours to reject.
        let mut env: Vec<(String, String)> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with(ENV_PREFIX) && k.contains("__"))
            .collect();
        env.sort();
        for (var, value) in env {
            apply_env(&mut tree, &var, &value)?;
        }
        let config: Config = serde_path_to_error::deserialize(tree).map_err(|e| {
            let key = e.path().to_string();
            ConfigError::Invalid {
                key,
                message: e.into_inner().to_string(),
            }
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Cross-field and range checks.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let k = &self.kafka;
        if k.brokers.trim().is_empty() {
            return Err(invalid("kafka.brokers", "must name at least one broker"));
        }
        if k.group_id.trim().is_empty() {
            return Err(invalid("kafka.group_id", "must not be empty"));
        }
        if k.input_topics.is_empty() {
            return Err(invalid(
                "kafka.input_topics",
                "must name at least one topic",
            ));
        }
        for (key, topic) in [
            ("kafka.output_topic", &k.output_topic),
            ("kafka.dlq_topic", &k.dlq_topic),
        ] {
            if topic.is_empty() {
                return Err(invalid(key, "must not be empty"));
            }
            if k.input_topics.contains(topic) {
                return Err(invalid(key, format!("`{topic}` is also in kafka.input_topics: the worker would read its own output")));
            }
        }
        if k.max_in_flight == 0 {
            return Err(invalid("kafka.max_in_flight", "must be at least 1"));
        }
        // The consumer does not poll while it holds off, so a rebalance waits for it.
        if k.pause_after > Duration::from_secs(60) {
            return Err(invalid(
                "kafka.pause_after",
                "must be at most 60s: rebalances wait for it",
            ));
        }
        if k.exactly_once {
            if k.transaction_timeout < Duration::from_secs(1) {
                return Err(invalid("kafka.transaction_timeout", "must be at least 1s"));
            }
            if k.options.get("isolation.level").map(String::as_str) == Some("read_uncommitted") {
                return Err(invalid(
                    "kafka.options.isolation.level",
                    "exactly-once mode reads committed data only",
                ));
            }
        }
        if k.session_timeout < Duration::from_millis(1000) {
            return Err(invalid("kafka.session_timeout", "must be at least 1s"));
        }
        if k.commit_interval.is_zero() {
            return Err(invalid("kafka.commit_interval", "must be greater than 0"));
        }
        const OWNED: [&str; 8] = [
            "bootstrap.servers",
            "group.id",
            "enable.auto.offset.store",
            "enable.auto.commit",
            "auto.commit.interval.ms",
            "session.timeout.ms",
            "transactional.id",
            "transaction.timeout.ms",
        ];
        for key in k.options.keys() {
            if OWNED.contains(&key.as_str()) {
                return Err(invalid(
                    &format!("kafka.options.{key}"),
                    "is set by the worker; use the kafka.* key instead",
                ));
            }
        }
        let r = &self.redis;
        let tls = r.url.starts_with("rediss://");
        if !(tls || r.url.starts_with("redis://") || r.url.starts_with("redis+unix://")) {
            return Err(invalid(
                "redis.url",
                "must start with redis://, rediss:// (TLS) or redis+unix://",
            ));
        }
        let files = [
            ("redis.tls_ca_file", &r.tls_ca_file),
            ("redis.tls_cert_file", &r.tls_cert_file),
            ("redis.tls_key_file", &r.tls_key_file),
        ];
        for (key, file) in files {
            let Some(path) = file else { continue };
            if !tls {
                return Err(invalid(key, "is only used with a rediss:// redis.url"));
            }
            if let Err(e) = std::fs::metadata(path) {
                return Err(invalid(key, &format!("{}: {e}", path.display())));
            }
        }
        if r.tls_cert_file.is_some() != r.tls_key_file.is_some() {
            let key = if r.tls_cert_file.is_some() {
                "redis.tls_key_file"
            } else {
                "redis.tls_cert_file"
            };
            return Err(invalid(
                key,
                "mutual TLS needs both redis.tls_cert_file and redis.tls_key_file",
            ));
        }
        if r.window == 0 {
            return Err(invalid("redis.window", "must be at least 1"));
        }
        if r.key_prefix.is_empty() || r.key_prefix.contains(char::is_whitespace) {
            return Err(invalid(
                "redis.key_prefix",
                "must be non-empty and without spaces",
            ));
        }
        if r.timeout.is_zero() {
            return Err(invalid("redis.timeout", "must be greater than 0"));
        }
        if self.lance.uri.is_empty() {
            return Err(invalid("lance.uri", "must not be empty"));
        }
        if self.lance.batch_max_rows == 0 {
            return Err(invalid("lance.batch_max_rows", "must be at least 1"));
        }
        let p = &self.preference;
        if p.k == 0 {
            return Err(invalid("preference.k", "must be at least 1"));
        }
        if !(p.tau.is_finite() && p.tau > 0.0) {
            return Err(invalid(
                "preference.tau",
                "must be a finite number greater than 0",
            ));
        }
        if p.match_dims > self.models.dim {
            return Err(invalid(
                "preference.match_dims",
                format!("must be at most models.dim ({})", self.models.dim),
            ));
        }
        for (name, w) in ["view", "click", "like", "purchase", "dislike"]
            .iter()
            .zip(p.action_weights.as_array())
        {
            if !(w.is_finite() && w >= 0.0) {
                return Err(invalid(
                    &format!("preference.action_weights.{name}"),
                    "must be a finite number >= 0",
                ));
            }
        }
        if p.action_weights.as_array().iter().all(|w| *w == 0.0) {
            return Err(invalid(
                "preference.action_weights",
                "at least one action needs a weight above 0",
            ));
        }
        let g = &self.generate;
        if g.candidates == 0 || g.candidates > crate::event::MAX_CANDIDATES {
            return Err(invalid(
                "generate.candidates",
                format!("must be in 1..={}", crate::event::MAX_CANDIDATES),
            ));
        }
        if g.batch_max == 0 {
            return Err(invalid("generate.batch_max", "must be at least 1"));
        }
        if g.queue == 0 {
            return Err(invalid("generate.queue", "must be at least 1"));
        }
        let m = &self.models;
        if m.dim == 0 || m.dim > 4096 {
            return Err(invalid("models.dim", "must be in 1..=4096"));
        }
        if !(0.0..=1.0).contains(&m.personalization_weight) {
            return Err(invalid("models.personalization_weight", "must be in 0..=1"));
        }
        if m.sd_steps == 0 || m.sd_steps > 1000 {
            return Err(invalid("models.sd_steps", "must be in 1..=1000"));
        }
        if let Some(g) = m.generator_guidance {
            crate::model::diffusion::check_guidance(g)
                .map_err(|e| invalid("models.generator_guidance", e))?;
        }
        crate::model::diffusion::check_identity_guidance(m.generator_identity_guidance)
            .map_err(|e| invalid("models.generator_identity_guidance", e))?;
        crate::model::diffusion::check_encoder_style_guidance(m.generator_encoder_style_guidance)
            .map_err(|e| invalid("models.generator_encoder_style_guidance", e))?;
        crate::model::diffusion::check_guidance_iters(m.generator_guidance_iters)
            .map_err(|e| invalid("models.generator_guidance_iters", e))?;
        crate::model::diffusion::check_fidelity_floor(m.generator_fidelity_floor)
            .map_err(|e| invalid("models.generator_fidelity_floor", e))?;
        crate::model::diffusion::check_floor_max_share(m.generator_floor_max_share)
            .map_err(|e| invalid("models.generator_floor_max_share", e))?;
        crate::model::diffusion::check_draws(m.generator_draws)
            .map_err(|e| invalid("models.generator_draws", e))?;
        if m.generator_guard_dir.is_some() && m.generator_fidelity_floor == 0.0 {
            return Err(invalid(
                "models.generator_guard_dir",
                "the guard judges the fidelity floor: set models.generator_fidelity_floor above 0",
            ));
        }
        m.agreement_ramp()?;
        if let Some(t) = m.generator_snap {
            crate::model::diffusion::check_snap_temperature(t)
                .map_err(|e| invalid("models.generator_snap", e))?;
        }
        if !(m.sd_strength > 0.0 && m.sd_strength <= 1.0) {
            return Err(invalid(
                "models.sd_strength",
                "must be greater than 0 and at most 1",
            ));
        }
        if m.sd_steps as f64 / m.sd_strength > 1000.0 {
            return Err(invalid(
                "models.sd_steps",
                format!(
                    "{} steps at models.sd_strength {} need more than the 1000 points of a \
                     Stable Diffusion noise schedule",
                    m.sd_steps, m.sd_strength
                ),
            ));
        }
        if !(m.sd_guidance.is_finite() && m.sd_guidance >= 0.0) {
            return Err(invalid(
                "models.sd_guidance",
                "must be a finite number >= 0",
            ));
        }
        let l = &self.limits;
        if l.max_payload_bytes < 1024 {
            return Err(invalid("limits.max_payload_bytes", "must be at least 1024"));
        }
        if l.max_image_pixels == 0 {
            return Err(invalid("limits.max_image_pixels", "must be at least 1"));
        }
        for (i, root) in l.image_roots.iter().enumerate() {
            if !root.is_dir() {
                return Err(invalid(
                    &format!("limits.image_roots[{i}]"),
                    format!("{} is not a directory", root.display()),
                ));
            }
        }
        Ok(())
    }

    /// The decoding limits this configuration implies.
    pub fn decode_limits(&self) -> crate::event::Limits {
        crate::event::Limits {
            dim: self.models.dim,
            max_payload_bytes: self.limits.max_payload_bytes,
            max_image_pixels: self.limits.max_image_pixels,
            image_roots: self.limits.image_roots.clone(),
        }
    }
}

/// Deep-merges `over` into `base`: tables merge key by key, anything else replaces.
fn merge(base: &mut toml::Value, over: toml::Value) {
    match (base, over) {
        (toml::Value::Table(b), toml::Value::Table(o)) => {
            for (key, value) in o {
                match b.get_mut(&key) {
                    Some(existing) => merge(existing, value),
                    None => {
                        b.insert(key, value);
                    }
                }
            }
        }
        (slot, value) => *slot = value,
    }
}

fn apply_env(tree: &mut toml::Value, var: &str, raw: &str) -> Result<(), ConfigError> {
    let path: Vec<String> = var[ENV_PREFIX.len()..]
        .split("__")
        .map(|s| s.to_ascii_lowercase())
        .collect();
    if path.iter().any(|p| p.is_empty()) {
        return Err(ConfigError::Env {
            var: var.into(),
            message: "empty key segment (use `__` between keys)".into(),
        });
    }
    let mut node = tree;
    for (i, seg) in path.iter().enumerate() {
        let under_options = i > 0 && path[i - 1] == "options";
        let table = node.as_table_mut().ok_or_else(|| ConfigError::Env {
            var: var.into(),
            message: format!("`{}` is not a section", path[..i].join(".")),
        })?;
        if i == path.len() - 1 {
            // librdkafka property names have dots, which variable names cannot: `_` stands for `.`.
            let key = if under_options {
                seg.replace('_', ".")
            } else {
                seg.clone()
            };
            // A key whose default is a string (and every librdkafka property) stays a string, so
            // `RAGAR_KAFKA__GROUP_ID=42` means the group "42".
            let stays_string =
                under_options || matches!(table.get(&key), Some(toml::Value::String(_)));
            let value = if stays_string {
                toml::Value::String(raw.into())
            } else {
                parse_env_value(raw)
            };
            table.insert(key, value);
            return Ok(());
        }
        node = table
            .entry(seg.clone())
            .or_insert(toml::Value::Table(toml::Table::new()));
    }
    Ok(())
}

fn parse_env_value(raw: &str) -> toml::Value {
    let wrapped = format!("v = {raw}");
    match toml::from_str::<toml::Table>(&wrapped) {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(raw.into())),
        Err(_) => toml::Value::String(raw.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(toml_text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ragar.toml");
        std::fs::write(&path, toml_text).unwrap();
        Config::load_from(
            Some(&path),
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
    }

    #[test]
    fn redacted_hides_secrets_and_keeps_the_rest() {
        let mut c = Config::default();
        c.kafka
            .options
            .insert("sasl.password".into(), "hunter2".into());
        c.kafka
            .options
            .insert("ssl.key.password".into(), "k3y".into());
        c.kafka.options.insert("sasl.username".into(), "svc".into());
        c.kafka
            .options
            .insert("security.protocol".into(), "SASL_SSL".into());
        c.redis.url = "rediss://default:s3cret@cache:6380/2".into();
        let r = c.redacted();
        let shown = toml::to_string(&r).unwrap();
        for secret in ["hunter2", "k3y", "s3cret"] {
            assert!(!shown.contains(secret), "{secret} shown: {shown}");
        }
        assert_eq!(r.kafka.options["sasl.username"], "svc");
        assert_eq!(r.kafka.options["security.protocol"], "SASL_SSL");
        assert_eq!(r.redis.url, "rediss://default:<redacted>@cache:6380/2");
        assert_eq!(redact_url("redis://:pw@h:1/"), "redis://:<redacted>@h:1/");
        assert_eq!(
            redact_url("redis://127.0.0.1:6379/"),
            "redis://127.0.0.1:6379/"
        );
    }

    #[test]
    fn defaults_are_valid() {
        let c = Config::load_from(None, Vec::new()).unwrap();
        assert_eq!(c.models.dim, 384);
        assert_eq!(c.preference.mode, WeightingMode::Retrieval);
    }

    #[test]
    fn file_then_env() {
        let c = load(
            "[kafka]\nbrokers = \"a:1\"\n[preference]\nk = 4\ntau = 0.5\nrecency_half_life = \"1h\"\n",
            &[
                ("RAGAR_PREFERENCE__K", "8"),
                ("RAGAR_KAFKA__OPTIONS__SECURITY_PROTOCOL", "SASL_SSL"),
                ("RAGAR_KAFKA__OPTIONS__LINGER_MS", "5"),
                ("RAGAR_KAFKA__GROUP_ID", "42"),
                ("RAGAR_SERVICE_HOST", "10.0.0.1"),
                ("OTHER", "x"),
            ],
        )
        .unwrap();
        assert_eq!(c.kafka.brokers, "a:1");
        assert_eq!(c.preference.k, 8);
        assert_eq!(c.preference.tau, 0.5);
        assert_eq!(c.preference.recency_half_life, Duration::from_secs(3600));
        assert_eq!(
            c.kafka.options.get("security.protocol").map(String::as_str),
            Some("SASL_SSL")
        );
        assert_eq!(
            c.kafka.options.get("linger.ms").map(String::as_str),
            Some("5")
        );
        assert_eq!(c.kafka.group_id, "42");
    }

    fn err_key(toml_text: &str, env: &[(&str, &str)]) -> String {
        match load(toml_text, env).unwrap_err() {
            ConfigError::Invalid { key, .. } => key,
            other => panic!("expected an invalid-key error, got {other}"),
        }
    }

    #[test]
    fn errors_name_the_key() {
        assert_eq!(err_key("[kafka]\nbrokerz = \"x\"\n", &[]), "kafka.brokerz");
        assert!(load("[kafka]\nbrokerz = \"x\"\n", &[])
            .unwrap_err()
            .to_string()
            .contains("brokerz"));
        assert_eq!(err_key("[preference]\ntau = 0\n", &[]), "preference.tau");
        assert_eq!(err_key("[preference]\nk = \"many\"\n", &[]), "preference.k");
        assert_eq!(err_key("", &[("RAGAR_REDIS__WINDOW", "0")]), "redis.window");
        assert_eq!(
            err_key("[lance]\nbatch_linger = \"soon\"\n", &[]),
            "lance.batch_linger"
        );
        assert_eq!(
            err_key("[kafka]\noutput_topic = \"ragar.events\"\n", &[]),
            "kafka.output_topic"
        );
        assert_eq!(
            err_key("[kafka.options]\n\"group.id\" = \"x\"\n", &[]),
            "kafka.options.group.id"
        );
        assert_eq!(
            err_key("[preference.action_weights]\nlike = -1\n", &[]),
            "preference.action_weights.like"
        );
        assert_eq!(
            err_key("[telemetry]\nlisten = \"nowhere\"\n", &[]),
            "telemetry.listen"
        );
        assert_eq!(err_key("[models]\ndim = 0\n", &[]), "models.dim");
        assert_eq!(err_key("[models]\nsd_steps = 0\n", &[]), "models.sd_steps");
        assert_eq!(
            err_key("[models]\ngenerator_guidance = 9.5\n", &[]),
            "models.generator_guidance"
        );
        assert_eq!(
            err_key("[models]\ngenerator_identity_guidance = -3.0\n", &[]),
            "models.generator_identity_guidance"
        );
        assert_eq!(
            err_key("[models]\ngenerator_encoder_style_guidance = 1e9\n", &[]),
            "models.generator_encoder_style_guidance"
        );
        assert_eq!(
            err_key("[models]\ngenerator_guidance_iters = 0\n", &[]),
            "models.generator_guidance_iters"
        );
        assert_eq!(
            err_key("[models]\ngenerator_fidelity_floor = 1.0\n", &[]),
            "models.generator_fidelity_floor"
        );
        assert_eq!(
            err_key("[models]\ngenerator_floor_max_share = 0.5\n", &[]),
            "models.generator_floor_max_share"
        );
        assert_eq!(
            err_key("[models]\ngenerator_draws = 0\n", &[]),
            "models.generator_draws"
        );
        assert_eq!(
            err_key("[models]\ngenerator_guard_dir = \"models/guard\"\n", &[]),
            "models.generator_guard_dir"
        );
        assert_eq!(
            err_key("[models]\ngenerator_agreement_low = 0.6\n", &[]),
            "models.generator_agreement_high"
        );
        assert_eq!(
            err_key("", &[("RAGAR_MODELS__GENERATOR_AGREEMENT_HIGH", "0.8")]),
            "models.generator_agreement_low"
        );
        assert_eq!(
            err_key(
                "[models]\ngenerator_agreement_low = 0.8\ngenerator_agreement_high = 0.6\n",
                &[]
            ),
            "models.generator_agreement_low"
        );
        assert_eq!(
            err_key(
                "[models]\ngenerator_agreement_low = 0.6\ngenerator_agreement_high = 1.5\n",
                &[]
            ),
            "models.generator_agreement_high"
        );
        assert_eq!(
            err_key("[models]\ngenerator_snap = -0.1\n", &[]),
            "models.generator_snap"
        );
        let ramp = load(
            "[models]\ngenerator_agreement_low = 0.6\ngenerator_agreement_high = 0.8\n",
            &[],
        )
        .unwrap()
        .models
        .agreement_ramp()
        .unwrap();
        assert_eq!(
            ramp,
            Some(crate::model::diffusion::AgreementRamp {
                low: 0.6,
                high: 0.8
            })
        );
        assert_eq!(
            err_key("[models]\nsd_steps = 800\nsd_strength = 0.5\n", &[]),
            "models.sd_steps"
        );
        assert_eq!(
            err_key("[models]\nsd_strength = 0\n", &[]),
            "models.sd_strength"
        );
        assert_eq!(
            err_key("", &[("RAGAR_MODELS__SD_STRENGTH", "1.5")]),
            "models.sd_strength"
        );
        assert_eq!(
            err_key("[models]\nsd_guidance = -1.0\n", &[]),
            "models.sd_guidance"
        );
        assert_eq!(
            err_key("[models]\nsd_dirr = \"x\"\n", &[]),
            "models.sd_dirr"
        );
        let sd = load(
            "[models]\ngenerator = \"sd\"\nsd_dir = \"m/sd-turbo\"\nsd_steps = 1\nsd_strength = 0.5\nsd_guidance = 0.0\n",
            &[("RAGAR_MODELS__SD_GUIDANCE", "1")],
        )
        .unwrap();
        assert_eq!(sd.models.sd_dir, PathBuf::from("m/sd-turbo"));
        assert_eq!((sd.models.sd_steps, sd.models.sd_strength), (1, 0.5));
        assert_eq!(sd.models.sd_guidance, 1.0);
        assert_eq!(
            err_key("[redis]\ntls_ca_file = \"Cargo.toml\"\n", &[]),
            "redis.tls_ca_file",
            "TLS files need a rediss:// URL"
        );
        assert_eq!(
            err_key(
                "[redis]\nurl = \"rediss://h:6380/\"\ntls_ca_file = \"/nonexistent/ca.pem\"\n",
                &[]
            ),
            "redis.tls_ca_file"
        );
        assert_eq!(
            err_key(
                "[redis]\nurl = \"rediss://h:6380/\"\ntls_cert_file = \"Cargo.toml\"\n",
                &[]
            ),
            "redis.tls_key_file"
        );
        assert!(load(
            "[redis]\nurl = \"rediss://h:6380/\"\ntls_ca_file = \"Cargo.toml\"\n",
            &[]
        )
        .is_ok());
        assert!(matches!(
            load("not toml =", &[]).unwrap_err(),
            ConfigError::Parse { .. }
        ));
    }
}
