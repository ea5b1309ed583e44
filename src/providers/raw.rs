//! Reading a request's facts from its bytes (issue 18): the fields admission needs, borrowed
//! from the body as JSON text (`&RawValue`), and read as `Value`'s accessors read them
//! (`as_str`, `as_bool`, `as_u64`, [`super::uint_field`]), so that a provider's reader of bytes
//! and its reader of the tree give the same facts. The shapes of each format's fields are in
//! the provider's module; what both readers share (a message `content`, kept as JSON text) is
//! handed to the tree path's own functions.

use std::borrow::Cow;

use serde::de::{IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;
use serde_json::Value;

use super::{collect_content, push_json, push_text, BadRequest, RequestFacts};

/// A present field as its JSON text, `null` included (serde's `Option` would read `null` as
/// absent, where the tree path tells a present `null` from an absent field):
/// `#[serde(borrow, default, deserialize_with = "raw::present")]`.
pub fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

/// A body's top-level fields, borrowed into `T`: `None` when the body is not UTF-8, not a JSON
/// object, or not readable into `T` (invalid JSON, a duplicated field) — cases the caller
/// leaves to the tree.
pub fn object<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Option<T> {
    let body = std::str::from_utf8(body).ok()?;
    if first_byte(body) != Some(b'{') {
        return None;
    }
    serde_json::from_str(body).ok()
}

/// The `model` field as the tree path reads it: its string, or "" when absent or not a string.
pub fn model(v: Option<&RawValue>) -> String {
    v.and_then(string).map(Cow::into_owned).unwrap_or_default()
}

/// The first byte of a JSON text that is not whitespace.
pub fn first_byte(text: &str) -> Option<u8> {
    text.bytes()
        .find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
}

/// Whether a JSON text is an object (and not an array, which serde would also read into a
/// struct, field by position).
pub fn is_object(v: &RawValue) -> bool {
    first_byte(v.get()) == Some(b'{')
}

/// `as_str`: a JSON string (borrowed unless it has escapes). (`Cow<str>`'s own `Deserialize`
/// always copies; `&str` borrows but refuses a string with escapes, which is then copied.)
pub fn string(v: &RawValue) -> Option<Cow<'_, str>> {
    let text = v.get();
    if !text.starts_with('"') {
        return None;
    }
    // A raw value is valid JSON (serde checked it when it borrowed it): a string without a
    // backslash is the text between its quotes, which needs no second reading.
    if let Some(inner) = text
        .get(1..text.len() - 1)
        .filter(|inner| text.len() >= 2 && text.ends_with('"') && !inner.contains('\\'))
    {
        return Some(Cow::Borrowed(inner));
    }
    match serde_json::from_str::<&str>(text) {
        Ok(s) => Some(Cow::Borrowed(s)),
        Err(_) => serde_json::from_str::<String>(text).ok().map(Cow::Owned),
    }
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
pub fn boolean(v: &RawValue) -> Option<bool> {
    match v.get() {
        "true" => Some(true),
        "false" => Some(false),
        _ => None,
    }
}

/// `as_u64`: a non-negative integer (not a float, not a string).
pub fn unsigned(v: &RawValue) -> Option<u64> {
    let t = v.get();
    if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
        t.parse().ok()
    } else {
        None
    }
}

/// [`super::uint_field`] over a field's JSON text, with the same message.
pub fn uint_field(v: Option<&RawValue>, field: &str) -> Result<Option<u64>, BadRequest> {
    match v {
        None => Ok(None),
        Some(v) if v.get() == "null" => Ok(None),
        Some(v) => match unsigned(v) {
            Some(n) => Ok(Some(n)),
            None => {
                let shown: Value = serde_json::from_str(v.get()).unwrap_or(Value::Null);
                Err(super::uint_field_error(field, &shown))
            }
        },
    }
}

/// [`collect_content`] over a field's JSON text: a string is pushed as it is (borrowed), anything
/// else (an array of parts, which may hold images) is read into a `Value` for the tree path's
/// function. `None` when the text is not valid JSON (the caller leaves the body to the tree).
pub fn collect(content: Option<&RawValue>, facts: &mut RequestFacts) -> Option<()> {
    let Some(c) = content else {
        return Some(());
    };
    if first_byte(c.get()) == Some(b'"') {
        if let Some(s) = string(c) {
            push_text(&mut facts.prompt_text, &s);
        }
        return Some(());
    }
    let v: Value = serde_json::from_str(c.get()).ok()?;
    collect_content(Some(&v), facts);
    Some(())
}

/// [`push_json`] over a field's JSON text (read into a `Value` first, so that the text pushed
/// is the compact form the tree path pushes).
pub fn push(text: &mut String, v: &RawValue) -> Option<()> {
    let v: Value = serde_json::from_str(v.get()).ok()?;
    push_json(text, &v);
    Some(())
}

/// The items of a JSON array field, read in the same pass as the body's other fields: each
/// item's fields (`T`, borrowed) when it is an object, `None` for any other item (the tree path
/// skips it); no items for a value that is not an array, as `as_array` gives none. Reading the
/// array as JSON text and then each item again parsed every message three times, the largest
/// part of a chat body's reading (issue 18).
pub struct Objects<T>(pub Vec<Option<T>>);

impl<T> Default for Objects<T> {
    fn default() -> Self {
        Objects(Vec::new())
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Objects<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ArrayOrNothing(std::marker::PhantomData))
    }
}

/// One item of [`Objects`].
struct Item<T>(Option<T>);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Item<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ObjectOrNothing(std::marker::PhantomData))
    }
}

/// A visitor's answer to every value that is not the one it reads (a scalar or `null`): `$v`.
macro_rules! any_other_value {
    ($v:expr) => {
        fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
            Ok($v)
        }
        fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
            Ok($v)
        }
        fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
            Ok($v)
        }
        fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
            Ok($v)
        }
        fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
            Ok($v)
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok($v)
        }
    };
}

struct ArrayOrNothing<T>(std::marker::PhantomData<T>);

impl<'de, T: Deserialize<'de>> Visitor<'de> for ArrayOrNothing<T> {
    type Value = Objects<T>;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Objects<T>, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(4));
        while let Some(Item(item)) = seq.next_element::<Item<T>>()? {
            items.push(item);
        }
        Ok(Objects(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Objects<T>, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Objects::default())
    }
    any_other_value!(Objects::default());
}

struct ObjectOrNothing<T>(std::marker::PhantomData<T>);

impl<'de, T: Deserialize<'de>> Visitor<'de> for ObjectOrNothing<T> {
    type Value = Item<T>;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Item<T>, A::Error> {
        T::deserialize(serde::de::value::MapAccessDeserializer::new(map)).map(|t| Item(Some(t)))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Item<T>, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Item(None))
    }
    any_other_value!(Item(None));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(text: &str) -> Box<RawValue> {
        RawValue::from_string(text.to_string()).expect("valid JSON")
    }

    #[test]
    fn strings_are_borrowed_unless_escaped_and_read_as_as_str_reads_them() {
        let plain = raw(r#""gpt-4o""#);
        assert!(matches!(string(&plain), Some(Cow::Borrowed("gpt-4o"))));
        let escaped = raw(r#""a\"b\u00e9""#);
        assert_eq!(string(&escaped).as_deref(), Some("a\"bé"));
        assert!(matches!(string(&escaped), Some(Cow::Owned(_))));
        for text in [
            r#""""#,
            r#""é 日本 😀""#,
            r#""\\""#,
            r#""a\/b""#,
            r#""\ud83d\ude00""#,
        ] {
            let want: String = serde_json::from_str(text).expect("a JSON string");
            assert_eq!(string(&raw(text)).as_deref(), Some(want.as_str()), "{text}");
        }
        for other in ["1", "null", "true", "[\"x\"]", "{}"] {
            assert_eq!(string(&raw(other)), None, "{other}");
        }
        let key: Key = serde_json::from_str(r#""usage""#).expect("key");
        assert!(matches!(key.0, Cow::Borrowed("usage")));
        let key: Key = serde_json::from_str(r#""us\u0061ge""#).expect("escaped key");
        assert_eq!(key.0, "usage");
    }
}
