//! Gateway accounts: API keys mapped to ledger accounts, an escrow per request for its most
//! expensive outcome, settlement to the tokens actually produced, and `GET /v1/account`.
//!
//! ```text
//! Authorization: Bearer KEY ─> Payer (extractor; 401 invalid_api_key when unknown)
//! generation::start ─> hold: escrow max_tokens (or the context) x price (402 insufficient_quota)
//! generation Task ─> Meter::finish(tokens produced, cancelled streams included) ─> settle
//!                     (a Meter dropped unfinished releases its escrow)
//! Accounts::open ─> escrows this gateway left open (killed mid-request) are released
//! ```
//!
//! Pricing: `price` ledger units (micro-PLX) per completion token. Settled pay goes to the
//! serving provider's account; until stage nodes return signed receipts (per-provider metering)
//! that is the gateway's own account, which serves or routes every token.

use crate::error::ApiError;
use crate::state::AppState;
use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use axum::Json;
use plexus_ledger::{Address, Amount, Config, Op, Payout, RequestId, Timestamp};
use plexus_ledger_store::{OpenError, Store, StoreError};
use serde_json::json;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::Mutex;

/// Milliseconds since the Unix epoch (the ledger takes time as an argument; this is where the
/// gateway reads it).
pub fn now_ms() -> Timestamp {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as Timestamp)
}

/// The ledger a gateway charges requests to.
pub struct Accounts {
    store: Mutex<Store>,
    /// This gateway's account: it opens (and on restart releases) escrows.
    gateway: Address,
    /// Who is paid for served tokens.
    provider: Address,
    /// Ledger units per completion token.
    price: Amount,
}

/// Why accounts could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum AccountsError {
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error("cannot release the escrows left open by a previous run: {0}")]
    Recover(#[source] StoreError),
    #[error("ledger database error: {0}")]
    Db(#[from] sqlx_error::Error),
    #[error("ledger operation refused: {0}")]
    Refused(#[source] StoreError),
    #[error("cannot read the system's random number generator: {0}")]
    Random(String),
}

mod sqlx_error {
    pub use plexus_ledger_store::DbError as Error;
}

impl Accounts {
    /// Opens the ledger at `url` and releases the escrows this gateway left open (a previous
    /// run killed mid-request: nothing was settled for them, so the client gets it back).
    pub async fn open(
        url: &str,
        config: Config,
        gateway: Address,
        provider: Address,
        price: Amount,
    ) -> Result<Self, AccountsError> {
        let mut store = Store::open(url, config).await?;
        let left: Vec<RequestId> = store
            .ledger()
            .open_escrows()
            .filter(|(_, e)| e.gateway == gateway)
            .map(|(r, _)| *r)
            .collect();
        if !left.is_empty() {
            tracing::warn!(
                count = left.len(),
                "releasing escrows left open by a previous run"
            );
        }
        for request in left {
            let op = Op::Settle {
                request,
                payouts: Vec::new(),
            };
            store
                .execute(op, now_ms())
                .await
                .map_err(AccountsError::Recover)?;
        }
        Ok(Self {
            store: Mutex::new(store),
            gateway,
            provider,
            price,
        })
    }

    pub fn price(&self) -> Amount {
        self.price
    }

    pub fn gateway(&self) -> Address {
        self.gateway
    }

    /// Creates an API key for `account` (a fresh one when `None`) and funds it from the faucet
    /// with `faucet` units (0: none). Returns the key (shown once; only its hash is stored).
    pub async fn create_key(
        &self,
        account: Option<Address>,
        label: &str,
        faucet: Amount,
    ) -> Result<(String, Address), AccountsError> {
        let mut store = self.store.lock().await;
        create_key(&mut store, account, label, faucet).await
    }

    /// The funds of `account`, as `GET /v1/account` reports them.
    pub async fn view(&self, account: Address) -> plexus_ledger::AccountView {
        self.store.lock().await.ledger().account(account)
    }

    /// Runs `f` on the store (CLI-style access for tests and tools).
    pub async fn with_store<T>(&self, f: impl FnOnce(&Store) -> T) -> T {
        f(&*self.store.lock().await)
    }

    /// The account of an API key, if the ledger knows the key.
    pub async fn account_for_key(&self, key: &str) -> Result<Option<Address>, sqlx_error::Error> {
        self.store.lock().await.account_for_key(key).await
    }

    async fn lookup(&self, key: &str) -> Result<Option<Address>, ApiError> {
        self.account_for_key(key)
            .await
            .map_err(|e| ApiError::Internal(format!("ledger: {e}")))
    }

    /// Holds escrow for a request of at most `max_tokens` completion tokens.
    pub(crate) async fn hold(
        self: &Arc<Self>,
        payer: Address,
        max_tokens: usize,
    ) -> Result<Meter, ApiError> {
        let held = (max_tokens as u128 * u128::from(self.price)).min(u128::from(i64::MAX as u64))
            as Amount;
        let request = RequestId(random_bytes().map_err(ApiError::Internal)?);
        if held > 0 {
            let op = Op::OpenEscrow {
                request,
                client: payer,
                gateway: self.gateway,
                amount: held,
            };
            let mut store = self.store.lock().await;
            match store.execute(op, now_ms()).await {
                Ok(_) => {}
                Err(StoreError::Refused(plexus_ledger::OpError::Escrow(
                    plexus_ledger::EscrowError::Insufficient(i),
                ))) => {
                    return Err(ApiError::InsufficientQuota(format!(
                        "You exceeded your current quota: this request may cost up to {held} \
                         micro-PLX ({max_tokens} tokens x {} per token) and the account {payer} \
                         has {} available. Lower max_tokens or add funds.",
                        self.price, i.available
                    )))
                }
                Err(e) => return Err(ApiError::Internal(format!("ledger: {e}"))),
            }
        }
        Ok(Meter {
            accounts: self.clone(),
            request,
            held,
            done: false,
        })
    }

    async fn settle(&self, request: RequestId, tokens: usize, held: Amount) {
        let cost = (tokens as u128 * u128::from(self.price)).min(u128::from(held)) as Amount;
        let payouts = if cost > 0 {
            vec![Payout {
                provider: self.provider,
                amount: cost,
            }]
        } else {
            Vec::new()
        };
        let op = Op::Settle { request, payouts };
        if let Err(e) = self.store.lock().await.execute(op, now_ms()).await {
            // The escrow stays open and is released when the gateway next starts.
            tracing::error!(%request, error = %e, "settlement failed");
        }
    }
}

/// Creates an API key in `store` (see [`Accounts::create_key`]).
pub async fn create_key(
    store: &mut Store,
    account: Option<Address>,
    label: &str,
    faucet: Amount,
) -> Result<(String, Address), AccountsError> {
    let secret = random_bytes().map_err(AccountsError::Random)?;
    let key = format!("plx-{}", hex::encode(secret));
    let account = match account {
        Some(a) => a,
        None => Address::from_slice(&random_bytes().map_err(AccountsError::Random)?[..20]),
    };
    store.add_api_key(&key, account, label, now_ms()).await?;
    if faucet > 0 {
        store
            .execute(
                Op::Faucet {
                    account,
                    amount: faucet,
                },
                now_ms(),
            )
            .await
            .map_err(AccountsError::Refused)?;
    }
    Ok((key, account))
}

fn random_bytes() -> Result<[u8; 32], String> {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).map_err(|e| e.to_string())?;
    Ok(b)
}

/// The escrow of one running request. [`Meter::finish`] settles it to the tokens produced;
/// dropped unfinished (the request failed before generating, or the client left while queued),
/// it releases the escrow.
pub struct Meter {
    accounts: Arc<Accounts>,
    request: RequestId,
    held: Amount,
    done: bool,
}

impl Meter {
    /// Settles to `tokens` completion tokens, blocking this (non-async) thread until the ledger
    /// has recorded it, so the client's next look at its account sees the charge.
    pub(crate) fn finish_blocking(mut self, runtime: &tokio::runtime::Handle, tokens: usize) {
        self.done = true;
        if self.held == 0 {
            return;
        }
        let accounts = self.accounts.clone();
        runtime.block_on(accounts.settle(self.request, tokens, self.held));
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        if self.done || self.held == 0 {
            return;
        }
        let (accounts, request, held) = (self.accounts.clone(), self.request, self.held);
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move { accounts.settle(request, 0, held).await });
            }
            Err(_) => tracing::warn!(%request, "escrow left open; released at the next start"),
        }
    }
}

/// The account a request is charged to: `None` when the gateway runs without a ledger.
pub struct Payer(pub Option<Address>);

impl FromRequestParts<AppState> for Payer {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let Some(accounts) = state.accounts() else {
            return Ok(Payer(None));
        };
        let key = bearer(parts)?;
        match accounts.lookup(key).await? {
            Some(a) => Ok(Payer(Some(a))),
            None => Err(ApiError::InvalidApiKey(format!(
                "Incorrect API key provided: {}. Create one with `plexus keys create`.",
                redact(key)
            ))),
        }
    }
}

fn bearer(parts: &Parts) -> Result<&str, ApiError> {
    let missing = || {
        ApiError::InvalidApiKey(
            "You didn't provide an API key. Send it as `Authorization: Bearer KEY` \
             (create one with `plexus keys create`)."
                .into(),
        )
    };
    let value = parts
        .headers
        .get(axum::http::header::AUTHORIZATION)
        .ok_or_else(missing)?
        .to_str()
        .map_err(|_| missing())?;
    let key = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .ok_or_else(missing)?
        .trim();
    if key.is_empty() {
        return Err(missing());
    }
    Ok(key)
}

/// `plx-1234...cdef` for messages: enough to recognise a key, not to use it.
fn redact(key: &str) -> String {
    let n = key.chars().count();
    if n <= 10 {
        return "*".repeat(n);
    }
    let head: String = key.chars().take(6).collect();
    let tail: String = key.chars().skip(n - 4).collect();
    format!("{head}...{tail}")
}

/// `GET /v1/account`: `{"account","available","escrow","spent"}` in ledger units (micro-PLX).
pub async fn account(State(state): State<AppState>, payer: Payer) -> Response {
    let (Some(accounts), Some(account)) = (state.accounts(), payer.0) else {
        return ApiError::invalid(
            "this gateway runs without a ledger (--ledger none): there are no accounts",
            None,
        )
        .into_response();
    };
    let v = accounts.view(account).await;
    Json(json!({
        "account": account.to_string(),
        "available": v.available,
        "escrow": v.escrow,
        "spent": v.spent,
    }))
    .into_response()
}

/// The hook of [`crate::api::generation::start`]: holds escrow for `job` when the gateway has
/// a ledger (`max_tokens`, or the whole `context` when unset, times the number of choices,
/// times the price).
pub(crate) async fn hold_for(
    state: &AppState,
    job: &crate::api::generation::Job,
    context: usize,
) -> Result<Option<Meter>, ApiError> {
    match (state.accounts(), job.payer) {
        (Some(accounts), Some(payer)) => Ok(Some(
            accounts
                .hold(
                    payer,
                    job.max_tokens
                        .unwrap_or(context)
                        .saturating_mul(job.n.max(1)),
                )
                .await?,
        )),
        _ => Ok(None),
    }
}
