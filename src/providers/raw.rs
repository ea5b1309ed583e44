//! Reading a request's facts from its bytes (issue 18): the fields admission needs, borrowed
//! from the body as JSON text, and read as `Value`'s accessors read them (`as_str`, `as_bool`,
//! `as_u64`, [`super::uint_field`]), so that a provider's reader of bytes and its reader of the
//! tree give the same facts. The shapes of each format's fields are in the provider's module;
//! what both readers share (a message `content`, kept as JSON text) is handed to the tree path's
//! own functions.
//!
//! [`Reader`] walks the body once and checks its grammar as serde_json checks a value it
//! skips; it replaced serde's borrowed reading (`&RawValue` fields), which cost about 3 700
//! instructions on the benchmark's 111-byte chat body, most of admission's work. It is written
//! here rather than taken from a crate because what it must do is narrow and exact: accept and
//! refuse the texts serde_json accepts and refuses, hand out each field's text borrowed, and
//! leave every doubtful case (an escaped key, a duplicated field, deep nesting) to the tree.

use std::borrow::Cow;

use serde::{Deserialize, Deserializer};
use serde_json::Value;

use super::{collect_content, push_json, push_text, BadRequest, RequestFacts};

/// How deep containers may nest before the reader leaves the body to the tree (serde_json
/// refuses beyond 128 levels; the tree path gives that answer).
const MAX_DEPTH: u32 = 100;

/// A one-pass reader of a JSON text: objects' members and arrays' items are handed to the
/// caller, every other value is checked and skipped (or handed out as its text). Every method
/// answers `None` for a text serde_json would refuse, or one the reader leaves to serde.
pub struct Reader<'a> {
    text: &'a str,
    i: usize,
    depth: u32,
}

impl<'a> Reader<'a> {
    /// A reader of `body`, which must be UTF-8 and open with `{` (after whitespace).
    pub fn object_body(body: &'a [u8]) -> Option<Reader<'a>> {
        let mut r = Reader::of(std::str::from_utf8(body).ok()?);
        (r.peek() == Some(b'{')).then_some(r)
    }

    /// A reader of a text already checked to be one JSON value (a field this reader handed
    /// out).
    pub fn of(text: &'a str) -> Reader<'a> {
        Reader {
            text,
            i: 0,
            depth: 0,
        }
    }

    fn bytes(&self) -> &'a [u8] {
        self.text.as_bytes()
    }

    /// The next byte after whitespace (the reader stays on it).
    pub fn peek(&mut self) -> Option<u8> {
        let b = self.bytes();
        while let Some(&c) = b.get(self.i) {
            if !matches!(c, b' ' | b'\t' | b'\n' | b'\r') {
                return Some(c);
            }
            self.i += 1;
        }
        None
    }

    /// Only whitespace is left.
    pub fn end(&mut self) -> Option<()> {
        self.peek().is_none().then_some(())
    }

    /// The members of the object that comes next: `member` is called with each key, the
    /// reader on its value, and must read that value ([`Reader::value`] or its own reading).
    /// A key with an escape is left to serde (`None`).
    pub fn object(
        &mut self,
        mut member: impl FnMut(&mut Reader<'a>, &'a str) -> Option<()>,
    ) -> Option<()> {
        self.open(b'{')?;
        if self.peek()? == b'}' {
            return self.close();
        }
        loop {
            if self.peek()? != b'"' {
                return None;
            }
            let start = self.i;
            if self.string()? {
                return None;
            }
            let key = self.text.get(start + 1..self.i - 1)?;
            if self.peek()? != b':' {
                return None;
            }
            self.i += 1;
            member(self, key)?;
            match self.peek()? {
                b',' => self.i += 1,
                b'}' => return self.close(),
                _ => return None,
            }
        }
    }

    /// The items of the array that comes next: `item` is called with the reader on each and
    /// must read it.
    pub fn array(&mut self, mut item: impl FnMut(&mut Reader<'a>) -> Option<()>) -> Option<()> {
        self.open(b'[')?;
        if self.peek()? == b']' {
            return self.close();
        }
        loop {
            item(self)?;
            match self.peek()? {
                b',' => self.i += 1,
                b']' => return self.close(),
                _ => return None,
            }
        }
    }

    fn open(&mut self, bracket: u8) -> Option<()> {
        if self.peek()? != bracket || self.depth >= MAX_DEPTH {
            return None;
        }
        self.depth += 1;
        self.i += 1;
        Some(())
    }

    /// Steps over the closing bracket [`Reader::object`] or [`Reader::array`] found.
    fn close(&mut self) -> Option<()> {
        self.depth -= 1;
        self.i += 1;
        Some(())
    }

    /// The next value, checked, as its text.
    pub fn value(&mut self) -> Option<&'a str> {
        let first = self.peek()?;
        let start = self.i;
        match first {
            b'"' => {
                self.string()?;
            }
            b'{' => self.object(|r, _| r.value().map(drop))?,
            b'[' => self.array(|r| r.value().map(drop))?,
            b't' => self.literal(b"true")?,
            b'f' => self.literal(b"false")?,
            b'n' => self.literal(b"null")?,
            b'-' | b'0'..=b'9' => self.number()?,
            _ => return None,
        }
        self.text.get(start..self.i)
    }

    fn literal(&mut self, word: &[u8]) -> Option<()> {
        if !self.bytes().get(self.i..)?.starts_with(word) {
            return None;
        }
        self.i += word.len();
        Some(())
    }

    /// A number in JSON's grammar (serde_json's, which checks the grammar of a number it
    /// skips, not its range): `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`.
    fn number(&mut self) -> Option<()> {
        let b = self.bytes();
        let mut i = self.i;
        if b.get(i) == Some(&b'-') {
            i += 1;
        }
        let digits = |i: usize| {
            b.get(i..)
                .map_or(0, |t| t.iter().take_while(|c| c.is_ascii_digit()).count())
        };
        match b.get(i)? {
            b'0' => i += 1,
            b'1'..=b'9' => i += digits(i),
            _ => return None,
        }
        if b.get(i) == Some(&b'.') {
            let n = digits(i + 1);
            if n == 0 {
                return None;
            }
            i += 1 + n;
        }
        if matches!(b.get(i), Some(b'e' | b'E')) {
            i += 1;
            if matches!(b.get(i), Some(b'+' | b'-')) {
                i += 1;
            }
            let n = digits(i);
            if n == 0 {
                return None;
            }
            i += n;
        }
        self.i = i;
        Some(())
    }

    /// Steps over the string that opens here, checked as serde_json checks one (no control
    /// character, only JSON's escapes); whether it holds an escape.
    fn string(&mut self) -> Option<bool> {
        let b = self.bytes();
        let mut i = self.i + 1;
        let mut escaped = false;
        loop {
            i += plain_run(b.get(i..)?);
            match *b.get(i)? {
                b'"' => {
                    self.i = i + 1;
                    return Some(escaped);
                }
                b'\\' => {
                    escaped = true;
                    match *b.get(i + 1)? {
                        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => i += 2,
                        b'u' => {
                            let hex = b.get(i + 2..i + 6)?;
                            if !hex.iter().all(u8::is_ascii_hexdigit) {
                                return None;
                            }
                            i += 6;
                        }
                        _ => return None,
                    }
                }
                // A control character, which JSON strings may hold only escaped.
                _ => return None,
            }
        }
    }
}

/// How many bytes of `b` come before the first `"`, `\\` or control character: eight bytes at
/// a time (a word's first such byte found from its flags), the last few byte by byte.
fn plain_run(b: &[u8]) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let has_zero = |v: u64| v.wrapping_sub(ONES) & !v & HIGH;
    let mut i = 0;
    while let Some(word) = b.get(i..i + 8) {
        let mut w = [0u8; 8];
        w.copy_from_slice(word);
        let v = u64::from_le_bytes(w);
        let special = has_zero(v ^ (ONES * u64::from(b'"')))
            | has_zero(v ^ (ONES * u64::from(b'\\')))
            | (v.wrapping_sub(ONES * 0x20) & !v & HIGH);
        if special != 0 {
            // The lowest flagged byte is a real one (a borrow flags only bytes above it).
            return i + (special.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    i + b[i..]
        .iter()
        .position(|&c| c == b'"' || c == b'\\' || c < 0x20)
        .unwrap_or(b.len() - i)
}

/// One field's text into its slot; a field seen twice leaves the body to the tree (serde
/// refuses a duplicated field, and the tree keeps the last).
fn once<'a>(slot: &mut Option<&'a str>, r: &mut Reader<'a>) -> Option<()> {
    if slot.is_some() {
        return None;
    }
    *slot = Some(r.value()?);
    Some(())
}

/// The `model` field as the tree path reads it: its string, or "" when absent or not a string.
pub fn model(v: Option<&str>) -> String {
    v.and_then(string).map(Cow::into_owned).unwrap_or_default()
}

/// The first byte of a JSON text that is not whitespace.
pub fn first_byte(text: &str) -> Option<u8> {
    text.bytes()
        .find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
}

/// `as_str` over a checked JSON value's text: a JSON string (borrowed unless it has escapes).
pub fn string(text: &str) -> Option<Cow<'_, str>> {
    if !text.starts_with('"') {
        return None;
    }
    // The text is valid JSON (its reader checked it): a string without a backslash is the
    // text between its quotes, which needs no second reading.
    if let Some(inner) = text
        .get(1..text.len() - 1)
        .filter(|inner| text.len() >= 2 && text.ends_with('"') && !inner.contains('\\'))
    {
        return Some(Cow::Borrowed(inner));
    }
    serde_json::from_str::<String>(text).ok().map(Cow::Owned)
}

/// An object key, borrowed from the input unless it has escapes (for visitors that compare
/// keys: `Cow<str>`'s own `Deserialize` would copy every one).
pub struct Key<'a>(pub Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Key<'de>, D::Error> {
        struct KeyVisitor;
        impl<'de> serde::de::Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(s)))
            }
            fn visit_str<E>(self, s: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(s.to_owned())))
            }
        }
        d.deserialize_str(KeyVisitor)
    }
}

/// `as_bool`.
pub fn boolean(text: &str) -> Option<bool> {
    match text {
        "true" => Some(true),
        "false" => Some(false),
        _ => None,
    }
}

/// `as_u64`: a non-negative integer (not a float, not a string).
pub fn unsigned(text: &str) -> Option<u64> {
    if text.is_empty() {
        return None;
    }
    // Digits folded directly (what `parse::<u64>` does after its sign and radix handling, at
    // a third of its cost); `None` past `u64::MAX`, as `parse` fails there.
    text.bytes().try_fold(0u64, |n, b| {
        if b.is_ascii_digit() {
            n.checked_mul(10)?.checked_add(u64::from(b - b'0'))
        } else {
            None
        }
    })
}

/// [`super::uint_field`] over a field's JSON text, with the same message.
pub fn uint_field(v: Option<&str>, field: &str) -> Result<Option<u64>, BadRequest> {
    match v {
        None | Some("null") => Ok(None),
        Some(v) => match unsigned(v) {
            Some(n) => Ok(Some(n)),
            None => {
                let shown: Value = serde_json::from_str(v).unwrap_or(Value::Null);
                Err(super::uint_field_error(field, &shown))
            }
        },
    }
}

/// [`collect_content`] over a field's JSON text: a string is pushed as it is (borrowed), anything
/// else (an array of parts, which may hold images) is read into a `Value` for the tree path's
/// function. `None` when serde cannot read the text (the caller leaves the body to the tree).
pub fn collect(content: Option<&str>, facts: &mut RequestFacts) -> Option<()> {
    let Some(c) = content else {
        return Some(());
    };
    if first_byte(c) == Some(b'"') {
        if let Some(s) = string(c) {
            push_text(&mut facts.prompt_text, &s);
        }
        return Some(());
    }
    let v: Value = serde_json::from_str(c).ok()?;
    collect_content(Some(&v), facts);
    Some(())
}

/// [`push_json`] over a field's JSON text (read into a `Value` first, so that the text pushed
/// is the compact form the tree path pushes).
pub fn push(text: &mut String, v: &str) -> Option<()> {
    let v: Value = serde_json::from_str(v).ok()?;
    push_json(text, &v);
    Some(())
}

/// The fields named by `keys` of the object that comes next, as their texts (a field seen
/// twice leaves the body to the tree); the others are checked and skipped.
pub fn fields<'a, const N: usize>(
    r: &mut Reader<'a>,
    keys: [&str; N],
) -> Option<[Option<&'a str>; N]> {
    let mut found = [None; N];
    r.object(|r, key| member(&mut found, &keys, r, key))?;
    Some(found)
}

/// One member of an object read by [`fields`]: its text into the slot of its key (once), or
/// checked and skipped.
fn member<'a, const N: usize>(
    found: &mut [Option<&'a str>; N],
    keys: &[&str; N],
    r: &mut Reader<'a>,
    key: &str,
) -> Option<()> {
    match keys.iter().position(|k| *k == key) {
        Some(i) => once(&mut found[i], r),
        None => r.value().map(drop),
    }
}

/// A request body's top-level fields named by `keys`, and the objects of its `messages` array
/// read by `message` (`None` for an item that is not an object): one pass that checks the
/// whole body. `None` leaves the body to the tree (not a JSON object, invalid JSON, a
/// duplicated field, an escaped key).
#[allow(clippy::type_complexity)]
pub fn request_body<'a, const N: usize, M>(
    body: &'a [u8],
    keys: [&str; N],
    message: impl FnMut(&mut Reader<'a>) -> Option<M>,
) -> Option<([Option<&'a str>; N], Vec<Option<M>>)> {
    let mut found = [None; N];
    let mut messages = None;
    let mut message = Some(message);
    let mut r = Reader::object_body(body)?;
    r.object(|r, key| {
        if key == "messages" {
            // A second `messages` finds the reader taken: left to the tree.
            messages = Some(objects(r, message.take()?)?);
            return Some(());
        }
        member(&mut found, &keys, r, key)
    })?;
    r.end()?;
    Some((found, messages.unwrap_or_default()))
}

/// The items of an array field, each an object read by `read` (`None` for an item that is
/// not an object, which the tree path skips); no items for a value that is not an array, as
/// `as_array` gives none. Reads (and checks) the value either way.
pub fn objects<'a, T>(
    r: &mut Reader<'a>,
    mut read: impl FnMut(&mut Reader<'a>) -> Option<T>,
) -> Option<Vec<Option<T>>> {
    if r.peek()? != b'[' {
        r.value()?;
        return Some(Vec::new());
    }
    // Room for a short conversation at once (growing from empty costs more than the
    // allocation itself).
    let mut items = Vec::with_capacity(4);
    r.array(|r| {
        if r.peek()? == b'{' {
            items.push(Some(read(r)?));
        } else {
            r.value()?;
            items.push(None);
        }
        Some(())
    })?;
    Some(items)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn raw(text: &str) -> &str {
        serde_json::from_str::<&serde_json::value::RawValue>(text).expect("valid JSON");
        text
    }

    /// `unsigned` reads what `as_u64` reads from the same JSON text, at the edges too.
    #[test]
    fn unsigned_reads_as_as_u64_reads() {
        for text in [
            "0",
            "7",
            "16",
            "18446744073709551615",
            "18446744073709551616",
            "99999999999999999999",
            "-1",
            "-0",
            "1.0",
            "1e3",
            "\"16\"",
            "null",
            "true",
        ] {
            let v: serde_json::Value = serde_json::from_str(text).expect("valid JSON");
            assert_eq!(unsigned(text), v.as_u64(), "{text}");
        }
        assert_eq!(unsigned(""), None);
    }

    #[test]
    fn strings_are_borrowed_unless_escaped_and_read_as_as_str_reads_them() {
        let plain = raw(r#""gpt-4o""#);
        assert!(matches!(string(plain), Some(Cow::Borrowed("gpt-4o"))));
        let escaped = raw(r#""a\"b\u00e9""#);
        assert_eq!(string(escaped).as_deref(), Some("a\"bé"));
        assert!(matches!(string(escaped), Some(Cow::Owned(_))));
        for text in [
            r#""""#,
            r#""é 日本 😀""#,
            r#""\\""#,
            r#""a\/b""#,
            r#""\ud83d\ude00""#,
        ] {
            let want: String = serde_json::from_str(text).expect("a JSON string");
            assert_eq!(string(raw(text)).as_deref(), Some(want.as_str()), "{text}");
        }
        for other in ["1", "null", "true", "[\"x\"]", "{}"] {
            assert_eq!(string(raw(other)), None, "{other}");
        }
        let key: Key = serde_json::from_str(r#""usage""#).expect("key");
        assert!(matches!(key.0, Cow::Borrowed("usage")));
        let key: Key = serde_json::from_str(r#""us\u0061ge""#).expect("escaped key");
        assert_eq!(key.0, "usage");
    }

    /// Every text of `fixtures`, and every text one byte away from one (a byte deleted, or
    /// replaced by or preceded by a byte that matters to JSON's grammar), that is UTF-8.
    pub(crate) fn near_texts(fixtures: &[&str]) -> Vec<String> {
        let edits = b"{}[]\",:\\ 0123-+.eEaunltf\n\x01";
        let mut out = Vec::new();
        for f in fixtures {
            let b = f.as_bytes();
            out.push(f.to_string());
            for i in 0..=b.len() {
                let mut variants = Vec::new();
                if i < b.len() {
                    let mut v = b.to_vec();
                    v.remove(i);
                    variants.push(v);
                }
                for &e in edits {
                    let mut v = b.to_vec();
                    v.insert(i, e);
                    variants.push(v);
                    if i < b.len() {
                        let mut v = b.to_vec();
                        v[i] = e;
                        variants.push(v);
                    }
                }
                out.extend(
                    variants
                        .into_iter()
                        .filter_map(|v| String::from_utf8(v).ok()),
                );
            }
        }
        out
    }

    /// The reader accepts exactly the JSON texts serde_json accepts when it skips a value
    /// (grammar, escapes, control characters, trailing bytes), on fixtures and on every text
    /// one byte away from them; the one difference is an escaped key, which it leaves to serde.
    #[test]
    fn the_reader_accepts_what_serde_accepts() {
        let fixtures = [
            r#"{"a":[1,-0.5e+10,0,1E5,2.25,-7],"b":{"c":null,"d":true,"e":false},"f":""}"#,
            r#" [ "x" , { } , [ ] , "a\n\u00e9\"x\\/" , "日本 😀" ] "#,
            r#"{"long":"0123456789abcdefghij\"klmnopqrstuvwxyz0123456789","k":"0123456789abcdef"}"#,
            r#""a string of more than eight bytes, with a \t tab escape""#,
            "123",
            "-0.0e-0",
            r#"{"nested":[[[{"x":[{}]}]]]}"#,
        ];
        let mut checked = 0;
        for text in near_texts(&fixtures) {
            let mut r = Reader::of(&text);
            let ours = r.value().is_some() && r.end().is_some();
            let serde = serde_json::from_str::<serde::de::IgnoredAny>(&text).is_ok();
            if serde && !ours && text.contains('\\') {
                continue;
            }
            assert_eq!(ours, serde, "{text:?}");
            checked += 1;
        }
        assert!(checked > 10_000, "{checked}");
    }

    /// Nesting deeper than the reader goes is left to serde (which refuses beyond 128).
    #[test]
    fn deep_nesting_is_left_to_serde() {
        let deep = format!("{}{}", "[".repeat(150), "]".repeat(150));
        assert_eq!(Reader::of(&deep).value(), None);
        let fine = format!("{}{}", "[".repeat(50), "]".repeat(50));
        assert_eq!(Reader::of(&fine).value(), Some(fine.as_str()));
    }
}
