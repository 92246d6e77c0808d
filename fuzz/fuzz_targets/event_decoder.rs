//! Any bytes as a Kafka message value: the decoder returns an event or a dead-letter reason, never
//! panics, and what it accepts keeps the contract's invariants.
#![no_main]

#[allow(dead_code)]
#[path = "../../src/event.rs"]
mod event;

use std::path::PathBuf;

use libfuzzer_sys::fuzz_target;

use event::{decode, Event, Limits};

const DIM: usize = 4;

fn limits() -> Limits {
    let mut limits = Limits::for_dim(DIM);
    limits.max_payload_bytes = 64 << 10;
    limits.max_image_pixels = 64 * 64;
    // `image.uri` may read the image seeds, and nothing outside them.
    limits.image_roots = vec![PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/seeds/image_decoder"))];
    limits
}

fn embedding_ok(e: &Option<std::sync::Arc<[f32]>>) -> bool {
    e.as_ref().is_none_or(|e| e.len() == DIM && e.iter().all(|v| v.is_finite()))
}

fuzz_target!(|data: &[u8]| {
    let limits = limits();
    match decode(data, 0, &limits) {
        Ok(Event::Item(item)) => {
            assert!(embedding_ok(&item.embedding));
            assert!(item.embedding.is_some() || item.image_png.is_some() || item.text.is_some());
            if let Some(png) = &item.image_png {
                // Accepted images are stored as PNG and decode again within the pixel limit.
                let img = image::load_from_memory_with_format(png, image::ImageFormat::Png)
                    .expect("an accepted image decodes");
                assert!(u64::from(img.width()) * u64::from(img.height()) <= limits.max_image_pixels);
            }
        }
        Ok(Event::Interaction(ev)) => assert!(embedding_ok(&ev.embedding)),
        Ok(Event::Display(ev)) => assert!(!ev.request_id.is_empty()),
        Err(e) => assert!(!e.message.is_empty()),
    }
});
