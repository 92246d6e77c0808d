//! Any bytes as an image: decompression bombs, huge dimensions and truncated files are refused
//! with a reason before anything large is allocated; what is accepted is a PNG within the limit.
#![no_main]

#[allow(dead_code)]
#[path = "../../src/event.rs"]
mod event;

use libfuzzer_sys::fuzz_target;

const MAX_PIXELS: u64 = 256 * 256;

fuzz_target!(|data: &[u8]| {
    match event::normalize_image(data, MAX_PIXELS) {
        Ok(png) => {
            let img = image::load_from_memory_with_format(&png, image::ImageFormat::Png)
                .expect("the normalized image is a PNG that decodes");
            assert!(u64::from(img.width()) * u64::from(img.height()) <= MAX_PIXELS);
        }
        Err(e) => assert!(!e.message.is_empty()),
    }
});
