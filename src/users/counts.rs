//! Token counts and limits by model family (`tokenCounts`, `tokenLimits`, reservations): a
//! compact map with the API of the `BTreeMap<String, u64>` it replaces and the same JSON (an
//! object whose keys are in byte order).
//!
//! Why not a `BTreeMap<String, u64>`: with 100 000 users it was the largest part of the store.
//! A B-tree leaf is allocated for room for 11 entries (≈ 370 bytes) plus one `String` per
//! family, ≈ 550 bytes for the five limits a user typically has. Here a map ([`Counts`]) is
//! a list of 16-byte pairs, every family name is interned once for the whole process
//! ([`Family`]), and a user holds its maps through [`TokenCounts`], one pointer that is null
//! while the map is empty and is shared, copy-on-write, between users with equal maps (most
//! users have the same limits).
//!
//! The list keeps up to two pairs in the map's own allocation (a `SmallVec`), where a user's
//! counts and reservations (one or two families each) fit: reading them takes one pointer from
//! the user's entry, not two (the map, then its list), which with thousands of users in turn
//! is one memory read fewer waited for on every request (issue 18). The allocation is the 64
//! bytes that the map and its one-pair list took before in two.

use std::borrow::Borrow;
use std::cell::RefCell;
use std::collections::HashSet;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, LazyLock, RwLock};

use serde::de::{DeserializeSeed, MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use smallvec::SmallVec;

/// An interned model-family name: one pointer, compared by address.
///
/// Names are interned for the life of the process and never freed. That is bounded: the
/// request path only produces names from the fixed family table (`providers::families`), and any
/// other name comes from an administrator (an import, an edit) or from the store itself.
#[derive(Clone, Copy)]
pub struct Family(&'static Name);

/// The interned text. A sized wrapper, so that [`Family`] is a thin pointer.
struct Name(Box<str>);

/// The interner's key: hashes and compares as the text, so it can be looked up by `&str`.
#[derive(Clone, Copy)]
struct Interned(&'static Name);

impl Hash for Interned {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0 .0.hash(state)
    }
}
impl PartialEq for Interned {
    fn eq(&self, other: &Interned) -> bool {
        self.0 .0 == other.0 .0
    }
}
impl Eq for Interned {}
impl Borrow<str> for Interned {
    fn borrow(&self) -> &str {
        &self.0 .0
    }
}

static NAMES: LazyLock<RwLock<HashSet<Interned>>> = LazyLock::new(Default::default);

thread_local! {
    /// The families this thread interned last, newest first.
    static RECENT: RefCell<[Option<Family>; 8]> = const { RefCell::new([None; 8]) };
}

impl Family {
    /// The family named `name`, interning the name on first use.
    pub fn intern(name: &str) -> Family {
        // A few names make up nearly every lookup (the families of one import, or of the
        // requests on this thread): a short list of recent ones spares the shared set's lock
        // and hash.
        RECENT.with(|recent| {
            let mut recent = recent.borrow_mut();
            // An interned name itself (the request path's) is found by its address.
            let same = |f: &&Family| std::ptr::eq(f.as_str(), name) || f.as_str() == name;
            if let Some(f) = recent.iter().flatten().find(same) {
                return *f;
            }
            let f = Family::intern_shared(name);
            recent.rotate_right(1);
            recent[0] = Some(f);
            f
        })
    }

    /// [`Family::intern`] for a name that lives as long as the process (the family table's),
    /// remembered per thread by its address: a name that is never freed never changes, so the
    /// same address is the same family, found without comparing text.
    pub fn intern_static(name: &'static str) -> Family {
        thread_local! {
            static LAST: std::cell::Cell<Option<(&'static str, Family)>> = const { std::cell::Cell::new(None) };
        }
        LAST.with(|last| {
            if let Some((n, f)) = last.get() {
                if std::ptr::eq(n, name) {
                    return f;
                }
            }
            let f = Family::intern(name);
            last.set(Some((name, f)));
            f
        })
    }

    fn intern_shared(name: &str) -> Family {
        // The set only ever grows and holds plain data: a panic elsewhere cannot leave it
        // inconsistent, so a poisoned lock is still usable.
        if let Some(i) = NAMES.read().unwrap_or_else(|p| p.into_inner()).get(name) {
            return Family(i.0);
        }
        let mut names = NAMES.write().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = names.get(name) {
            return Family(i.0);
        }
        let leaked: &'static Name = Box::leak(Box::new(Name(name.into())));
        names.insert(Interned(leaked));
        Family(leaked)
    }

    pub fn as_str(self) -> &'static str {
        &self.0 .0
    }
}

impl PartialEq for Family {
    fn eq(&self, other: &Family) -> bool {
        // Interned: one name, one address.
        std::ptr::eq(self.0, other.0)
    }
}
impl Eq for Family {}

impl fmt::Debug for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}
impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A map of model family to count, kept sorted by family name in byte order (the order of
/// the `BTreeMap<String, u64>` this replaces, and so of the JSON keys). Users hold it through
/// [`TokenCounts`].
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Counts(SmallVec<[(Family, u64); 2]>);

impl Counts {
    pub fn new() -> Counts {
        Counts(SmallVec::new())
    }

    fn position(&self, family: &str) -> Result<usize, usize> {
        // The request path looks families up by their interned name (`Family::as_str`): found
        // by address and length, a few instructions per entry, where the search by text
        // compares bytes (about 100 instructions a lookup, eight lookups a request; issue 18).
        if let Some(i) = self
            .0
            .iter()
            .position(|(f, _)| std::ptr::eq(f.as_str(), family))
        {
            return Ok(i);
        }
        self.0.binary_search_by(|(f, _)| f.as_str().cmp(family))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn contains_key(&self, family: &str) -> bool {
        self.position(family).is_ok()
    }

    pub fn get(&self, family: &str) -> Option<&u64> {
        self.position(family).ok().map(|i| &self.0[i].1)
    }

    pub fn get_mut(&mut self, family: &str) -> Option<&mut u64> {
        self.position(family).ok().map(|i| &mut self.0[i].1)
    }

    /// Sets the count of `family`, returning the previous one.
    pub fn insert(&mut self, family: impl AsRef<str>, n: u64) -> Option<u64> {
        let family = family.as_ref();
        match self.position(family) {
            Ok(i) => Some(std::mem::replace(&mut self.0[i].1, n)),
            Err(i) => {
                self.0.insert(i, (Family::intern(family), n));
                None
            }
        }
    }

    pub fn remove(&mut self, family: &str) -> Option<u64> {
        self.position(family).ok().map(|i| self.0.remove(i).1)
    }

    /// The count of `family`, to change in place or to insert (as `BTreeMap::entry`).
    pub fn entry(&mut self, family: impl AsRef<str>) -> CountEntry<'_> {
        let family = family.as_ref();
        let slot = match self.position(family) {
            Ok(i) => Slot::Occupied(i),
            Err(i) => Slot::Vacant(i, Family::intern(family)),
        };
        CountEntry { counts: self, slot }
    }

    /// The count of `family`, inserting `default` first when absent.
    pub fn get_or_insert(&mut self, family: &str, default: u64) -> &mut u64 {
        self.entry(family).or_insert(default)
    }

    /// Families and counts, in family-name order.
    pub fn iter(&self) -> Iter<'_> {
        Iter(self.0.iter())
    }

    pub fn keys(&self) -> impl Iterator<Item = &str> + '_ {
        self.0.iter().map(|(f, _)| f.as_str())
    }

    pub fn values(&self) -> impl Iterator<Item = &u64> + '_ {
        self.0.iter().map(|(_, n)| n)
    }

    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut u64> + '_ {
        self.0.iter_mut().map(|(_, n)| n)
    }

    pub fn clear(&mut self) {
        self.0.clear()
    }

    /// Room for `n` families, allocated once: the map is then exactly as large as it needs.
    pub fn with_capacity(n: usize) -> Counts {
        Counts(SmallVec::with_capacity(n))
    }

    /// Puts pairs collected in any order into name order; of repeated names the last wins,
    /// as with repeated keys inserted into a map (and in a JSON object). The result is
    /// allocated once, at its final size: a map that grew would leave the smaller allocations
    /// it outgrew behind as holes between the users of a bulk load.
    fn from_unsorted(pairs: &mut [(Family, u64)]) -> Counts {
        // A stable sort keeps repeated names in their original order, so the last is last.
        pairs.sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
        let unique = pairs.len() - pairs.windows(2).filter(|w| w[0].0 == w[1].0).count();
        let mut out: SmallVec<[(Family, u64); 2]> = SmallVec::with_capacity(unique);
        for &(f, n) in pairs.iter() {
            match out.last_mut() {
                Some(last) if last.0 == f => last.1 = n,
                _ => out.push((f, n)),
            }
        }
        Counts(out)
    }
}

/// Pairs being collected, on the stack while there are few.
type Pairs = SmallVec<[(Family, u64); 16]>;

/// An entry of [`Counts`], as returned by [`Counts::entry`].
pub struct CountEntry<'a> {
    counts: &'a mut Counts,
    slot: Slot,
}

enum Slot {
    Occupied(usize),
    /// Where the family goes, in name order.
    Vacant(usize, Family),
}

impl<'a> CountEntry<'a> {
    pub fn or_insert(self, default: u64) -> &'a mut u64 {
        let i = match self.slot {
            Slot::Occupied(i) => i,
            Slot::Vacant(i, family) => {
                self.counts.0.insert(i, (family, default));
                i
            }
        };
        &mut self.counts.0[i].1
    }

    pub fn or_default(self) -> &'a mut u64 {
        self.or_insert(0)
    }
}

impl fmt::Debug for Counts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

/// The families and counts of a [`Counts`], in name order.
pub struct Iter<'a>(std::slice::Iter<'a, (Family, u64)>);

impl<'a> Iterator for Iter<'a> {
    type Item = (&'a str, &'a u64);
    fn next(&mut self) -> Option<(&'a str, &'a u64)> {
        self.0.next().map(|(f, n)| (f.as_str(), n))
    }
    fn size_hint(&self) -> (usize, Option<usize>) {
        self.0.size_hint()
    }
}

impl<'a> IntoIterator for &'a Counts {
    type Item = (&'a str, &'a u64);
    type IntoIter = Iter<'a>;
    fn into_iter(self) -> Iter<'a> {
        self.iter()
    }
}

impl<K: AsRef<str>> FromIterator<(K, u64)> for Counts {
    fn from_iter<I: IntoIterator<Item = (K, u64)>>(iter: I) -> Counts {
        let mut pairs: Pairs = iter
            .into_iter()
            .map(|(k, n)| (Family::intern(k.as_ref()), n))
            .collect();
        Counts::from_unsorted(&mut pairs)
    }
}

impl<'a, K: AsRef<str>> FromIterator<(K, &'a u64)> for Counts {
    fn from_iter<I: IntoIterator<Item = (K, &'a u64)>>(iter: I) -> Counts {
        iter.into_iter().map(|(k, n)| (k, *n)).collect()
    }
}

impl Serialize for Counts {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (f, n) in self.0.iter() {
            map.serialize_entry(f.as_str(), n)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for Counts {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Counts, D::Error> {
        d.deserialize_map(CountsVisitor)
    }
}

struct CountsVisitor;

impl<'de> Visitor<'de> for CountsVisitor {
    type Value = Counts;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object of model family to token count")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Counts, A::Error> {
        let mut pairs = Pairs::new();
        while let Some(family) = map.next_key_seed(FamilySeed)? {
            pairs.push((family, map.next_value::<u64>()?));
        }
        // Stored records are usually in order already; sorting them is then one pass.
        Ok(Counts::from_unsorted(&mut pairs))
    }
}

/// Interns a family name straight from the input, without an intermediate `String`.
struct FamilySeed;

impl<'de> DeserializeSeed<'de> for FamilySeed {
    type Value = Family;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Family, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for FamilySeed {
    type Value = Family;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a model family name")
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Family, E> {
        Ok(Family::intern(v))
    }
}

/// What a user holds: a [`Counts`] shared copy-on-write between equal maps, or nothing while
/// the map is empty. Reads go through `Deref`; changes through `DerefMut` copy a shared map
/// first. Maps built from input (JSON, imports, the configured quotas) are shared with the
/// last equal map built on the same thread, which makes the users of a bulk import or of a
/// load from the store share their limits.
#[derive(Clone, Default)]
pub struct TokenCounts(Option<Arc<Counts>>);

static EMPTY: LazyLock<Counts> = LazyLock::new(Counts::new);

thread_local! {
    /// The map most recently built on this thread, to share with the next equal one.
    static LAST: RefCell<Option<Arc<Counts>>> = const { RefCell::new(None) };
}

impl TokenCounts {
    pub fn new() -> TokenCounts {
        TokenCounts(None)
    }

    /// Starts loading the map's cache line, with its pairs when they are held inline (see
    /// [`super::prefetch`]).
    pub(crate) fn prefetch(&self) {
        if let Some(counts) = &self.0 {
            super::prefetch(Arc::as_ptr(counts));
        }
    }

    /// Sets the count of `family`, returning the previous one. Setting a count to the value
    /// it has does not copy a shared map (a quota refresh that changes nothing stays cheap).
    pub fn insert(&mut self, family: impl AsRef<str>, n: u64) -> Option<u64> {
        let family = family.as_ref();
        match self.get(family) {
            Some(&old) if old == n => Some(old),
            _ => (**self).insert(family, n),
        }
    }
}

impl From<Counts> for TokenCounts {
    fn from(counts: Counts) -> TokenCounts {
        if counts.is_empty() {
            return TokenCounts(None);
        }
        LAST.with(|last| {
            let mut last = last.borrow_mut();
            if let Some(shared) = last.as_ref().filter(|l| ***l == counts) {
                return TokenCounts(Some(Arc::clone(shared)));
            }
            let shared = Arc::new(counts);
            *last = Some(Arc::clone(&shared));
            TokenCounts(Some(shared))
        })
    }
}

impl std::ops::Deref for TokenCounts {
    type Target = Counts;
    fn deref(&self) -> &Counts {
        self.0.as_deref().unwrap_or(&EMPTY)
    }
}

impl std::ops::DerefMut for TokenCounts {
    fn deref_mut(&mut self) -> &mut Counts {
        Arc::make_mut(self.0.get_or_insert_with(Default::default))
    }
}

impl PartialEq for TokenCounts {
    fn eq(&self, other: &TokenCounts) -> bool {
        **self == **other
    }
}
impl Eq for TokenCounts {}

impl fmt::Debug for TokenCounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}

impl<'a> IntoIterator for &'a TokenCounts {
    type Item = (&'a str, &'a u64);
    type IntoIter = Iter<'a>;
    fn into_iter(self) -> Iter<'a> {
        self.iter()
    }
}

impl<K: AsRef<str>> FromIterator<(K, u64)> for TokenCounts {
    fn from_iter<I: IntoIterator<Item = (K, u64)>>(iter: I) -> TokenCounts {
        Counts::from_iter(iter).into()
    }
}

impl<'a, K: AsRef<str>> FromIterator<(K, &'a u64)> for TokenCounts {
    fn from_iter<I: IntoIterator<Item = (K, &'a u64)>>(iter: I) -> TokenCounts {
        Counts::from_iter(iter).into()
    }
}

impl Serialize for TokenCounts {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        (**self).serialize(s)
    }
}

impl<'de> Deserialize<'de> for TokenCounts {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<TokenCounts, D::Error> {
        Counts::deserialize(d).map(TokenCounts::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn is_small() {
        assert_eq!(std::mem::size_of::<Family>(), 8);
        assert_eq!(std::mem::size_of::<TokenCounts>(), 8);
    }

    #[test]
    fn a_static_name_is_interned_as_its_text_is() {
        let a: &'static str = "gpt4-static-test";
        let b: &'static str = Box::leak(String::from("gpt4-static-test").into_boxed_str());
        let c: &'static str = "claude-static-test";
        assert_eq!(Family::intern_static(a), Family::intern("gpt4-static-test"));
        assert_eq!(Family::intern_static(b), Family::intern_static(a));
        assert_eq!(Family::intern_static(c).as_str(), "claude-static-test");
        assert_eq!(Family::intern_static(a).as_str(), "gpt4-static-test");
    }

    /// A family is found by its interned name (by address) and by any other copy of its text
    /// (by bytes) alike; a name that is only a prefix, or absent, is not.
    #[test]
    fn a_family_is_found_by_its_interned_name_or_its_text() {
        let mut c: Counts = [("gpt4", 1), ("gpt4o", 2), ("turbo", 3)]
            .into_iter()
            .collect();
        let interned = Family::intern("gpt4o").as_str();
        let copy = String::from("gpt4o");
        assert_eq!(c.get(interned), Some(&2));
        assert_eq!(c.get(&copy), Some(&2));
        assert_eq!(c.get(&copy[..4]), Some(&1));
        assert_eq!(c.get("claude"), None);
        *c.get_or_insert(Family::intern("claude").as_str(), 0) += 4;
        assert_eq!(
            c.keys().collect::<Vec<_>>(),
            ["claude", "gpt4", "gpt4o", "turbo"]
        );
        assert_eq!(c.remove(interned), Some(2));
        assert_eq!(c.get("gpt4o"), None);
    }

    #[test]
    #[cfg(target_pointer_width = "64")]
    fn a_shared_map_with_its_first_pairs_is_one_64_byte_allocation() {
        // The reference counts (16 bytes) and the map.
        assert!(
            std::mem::size_of::<Counts>() <= 48,
            "{}",
            std::mem::size_of::<Counts>()
        );
        let c: Counts = [("x", 1), ("y", 2)].into_iter().collect();
        assert!(!c.0.spilled(), "two pairs are held inline");
    }

    #[test]
    fn parsed_maps_are_allocated_at_their_final_size() {
        let c: Counts =
            serde_json::from_str(r#"{"e":1,"d":1,"c":1,"b":1,"a":1,"b":2}"#).expect("parses");
        assert_eq!((c.len(), c.0.capacity()), (5, 5));
        let c: Counts = [("x", 1), ("y", 2)].into_iter().collect();
        assert_eq!(c.0.capacity(), 2);
    }

    #[test]
    fn equal_maps_are_shared_until_changed() {
        let json = r#"{"turbo":1000,"claude":2000}"#;
        let a: TokenCounts = serde_json::from_str(json).expect("parses");
        let b: TokenCounts = serde_json::from_str(json).expect("parses");
        let (Some(pa), Some(pb)) = (&a.0, &b.0) else {
            panic!("non-empty maps are allocated");
        };
        assert!(Arc::ptr_eq(pa, pb), "equal maps share one allocation");
        let mut c = b.clone();
        c.insert("turbo", 1000);
        assert!(
            Arc::ptr_eq(pa, c.0.as_ref().expect("set")),
            "an unchanged value copies nothing"
        );
        *c.entry("claude").or_insert(0) += 1;
        assert_eq!(
            (a.get("claude"), c.get("claude")),
            (Some(&2000), Some(&2001))
        );
        c.insert("gpt4", 5);
        assert_eq!(a.len(), 2);
        assert_eq!(c.len(), 3);
        let empty: TokenCounts = serde_json::from_str("{}").expect("parses");
        assert!(empty.0.is_none(), "an empty map allocates nothing");
        let mut d = TokenCounts::new();
        assert_eq!(d.get("x"), None);
        *d.entry("x").or_default() += 2;
        assert_eq!(d.get("x"), Some(&2));
        assert_eq!(serde_json::to_string(&d).expect("ser"), r#"{"x":2}"#);
    }

    #[test]
    fn interning_gives_one_family_per_name() {
        let a = Family::intern("claude");
        let b = Family::intern(&String::from("claude"));
        assert_eq!(a, b);
        assert_ne!(a, Family::intern("claude-opus"));
        assert_eq!(a.as_str(), "claude");
    }

    #[test]
    fn behaves_like_a_btreemap() {
        let mut c = TokenCounts::new();
        let mut m = BTreeMap::new();
        for (f, n) in [
            ("turbo", 1),
            ("gpt4", 2),
            ("claude", 3),
            ("gpt4", 4),
            ("a", 0),
        ] {
            assert_eq!(c.insert(f, n), m.insert(f.to_string(), n));
        }
        *c.entry("zz-new").or_insert(7) += 1;
        *m.entry("zz-new".to_string()).or_insert(7) += 1;
        *c.entry("turbo").or_insert(100) += 1;
        *m.entry("turbo".to_string()).or_insert(100) += 1;
        assert_eq!(c.remove("a"), m.remove("a"));
        assert_eq!(c.remove("missing"), m.remove("missing"));
        let mine: Vec<(String, u64)> = c.iter().map(|(f, n)| (f.to_string(), *n)).collect();
        let theirs: Vec<(String, u64)> = m.iter().map(|(f, n)| (f.clone(), *n)).collect();
        assert_eq!(mine, theirs);
        assert_eq!(c.get("gpt4"), Some(&4));
        assert_eq!(c.get("nope"), None);
        assert_eq!(c.len(), 4);
        c.values_mut().for_each(|n| *n = 0);
        assert!(c.values().all(|n| *n == 0));
    }

    #[test]
    fn json_round_trips_unknown_families_in_key_order() {
        let json = r#"{"turbo":5,"my-own-family":1,"gpt4":0,"Ünïcode \"x\"":9007199254740991}"#;
        let c: TokenCounts = serde_json::from_str(json).expect("parses");
        assert_eq!(c.get("my-own-family"), Some(&1));
        assert_eq!(c.get("Ünïcode \"x\""), Some(&9_007_199_254_740_991));
        let as_map: BTreeMap<String, u64> = serde_json::from_str(json).expect("parses");
        // Same output as the BTreeMap it replaces, byte for byte.
        assert_eq!(
            serde_json::to_string(&c).expect("serialises"),
            serde_json::to_string(&as_map).expect("serialises")
        );
        let back: TokenCounts =
            serde_json::from_str(&serde_json::to_string(&c).expect("serialises")).expect("parses");
        assert_eq!(back, c);
    }

    #[test]
    fn repeated_keys_keep_the_last_as_a_map_does() {
        let c: TokenCounts = serde_json::from_str(r#"{"b":1,"a":2,"b":3}"#).expect("parses");
        assert_eq!(serde_json::to_string(&c).expect("ser"), r#"{"a":2,"b":3}"#);
        let c: TokenCounts = [("x", 1), ("x", 2)].into_iter().collect();
        assert_eq!(c.get("x"), Some(&2));
    }

    #[test]
    fn refuses_what_a_map_of_u64_refuses() {
        for bad in [r#"{"a":-1}"#, r#"{"a":1.5}"#, r#"{"a":"1"}"#, "[]", "null"] {
            assert!(serde_json::from_str::<TokenCounts>(bad).is_err(), "{bad}");
            assert!(
                serde_json::from_str::<BTreeMap<String, u64>>(bad).is_err(),
                "{bad}"
            );
        }
    }
}
