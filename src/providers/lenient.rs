//! Lenient number fields for the typed usage objects of the providers: a field that is a
//! non-negative integer is read, anything else (a string, a float, `null`, an object) is
//! absent, as `Value::as_u64` reads it. With it, a usage object deserializes straight from the
//! response's bytes (no `Value` tree, no allocation) and from a `Value` alike, through the same
//! derived type.

use std::fmt;

use serde::de::{Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// `#[serde(default, deserialize_with = "lenient::u64")]` on an `Option<u64>` field.
pub fn u64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    d.deserialize_any(Lenient)
}

struct Lenient;

impl<'de> Visitor<'de> for Lenient {
    type Value = Option<u64>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_u64<E>(self, v: u64) -> Result<Option<u64>, E> {
        Ok(Some(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Option<u64>, E> {
        Ok(u64::try_from(v).ok())
    }
    fn visit_f64<E>(self, _: f64) -> Result<Option<u64>, E> {
        Ok(None)
    }
    fn visit_bool<E>(self, _: bool) -> Result<Option<u64>, E> {
        Ok(None)
    }
    fn visit_str<E>(self, _: &str) -> Result<Option<u64>, E> {
        Ok(None)
    }
    fn visit_unit<E>(self) -> Result<Option<u64>, E> {
        Ok(None)
    }
    fn visit_none<E>(self) -> Result<Option<u64>, E> {
        Ok(None)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Option<u64>, D::Error> {
        d.deserialize_any(Lenient)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Option<u64>, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(None)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Option<u64>, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;
    use serde_json::json;

    #[derive(Deserialize, Debug, PartialEq, Default)]
    struct Usage {
        #[serde(default, deserialize_with = "super::u64")]
        n: Option<u64>,
    }

    #[test]
    fn reads_what_as_u64_reads_from_bytes_and_values_alike() {
        for (value, expected) in [
            (json!(12), Some(12)),
            (json!(0), Some(0)),
            (json!(-1), None),
            (json!(1.5), None),
            (json!("12"), None),
            (json!(null), None),
            (json!(true), None),
            (json!([1]), None),
            (json!({"a": 1}), None),
        ] {
            let body = json!({"n": value, "other": {"x": [1, 2]}});
            assert_eq!(body["n"].as_u64(), expected, "{value}");
            let from_bytes: Usage = serde_json::from_str(&body.to_string()).expect("bytes");
            assert_eq!(from_bytes.n, expected, "{value} from bytes");
            let from_value = Usage::deserialize(&body).expect("value");
            assert_eq!(from_value.n, expected, "{value} from a Value");
        }
        let missing: Usage = serde_json::from_str("{}").expect("empty");
        assert_eq!(missing, Usage::default());
    }
}
