//! `ragar data build`: from the fetched tarballs to `DATA/emojistyle/`, once per set of inputs.
//!
//! Every tarball is streamed once (gzip → tar, entries filtered by path, the gzip trailer's CRC
//! checked at the end) and only the vendor's image folder and `emoji.json` are kept in memory.
//! Base emoji are `emoji.json`'s top-level entries (skin-tone variants are nested and ignored)
//! outside the `Component` category; those that every selected vendor draws are decoded (PNG) or
//! rasterized (SVG, with resvg) to RGBA at every resolution and written as PNGs.
//!
//! The data set is written into `DATA/.emojistyle.partial/` and renamed into place at the end,
//! so an interrupted build never leaves a half data set under `DATA/emojistyle/`; a build whose
//! inputs (vendors, tarball hashes, resolutions, seed, split) match the existing manifest, with
//! every image present, returns that manifest and writes nothing. Two builds must not run in the
//! same data directory at once.

use std::cmp::Ordering;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::Path;

use flate2::read::GzDecoder;
use image::imageops::{self, FilterType};
use image::{ImageBuffer, ImageFormat, Rgba, Rgba32FImage, RgbaImage};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use resvg::{tiny_skia, usvg};
use serde::Deserialize;

use super::fetch::{read_sidecar, sha256_file};
use super::{
    dataset_dir, emoji_id, image_path_in, DataError, DroppedEmoji, EmojiEntry, Manifest, Split,
    Vendor, VendorKind, VendorRecord, BASE_RESOLUTION, MANIFEST_FILE, MANIFEST_FORMAT,
    PACKAGES_DIR,
};

/// Scratch folder of a build in progress, next to the data set.
const PARTIAL_DIR: &str = ".emojistyle.partial";
/// Where the previous data set waits while the new one is renamed into place.
const OLD_DIR: &str = ".emojistyle.old";
/// emoji.json's category of skin tones, hair styles and other building blocks: not emoji.
const COMPONENT_CATEGORY: &str = "Component";
/// Largest side accepted; larger is almost certainly a typo, and costs minutes of rasterizing.
const MAX_RESOLUTION: u32 = 4096;

/// Builds EmojiStyle from the tarballs in `DATA/packages/` (see the module docs) and returns its
/// manifest. `resolutions` are square sizes in pixels ([`BASE_RESOLUTION`] is always added);
/// `split` holds the train, val and test fractions, which must sum to 1. The split is by emoji
/// identity, stratified by category (every category with at least 3 emoji appears in every split
/// whose fraction is not 0) and a pure function of the emoji, the categories and `seed`.
pub fn build(
    data_dir: &Path,
    vendors: &[Vendor],
    resolutions: &[u32],
    seed: u64,
    split: (f32, f32, f32),
) -> Result<Manifest, DataError> {
    check_vendors(vendors)?;
    let resolutions = check_resolutions(resolutions)?;
    let split_fractions = [split.0, split.1, split.2];
    check_fractions(split_fractions)?;

    // Every package present and intact before anything else happens.
    let mut records = Vec::with_capacity(vendors.len());
    for vendor in vendors {
        let path = vendor.tarball_path(data_dir);
        if !path.is_file() {
            return Err(DataError::MissingPackage {
                package: vendor.spec(),
                dir: data_dir.join(PACKAGES_DIR),
            });
        }
        let sha256 = sha256_file(&path)?;
        if let Some(recorded) = read_sidecar(&path)? {
            if recorded != sha256 {
                return Err(DataError::Corrupt {
                    path,
                    reason: format!(
                        "its sha256 is {sha256}, but {recorded} was recorded when it was fetched"
                    ),
                });
            }
        }
        records.push(VendorRecord {
            name: vendor.name.clone(),
            package: vendor.package.clone(),
            version: vendor.version.clone(),
            image_license: vendor.image_license.clone(),
            sha256,
        });
    }

    if let Some(existing) = reusable(data_dir, &records, &resolutions, seed, split_fractions) {
        tracing::info!(
            dir = %dataset_dir(data_dir).display(), emoji = existing.emoji.len(),
            "EmojiStyle is up to date"
        );
        return Ok(existing);
    }

    let packages = vendors
        .iter()
        .map(|v| read_package(&v.tarball_path(data_dir), v))
        .collect::<Result<Vec<_>, _>>()?;
    let emoji = read_metadata(data_dir, vendors, &packages)?;

    let (candidates, mut dropped) = select(&emoji, vendors, &packages);
    if candidates.is_empty() {
        return Err(DataError::InvalidInput(format!(
            "no base emoji is drawn by every selected vendor ({})",
            vendors
                .iter()
                .map(|v| v.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }

    let partial = data_dir.join(PARTIAL_DIR);
    let written = write_partial(&partial, vendors, &resolutions, &candidates, &mut dropped);
    let manifest = written.and_then(|kept| {
        let categories: Vec<&str> = kept.iter().map(|c| c.raw.category.as_str()).collect();
        let splits = assign_splits(&categories, seed, split_fractions.map(f64::from));
        let manifest = Manifest {
            format: MANIFEST_FORMAT,
            vendors: records,
            resolutions: resolutions.clone(),
            seed,
            split_fractions,
            emoji: kept
                .iter()
                .zip(splits)
                .map(|(c, split)| c.entry(split))
                .collect(),
            dropped,
        };
        write_manifest(&partial, &manifest)?;
        Ok(manifest)
    });
    let manifest = match manifest {
        Ok(m) => m,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&partial);
            return Err(e);
        }
    };
    publish(data_dir, &partial)?;
    tracing::info!(
        dir = %dataset_dir(data_dir).display(),
        emoji = manifest.emoji.len(),
        dropped = manifest.dropped.len(),
        resolutions = ?manifest.resolutions,
        seed,
        "EmojiStyle built"
    );
    Ok(manifest)
}

fn check_vendors(vendors: &[Vendor]) -> Result<(), DataError> {
    if vendors.is_empty() {
        return Err(DataError::InvalidInput("no vendor selected".to_string()));
    }
    let mut names = HashSet::new();
    for v in vendors {
        let valid = !v.name.is_empty()
            && v.name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !valid {
            return Err(DataError::InvalidInput(format!(
                "vendor name `{}` must be ASCII letters, digits, `-` or `_` (it names a folder)",
                v.name
            )));
        }
        if !names.insert(v.name.as_str()) {
            return Err(DataError::InvalidInput(format!(
                "vendor `{}` is selected twice",
                v.name
            )));
        }
        if v.package.is_empty() || v.version.is_empty() {
            return Err(DataError::InvalidInput(format!(
                "vendor `{}` needs a package name and an exact version",
                v.name
            )));
        }
    }
    Ok(())
}

/// Ascending, without duplicates, always with [`BASE_RESOLUTION`].
fn check_resolutions(resolutions: &[u32]) -> Result<Vec<u32>, DataError> {
    if let Some(bad) = resolutions.iter().find(|&&r| r == 0 || r > MAX_RESOLUTION) {
        return Err(DataError::InvalidInput(format!(
            "resolution {bad} is outside 1..={MAX_RESOLUTION}"
        )));
    }
    let mut out: Vec<u32> = resolutions
        .iter()
        .copied()
        .chain([BASE_RESOLUTION])
        .collect();
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

fn check_fractions(f: [f32; 3]) -> Result<(), DataError> {
    let sum: f32 = f.iter().sum();
    if f.iter().any(|x| !x.is_finite() || *x < 0.0) || (sum - 1.0).abs() > 1e-3 || f[0] <= 0.0 {
        return Err(DataError::InvalidInput(format!(
            "split fractions (train {}, val {}, test {}) must be non-negative, sum to 1, and give \
             training a share",
            f[0], f[1], f[2]
        )));
    }
    Ok(())
}

/// The existing manifest, if it was built from exactly these inputs and every image is there.
fn reusable(
    data_dir: &Path,
    records: &[VendorRecord],
    resolutions: &[u32],
    seed: u64,
    split_fractions: [f32; 3],
) -> Option<Manifest> {
    let existing = Manifest::load(data_dir).ok()?;
    let same = existing.format == MANIFEST_FORMAT
        && existing.vendors == records
        && existing.resolutions == resolutions
        && existing.seed == seed
        && existing.split_fractions == split_fractions;
    if same && existing.is_complete(data_dir) {
        Some(existing)
    } else {
        None
    }
}

/// What a build needs from one tarball.
#[derive(Default)]
struct PackageContents {
    /// `package/emoji.json`, if the package ships it.
    metadata: Option<Vec<u8>>,
    /// The vendor's images by lowercase file stem (`1f600`, `0023-fe0f-20e3`).
    images: HashMap<String, Vec<u8>>,
    /// Stem by [`emoji_id`], for names that differ from emoji.json's only in U+FE0F.
    by_id: HashMap<String, String>,
}

impl PackageContents {
    /// The drawing of `raw`: by emoji.json's image name, its qualified or unqualified sequence,
    /// or, failing those, by the sequence without any U+FE0F.
    fn lookup(&self, raw: &RawEmoji, id: &str) -> Option<&[u8]> {
        let image_stem = raw
            .image
            .as_deref()
            .map(|i| i.rsplit_once('.').map_or(i, |(stem, _)| stem));
        let names = [
            image_stem,
            Some(raw.unified.as_str()),
            raw.non_qualified.as_deref(),
        ];
        for name in names.into_iter().flatten() {
            if let Some(bytes) = self.images.get(&name.to_ascii_lowercase()) {
                return Some(bytes.as_slice());
            }
        }
        self.by_id
            .get(id)
            .and_then(|stem| self.images.get(stem))
            .map(|b| b.as_slice())
    }
}

/// Streams one tarball, keeping `package/emoji.json` and the files directly inside the vendor's
/// image folder.
fn read_package(path: &Path, vendor: &Vendor) -> Result<PackageContents, DataError> {
    let corrupt = |e: io::Error| DataError::Corrupt {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let (dir, ext) = vendor.kind.image_dir_and_ext();
    let prefix = format!("package/{dir}/");
    let suffix = format!(".{ext}");

    let file = File::open(path).map_err(|e| DataError::io("open", path, e))?;
    let mut archive = tar::Archive::new(GzDecoder::new(BufReader::new(file)));
    let mut contents = PackageContents::default();
    {
        let entries = archive.entries().map_err(corrupt)?;
        for entry in entries {
            let mut entry = entry.map_err(corrupt)?;
            if !entry.header().entry_type().is_file() {
                continue;
            }
            let name = match entry.path().map_err(corrupt)?.to_str() {
                Some(name) => name.to_string(),
                None => continue,
            };
            if name == "package/emoji.json" {
                let mut buf = Vec::new();
                entry.read_to_end(&mut buf).map_err(corrupt)?;
                contents.metadata = Some(buf);
                continue;
            }
            let Some(file_name) = name.strip_prefix(&prefix) else {
                continue;
            };
            let lower = file_name.to_ascii_lowercase();
            let Some(stem) = lower.strip_suffix(&suffix) else {
                continue;
            };
            if stem.is_empty() || stem.contains('/') {
                continue;
            }
            let stem = stem.to_string();
            let mut buf = Vec::new();
            entry.read_to_end(&mut buf).map_err(corrupt)?;
            contents
                .by_id
                .entry(emoji_id(&stem))
                .or_insert_with(|| stem.clone());
            contents.images.insert(stem, buf);
        }
    }
    // tar stops at its end-of-archive blocks; reading on to the end checks the gzip trailer's
    // CRC and length, which is what notices a tarball damaged after those blocks.
    let mut rest = archive.into_inner();
    io::copy(&mut rest, &mut io::sink()).map_err(corrupt)?;

    if contents.images.is_empty() {
        return Err(DataError::NoImages {
            package: vendor.spec(),
            path: path.to_path_buf(),
            dir: dir.to_string(),
            ext,
        });
    }
    Ok(contents)
}

/// One top-level entry of emoji-datasource's `emoji.json` (other fields ignored).
#[derive(Debug, Clone, Deserialize)]
struct RawEmoji {
    unified: String,
    #[serde(default)]
    non_qualified: Option<String>,
    #[serde(default)]
    name: Option<String>,
    short_name: String,
    category: String,
    #[serde(default)]
    subcategory: String,
    sort_order: i64,
    #[serde(default)]
    image: Option<String>,
}

/// emoji.json from the first selected vendor whose package ships it, in sort order.
fn read_metadata(
    data_dir: &Path,
    vendors: &[Vendor],
    packages: &[PackageContents],
) -> Result<Vec<RawEmoji>, DataError> {
    let Some((vendor, bytes)) = vendors
        .iter()
        .zip(packages)
        .find_map(|(v, p)| p.metadata.as_deref().map(|bytes| (v, bytes)))
    else {
        return Err(DataError::NoMetadata {
            packages: vendors
                .iter()
                .map(Vendor::spec)
                .collect::<Vec<_>>()
                .join(", "),
        });
    };
    let mut emoji: Vec<RawEmoji> =
        serde_json::from_slice(bytes).map_err(|source| DataError::Metadata {
            path: vendor.tarball_path(data_dir),
            source,
        })?;
    emoji.sort_by(|a, b| {
        a.sort_order
            .cmp(&b.sort_order)
            .then_with(|| a.unified.cmp(&b.unified))
    });
    Ok(emoji)
}

/// A base emoji that every vendor draws, with each vendor's drawing (in vendor order).
struct Candidate<'a> {
    raw: &'a RawEmoji,
    id: String,
    drawings: Vec<&'a [u8]>,
}

impl Candidate<'_> {
    fn entry(&self, split: Split) -> EmojiEntry {
        let raw = self.raw;
        EmojiEntry {
            id: self.id.clone(),
            unified: raw.unified.clone(),
            name: raw
                .name
                .clone()
                .unwrap_or_else(|| raw.short_name.to_uppercase()),
            short_name: raw.short_name.clone(),
            category: raw.category.clone(),
            subcategory: raw.subcategory.clone(),
            sort_order: raw.sort_order,
            split,
        }
    }
}

/// Base emoji drawn by every vendor, and the ones left out with the reason.
fn select<'a>(
    emoji: &'a [RawEmoji],
    vendors: &[Vendor],
    packages: &'a [PackageContents],
) -> (Vec<Candidate<'a>>, Vec<DroppedEmoji>) {
    let mut seen = HashSet::new();
    let mut candidates = Vec::new();
    let mut dropped = Vec::new();
    for raw in emoji {
        if raw.category == COMPONENT_CATEGORY {
            continue;
        }
        let id = emoji_id(&raw.unified);
        let dropped_because = |reason: String| DroppedEmoji {
            id: id.clone(),
            short_name: raw.short_name.clone(),
            reason,
        };
        if id.is_empty() {
            dropped.push(dropped_because(format!(
                "`{}` has no codepoint besides U+FE0F",
                raw.unified
            )));
            continue;
        }
        if !seen.insert(id.clone()) {
            dropped.push(dropped_because(
                "another entry has the same codepoints without U+FE0F".to_string(),
            ));
            continue;
        }
        let mut drawings = Vec::with_capacity(vendors.len());
        let mut missing = Vec::new();
        for (vendor, package) in vendors.iter().zip(packages) {
            match package.lookup(raw, &id) {
                Some(bytes) => drawings.push(bytes),
                None => missing.push(vendor.name.as_str()),
            }
        }
        if !missing.is_empty() {
            dropped.push(dropped_because(format!(
                "not drawn by {}",
                missing.join(", ")
            )));
            continue;
        }
        candidates.push(Candidate { raw, id, drawings });
    }
    (candidates, dropped)
}

/// Renders every candidate into `partial` (created afresh), in parallel; candidates with a
/// drawing that cannot be decoded move to `dropped`. Returns the candidates written.
fn write_partial<'c, 'a>(
    partial: &Path,
    vendors: &[Vendor],
    resolutions: &[u32],
    candidates: &'c [Candidate<'a>],
    dropped: &mut Vec<DroppedEmoji>,
) -> Result<Vec<&'c Candidate<'a>>, DataError> {
    if partial.exists() {
        // Left by an interrupted build.
        std::fs::remove_dir_all(partial).map_err(|e| DataError::io("remove", partial, e))?;
    }
    for vendor in vendors {
        for res in resolutions {
            let dir = partial.join(&vendor.name).join(res.to_string());
            std::fs::create_dir_all(&dir).map_err(|e| DataError::io("create", &dir, e))?;
        }
    }

    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 16);
    let chunk = candidates.len().div_ceil(threads).max(1);
    let outcomes: Vec<Option<String>> = std::thread::scope(|s| {
        let handles: Vec<_> = candidates
            .chunks(chunk)
            .map(|part| {
                s.spawn(move || {
                    part.iter()
                        .map(|c| render_candidate(c, vendors, resolutions, partial))
                        .collect::<Result<Vec<_>, DataError>>()
                })
            })
            .collect();
        let mut all = Vec::with_capacity(candidates.len());
        for handle in handles {
            match handle.join() {
                Ok(part) => all.extend(part?),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        Ok::<_, DataError>(all)
    })?;

    let mut kept = Vec::with_capacity(candidates.len());
    for (candidate, outcome) in candidates.iter().zip(outcomes) {
        match outcome {
            None => kept.push(candidate),
            Some(reason) => {
                tracing::warn!(id = %candidate.id, %reason, "emoji left out");
                dropped.push(DroppedEmoji {
                    id: candidate.id.clone(),
                    short_name: candidate.raw.short_name.clone(),
                    reason,
                });
            }
        }
    }
    if kept.is_empty() {
        return Err(DataError::InvalidInput(
            "no emoji left: every candidate has a drawing that cannot be decoded".to_string(),
        ));
    }
    Ok(kept)
}

/// Decodes all of one emoji's drawings first and writes them only if all decode, so a dropped
/// emoji leaves no files. `Ok(Some(reason))` means dropped.
fn render_candidate(
    candidate: &Candidate<'_>,
    vendors: &[Vendor],
    resolutions: &[u32],
    out: &Path,
) -> Result<Option<String>, DataError> {
    let mut rendered = Vec::with_capacity(vendors.len());
    for (vendor, bytes) in vendors.iter().zip(&candidate.drawings) {
        match render(&vendor.kind, bytes, resolutions) {
            Ok(images) => rendered.push(images),
            Err(reason) => {
                return Ok(Some(format!(
                    "{}'s drawing cannot be decoded: {reason}",
                    vendor.name
                )))
            }
        }
    }
    for (vendor, images) in vendors.iter().zip(rendered) {
        for (&res, img) in resolutions.iter().zip(images) {
            let path = image_path_in(out, &vendor.name, res, &candidate.id);
            img.save_with_format(&path, ImageFormat::Png)
                .map_err(|source| DataError::WriteImage { path, source })?;
        }
    }
    Ok(None)
}

/// One drawing as RGBA8 at each resolution.
fn render(kind: &VendorKind, bytes: &[u8], resolutions: &[u32]) -> Result<Vec<RgbaImage>, String> {
    match kind {
        VendorKind::Png64 { .. } => {
            let img = image::load_from_memory_with_format(bytes, ImageFormat::Png)
                .map_err(|e| e.to_string())?
                .to_rgba8();
            Ok(resolutions
                .iter()
                .map(|&res| resize_rgba(&img, res))
                .collect())
        }
        VendorKind::Svg { .. } => {
            let tree = usvg::Tree::from_data(bytes, &usvg::Options::default())
                .map_err(|e| e.to_string())?;
            resolutions
                .iter()
                .map(|&res| rasterize(&tree, res))
                .collect()
        }
    }
}

/// Resizes through premultiplied alpha: `imageops::resize` assumes it, and the fully transparent
/// pixels around a drawing carry arbitrary colour (often black) that would otherwise bleed into
/// its edges.
fn resize_rgba(img: &RgbaImage, res: u32) -> RgbaImage {
    if img.dimensions() == (res, res) {
        return img.clone();
    }
    let premultiplied: Rgba32FImage = ImageBuffer::from_fn(img.width(), img.height(), |x, y| {
        let [r, g, b, a] = img.get_pixel(x, y).0;
        let a = f32::from(a) / 255.0;
        Rgba([
            f32::from(r) / 255.0 * a,
            f32::from(g) / 255.0 * a,
            f32::from(b) / 255.0 * a,
            a,
        ])
    });
    let resized = imageops::resize(&premultiplied, res, res, FilterType::Triangle);
    RgbaImage::from_fn(res, res, |x, y| {
        let [r, g, b, a] = resized.get_pixel(x, y).0;
        let a = a.clamp(0.0, 1.0);
        if a <= 0.0 {
            return Rgba([0, 0, 0, 0]);
        }
        let channel = |c: f32| ((c / a).clamp(0.0, 1.0) * 255.0).round() as u8;
        Rgba([
            channel(r),
            channel(g),
            channel(b),
            (a * 255.0).round() as u8,
        ])
    })
}

/// Renders an SVG into a `res`×`res` square, scaled to fit and centred, and returns straight
/// (not premultiplied) RGBA.
fn rasterize(tree: &usvg::Tree, res: u32) -> Result<RgbaImage, String> {
    let size = tree.size();
    let (w, h) = (size.width(), size.height());
    if !(w > 0.0 && h > 0.0) {
        return Err(format!("empty view box ({w}×{h})"));
    }
    let side = res as f32;
    let scale = (side / w).min(side / h);
    let transform = tiny_skia::Transform::from_row(
        scale,
        0.0,
        0.0,
        scale,
        (side - w * scale) / 2.0,
        (side - h * scale) / 2.0,
    );
    let mut pixmap = tiny_skia::Pixmap::new(res, res)
        .ok_or_else(|| format!("cannot allocate a {res}×{res} pixmap"))?;
    resvg::render(tree, transform, &mut pixmap.as_mut());
    let mut data = Vec::with_capacity(res as usize * res as usize * 4);
    for pixel in pixmap.pixels() {
        let c = pixel.demultiply();
        data.extend_from_slice(&[c.red(), c.green(), c.blue(), c.alpha()]);
    }
    RgbaImage::from_raw(res, res, data).ok_or_else(|| "pixmap size mismatch".to_string())
}

/// Splits items (given by their categories, in a fixed order) into train/val/test: within each
/// category, a seeded shuffle cut by the fractions (largest remainder), then topped up so that a
/// category of at least 3 items has at least one in each split whose fraction is not 0.
pub(crate) fn assign_splits(categories: &[&str], seed: u64, fractions: [f64; 3]) -> Vec<Split> {
    let mut by_category: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, &category) in categories.iter().enumerate() {
        by_category.entry(category).or_default().push(i);
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out = vec![Split::Train; categories.len()];
    for (_, mut members) in by_category {
        members.shuffle(&mut rng);
        let counts = split_counts(members.len(), fractions);
        let mut members = members.into_iter();
        for (split, n) in Split::ALL.into_iter().zip(counts) {
            for i in members.by_ref().take(n) {
                out[i] = split;
            }
        }
    }
    out
}

/// How many of `n` items go to train, val and test.
fn split_counts(n: usize, fractions: [f64; 3]) -> [usize; 3] {
    let total: f64 = fractions.iter().sum();
    let exact = fractions.map(|f| f / total * n as f64);
    let mut counts = exact.map(|x| x.floor() as usize);
    let mut left = n.saturating_sub(counts.iter().sum::<usize>());
    let remainder = |i: usize| exact[i] - exact[i].floor();
    let mut order = [0usize, 1, 2];
    order.sort_by(|&a, &b| {
        remainder(b)
            .partial_cmp(&remainder(a))
            .unwrap_or(Ordering::Equal)
            .then(a.cmp(&b))
    });
    for &i in &order {
        if left > 0 && fractions[i] > 0.0 {
            counts[i] += 1;
            left -= 1;
        }
    }
    if left > 0 {
        // Only reachable through rounding error: give the rest to the largest share.
        let largest = (0..3)
            .max_by(|&a, &b| fractions[a].total_cmp(&fractions[b]))
            .unwrap_or(0);
        counts[largest] += left;
    }
    if n >= 3 {
        for i in 0..3 {
            if fractions[i] > 0.0 && counts[i] == 0 {
                let donor = (0..3).max_by_key(|&j| counts[j]).unwrap_or(0);
                counts[donor] -= 1;
                counts[i] += 1;
            }
        }
    }
    counts
}

fn write_manifest(dir: &Path, manifest: &Manifest) -> Result<(), DataError> {
    let path = dir.join(MANIFEST_FILE);
    let json = serde_json::to_vec_pretty(manifest)
        .map_err(|e| DataError::io("serialize", &path, io::Error::other(e)))?;
    std::fs::write(&path, json).map_err(|e| DataError::io("write", &path, e))
}

/// Swaps the finished data set into place: old one aside, new one in, old one removed.
fn publish(data_dir: &Path, partial: &Path) -> Result<(), DataError> {
    let target = dataset_dir(data_dir);
    let old = data_dir.join(OLD_DIR);
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(|e| DataError::io("remove", &old, e))?;
    }
    if target.exists() {
        std::fs::rename(&target, &old).map_err(|e| DataError::io("move aside", &target, e))?;
    }
    std::fs::rename(partial, &target).map_err(|e| DataError::io("move into place", partial, e))?;
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(|e| DataError::io("remove", &old, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::data::{fixture, manifest_path};

    const FRACTIONS: (f32, f32, f32) = (0.4, 0.3, 0.3);

    fn build_fixture(seed: u64) -> (tempfile::TempDir, Manifest) {
        let dir = tempfile::tempdir().unwrap();
        fixture::write_packages(dir.path());
        let manifest = build(dir.path(), &fixture::vendors(), &[16, 32], seed, FRACTIONS).unwrap();
        (dir, manifest)
    }

    fn ids(m: &Manifest) -> Vec<&str> {
        m.emoji.iter().map(|e| e.id.as_str()).collect()
    }

    #[test]
    fn builds_the_common_base_emoji_at_every_resolution() {
        let (dir, m) = build_fixture(7);
        let data = dir.path();

        // In sort order; FE0F-qualified sequences matched whatever the vendor's file name says.
        assert_eq!(
            ids(&m),
            ["1f600", "1f603", "1f441-200d-1f5e8", "1f44d", "0023-20e3"]
        );
        assert_eq!(m.resolutions, [16, 32, 64]);
        assert_eq!(
            m.vendor_names().collect::<Vec<_>>(),
            ["alpha", "beta", "gamma"]
        );
        assert!(m.emoji.iter().all(|e| e.category != "Component"));

        let reason = |id: &str| {
            m.dropped
                .iter()
                .find(|d| d.id == id)
                .map(|d| d.reason.clone())
        };
        assert!(
            reason("1f431").is_some_and(|r| r.contains("not drawn by beta")),
            "{:?}",
            m.dropped
        );
        assert!(
            reason("1f436").is_some_and(|r| r.contains("gamma")),
            "{:?}",
            m.dropped
        );
        assert_eq!(m.dropped.len(), 2, "{:?}", m.dropped);

        let hash = m.emoji.iter().find(|e| e.id == "0023-20e3").unwrap();
        assert_eq!(hash.unified, "0023-FE0F-20E3");
        assert_eq!(hash.name, "HASH KEY");
        assert_eq!(
            (hash.category.as_str(), hash.subcategory.as_str()),
            ("Symbols", "keycap")
        );

        let vendors = fixture::vendors();
        for (record, vendor) in m.vendors.iter().zip(&vendors) {
            assert_eq!(record.image_license, vendor.image_license);
            assert_eq!(
                record.sha256,
                sha256_file(&vendor.tarball_path(data)).unwrap()
            );
        }

        let mut expected_files: Vec<String> =
            ids(&m).iter().map(|id| format!("{id}.png")).collect();
        expected_files.sort();
        for vendor in ["alpha", "beta", "gamma"] {
            for res in [16u32, 32, 64] {
                // Exactly the kept emoji: no skin-tone variant, no Component, no dropped emoji.
                let folder = dataset_dir(data).join(vendor).join(res.to_string());
                let mut files: Vec<String> = std::fs::read_dir(&folder)
                    .unwrap()
                    .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect();
                files.sort();
                assert_eq!(files, expected_files, "{}", folder.display());
                for id in ids(&m) {
                    let img = image::open(m.image_path(data, vendor, res, id)).unwrap();
                    assert_eq!(
                        (img.width(), img.height()),
                        (res, res),
                        "{vendor} {res} {id}"
                    );
                    assert_eq!(img.color(), image::ColorType::Rgba8);
                }
            }
        }

        for res in [16u32, 32, 64] {
            let alpha = image::open(m.image_path(data, "alpha", res, "1f600"))
                .unwrap()
                .to_rgba8();
            assert_eq!(
                alpha.get_pixel(res / 2, res / 2).0,
                fixture::ALPHA_COLOUR,
                "alpha at {res}"
            );
            assert_eq!(alpha.get_pixel(0, 0).0[3], 0, "transparent corner at {res}");
            let gamma = image::open(m.image_path(data, "gamma", res, "0023-20e3"))
                .unwrap()
                .to_rgba8();
            assert_eq!(
                gamma.get_pixel(res / 2, res / 2).0,
                fixture::GAMMA_COLOUR,
                "gamma at {res}"
            );
        }

        assert_eq!(Manifest::load(data).unwrap(), m);
    }

    #[test]
    fn splits_partition_the_emoji_and_follow_the_seed() {
        let (_a_dir, a) = build_fixture(7);
        let (_b_dir, b) = build_fixture(7);
        assert_eq!(a.emoji, b.emoji);

        let mut in_splits: Vec<&str> = Split::ALL
            .iter()
            .flat_map(|&s| a.split(s).map(|e| e.id.as_str()))
            .collect();
        in_splits.sort();
        let mut all = ids(&a);
        all.sort();
        assert_eq!(in_splits, all);

        // The three smileys make the only category with >= 3 emoji: one in every split.
        for split in Split::ALL {
            assert!(
                a.split(split).any(|e| e.category == "Smileys & Emotion"),
                "no smiley in {split}"
            );
        }
    }

    #[test]
    fn split_assignment_is_stratified_and_seeded() {
        let mut categories = Vec::new();
        for (category, n) in [
            ("faces", 40),
            ("animals", 25),
            ("flags", 3),
            ("pair", 2),
            ("one", 1),
        ] {
            categories.extend(std::iter::repeat_n(category, n));
        }
        let f = [0.8, 0.1, 0.1];
        let a = assign_splits(&categories, 1, f);
        assert_eq!(a.len(), categories.len());
        assert_eq!(a, assign_splits(&categories, 1, f));
        assert_ne!(a, assign_splits(&categories, 2, f));
        for category in ["faces", "animals", "flags"] {
            for split in Split::ALL {
                assert!(
                    categories
                        .iter()
                        .zip(&a)
                        .any(|(c, s)| *c == category && *s == split),
                    "{category} has no {split} item"
                );
            }
        }
        let count = |category: &str, split: Split| {
            categories
                .iter()
                .zip(&a)
                .filter(|(c, s)| **c == category && **s == split)
                .count()
        };
        assert_eq!(
            (
                count("faces", Split::Train),
                count("faces", Split::Val),
                count("faces", Split::Test)
            ),
            (32, 4, 4)
        );

        let no_val = assign_splits(&categories, 1, [0.9, 0.0, 0.1]);
        assert!(!no_val.contains(&Split::Val));
    }

    #[test]
    fn rebuilding_with_the_same_inputs_writes_nothing() {
        let (dir, m) = build_fixture(7);
        let data = dir.path();
        let manifest = manifest_path(data);
        let png = m.image_path(data, "gamma", 16, "1f600");
        let mtime =
            |p: &PathBuf| -> SystemTime { std::fs::metadata(p).unwrap().modified().unwrap() };
        let (manifest_time, png_time) = (mtime(&manifest), mtime(&png));
        std::thread::sleep(Duration::from_millis(20));

        // Same inputs, resolutions given in another order and with 64 spelled out.
        let again = build(data, &fixture::vendors(), &[32, 64, 16, 16], 7, FRACTIONS).unwrap();
        assert_eq!(again, m);
        assert_eq!(mtime(&manifest), manifest_time);
        assert_eq!(mtime(&png), png_time);

        // An image gone: the data set is incomplete and is rebuilt.
        std::fs::remove_file(&png).unwrap();
        let rebuilt = build(data, &fixture::vendors(), &[16, 32], 7, FRACTIONS).unwrap();
        assert_eq!(rebuilt, m);
        assert!(png.is_file());

        // Another seed is another data set.
        let other = build(data, &fixture::vendors(), &[16, 32], 8, FRACTIONS).unwrap();
        assert_eq!(other.seed, 8);
        assert_eq!(Manifest::load(data).unwrap(), other);
        assert!(!data.join(PARTIAL_DIR).exists());
        assert!(!data.join(OLD_DIR).exists());
    }

    #[test]
    fn an_interrupted_build_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        fixture::write_packages(dir.path());
        let stale = dir.path().join(PARTIAL_DIR).join("alpha").join("64");
        std::fs::create_dir_all(&stale).unwrap();
        std::fs::write(stale.join("junk.png"), b"half written").unwrap();

        let m = build(dir.path(), &fixture::vendors(), &[], 7, FRACTIONS).unwrap();
        assert_eq!(m.resolutions, [64]);
        assert!(!dir.path().join(PARTIAL_DIR).exists());
        assert!(!dataset_dir(dir.path()).join("alpha/64/junk.png").exists());
    }

    #[test]
    fn a_missing_package_says_to_fetch() {
        let dir = tempfile::tempdir().unwrap();
        fixture::write_packages(dir.path());
        let vendors = fixture::vendors();
        std::fs::remove_file(vendors[1].tarball_path(dir.path())).unwrap();

        let err = build(dir.path(), &vendors, &[16], 7, FRACTIONS).unwrap_err();
        assert!(matches!(err, DataError::MissingPackage { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains("fixture-beta") && msg.contains("run `ragar data fetch`"),
            "{msg}"
        );
        assert!(!dataset_dir(dir.path()).exists());
    }

    #[test]
    fn a_corrupt_tarball_is_named() {
        let vendors = fixture::vendors();
        let good = fixture::tarballs()
            .into_iter()
            .find(|(name, _)| name == "gamma")
            .unwrap()
            .1;
        for what in ["not gzip", "truncated", "bad crc", "sidecar mismatch"] {
            let dir = tempfile::tempdir().unwrap();
            fixture::write_packages(dir.path());
            let tarball = vendors[2].tarball_path(dir.path());
            match what {
                "not gzip" => std::fs::write(&tarball, b"this is not a gzip file").unwrap(),
                "truncated" => std::fs::write(&tarball, &good[..good.len() / 2]).unwrap(),
                "bad crc" => {
                    // Only the gzip trailer's CRC is damaged: the tar inside still reads.
                    let mut bytes = good.clone();
                    let n = bytes.len();
                    bytes[n - 8] ^= 0xff;
                    std::fs::write(&tarball, bytes).unwrap();
                }
                _ => {
                    let sidecar = crate::data::fetch::sidecar_path(&tarball);
                    std::fs::write(sidecar, format!("{}  x.tgz\n", "0".repeat(64))).unwrap();
                }
            }

            let err = build(dir.path(), &vendors, &[16], 7, FRACTIONS).unwrap_err();
            match &err {
                DataError::Corrupt { path, .. } => assert_eq!(path, &tarball, "{what}"),
                other => panic!("{what}: expected a corrupt-package error, got {other}"),
            }
            let msg = err.to_string();
            assert!(
                msg.contains("fixture-gamma-1.0.0.tgz is corrupt"),
                "{what}: {msg}"
            );
            assert!(!dataset_dir(dir.path()).exists(), "{what}");
            assert!(!dir.path().join(PARTIAL_DIR).exists(), "{what}");
        }
    }

    #[test]
    fn metadata_comes_from_an_emoji_datasource_package() {
        let dir = tempfile::tempdir().unwrap();
        fixture::write_packages(dir.path());
        let svg_only: Vec<Vendor> = fixture::vendors()
            .into_iter()
            .filter(|v| v.name == "gamma")
            .collect();
        let err = build(dir.path(), &svg_only, &[16], 7, FRACTIONS).unwrap_err();
        assert!(matches!(err, DataError::NoMetadata { .. }), "{err}");
    }

    #[test]
    fn bad_inputs_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        fixture::write_packages(dir.path());
        let vendors = fixture::vendors();
        let bad_split = build(dir.path(), &vendors, &[16], 7, (0.5, 0.5, 0.5)).unwrap_err();
        assert!(
            matches!(bad_split, DataError::InvalidInput(_)),
            "{bad_split}"
        );
        let bad_res = build(dir.path(), &vendors, &[0], 7, FRACTIONS).unwrap_err();
        assert!(matches!(bad_res, DataError::InvalidInput(_)), "{bad_res}");
        let twice = [vendors[0].clone(), vendors[0].clone()];
        let dup = build(dir.path(), &twice, &[16], 7, FRACTIONS).unwrap_err();
        assert!(matches!(dup, DataError::InvalidInput(_)), "{dup}");
    }

    #[test]
    fn premultiplied_resize_keeps_edges_clean() {
        // Opaque white square on transparent *black*: a straight-alpha resize would grey the edge.
        let img = RgbaImage::from_fn(64, 64, |x, _| {
            if x < 32 {
                Rgba([255, 255, 255, 255])
            } else {
                Rgba([0, 0, 0, 0])
            }
        });
        let small = resize_rgba(&img, 16);
        for x in 0..16 {
            let p = small.get_pixel(x, 8).0;
            if p[3] > 0 {
                assert_eq!(&p[..3], &[255, 255, 255], "edge pixel {x}: {p:?}");
            }
        }
    }
}
