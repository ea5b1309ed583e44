//! Header fields as the request path keeps them (issue 18): a client's request's, and the
//! request sent upstream. A short list in the order sent, looked up by walking it: a request
//! carries a handful of fields, and the path reads a few of them once each, where `HeaderMap`
//! hashes every name on insert and lookup and keeps an index beside the entries (about 170
//! instructions per field appended, callgrind, against a few for a push). [`Lookup`] reads
//! either, so that the gate's rules have one home for the straight path and the router's
//! requests.

use std::fmt;

use axum::http::header::HeaderName;
use axum::http::{HeaderMap, HeaderValue};
use bytes::Bytes;

/// Header fields in the order they came, duplicates kept.
///
/// A field read from a head keeps its value as a span of that head (`head`), not as a
/// `HeaderValue` of its own (issue 18): a `HeaderValue` sharing the head's memory takes a
/// count on it when made and gives it back when dropped, two atomic operations per field, and
/// most fields are only looked at. [`Value::to_value`] makes one for a field passed on.
#[derive(Debug, Default, Clone)]
pub struct Fields {
    /// The head the spans point into (empty when none do).
    head: Bytes,
    list: Vec<(HeaderName, Slot)>,
}

/// Where a field's value is.
#[derive(Debug, Clone)]
enum Slot {
    Value(HeaderValue),
    /// `head[start..end]`, bytes a `HeaderValue` accepts (the parser's, see [`Fields::append_span`]).
    Span(u32, u32),
}

impl Slot {
    /// The value, with `head` the list's head.
    #[inline]
    fn value<'a>(&'a self, head: &'a Bytes) -> Value<'a> {
        match self {
            Slot::Value(v) => Value::of(v),
            Slot::Span(a, b) => Value {
                bytes: &head[*a as usize..*b as usize],
                owner: Owner::Head(head),
            },
        }
    }

    /// The value as a `HeaderValue` of its own, with `head` the list's head.
    fn into_value(self, head: &Bytes) -> HeaderValue {
        match self {
            Slot::Value(v) => v,
            span => span.value(head).to_value(),
        }
    }
}

/// A field's value as a list or map holds it: bytes to read, and a `HeaderValue` on demand.
#[derive(Clone, Copy)]
pub struct Value<'a> {
    bytes: &'a [u8],
    owner: Owner<'a>,
}

#[derive(Clone, Copy)]
enum Owner<'a> {
    Value(&'a HeaderValue),
    /// Bytes within this head.
    Head(&'a Bytes),
}

/// A value that is not visible ASCII text (as `HeaderValue::to_str` refuses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotText;

impl fmt::Display for NotText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the header value is not visible ASCII text")
    }
}

impl std::error::Error for NotText {}

impl<'a> Value<'a> {
    /// A value of its own (a `HeaderMap`'s, or one set on a list).
    pub fn of(value: &'a HeaderValue) -> Value<'a> {
        Value {
            bytes: value.as_bytes(),
            owner: Owner::Value(value),
        }
    }

    pub fn as_bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// The value as text when it is visible ASCII (tab included), as `HeaderValue::to_str`.
    pub fn to_str(&self) -> Result<&'a str, NotText> {
        // One pass without an early exit, which the compiler vectorises.
        let text = self.bytes.iter().fold(true, |ok, &b| {
            ok & (b == b'\t' || (0x20..0x7f).contains(&b))
        });
        if !text {
            return Err(NotText);
        }
        // SAFETY: every byte is ASCII, and ASCII is UTF-8.
        Ok(unsafe { std::str::from_utf8_unchecked(self.bytes) })
    }

    /// A `HeaderValue` of these bytes (sharing the head's memory: a count on it).
    pub fn to_value(&self) -> HeaderValue {
        match self.owner {
            Owner::Value(v) => v.clone(),
            Owner::Head(head) => {
                let value = head.slice_ref(self.bytes);
                // SAFETY: a span's bytes are a field value `httparse` accepted, which
                // `HeaderValue` accepts too (`append_span`).
                unsafe { HeaderValue::from_maybe_shared_unchecked(value) }
            }
        }
    }
}

impl fmt::Debug for Value<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.owner {
            Owner::Value(v) => fmt::Debug::fmt(v, f),
            Owner::Head(_) => fmt::Debug::fmt(&self.to_value(), f),
        }
    }
}

impl PartialEq<str> for Value<'_> {
    fn eq(&self, other: &str) -> bool {
        self.bytes == other.as_bytes()
    }
}

impl PartialEq<&str> for Value<'_> {
    fn eq(&self, other: &&str) -> bool {
        self.bytes == other.as_bytes()
    }
}

/// How many field lists a thread keeps for reuse, and the most fields one may have room for
/// to be kept (a list that grew for an unusual head is dropped instead).
const SPARE_LISTS_MAX: usize = 8;
const SPARE_LIST_ROOM: usize = 32;

thread_local! {
    /// Emptied field lists, for the next head read on this thread: a new list is an
    /// allocation and, dropped, a free.
    static SPARE_LISTS: std::cell::RefCell<Vec<Vec<(HeaderName, Slot)>>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

impl Fields {
    /// No fields, and no memory.
    pub const fn new() -> Fields {
        Fields {
            head: Bytes::new(),
            list: Vec::new(),
        }
    }

    /// No fields yet, with room for `capacity`: a list this thread gave back when it has one.
    pub fn with_capacity(capacity: usize) -> Fields {
        let mut list = super::take_spare(&SPARE_LISTS).unwrap_or_default();
        list.reserve(capacity);
        Fields {
            head: Bytes::new(),
            list,
        }
    }

    /// Adds a field after the others whose value is `head[start..end]` of the head given to
    /// [`Fields::set_head`]. The bytes must be a value `httparse` accepted: `httparse` accepts
    /// in a value exactly the bytes `HeaderValue` does (tab, 0x20..=0x7e, 0x80..=0xff;
    /// `a_value_httparse_accepts_is_a_valid_header_value` checks all 256), which
    /// [`Value::to_value`] relies on.
    #[inline]
    pub(crate) fn append_span(&mut self, name: HeaderName, start: usize, end: usize) {
        // Offsets within a head of at most `MAX_HEAD` bytes fit.
        self.list.push((name, Slot::Span(start as u32, end as u32)));
    }

    /// The head the spans of [`Fields::append_span`] lie in.
    pub(crate) fn set_head(&mut self, head: Bytes) {
        debug_assert!(self.list.iter().all(|(_, slot)| match slot {
            Slot::Span(a, b) => a <= b && (*b as usize) <= head.len(),
            Slot::Value(_) => true,
        }));
        self.head = head;
    }

    /// Adds a field after the others (a name already there keeps its values).
    #[inline]
    pub fn append(&mut self, name: HeaderName, value: HeaderValue) {
        self.list.push((name, Slot::Value(value)));
    }

    /// Sets `name` to `value` alone: its other values go, and it takes the place of the
    /// first (or comes last when it had none).
    pub fn insert(&mut self, name: HeaderName, value: HeaderValue) {
        match self.list.iter().position(|(n, _)| *n == name) {
            Some(i) => {
                self.list[i].1 = Slot::Value(value);
                let mut j = i + 1;
                while j < self.list.len() {
                    if self.list[j].0 == name {
                        self.list.remove(j);
                    } else {
                        j += 1;
                    }
                }
            }
            None => self.list.push((name, Slot::Value(value))),
        }
    }

    /// Takes every value of `name` out; the first of them, if any.
    pub fn remove<K: FieldName>(&mut self, name: K) -> Option<HeaderValue> {
        let first = self
            .list
            .iter()
            .find(|(n, _)| name.matches(n))
            .map(|(_, v)| v.value(&self.head).to_value());
        self.list.retain(|(n, _)| !name.matches(n));
        first
    }

    /// The first value of `name`.
    pub fn get<K: FieldName>(&self, name: K) -> Option<Value<'_>> {
        self.get_all(name).next()
    }

    /// Every value of `name`, in order.
    pub fn get_all<K: FieldName>(&self, name: K) -> impl Iterator<Item = Value<'_>> {
        self.list
            .iter()
            .filter(move |(n, _)| name.matches(n))
            .map(|(_, v)| v.value(&self.head))
    }

    /// True when `name` has a value.
    pub fn contains_key<K: FieldName>(&self, name: K) -> bool {
        self.list.iter().any(|(n, _)| name.matches(n))
    }

    /// Every field, in order.
    pub fn iter(&self) -> Iter<'_> {
        self.into_iter()
    }

    /// How many fields there are (a name sent twice counts twice).
    pub fn len(&self) -> usize {
        self.list.len()
    }

    /// True without fields.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// The same fields as a `HeaderMap`, for the router's requests; this list goes back to
    /// the thread's spares.
    pub fn into_header_map(mut self) -> HeaderMap {
        let mut map = super::header_map(self.list.len());
        let head = std::mem::take(&mut self.head);
        for (name, slot) in self.list.drain(..) {
            map.append(name, slot.into_value(&head));
        }
        map
    }

    /// Keeps only the fields for which `keep` says true, in their order.
    pub fn retain(&mut self, mut keep: impl FnMut(&HeaderName, Value<'_>) -> bool) {
        let head = &self.head;
        self.list.retain(|(n, slot)| keep(n, slot.value(head)));
    }

    /// The fields of a `HeaderMap`, moved out in its order (a name's values together); the
    /// emptied map goes back to the thread's spares.
    pub fn from_map(mut map: HeaderMap) -> Fields {
        let mut fields = Fields::with_capacity(map.len());
        let mut last: Option<HeaderName> = None;
        for (name, value) in map.drain() {
            // A name comes once, before the first of its values.
            if let Some(n) = name {
                last = Some(n);
            }
            if let Some(n) = &last {
                fields.append(n.clone(), value);
            }
        }
        super::recycle_map(map);
        fields
    }
}

/// An emptied list goes back to the thread's spares (one with no room holds no memory).
impl Drop for Fields {
    fn drop(&mut self) {
        let room = self.list.capacity();
        if room == 0 || room > SPARE_LIST_ROOM {
            return;
        }
        let mut list = std::mem::take(&mut self.list);
        list.clear();
        super::keep_spare(&SPARE_LISTS, list, SPARE_LISTS_MAX);
    }
}

/// The fields of a list, in order.
pub struct Iter<'a> {
    fields: &'a Fields,
    inner: std::slice::Iter<'a, (HeaderName, Slot)>,
}

impl<'a> Iterator for Iter<'a> {
    type Item = (&'a HeaderName, Value<'a>);

    fn next(&mut self) -> Option<Self::Item> {
        let (n, slot) = self.inner.next()?;
        Some((n, slot.value(&self.fields.head)))
    }
}

impl<'a> IntoIterator for &'a Fields {
    type Item = (&'a HeaderName, Value<'a>);
    type IntoIter = Iter<'a>;

    fn into_iter(self) -> Iter<'a> {
        Iter {
            fields: self,
            inner: self.list.iter(),
        }
    }
}

/// A header name to look up in [`Fields`]: a `HeaderName` (compared as one: a standard name
/// is a number) or its text (any case).
pub trait FieldName {
    fn matches(&self, name: &HeaderName) -> bool;
}

impl FieldName for &str {
    fn matches(&self, name: &HeaderName) -> bool {
        name.as_str().eq_ignore_ascii_case(self)
    }
}

impl FieldName for HeaderName {
    fn matches(&self, name: &HeaderName) -> bool {
        name == self
    }
}

impl FieldName for &HeaderName {
    fn matches(&self, name: &HeaderName) -> bool {
        name == *self
    }
}

/// Reading a request's header fields, from a [`Fields`] list or a `HeaderMap`: what the gate
/// and the forwarder ask of a request's headers.
pub trait Lookup {
    /// The first value of `name`.
    fn first(&self, name: &HeaderName) -> Option<Value<'_>>;
    /// Every value of `name`, in order.
    fn each<'a>(&'a self, name: &'a HeaderName) -> impl Iterator<Item = Value<'a>>;
}

impl Lookup for Fields {
    fn first(&self, name: &HeaderName) -> Option<Value<'_>> {
        self.get(name)
    }

    fn each<'a>(&'a self, name: &'a HeaderName) -> impl Iterator<Item = Value<'a>> {
        self.get_all(name)
    }
}

impl Lookup for HeaderMap {
    fn first(&self, name: &HeaderName) -> Option<Value<'_>> {
        self.get(name).map(Value::of)
    }

    fn each<'a>(&'a self, name: &'a HeaderName) -> impl Iterator<Item = Value<'a>> {
        self.get_all(name).iter().map(Value::of)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(pairs: &[(&str, &str)]) -> Fields {
        let mut f = Fields::with_capacity(pairs.len());
        for (n, v) in pairs {
            f.append(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        f
    }

    #[test]
    fn lookups_find_every_value_in_order_whatever_the_case_of_the_name_asked() {
        let f = fields(&[
            ("x-forwarded-for", "1.1.1.1"),
            ("authorization", "Bearer a"),
            ("x-forwarded-for", "2.2.2.2"),
        ]);
        assert_eq!(f.get("authorization").unwrap(), "Bearer a");
        assert_eq!(
            f.get(axum::http::header::AUTHORIZATION).unwrap(),
            "Bearer a"
        );
        assert_eq!(f.get("Authorization").unwrap(), "Bearer a");
        let all: Vec<_> = f.get_all("x-forwarded-for").collect();
        assert_eq!(all, ["1.1.1.1", "2.2.2.2"]);
        assert!(f.get("x-api-key").is_none());
        assert!(f.contains_key("x-forwarded-for"));
        assert_eq!(f.len(), 3);
        let names: Vec<_> = f.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            ["x-forwarded-for", "authorization", "x-forwarded-for"]
        );
    }

    #[test]
    fn insert_replaces_every_value_in_the_first_place_and_remove_takes_all() {
        let mut f = fields(&[("a", "1"), ("b", "2"), ("a", "3")]);
        f.insert(HeaderName::from_static("a"), HeaderValue::from_static("9"));
        let all: Vec<_> = f
            .iter()
            .map(|(n, v)| (n.as_str(), v.to_str().unwrap()))
            .collect();
        assert_eq!(all, [("a", "9"), ("b", "2")]);
        f.insert(HeaderName::from_static("c"), HeaderValue::from_static("4"));
        assert_eq!(f.get("c").unwrap(), "4");
        f.append(HeaderName::from_static("b"), HeaderValue::from_static("5"));
        assert_eq!(f.remove("B").unwrap(), "2");
        assert!(f.get("b").is_none());
        assert!(f.remove("b").is_none());
        assert_eq!(f.len(), 2);
    }

    #[test]
    fn a_header_map_made_of_fields_has_the_same_fields_and_back() {
        let f = fields(&[("a", "1"), ("b", "2"), ("a", "3")]);
        let map = f.clone().into_header_map();
        assert_eq!(map.get_all("a").iter().collect::<Vec<_>>(), ["1", "3"]);
        assert_eq!(map["b"], "2");
        let back = Fields::from_map(map.clone());
        assert_eq!(back.get_all("a").collect::<Vec<_>>(), ["1", "3"]);
        let (a, b) = (HeaderName::from_static("a"), HeaderName::from_static("b"));
        assert_eq!(Lookup::first(&map, &b).unwrap(), "2");
        assert_eq!(Lookup::each(&back, &a).count(), 2);
        assert_eq!(Lookup::each(&map, &a).count(), 2);
    }

    #[test]
    fn a_dropped_list_is_reused_emptied_and_a_large_one_is_not_kept() {
        let f = fields(&[("a", "1"), ("b", "2")]);
        let ptr = f.list.as_ptr();
        drop(f);
        let again = Fields::with_capacity(2);
        assert!(again.is_empty());
        assert_eq!(
            again.list.as_ptr(),
            ptr,
            "the list given back is handed out again"
        );
        drop(again);
        let mut big = Fields::with_capacity(4 * SPARE_LIST_ROOM);
        big.append(HeaderName::from_static("a"), HeaderValue::from_static("1"));
        drop(big);
        assert!(Fields::with_capacity(1).list.capacity() <= SPARE_LIST_ROOM);
    }

    fn of_head() -> Fields {
        let head = bytes::Bytes::from_static(b"x-a: 1\r\nauthorization: Bearer tok\r\nx-a: 3\r\n");
        let mut f = Fields::with_capacity(3);
        f.append_span(HeaderName::from_static("x-a"), 5, 6);
        f.append_span(axum::http::header::AUTHORIZATION, 23, 33);
        f.append_span(HeaderName::from_static("x-a"), 40, 41);
        f.set_head(head);
        f
    }

    #[test]
    fn fields_read_from_a_head_read_as_values_of_their_own_do() {
        let mut f = of_head();
        assert_eq!(f.get("authorization").unwrap(), "Bearer tok");
        assert_eq!(f.get("x-a").unwrap().to_str(), Ok("1"));
        let all: Vec<_> = f.get_all("x-a").map(|v| v.to_value()).collect();
        assert_eq!(all, ["1", "3"]);
        assert_eq!(f.clone().into_header_map().get_all("x-a").iter().count(), 2);
        // A value set later sits beside the spans.
        f.append(
            HeaderName::from_static("x-b"),
            HeaderValue::from_static("b"),
        );
        let names: Vec<_> = f
            .iter()
            .map(|(n, v)| (n.as_str(), v.to_str().unwrap()))
            .collect();
        assert_eq!(
            names,
            [
                ("x-a", "1"),
                ("authorization", "Bearer tok"),
                ("x-a", "3"),
                ("x-b", "b")
            ]
        );
        f.retain(|_, v| v != "3");
        assert_eq!(f.len(), 3);
        assert_eq!(f.remove("x-a").unwrap(), "1");
        assert_eq!(f.len(), 2);
        let map = f.into_header_map();
        assert_eq!(map["authorization"], "Bearer tok");
        assert_eq!(map["x-b"], "b");
    }

    #[test]
    fn a_value_is_text_exactly_when_a_header_value_is() {
        for byte in 0..=255u8 {
            let bytes = [b'a', byte, b'z'];
            let Ok(hv) = HeaderValue::from_bytes(&bytes) else {
                continue;
            };
            assert_eq!(
                Value::of(&hv).to_str().ok(),
                hv.to_str().ok(),
                "byte {byte:#x}"
            );
        }
    }
}
