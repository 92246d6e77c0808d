//! Telemetry: Prometheus metrics, `/metrics`, `/healthz`, `/readyz`, and structured logs.
//!
//! Metric names follow Prometheus conventions (`_seconds`, `_total`); histograms have explicit
//! buckets; labels never carry user or item ids. [`names`] lists every metric the worker exports,
//! so dashboards and alert rules have one place to check against.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::config::{LogFormat, TelemetryConfig};

/// Every metric the worker exports.
pub mod names {
    /// Events by `type` (item, interaction, display, unknown) and `outcome` (ok, dlq, duplicate).
    pub const EVENTS: &str = "ragar_events_total";
    /// Messages sent to the dead-letter topic, by `kind`.
    pub const DLQ: &str = "ragar_dlq_messages_total";
    /// Time per `stage`: decode, history_cache (Redis windows), history_write (LanceDB), history_read,
    /// preference, generate, rank, publish, compact, index (new rows into the indices).
    pub const STAGE_SECONDS: &str = "ragar_stage_seconds";
    /// From receiving a display event to its output being delivered.
    pub const END_TO_END_SECONDS: &str = "ragar_end_to_end_seconds";
    /// Display requests per generation batch.
    pub const GENERATION_BATCH: &str = "ragar_generation_batch_size";
    /// Consumed messages whose effects are not durable yet.
    pub const IN_FLIGHT: &str = "ragar_in_flight_messages";
    /// 1 while the consumer's partitions are paused for backpressure.
    pub const PAUSED: &str = "ragar_consumer_paused";
    /// Seconds the consumer held off reading or had its partitions paused at
    /// `kafka.max_in_flight` (its rate is the fraction of time throttled).
    pub const THROTTLED_SECONDS: &str = "ragar_consumer_throttled_seconds_total";
    /// Consumer lag per `topic` and `partition`, from librdkafka statistics.
    pub const CONSUMER_LAG: &str = "ragar_consumer_lag_messages";
    /// Offsets committed (timer, revoke, shutdown) by `reason`.
    pub const COMMITS: &str = "ragar_offset_commits_total";
    /// 1 while Redis is reachable.
    pub const REDIS_UP: &str = "ragar_redis_up";
    /// Operations served without Redis, by `op`.
    pub const REDIS_FALLBACKS: &str = "ragar_redis_fallbacks_total";
    /// Interaction rows written to LanceDB (duplicates skipped are not counted).
    pub const LANCE_ROWS: &str = "ragar_lance_rows_written_total";
    /// Failed LanceDB writes (they are retried; nothing is acknowledged until they succeed).
    pub const LANCE_WRITE_ERRORS: &str = "ragar_lance_write_errors_total";
    /// Data fragments of the interactions table.
    pub const LANCE_FRAGMENTS: &str = "ragar_lance_fragments";
    /// Interaction rows no `event_id` index segment covers, as left by the last maintenance pass
    /// (indexing or compaction): near 0 while indexing keeps up, growing when it fails.
    pub const LANCE_UNINDEXED_ROWS: &str = "ragar_lance_unindexed_rows";
    /// Outputs published, and replays skipped because the output was already published.
    pub const OUTPUTS: &str = "ragar_outputs_total";
}

/// Latency buckets in seconds: 100 µs .. 60 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0,
];
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 32.0];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide Prometheus recorder (once; later calls return the same handle).
pub fn metrics_handle() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(names::GENERATION_BATCH.into()),
                        BATCH_BUCKETS,
                    )
                })
                .expect("bucket lists are non-empty")
                .install_recorder()
                .expect("no other metrics recorder is installed");
            describe();
            let upkeep = handle.clone();
            std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || loop {
                    std::thread::sleep(Duration::from_secs(5));
                    upkeep.run_upkeep();
                })
                .expect("spawn upkeep thread");
            handle
        })
        .clone()
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(names::EVENTS, "Events consumed, by type and outcome");
    describe_counter!(
        names::DLQ,
        "Messages sent to the dead-letter topic, by error kind"
    );
    describe_histogram!(
        names::STAGE_SECONDS,
        Unit::Seconds,
        "Time spent per pipeline stage"
    );
    describe_histogram!(
        names::END_TO_END_SECONDS,
        Unit::Seconds,
        "Display event received to output delivered"
    );
    describe_histogram!(
        names::GENERATION_BATCH,
        "Display requests per generation batch"
    );
    describe_gauge!(names::IN_FLIGHT, "Consumed messages not yet completed");
    describe_gauge!(
        names::PAUSED,
        "1 while partitions are paused for backpressure"
    );
    describe_counter!(
        names::THROTTLED_SECONDS,
        Unit::Seconds,
        "Time the consumer held off reading or was paused at kafka.max_in_flight"
    );
    describe_gauge!(
        names::CONSUMER_LAG,
        "Consumer lag in messages per partition"
    );
    describe_counter!(names::COMMITS, "Offset commits by reason");
    describe_gauge!(names::REDIS_UP, "1 while Redis is reachable");
    describe_counter!(names::REDIS_FALLBACKS, "Operations served without Redis");
    describe_counter!(names::LANCE_ROWS, "Interaction rows written to LanceDB");
    describe_counter!(names::LANCE_WRITE_ERRORS, "Failed LanceDB writes (retried)");
    describe_gauge!(
        names::LANCE_FRAGMENTS,
        "Data fragments of the interactions table"
    );
    describe_gauge!(
        names::LANCE_UNINDEXED_ROWS,
        "Interaction rows not covered by the event_id index after the last maintenance pass"
    );
    describe_counter!(
        names::OUTPUTS,
        "Outputs by outcome (published, skipped_replay)"
    );
}

/// Liveness and readiness, shared by the worker's tasks and the HTTP endpoints.
#[derive(Default)]
pub struct Health {
    ready: AtomicBool,
    /// Unix milliseconds of the consumer loop's last turn.
    heartbeat_ms: AtomicU64,
}

impl Health {
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    pub fn beat(&self) {
        self.heartbeat_ms.store(now_ms() as u64, Ordering::Relaxed);
    }

    /// Alive when the consumer loop turned within `stale`.
    pub fn is_alive(&self, stale: Duration) -> bool {
        let last = self.heartbeat_ms.load(Ordering::Relaxed);
        last == 0 || (now_ms() as u64).saturating_sub(last) <= stale.as_millis() as u64
    }
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[derive(Clone)]
struct AppState {
    handle: PrometheusHandle,
    health: Arc<Health>,
}

/// The HTTP router: `/metrics`, `/healthz` (the consumer loop is turning), `/readyz` (stores open,
/// consumer subscribed).
pub fn router(health: Arc<Health>) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(|State(s): State<AppState>| async move { s.handle.render() }),
        )
        .route(
            "/healthz",
            get(|State(s): State<AppState>| async move {
                if s.health.is_alive(Duration::from_secs(30)) {
                    (StatusCode::OK, "ok")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "consumer loop stalled")
                }
            }),
        )
        .route(
            "/readyz",
            get(|State(s): State<AppState>| async move {
                if s.health.is_ready() {
                    (StatusCode::OK, "ready")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "not ready")
                }
            }),
        )
        .with_state(AppState {
            handle: metrics_handle(),
            health,
        })
}

/// Binds the telemetry listener; the returned future serves until `shutdown` resolves.
pub async fn serve(
    listen: SocketAddr,
    health: Arc<Health>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<(
    SocketAddr,
    impl std::future::Future<Output = std::io::Result<()>>,
)> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let server = axum::serve(listener, router(health)).with_graceful_shutdown(shutdown);
    Ok((addr, async move { server.await }))
}

/// Structured logs to stderr; `RUST_LOG` overrides the configured filter. Safe to call twice.
pub fn init_logging(cfg: &TelemetryConfig) {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&cfg.log_filter));
    use std::io::IsTerminal;
    // Colours only for a terminal: a log file or collector gets plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = match cfg.log_format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}
