//! Fresh ledger databases for tests: a SQLite file, or a new PostgreSQL database on the server
//! of `PLEXUS_TEST_POSTGRES_URL` (the role needs CREATEDB). Unset: the PostgreSQL half is
//! skipped with a message, unless `PLEXUS_REQUIRE_POSTGRES=1` (as `.ci/run` sets), which makes
//! it a failure.
#![allow(dead_code, clippy::unwrap_used)]

use plexus_ledger_store::Backend;
use sqlx::Executor;

/// A fresh, empty ledger database per call: a SQLite file in `dir`, or a new PostgreSQL
/// database.
pub struct Db {
    pub url: String,
    _dir: Option<tempfile::TempDir>,
}

pub async fn fresh(backend: Backend) -> Option<Db> {
    match backend {
        Backend::Sqlite => {
            let dir = tempfile::tempdir().unwrap();
            let url = format!("sqlite://{}/sub/ledger.db", dir.path().display());
            Some(Db {
                url,
                _dir: Some(dir),
            })
        }
        Backend::Postgres => {
            let Ok(base) = std::env::var("PLEXUS_TEST_POSTGRES_URL") else {
                if std::env::var("PLEXUS_REQUIRE_POSTGRES").as_deref() == Ok("1") {
                    panic!("PLEXUS_REQUIRE_POSTGRES=1 but PLEXUS_TEST_POSTGRES_URL is unset");
                }
                eprintln!("PLEXUS_TEST_POSTGRES_URL is unset: skipping the PostgreSQL half");
                return None;
            };
            sqlx::any::install_default_drivers();
            use std::sync::atomic::{AtomicU32, Ordering};
            static N: AtomicU32 = AtomicU32::new(0);
            let name = format!(
                "plexus_test_{}_{}_{}",
                std::process::id(),
                N.fetch_add(1, Ordering::SeqCst),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .subsec_nanos()
            );
            let mut admin = <sqlx::AnyConnection as sqlx::Connection>::connect(&base)
                .await
                .expect("connect to PLEXUS_TEST_POSTGRES_URL");
            admin
                .execute(format!("CREATE DATABASE {name}").as_str())
                .await
                .expect("CREATE DATABASE (the test role needs CREATEDB)");
            let (head, _) = base.rsplit_once('/').expect("a URL with a database name");
            Some(Db {
                url: format!("{head}/{name}"),
                _dir: None,
            })
        }
    }
}
