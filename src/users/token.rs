//! A user's token as the user record holds it: its bytes inside the record when it is short
//! (every generated token, a 36-character UUID), on the heap otherwise.
//!
//! Why not a `String`: a `String`'s bytes live in an allocation of their own. With thousands of
//! users in turn, a request's user is never in the cache, and comparing the token presented
//! with the stored one read the user's entry, then, behind its pointer, the token's bytes: two
//! memory reads one after the other on every request (issue 18). Held inline, the comparison
//! reads the entry only, and the 48-byte allocation per user is gone. No small-string crate is
//! used: the usual ones keep at most about 24 bytes inline (`compact_str`, `smartstring`), and
//! the type needs little (text in, text out, equality, serde as a string).

use std::fmt;
use std::ops::Deref;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The longest token held inline.
const INLINE: usize = 38;

/// A user token (see the module's documentation). Reads as a `&str`.
#[derive(Clone)]
pub struct Token(Repr);

#[derive(Clone)]
enum Repr {
    /// `bytes[..len]` is the token's UTF-8 text.
    Inline {
        len: u8,
        bytes: [u8; INLINE],
    },
    Heap(Box<str>),
}

impl Token {
    pub fn new(text: &str) -> Token {
        if text.len() <= INLINE {
            let mut bytes = [0; INLINE];
            bytes[..text.len()].copy_from_slice(text.as_bytes());
            Token(Repr::Inline {
                len: text.len() as u8,
                bytes,
            })
        } else {
            Token(Repr::Heap(text.into()))
        }
    }

    pub fn as_str(&self) -> &str {
        match &self.0 {
            Repr::Inline { len, bytes } => {
                let text = &bytes[..usize::from(*len)];
                // SAFETY: `bytes[..len]` was copied from a `&str` in `Token::new` and is never
                // changed, so it is valid UTF-8.
                unsafe { std::str::from_utf8_unchecked(text) }
            }
            Repr::Heap(text) => text,
        }
    }
}

impl Deref for Token {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl From<&str> for Token {
    fn from(text: &str) -> Token {
        Token::new(text)
    }
}

impl From<String> for Token {
    fn from(text: String) -> Token {
        Token::new(&text)
    }
}

impl From<Token> for String {
    fn from(token: Token) -> String {
        token.as_str().to_string()
    }
}

impl PartialEq for Token {
    fn eq(&self, other: &Token) -> bool {
        self.as_str() == other.as_str()
    }
}
impl Eq for Token {}

impl PartialEq<str> for Token {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}
impl PartialEq<&str> for Token {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}
impl PartialEq<String> for Token {
    fn eq(&self, other: &String) -> bool {
        self.as_str() == other.as_str()
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl Serialize for Token {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Token {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Token, D::Error> {
        struct Visit;
        impl serde::de::Visitor<'_> for Visit {
            type Value = Token;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a token (a string)")
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Token, E> {
                Ok(Token::new(text))
            }
        }
        deserializer.deserialize_str(Visit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_and_long_tokens_read_back_as_given() {
        let uuid = "0000beef-0000-4000-8000-000000000001";
        let long = "t".repeat(INLINE + 1);
        for text in ["", "a", uuid, &"é".repeat(INLINE / 2), &long] {
            let t = Token::new(text);
            assert_eq!(t.as_str(), text);
            assert_eq!(t, *text);
            assert_eq!(t.clone(), t);
            assert_eq!(String::from(t.clone()), text);
            assert_eq!(format!("{t}"), text);
            assert_eq!(format!("{t:?}"), format!("{text:?}"));
            let json = serde_json::to_string(&t).expect("serialises");
            assert_eq!(json, serde_json::to_string(text).expect("serialises"));
            let back: Token = serde_json::from_str(&json).expect("parses");
            assert_eq!(back, t);
        }
        assert!(matches!(Token::new(uuid).0, Repr::Inline { .. }));
        assert!(matches!(Token::new(&long).0, Repr::Heap(_)));
        assert_ne!(Token::new(uuid), Token::new(&uuid[1..]));
    }

    #[test]
    fn not_a_string_is_refused() {
        assert!(serde_json::from_str::<Token>("12").is_err());
        // Escapes are read as text.
        let t: Token = serde_json::from_str(r#""a\"b""#).expect("parses");
        assert_eq!(t, "a\"b");
    }

    #[test]
    #[cfg(target_pointer_width = "64")]
    fn a_token_takes_forty_bytes() {
        assert_eq!(std::mem::size_of::<Token>(), 40);
    }
}
