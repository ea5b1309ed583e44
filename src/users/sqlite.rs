//! The SQLite backend (`GATEKEEPER_STORE=sqlite`): one table of token → JSON user record in a
//! local file (`SQLITE_PATH`), WAL mode, each flush one transaction. Blocking SQLite calls run
//! on tokio's blocking pool so they never stall request handling.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use rusqlite::{params, Connection, OptionalExtension};

use super::backend::{BackendError, Loaded, UserBackend};
use super::{fingerprint, now_ms, User};

/// Users kept in an SQLite file. The single connection is guarded by a mutex: only the
/// persistence task writes, so there is no contention to speak of.
pub struct SqliteBackend {
    path: PathBuf,
    conn: Arc<Mutex<Connection>>,
}

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS users (
    token      TEXT PRIMARY KEY NOT NULL,
    record     TEXT NOT NULL,
    updated_at INTEGER NOT NULL
)";

impl SqliteBackend {
    /// Opens (creating if needed) the database at `path`, creating its parent directory, and
    /// checks that it is writable. Errors name `SQLITE_PATH` and say what went wrong.
    pub fn open(path: &Path) -> Result<SqliteBackend, BackendError> {
        let shown = path.display();
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| {
                BackendError::Config(format!(
                    "SQLITE_PATH={shown}: cannot create the directory {} ({e}); choose a writable location",
                    parent.display()
                ))
            })?;
        }
        let fail = |what: &str, e: rusqlite::Error| {
            BackendError::Config(format!(
                "SQLITE_PATH={shown}: {what} ({e}); check that the file is an SQLite database and that the directory is writable"
            ))
        };
        let conn = Connection::open(path).map_err(|e| fail("cannot open the database", e))?;
        // WAL lets the file be read (e.g. by a backup) while we write; synchronous=FULL makes a
        // committed flush survive a power loss, which costs little at one commit per interval.
        let mode: String = conn
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
            .map_err(|e| fail("cannot switch to WAL mode", e))?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!(
                mode,
                "SQLITE_PATH: the database did not switch to WAL mode; continuing"
            );
        }
        conn.execute_batch("PRAGMA synchronous=FULL; PRAGMA busy_timeout=5000;")
            .map_err(|e| fail("cannot configure the database", e))?;
        // Creating the table is a write, so this also proves the file is writable.
        conn.execute(SCHEMA, [])
            .map_err(|e| fail("cannot create the users table", e))?;
        conn.execute(
            "CREATE TABLE IF NOT EXISTS gatekeeper_meta (key TEXT PRIMARY KEY, value TEXT)",
            [],
        )
        .map_err(|e| fail("cannot write to the database", e))?;
        conn.execute(
            "INSERT INTO gatekeeper_meta (key, value) VALUES ('opened_at', ?1)
             ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            params![now_ms().to_string()],
        )
        .map_err(|e| fail("cannot write to the database", e))?;
        Ok(SqliteBackend {
            path: path.to_path_buf(),
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// Runs `f` with the connection on the blocking pool.
    async fn with_conn<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<R, BackendError> + Send + 'static,
    ) -> Result<R, BackendError> {
        let conn = self.conn.clone();
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            // A panic while holding the lock cannot leave a half-done transaction behind
            // (SQLite rolls it back), so a poisoned lock is safe to reuse.
            let mut guard = conn.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut guard)
        })
        .await
        .map_err(|e| {
            BackendError::Unavailable(format!(
                "SQLITE_PATH={}: the database task failed ({e})",
                path.display()
            ))
        })?
    }
}

fn unavailable(path: &Path, what: &str, e: rusqlite::Error) -> BackendError {
    BackendError::Unavailable(format!("SQLITE_PATH={}: {what}: {e}", path.display()))
}

impl UserBackend for SqliteBackend {
    fn name(&self) -> &'static str {
        "sqlite"
    }

    fn load_all(&self) -> BoxFuture<'_, Result<Loaded, BackendError>> {
        let path = self.path.clone();
        Box::pin(self.with_conn(move |conn| {
            let err = |e| unavailable(&path, "cannot read users", e);
            let mut stmt = conn
                .prepare("SELECT token, record FROM users")
                .map_err(err)?;
            let mut rows = stmt.query([]).map_err(err)?;
            let mut loaded = Loaded::default();
            // Each row is read in place (no copy of its text) and parsed straight into a user.
            while let Some(row) = rows.next().map_err(err)? {
                let token = row.get_ref(0).and_then(|v| Ok(v.as_str()?)).map_err(err)?;
                let record = row.get_ref(1).and_then(|v| Ok(v.as_str()?)).map_err(err)?;
                match serde_json::from_str::<User>(record) {
                    Ok(user) if user.token == token => loaded.users.push(user),
                    Ok(_) => loaded.skipped.push((
                        fingerprint(token),
                        "the record's token field differs from its key".into(),
                    )),
                    Err(e) => loaded.skipped.push((fingerprint(token), e.to_string())),
                }
            }
            Ok(loaded)
        }))
    }

    fn write<'a>(
        &'a self,
        changed: &'a [User],
        deleted: &'a [String],
    ) -> BoxFuture<'a, Result<(), BackendError>> {
        // Serialise on this side so the blocking closure owns plain strings.
        let mut rows = Vec::with_capacity(changed.len());
        for user in changed {
            match serde_json::to_string(user) {
                Ok(json) => rows.push((user.token.clone(), json)),
                Err(e) => {
                    let e = BackendError::Unavailable(format!(
                        "cannot serialise user {}: {e}",
                        fingerprint(&user.token)
                    ));
                    return Box::pin(async move { Err(e) });
                }
            }
        }
        let deleted = deleted.to_vec();
        let path = self.path.clone();
        Box::pin(self.with_conn(move |conn| {
            let err = |e| unavailable(&path, "cannot write users", e);
            let tx = conn.transaction().map_err(err)?;
            {
                let now = now_ms();
                let mut upsert = tx
                    .prepare_cached(
                        "INSERT INTO users (token, record, updated_at) VALUES (?1, ?2, ?3)
                         ON CONFLICT(token) DO UPDATE SET record = excluded.record,
                                                          updated_at = excluded.updated_at",
                    )
                    .map_err(err)?;
                for (token, json) in &rows {
                    upsert
                        .execute(params![token.as_str(), json, now])
                        .map_err(err)?;
                }
                let mut delete = tx
                    .prepare_cached("DELETE FROM users WHERE token = ?1")
                    .map_err(err)?;
                for token in &deleted {
                    delete.execute(params![token]).map_err(err)?;
                }
            }
            tx.commit().map_err(err)
        }))
    }
}

/// Reads one stored record as raw text (for tests and diagnostics).
pub fn read_raw(path: &Path, token: &str) -> Result<Option<String>, rusqlite::Error> {
    let conn = Connection::open(path)?;
    conn.query_row(
        "SELECT record FROM users WHERE token = ?1",
        params![token],
        |r| r.get(0),
    )
    .optional()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::users::UserType;

    fn user(t: &str, n: u64) -> User {
        let mut u = User::new(t.into(), UserType::Normal, Default::default(), 1);
        u.prompt_count = n;
        u
    }

    #[tokio::test]
    async fn writes_reload_and_deletes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("nested/users.sqlite");
        let db = SqliteBackend::open(&path).expect("opens");
        db.write(&[user("a", 1), user("b", 2)], &[])
            .await
            .expect("writes");
        db.write(&[user("a", 3)], &["b".into()])
            .await
            .expect("writes");
        drop(db);
        let db = SqliteBackend::open(&path).expect("reopens");
        let loaded = db.load_all().await.expect("loads");
        assert_eq!(loaded.users, vec![user("a", 3)]);
        assert!(loaded.skipped.is_empty());
    }

    #[tokio::test]
    async fn unparseable_records_are_skipped_and_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("users.sqlite");
        let db = SqliteBackend::open(&path).expect("opens");
        db.with_conn(|c| {
            c.execute(
                "INSERT INTO users VALUES ('bad', '{\"token\":\"bad\",\"promptCount\":\"x\"}', 0)",
                [],
            )
            .map_err(|e| BackendError::Unavailable(e.to_string()))
        })
        .await
        .expect("inserts");
        db.write(&[user("a", 1)], &[]).await.expect("writes");
        let loaded = db.load_all().await.expect("loads");
        assert_eq!(loaded.users.len(), 1);
        assert_eq!(loaded.skipped.len(), 1);
        assert_eq!(loaded.skipped[0].0, fingerprint("bad"));
        assert!(read_raw(&path, "bad").expect("reads").is_some());
    }

    #[test]
    fn unwritable_path_names_the_variable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("file");
        std::fs::write(&file, b"x").expect("writes");
        // A directory cannot be created beneath a regular file.
        let err = SqliteBackend::open(&file.join("sub/users.sqlite"))
            .err()
            .expect("fails");
        assert!(err.to_string().contains("SQLITE_PATH="), "{err}");
    }
}
