//! HTTP path normalization at the waypoint, before policy matches a path (Istio's
//! MeshConfig `pathNormalization`). Policy judges the normalized path and the
//! waypoint forwards that same path, so the application sees what policy saw.
//!
//! Pure and allocation-light, so a fuzz target can call [`normalize`] directly.

use std::fmt;

/// How far paths are normalized (Istio's `pathNormalization.normalization`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Level {
    /// Paths are matched and forwarded as they arrive (NUL is still refused).
    None,
    /// RFC 3986: percent-encoded unreserved characters decoded, `\` → `/`,
    /// dot segments removed; encoded `/` and `\` refused.
    Base,
    /// BASE, and runs of `/` merged into one: the default (Istio's security best
    /// practices recommend it over Istio's own default, BASE).
    #[default]
    MergeSlashes,
    /// MERGE_SLASHES, with `%2F` and `%5C` decoded to `/` (and `\` → `/`) first
    /// instead of refused.
    DecodeAndMergeSlashes,
}

impl Level {
    /// MeshConfig's names; `DEFAULT` (and unset) is this mesh's default, MERGE_SLASHES.
    pub fn parse(name: &str) -> Result<Self, String> {
        Ok(match name {
            "DEFAULT" => Self::default(),
            "NONE" => Self::None,
            "BASE" => Self::Base,
            "MERGE_SLASHES" => Self::MergeSlashes,
            "DECODE_AND_MERGE_SLASHES" => Self::DecodeAndMergeSlashes,
            other => {
                return Err(format!(
                "{other:?} is not DEFAULT, NONE, BASE, MERGE_SLASHES or DECODE_AND_MERGE_SLASHES"
            ))
            }
        })
    }

    fn merges(self) -> bool {
        matches!(self, Self::MergeSlashes | Self::DecodeAndMergeSlashes)
    }
}

/// A path that cannot be normalized safely: the request is refused (400).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathError {
    /// Not origin-form: does not start with `/` (and is not `*`).
    NotAbsolute,
    /// `%` not followed by two hex digits.
    BadEscape,
    /// `%2F` or `%5C`: an application may decode it into a separator policy never saw.
    EncodedSeparator,
    /// A NUL byte, raw or `%00`.
    Nul,
}

impl fmt::Display for PathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::NotAbsolute => "the path does not start with /",
            Self::BadEscape => "a % is not followed by two hex digits",
            Self::EncodedSeparator => "an encoded / or \\ (%2F, %5C) in the path",
            Self::Nul => "a NUL in the path",
        })
    }
}

impl std::error::Error for PathError {}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// Normalizes `path` (without the query string) at `level`.
///
/// At every level but NONE the result starts with `/`, has no `.` or `..`
/// segments, no `\`, no percent-encoded unreserved characters (other escapes are
/// upper-cased), and normalizing it again changes nothing; with MERGE_SLASHES and
/// DECODE_AND_MERGE_SLASHES it has no `//`.
/// Whether `path` is one that [`normalize`] leaves as it is at every level: no
/// `%`, `\`, NUL, `//` or `/.` in it, and absolute. Cheap and conservative (a path
/// it says no to may still be normal): it spares most requests the work.
pub fn is_normalized(path: &str) -> bool {
    path.starts_with('/')
        && !path.bytes().any(|b| matches!(b, b'%' | b'\\' | 0))
        && !path.contains("//")
        && !path.contains("/.")
}

pub fn normalize(path: &str, level: Level) -> Result<String, PathError> {
    if path.as_bytes().contains(&0) {
        return Err(PathError::Nul);
    }
    if level == Level::None {
        // Still no smuggled NUL for the application.
        if path.to_ascii_lowercase().contains("%00") {
            return Err(PathError::Nul);
        }
        return Ok(path.to_owned());
    }
    if path == "*" {
        return Ok(path.to_owned());
    }
    if !path.starts_with('/') && !path.starts_with('\\') {
        return Err(PathError::NotAbsolute);
    }
    let decoded = decode(path, level)?;
    let merged = if level.merges() {
        merge_slashes(&decoded)
    } else {
        decoded
    };
    let mut out = remove_dot_segments(&merged);
    if level.merges() {
        // Removing dots never makes `//` from a merged path; kept for certainty.
        out = merge_slashes(&out);
    }
    Ok(out)
}

/// Percent-decoding of unreserved characters (and separators when asked), `\` → `/`.
fn decode(path: &str, level: Level) -> Result<String, PathError> {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let (Some(hi), Some(lo)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            ) else {
                return Err(PathError::BadEscape);
            };
            let c = hi << 4 | lo;
            match c {
                0 => return Err(PathError::Nul),
                b'/' | b'\\' if level == Level::DecodeAndMergeSlashes => out.push('/'),
                b'/' | b'\\' => return Err(PathError::EncodedSeparator),
                c if unreserved(c) => out.push(c as char),
                c => {
                    out.push('%');
                    out.push_str(&format!("{c:02X}"));
                }
            }
            i += 3;
            continue;
        }
        if !b.is_ascii() {
            // Not valid in a request target; kept as it is (a whole character).
            let ch = path[i..].chars().next().expect("at a character boundary");
            out.push(ch);
            i += ch.len_utf8();
            continue;
        }
        out.push(if b == b'\\' { '/' } else { b as char });
        i += 1;
    }
    Ok(out)
}

fn merge_slashes(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for c in path.chars() {
        if !(c == '/' && out.ends_with('/')) {
            out.push(c);
        }
    }
    out
}

/// RFC 3986 section 5.2.4, on an absolute path: segment by segment.
fn remove_dot_segments(path: &str) -> String {
    let mut segments: Vec<&str> = Vec::new();
    // Split after the leading '/': "/a/b/" → ["a", "b", ""].
    let parts: Vec<&str> = path[1..].split('/').collect();
    let last = parts.len() - 1;
    for (i, segment) in parts.iter().enumerate() {
        match *segment {
            "." | ".." => {
                if *segment == ".." {
                    segments.pop();
                }
                // A trailing dot segment leaves a directory: "/a/.." → "/".
                if i == last {
                    segments.push("");
                }
            }
            s => segments.push(s),
        }
    }
    format!("/{}", segments.join("/"))
}

/// What every normalized path satisfies: the oracle of the unit tests and of the
/// `path_normalize` fuzz target. Panics, naming the input, when one does not hold.
pub fn check_properties(raw: &str, once: &str, level: Level) {
    if is_normalized(raw) {
        assert_eq!(once, raw, "{raw:?} at {level:?}: said normal, but changed");
    }
    assert_eq!(
        normalize(once, level).as_deref(),
        Ok(once),
        "{raw:?} at {level:?}: not idempotent"
    );
    if once == "*" {
        // The asterisk-form (OPTIONS *) is the one target that is not a path.
        return;
    }
    assert!(once.starts_with('/'), "{raw:?} → {once:?}");
    assert!(
        !once[1..].split('/').any(|s| s == "." || s == ".."),
        "{raw:?} → {once:?} has a dot segment"
    );
    assert!(!once.contains('\\'), "{raw:?} → {once:?}");
    if level.merges() {
        assert!(!once.contains("//"), "{raw:?} → {once:?} at {level:?}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(path: &str) -> Result<String, PathError> {
        normalize(path, Level::MergeSlashes)
    }

    #[test]
    fn bypasses_of_a_prefix_rule_all_normalize_to_the_plain_path() {
        for path in [
            "/admin",
            "/./admin",
            "//admin",
            "/%61dmin",
            "/x/../admin",
            "/x/%2e%2e/admin",
            "/x/%2E%2E/admin",
            "///x//..//admin",
            "\\admin",
            "/x\\..\\admin",
            "/../admin",
            "/.%2e/admin",
        ] {
            assert_eq!(n(path).as_deref(), Ok("/admin"), "{path}");
        }
        assert_eq!(n("/admin/./x/").as_deref(), Ok("/admin/x/"));
        assert_eq!(n("/a/b/..").as_deref(), Ok("/a/"));
        assert_eq!(n("/a/.").as_deref(), Ok("/a/"));
        assert_eq!(n("/").as_deref(), Ok("/"));
        assert_eq!(n("/..").as_deref(), Ok("/"));
        assert_eq!(n("*").as_deref(), Ok("*"));
        // Reserved characters stay encoded, upper-cased.
        assert_eq!(n("/a%3fb%2a").as_deref(), Ok("/a%3Fb%2A"));
        assert_eq!(n("/%2541").as_deref(), Ok("/%2541"), "no double decoding");
    }

    #[test]
    fn what_cannot_be_normalized_safely_is_refused() {
        assert_eq!(n("/a%2Fb"), Err(PathError::EncodedSeparator));
        assert_eq!(n("/a%2fb"), Err(PathError::EncodedSeparator));
        assert_eq!(n("/a%5Cb"), Err(PathError::EncodedSeparator));
        assert_eq!(n("/a%00"), Err(PathError::Nul));
        assert_eq!(n("/a\0"), Err(PathError::Nul));
        assert_eq!(normalize("/a%00", Level::None), Err(PathError::Nul));
        assert_eq!(n("/a%4"), Err(PathError::BadEscape));
        assert_eq!(n("/a%zz"), Err(PathError::BadEscape));
        assert_eq!(n("admin"), Err(PathError::NotAbsolute));
    }

    #[test]
    fn the_levels_do_what_their_names_say() {
        assert_eq!(normalize("//a/./b", Level::None).as_deref(), Ok("//a/./b"));
        assert_eq!(normalize("//a/./b", Level::Base).as_deref(), Ok("//a/b"));
        assert_eq!(
            normalize("/a%2Fb//c", Level::DecodeAndMergeSlashes).as_deref(),
            Ok("/a/b/c")
        );
        assert_eq!(
            normalize("/a%2F..%2Fadmin", Level::DecodeAndMergeSlashes).as_deref(),
            Ok("/admin")
        );
        assert_eq!(
            normalize("/a%2Fb", Level::Base),
            Err(PathError::EncodedSeparator)
        );
        assert_eq!(Level::parse("DEFAULT"), Ok(Level::MergeSlashes));
        assert_eq!(Level::parse("BASE"), Ok(Level::Base));
        assert!(Level::parse("base").is_err());
    }

    /// The properties the fuzz target checks, over a generated set of paths.
    #[test]
    fn normalizing_is_idempotent_and_leaves_no_dot_segments_or_double_slashes() {
        let atoms = [
            "/", "//", ".", "..", "%2e", "%2E%2e", "a", "%61", "\\", "%25", "%3f", "~",
        ];
        let mut paths = vec![String::new()];
        for _ in 0..4 {
            let mut next = Vec::new();
            for p in &paths {
                for a in atoms {
                    next.push(format!("{p}{a}"));
                }
            }
            paths = next;
        }
        for level in [
            Level::Base,
            Level::MergeSlashes,
            Level::DecodeAndMergeSlashes,
        ] {
            for raw in &paths {
                let raw = format!("/{raw}");
                let Ok(once) = normalize(&raw, level) else {
                    continue;
                };
                check_properties(&raw, &once, level);
            }
        }
    }

    #[test]
    fn a_path_said_normal_is_left_as_it_is_at_every_level() {
        let normal = [
            "/",
            "/a",
            "/a/",
            "/a/b/",
            "/a.b/c.d",
            "/a..b",
            "/a-b_c~d",
            "/a;b=c",
            "/a:b@c",
            "/a+b",
            "/a!$&'()*,",
            "/public/index.html",
        ];
        for path in normal {
            assert!(is_normalized(path), "{path}");
            for level in [
                Level::None,
                Level::Base,
                Level::MergeSlashes,
                Level::DecodeAndMergeSlashes,
            ] {
                assert_eq!(
                    normalize(path, level).as_deref(),
                    Ok(path),
                    "{path} at {level:?}"
                );
            }
        }
        for path in [
            "a", "*", "/a//b", "/./a", "/a/..", "/a%2e", "/a\\b", "/a\0b",
        ] {
            assert!(!is_normalized(path), "{path:?}");
        }
    }

    /// Found by the path_normalize fuzz target: the asterisk-form kept as it is.
    #[test]
    fn the_asterisk_form_is_not_a_path_and_stays_as_it_is() {
        for level in [
            Level::Base,
            Level::MergeSlashes,
            Level::DecodeAndMergeSlashes,
        ] {
            let once = normalize("*", level).unwrap();
            assert_eq!(once, "*");
            check_properties("*", &once, level);
        }
    }
}
