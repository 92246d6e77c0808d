//! The `ragar` binary: parses arguments, wires signals, and hands off to the library.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "ragar",
    version,
    about = "Personalized images from a live event stream"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the worker until SIGTERM or SIGINT.
    Run {
        /// TOML configuration file; `RAGAR_*` environment variables override it.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Print the effective configuration (defaults, then the file, then the environment) and exit.
    Config {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// The EmojiStyle evaluation set: fetch the vendors' packages, build the data set.
    Data {
        #[command(subcommand)]
        step: DataStep,
    },
    /// Serve an in-process Kafka with the worker's topics; prints `bootstrap.servers=HOST:PORT` first.
    Broker {
        /// Partitions per topic.
        #[arg(long, default_value_t = 8)]
        partitions: i32,
    },
}

#[derive(Subcommand)]
enum DataStep {
    /// Download the vendors' npm packages (`npm pack`) into DATA/packages.
    Fetch {
        #[command(flatten)]
        common: DataArgs,
    },
    /// Build DATA/emojistyle: the base emoji every selected vendor draws, per resolution, with splits.
    Build {
        #[command(flatten)]
        common: DataArgs,
        /// Extra square resolutions (64 is always built).
        #[arg(long = "resolution", value_name = "PIXELS")]
        resolutions: Vec<u32>,
        /// Seed of the train/val/test split.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Train, val and test fractions.
        #[arg(long, value_delimiter = ',', num_args = 3, default_values_t = [0.8, 0.1, 0.1])]
        split: Vec<f32>,
    },
}

#[derive(clap::Args)]
struct DataArgs {
    /// Data directory (kept out of git).
    #[arg(long, default_value = "data")]
    data_dir: PathBuf,
    /// Vendors: google, twitter, openmoji (the default set), apple, facebook.
    #[arg(long = "vendor", value_name = "NAME")]
    vendors: Vec<String>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

impl DataArgs {
    fn vendors(&self) -> anyhow::Result<Vec<ragar::data::Vendor>> {
        if self.vendors.is_empty() {
            return Ok(ragar::data::Vendor::defaults());
        }
        self.vendors
            .iter()
            .map(|v| {
                ragar::data::Vendor::known(v).ok_or_else(|| {
                    anyhow::anyhow!(
                        "unknown vendor `{v}` (known: google, twitter, openmoji, apple, facebook)"
                    )
                })
            })
            .collect()
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    match cli.command {
        Command::Run { config } => {
            let cfg = ragar::config::Config::load(config.as_deref())?;
            ragar::telemetry::init_logging(&cfg.telemetry);
            let models = ragar::worker::Models::from_config(&cfg.models)?;
            if cfg.models.generator == "passthrough" {
                tracing::warn!("models.generator = \"passthrough\": publishing the reference image (no personalization)");
            }
            let grace = cfg.shutdown.grace;
            runtime.block_on(ragar::worker::run(cfg, models, shutdown_signal(), None))?;
            // librdkafka's threads finish closing in the background; do not let them outlive the grace.
            runtime.shutdown_timeout(grace.min(Duration::from_secs(5)));
        }
        Command::Config { config } => {
            let cfg = ragar::config::Config::load(config.as_deref())?;
            print!(
                "{}",
                toml::to_string_pretty(&cfg).context("rendering the configuration")?
            );
        }
        Command::Data {
            step: DataStep::Fetch { common },
        } => {
            let paths = ragar::data::fetch(&common.data_dir, &common.vendors()?, !common.quiet)?;
            for p in paths {
                println!("{}", p.display());
            }
        }
        Command::Data {
            step:
                DataStep::Build {
                    common,
                    resolutions,
                    seed,
                    split,
                },
        } => {
            let manifest = ragar::data::build(
                &common.data_dir,
                &common.vendors()?,
                &resolutions,
                seed,
                (split[0], split[1], split[2]),
            )?;
            let count = |s: &str| manifest.split(s.parse().expect("known split")).count();
            println!(
                "{}: {} emoji ({} train, {} val, {} test), vendors {}, resolutions {:?}",
                ragar::data::manifest_path(&common.data_dir).display(),
                manifest.emoji.len(),
                count("train"),
                count("val"),
                count("test"),
                manifest.vendor_names().collect::<Vec<_>>().join(", "),
                manifest.resolutions,
            );
        }
        Command::Broker { partitions } => {
            anyhow::ensure!(partitions > 0, "--partitions must be at least 1");
            let broker =
                ragar::broker::MockBroker::start(&ragar::broker::default_topics(partitions))
                    .context("starting the in-process Kafka")?;
            println!("bootstrap.servers={}", broker.bootstrap_servers());
            eprintln!("serving topics ragar.items, ragar.events, ragar.images, ragar.events.dlq ({partitions} partitions each); Ctrl-C stops");
            runtime.block_on(shutdown_signal());
            drop(broker);
        }
    }
    Ok(())
}

/// Resolves on the first SIGTERM or SIGINT.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
