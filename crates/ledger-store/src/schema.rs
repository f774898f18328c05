//! The schema and its migrations, written in the SQL that SQLite and PostgreSQL share (TEXT and
//! BIGINT columns only). A migration runs once, in a transaction, recorded in
//! `plexus_migrations`.

/// `(version, statements)`, in order. Append only: never edit a released migration.
pub const MIGRATIONS: &[(i64, &[&str])] = &[
    (
        1,
        &[
            "CREATE TABLE plexus_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
            "CREATE TABLE plexus_journal (seq BIGINT PRIMARY KEY, time_ms BIGINT NOT NULL, \
         kind TEXT NOT NULL, hash TEXT NOT NULL, entry TEXT NOT NULL)",
            "CREATE TABLE plexus_balances (bucket TEXT PRIMARY KEY, amount BIGINT NOT NULL)",
            "CREATE TABLE plexus_api_keys (key_hash TEXT PRIMARY KEY, account TEXT NOT NULL, \
         label TEXT NOT NULL, created_ms BIGINT NOT NULL)",
        ],
    ),
    (
        2,
        &[
            // The vouchers a gateway signed during streams, latest per (request, provider):
            // what it owes if it dies before settling (see `Store::record_vouchers`).
            "CREATE TABLE plexus_issued_vouchers (request TEXT NOT NULL, provider TEXT NOT NULL, \
             nonce BIGINT NOT NULL, voucher TEXT NOT NULL, PRIMARY KEY (request, provider))",
        ],
    ),
];
