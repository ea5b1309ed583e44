//! Header names as a head's bytes spell them, recognised without `HeaderName::from_bytes` for
//! the fields nearly every request and answer carries (issue 18).
//!
//! Why by hand: `from_bytes` lowers each byte through a table into a scratch buffer and then
//! matches the standard names byte by byte, about 117 instructions per name (callgrind, on
//! the benchmark: nine names per proxied request, four in the client's head and five in the
//! upstream's). A known name here is two or three word compares. Names not in the table, and
//! any name that is not a plain token, go to `from_bytes` as before.

use axum::http::header::{self, HeaderName};

/// A lower-case name laid out for matching: where the words a name of its length is read as
/// start and how wide they are ([`layout`]), the words, and for each word the bits that fold
/// case (`0x20` where the name has a letter, nothing elsewhere, so that `-` and digits match
/// only themselves).
struct Pattern {
    len: usize,
    starts: [usize; 3],
    width: usize,
    count: usize,
    words: [u64; 3],
    folds: [u64; 3],
}

/// Where the words of a name of `len` bytes start and how wide they are: two overlapping
/// words (4 bytes each below 8, 8 up to 16), or three of 8 up to 24. `None` outside 4..=24.
const fn layout(len: usize) -> Option<([usize; 3], usize, usize)> {
    match len {
        4..=7 => Some(([0, len - 4, 0], 4, 2)),
        8..=16 => Some(([0, len - 8, 0], 8, 2)),
        17..=24 => Some(([0, 8, len - 8], 8, 3)),
        _ => None,
    }
}

/// The little-endian word of `width` bytes at `at`.
const fn word(b: &[u8], at: usize, width: usize) -> u64 {
    let mut w = 0u64;
    let mut i = 0;
    while i < width {
        w |= (b[at + i] as u64) << (8 * i);
        i += 1;
    }
    w
}

const fn pattern(lower: &[u8]) -> Pattern {
    let Some((starts, width, count)) = layout(lower.len()) else {
        panic!("a known header name is 4 to 24 bytes long");
    };
    let mut folded = [0u8; 24];
    let mut i = 0;
    while i < lower.len() {
        assert!(!lower[i].is_ascii_uppercase(), "known names are lower case");
        folded[i] = if lower[i].is_ascii_lowercase() {
            0x20
        } else {
            0
        };
        i += 1;
    }
    let mut words = [0u64; 3];
    let mut folds = [0u64; 3];
    let mut k = 0;
    while k < count {
        words[k] = word(lower, starts[k], width);
        folds[k] = word(&folded, starts[k], width);
        k += 1;
    }
    Pattern {
        len: lower.len(),
        starts,
        width,
        count,
        words,
        folds,
    }
}

/// The word of `width` bytes at `at` of `b` (in bounds: [`layout`] keeps every word inside).
#[inline(always)]
fn read(b: &[u8], at: usize, width: usize) -> u64 {
    if width == 8 {
        let mut w = [0u8; 8];
        w.copy_from_slice(&b[at..at + 8]);
        u64::from_le_bytes(w)
    } else {
        let mut w = [0u8; 4];
        w.copy_from_slice(&b[at..at + 4]);
        u64::from(u32::from_le_bytes(w))
    }
}

/// Whether `b` is `p`'s name in any letter case. A letter's byte with its `0x20` bit set is
/// its lower-case form exactly when the byte is that letter in either case; other bytes are
/// compared as they are.
#[inline(always)]
fn is(b: &[u8], p: &Pattern) -> bool {
    b.len() == p.len
        && (0..p.count).all(|k| read(b, p.starts[k], p.width) | p.folds[k] == p.words[k])
}

/// The table of known names, written once: each name's pattern, the lookup [`name`] (the
/// patterns are constants, so each test folds to a length compare and two or three word
/// compares), and the list the tests walk.
macro_rules! known {
    ($($pat:ident = $name:literal => $header:expr;)*) => {
        $(const $pat: Pattern = pattern($name);)*

        /// The header name `b` spells; `None` when it is not a valid name.
        #[inline(always)]
        pub(crate) fn name(b: &[u8]) -> Option<HeaderName> {
            $(if is(b, &$pat) {
                return Some($header);
            })*
            HeaderName::from_bytes(b).ok()
        }

        /// The names of the table with their headers (for the tests).
        #[cfg(test)]
        const ALL: &[(&[u8], HeaderName)] = &[$(($name, $header)),*];
    };
}

known! {
    HOST = b"host" => header::HOST;
    DATE = b"date" => header::DATE;
    SERVER = b"server" => header::SERVER;
    ACCEPT = b"accept" => header::ACCEPT;
    ORIGIN = b"origin" => header::ORIGIN;
    CONNECTION = b"connection" => header::CONNECTION;
    USER_AGENT = b"user-agent" => header::USER_AGENT;
    CONTENT_TYPE = b"content-type" => header::CONTENT_TYPE;
    AUTHORIZATION = b"authorization" => header::AUTHORIZATION;
    CACHE_CONTROL = b"cache-control" => header::CACHE_CONTROL;
    CONTENT_LENGTH = b"content-length" => header::CONTENT_LENGTH;
    ACCEPT_ENCODING = b"accept-encoding" => header::ACCEPT_ENCODING;
    CONTENT_ENCODING = b"content-encoding" => header::CONTENT_ENCODING;
    TRANSFER_ENCODING = b"transfer-encoding" => header::TRANSFER_ENCODING;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every byte value in every position of every known name, in both cases: the result is
    /// always what `HeaderName::from_bytes` makes of the same bytes.
    #[test]
    fn a_name_is_read_as_from_bytes_reads_it() {
        for (lower, header) in ALL {
            assert_eq!(name(lower).as_ref(), Some(header));
            let upper = lower.to_ascii_uppercase();
            assert_eq!(name(&upper).as_ref(), Some(header));
            let mut mixed = lower.to_vec();
            mixed[0] = mixed[0].to_ascii_uppercase();
            assert_eq!(name(&mixed).as_ref(), Some(header));
            for i in 0..lower.len() {
                for byte in 0..=255u8 {
                    let mut b = lower.to_vec();
                    b[i] = byte;
                    assert_eq!(
                        name(&b),
                        HeaderName::from_bytes(&b).ok(),
                        "{:?}",
                        String::from_utf8_lossy(&b)
                    );
                }
            }
        }
    }

    #[test]
    fn other_names_and_invalid_ones_are_read_as_before() {
        for b in [
            &b"x-request-id"[..],
            b"X-Stainless-Lang",
            b"a",
            b"",
            b"content type",
            b"content-length\r",
            b"Content-Lengthy",
            b"content-lengt",
        ] {
            assert_eq!(name(b), HeaderName::from_bytes(b).ok(), "{b:?}");
        }
    }
}
