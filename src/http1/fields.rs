//! Header fields as the request path keeps them (issue 18): a client's request's, and the
//! request sent upstream. A short list in the order sent, looked up by walking it: a request
//! carries a handful of fields, and the path reads a few of them once each, where `HeaderMap`
//! hashes every name on insert and lookup and keeps an index beside the entries (about 170
//! instructions per field appended, callgrind, against a few for a push). [`Lookup`] reads
//! either, so that the gate's rules have one home for the straight path and the router's
//! requests.

use axum::http::header::HeaderName;
use axum::http::{HeaderMap, HeaderValue};

/// Header fields in the order they came, duplicates kept.
#[derive(Debug, Default, Clone)]
pub struct Fields {
    list: Vec<(HeaderName, HeaderValue)>,
}

/// How many field lists a thread keeps for reuse, and the most fields one may have room for
/// to be kept (a list that grew for an unusual head is dropped instead).
const SPARE_LISTS_MAX: usize = 8;
const SPARE_LIST_ROOM: usize = 32;

thread_local! {
    /// Emptied field lists, for the next head read on this thread: a new list is an
    /// allocation and, dropped, a free.
    static SPARE_LISTS: std::cell::RefCell<Vec<Vec<(HeaderName, HeaderValue)>>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

impl Fields {
    /// No fields, and no memory.
    pub const fn new() -> Fields {
        Fields { list: Vec::new() }
    }

    /// No fields yet, with room for `capacity`: a list this thread gave back when it has one.
    pub fn with_capacity(capacity: usize) -> Fields {
        let mut list = super::take_spare(&SPARE_LISTS).unwrap_or_default();
        list.reserve(capacity);
        Fields { list }
    }

    /// Adds a field after the others (a name already there keeps its values).
    #[inline]
    pub fn append(&mut self, name: HeaderName, value: HeaderValue) {
        self.list.push((name, value));
    }

    /// Sets `name` to `value` alone: its other values go, and it takes the place of the
    /// first (or comes last when it had none).
    pub fn insert(&mut self, name: HeaderName, value: HeaderValue) {
        match self.list.iter().position(|(n, _)| *n == name) {
            Some(i) => {
                self.list[i].1 = value;
                let mut j = i + 1;
                while j < self.list.len() {
                    if self.list[j].0 == name {
                        self.list.remove(j);
                    } else {
                        j += 1;
                    }
                }
            }
            None => self.list.push((name, value)),
        }
    }

    /// Takes every value of `name` out; the first of them, if any.
    pub fn remove<K: FieldName>(&mut self, name: K) -> Option<HeaderValue> {
        let first = self
            .list
            .iter()
            .find(|(n, _)| name.matches(n))
            .map(|(_, v)| v.clone());
        self.list.retain(|(n, _)| !name.matches(n));
        first
    }

    /// The first value of `name`.
    pub fn get<K: FieldName>(&self, name: K) -> Option<&HeaderValue> {
        self.get_all(name).next()
    }

    /// Every value of `name`, in order.
    pub fn get_all<K: FieldName>(&self, name: K) -> impl Iterator<Item = &HeaderValue> {
        self.list
            .iter()
            .filter(move |(n, _)| name.matches(n))
            .map(|(_, v)| v)
    }

    /// True when `name` has a value.
    pub fn contains_key<K: FieldName>(&self, name: K) -> bool {
        self.get(name).is_some()
    }

    /// Every field, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&HeaderName, &HeaderValue)> {
        self.list.iter().map(|(n, v)| (n, v))
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
        for (name, value) in self.list.drain(..) {
            map.append(name, value);
        }
        map
    }

    /// Keeps only the fields for which `keep` says true, in their order.
    pub fn retain(&mut self, mut keep: impl FnMut(&HeaderName, &HeaderValue) -> bool) {
        self.list.retain(|(n, v)| keep(n, v));
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

impl<'a> IntoIterator for &'a Fields {
    type Item = (&'a HeaderName, &'a HeaderValue);
    type IntoIter = std::iter::Map<
        std::slice::Iter<'a, (HeaderName, HeaderValue)>,
        fn(&'a (HeaderName, HeaderValue)) -> (&'a HeaderName, &'a HeaderValue),
    >;

    fn into_iter(self) -> Self::IntoIter {
        self.list.iter().map(|(n, v)| (n, v))
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
    fn first(&self, name: &HeaderName) -> Option<&HeaderValue>;
    /// Every value of `name`, in order.
    fn each<'a>(&'a self, name: &'a HeaderName) -> impl Iterator<Item = &'a HeaderValue>;
}

impl Lookup for Fields {
    fn first(&self, name: &HeaderName) -> Option<&HeaderValue> {
        self.get(name)
    }

    fn each<'a>(&'a self, name: &'a HeaderName) -> impl Iterator<Item = &'a HeaderValue> {
        self.get_all(name)
    }
}

impl Lookup for HeaderMap {
    fn first(&self, name: &HeaderName) -> Option<&HeaderValue> {
        self.get(name)
    }

    fn each<'a>(&'a self, name: &'a HeaderName) -> impl Iterator<Item = &'a HeaderValue> {
        self.get_all(name).iter()
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
}
