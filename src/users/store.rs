//! The in-memory user store that every request reads. Users live in shards, each behind its
//! own read-write lock (no global lock); every change marks the user dirty so that the
//! persistence task can flush it. The store itself never does I/O.
//!
//! Why not a `DashMap<String, Entry>` (what this was): a map keeps its key apart from its value,
//! so every token was stored twice, and its table holds whole entries, so the empty slots of a
//! table sized for growth cost a whole entry each. Here a shard is a [`HashTable`] of boxed
//! entries found by their own token: a slot is one pointer, the token is kept once. Dirty
//! tracking is a flag in the entry plus per-shard counts, so a bulk import allocates nothing
//! besides the users themselves.

use std::collections::HashSet;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

use constant_time_eq::constant_time_eq;
use hashbrown::hash_table::{Entry as TableEntry, HashTable};
use tokio::sync::Notify;

use super::model::{TokenCounts, User};

/// A user plus request-path state that is never persisted.
#[derive(Debug, Clone)]
pub struct Entry {
    pub user: User,
    /// Tokens reserved by admitted requests that have not finished yet, by model family (a
    /// family whose requests all finished stays, at zero).
    pub reserved: TokenCounts,
    /// Changed since it was last taken for a flush.
    dirty: bool,
    /// A copy of the user's first address ([`Hot`]); kept equal to `user` by every change
    /// made through the store.
    hot: Hot,
}

/// The longest address text [`Hot`] holds: the longest IPv4 text. No more: the entry (240
/// bytes with it) must stay within the allocator's 256-byte size class (the next is 320).
const HOT_IP: usize = 15;
/// [`Hot`]'s length when it holds no address (none, or longer than [`HOT_IP`]).
const NOT_HELD: u8 = u8::MAX;

/// The text of the user's first address, in the entry itself (issue 18).
///
/// Why: with thousands of users in turn, a request's user is never in the cache, and the
/// addresses the gate compares the client's with live behind two pointers of the entry (the
/// list, then each address's text): two more memory reads, one after the other, on every
/// request. The usual user sends from one address; with its copy here, the gate's decision
/// reads the entry only (the token is in the entry too, [`super::Token`]). Any other address
/// is looked for in the list.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Hot {
    ip: [u8; HOT_IP],
    ip_len: u8,
}

impl Hot {
    fn of(user: &User) -> Hot {
        let mut hot = Hot {
            ip: [0; HOT_IP],
            ip_len: NOT_HELD,
        };
        if let Some(ip) = user.ip.first().map(String::as_bytes) {
            if ip.len() <= HOT_IP {
                hot.ip[..ip.len()].copy_from_slice(ip);
                hot.ip_len = ip.len() as u8;
            }
        }
        hot
    }

    /// Whether `ip` (an address's text) is one of the user's addresses: the first one compared
    /// here, the others in the list.
    #[inline(always)]
    fn knows_ip(&self, user: &User, ip: &[u8]) -> bool {
        if self.ip.get(..usize::from(self.ip_len)) == Some(ip) {
            return true;
        }
        user.ip.iter().any(|known| known.as_bytes() == ip)
    }
}

impl Entry {
    /// Starts loading, all at once, what a request reads of this entry besides the line
    /// already read: the entry's other lines and the counts (see [`super::prefetch`]).
    #[inline(always)]
    fn prefetch(&self) {
        // Every 64-byte line the entry overlaps (it does not start on a line's boundary).
        let at = (self as *const Entry).cast::<u8>();
        let last = at.wrapping_add(std::mem::size_of::<Entry>() - 1);
        let mut line = at.wrapping_sub(at as usize % 64);
        while line <= last {
            super::prefetch(line);
            line = line.wrapping_add(64);
        }
        self.user.token_counts.prefetch();
        self.reserved.prefetch();
    }

    fn new(user: User) -> Box<Entry> {
        let hot = Hot::of(&user);
        Box::new(Entry {
            user,
            reserved: TokenCounts::new(),
            dirty: false,
            hot,
        })
    }

    /// Makes the copy in [`Hot`] equal to the user again, after a change.
    fn sync(&mut self) {
        self.hot = Hot::of(&self.user);
    }

    /// Whether the copy is equal to the user (it is, after every change through the store;
    /// checked in debug builds after changes that leave it as it is).
    fn in_sync(&self) -> bool {
        Hot::of(&self.user) == self.hot
    }
}

/// Whether a stored token is the one presented, in time that does not depend on where they
/// differ: a token is a secret, and the table's hash match only narrows the candidates (a
/// short-circuiting `==` would tell a prober how much of a stored token it guessed).
#[inline(always)]
fn same_token(stored: &str, presented: &str) -> bool {
    constant_time_eq(stored.as_bytes(), presented.as_bytes())
}

/// Enough shards that writers of different users rarely meet; a power of two.
const SHARDS: usize = 64;

#[derive(Default)]
struct Shard {
    table: HashTable<Box<Entry>>,
    /// How many entries of this shard are dirty (a flush skips clean shards).
    dirty: usize,
}

/// A shard on a cache line of its own, so that locking one does not slow its neighbours.
#[derive(Default)]
#[repr(align(64))]
struct Padded(RwLock<Shard>);

pub struct UserStore {
    shards: Box<[Padded]>,
    /// foldhash, seeded per process (so a client cannot guess where a token lands), rather than
    /// SipHash: every request hashes its token once,
    /// and SipHash cost about 250 instructions of it (callgrind). The keys are tokens this
    /// server generates (or an administrator imports), never chosen by a client, so no client
    /// can fill the table with colliding keys.
    hasher: foldhash::quality::RandomState,
    /// Dirty entries in all shards.
    dirty: AtomicUsize,
    deleted: Mutex<HashSet<String>>,
    flush_requested: Notify,
    /// How many times a token was hashed (debug builds only; tests check that one request
    /// hashes its token once).
    #[cfg(debug_assertions)]
    hashed: AtomicUsize,
}

/// A user token's place in the store (its hash), computed once per request — by `auth` when
/// it admits the request — and handed on with the request, so that the quota's reservation
/// and settlement reach the entry without hashing the token again. Only valid for the store
/// that made it; the entry is still found by comparing the token itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UserKey(u64);

impl UserKey {
    /// The token's hash, random per process: a stand-in for the token where a request needs
    /// to tell users apart (the fair queue's callers) without hashing it again.
    pub fn as_u64(self) -> u64 {
        self.0
    }
}

impl Default for UserStore {
    fn default() -> UserStore {
        UserStore {
            shards: (0..SHARDS).map(|_| Padded::default()).collect(),
            hasher: foldhash::quality::RandomState::default(),
            dirty: AtomicUsize::new(0),
            deleted: Mutex::new(HashSet::new()),
            flush_requested: Notify::new(),
            #[cfg(debug_assertions)]
            hashed: AtomicUsize::new(0),
        }
    }
}

/// A batch taken for flushing: write `changed` and delete `deleted`; on failure hand it back
/// with [`UserStore::restore_batch`] so nothing is lost.
#[derive(Debug, Default)]
pub struct Batch {
    pub changed: Vec<User>,
    pub deleted: Vec<String>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.changed.is_empty() && self.deleted.is_empty()
    }
}

/// Marks `e` dirty, keeping the shard's and the store's counts.
fn mark(e: &mut Entry, shard_dirty: &mut usize, total: &AtomicUsize) {
    if !e.dirty {
        e.dirty = true;
        *shard_dirty += 1;
        total.fetch_add(1, Ordering::Relaxed);
    }
}

/// Clears `e`'s dirty mark, keeping the counts; returns whether it was dirty.
fn unmark(e: &mut Entry, shard_dirty: &mut usize, total: &AtomicUsize) -> bool {
    if e.dirty {
        e.dirty = false;
        *shard_dirty -= 1;
        total.fetch_sub(1, Ordering::Relaxed);
        true
    } else {
        false
    }
}

impl UserStore {
    pub fn new() -> Arc<UserStore> {
        Arc::new(UserStore::default())
    }

    fn hash(&self, token: &str) -> u64 {
        #[cfg(debug_assertions)]
        self.hashed.fetch_add(1, Ordering::Relaxed);
        self.hasher.hash_one(token)
    }

    /// The key of `token`, to hand on to later steps of the same request.
    pub fn key(&self, token: &str) -> UserKey {
        UserKey(self.hash(token))
    }

    /// How many times a token has been hashed (looked up) so far; always 0 in release builds.
    pub fn lookups(&self) -> usize {
        #[cfg(debug_assertions)]
        return self.hashed.load(Ordering::Relaxed);
        #[cfg(not(debug_assertions))]
        0
    }

    /// The shard of a hash: bits that neither the table's bucket index (low bits) nor its
    /// control byte (top 7 bits) uses, so a shard's entries still spread over its table.
    fn shard(&self, hash: u64) -> &RwLock<Shard> {
        &self.shards[((hash >> 51) as usize) & (SHARDS - 1)].0
    }

    // A closure that panicked under a lock may have left one user half changed, but never the
    // table itself; as with the `DashMap` before, the store goes on serving (no poisoning).
    fn read(lock: &RwLock<Shard>) -> RwLockReadGuard<'_, Shard> {
        lock.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(lock: &RwLock<Shard>) -> RwLockWriteGuard<'_, Shard> {
        lock.write().unwrap_or_else(|p| p.into_inner())
    }

    fn deleted(&self) -> MutexGuard<'_, HashSet<String>> {
        self.deleted.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the entry of `token` under its shard's write lock.
    fn with_entry_mut<R>(
        &self,
        token: &str,
        f: impl FnOnce(&mut Entry, &mut usize) -> R,
    ) -> Option<R> {
        self.with_entry_mut_at(self.key(token), token, f)
    }

    /// [`UserStore::with_entry_mut`] with the token's key already known.
    fn with_entry_mut_at<R>(
        &self,
        UserKey(hash): UserKey,
        token: &str,
        f: impl FnOnce(&mut Entry, &mut usize) -> R,
    ) -> Option<R> {
        let mut shard = Self::write(self.shard(hash));
        let Shard { table, dirty } = &mut *shard;
        table
            .find_mut(hash, |e| same_token(&e.user.token, token))
            .map(|e| f(e, dirty))
    }

    /// Runs `f` on the entry of `token`, first creating it with `create` when absent.
    fn with_entry_or_insert<R>(
        &self,
        token: &str,
        create: impl FnOnce() -> User,
        f: impl FnOnce(&mut Entry, &mut usize) -> R,
    ) -> R {
        let hash = self.hash(token);
        let mut shard = Self::write(self.shard(hash));
        let Shard { table, dirty } = &mut *shard;
        let entry = match table.entry(
            hash,
            |e| same_token(&e.user.token, token),
            |e| self.hasher.hash_one(e.user.token.as_str()),
        ) {
            TableEntry::Occupied(o) => o.into_mut(),
            TableEntry::Vacant(v) => v.insert(Entry::new(create())).into_mut(),
        };
        let r = f(entry, dirty);
        entry.sync();
        r
    }

    /// Puts users read from the backend at startup in place, without marking them dirty.
    pub fn load(&self, users: Vec<User>) {
        // Tables sized once for what is coming, rather than rehashed as they fill (shards
        // are filled evenly by the hash; a little room is left for the unevenness).
        let per_shard = users.len() / SHARDS + users.len() / SHARDS / 8;
        for s in self.shards.iter() {
            Self::write(&s.0)
                .table
                .reserve(per_shard, |e| self.hasher.hash_one(e.user.token.as_str()));
        }
        for user in users {
            self.load_one(user);
        }
    }

    /// Puts one user read from the backend in place, without marking it dirty.
    pub fn load_one(&self, user: User) {
        self.put(user, false);
    }

    /// Inserts or replaces a user (reservations in flight are kept), marking it dirty or not.
    fn put(&self, user: User, dirty: bool) {
        let hash = self.hash(&user.token);
        let mut shard = Self::write(self.shard(hash));
        let Shard {
            table,
            dirty: shard_dirty,
        } = &mut *shard;
        let e = match table.entry(
            hash,
            |e| same_token(&e.user.token, &user.token),
            |e| self.hasher.hash_one(e.user.token.as_str()),
        ) {
            TableEntry::Occupied(o) => {
                let e = o.into_mut();
                e.user = user;
                e.sync();
                e
            }
            TableEntry::Vacant(v) => v.insert(Entry::new(user)).into_mut(),
        };
        if dirty {
            mark(e, shard_dirty, &self.dirty);
        }
    }

    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| Self::read(&s.0).table.len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn contains(&self, token: &str) -> bool {
        self.with_user(token, |_| ()).is_some()
    }

    /// A copy of one user.
    pub fn get(&self, token: &str) -> Option<User> {
        self.with_user(token, User::clone)
    }

    /// Reads one user without copying it.
    pub fn with_user<R>(&self, token: &str, f: impl FnOnce(&User) -> R) -> Option<R> {
        self.with_user_at(self.key(token), token, f)
    }

    /// [`UserStore::with_user`] with the token's key already known.
    pub fn with_user_at<R>(
        &self,
        UserKey(hash): UserKey,
        token: &str,
        f: impl FnOnce(&User) -> R,
    ) -> Option<R> {
        self.look::<false, R>(hash, token, |e| f(&e.user))
    }

    /// The gate's look at a request's user, its first: `f` gets the user and whether `ip` (an
    /// address's text) is one of the user's addresses. The entry's lines and the counts the
    /// request goes on to read are asked for at once (see [`super::prefetch`]), so that its
    /// later looks find them in the cache.
    pub fn with_user_prefetched<R>(
        &self,
        UserKey(hash): UserKey,
        token: &str,
        ip: &[u8],
        f: impl FnOnce(&User, bool) -> R,
    ) -> Option<R> {
        self.look::<true, R>(hash, token, |e| f(&e.user, e.hot.knows_ip(&e.user, ip)))
    }

    /// Reads the entry of `token` under its shard's read lock; with `PREFETCH`, starting to
    /// load what a request reads of it ([`UserStore::with_user_prefetched`]).
    #[inline(always)]
    fn look<const PREFETCH: bool, R>(
        &self,
        hash: u64,
        token: &str,
        f: impl FnOnce(&Entry) -> R,
    ) -> Option<R> {
        let shard = Self::read(self.shard(hash));
        shard
            .table
            .find(hash, |e| {
                if PREFETCH {
                    e.prefetch();
                }
                same_token(&e.user.token, token)
            })
            .map(|e| f(e))
    }

    /// Changes one user in place and marks it dirty. `None` if there is no such user.
    pub fn update<R>(&self, token: &str, f: impl FnOnce(&mut User) -> R) -> Option<R> {
        self.with_entry_mut(token, |e, dirty| {
            let r = f(&mut e.user);
            e.sync();
            mark(e, dirty, &self.dirty);
            r
        })
    }

    /// Changes one entry (user and reservations) atomically with respect to every other change
    /// of the same user; marks it dirty when `f` says it changed the persisted user.
    pub fn update_entry<R>(
        &self,
        token: &str,
        f: impl FnOnce(&mut Entry) -> (R, bool),
    ) -> Option<R> {
        self.update_entry_at(self.key(token), token, f)
    }

    /// [`UserStore::update_entry`] with the token's key already known.
    pub fn update_entry_at<R>(
        &self,
        key: UserKey,
        token: &str,
        f: impl FnOnce(&mut Entry) -> (R, bool),
    ) -> Option<R> {
        self.change_at::<true, R>(key, token, f)
    }

    /// [`UserStore::update_entry_at`] for a request's usage (the quota's reservation and
    /// charge), on every request: `f` may change the counts, the reservations, the prompt count
    /// and the times, but not the token or the addresses (whose copy in the entry is left as
    /// it is; checked in debug builds).
    pub fn update_usage_at<R>(
        &self,
        key: UserKey,
        token: &str,
        f: impl FnOnce(&mut Entry) -> (R, bool),
    ) -> Option<R> {
        self.change_at::<false, R>(key, token, f)
    }

    /// Runs `f` on the entry and marks it dirty when `f` says so; with `SYNC`, copies what
    /// changed into the entry's [`Hot`] (without, checks in debug builds that nothing did).
    #[inline(always)]
    fn change_at<const SYNC: bool, R>(
        &self,
        key: UserKey,
        token: &str,
        f: impl FnOnce(&mut Entry) -> (R, bool),
    ) -> Option<R> {
        self.with_entry_mut_at(key, token, |e, dirty| {
            let (r, changed) = f(e);
            if SYNC {
                e.sync();
            } else {
                debug_assert!(e.in_sync(), "update_usage_at changed the user's addresses");
            }
            if changed {
                mark(e, dirty, &self.dirty);
            }
            r
        })
    }

    /// Inserts or replaces a user (reservations in flight are kept) and marks it dirty.
    pub fn upsert(&self, user: User) {
        self.deleted().remove(user.token.as_str());
        self.put(user, true);
    }

    /// Changes the user `token` in place, first creating it with `create` when absent, and
    /// marks it dirty. The check and the change happen under the shard's lock, so two
    /// concurrent upserts of a new token cannot overwrite each other.
    pub fn upsert_with<R>(
        &self,
        token: &str,
        create: impl FnOnce() -> User,
        f: impl FnOnce(&mut User) -> R,
    ) -> R {
        self.deleted().remove(token);
        self.with_entry_or_insert(token, create, |e, dirty| {
            let r = f(&mut e.user);
            mark(e, dirty, &self.dirty);
            r
        })
    }

    /// [`UserStore::upsert_with`] for a token the caller owns: a new user is given it
    /// (`create` receives it) instead of a copy.
    pub fn upsert_owned<R>(
        &self,
        token: String,
        create: impl FnOnce(String) -> User,
        f: impl FnOnce(&mut User) -> R,
    ) -> R {
        self.deleted().remove(&token);
        let hash = self.hash(&token);
        let mut shard = Self::write(self.shard(hash));
        let Shard { table, dirty } = &mut *shard;
        let e = match table.entry(
            hash,
            |e| same_token(&e.user.token, &token),
            |e| self.hasher.hash_one(e.user.token.as_str()),
        ) {
            TableEntry::Occupied(o) => o.into_mut(),
            TableEntry::Vacant(v) => v.insert(Entry::new(create(token))).into_mut(),
        };
        let r = f(&mut e.user);
        e.sync();
        mark(e, dirty, &self.dirty);
        r
    }

    /// Deletes a user for good (the purge of expired temporary users).
    pub fn remove(&self, token: &str) -> Option<User> {
        let hash = self.hash(token);
        let removed = {
            let mut shard = Self::write(self.shard(hash));
            let Shard { table, dirty } = &mut *shard;
            match table.find_entry(hash, |e| same_token(&e.user.token, token)) {
                Ok(o) => {
                    let (mut e, _) = o.remove();
                    unmark(&mut e, dirty, &self.dirty);
                    Some(e.user)
                }
                Err(_) => None,
            }
        };
        if removed.is_some() {
            self.deleted().insert(token.to_string());
        }
        removed
    }

    /// Copies of every user, in no particular order.
    pub fn list(&self) -> Vec<User> {
        let mut out = Vec::with_capacity(self.len());
        self.for_each(|u| out.push(u.clone()));
        out
    }

    /// Visits every user without copying (for sweeps, paging and listing). Each shard is
    /// read-locked while it is visited: `f` must be quick and must not change the store.
    pub fn for_each(&self, mut f: impl FnMut(&User)) {
        for s in self.shards.iter() {
            for e in Self::read(&s.0).table.iter() {
                f(&e.user);
            }
        }
    }

    /// Applies `f` to every user, marking dirty those for which it returns true (`f` returns
    /// whether it changed the user).
    pub fn update_all(&self, mut f: impl FnMut(&mut User) -> bool) -> usize {
        let mut n = 0;
        for s in self.shards.iter() {
            let mut shard = Self::write(&s.0);
            let Shard { table, dirty } = &mut *shard;
            for e in table.iter_mut() {
                if f(&mut e.user) {
                    // Only a changed user can need its copy made again: a pass over every
                    // user (a quota refresh) does not read every user's address list.
                    e.sync();
                    mark(e, dirty, &self.dirty);
                    n += 1;
                } else {
                    debug_assert!(e.in_sync(), "update_all changed a user it called unchanged");
                }
            }
        }
        n
    }

    /// How many changes wait to be flushed.
    pub fn pending(&self) -> usize {
        self.dirty.load(Ordering::Relaxed) + self.deleted().len()
    }

    /// Visits every dirty entry, unmarking it, under its shard's write lock.
    fn drain_dirty(&self, mut f: impl FnMut(&User)) {
        for s in self.shards.iter() {
            if Self::read(&s.0).dirty == 0 {
                continue;
            }
            let mut shard = Self::write(&s.0);
            let Shard { table, dirty } = &mut *shard;
            for e in table.iter_mut() {
                if unmark(e, dirty, &self.dirty) {
                    f(&e.user);
                }
                if *dirty == 0 {
                    break;
                }
            }
        }
    }

    /// Takes every pending change. A user is unmarked *before* it is read, so a change made
    /// while the batch is being written marks it again and is flushed next time.
    pub fn take_batch(&self) -> Batch {
        let mut batch = Batch::default();
        self.drain_dirty(|u| batch.changed.push(u.clone()));
        let deleted = std::mem::take(&mut *self.deleted());
        batch.deleted = deleted.into_iter().filter(|t| !self.contains(t)).collect();
        batch
    }

    /// Forgets every pending change (for a store that keeps nothing); returns how many.
    pub fn discard_pending(&self) -> usize {
        let mut n = 0;
        self.drain_dirty(|_| n += 1);
        let mut deleted = self.deleted();
        n += deleted.len();
        *deleted = HashSet::new();
        n
    }

    /// Hands back a batch whose write failed: its users are pending again.
    pub fn restore_batch(&self, batch: Batch) {
        for user in batch.changed {
            self.with_entry_mut(&user.token, |e, dirty| mark(e, dirty, &self.dirty));
        }
        for token in batch.deleted {
            if !self.contains(&token) {
                self.deleted().insert(token);
            }
        }
    }

    /// Asks the persistence task to flush now (admin writes do this, as in the original).
    pub fn request_flush(&self) {
        self.flush_requested.notify_one();
    }

    /// Resolves when someone called [`UserStore::request_flush`].
    pub async fn flush_requested(&self) {
        self.flush_requested.notified().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::users::UserType;

    fn user(t: &str) -> User {
        User::new(t.to_string(), UserType::Normal, TokenCounts::new(), 0)
    }

    #[test]
    #[cfg(target_pointer_width = "64")]
    fn an_entry_stays_within_its_allocation_class() {
        // mimalloc's classes around it are 224, 256 and 320 bytes: each byte over 256 would
        // cost 64 per user (see HOT_IP).
        assert!(
            std::mem::size_of::<Entry>() <= 256,
            "{}",
            std::mem::size_of::<Entry>()
        );
    }

    #[test]
    fn the_copies_follow_every_change() {
        let s = UserStore::default();
        let uuid = "0000beef-0000-4000-8000-000000000001";
        let long = "x".repeat(60);
        for token in [uuid, long.as_str()] {
            s.upsert(user(token));
            let known = |ip: &str| {
                s.with_user_prefetched(s.key(token), token, ip.as_bytes(), |_, k| k)
                    .expect("the user is found")
            };
            assert!(!known("10.0.0.1"));
            s.update(token, |u| u.ip.push("10.0.0.1".into()));
            assert!(known("10.0.0.1"));
            // A second address is found in the list; an IPv6 text is too long for the copy.
            s.update(token, |u| u.ip.push("2001:db8::1234:5678:9abc".into()));
            assert!(known("2001:db8::1234:5678:9abc"));
            // Replaced or cleared by an administrator: the old first address is gone at once.
            s.update(token, |u| {
                u.ip = ["10.0.0.2".to_string()].into_iter().collect()
            });
            assert!(!known("10.0.0.1"));
            assert!(known("10.0.0.2"));
            s.update_all(|u| {
                u.ip.clear();
                true
            });
            assert!(!known("10.0.0.2"));
            let mut imported = user(token);
            imported.ip.push("10.0.0.3".into());
            s.upsert(imported);
            assert!(known("10.0.0.3"));
            // Found by the whole token only (inline or not).
            assert!(s.contains(token));
            assert!(!s.contains(&token[..token.len() - 1]));
            let mut other = token.to_string();
            other.replace_range(..1, "y");
            assert!(!s.contains(&other));
        }
    }

    #[test]
    fn tokens_match_only_when_equal() {
        assert!(same_token("tok-abcdef", "tok-abcdef"));
        assert!(!same_token("tok-abcdef", "tok-abcdeg"));
        assert!(!same_token("tok-abcdef", "xok-abcdef"));
        assert!(!same_token("tok-abcdef", "tok-abcde"));
        assert!(!same_token("tok-abcdef", ""));
        let s = UserStore::default();
        s.put(user("tok-one"), false);
        assert!(s.contains("tok-one"));
        assert!(!s.contains("tok-onf"));
        assert!(!s.contains("tok-on"));
    }

    #[test]
    fn change_during_flush_is_not_lost() {
        let s = UserStore::new();
        s.upsert(user("a"));
        let batch = s.take_batch();
        assert_eq!(batch.changed.len(), 1);
        assert_eq!(s.pending(), 0);
        s.update("a", |u| u.prompt_count += 1);
        assert_eq!(s.pending(), 1);
        s.restore_batch(batch);
        let again = s.take_batch();
        assert_eq!(again.changed.len(), 1);
        assert_eq!(again.changed[0].prompt_count, 1);
    }

    #[test]
    fn many_users_spread_over_shards_and_track_dirt() {
        let s = UserStore::new();
        s.load((0..1000).map(|i| user(&format!("user-{i}"))).collect());
        assert_eq!((s.len(), s.pending()), (1000, 0));
        let mut seen = 0;
        s.for_each(|_| seen += 1);
        assert_eq!(seen, 1000);
        let used = s
            .shards
            .iter()
            .filter(|sh| !UserStore::read(&sh.0).table.is_empty())
            .count();
        assert!(used > SHARDS / 2, "users land in many shards ({used})");
        for i in (0..1000).step_by(10) {
            s.update(&format!("user-{i}"), |u| u.prompt_count = 7);
        }
        // Changing a dirty user again does not count twice.
        s.update("user-0", |u| u.prompt_count = 8);
        assert_eq!(s.pending(), 100);
        let batch = s.take_batch();
        assert_eq!(batch.changed.len(), 100);
        assert!(batch.changed.iter().all(|u| u.prompt_count >= 7));
        assert_eq!(s.pending(), 0);
        assert_eq!(s.update_all(|u| u.prompt_count == 7), 99);
        assert_eq!(s.discard_pending(), 99);
        assert_eq!(s.pending(), 0);
        assert!(s.take_batch().is_empty());
    }

    #[test]
    fn upsert_owned_creates_with_the_given_token_and_cancels_a_deletion() {
        let s = UserStore::new();
        s.load(vec![user("a")]);
        s.remove("a");
        assert_eq!(s.pending(), 1);
        let created = s.upsert_owned(
            "a".to_string(),
            |t| User::new(t, UserType::Special, TokenCounts::new(), 5),
            |u| u.created_at,
        );
        assert_eq!(created, 5);
        let again = s.upsert_owned("a".to_string(), |_| user("never"), |u| u.kind);
        assert_eq!(
            again,
            UserType::Special,
            "an existing user is changed, not replaced"
        );
        let batch = s.take_batch();
        assert_eq!(batch.changed.len(), 1);
        assert!(batch.deleted.is_empty(), "the user exists again");
        assert!(s.get("never").is_none());
    }

    #[test]
    fn reservations_survive_a_replacement() {
        let s = UserStore::new();
        s.upsert(user("a"));
        s.update_entry("a", |e| {
            e.reserved.insert("turbo", 5);
            ((), false)
        });
        let mut u = user("a");
        u.prompt_count = 3;
        s.upsert(u);
        let (reserved, count) = s
            .update_entry("a", |e| {
                (
                    (e.reserved.get("turbo").copied(), e.user.prompt_count),
                    false,
                )
            })
            .expect("exists");
        assert_eq!((reserved, count), (Some(5), 3));
    }

    #[test]
    fn removed_user_is_deleted_in_batch() {
        let s = UserStore::new();
        s.load(vec![user("a")]);
        assert_eq!(s.pending(), 0);
        s.remove("a");
        let batch = s.take_batch();
        assert_eq!(batch.deleted, vec!["a".to_string()]);
    }
}
