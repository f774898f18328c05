//! [`Store`]: a [`Ledger`] whose journal and balances live in SQLite or PostgreSQL.

use crate::schema::MIGRATIONS;
use plexus_core::Digest;
use plexus_ledger::{
    derive_balances, Address, Bucket, Config, Entry, Ledger, Op, OpError, ReplayError, Timestamp,
};
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Executor, Row};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::str::FromStr;

/// Which database a store uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Why a store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("the ledger URL {url:?} is neither sqlite://PATH nor postgres://...")]
    BadUrl { url: String },
    #[error("the SQLite ledger URL option {option:?} is not supported (only mode=ro, read only)")]
    SqliteOption { option: String },
    #[error("cannot create the directory {path} for the SQLite ledger")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open the ledger database {url}")]
    Connect {
        url: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("the ledger rules are invalid: {0}")]
    Config(#[from] plexus_ledger::config::ConfigError),
    #[error(transparent)]
    Verify(#[from] VerifyError),
}

/// A stored ledger that does not check out.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("database error while reading the ledger")]
    Db(#[from] sqlx::Error),
    #[error("journal entry {seq} is not valid JSON of an entry: {reason}")]
    Decode { seq: i64, reason: String },
    #[error("stored ledger rules are unreadable: {0}")]
    Meta(String),
    #[error("the journal does not replay: {0}")]
    Replay(#[from] ReplayError),
    #[error("stored balance of {bucket} is {stored}, the journal says {derived}")]
    Balance {
        bucket: String,
        stored: i128,
        derived: i128,
    },
    #[error("the ledger in memory has drifted from the journal at {bucket}")]
    Memory { bucket: String },
}

/// Why an operation did not happen.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Refused(#[from] OpError),
    #[error("database error; the operation was not recorded")]
    Db(#[from] sqlx::Error),
    #[error("the ledger could not be reloaded after a failed write: {0}")]
    Reload(#[from] VerifyError),
}

/// An API key's record (the key itself is never stored, only its sha256).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiKey {
    pub key_hash: String,
    pub account: Address,
    pub label: String,
    pub created_ms: Timestamp,
}

/// A ledger backed by a database.
pub struct Store {
    pub(crate) pool: AnyPool,
    backend: Backend,
    ledger: Ledger,
}

pub(crate) fn to_i64(v: u64) -> i64 {
    // Amounts are bounded by i64::MAX (plexus_ledger::types::MAX_AMOUNT); times and sequence
    // numbers are far below it.
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The sha256 (hex) under which an API key is stored.
pub fn hash_api_key(key: &str) -> String {
    hex::encode(Digest::of(key.as_bytes()).0)
}

impl Store {
    /// Opens (creating if needed) the ledger at `url`: `sqlite://PATH` (the file and its
    /// directory are created), `sqlite://PATH?mode=ro` (an existing ledger, read only: every
    /// write fails; other options are refused by name) or `postgres://...`. A new ledger gets
    /// `config`; an existing one keeps the rules it was created with.
    pub async fn open(url: &str, config: Config) -> Result<Self, OpenError> {
        config.validate()?;
        sqlx::any::install_default_drivers();
        let mut read_only = false;
        let (backend, connect_url) = if let Some(rest) = url.strip_prefix("sqlite://") {
            let (path, options) = rest.split_once('?').unwrap_or((rest, ""));
            if path.is_empty() {
                return Err(OpenError::BadUrl {
                    url: url.to_owned(),
                });
            }
            for option in options.split('&').filter(|o| !o.is_empty()) {
                match option {
                    "mode=ro" => read_only = true,
                    "mode=rwc" => {}
                    other => {
                        return Err(OpenError::SqliteOption {
                            option: other.to_owned(),
                        })
                    }
                }
            }
            if read_only {
                // An existing ledger, read only: nothing is created or migrated.
                (Backend::Sqlite, format!("sqlite://{path}?mode=ro"))
            } else {
                if let Some(dir) = std::path::Path::new(path).parent() {
                    if !dir.as_os_str().is_empty() {
                        std::fs::create_dir_all(dir).map_err(|source| OpenError::Dir {
                            path: dir.to_owned(),
                            source,
                        })?;
                    }
                }
                (Backend::Sqlite, format!("sqlite://{path}?mode=rwc"))
            }
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            (Backend::Postgres, url.to_owned())
        } else {
            return Err(OpenError::BadUrl {
                url: url.to_owned(),
            });
        };
        let connect = |source| OpenError::Connect {
            url: redact(url),
            source,
        };
        let pool = AnyPoolOptions::new()
            .max_connections(if backend == Backend::Sqlite { 1 } else { 4 })
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        // WAL: readers never block the writer; FULL: a committed settlement
                        // survives power loss, not only a killed process. (A read-only
                        // connection reads the mode the ledger was created with.)
                        if !read_only {
                            conn.execute("PRAGMA journal_mode=WAL").await?;
                            conn.execute("PRAGMA synchronous=FULL").await?;
                        }
                        conn.execute("PRAGMA busy_timeout=10000").await?;
                    }
                    Ok(())
                })
            })
            .connect(&connect_url)
            .await
            .map_err(connect)?;
        if !read_only {
            migrate(&pool).await.map_err(connect)?;
        }
        let config = load_or_init_config(&pool, config).await?;
        let ledger = load(&pool, backend, config).await?;
        Ok(Self {
            pool,
            backend,
            ledger,
        })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The state machine as of the last committed entry.
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// Executes `op` at `now` and commits its journal entry and balances in one transaction.
    /// `Ok(None)`: an idempotent no-op (a settle repeated), nothing written.
    pub async fn execute(&mut self, op: Op, now: Timestamp) -> Result<Option<Entry>, StoreError> {
        match self.try_execute(op.clone(), now).await {
            Err(StoreError::Db(e)) if is_conflict(&e) => {
                // Another process appended first: catch up and try once more.
                self.reload().await?;
                self.try_execute(op, now).await
            }
            other => other,
        }
    }

    async fn try_execute(&mut self, op: Op, now: Timestamp) -> Result<Option<Entry>, StoreError> {
        let before = self.ledger.next_seq();
        let Some(entry) = self.ledger.execute(op, now)? else {
            return Ok(None);
        };
        match self.write(&entry).await {
            Ok(()) => Ok(Some(entry)),
            Err(e) => {
                tracing::warn!(seq = before, error = %e, "ledger write failed; reloading");
                // The in-memory ledger is one entry ahead of the database: rebuild it.
                self.reload().await?;
                Err(StoreError::Db(e))
            }
        }
    }

    async fn write(&self, entry: &Entry) -> Result<(), sqlx::Error> {
        let json = serde_json::to_string(entry).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
        let mut touched: Vec<Bucket> = Vec::new();
        for p in &entry.postings {
            for b in [p.from, p.to] {
                if !touched.contains(&b) {
                    touched.push(b);
                }
            }
        }
        let balances = self.ledger.balances();
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO plexus_journal (seq, time_ms, kind, hash, entry) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(to_i64(entry.seq))
        .bind(to_i64(entry.time))
        .bind(entry.op.kind())
        .bind(entry.hash.to_string())
        .bind(json)
        .execute(&mut *tx)
        .await?;
        for b in touched {
            let amount = balances.get(&b).copied().unwrap_or(0);
            sqlx::query(
                "INSERT INTO plexus_balances (bucket, amount) VALUES ($1, $2) \
                 ON CONFLICT (bucket) DO UPDATE SET amount = excluded.amount",
            )
            .bind(b.to_string())
            .bind(amount as i64)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await
    }

    /// Rebuilds the in-memory ledger from the database (journal replayed, balances checked).
    pub async fn reload(&mut self) -> Result<(), VerifyError> {
        self.ledger = load(&self.pool, self.backend, self.ledger.config().clone()).await?;
        Ok(())
    }

    /// Applies entries another process appended since this store last read or wrote (a
    /// `plexus keys create` or `plexus wallet` beside a running gateway), each re-executed and
    /// checked against its hash chain. Returns how many were applied.
    pub async fn catch_up(&mut self) -> Result<usize, VerifyError> {
        let rows: Vec<AnyRow> =
            sqlx::query("SELECT seq, entry FROM plexus_journal WHERE seq >= $1 ORDER BY seq")
                .bind(to_i64(self.ledger.next_seq()))
                .fetch_all(&self.pool)
                .await?;
        for r in &rows {
            let seq: i64 = r.try_get(0)?;
            let text: String = r.try_get(1)?;
            let entry: Entry = serde_json::from_str(&text).map_err(|e| VerifyError::Decode {
                seq,
                reason: e.to_string(),
            })?;
            if let Err(e) = self.ledger.apply_recorded(&entry) {
                // Leave no half-applied state behind: rebuild from the database.
                self.reload().await?;
                return Err(e.into());
            }
        }
        Ok(rows.len())
    }

    /// Re-reads everything and checks it: hash chain, every operation re-executed, stored
    /// balances equal to re-derived ones, and the in-memory ledger equal to both.
    pub async fn verify(&self) -> Result<(), VerifyError> {
        let fresh = load(&self.pool, self.backend, self.ledger.config().clone()).await?;
        let (a, b) = (fresh.balances(), self.ledger.balances());
        if a != b {
            let bucket = a
                .iter()
                .find(|(k, v)| b.get(k) != Some(v))
                .map(|(k, _)| k.to_string())
                .unwrap_or_else(|| "a bucket".into());
            return Err(VerifyError::Memory { bucket });
        }
        fresh
            .check_invariants()
            .map_err(|e| VerifyError::Meta(e.to_string()))?;
        Ok(())
    }

    /// The journal, oldest first.
    pub async fn journal(&self) -> Result<Vec<Entry>, VerifyError> {
        read_journal(&self.pool).await
    }

    /// Records an API key (by its hash) for `account`.
    pub async fn add_api_key(
        &self,
        key: &str,
        account: Address,
        label: &str,
        now: Timestamp,
    ) -> Result<ApiKey, sqlx::Error> {
        let record = ApiKey {
            key_hash: hash_api_key(key),
            account,
            label: label.to_owned(),
            created_ms: now,
        };
        sqlx::query(
            "INSERT INTO plexus_api_keys (key_hash, account, label, created_ms) VALUES ($1, $2, $3, $4)",
        )
        .bind(&record.key_hash)
        .bind(account.to_string())
        .bind(label)
        .bind(to_i64(now))
        .execute(&self.pool)
        .await?;
        Ok(record)
    }

    /// The account an API key belongs to, if it is known.
    pub async fn account_for_key(&self, key: &str) -> Result<Option<Address>, sqlx::Error> {
        let row = sqlx::query("SELECT account FROM plexus_api_keys WHERE key_hash = $1")
            .bind(hash_api_key(key))
            .fetch_optional(&self.pool)
            .await?;
        Ok(row
            .and_then(|r| r.try_get::<String, _>(0).ok())
            .and_then(|a| Address::from_str(&a).ok()))
    }

    /// All API keys (hashes only).
    pub async fn api_keys(&self) -> Result<Vec<ApiKey>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT key_hash, account, label, created_ms FROM plexus_api_keys ORDER BY created_ms",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .filter_map(|r| {
                Some(ApiKey {
                    key_hash: r.try_get(0).ok()?,
                    account: Address::from_str(&r.try_get::<String, _>(1).ok()?).ok()?,
                    label: r.try_get(2).ok()?,
                    created_ms: u64::try_from(r.try_get::<i64, _>(3).ok()?).ok()?,
                })
            })
            .collect())
    }

    /// Closes the pool (waits for connections to finish).
    pub async fn close(self) {
        self.pool.close().await;
    }
}

fn redact(url: &str) -> String {
    // postgres://user:password@host -> postgres://user:***@host
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{}:***{}", &url[..s + 3], user, &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

fn is_conflict(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.is_unique_violation())
}

async fn migrate(pool: &AnyPool) -> Result<(), sqlx::Error> {
    pool.execute("CREATE TABLE IF NOT EXISTS plexus_migrations (version BIGINT PRIMARY KEY)")
        .await?;
    for (version, statements) in MIGRATIONS {
        let mut tx = pool.begin().await?;
        let done = sqlx::query("SELECT version FROM plexus_migrations WHERE version = $1")
            .bind(*version)
            .fetch_optional(&mut *tx)
            .await?;
        if done.is_some() {
            continue;
        }
        for s in *statements {
            tx.execute(*s).await?;
        }
        sqlx::query("INSERT INTO plexus_migrations (version) VALUES ($1)")
            .bind(*version)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
    }
    Ok(())
}

async fn load_or_init_config(pool: &AnyPool, config: Config) -> Result<Config, VerifyError> {
    let row = sqlx::query("SELECT value FROM plexus_meta WHERE key = 'config'")
        .fetch_optional(pool)
        .await?;
    if let Some(row) = row {
        let text: String = row.try_get(0)?;
        return serde_json::from_str(&text).map_err(|e| VerifyError::Meta(e.to_string()));
    }
    let text = serde_json::to_string(&config).map_err(|e| VerifyError::Meta(e.to_string()))?;
    sqlx::query(
        "INSERT INTO plexus_meta (key, value) VALUES ('config', $1) ON CONFLICT (key) DO NOTHING",
    )
    .bind(text)
    .execute(pool)
    .await?;
    Ok(config)
}

const SELECT_JOURNAL: &str = "SELECT seq, entry FROM plexus_journal ORDER BY seq";

async fn read_journal(pool: &AnyPool) -> Result<Vec<Entry>, VerifyError> {
    let rows: Vec<AnyRow> = sqlx::query(SELECT_JOURNAL).fetch_all(pool).await?;
    decode_journal(&rows)
}

fn decode_journal(rows: &[AnyRow]) -> Result<Vec<Entry>, VerifyError> {
    rows.iter()
        .map(|r| {
            let seq: i64 = r.try_get(0)?;
            let text: String = r.try_get(1)?;
            serde_json::from_str(&text).map_err(|e| VerifyError::Decode {
                seq,
                reason: e.to_string(),
            })
        })
        .collect()
}

/// Reads the journal and the stored balances from one snapshot (another process may commit
/// an entry between two reads: without a snapshot its balances would be read beside a
/// journal without it, and an intact ledger refused), replays the journal and checks that
/// both agree.
async fn load(pool: &AnyPool, backend: Backend, config: Config) -> Result<Ledger, VerifyError> {
    let mut tx = pool.begin().await?;
    if backend == Backend::Postgres {
        // SQLite's read transaction is a snapshot already (WAL); PostgreSQL's default (read
        // committed) takes one per statement.
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            .execute(&mut *tx)
            .await?;
    }
    let journal: Vec<AnyRow> = sqlx::query(SELECT_JOURNAL).fetch_all(&mut *tx).await?;
    let rows = sqlx::query("SELECT bucket, amount FROM plexus_balances")
        .fetch_all(&mut *tx)
        .await?;
    tx.rollback().await?;
    let entries = decode_journal(&journal)?;
    let ledger = Ledger::replay(config, &entries)?;
    let derived = derive_balances(&entries);
    let mut stored: BTreeMap<String, i128> = BTreeMap::new();
    for r in rows {
        let amount: i64 = r.try_get(1)?;
        if amount != 0 {
            stored.insert(r.try_get(0)?, i128::from(amount));
        }
    }
    let derived: BTreeMap<String, i128> =
        derived.iter().map(|(b, v)| (b.to_string(), *v)).collect();
    let replayed: BTreeMap<String, i128> = ledger
        .balances()
        .iter()
        .map(|(b, v)| (b.to_string(), *v))
        .collect();
    for (name, map) in [("stored", &stored), ("replayed", &replayed)] {
        if *map != derived {
            let bucket = derived
                .keys()
                .chain(map.keys())
                .find(|k| map.get(*k) != derived.get(*k))
                .cloned()
                .unwrap_or_default();
            tracing::error!(which = name, %bucket, "ledger balances differ from the journal");
            return Err(VerifyError::Balance {
                stored: map.get(&bucket).copied().unwrap_or(0),
                derived: derived.get(&bucket).copied().unwrap_or(0),
                bucket,
            });
        }
    }
    Ok(ledger)
}
