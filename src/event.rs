//! Decode and validate: raw Kafka payloads in, typed events out, or a reason for the dead-letter topic.
//!
//! The wire format is `ragar.event.v1` (see `schemas/ragar.event.v1.json`). Decoding is strict:
//! unknown fields, a wrong embedding dimension, non-finite numbers, oversize payloads, images that do
//! not decode or are too large, and ids outside the id alphabet are all rejected with a
//! [`DecodeError`] whose [`DlqKind`] names the rule, so the message can go to the DLQ with its reason
//! and its partition keeps flowing. Nothing here panics on any input.

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine;
use serde::Deserialize;

/// The event schema this worker writes (`ragar demo`, `ragar data simulate`).
pub const EVENT_SCHEMA: &str = "ragar.event.v1";
/// The newer event schema, also read: version 1 plus embeddings as base64 float32.
pub const EVENT_SCHEMA_V2: &str = "ragar.event.v2";
/// Longest id (event, user, item, request) accepted, in bytes.
pub const MAX_ID_LEN: usize = 128;
/// Longest item text accepted, in characters.
pub const MAX_TEXT_LEN: usize = 4096;
/// Longest category accepted, in characters.
pub const MAX_CATEGORY_LEN: usize = 128;
/// Largest number of candidates one display may ask for.
pub const MAX_CANDIDATES: u32 = 16;
/// Largest seed accepted: seeds travel through JSON, whose safe integers end here.
pub const MAX_SEED: u64 = (1 << 53) - 1;

/// A stable seed from the request id (FNV-1a), mixed with the configured seed, within JSON's safe integers.
pub fn derive_seed(request_id: &str, mix: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in request_id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h ^ mix) & MAX_SEED
}

/// What a user did with an item.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    View,
    Click,
    Like,
    Purchase,
    Dislike,
}

impl Action {
    pub const ALL: [Action; 5] = [
        Action::View,
        Action::Click,
        Action::Like,
        Action::Purchase,
        Action::Dislike,
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            Action::View => "view",
            Action::Click => "click",
            Action::Like => "like",
            Action::Purchase => "purchase",
            Action::Dislike => "dislike",
        }
    }

    pub fn parse(s: &str) -> Option<Action> {
        Action::ALL.into_iter().find(|a| a.as_str() == s)
    }

    /// Position in [`Action::ALL`], for per-action tables.
    pub fn index(&self) -> usize {
        *self as usize
    }
}

/// A decoded, validated input event.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Item(ItemEvent),
    Interaction(InteractionEvent),
    Display(DisplayEvent),
}

impl Event {
    pub fn event_id(&self) -> &str {
        match self {
            Event::Item(e) => &e.event_id,
            Event::Interaction(e) => &e.event_id,
            Event::Display(e) => &e.event_id,
        }
    }

    /// The `type` label used in metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Event::Item(_) => "item",
            Event::Interaction(_) => "interaction",
            Event::Display(_) => "display",
        }
    }
}

/// A catalog upsert. At least one of embedding, image and text is present.
#[derive(Debug, Clone, PartialEq)]
pub struct ItemEvent {
    pub event_id: String,
    pub item_id: String,
    pub ts_ms: i64,
    pub embedding: Option<Arc<[f32]>>,
    /// The image as PNG bytes (other formats are re-encoded), already checked to decode.
    pub image_png: Option<Arc<[u8]>>,
    pub text: Option<String>,
    pub category: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct InteractionEvent {
    pub event_id: String,
    pub user_id: String,
    pub item_id: String,
    pub action: Action,
    pub ts_ms: i64,
    /// When absent, the item's stored embedding is used.
    pub embedding: Option<Arc<[f32]>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DisplayEvent {
    pub event_id: String,
    pub request_id: String,
    pub user_id: String,
    /// The reference item to render to the user's preference.
    pub item_id: String,
    pub ts_ms: i64,
    pub candidates: Option<u32>,
    pub seed: Option<u64>,
}

/// Why a message goes to the dead-letter topic. The string forms are the `ragar.error.kind` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DlqKind {
    InvalidUtf8,
    InvalidJson,
    Schema,
    UnknownType,
    EmbeddingDim,
    NonFinite,
    Oversize,
    ImageDecode,
    ImageTooLarge,
    ImageUri,
    UnknownItem,
    NoEncoder,
    Processing,
}

impl DlqKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            DlqKind::InvalidUtf8 => "invalid_utf8",
            DlqKind::InvalidJson => "invalid_json",
            DlqKind::Schema => "schema",
            DlqKind::UnknownType => "unknown_type",
            DlqKind::EmbeddingDim => "embedding_dim",
            DlqKind::NonFinite => "non_finite",
            DlqKind::Oversize => "oversize",
            DlqKind::ImageDecode => "image_decode",
            DlqKind::ImageTooLarge => "image_too_large",
            DlqKind::ImageUri => "image_uri",
            DlqKind::UnknownItem => "unknown_item",
            DlqKind::NoEncoder => "no_encoder",
            DlqKind::Processing => "processing",
        }
    }
}

/// A message that cannot be processed, with the rule it broke.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {}", .kind.as_str(), .message)]
pub struct DecodeError {
    pub kind: DlqKind,
    pub message: String,
}

impl DecodeError {
    pub fn new(kind: DlqKind, message: impl Into<String>) -> Self {
        DecodeError {
            kind,
            message: message.into(),
        }
    }
}

/// The limits decoding enforces; built from the `[limits]` and `[models]` configuration.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Required length of every embedding.
    pub dim: usize,
    pub max_payload_bytes: usize,
    /// Largest width × height of an image.
    pub max_image_pixels: u64,
    /// Directories an `image.uri` may point into; empty means URIs are refused.
    pub image_roots: Vec<PathBuf>,
}

impl Limits {
    pub fn for_dim(dim: usize) -> Self {
        Limits {
            dim,
            max_payload_bytes: 4 << 20,
            max_image_pixels: 4096 * 4096,
            image_roots: Vec::new(),
        }
    }
}

/// The wire form: one flat struct for every type, so serde parses without buffering; the type
/// decides which fields are required in [`RawEvent::validate`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEvent {
    schema: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    event_id: Option<String>,
    ts: Option<i64>,
    item_id: Option<String>,
    user_id: Option<String>,
    request_id: Option<String>,
    action: Option<String>,
    embedding: Option<Embedding>,
    image: Option<RawImage>,
    text: Option<String>,
    category: Option<String>,
    candidates: Option<u32>,
    seed: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawImage {
    base64: Option<String>,
    uri: Option<String>,
}

/// Decodes one message value. `fallback_ts_ms` (the Kafka timestamp, else the receive time) is used
/// when the event carries no `ts`.
pub fn decode(payload: &[u8], fallback_ts_ms: i64, limits: &Limits) -> Result<Event, DecodeError> {
    if payload.len() > limits.max_payload_bytes {
        return Err(DecodeError::new(
            DlqKind::Oversize,
            format!(
                "payload is {} bytes, the limit is {}",
                payload.len(),
                limits.max_payload_bytes
            ),
        ));
    }
    let text = std::str::from_utf8(payload).map_err(|e| {
        DecodeError::new(DlqKind::InvalidUtf8, format!("payload is not UTF-8: {e}"))
    })?;
    let raw: RawEvent = serde_json::from_str(text).map_err(classify_json_error)?;
    raw.validate(fallback_ts_ms, limits)
}

fn classify_json_error(e: serde_json::Error) -> DecodeError {
    use serde_json::error::Category;
    // JSON cannot spell NaN or infinity: a non-finite embedding value arrives as a number beyond
    // f32's range, which the parser refuses.
    if e.to_string().starts_with("number out of range") {
        return DecodeError::new(
            DlqKind::NonFinite,
            format!("a number is not a finite f32: {e}"),
        );
    }
    match e.classify() {
        Category::Data => DecodeError::new(DlqKind::Schema, e.to_string()),
        Category::Syntax | Category::Eof | Category::Io => {
            DecodeError::new(DlqKind::InvalidJson, e.to_string())
        }
    }
}

impl RawEvent {
    fn validate(self, fallback_ts_ms: i64, limits: &Limits) -> Result<Event, DecodeError> {
        match self.schema.as_deref() {
            Some(EVENT_SCHEMA) => {
                if let Some(Embedding { base64: true, .. }) = self.embedding {
                    return Err(DecodeError::new(
                        DlqKind::Schema,
                        format!("`embedding` as base64 needs `{EVENT_SCHEMA_V2}`; `{EVENT_SCHEMA}` takes an array of numbers"),
                    ));
                }
            }
            Some(EVENT_SCHEMA_V2) => {}
            Some(other) => {
                return Err(DecodeError::new(
                    DlqKind::UnknownType,
                    format!("schema `{other}` is not supported (expected `{EVENT_SCHEMA}` or `{EVENT_SCHEMA_V2}`)"),
                ))
            }
            None => return Err(missing("schema")),
        }
        let kind = self.kind.clone().ok_or_else(|| missing("type"))?;
        let event_id = id_field("event_id", self.event_id.clone())?;
        let ts_ms = match self.ts {
            Some(ts) if ts < 0 => {
                return Err(DecodeError::new(DlqKind::Schema, "`ts` must be >= 0"))
            }
            Some(ts) => ts,
            None => fallback_ts_ms,
        };
        let forbid = |name: &str, present: bool| -> Result<(), DecodeError> {
            if present {
                Err(DecodeError::new(
                    DlqKind::Schema,
                    format!("field `{name}` is not allowed on a `{kind}` event"),
                ))
            } else {
                Ok(())
            }
        };
        match kind.as_str() {
            "item" => {
                forbid("user_id", self.user_id.is_some())?;
                forbid("request_id", self.request_id.is_some())?;
                forbid("action", self.action.is_some())?;
                forbid("candidates", self.candidates.is_some())?;
                forbid("seed", self.seed.is_some())?;
                let item_id = id_field("item_id", self.item_id)?;
                if self.embedding.is_none() && self.image.is_none() && self.text.is_none() {
                    return Err(DecodeError::new(
                        DlqKind::Schema,
                        "an item needs at least one of `embedding`, `image`, `text`",
                    ));
                }
                let embedding = self
                    .embedding
                    .map(|e| embedding_field(e.values, limits))
                    .transpose()?;
                let image_png = self.image.map(|i| image_field(i, limits)).transpose()?;
                let text = self
                    .text
                    .map(|t| bounded("text", t, MAX_TEXT_LEN))
                    .transpose()?;
                let category = self
                    .category
                    .map(|c| bounded("category", c, MAX_CATEGORY_LEN))
                    .transpose()?;
                Ok(Event::Item(ItemEvent {
                    event_id,
                    item_id,
                    ts_ms,
                    embedding,
                    image_png,
                    text,
                    category,
                }))
            }
            "interaction" => {
                forbid("request_id", self.request_id.is_some())?;
                forbid("image", self.image.is_some())?;
                forbid("text", self.text.is_some())?;
                forbid("category", self.category.is_some())?;
                forbid("candidates", self.candidates.is_some())?;
                forbid("seed", self.seed.is_some())?;
                let user_id = id_field("user_id", self.user_id)?;
                let item_id = id_field("item_id", self.item_id)?;
                let action_str = self.action.ok_or_else(|| missing("action"))?;
                let action = Action::parse(&action_str).ok_or_else(|| {
                    DecodeError::new(
                        DlqKind::Schema,
                        format!("`action` must be one of view, click, like, purchase, dislike; got `{action_str}`"),
                    )
                })?;
                let embedding = self
                    .embedding
                    .map(|e| embedding_field(e.values, limits))
                    .transpose()?;
                Ok(Event::Interaction(InteractionEvent {
                    event_id,
                    user_id,
                    item_id,
                    action,
                    ts_ms,
                    embedding,
                }))
            }
            "display" => {
                forbid("action", self.action.is_some())?;
                forbid("embedding", self.embedding.is_some())?;
                forbid("image", self.image.is_some())?;
                forbid("text", self.text.is_some())?;
                forbid("category", self.category.is_some())?;
                let request_id = id_field("request_id", self.request_id)?;
                let user_id = id_field("user_id", self.user_id)?;
                let item_id = id_field("item_id", self.item_id)?;
                if let Some(n) = self.candidates {
                    if n == 0 || n > MAX_CANDIDATES {
                        return Err(DecodeError::new(
                            DlqKind::Schema,
                            format!("`candidates` must be in 1..={MAX_CANDIDATES}; got {n}"),
                        ));
                    }
                }
                if let Some(seed) = self.seed {
                    if seed > MAX_SEED {
                        return Err(DecodeError::new(
                            DlqKind::Schema,
                            format!("`seed` must be <= {MAX_SEED}"),
                        ));
                    }
                }
                Ok(Event::Display(DisplayEvent {
                    event_id,
                    request_id,
                    user_id,
                    item_id,
                    ts_ms,
                    candidates: self.candidates,
                    seed: self.seed,
                }))
            }
            other => Err(DecodeError::new(
                DlqKind::UnknownType,
                format!("unknown event type `{other}` (expected item, interaction or display)"),
            )),
        }
    }
}

fn missing(name: &str) -> DecodeError {
    DecodeError::new(DlqKind::Schema, format!("missing required field `{name}`"))
}

/// Checks an id against the id alphabet `[A-Za-z0-9][A-Za-z0-9._:@/+=-]{0,127}`. Keeping ids to this
/// alphabet keeps them safe in Redis keys, Kafka headers and LanceDB filter expressions.
pub fn check_id(name: &str, id: &str) -> Result<(), DecodeError> {
    let bad = |why: &str| DecodeError::new(DlqKind::Schema, format!("`{name}` {why}"));
    if id.is_empty() {
        return Err(bad("is empty"));
    }
    if id.len() > MAX_ID_LEN {
        return Err(bad(&format!(
            "is {} bytes long, the limit is {MAX_ID_LEN}",
            id.len()
        )));
    }
    let ok_first = id.as_bytes()[0].is_ascii_alphanumeric();
    let ok_rest = id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._:@/+=-".contains(&b));
    if !ok_first || !ok_rest {
        return Err(bad("must match [A-Za-z0-9][A-Za-z0-9._:@/+=-]*"));
    }
    Ok(())
}

fn id_field(name: &str, value: Option<String>) -> Result<String, DecodeError> {
    let id = value.ok_or_else(|| missing(name))?;
    check_id(name, &id)?;
    Ok(id)
}

/// Bounds a string by characters, as the schema's `maxLength` does.
fn bounded(name: &str, value: String, max: usize) -> Result<String, DecodeError> {
    // Bytes bound characters from above: only count when it could matter.
    if value.len() > max && value.chars().count() > max {
        return Err(DecodeError::new(
            DlqKind::Oversize,
            format!(
                "`{name}` is {} characters long, the limit is {max}",
                value.chars().count()
            ),
        ));
    }
    Ok(value)
}

/// The `embedding`, in either of its two wire forms:
/// - an array, read in the parser's single pass over the payload: each element is a JSON number
///   (anything else is a schema error) converted to f32. Keeping the array as raw text and reading
///   it afterwards scanned it twice, which cost more than the conversion saved;
/// - from `ragar.event.v2` on, a base64 string (RFC 4648, standard alphabet, padded) of
///   little-endian IEEE-754 float32 values, as embedding APIs offer it (OpenAI's `encoding_format: "base64"`). It carries the
///   exact values in 4/3 of their size and decodes in a fraction of the time that reading decimal
///   numbers takes, which dominates ingest otherwise (`benches/ingest.rs`).
struct Embedding {
    values: Arc<[f32]>,
    /// Given as base64 (`ragar.event.v2` only).
    base64: bool,
}

impl<'de> Deserialize<'de> for Embedding {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Numbers;
        impl<'de> serde::de::Visitor<'de> for Numbers {
            type Value = Embedding;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(
                    "`embedding` as an array of numbers or a base64 string of float32 values",
                )
            }
            /// Decoded with SIMD straight into the values' memory: the scalar decoder into a
            /// byte buffer, then copied into floats, was 7% of the worker's ingest CPU.
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Embedding, E> {
                let b64 = base64_simd::STANDARD;
                let invalid = |e| E::custom(format!("`embedding` is not valid base64: {e}"));
                let len = b64.decoded_length(v.as_bytes()).map_err(invalid)?;
                if len % 4 != 0 {
                    return Err(E::custom(format!(
                        "`embedding` decodes to {len} bytes, not a whole number of float32 values"
                    )));
                }
                let values = le_f32s(len / 4, |out| {
                    b64.decode(v.as_bytes(), base64_simd::Out::from_slice(out))
                        .map(|_| ())
                })
                .map_err(invalid)?;
                Ok(Embedding {
                    values,
                    base64: true,
                })
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Embedding, A::Error> {
                let mut values = Vec::with_capacity(EMBEDDING_CAPACITY);
                while let Some(v) = seq.next_element::<f32>()? {
                    values.push(v);
                }
                Ok(Embedding {
                    values: values.into(),
                    base64: false,
                })
            }
        }
        d.deserialize_any(Numbers)
    }
}

/// `n` f32s whose little-endian bytes `fill` writes, in a shared slice allocated once at its final
/// size and filled in place (no intermediate buffer to copy from).
fn le_f32s<E>(n: usize, fill: impl FnOnce(&mut [u8]) -> Result<(), E>) -> Result<Arc<[f32]>, E> {
    let mut values: Arc<[f32]> = std::iter::repeat_n(0f32, n).collect();
    let out = Arc::get_mut(&mut values).expect("a new Arc is unique");
    fill(bytemuck::cast_slice_mut(out))?;
    if cfg!(target_endian = "big") {
        for x in out.iter_mut() {
            *x = f32::from_bits(u32::from_le(x.to_bits()));
        }
    }
    Ok(values)
}

/// Little-endian f32s (a trailing partial value is ignored), by one copy of the bytes: decoding
/// into a Vec and then into the shared slice copied and allocated twice (`benches/preference.rs`).
pub fn f32s_from_le_bytes(b: &[u8]) -> Arc<[f32]> {
    let Ok(values) = le_f32s::<std::convert::Infallible>(b.len() / 4, |out| {
        out.copy_from_slice(&b[..out.len()]);
        Ok(())
    });
    values
}

/// Values reserved for an embedding before its length is known (typical dimensions fit).
const EMBEDDING_CAPACITY: usize = 1024;

fn embedding_field(values: Arc<[f32]>, limits: &Limits) -> Result<Arc<[f32]>, DecodeError> {
    if values.len() != limits.dim {
        return Err(DecodeError::new(
            DlqKind::EmbeddingDim,
            format!(
                "`embedding` has {} values, this worker's dimension is {}",
                values.len(),
                limits.dim
            ),
        ));
    }
    // JSON cannot spell NaN or infinity; a value beyond f32's range reads as infinite.
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(DecodeError::new(
            DlqKind::NonFinite,
            format!("`embedding[{i}]` is not a finite f32"),
        ));
    }
    Ok(values)
}

fn image_field(raw: RawImage, limits: &Limits) -> Result<Arc<[u8]>, DecodeError> {
    let bytes = match (raw.base64, raw.uri) {
        (Some(b64), None) => {
            // base64 inflates by 4/3: a string longer than that of the payload limit cannot be in range.
            base64::engine::general_purpose::STANDARD
                .decode(b64.as_bytes())
                .map_err(|e| {
                    DecodeError::new(
                        DlqKind::ImageDecode,
                        format!("`image.base64` is not base64: {e}"),
                    )
                })?
        }
        (None, Some(uri)) => read_image_uri(&uri, limits)?,
        _ => {
            return Err(DecodeError::new(
                DlqKind::Schema,
                "`image` needs exactly one of `base64` and `uri`",
            ));
        }
    };
    normalize_image(&bytes, limits.max_image_pixels)
}

/// Reads an `image.uri` (`file://` or a plain path), only from inside a configured root.
fn read_image_uri(uri: &str, limits: &Limits) -> Result<Vec<u8>, DecodeError> {
    let deny = |why: String| DecodeError::new(DlqKind::ImageUri, why);
    let path = match uri.strip_prefix("file://") {
        Some(p) => PathBuf::from(p),
        None if uri.contains("://") => {
            return Err(deny(format!("`image.uri` scheme is not allowed: {uri}")))
        }
        None => PathBuf::from(uri),
    };
    if limits.image_roots.is_empty() {
        return Err(deny(
            "`image.uri` is not allowed: no limits.image_roots are configured".into(),
        ));
    }
    let real = path
        .canonicalize()
        .map_err(|e| deny(format!("`image.uri` {uri}: {e}")))?;
    if !limits.image_roots.iter().any(|root| within(&real, root)) {
        return Err(deny(format!(
            "`image.uri` {uri} is outside limits.image_roots"
        )));
    }
    let meta = std::fs::metadata(&real).map_err(|e| deny(format!("`image.uri` {uri}: {e}")))?;
    if meta.len() > limits.max_payload_bytes as u64 {
        return Err(DecodeError::new(
            DlqKind::Oversize,
            format!(
                "`image.uri` {uri} is {} bytes, the limit is {}",
                meta.len(),
                limits.max_payload_bytes
            ),
        ));
    }
    std::fs::read(&real).map_err(|e| deny(format!("`image.uri` {uri}: {e}")))
}

fn within(path: &Path, root: &Path) -> bool {
    match root.canonicalize() {
        Ok(root) => path.starts_with(root),
        Err(_) => false,
    }
}

/// Checks that `bytes` is a PNG or JPEG within the pixel limit (read from the header before any
/// pixel is decoded, so a decompression bomb is refused cheaply) and returns PNG bytes.
pub fn normalize_image(bytes: &[u8], max_pixels: u64) -> Result<Arc<[u8]>, DecodeError> {
    let reader = image::ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| DecodeError::new(DlqKind::ImageDecode, format!("image: {e}")))?;
    let format = reader.format();
    if !matches!(
        format,
        Some(image::ImageFormat::Png) | Some(image::ImageFormat::Jpeg)
    ) {
        return Err(DecodeError::new(
            DlqKind::ImageDecode,
            "image is neither PNG nor JPEG",
        ));
    }
    let (w, h) = reader
        .into_dimensions()
        .map_err(|e| DecodeError::new(DlqKind::ImageDecode, format!("image header: {e}")))?;
    let pixels = u64::from(w) * u64::from(h);
    if pixels == 0 || pixels > max_pixels {
        return Err(DecodeError::new(
            DlqKind::ImageTooLarge,
            format!("image is {w}x{h} ({pixels} pixels), the limit is {max_pixels} pixels"),
        ));
    }
    let mut reader = image::ImageReader::new(Cursor::new(bytes));
    reader.set_format(format.expect("format checked above"));
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(w);
    limits.max_image_height = Some(h);
    limits.max_alloc = Some(pixels.saturating_mul(8).max(1 << 20));
    reader.limits(limits);
    let decoded = reader.decode().map_err(|e| {
        DecodeError::new(DlqKind::ImageDecode, format!("image does not decode: {e}"))
    })?;
    if format == Some(image::ImageFormat::Png) {
        return Ok(bytes.into());
    }
    let mut png = Vec::new();
    decoded
        .write_to(&mut Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(|e| DecodeError::new(DlqKind::ImageDecode, format!("re-encoding to PNG: {e}")))?;
    Ok(png.into())
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;

    #[test]
    fn derived_seeds_are_stable_and_bounded() {
        assert_eq!(derive_seed("r-1", 0), derive_seed("r-1", 0));
        assert_ne!(derive_seed("r-1", 0), derive_seed("r-2", 0));
        assert_ne!(derive_seed("r-1", 0), derive_seed("r-1", 1));
        assert!(derive_seed("anything", u64::MAX) <= MAX_SEED);
    }

    fn limits() -> Limits {
        Limits::for_dim(4)
    }

    fn png(w: u32, h: u32) -> Vec<u8> {
        let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 7]));
        let mut out = Vec::new();
        image::DynamicImage::ImageRgb8(img)
            .write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png)
            .unwrap();
        out
    }

    fn decode_str(s: &str) -> Result<Event, DecodeError> {
        decode(s.as_bytes(), 1000, &limits())
    }

    fn kind_of(s: &str) -> DlqKind {
        decode_str(s).unwrap_err().kind
    }

    #[test]
    fn embedding_odd_forms() {
        let escaped = r#"{"schema":"ragar.event.v1","type":"interaction","event_id":"e","user_id":"u","item_id":"i","action":"like","embe\u0064ding":[1,2,3,4]}"#;
        match decode_str(escaped).unwrap() {
            Event::Interaction(ev) => assert_eq!(&ev.embedding.unwrap()[..], &[1.0, 2.0, 3.0, 4.0]),
            other => panic!("{other:?}"),
        }
        let wrong = r#"{"schema":"ragar.event.v1","type":"interaction","event_id":"e","user_id":"u","item_id":"i","action":"like","embedding":"1,2"}"#;
        let e = decode_str(wrong).unwrap_err();
        assert_eq!(e.kind, DlqKind::Schema, "{e:?}");
        let huge = r#"{"schema":"ragar.event.v1","type":"interaction","event_id":"e","user_id":"u","item_id":"i","action":"like","embedding":[1,2,3,1e400]}"#;
        assert_eq!(decode_str(huge).unwrap_err().kind, DlqKind::NonFinite);
        let null = r#"{"schema":"ragar.event.v1","type":"interaction","event_id":"e","user_id":"u","item_id":"i","action":"like","embedding":null}"#;
        match decode_str(null).unwrap() {
            Event::Interaction(ev) => assert!(ev.embedding.is_none()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn embedding_arrays_are_read_exactly_and_strictly() {
        let with = |array: &str| {
            decode_str(&format!(
                r#"{{"schema":"ragar.event.v1","type":"interaction","event_id":"e","user_id":"u","item_id":"i","action":"like","embedding":{array}}}"#
            ))
        };
        // Whitespace anywhere JSON allows it; exponents, signs, integers.
        match with(" [ -0.5 ,\n1e-3,\t2E+1 , 0 ] ").unwrap() {
            Event::Interaction(ev) => {
                assert_eq!(&ev.embedding.unwrap()[..], &[-0.5, 1e-3, 20.0, 0.0])
            }
            other => panic!("{other:?}"),
        }
        // Every value is the f32 nearest to its decimal form, as serde's own parser gives it.
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for _ in 0..200 {
            let v: Vec<f32> = (0..4)
                .map(|_| rng.random_range(-2.0f32..2.0) * 10f32.powi(rng.random_range(-8..8)))
                .collect();
            let text = serde_json::to_string(&v).unwrap();
            let expect: Vec<f32> = serde_json::from_str(&text).unwrap();
            match with(&text).unwrap() {
                Event::Interaction(ev) => {
                    assert_eq!(&ev.embedding.unwrap()[..], &expect[..], "{text}")
                }
                other => panic!("{other:?}"),
            }
        }
        for bad in [
            r#"[1,2,"3",4]"#,
            "[1,2,[3],4]",
            "[1,2,null,4]",
            "[1,2,true,4]",
            r#"{"a":1}"#,
            "4",
        ] {
            assert_eq!(with(bad).unwrap_err().kind, DlqKind::Schema, "{bad}");
        }
        for dim in ["[]", "[1,2,3]", "[1,2,3,4,5]"] {
            assert_eq!(with(dim).unwrap_err().kind, DlqKind::EmbeddingDim, "{dim}");
        }
        assert_eq!(with("[1,2,3,1e39]").unwrap_err().kind, DlqKind::NonFinite);
        assert_eq!(with("[1,2,3,-1e39]").unwrap_err().kind, DlqKind::NonFinite);
        assert_eq!(with("[1,2,3,").unwrap_err().kind, DlqKind::InvalidJson);
    }

    #[test]
    fn embeddings_may_come_as_base64_float32_from_v2_on() {
        let with = |value: &str| {
            decode_str(&format!(
                r#"{{"schema":"ragar.event.v2","type":"interaction","event_id":"e","user_id":"u","item_id":"i","action":"like","embedding":{value}}}"#
            ))
        };
        // [0.5, -0.25, 0.75, 1.0] as little-endian float32, exactly as the array gives them.
        let b64 = r#""AAAAPwAAgL4AAEA/AACAPw==""#;
        for form in [
            b64,
            r#""AAAAPwAAgL4AAEA/AACAPw\u003d\u003d""#,
            "[0.5,-0.25,0.75,1]",
        ] {
            match with(form).unwrap() {
                Event::Interaction(ev) => {
                    assert_eq!(
                        &ev.embedding.unwrap()[..],
                        &[0.5, -0.25, 0.75, 1.0],
                        "{form}"
                    )
                }
                other => panic!("{other:?}"),
            }
        }
        // A NaN is carried bit for bit, and refused.
        assert_eq!(
            with(r#""AAAAPwAAgL4AAMB/AACAPw==""#).unwrap_err().kind,
            DlqKind::NonFinite
        );
        // Three values where the worker reads four.
        assert_eq!(
            with(r#""AAAAPwAAgL4AAIA/""#).unwrap_err().kind,
            DlqKind::EmbeddingDim
        );
        for bad in [
            r#""AAAAPwAAgL4AAEA/AACAPwA=""#, // 17 bytes: not whole float32 values
            r#""AAAAPwAAgL4AAEA/AACAPw""#,   // padding missing
            r#""AAAAPwAAgL4AAEA_AACAPw==""#, // URL-safe alphabet
            r#""AAAA PwAAgL4AAEA/AACAPw==""#, // whitespace inside
            r#""AAAAPwAAgL4AAEA/AACAPx==""#, // bits set past the last byte (not canonical)
            r#""""#,                         // nothing
        ] {
            let e = with(bad).unwrap_err();
            assert!(
                matches!(e.kind, DlqKind::Schema | DlqKind::EmbeddingDim),
                "{bad}: {e:?}"
            );
        }
        assert_eq!(
            with(r#""AAAAPwAAgL4AAEA/AACAPwA=""#).unwrap_err().kind,
            DlqKind::Schema
        );
        assert!(with(r#""AAAAPwAAgL4AAEA_AACAPw==""#)
            .unwrap_err()
            .message
            .contains("not valid base64"));
        // Version 1 takes arrays only.
        let v1 = r#"{"schema":"ragar.event.v1","type":"interaction","event_id":"e","user_id":"u","item_id":"i","action":"like","embedding":"AAAAPwAAgL4AAEA/AACAPw=="}"#;
        let e = decode_str(v1).unwrap_err();
        assert_eq!(e.kind, DlqKind::Schema);
        assert!(e.message.contains("ragar.event.v2"), "{e:?}");
    }

    #[test]
    fn decodes_each_type() {
        let item = decode_str(
            r#"{"schema":"ragar.event.v1","type":"item","event_id":"e1","item_id":"i1","embedding":[1,0,0,0],"text":"cat","category":"animals"}"#,
        )
        .unwrap();
        assert!(
            matches!(item, Event::Item(ref i) if i.item_id == "i1" && i.ts_ms == 1000 && i.text.as_deref() == Some("cat"))
        );
        let inter = decode_str(
            r#"{"schema":"ragar.event.v1","type":"interaction","event_id":"e2","user_id":"u1","item_id":"i1","action":"like","ts":5}"#,
        )
        .unwrap();
        assert_eq!(
            inter,
            Event::Interaction(InteractionEvent {
                event_id: "e2".into(),
                user_id: "u1".into(),
                item_id: "i1".into(),
                action: Action::Like,
                ts_ms: 5,
                embedding: None
            })
        );
        let disp = decode_str(
            r#"{"schema":"ragar.event.v1","type":"display","event_id":"e3","request_id":"r1","user_id":"u1","item_id":"i1","candidates":3,"seed":9}"#,
        )
        .unwrap();
        assert!(
            matches!(disp, Event::Display(ref d) if d.candidates == Some(3) && d.seed == Some(9))
        );
    }

    #[test]
    fn rejects_each_rule_with_its_kind() {
        assert_eq!(
            decode(&[0xff, 0xfe], 0, &limits()).unwrap_err().kind,
            DlqKind::InvalidUtf8
        );
        assert_eq!(kind_of("{not json"), DlqKind::InvalidJson);
        assert_eq!(kind_of(""), DlqKind::InvalidJson);
        assert_eq!(
            kind_of(
                r#"{"schema":"ragar.event.v1","type":"item","event_id":"e","item_id":"i","text":"t","extra":1}"#
            ),
            DlqKind::Schema
        );
        assert_eq!(
            kind_of(
                r#"{"schema":"ragar.event.v3","type":"item","event_id":"e","item_id":"i","text":"t"}"#
            ),
            DlqKind::UnknownType
        );
        assert_eq!(
            kind_of(r#"{"schema":"ragar.event.v1","type":"teleport","event_id":"e"}"#),
            DlqKind::UnknownType
        );
        assert_eq!(
            kind_of(
                r#"{"schema":"ragar.event.v1","type":"interaction","event_id":"e","user_id":"u","item_id":"i","action":"stare"}"#
            ),
            DlqKind::Schema
        );
        assert_eq!(
            kind_of(
                r#"{"schema":"ragar.event.v1","type":"interaction","event_id":"e","user_id":"u","item_id":"i","action":"like","embedding":[1,2,3]}"#
            ),
            DlqKind::EmbeddingDim
        );
        assert_eq!(
            kind_of(
                r#"{"schema":"ragar.event.v1","type":"interaction","event_id":"e","user_id":"u","item_id":"i","action":"like","embedding":[1,2,3,1e39]}"#
            ),
            DlqKind::NonFinite
        );
        assert_eq!(
            kind_of(
                r#"{"schema":"ragar.event.v1","type":"display","event_id":"e","request_id":"r","user_id":"u","item_id":"i","candidates":0}"#
            ),
            DlqKind::Schema
        );
        assert_eq!(
            kind_of(
                r#"{"schema":"ragar.event.v1","type":"display","event_id":"e","request_id":"r","user_id":"u 1","item_id":"i"}"#
            ),
            DlqKind::Schema
        );
        assert_eq!(
            kind_of(
                r#"{"schema":"ragar.event.v1","type":"display","event_id":"e","user_id":"u","item_id":"i"}"#
            ),
            DlqKind::Schema
        );
        assert_eq!(
            kind_of(r#"{"schema":"ragar.event.v1","type":"item","event_id":"e","item_id":"i"}"#),
            DlqKind::Schema
        );
        assert_eq!(
            kind_of(
                r#"{"schema":"ragar.event.v1","type":"item","event_id":"e","item_id":"i","image":{"base64":"%%%"}}"#
            ),
            DlqKind::ImageDecode
        );
        assert_eq!(
            kind_of(
                r#"{"schema":"ragar.event.v1","type":"item","event_id":"e","item_id":"i","image":{"base64":"aGVsbG8="}}"#
            ),
            DlqKind::ImageDecode
        );
        assert_eq!(
            kind_of(
                r#"{"schema":"ragar.event.v1","type":"item","event_id":"e","item_id":"i","image":{"uri":"http://example.com/a.png"}}"#
            ),
            DlqKind::ImageUri
        );
        assert_eq!(
            kind_of(
                r#"{"schema":"ragar.event.v1","type":"item","event_id":"e","item_id":"i","image":{"uri":"/etc/passwd"}}"#
            ),
            DlqKind::ImageUri
        );
        let big = format!(
            r#"{{"schema":"ragar.event.v1","type":"item","event_id":"e","item_id":"i","text":"{}"}}"#,
            "x".repeat(5000)
        );
        assert_eq!(kind_of(&big), DlqKind::Oversize);
        // The limit counts characters: 4096 two-byte characters are fine.
        let wide = format!(
            r#"{{"schema":"ragar.event.v1","type":"item","event_id":"e","item_id":"i","text":"{}"}}"#,
            "é".repeat(4096)
        );
        assert!(decode_str(&wide).is_ok());
        let small = Limits {
            max_payload_bytes: 10,
            ..limits()
        };
        assert_eq!(
            decode(b"{\"schema\":\"x\"}", 0, &small).unwrap_err().kind,
            DlqKind::Oversize
        );
    }

    #[test]
    fn images_are_checked_and_normalized_to_png() {
        let b64 = base64::engine::general_purpose::STANDARD.encode(png(3, 2));
        let ev = decode_str(&format!(
            r#"{{"schema":"ragar.event.v1","type":"item","event_id":"e","item_id":"i","image":{{"base64":"{b64}"}}}}"#
        ))
        .unwrap();
        let Event::Item(item) = ev else {
            panic!("not an item")
        };
        let img = image::load_from_memory(item.image_png.as_ref().unwrap()).unwrap();
        assert_eq!((img.width(), img.height()), (3, 2));

        // Too many pixels is refused from the header alone.
        assert_eq!(
            normalize_image(&png(64, 64), 100).unwrap_err().kind,
            DlqKind::ImageTooLarge
        );
        // A truncated PNG has a valid header but does not decode.
        let full = png(32, 32);
        assert_eq!(
            normalize_image(&full[..full.len() - 20], 1 << 20)
                .unwrap_err()
                .kind,
            DlqKind::ImageDecode
        );
    }

    #[test]
    fn image_uri_is_confined_to_roots() {
        let dir = tempfile::tempdir().unwrap();
        let inside = dir.path().join("a.png");
        std::fs::write(&inside, png(2, 2)).unwrap();
        let lim = Limits {
            image_roots: vec![dir.path().to_path_buf()],
            ..limits()
        };
        let ok = format!(
            r#"{{"schema":"ragar.event.v1","type":"item","event_id":"e","item_id":"i","image":{{"uri":"file://{}"}}}}"#,
            inside.display()
        );
        assert!(decode(ok.as_bytes(), 0, &lim).is_ok());
        let escape = format!(
            r#"{{"schema":"ragar.event.v1","type":"item","event_id":"e","item_id":"i","image":{{"uri":"{}/../../etc/passwd"}}}}"#,
            dir.path().display()
        );
        assert_eq!(
            decode(escape.as_bytes(), 0, &lim).unwrap_err().kind,
            DlqKind::ImageUri
        );
    }

    #[test]
    fn schema_examples_decode() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/schemas");
        let examples: Vec<serde_json::Value> = ["ragar.event.v1.json", "ragar.event.v2.json"]
            .iter()
            .flat_map(|file| {
                let text = std::fs::read_to_string(format!("{dir}/{file}")).unwrap();
                let schema: serde_json::Value = serde_json::from_str(&text).unwrap();
                schema["examples"].as_array().unwrap().clone()
            })
            .collect();
        assert!(examples.iter().any(|ex| ex["embedding"].is_string()));
        for ex in &examples {
            if ex["image"]["uri"].is_string() {
                // Needs a file under a configured root: covered by image_uri_is_confined_to_roots.
                continue;
            }
            let bytes = serde_json::to_vec(ex).unwrap();
            if let Err(e) = decode(&bytes, 0, &limits()) {
                panic!("example {ex} does not decode: {e}");
            }
        }
    }

    #[test]
    fn ids_follow_the_alphabet() {
        assert!(check_id("x", "user-1@example.com").is_ok());
        assert!(check_id("x", "").is_err());
        assert!(check_id("x", "-lead").is_err());
        assert!(check_id("x", "it's").is_err());
        assert!(check_id("x", &"a".repeat(129)).is_err());
    }
}
