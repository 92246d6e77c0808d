//! `ragar demo`: the whole pipeline on one machine, end to end, in a few minutes.
//!
//! Simulated EmojiStyle users ([`crate::data::simulate`]) stream their interactions and display
//! requests through the real worker: the in-process Kafka ([`crate::broker`]), LanceDB in a local
//! directory, the running Redis (or one started here), and the configured models. The catalog
//! items go first and the demo waits until they are stored (items and events travel on different
//! topics, so nothing else orders them); then the events. A live line shows events consumed,
//! images published and their latency. At the end an HTML gallery shows, per user, each display's
//! reference, the history items that shaped the preference with their retrieval weights, every
//! candidate with its ranker scores, the published image and the ground truth.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use base64::Engine;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::Message;

use crate::config::{Config, ModelsConfig};
use crate::data::simulate::{simulate, SimConfig, SimDisplay, Simulation, UserKind};
use crate::data::{Manifest, Split};
use crate::eval::html_escape;

#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub data_dir: PathBuf,
    /// Where the stream files, LanceDB and the gallery go (replaced on every run).
    pub out: PathBuf,
    pub users: usize,
    pub history: usize,
    /// Display requests per user.
    pub displays: usize,
    pub seed: u64,
    pub redis_url: String,
    pub models: ModelsConfig,
    pub candidates: u32,
    pub partitions: i32,
    /// Users shown in the gallery (the first ones).
    pub gallery_users: usize,
    pub progress: bool,
    /// How long to wait for the last image.
    pub timeout: Duration,
}

/// What a demo run did.
#[derive(Debug, Clone)]
pub struct DemoReport {
    pub gallery: PathBuf,
    pub items: usize,
    pub events: usize,
    pub displays: usize,
    pub outputs: usize,
    pub seconds: f64,
    /// End-to-end latency of the published images (ms): median and 99th percentile.
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
    pub generator: String,
}

/// The Redis the demo uses: the one at `url` when it answers; else, for a local URL with
/// `redis-server` installed, one started here (stopped when this is dropped).
pub struct DemoRedis {
    child: Option<Child>,
}

impl Drop for DemoRedis {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

async fn redis_answers(url: &str) -> bool {
    let Ok(client) = redis::Client::open(url) else {
        return false;
    };
    let ping = async {
        let mut conn = client.get_multiplexed_async_connection().await.ok()?;
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .ok()
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), ping).await,
        Ok(Some(_))
    )
}

/// Makes sure a Redis answers at `url`, starting `redis-server` for a local URL if need be.
pub async fn ensure_redis(url: &str) -> anyhow::Result<DemoRedis> {
    if redis_answers(url).await {
        return Ok(DemoRedis { child: None });
    }
    let info = redis::Client::open(url)
        .with_context(|| format!("redis url `{url}`"))?
        .get_connection_info()
        .clone();
    let (host, port) = match info.addr() {
        redis::ConnectionAddr::Tcp(h, p) => (h.clone(), *p),
        _ => bail!("no Redis answers at {url}"),
    };
    let local = host == "127.0.0.1" || host == "localhost";
    let installed = Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !local || !installed {
        bail!(
            "no Redis answers at {url}; install one (`apt-get install redis-server`) or point --redis-url at a running Redis"
        );
    }
    tracing::info!(port, "starting redis-server for the demo");
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .spawn()
        .context("starting redis-server")?;
    let redis = DemoRedis { child: Some(child) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !redis_answers(url).await {
        if Instant::now() > deadline {
            bail!("redis-server did not answer at {url} within 10 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(redis)
}

/// One published image as the gallery needs it.
struct Output {
    value: serde_json::Value,
    latency_ms: f64,
}

/// Runs the demo with `models` (built from `opts.models`, or given by a test); returns what it
/// did. The worker runs on this runtime.
pub async fn run(opts: &DemoOptions, models: crate::worker::Models) -> anyhow::Result<DemoReport> {
    let started = Instant::now();
    let manifest = Manifest::load(&opts.data_dir).with_context(|| {
        "the EmojiStyle data set is missing: run `ragar data fetch && ragar data build --resolution 32`"
    })?;
    let sim = simulate(
        &manifest,
        &SimConfig {
            users: opts.users,
            history: opts.history,
            displays: opts.displays,
            seed: opts.seed,
            display_split: Split::Test,
            ..SimConfig::default()
        },
    )?;
    let res = if manifest.resolutions.contains(&32) {
        32
    } else {
        crate::data::BASE_RESOLUTION
    };
    if opts.out.exists() {
        std::fs::remove_dir_all(&opts.out)
            .with_context(|| format!("clearing {}", opts.out.display()))?;
    }
    let stream_dir = opts.out.join("stream");
    sim.write(&manifest, &opts.data_dir, res, &stream_dir)?;
    let items = crate::produce::read_lines(&stream_dir.join("items.jsonl"))?;
    let events = crate::produce::read_lines(&stream_dir.join("events.jsonl"))?;

    let _redis = ensure_redis(&opts.redis_url).await?;
    let topics = crate::broker::default_topics(opts.partitions);
    let broker =
        crate::broker::MockBroker::start(&topics).context("starting the in-process Kafka")?;

    let mut cfg = Config::default();
    cfg.kafka.brokers = broker.bootstrap_servers().to_string();
    cfg.kafka.group_id = "ragar-demo".into();
    cfg.kafka.session_timeout = Duration::from_secs(6);
    cfg.redis.url = opts.redis_url.clone();
    // A fresh namespace per run: the demo's event ids repeat from run to run.
    cfg.redis.key_prefix = format!("ragar-demo-{}", crate::telemetry::now_ms());
    cfg.redis.window_ttl = Duration::from_secs(3600);
    cfg.redis.output_ttl = Duration::from_secs(3600);
    cfg.redis.item_ttl = Duration::from_secs(3600);
    cfg.lance.uri = opts.out.join("lancedb").display().to_string();
    cfg.telemetry.listen = "127.0.0.1:0".parse().expect("valid address");
    cfg.models = opts.models.clone();
    if cfg.models.encoder == "emoji" {
        // Retrieve history by what items depict (the encoder's content block): chosen on val by
        // `ragar eval`.
        cfg.preference.match_dims = crate::model::emoji::CONTENT_DIM;
    }
    cfg.generate.candidates = opts.candidates;
    cfg.generate.publish_candidate_images = true;
    cfg.validate()?;
    let generator = models.generator.version().to_string();

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let worker_cfg = cfg.clone();
    let worker = tokio::spawn(async move {
        crate::worker::run(
            worker_cfg,
            models,
            async move {
                let _ = stop_rx.await;
            },
            Some(started_tx),
        )
        .await
    });
    if started_rx.await.is_err() {
        return match worker.await {
            Ok(Err(e)) => Err(e.into()),
            _ => Err(anyhow::anyhow!("the worker stopped before it started")),
        };
    }

    let reader: StreamConsumer = crate::ingest::base_client_config(&cfg.kafka)
        .set(
            "group.id",
            format!("ragar-demo-reader-{}", crate::telemetry::now_ms()),
        )
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("session.timeout.ms", "6000")
        .create()
        .context("creating the output reader")?;
    reader.subscribe(&[cfg.kafka.output_topic.as_str()])?;

    let producer = crate::produce::producer(&cfg.kafka)?;
    let bar = if opts.progress {
        indicatif::ProgressBar::new(sim.displays.len() as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("{spinner} images [{bar:30}] {pos}/{len} {msg}")
    {
        bar.set_style(style);
    }
    bar.set_message("sending the catalog");
    crate::produce::send_lines(&producer, &cfg.kafka.input_topics[0], &items, |_| {}).await?;
    wait_for_items(&cfg, &items, &bar).await?;
    bar.set_message("streaming events");
    let events_topic = cfg
        .kafka
        .input_topics
        .get(1)
        .unwrap_or(&cfg.kafka.input_topics[0])
        .clone();
    let send = {
        let producer = producer.clone();
        let events = events.clone();
        tokio::spawn(async move {
            crate::produce::send_lines(&producer, &events_topic, &events, |_| {}).await
        })
    };

    let mut outputs: HashMap<String, Output> = HashMap::new();
    let deadline = tokio::time::Instant::now() + opts.timeout;
    while outputs.len() < sim.displays.len() {
        let msg = match tokio::time::timeout_at(deadline, reader.recv()).await {
            Err(_) => bail!(
                "only {} of {} images arrived within {:?}",
                outputs.len(),
                sim.displays.len(),
                opts.timeout
            ),
            Ok(m) => m.context("reading the output topic")?,
        };
        let Some(payload) = msg.payload() else {
            continue;
        };
        let value: serde_json::Value = serde_json::from_slice(payload)?;
        let request = value["request_id"].as_str().unwrap_or_default().to_string();
        let latency_ms = value["latency_ms"]["total"].as_f64().unwrap_or(0.0);
        outputs.insert(request, Output { value, latency_ms });
        bar.set_position(outputs.len() as u64);
        bar.set_message(format!(
            "{} events consumed, last latency {latency_ms:.0} ms",
            consumed_events()
        ));
    }
    send.await??;
    bar.finish_and_clear();
    let _ = stop_tx.send(());
    worker.await??;
    // Clients first: a client whose broker is gone logs connection errors until it is dropped.
    drop(reader);
    drop(producer);
    drop(broker);

    let mut latencies: Vec<f64> = outputs.values().map(|o| o.latency_ms).collect();
    latencies.sort_by(f64::total_cmp);
    let quantile = |q: f64| -> f64 {
        if latencies.is_empty() {
            return 0.0;
        }
        latencies[((latencies.len() - 1) as f64 * q).round() as usize]
    };
    let gallery = write_gallery(opts, &manifest, res, &sim, &outputs, &generator)?;
    Ok(DemoReport {
        gallery,
        items: items.len(),
        events: events.len(),
        displays: sim.displays.len(),
        outputs: outputs.len(),
        seconds: started.elapsed().as_secs_f64(),
        latency_p50_ms: quantile(0.5),
        latency_p99_ms: quantile(0.99),
        generator,
    })
}

/// Events the worker has consumed so far (every type and outcome), from its metrics.
fn consumed_events() -> u64 {
    let page = crate::telemetry::metrics_handle().render();
    page.lines()
        .filter(|l| l.starts_with(crate::telemetry::names::EVENTS))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Waits until every catalog item is in LanceDB.
async fn wait_for_items(
    cfg: &Config,
    items: &[(String, String)],
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<()> {
    let store = crate::history::lance::LanceStore::open(&cfg.lance.uri, cfg.models.dim).await?;
    let deadline = Instant::now() + Duration::from_secs(300);
    for (i, (id, _)) in items.iter().enumerate() {
        // LanceDB offers no change notification: poll until the item is there.
        while store.item(id).await?.is_none() {
            if Instant::now() > deadline {
                bail!("item {id} was not stored within 300 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if i % 100 == 0 {
            bar.set_message(format!("catalog stored: {}/{}", i + 1, items.len()));
        }
    }
    Ok(())
}

/// Writes a PNG to `dir/name` and returns its path relative to the gallery.
fn put_png(dir: &Path, name: &str, png: &[u8]) -> anyhow::Result<String> {
    let safe: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    std::fs::write(dir.join(format!("{safe}.png")), png)?;
    Ok(format!("img/{safe}.png"))
}

/// `OUT/gallery/index.html` with its images under `OUT/gallery/img/`.
fn write_gallery(
    opts: &DemoOptions,
    manifest: &Manifest,
    res: u32,
    sim: &Simulation,
    outputs: &HashMap<String, Output>,
    generator: &str,
) -> anyhow::Result<PathBuf> {
    let dir = opts.out.join("gallery");
    let img_dir = dir.join("img");
    std::fs::create_dir_all(&img_dir)?;
    // Item drawings (`vendor.emoji`) come from the data set, each written once. The ground truth
    // is among them though often not in the catalog (nobody interacted with that drawing).
    let mut written: HashMap<String, Option<String>> = HashMap::new();
    let mut item_src = |id: &str| -> anyhow::Result<Option<String>> {
        if let Some(src) = written.get(id) {
            return Ok(src.clone());
        }
        let png = id.split_once('.').and_then(|(vendor, emoji)| {
            std::fs::read(manifest.image_path(&opts.data_dir, vendor, res, emoji)).ok()
        });
        let src = match png {
            Some(png) => Some(put_png(&img_dir, &format!("item-{id}"), &png)?),
            None => None,
        };
        written.insert(id.to_string(), src.clone());
        Ok(src)
    };
    let decode = |b64: &str| base64::engine::general_purpose::STANDARD.decode(b64);
    let figure = |src: &str, caption: &str, class: &str| {
        format!(
            "<figure class=\"{class}\"><img src=\"{}\" alt=\"{}\"><figcaption>{}</figcaption></figure>",
            html_escape(src),
            html_escape(caption),
            caption
        )
    };

    let mut by_user: Vec<(&str, Vec<&SimDisplay>)> = Vec::new();
    for d in &sim.displays {
        match by_user.iter_mut().find(|(u, _)| *u == d.user_id.as_str()) {
            Some((_, v)) => v.push(d),
            None => by_user.push((d.user_id.as_str(), vec![d])),
        }
    }
    let mut body = String::new();
    for (user_id, displays) in by_user.iter().take(opts.gallery_users) {
        let user = sim.users.iter().find(|u| u.user_id == *user_id);
        let kind = match user.map(|u| u.kind) {
            Some(UserKind::Global) => "one vendor everywhere",
            _ => "vendor depends on the category",
        };
        let _ = writeln!(
            body,
            "<section><h2>{} <small>({kind})</small></h2>",
            html_escape(user_id)
        );
        for d in displays {
            let Some(out) = outputs.get(&d.request_id) else {
                continue;
            };
            let v = &out.value;
            let _ = writeln!(
                body,
                "<div class=\"display\"><h3>{} · prefers {} here</h3><div class=\"row\">",
                html_escape(&d.category),
                html_escape(&d.preferred_vendor)
            );
            if let Some(src) = item_src(&d.item_id)? {
                body.push_str(&figure(
                    &src,
                    &format!("reference<br>{}", html_escape(&d.item_id)),
                    "ref",
                ));
            }
            body.push_str("<div class=\"history\"><h4>history used (retrieval weight)</h4>");
            let mut used: Vec<&serde_json::Value> = v["history"]
                .as_array()
                .map(|h| h.iter().collect())
                .unwrap_or_default();
            used.sort_by(|a, b| {
                b["weight"]
                    .as_f64()
                    .unwrap_or(0.0)
                    .total_cmp(&a["weight"].as_f64().unwrap_or(0.0))
            });
            for h in used.iter().take(8) {
                let id = h["item_id"].as_str().unwrap_or_default();
                if let Some(src) = item_src(id)? {
                    let w = h["weight"].as_f64().unwrap_or(0.0);
                    body.push_str(&figure(&src, &format!("{w:.2}"), "hist"));
                }
            }
            body.push_str(
                "</div><div class=\"candidates\"><h4>candidates (personalization / fidelity)</h4>",
            );
            let chosen = v["chosen"].as_u64().unwrap_or(0) as usize;
            let mut published = None;
            for c in v["candidates"].as_array().into_iter().flatten() {
                let index = c["index"].as_u64().unwrap_or(0) as usize;
                let b64 = if index == chosen {
                    v["image"]["base64"].as_str()
                } else {
                    c["image"]["base64"].as_str()
                };
                let Some(b64) = b64 else { continue };
                let src = put_png(
                    &img_dir,
                    &format!("out-{}-{index}", d.request_id),
                    &decode(b64)?,
                )?;
                if index == chosen {
                    published = Some(src.clone());
                }
                let caption = format!(
                    "{:.2} / {:.2}",
                    c["personalization"].as_f64().unwrap_or(0.0),
                    c["fidelity"].as_f64().unwrap_or(0.0)
                );
                let class = if index == chosen {
                    "cand chosen"
                } else {
                    "cand"
                };
                body.push_str(&figure(&src, &caption, class));
            }
            body.push_str("</div>");
            if let Some(src) = published {
                body.push_str(&figure(
                    &src,
                    &format!("published<br>{:.0} ms", out.latency_ms),
                    "pub",
                ));
            }
            if let Some(src) = item_src(&d.truth_item_id)? {
                body.push_str(&figure(
                    &src,
                    &format!("ground truth<br>{}", html_escape(&d.truth_item_id)),
                    "truth",
                ));
            }
            body.push_str("</div></div>\n");
        }
        body.push_str("</section>\n");
    }
    let page = format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>ragar demo gallery</title><style>\
         body{{font-family:sans-serif;margin:1.5em}}section{{border-top:2px solid #ccc;margin-top:1em}}\
         .row{{display:flex;gap:1em;align-items:flex-start;flex-wrap:wrap}}\
         figure{{margin:0;text-align:center;font-size:.75em}}img{{width:64px;height:64px;image-rendering:pixelated;border:1px solid #eee}}\
         .history,.candidates{{display:flex;flex-wrap:wrap;gap:.3em;border:1px dashed #ddd;padding:.3em}}\
         .history h4,.candidates h4{{width:100%;margin:0;font-size:.75em;font-weight:normal;color:#666}}\
         .hist img{{width:40px;height:40px}}.chosen img{{border:2px solid #2a2}}h3{{font-size:.9em;margin:.6em 0 .2em}}\
         </style><script>\
         window.addEventListener('load',()=>{{const i=[...document.images];\
         document.body.dataset.images=i.length;\
         document.body.dataset.imagesLoaded=i.filter(x=>x.complete&&x.naturalWidth>0).length;}});\
         </script></head><body>\n<h1>ragar demo</h1>\n<p>{} users, {} display requests, generator <code>{}</code>. \
         Per display: the reference, the history items that shaped the preference (retrieval weights), \
         every candidate with its ranker scores (the published one framed), the published image and the ground truth \
         (the reference drawn by the vendor this user prefers for its category).</p>\n{body}</body></html>\n",
        sim.users.len(),
        sim.displays.len(),
        html_escape(generator)
    );
    let path = dir.join("index.html");
    std::fs::write(&path, page)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::testutil::{HashEncoder, TintGenerator};
    use crate::model::CosineRanker;
    use std::sync::Arc;

    /// Every `<img src>` of the page, relative to its directory.
    fn image_sources(page: &str) -> Vec<String> {
        page.split("<img src=\"")
            .skip(1)
            .filter_map(|s| s.split('"').next())
            .map(str::to_string)
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn streams_simulated_users_through_the_worker_and_writes_a_gallery() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        crate::data::simulate::testdata::dataset(&data, 32);
        let dim = 16;
        let opts = DemoOptions {
            data_dir: data,
            out: dir.path().join("demo"),
            users: 4,
            history: 12,
            displays: 2,
            seed: 3,
            redis_url: std::env::var("RAGAR_TEST_REDIS_URL")
                .unwrap_or_else(|_| "redis://127.0.0.1:6379/".into()),
            models: ModelsConfig {
                dim,
                ..ModelsConfig::default()
            },
            candidates: 3,
            partitions: 2,
            gallery_users: 3,
            progress: false,
            timeout: Duration::from_secs(120),
        };
        let encoder: Arc<dyn crate::model::ItemEncoder> = Arc::new(HashEncoder { dim });
        let models = crate::worker::Models {
            encoder: Some(encoder.clone()),
            generator: Arc::new(TintGenerator),
            ranker: Arc::new(CosineRanker {
                personalization_weight: 0.5,
                encoder: Some(encoder),
            }),
        };
        let report = run(&opts, models).await.unwrap();
        assert_eq!(report.displays, 8);
        assert_eq!(report.outputs, 8);
        assert!(report.latency_p99_ms >= report.latency_p50_ms);

        let page = std::fs::read_to_string(&report.gallery).unwrap();
        let gallery_dir = report.gallery.parent().unwrap();
        let sources = image_sources(&page);
        // 3 users × 2 displays × (reference + history + 3 candidates + published + truth).
        assert!(sources.len() >= 3 * 2 * 6, "{} images", sources.len());
        for src in &sources {
            let bytes = std::fs::read(gallery_dir.join(src)).unwrap();
            crate::model::Image::from_png(&bytes).unwrap();
        }
        assert_eq!(
            page.matches("cand chosen").count(),
            6,
            "one published candidate per display"
        );
        assert_eq!(
            page.matches("ground truth<br>").count(),
            6,
            "a ground truth per display"
        );

        // The page as a browser sees it: every image loads.
        let chromium = ["chromium", "chromium-browser", "google-chrome"]
            .into_iter()
            .find(|b| {
                Command::new(b)
                    .arg("--version")
                    .output()
                    .is_ok_and(|o| o.status.success())
            });
        let Some(chromium) = chromium else {
            eprintln!("skipped: no Chromium installed (apt-get install chromium); the gallery was checked without a browser");
            return;
        };
        let profile = tempfile::tempdir().unwrap();
        let out = Command::new(chromium)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--allow-file-access-from-files",
                "--virtual-time-budget=10000",
                "--dump-dom",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(format!("file://{}", report.gallery.display()))
            .output()
            .unwrap();
        let dom = String::from_utf8_lossy(&out.stdout);
        let n = sources.len();
        assert!(
            dom.contains(&format!("data-images=\"{n}\""))
                && dom.contains(&format!("data-images-loaded=\"{n}\"")),
            "Chromium did not load all {n} images: {}",
            dom.lines()
                .find(|l| l.contains("<body"))
                .unwrap_or("(no body)")
        );
    }
}
