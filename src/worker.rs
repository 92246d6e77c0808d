//! The worker: wires ingest → history stage → generation stage → publish, and shuts them down in order.
//!
//! [`run`] takes its shutdown signal as a future, so the binary passes SIGTERM/SIGINT and tests
//! pass whatever they like. On shutdown the consumer stops taking messages, the stages drain what
//! they hold (bounded by `shutdown.grace`), and the completed watermarks are committed; work that
//! did not finish in time is simply replayed by the next owner of its partition.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ConfigError, ModelsConfig};
use crate::generate::GenerateStage;
use crate::history::hot::Hot;
use crate::history::lance::{LanceError, LanceStore};
use crate::history::stage::{DlqTasks, HistoryStage};
use crate::history::store::History;
use crate::ingest::Ingest;
use crate::model::diffusion::StyleDiffusion;
use crate::model::emoji::EmojiEncoder;
use crate::model::minilm::MiniLm;
use crate::model::ranker::LearnedRanker;
use crate::model::sd::{SdGenerator, SdOptions};
use crate::model::{CosineRanker, Generator, ItemEncoder, Passthrough, Ranker, TextEncoder};
use crate::offsets::Acks;
use crate::preference::Params;
use crate::publish::Publisher;
use crate::telemetry::{self, Health};

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("opening LanceDB: {0}")]
    Lance(#[from] LanceError),
    #[error("Redis client: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("Kafka client: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("exactly-once mode: {0}")]
    Transaction(#[from] crate::publish::CommitError),
    #[error("telemetry listener on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// The models behind the worker's seams.
#[derive(Clone)]
pub struct Models {
    pub encoder: Option<Arc<dyn ItemEncoder>>,
    pub generator: Arc<dyn Generator>,
    pub ranker: Arc<dyn Ranker>,
}

impl Models {
    /// The models named by `[models]`; an unknown name is an error naming its key.
    pub fn from_config(cfg: &ModelsConfig) -> Result<Models, ConfigError> {
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            key: key.into(),
            message,
        };
        let unknown = |key: &str, value: &str, known: &str| {
            invalid(key, format!("unknown model `{value}` (known: {known})"))
        };
        let check_dim = |what: &str, dim: usize| {
            if dim == cfg.dim {
                Ok(())
            } else {
                Err(invalid(
                    "models.dim",
                    format!(
                        "the {what} encoder gives {dim} values, models.dim is {}",
                        cfg.dim
                    ),
                ))
            }
        };
        // The `emoji` encoder by its own type too: the diffusion generator needs it (its identity
        // guidance runs the content head).
        let mut emoji: Option<Arc<EmojiEncoder>> = None;
        let encoder: Option<Arc<dyn ItemEncoder>> = match cfg.encoder.as_str() {
            "none" => None,
            "minilm" => {
                let encoder = TextEncoder::load(&cfg.minilm_dir)
                    .map_err(|e| invalid("models.minilm_dir", e.to_string()))?;
                check_dim("minilm", encoder.dim())?;
                Some(Arc::new(encoder))
            }
            "emoji" => {
                let text = MiniLm::load(&cfg.minilm_dir, &candle_core::Device::Cpu)
                    .map_err(|e| invalid("models.minilm_dir", e.to_string()))?;
                let encoder = EmojiEncoder::load(&cfg.encoder_dir, Some(text))
                    .map_err(|e| invalid("models.encoder_dir", e.to_string()))?;
                check_dim("emoji", encoder.dim())?;
                let encoder = Arc::new(encoder);
                emoji = Some(encoder.clone());
                Some(encoder)
            }
            other => return Err(unknown("models.encoder", other, "none, minilm, emoji")),
        };
        let generator: Arc<dyn Generator> = match cfg.generator.as_str() {
            "passthrough" => Arc::new(Passthrough),
            "diffusion" => {
                let Some(emoji) = &emoji else {
                    return Err(invalid(
                        "models.generator",
                        "the diffusion generator needs models.encoder = \"emoji\"".into(),
                    ));
                };
                let steps = (cfg.generator_steps > 0).then_some(cfg.generator_steps);
                let generator = StyleDiffusion::load(&cfg.generator_dir, steps)
                    .map_err(|e| invalid("models.generator_dir", e.to_string()))?;
                let generator = match cfg.generator_guidance {
                    Some(g) => generator
                        .with_guidance(g)
                        .map_err(|e| invalid("models.generator_guidance", e.to_string()))?,
                    None => generator,
                };
                if generator.config().embedding_dim != emoji.dim() {
                    return Err(invalid(
                        "models.generator_dir",
                        format!(
                            "the generator reads {}-value embeddings, the encoder gives {}",
                            generator.config().embedding_dim,
                            emoji.dim()
                        ),
                    ));
                }
                let scales = crate::model::diffusion::EncoderScales {
                    identity: cfg.generator_identity_guidance,
                    style: cfg.generator_encoder_style_guidance,
                    iters: cfg.generator_guidance_iters,
                    fidelity_floor: cfg.generator_fidelity_floor,
                    floor_max_share: cfg.generator_floor_max_share,
                    draws: cfg.generator_draws,
                };
                // Every scale was checked with the config; what remains is whether the encoder
                // is the generator's own (its resolution), whichever guidance is on.
                let generator = generator
                    .with_encoder_guidance(emoji.clone(), scales)
                    .map_err(|e| invalid("models.generator_dir", e.to_string()))?;
                let generator = match &cfg.generator_guard_dir {
                    Some(dir) => EmojiEncoder::load(dir, None)
                        .and_then(|g| generator.with_fidelity_guard(Arc::new(g)))
                        .map_err(|e| invalid("models.generator_guard_dir", e.to_string()))?,
                    None => generator,
                };
                let generator = generator
                    .with_agreement_ramp(cfg.agreement_ramp()?)
                    .map_err(|e| invalid("models.generator_agreement_low", e.to_string()))?
                    .with_style_snap(cfg.generator_snap)
                    .map_err(|e| invalid("models.generator_snap", e.to_string()))?
                    .with_own_style_gate(cfg.generator_keep_own_style)
                    .map_err(|e| invalid("models.generator_keep_own_style", e.to_string()))?;
                Arc::new(generator)
            }
            "sd" => {
                if encoder.is_none() {
                    return Err(invalid(
                        "models.generator",
                        "the sd generator's candidates are embedded by the item encoder for the \
                         ranker: it needs models.encoder = \"emoji\""
                            .into(),
                    ));
                }
                let options = SdOptions {
                    steps: cfg.sd_steps,
                    strength: cfg.sd_strength,
                    guidance: cfg.sd_guidance,
                };
                Arc::new(
                    SdGenerator::load(&cfg.sd_dir, options)
                        .map_err(|e| invalid("models.sd_dir", e.to_string()))?,
                )
            }
            other => {
                return Err(unknown(
                    "models.generator",
                    other,
                    "passthrough, diffusion, sd",
                ))
            }
        };
        let ranker: Arc<dyn Ranker> = match cfg.ranker.as_str() {
            "cosine" => Arc::new(CosineRanker {
                personalization_weight: cfg.personalization_weight,
                encoder: encoder.clone(),
            }),
            "learned" => {
                let Some(encoder) = encoder.clone() else {
                    return Err(invalid(
                        "models.ranker",
                        "the learned ranker needs models.encoder = \"emoji\"".into(),
                    ));
                };
                Arc::new(
                    LearnedRanker::load(&cfg.ranker_dir, encoder)
                        .map_err(|e| invalid("models.ranker_dir", e.to_string()))?,
                )
            }
            other => return Err(unknown("models.ranker", other, "cosine, learned")),
        };
        Ok(Models {
            encoder,
            generator,
            ranker,
        })
    }
}

/// What a running worker tells its caller once it is up.
#[derive(Debug, Clone)]
pub struct Started {
    /// The bound address of `/metrics`, `/healthz`, `/readyz`.
    pub telemetry: SocketAddr,
}

/// Runs the worker until `shutdown` resolves, then drains and commits. `started` (optional)
/// receives the telemetry address once the worker is consuming.
pub async fn run(
    cfg: Config,
    models: Models,
    shutdown: impl Future<Output = ()> + Send + 'static,
    started: Option<oneshot::Sender<Started>>,
) -> Result<(), WorkerError> {
    cfg.validate()?;
    telemetry::metrics_handle();
    let health = Arc::new(Health::default());

    let lance = LanceStore::open_with(
        &cfg.lance.uri,
        cfg.models.dim,
        Some(cfg.lance.read_consistency),
    )
    .await?;
    let hot = Hot::new(&cfg.redis)?;
    let history = Arc::new(History::new(
        hot,
        lance,
        cfg.redis.retry_interval,
        cfg.preference.deep_search,
    ));
    let stop = CancellationToken::new();
    let abort = CancellationToken::new();
    let publisher = Publisher::new(&cfg.kafka, cfg.limits.max_payload_bytes, abort.clone())?;
    let acks = Arc::new(Acks::new());
    let ingest = Ingest::new(
        &cfg.kafka,
        acks.clone(),
        cfg.kafka.exactly_once.then(|| publisher.clone()),
    )?;
    let dlq_tasks = DlqTasks::default();
    let (telemetry_addr, server) = telemetry::serve(
        cfg.telemetry.listen,
        health.clone(),
        stop.clone().cancelled_owned(),
    )
    .await
    .map_err(|source| WorkerError::Listen {
        addr: cfg.telemetry.listen,
        source,
    })?;
    let server = tokio::spawn(server);

    let params = Params::from_config(&cfg.preference);
    let (msg_tx, msg_rx) = mpsc::channel(cfg.kafka.max_in_flight + 1);
    let (job_tx, job_rx) = mpsc::channel(cfg.generate.queue);
    let history_stage = HistoryStage {
        history: history.clone(),
        publisher: publisher.clone(),
        acks: acks.clone(),
        encoder: models.encoder.clone(),
        texts: models.generator.wants_texts(),
        limits: cfg.decode_limits(),
        params: params.clone(),
        default_candidates: cfg.generate.candidates,
        seed: cfg.generate.seed,
        batch_max: cfg.lance.batch_max_rows,
        linger: cfg.lance.batch_linger,
        jobs: job_tx,
        abort: abort.clone(),
        dlq_tasks: dlq_tasks.clone(),
    };
    let generate_stage = GenerateStage {
        generator: models.generator.clone(),
        ranker: models.ranker.clone(),
        encoder_version: models
            .encoder
            .as_ref()
            .map_or_else(|| "none".to_string(), |e| e.version().to_string()),
        history: history.clone(),
        publisher: publisher.clone(),
        acks: acks.clone(),
        params,
        batch_max: cfg.generate.batch_max,
        batch_delay: cfg.generate.batch_delay,
        cancel: abort.clone(),
        candidate_images: cfg.generate.publish_candidate_images,
    };
    let mut stages = tokio::spawn(async move {
        let gen = tokio::spawn(generate_stage.run(job_rx));
        history_stage.run(msg_rx).await;
        let _ = gen.await;
    });
    let maintenance = tokio::spawn(maintain(
        history.clone(),
        cfg.lance.compact_interval,
        cfg.lance.index_interval,
        maintenance_holder(),
        stop.clone(),
    ));

    {
        let stop = stop.clone();
        tokio::spawn(async move {
            shutdown.await;
            stop.cancel();
        });
    }
    health.set_ready(true);
    tracing::info!(
        brokers = %cfg.kafka.brokers,
        topics = ?cfg.kafka.input_topics,
        telemetry = %telemetry_addr,
        generator = models.generator.version(),
        ranker = models.ranker.version(),
        "worker started"
    );
    if let Some(tx) = started {
        let _ = tx.send(Started {
            telemetry: telemetry_addr,
        });
    }

    let consumed = ingest.run(msg_tx, stop.clone(), health.clone()).await;
    health.set_ready(false);
    stop.cancel();
    if let Err(e) = consumed {
        // The transaction is unusable: acknowledge nothing more, abort it, and leave the rest to
        // the next instance, which replays from the last committed offsets.
        tracing::error!(error = %e, "stopping: a transaction could not be committed");
        abort.cancel();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), &mut stages).await;
        crate::ingest::blocking(|| publisher.abort_transaction());
        let _ = maintenance.await;
        let _ = server.await;
        return Err(e.into());
    }
    tracing::info!(in_flight = ingest.in_flight(), grace = ?cfg.shutdown.grace, "draining");
    let drained = async {
        let _ = (&mut stages).await;
        dlq_tasks.wait().await;
    };
    if tokio::time::timeout(cfg.shutdown.grace, drained)
        .await
        .is_err()
    {
        tracing::warn!(
            in_flight = ingest.in_flight(),
            "shutdown grace expired; unfinished work will be replayed"
        );
        // Everything that waits (store retries, sends, the model) watches this token.
        abort.cancel();
        if tokio::time::timeout(std::time::Duration::from_secs(5), async {
            let _ = (&mut stages).await;
            dlq_tasks.wait().await;
        })
        .await
        .is_err()
        {
            stages.abort();
        }
    }
    ingest.commit_final();
    let _ = maintenance.await;
    let _ = server.await;
    tracing::info!("worker stopped");
    Ok(())
}

/// The Redis lease under which one worker at a time runs LanceDB upkeep on the shared tables.
pub const MAINTENANCE_LEASE: &str = "lance-maintenance";
/// How long the lease outlives a holder that stops renewing it (one that died mid-pass).
const MAINTENANCE_LEASE_TTL: std::time::Duration = std::time::Duration::from_secs(30);

/// This process's name as a lease holder: host, process id and a random tag.
fn maintenance_holder() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_default();
    format!(
        "{host}:{}:{:08x}",
        std::process::id(),
        rand::random::<u32>()
    )
}

/// Background LanceDB upkeep: the rows written since into the indices every `index_every`,
/// compaction (merging the index segments) every `compact_every`, each first after one to two
/// periods; a zero period turns that part off. Every worker ticks, and a pass runs only on the
/// worker that holds the Redis lease [`MAINTENANCE_LEASE`] at that moment (see
/// [`History::leased`]): concurrent index and compaction commits on one table conflict, and
/// their work would be done twice.
async fn maintain(
    history: Arc<History>,
    compact_every: std::time::Duration,
    index_every: std::time::Duration,
    holder: String,
    stop: CancellationToken,
) {
    // A random phase keeps workers started together from asking for the lease at the same
    // moments, so the passes spread over them.
    let ticker = |every: std::time::Duration| {
        (!every.is_zero()).then(|| {
            let first = every + every.mul_f64(rand::random::<f64>());
            let mut t = tokio::time::interval_at(tokio::time::Instant::now() + first, every);
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            t
        })
    };
    async fn tick(t: &mut Option<tokio::time::Interval>) {
        match t {
            Some(t) => {
                t.tick().await;
            }
            None => std::future::pending().await,
        }
    }
    let (mut compact, mut index) = (ticker(compact_every), ticker(index_every));
    loop {
        // A pass still running at shutdown is dropped rather than awaited (a compaction of a
        // minute's rows takes seconds), and the lease given up: each of its Lance commits is
        // atomic, so the tables stay consistent, the next pass finishes the work, and files
        // written for a commit that never came are pruned once they are old enough.
        let (what, result) = tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick(&mut compact) => (
                "LanceDB maintenance failed",
                history.leased(MAINTENANCE_LEASE, &holder, MAINTENANCE_LEASE_TTL, &stop, history.maintain()).await,
            ),
            _ = tick(&mut index) => (
                "indexing new LanceDB rows failed",
                history.leased(MAINTENANCE_LEASE, &holder, MAINTENANCE_LEASE_TTL, &stop, history.index_new_rows()).await,
            ),
        };
        // Another worker holds the lease (it runs this pass), or the worker is stopping.
        let Some(result) = result else { continue };
        if let Err(e) = result {
            tracing::warn!(error = %e, "{what}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_of(cfg: &ModelsConfig) -> String {
        match Models::from_config(cfg) {
            Err(ConfigError::Invalid { key, .. }) => key,
            Err(other) => panic!("unexpected error {other}"),
            Ok(_) => panic!("the configuration was accepted"),
        }
    }

    #[test]
    fn model_errors_name_their_key() {
        let missing = std::path::PathBuf::from("/nonexistent/ragar-models");
        let base = ModelsConfig {
            minilm_dir: missing.clone(),
            encoder_dir: missing.clone(),
            ranker_dir: missing,
            ..ModelsConfig::default()
        };
        let with = |f: &dyn Fn(&mut ModelsConfig)| {
            let mut c = base.clone();
            f(&mut c);
            c
        };
        assert_eq!(
            key_of(&with(&|c| c.encoder = "minilm".into())),
            "models.minilm_dir"
        );
        assert_eq!(
            key_of(&with(&|c| c.encoder = "emoji".into())),
            "models.minilm_dir"
        );
        assert_eq!(
            key_of(&with(&|c| c.encoder = "clip".into())),
            "models.encoder"
        );
        assert_eq!(
            key_of(&with(&|c| c.ranker = "learned".into())),
            "models.ranker"
        );
        assert_eq!(
            key_of(&with(&|c| c.generator = "sd".into())),
            "models.generator"
        );
        assert_eq!(
            key_of(&with(&|c| c.generator = "diffusion".into())),
            "models.generator"
        );
        assert!(
            Models::from_config(&base).is_ok(),
            "the baselines need no files"
        );
    }

    /// The committed bundles load and agree with the configured dimension.
    #[test]
    fn committed_bundles_load_with_minilm() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let minilm_dir = root.join("data").join(crate::model::minilm::MINILM_DIR);
        if !minilm_dir.join("model.safetensors").is_file() {
            eprintln!("skipped: no MiniLM weights (cargo run -- data fetch --only minilm)");
            return;
        }
        let cfg = ModelsConfig {
            dim: 416,
            encoder: "emoji".into(),
            ranker: "learned".into(),
            minilm_dir,
            encoder_dir: root.join("models/emoji-encoder"),
            ranker_dir: root.join("models/ranker"),
            generator: "diffusion".into(),
            generator_dir: root.join("models/generator"),
            ..ModelsConfig::default()
        };
        let models = Models::from_config(&cfg).unwrap();
        assert!(models.generator.version().starts_with("generator:"));
        assert_eq!(
            key_of(&ModelsConfig {
                generator_dir: root.join("models/ranker"),
                ..cfg.clone()
            }),
            "models.generator_dir"
        );
        // A fidelity guard (an encoder bundle at the generator's resolution) loads and is named
        // in the version; a missing one names its key.
        let guard = tempfile::tempdir().unwrap();
        let guard_dir = guard.path().join("guard");
        crate::data::simulate::testdata::tiny_encoder_for(
            &guard_dir,
            vec!["google".into(), "twitter".into(), "openmoji".into()],
            32,
        );
        let floored = ModelsConfig {
            generator_fidelity_floor: 0.7,
            generator_identity_guidance: 20.0,
            generator_guard_dir: Some(guard_dir),
            generator_agreement_low: Some(0.7),
            generator_agreement_high: Some(0.85),
            ..cfg.clone()
        };
        let guarded = Models::from_config(&floored).unwrap();
        assert!(
            guarded
                .generator
                .version()
                .ends_with("+floor0.7:1~guard+agree0.7:0.85"),
            "{}",
            guarded.generator.version()
        );
        assert_eq!(
            key_of(&ModelsConfig {
                generator_guard_dir: Some(root.join("models/none")),
                ..floored
            }),
            "models.generator_guard_dir"
        );
        // The style snap and the own-style gate read the bundle's codebook; a bundle without
        // one names the key.
        let snapped = Models::from_config(&ModelsConfig {
            generator_snap: Some(0.0),
            generator_keep_own_style: true,
            ..cfg.clone()
        })
        .unwrap();
        assert!(
            snapped.generator.version().ends_with("+snap0+keep"),
            "{}",
            snapped.generator.version()
        );
        let bare = tempfile::tempdir().unwrap();
        let mut config: crate::model::diffusion::GeneratorConfig = serde_json::from_slice(
            &std::fs::read(root.join("models/generator/config.json")).unwrap(),
        )
        .unwrap();
        config.style_codebook.clear();
        std::fs::write(
            bare.path().join("config.json"),
            serde_json::to_vec(&config).unwrap(),
        )
        .unwrap();
        std::fs::copy(
            root.join("models/generator/model.safetensors"),
            bare.path().join("model.safetensors"),
        )
        .unwrap();
        let without = ModelsConfig {
            generator_dir: bare.path().into(),
            ..cfg.clone()
        };
        Models::from_config(&without).unwrap();
        for (on, key) in [
            (
                ModelsConfig {
                    generator_snap: Some(0.1),
                    ..without.clone()
                },
                "models.generator_snap",
            ),
            (
                ModelsConfig {
                    generator_keep_own_style: true,
                    ..without.clone()
                },
                "models.generator_keep_own_style",
            ),
        ] {
            assert_eq!(key_of(&on), key);
        }
        // Stable Diffusion from a directory in the diffusers layout.
        let sd = tempfile::tempdir().unwrap();
        let sd_cfg = ModelsConfig {
            generator: "sd".into(),
            sd_dir: sd.path().into(),
            sd_steps: 1,
            ..cfg.clone()
        };
        assert_eq!(key_of(&sd_cfg), "models.sd_dir");
        crate::model::sd::write_tiny(sd.path(), 1).unwrap();
        let with_sd = Models::from_config(&sd_cfg).unwrap();
        assert!(with_sd.generator.version().starts_with("sd:"));
        let enc = models.encoder.unwrap();
        assert_eq!(enc.dim(), 416);
        let e = enc
            .encode(None, Some("animals & nature, animal-mammal: dog face"))
            .unwrap();
        assert!((e.iter().map(|x| x * x).sum::<f32>() - 1.0).abs() < 1e-4);
        assert_eq!(key_of(&ModelsConfig { dim: 384, ..cfg }), "models.dim");
    }
}
