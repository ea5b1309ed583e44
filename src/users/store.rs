//! The in-memory user store that every request reads. Reads take a shard read lock of a
//! `DashMap` (no global lock); every change marks the user dirty so that the persistence
//! task can flush it. The store itself never does I/O.

use std::sync::Arc;

use dashmap::{DashMap, DashSet};
use tokio::sync::Notify;

use super::model::{TokenCounts, User};

/// A user plus request-path state that is never persisted.
#[derive(Debug, Clone)]
pub struct Entry {
    pub user: User,
    /// Tokens reserved by admitted requests that have not finished yet, by model family.
    pub reserved: TokenCounts,
}

#[derive(Default)]
pub struct UserStore {
    users: DashMap<String, Entry>,
    dirty: DashSet<String>,
    deleted: DashSet<String>,
    flush_requested: Notify,
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

impl UserStore {
    pub fn new() -> Arc<UserStore> {
        Arc::new(UserStore::default())
    }

    /// Puts users read from the backend at startup in place, without marking them dirty.
    pub fn load(&self, users: Vec<User>) {
        for user in users {
            self.users.insert(
                user.token.clone(),
                Entry {
                    user,
                    reserved: TokenCounts::new(),
                },
            );
        }
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    pub fn contains(&self, token: &str) -> bool {
        self.users.contains_key(token)
    }

    /// A copy of one user.
    pub fn get(&self, token: &str) -> Option<User> {
        self.users.get(token).map(|e| e.user.clone())
    }

    /// Reads one user without copying it.
    pub fn with_user<R>(&self, token: &str, f: impl FnOnce(&User) -> R) -> Option<R> {
        self.users.get(token).map(|e| f(&e.user))
    }

    /// Changes one user in place and marks it dirty. `None` if there is no such user.
    pub fn update<R>(&self, token: &str, f: impl FnOnce(&mut User) -> R) -> Option<R> {
        let r = self.users.get_mut(token).map(|mut e| f(&mut e.user));
        if r.is_some() {
            self.dirty.insert(token.to_string());
        }
        r
    }

    /// Changes one entry (user and reservations) atomically with respect to every other change
    /// of the same user; marks it dirty when `f` says it changed the persisted user.
    pub fn update_entry<R>(
        &self,
        token: &str,
        f: impl FnOnce(&mut Entry) -> (R, bool),
    ) -> Option<R> {
        let (r, changed) = self.users.get_mut(token).map(|mut e| f(&mut e))?;
        if changed {
            self.dirty.insert(token.to_string());
        }
        Some(r)
    }

    /// Inserts or replaces a user (reservations in flight are kept) and marks it dirty.
    pub fn upsert(&self, user: User) {
        let token = user.token.clone();
        self.deleted.remove(&token);
        self.users
            .entry(token.clone())
            .and_modify(|e| e.user = user.clone())
            .or_insert_with(|| Entry {
                user,
                reserved: TokenCounts::new(),
            });
        self.dirty.insert(token);
    }

    /// Changes the user `token` in place, first creating it with `create` when absent, and
    /// marks it dirty. The check and the change happen under the entry's lock, so two
    /// concurrent upserts of a new token cannot overwrite each other.
    pub fn upsert_with<R>(
        &self,
        token: &str,
        create: impl FnOnce() -> User,
        f: impl FnOnce(&mut User) -> R,
    ) -> R {
        self.deleted.remove(token);
        let r = {
            let mut e = self
                .users
                .entry(token.to_string())
                .or_insert_with(|| Entry {
                    user: create(),
                    reserved: TokenCounts::new(),
                });
            f(&mut e.user)
        };
        self.dirty.insert(token.to_string());
        r
    }

    /// Deletes a user for good (the purge of expired temporary users).
    pub fn remove(&self, token: &str) -> Option<User> {
        let removed = self.users.remove(token).map(|(_, e)| e.user);
        if removed.is_some() {
            self.dirty.remove(token);
            self.deleted.insert(token.to_string());
        }
        removed
    }

    /// Copies of every user, in no particular order.
    pub fn list(&self) -> Vec<User> {
        self.users.iter().map(|e| e.user.clone()).collect()
    }

    /// Visits every user without copying (for sweeps and paging).
    pub fn for_each(&self, mut f: impl FnMut(&User)) {
        for e in self.users.iter() {
            f(&e.user);
        }
    }

    /// Applies `f` to every user, marking dirty those for which it returns true.
    pub fn update_all(&self, mut f: impl FnMut(&mut User) -> bool) -> usize {
        let mut n = 0;
        for mut e in self.users.iter_mut() {
            if f(&mut e.user) {
                self.dirty.insert(e.key().clone());
                n += 1;
            }
        }
        n
    }

    /// How many changes wait to be flushed.
    pub fn pending(&self) -> usize {
        self.dirty.len() + self.deleted.len()
    }

    /// Takes every pending change. A user is unmarked *before* it is read, so a change made
    /// while the batch is being written marks it again and is flushed next time.
    pub fn take_batch(&self) -> Batch {
        let mut batch = Batch::default();
        let tokens: Vec<String> = self.dirty.iter().map(|t| t.key().clone()).collect();
        for token in tokens {
            self.dirty.remove(&token);
            if let Some(e) = self.users.get(&token) {
                batch.changed.push(e.user.clone());
            }
        }
        let deleted: Vec<String> = self.deleted.iter().map(|t| t.key().clone()).collect();
        for token in deleted {
            self.deleted.remove(&token);
            if !self.users.contains_key(&token) {
                batch.deleted.push(token);
            }
        }
        batch
    }

    /// Hands back a batch whose write failed: its users are pending again.
    pub fn restore_batch(&self, batch: Batch) {
        for user in batch.changed {
            if self.users.contains_key(&user.token) {
                self.dirty.insert(user.token);
            }
        }
        for token in batch.deleted {
            if !self.users.contains_key(&token) {
                self.deleted.insert(token);
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
    fn removed_user_is_deleted_in_batch() {
        let s = UserStore::new();
        s.load(vec![user("a")]);
        assert_eq!(s.pending(), 0);
        s.remove("a");
        let batch = s.take_batch();
        assert_eq!(batch.deleted, vec!["a".to_string()]);
    }
}
