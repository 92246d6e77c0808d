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
    /// Serve an in-process Kafka with the worker's topics; prints `bootstrap.servers=HOST:PORT` first.
    Broker {
        /// Partitions per topic.
        #[arg(long, default_value_t = 8)]
        partitions: i32,
    },
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
