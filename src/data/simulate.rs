//! Simulated EmojiStyle users: seeded preferences, interaction logs and display requests with
//! their ground truth.
//!
//! Every item is one emoji drawn by one vendor (`google.1f600`). A user has
//! - interests over categories (a few favourites carry most of the weight, the rest a floor),
//! - a preferred vendor per category: a *global* user (a configurable share) prefers one vendor
//!   everywhere, a *category-dependent* user draws one per category independently,
//! - noise: the share of interactions with a drawing by another vendor (mostly views).
//!
//! The history is drawn from one split (train by default); display requests show a reference
//! emoji from another split (val or test) drawn by a random vendor, and the ground truth is the
//! same emoji drawn by the vendor the user prefers for its category. The same [`Simulation`]
//! feeds the worker (as `ragar.event.v1` JSON, [`Simulation::write`]) and the offline evaluation.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use base64::Engine;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::{DataError, EmojiEntry, Manifest, Split};

/// How the simulated population is drawn; every field is part of the reproduction recipe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SimConfig {
    pub users: usize,
    /// Interactions in each user's history.
    pub history: usize,
    /// Display requests per user.
    pub displays: usize,
    /// Share of users who prefer one vendor for every category.
    pub global_share: f32,
    /// Share of interactions with a drawing by a vendor the user does not prefer there.
    pub noise: f32,
    /// Favourite categories per user; they share `favourite_weight` of the interest.
    pub favourites: usize,
    pub favourite_weight: f32,
    /// Where history emoji come from.
    pub history_split: Split,
    /// Where display references come from.
    pub display_split: Split,
    pub seed: u64,
    /// Time of the first event, ms since the epoch; events are one second apart per user.
    pub start_ts_ms: i64,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            users: 200,
            history: 60,
            displays: 4,
            global_share: 0.3,
            noise: 0.15,
            favourites: 3,
            favourite_weight: 0.8,
            history_split: Split::Train,
            display_split: Split::Val,
            seed: 7,
            start_ts_ms: 1_767_225_600_000,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UserKind {
    /// One preferred vendor for every category.
    Global,
    /// A preferred vendor per category.
    CategoryDependent,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SimUser {
    pub user_id: String,
    pub kind: UserKind,
    /// Category → preferred vendor, for every category of the data set.
    pub preferred: BTreeMap<String, String>,
    /// Category → interest weight (sums to 1).
    pub interests: BTreeMap<String, f32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SimInteraction {
    pub event_id: String,
    pub user_id: String,
    pub item_id: String,
    pub emoji_id: String,
    pub vendor: String,
    pub action: String,
    pub ts_ms: i64,
    /// Whether the vendor is the user's preferred one for the emoji's category.
    pub preferred: bool,
}

/// A display request and what the right answer is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SimDisplay {
    pub event_id: String,
    pub request_id: String,
    pub user_id: String,
    pub user_kind: UserKind,
    pub emoji_id: String,
    pub category: String,
    /// The reference item shown (the emoji drawn by `reference_vendor`).
    pub item_id: String,
    pub reference_vendor: String,
    /// The vendor the user prefers for `category`, and its drawing of the emoji.
    pub preferred_vendor: String,
    pub truth_item_id: String,
    pub ts_ms: i64,
    pub seed: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Simulation {
    pub config: SimConfig,
    pub vendors: Vec<String>,
    pub users: Vec<SimUser>,
    /// In time order.
    pub interactions: Vec<SimInteraction>,
    /// In time order; each user's displays come after all of that user's history.
    pub displays: Vec<SimDisplay>,
}

/// An item's catalog text: where it sits in the catalog, then its name
/// (`smileys & emotion, face-smiling: grinning face`).
pub fn item_text(e: &EmojiEntry) -> String {
    format!(
        "{}, {}: {}",
        e.category.to_lowercase(),
        e.subcategory,
        e.name.to_lowercase()
    )
}

/// The id of emoji `emoji_id` drawn by `vendor`.
pub fn item_id(vendor: &str, emoji_id: &str) -> String {
    format!("{vendor}.{emoji_id}")
}

/// Draws a population from the manifest's emoji and vendors.
pub fn simulate(manifest: &Manifest, cfg: &SimConfig) -> Result<Simulation, DataError> {
    let vendors: Vec<String> = manifest.vendor_names().map(str::to_string).collect();
    if vendors.len() < 2 {
        return Err(DataError::InvalidInput(
            "simulating users needs at least two vendors".into(),
        ));
    }
    if !(0.0..=1.0).contains(&cfg.global_share) || !(0.0..=1.0).contains(&cfg.noise) {
        return Err(DataError::InvalidInput(
            "global_share and noise must lie in [0, 1]".into(),
        ));
    }
    let by_category = |split: Split| {
        let mut m: BTreeMap<&str, Vec<&EmojiEntry>> = BTreeMap::new();
        for e in manifest.split(split) {
            m.entry(e.category.as_str()).or_default().push(e);
        }
        m
    };
    let history_pool = by_category(cfg.history_split);
    let display_pool = by_category(cfg.display_split);
    // Categories a user can be interested in: those both splits draw from.
    let categories: Vec<&str> = history_pool
        .keys()
        .filter(|c| display_pool.contains_key(*c))
        .copied()
        .collect();
    if categories.is_empty() {
        return Err(DataError::InvalidInput(format!(
            "no category has emoji in both the {} and the {} split",
            cfg.history_split, cfg.display_split
        )));
    }
    let all_categories: Vec<&str> = {
        let mut c: Vec<&str> = manifest.emoji.iter().map(|e| e.category.as_str()).collect();
        c.sort_unstable();
        c.dedup();
        c
    };

    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let mut users = Vec::with_capacity(cfg.users);
    for u in 0..cfg.users {
        let kind = if rng.random::<f32>() < cfg.global_share {
            UserKind::Global
        } else {
            UserKind::CategoryDependent
        };
        let everywhere = rng.random_range(0..vendors.len());
        let preferred = all_categories
            .iter()
            .map(|c| {
                let v = match kind {
                    UserKind::Global => everywhere,
                    UserKind::CategoryDependent => rng.random_range(0..vendors.len()),
                };
                (c.to_string(), vendors[v].clone())
            })
            .collect();
        let favourites = cfg.favourites.clamp(1, categories.len());
        let mut order: Vec<usize> = (0..categories.len()).collect();
        for i in 0..favourites {
            let j = rng.random_range(i..order.len());
            order.swap(i, j);
        }
        let rest = categories.len() - favourites;
        let floor = if rest == 0 {
            0.0
        } else {
            (1.0 - cfg.favourite_weight) / rest as f32
        };
        let fav_share = if rest == 0 { 1.0 } else { cfg.favourite_weight };
        // Favourites get unequal shares: weights 1, 1/2, 1/3, ... normalized.
        let harmonic: f32 = (1..=favourites).map(|i| 1.0 / i as f32).sum();
        let mut interests = BTreeMap::new();
        for (rank, &ci) in order.iter().enumerate() {
            let w = if rank < favourites {
                fav_share * (1.0 / (rank + 1) as f32) / harmonic
            } else {
                floor
            };
            interests.insert(categories[ci].to_string(), w);
        }
        users.push(SimUser {
            user_id: format!("sim-u{u:05}"),
            kind,
            preferred,
            interests,
        });
    }

    let mut interactions = Vec::with_capacity(cfg.users * cfg.history);
    let mut displays = Vec::with_capacity(cfg.users * cfg.displays);
    for user in &users {
        let cats: Vec<(&str, f32)> = user
            .interests
            .iter()
            .map(|(c, w)| (c.as_str(), *w))
            .collect();
        for i in 0..cfg.history {
            let (category, _) = cats[pick_weighted(&mut rng, cats.iter().map(|c| c.1))];
            let pool = &history_pool[category];
            let emoji = pool[rng.random_range(0..pool.len())];
            let liked = &user.preferred[category];
            let preferred = rng.random::<f32>() >= cfg.noise;
            let vendor = if preferred {
                liked.clone()
            } else {
                let others: Vec<&String> = vendors.iter().filter(|v| *v != liked).collect();
                others[rng.random_range(0..others.len())].clone()
            };
            let action = if preferred {
                ["click", "click", "like", "like", "view", "purchase"][rng.random_range(0..6)]
            } else {
                ["view", "view", "view", "click"][rng.random_range(0..4)]
            };
            interactions.push(SimInteraction {
                event_id: format!("{}-h{i:04}", user.user_id),
                user_id: user.user_id.clone(),
                item_id: item_id(&vendor, &emoji.id),
                emoji_id: emoji.id.clone(),
                vendor,
                action: action.to_string(),
                ts_ms: cfg.start_ts_ms + 1000 * i as i64,
                preferred,
            });
        }
        for d in 0..cfg.displays {
            let (category, _) = cats[pick_weighted(&mut rng, cats.iter().map(|c| c.1))];
            let pool = &display_pool[category];
            let emoji = pool[rng.random_range(0..pool.len())];
            let reference_vendor = vendors[rng.random_range(0..vendors.len())].clone();
            let preferred_vendor = user.preferred[category].clone();
            let request_id = format!("{}-r{d:03}", user.user_id);
            displays.push(SimDisplay {
                event_id: format!("{}-d{d:03}", user.user_id),
                seed: crate::event::derive_seed(&request_id, cfg.seed),
                request_id,
                user_id: user.user_id.clone(),
                user_kind: user.kind,
                emoji_id: emoji.id.clone(),
                category: category.to_string(),
                item_id: item_id(&reference_vendor, &emoji.id),
                reference_vendor,
                truth_item_id: item_id(&preferred_vendor, &emoji.id),
                preferred_vendor,
                ts_ms: cfg.start_ts_ms + 1000 * (cfg.history + d) as i64,
            });
        }
    }
    interactions.sort_by(|a, b| a.ts_ms.cmp(&b.ts_ms).then(a.event_id.cmp(&b.event_id)));
    displays.sort_by(|a, b| a.ts_ms.cmp(&b.ts_ms).then(a.event_id.cmp(&b.event_id)));
    Ok(Simulation {
        config: cfg.clone(),
        vendors,
        users,
        interactions,
        displays,
    })
}

/// Index drawn with probability proportional to its weight.
fn pick_weighted(rng: &mut ChaCha8Rng, weights: impl Iterator<Item = f32> + Clone) -> usize {
    let total: f32 = weights.clone().sum();
    let mut x = rng.random::<f32>() * total;
    let mut last = 0;
    for (i, w) in weights.enumerate() {
        last = i;
        if x < w {
            return i;
        }
        x -= w;
    }
    last
}

/// Files [`Simulation::write`] produces.
pub const ITEMS_FILE: &str = "items.jsonl";
pub const EVENTS_FILE: &str = "events.jsonl";
pub const TRUTH_FILE: &str = "truth.jsonl";
pub const USERS_FILE: &str = "users.json";

impl Simulation {
    /// The item ids the simulation refers to (history and references), sorted.
    pub fn item_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .interactions
            .iter()
            .map(|i| i.item_id.clone())
            .chain(self.displays.iter().map(|d| d.item_id.clone()))
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// Writes `ragar.event.v1` JSON lines into `out`: `items.jsonl` (every item the simulation
    /// refers to, with its `res`-pixel image, name as text and category; for `ragar.items`),
    /// `events.jsonl` (interactions, then displays; for `ragar.events`), `truth.jsonl` (one
    /// [`SimDisplay`] per display) and `users.json` (config and users).
    pub fn write(
        &self,
        manifest: &Manifest,
        data_dir: &Path,
        res: u32,
        out: &Path,
    ) -> Result<(), DataError> {
        if !manifest.resolutions.contains(&res) {
            return Err(DataError::InvalidInput(format!(
                "the data set has no {res}px images (built: {:?}); rebuild with that resolution",
                manifest.resolutions
            )));
        }
        std::fs::create_dir_all(out).map_err(|e| DataError::io("create", out, e))?;
        let by_id: BTreeMap<&str, &EmojiEntry> =
            manifest.emoji.iter().map(|e| (e.id.as_str(), e)).collect();
        let mut items = Lines::create(&out.join(ITEMS_FILE))?;
        for id in self.item_ids() {
            let (vendor, emoji_id) = id.split_once('.').expect("item ids are vendor.emoji");
            let entry = by_id[emoji_id];
            let path = manifest.image_path(data_dir, vendor, res, emoji_id);
            let png = std::fs::read(&path).map_err(|e| DataError::io("read", &path, e))?;
            items.put(&serde_json::json!({
                "schema": crate::event::EVENT_SCHEMA,
                "type": "item",
                "event_id": format!("item-{id}"),
                "item_id": id,
                "ts": self.config.start_ts_ms,
                "text": item_text(entry),
                "category": entry.category,
                "image": { "base64": base64::engine::general_purpose::STANDARD.encode(&png) },
            }))?;
        }
        items.finish()?;
        let mut events = Lines::create(&out.join(EVENTS_FILE))?;
        for i in &self.interactions {
            events.put(&serde_json::json!({
                "schema": crate::event::EVENT_SCHEMA,
                "type": "interaction",
                "event_id": i.event_id,
                "user_id": i.user_id,
                "item_id": i.item_id,
                "action": i.action,
                "ts": i.ts_ms,
            }))?;
        }
        for d in &self.displays {
            events.put(&serde_json::json!({
                "schema": crate::event::EVENT_SCHEMA,
                "type": "display",
                "event_id": d.event_id,
                "user_id": d.user_id,
                "request_id": d.request_id,
                "item_id": d.item_id,
                "ts": d.ts_ms,
                "seed": d.seed,
            }))?;
        }
        events.finish()?;
        let mut truth = Lines::create(&out.join(TRUTH_FILE))?;
        for d in &self.displays {
            truth.put(d)?;
        }
        truth.finish()?;
        let users = out.join(USERS_FILE);
        let body = serde_json::json!({ "config": self.config, "vendors": self.vendors, "users": self.users });
        std::fs::write(
            &users,
            serde_json::to_vec_pretty(&body).expect("serializable"),
        )
        .map_err(|e| DataError::io("write", &users, e))
    }
}

/// A JSON-lines file being written.
struct Lines {
    path: std::path::PathBuf,
    w: std::io::BufWriter<std::fs::File>,
}

impl Lines {
    fn create(path: &Path) -> Result<Lines, DataError> {
        let f = std::fs::File::create(path).map_err(|e| DataError::io("create", path, e))?;
        Ok(Lines {
            path: path.to_path_buf(),
            w: std::io::BufWriter::new(f),
        })
    }

    fn put(&mut self, value: &impl Serialize) -> Result<(), DataError> {
        serde_json::to_writer(&mut self.w, value).expect("serializable");
        self.w
            .write_all(b"\n")
            .map_err(|e| DataError::io("write", &self.path, e))
    }

    fn finish(mut self) -> Result<(), DataError> {
        self.w
            .flush()
            .map_err(|e| DataError::io("write", &self.path, e))
    }
}

/// A synthetic data set for tests: 4 categories × 12 emoji, 3 vendors, each vendor drawing in its
/// own colour scheme.
#[cfg(test)]
pub(crate) mod testdata {
    use std::path::Path;

    use super::*;
    use crate::data::VendorRecord;

    pub(crate) fn manifest() -> Manifest {
        let mut emoji = Vec::new();
        for (ci, cat) in ["Animals", "Food", "Objects", "Smileys"].iter().enumerate() {
            for k in 0..12 {
                let split = match k % 6 {
                    0 => Split::Val,
                    1 => Split::Test,
                    _ => Split::Train,
                };
                let id = format!("1f{ci}{k:02}");
                emoji.push(EmojiEntry {
                    id: id.clone(),
                    unified: id.to_uppercase(),
                    name: format!("{cat} THING {k}"),
                    short_name: format!("{cat}_{k}").to_lowercase(),
                    category: cat.to_string(),
                    subcategory: "misc".into(),
                    sort_order: (ci * 100 + k) as i64,
                    split,
                });
            }
        }
        let vendor = |n: &str| VendorRecord {
            name: n.into(),
            package: n.into(),
            version: "1".into(),
            image_license: "CC-BY-4.0".into(),
            sha256: "0".repeat(64),
        };
        Manifest {
            format: crate::data::MANIFEST_FORMAT,
            vendors: vec![vendor("google"), vendor("twitter"), vendor("openmoji")],
            resolutions: vec![64],
            seed: 1,
            split_fractions: [0.66, 0.17, 0.17],
            emoji,
            dropped: Vec::new(),
        }
    }

    /// Writes every drawing at `res` px: the vendor sets the background, the emoji a centred square.
    pub(crate) fn write_images(m: &Manifest, data_dir: &Path, res: u32) {
        for (vi, v) in m.vendor_names().enumerate() {
            for (ei, e) in m.emoji.iter().enumerate() {
                let path = m.image_path(data_dir, v, res, &e.id);
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                let bg = [[250u8, 250, 250, 255], [30, 30, 30, 255], [200, 40, 40, 0]][vi % 3];
                let fg = [
                    (ei * 37 % 256) as u8,
                    (ei * 91 % 256) as u8,
                    (ei * 13 % 256) as u8,
                    255,
                ];
                let q = res / 4;
                image::RgbaImage::from_fn(res, res, |x, y| {
                    let inside = x >= q && x < res - q && y >= q && y < res - q;
                    image::Rgba(if inside { fg } else { bg })
                })
                .save(&path)
                .unwrap();
            }
        }
    }

    /// The synthetic data set at `res` px under `data_dir`: manifest and every drawing.
    pub(crate) fn dataset(data_dir: &Path, res: u32) -> Manifest {
        let mut m = manifest();
        m.resolutions = vec![res];
        write_images(&m, data_dir, res);
        std::fs::write(
            crate::data::manifest_path(data_dir),
            serde_json::to_vec(&m).unwrap(),
        )
        .unwrap();
        m
    }

    /// A small random-weight (seeded) item encoder bundle for `m`'s vendors at `res` px.
    pub(crate) fn tiny_encoder(bundle: &Path, m: &Manifest, res: u32) {
        tiny_encoder_for(bundle, m.vendor_names().map(str::to_string).collect(), res);
    }

    /// [`tiny_encoder`] for the vendors `vendors`: style block of 4 values, embeddings of 388.
    pub(crate) fn tiny_encoder_for(bundle: &Path, vendors: Vec<String>, res: u32) {
        tiny_encoder_seeded(bundle, vendors, res, 3)
    }

    /// [`tiny_encoder_for`] with weights drawn from `seed`.
    pub(crate) fn tiny_encoder_seeded(bundle: &Path, vendors: Vec<String>, res: u32, seed: u64) {
        use crate::model::emoji::{EmojiEncoderConfig, EmojiNet};
        use candle_core::{DType, Device};
        use candle_nn::{VarBuilder, VarMap};
        std::fs::create_dir_all(bundle).unwrap();
        let cfg = EmojiEncoderConfig {
            channels: [4, 4, 8, 8],
            style_dim: 4,
            ..EmojiEncoderConfig::new(vendors, res)
        };
        let vm = VarMap::new();
        EmojiNet::new(
            cfg.clone(),
            VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
        )
        .unwrap();
        crate::train::seeded_init(&vm, seed).unwrap();
        vm.save(bundle.join("model.safetensors")).unwrap();
        std::fs::write(
            bundle.join("config.json"),
            serde_json::to_vec(&cfg).unwrap(),
        )
        .unwrap();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::testdata::manifest;

    fn cfg() -> SimConfig {
        SimConfig {
            users: 40,
            history: 30,
            displays: 3,
            ..SimConfig::default()
        }
    }

    #[test]
    fn same_seed_same_population_other_seed_another() {
        let m = manifest();
        let a = simulate(&m, &cfg()).unwrap();
        assert_eq!(a, simulate(&m, &cfg()).unwrap());
        let b = simulate(&m, &SimConfig { seed: 8, ..cfg() }).unwrap();
        assert_ne!(a.interactions, b.interactions);
    }

    #[test]
    fn users_follow_their_kind_and_the_truth_is_their_vendor() {
        let m = manifest();
        let sim = simulate(&m, &cfg()).unwrap();
        assert_eq!(sim.users.len(), 40);
        assert_eq!(sim.interactions.len(), 40 * 30);
        assert_eq!(sim.displays.len(), 40 * 3);
        let globals = sim
            .users
            .iter()
            .filter(|u| u.kind == UserKind::Global)
            .count();
        assert!(
            globals > 0 && globals < 40,
            "both kinds drawn: {globals} global"
        );
        for u in &sim.users {
            let distinct: std::collections::BTreeSet<&String> = u.preferred.values().collect();
            if u.kind == UserKind::Global {
                assert_eq!(distinct.len(), 1);
            }
            let total: f32 = u.interests.values().sum();
            assert!((total - 1.0).abs() < 1e-4, "interests sum to {total}");
        }
        let by_user: BTreeMap<&str, &SimUser> =
            sim.users.iter().map(|u| (u.user_id.as_str(), u)).collect();
        let by_id: BTreeMap<&str, &EmojiEntry> =
            m.emoji.iter().map(|e| (e.id.as_str(), e)).collect();
        for d in &sim.displays {
            let e = by_id[d.emoji_id.as_str()];
            assert_eq!(
                e.split,
                Split::Val,
                "references come from the display split"
            );
            assert_eq!(
                d.preferred_vendor,
                by_user[d.user_id.as_str()].preferred[&e.category]
            );
            assert_eq!(d.truth_item_id, item_id(&d.preferred_vendor, &d.emoji_id));
        }
        // Noise: about 15% of interactions are with another vendor's drawing.
        let noisy = sim.interactions.iter().filter(|i| !i.preferred).count() as f32
            / sim.interactions.len() as f32;
        assert!((0.08..0.25).contains(&noisy), "noise share {noisy}");
        for i in &sim.interactions {
            let e = by_id[i.emoji_id.as_str()];
            assert_eq!(
                e.split,
                Split::Train,
                "history comes from the history split"
            );
            let liked = &by_user[i.user_id.as_str()].preferred[&e.category];
            assert_eq!(i.preferred, &i.vendor == liked);
        }
    }

    #[test]
    fn a_users_displays_follow_their_history() {
        let sim = simulate(&manifest(), &cfg()).unwrap();
        for d in &sim.displays {
            let last = sim
                .interactions
                .iter()
                .filter(|i| i.user_id == d.user_id)
                .map(|i| i.ts_ms)
                .max()
                .unwrap();
            assert!(d.ts_ms > last);
        }
    }

    #[test]
    fn written_events_decode_as_the_worker_reads_them() {
        let m = manifest();
        let dir = tempfile::tempdir().unwrap();
        // One tiny PNG per vendor drawing the simulation refers to.
        let sim = simulate(
            &m,
            &SimConfig {
                users: 3,
                history: 5,
                displays: 1,
                ..cfg()
            },
        )
        .unwrap();
        for id in sim.item_ids() {
            let (vendor, emoji) = id.split_once('.').unwrap();
            let path = m.image_path(dir.path(), vendor, 64, emoji);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            image::RgbaImage::from_pixel(2, 2, image::Rgba([1, 2, 3, 255]))
                .save(&path)
                .unwrap();
        }
        let out = dir.path().join("sim");
        sim.write(&m, dir.path(), 64, &out).unwrap();
        let mut limits = crate::event::Limits::for_dim(4);
        limits.max_image_pixels = 64 * 64;
        let items = std::fs::read_to_string(out.join(ITEMS_FILE)).unwrap();
        assert_eq!(items.lines().count(), sim.item_ids().len());
        for line in items.lines() {
            crate::event::decode(line.as_bytes(), 0, &limits).unwrap();
        }
        let events = std::fs::read_to_string(out.join(EVENTS_FILE)).unwrap();
        assert_eq!(events.lines().count(), 3 * 5 + 3);
        for line in events.lines() {
            crate::event::decode(line.as_bytes(), 0, &limits).unwrap();
        }
        assert_eq!(
            std::fs::read_to_string(out.join(TRUTH_FILE))
                .unwrap()
                .lines()
                .count(),
            3
        );
        assert!(matches!(
            sim.write(&m, dir.path(), 32, &out),
            Err(DataError::InvalidInput(_))
        ));
    }
}
