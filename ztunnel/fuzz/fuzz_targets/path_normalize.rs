//! The waypoint's path normalization. Properties, at every level: no panic; a
//! normalized path normalizes to itself, starts with `/`, has no `.` or `..`
//! segment and no `\`, and no `//` at the levels that merge slashes; a path
//! `is_normalized` says is normal comes back unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ztunnel_core::path_normalization::{check_properties, is_normalized, normalize, Level};

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    for level in [
        Level::None,
        Level::Base,
        Level::MergeSlashes,
        Level::DecodeAndMergeSlashes,
    ] {
        if let Ok(once) = normalize(path, level) {
            // NONE forwards the path as it came: only the others promise a shape.
            if level != Level::None {
                check_properties(path, &once, level);
            } else if is_normalized(path) {
                assert_eq!(once, path, "said normal, but changed at NONE");
            }
        }
    }
});
