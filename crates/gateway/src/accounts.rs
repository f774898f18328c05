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
//! Pricing: the client pays `price` ledger units (micro-PLX) per completion token produced
//! (its charge, at most the escrow). Settlement splits the charge ([`crate::tab::split`]):
//!
//! - each stage node is paid for the work its signed receipts prove (positions x layers of its
//!   span, at the price it announced, per 1000: `plexus_node::metering`), into its locked
//!   earnings (claimable after the challenge window);
//! - the gateway's own account keeps the rest: its fee (and, with the local engine, all of
//!   it, since the gateway computed every token);
//! - when the providers' metered pay exceeds the charge (they price above this gateway; prompt
//!   positions are work too, while clients pay for completion tokens only), the charge is
//!   shared pro rata to their pay, rounded down (the rounding remainder to the gateway), and
//!   the shortfall is logged: the client is never charged more than it was quoted.
//!
//! Vouchers: with a signing key ([`Accounts::with_signer`]) the gateway's account (the payer
//! of the escrow) signs cumulative EIP-712 vouchers `(gateway, provider, request id, amount,
//! nonce, expiry 30 days)` to the providers, every [`VOUCHER_EVERY`] sampled tokens during a
//! generation ([`Meter::checkpoint_blocking`], the request's [`Tab`]) and for the settlement's
//! payouts that exceed them. The generation hands them to the backend, which delivers them to
//! the providers' nodes ([`crate::payments`]); a node keeps the latest and can redeem it on the
//! ledger while the escrow is open (settle pays only what exceeds redeemed vouchers, so
//! nothing is paid twice).
//!
//! A voucher signed during a stream is recorded in the store ([`Store::record_vouchers`])
//! before it is delivered. A gateway killed mid-request leaves its escrow open; on the next
//! start [`Accounts::open`] settles it paying each provider exactly its latest recorded
//! voucher (so every voucher a node holds is paid, once) and refunds the rest to the client:
//! a provider loses at most the work of one window.

use crate::backend::Usage;
use crate::error::ApiError;
use crate::state::AppState;
use crate::tab::{Promise, Tab};
use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use axum::Json;
use plexus_ledger::{
    Address, Amount, Config, Op, Payout, RequestId, SignedVoucher, Timestamp, Voucher,
};
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
    /// Signs the vouchers of provider payouts (the key of `gateway`).
    signer: Option<k256::ecdsa::SigningKey>,
    /// The ledger's EIP-712 chain id.
    chain_id: u64,
}

/// How long a voucher stays redeemable: seconds.
pub const VOUCHER_TTL_S: u64 = 30 * 24 * 3600;

/// Sampled tokens between two vouchers during a generation: a gateway killed mid-request
/// leaves at most this many tokens of each provider's work without a voucher.
pub const VOUCHER_EVERY: usize = 16;

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
    #[error("the voucher key's account {key} is not the gateway's account {gateway}")]
    SignerMismatch { key: Address, gateway: Address },
}

mod sqlx_error {
    pub use plexus_ledger_store::DbError as Error;
}

impl Accounts {
    /// Opens the ledger at `url` and settles the escrows this gateway left open (a previous
    /// run killed mid-request): each provider is paid its latest voucher recorded for the
    /// request, the client gets the rest back.
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
                "settling escrows left open by a previous run for the vouchers it recorded"
            );
        }
        for request in left {
            let payouts: Vec<Payout> = store
                .issued_vouchers(request)
                .await?
                .into_iter()
                .filter(|v| v.voucher.payer == gateway)
                .map(|v| Payout {
                    provider: v.voucher.provider,
                    amount: v.voucher.cumulative,
                })
                .collect();
            tracing::info!(%request, vouchers = payouts.len(), "settling an escrow left open by a previous run");
            let op = Op::Settle { request, payouts };
            store
                .execute(op, now_ms())
                .await
                .map_err(AccountsError::Recover)?;
            store.forget_vouchers(request).await?;
        }
        let chain_id = store.ledger().config().chain_id;
        Ok(Self {
            store: Mutex::new(store),
            gateway,
            provider,
            price,
            signer: None,
            chain_id,
        })
    }

    /// Signs a voucher for every provider payout with `key` (the gateway account's key).
    pub fn with_signer(mut self, key: k256::ecdsa::SigningKey) -> Result<Self, AccountsError> {
        let address = Address::from_private_key(&key);
        if address != self.gateway {
            return Err(AccountsError::SignerMismatch {
                key: address,
                gateway: self.gateway,
            });
        }
        self.signer = Some(key);
        Ok(self)
    }

    /// The rules of the ledger (fixed when it was created).
    pub async fn config(&self) -> Config {
        self.store.lock().await.ledger().config().clone()
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
        let mut store = self.store.lock().await;
        // Deposits made beside the gateway (`plexus wallet`, `plexus keys create --faucet`).
        if let Err(e) = store.catch_up().await {
            tracing::warn!("ledger catch-up failed: {e}");
        }
        store.ledger().account(account)
    }

    /// Executes one ledger operation now (tools: `plexus up` funds and stakes its nodes).
    pub async fn execute(&self, op: Op) -> Result<(), StoreError> {
        self.store
            .lock()
            .await
            .execute(op, now_ms())
            .await
            .map(|_| ())
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

    /// Holds escrow for `request` (its id from the request's seal) of at most `max_tokens`
    /// completion tokens.
    pub(crate) async fn hold(
        self: &Arc<Self>,
        payer: Address,
        max_tokens: usize,
        request: RequestId,
    ) -> Result<Meter, ApiError> {
        let held = (max_tokens as u128 * u128::from(self.price)).min(u128::from(i64::MAX as u64))
            as Amount;
        if held > 0 {
            let op = Op::OpenEscrow {
                request,
                client: payer,
                gateway: self.gateway,
                amount: held,
            };
            let mut store = self.store.lock().await;
            let mut result = store.execute(op.clone(), now_ms()).await;
            if let Err(StoreError::Refused(plexus_ledger::OpError::Escrow(
                plexus_ledger::EscrowError::Insufficient(_),
            ))) = result
            {
                // Funds may have arrived from another process since this store last looked.
                if matches!(store.catch_up().await, Ok(n) if n > 0) {
                    result = store.execute(op, now_ms()).await;
                }
            }
            match result {
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
            tab: Tab::new(self.provider, self.price, held),
            done: false,
        })
    }

    /// Settles `request` to `tokens` completion tokens (each provider paid at least its
    /// promise on `tab`) and returns the vouchers of the payouts the settlement raises (none
    /// without a signer; the gateway's own fee needs none).
    async fn settle(
        &self,
        request: RequestId,
        tokens: usize,
        tab: &mut Tab,
        usage: &Usage,
    ) -> Vec<SignedVoucher> {
        let streamed = !tab.vouched().is_empty();
        // Nodes the audits convicted (offenders, and referees that backed them) are paid
        // nothing more for this request, as at every checkpoint.
        let excluded = convicted_accounts(usage);
        let mut costs = usage.costs();
        costs.retain(|a, _| !excluded.contains(a));
        let (split, raised) = tab.close(tokens, &costs);
        if split.shortfall > 0 {
            tracing::warn!(
                %request,
                shortfall = split.shortfall,
                "providers' metered pay exceeds the client's charge; paid pro rata"
            );
        }
        let now = now_ms();
        let vouchers = self.sign(request, &raised, now);
        let op = Op::Settle {
            request,
            payouts: split.payouts,
        };
        let mut store = self.store.lock().await;
        // Audit verdicts first: the client of the (still open) request gets its refund share.
        crate::slashing::apply(&mut store, request, &usage.convictions, now).await;
        match store.execute(op, now).await {
            Ok(_) if streamed => {
                if let Err(e) = store.forget_vouchers(request).await {
                    tracing::warn!(%request, "cannot drop the request's recorded vouchers: {e}");
                }
            }
            Ok(_) => {}
            Err(e) => {
                // The escrow stays open (providers may redeem their vouchers meanwhile) and is
                // settled when the gateway next starts, for the vouchers recorded by then.
                tracing::error!(%request, error = %e, "settlement failed");
                if let Err(e) = store.record_vouchers(&vouchers).await {
                    tracing::error!(%request, "cannot record the settlement's vouchers: {e}");
                    return Vec::new();
                }
            }
        }
        vouchers
    }

    /// The vouchers of `promises` on `request`, signed now (none without a signer).
    fn sign(&self, request: RequestId, promises: &[Promise], now: Timestamp) -> Vec<SignedVoucher> {
        match &self.signer {
            Some(key) => sign_vouchers(key, self.chain_id, request, promises, now),
            None => Vec::new(),
        }
    }

    /// Records vouchers signed during a stream before they are delivered.
    async fn record(&self, vouchers: &[SignedVoucher]) -> Result<(), sqlx_error::Error> {
        self.store.lock().await.record_vouchers(vouchers).await
    }
}

/// The vouchers `key`'s account (the payer) signs for `promises` on `request` at `now`: one per
/// promise to a provider other than the payer itself, redeemable for [`VOUCHER_TTL_S`].
pub fn sign_vouchers(
    key: &k256::ecdsa::SigningKey,
    chain_id: u64,
    request: RequestId,
    promises: &[Promise],
    now: Timestamp,
) -> Vec<SignedVoucher> {
    let payer = Address::from_private_key(key);
    promises
        .iter()
        .filter(|p| p.provider != payer && p.cumulative > 0)
        .map(|p| {
            Voucher {
                payer,
                provider: p.provider,
                request,
                cumulative: p.cumulative,
                nonce: p.nonce,
                expiry: now / 1000 + VOUCHER_TTL_S,
            }
            .sign(chain_id, key)
        })
        .collect()
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
    /// What the providers have been promised so far.
    tab: Tab,
    done: bool,
}

impl Meter {
    /// During the generation: `sampled` tokens sampled so far and the providers' metered
    /// `usage` so far. Raises the providers' promises on the tab, signs them and records them
    /// in the store (blocking this non-async thread) before returning them for the backend to
    /// deliver. A voucher that could not be recorded is not delivered (the settlement still
    /// pays its amount).
    pub(crate) fn checkpoint_blocking(
        &mut self,
        runtime: &tokio::runtime::Handle,
        sampled: usize,
        usage: &Usage,
    ) -> Vec<SignedVoucher> {
        if self.held == 0 || self.accounts.signer.is_none() {
            return Vec::new();
        }
        let excluded = convicted_accounts(usage);
        let raised = self.tab.checkpoint(sampled, &usage.costs(), &excluded);
        let vouchers = self.accounts.sign(self.request, &raised, now_ms());
        if vouchers.is_empty() {
            return vouchers;
        }
        match runtime.block_on(self.accounts.record(&vouchers)) {
            Ok(()) => vouchers,
            Err(e) => {
                tracing::error!(request = %self.request, "cannot record vouchers; not sent: {e}");
                Vec::new()
            }
        }
    }

    /// Settles to `tokens` completion tokens, blocking this (non-async) thread until the ledger
    /// has recorded it, so the client's next look at its account sees the charge. Returns the
    /// providers' vouchers for the backend to deliver.
    pub(crate) fn finish_blocking(
        mut self,
        runtime: &tokio::runtime::Handle,
        tokens: usize,
        usage: &Usage,
    ) -> Vec<SignedVoucher> {
        self.done = true;
        if self.held == 0 {
            return Vec::new();
        }
        let accounts = self.accounts.clone();
        runtime.block_on(accounts.settle(self.request, tokens, &mut self.tab, usage))
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        if self.done || self.held == 0 {
            return;
        }
        let (accounts, request, mut tab) = (self.accounts.clone(), self.request, self.tab.clone());
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    accounts
                        .settle(request, 0, &mut tab, &Usage::default())
                        .await;
                });
            }
            Err(_) => tracing::warn!(%request, "escrow left open; settled at the next start"),
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
            "You didn't provide an API key. Send it as `Authorization: Bearer KEY` or \
             `x-api-key: KEY` (create one with `plexus keys create`)."
                .into(),
        )
    };
    // Anthropic's clients send `x-api-key: KEY` instead of a bearer token.
    let key = match parts.headers.get(axum::http::header::AUTHORIZATION) {
        Some(value) => {
            let value = value.to_str().map_err(|_| missing())?;
            value
                .strip_prefix("Bearer ")
                .or_else(|| value.strip_prefix("bearer "))
                .ok_or_else(missing)?
        }
        None => parts
            .headers
            .get("x-api-key")
            .ok_or_else(missing)?
            .to_str()
            .map_err(|_| missing())?,
    }
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
                    RequestId(job.seal.request()),
                )
                .await?,
        )),
        _ => Ok(None),
    }
}

/// The accounts a request's audits convicted: offenders and the referees that backed them.
fn convicted_accounts(usage: &Usage) -> Vec<Address> {
    usage
        .convictions
        .iter()
        .flat_map(|c| std::iter::once(c.offender).chain(c.colluders.iter().copied()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn a(b: u8) -> Address {
        Address::repeat_byte(b)
    }

    #[test]
    fn settlement_vouchers_pay_each_provider_its_payout_and_redeem_like_the_settlement() {
        // (The split itself is tested in `crate::tab`.)
        let key = k256::ecdsa::SigningKey::from_slice(&[7; 32]).unwrap();
        let gw = Address::from_private_key(&key);
        let request = RequestId([3; 32]);
        let mut tab = Tab::new(gw, 1, 100);
        let (split, raised) = tab.close(100, &BTreeMap::from([(a(1), 30), (a(2), 45)]));
        let vs = sign_vouchers(&key, 31_337, request, &raised, 5_000);
        // The gateway's own fee gets no voucher.
        assert_eq!(vs.len(), 2);
        for (v, amount) in vs.iter().zip([30, 45]) {
            v.verify(31_337, 5_000).unwrap();
            assert_eq!(v.voucher.payer, gw);
            assert_eq!(v.voucher.cumulative, amount);
            assert_eq!(v.voucher.expiry, 5 + VOUCHER_TTL_S);
        }
        // On a ledger: redeemed before the settlement, the same settlement pays nothing twice.
        let mut l = plexus_ledger::Ledger::new(Config::default());
        l.faucet(a(9), 1_000, 0).unwrap();
        l.open_escrow(request, a(9), gw, 100, 0).unwrap();
        l.redeem(request, vs[0].clone(), 1_000).unwrap();
        l.settle(request, split.payouts.clone(), 1_000).unwrap();
        assert_eq!(l.account(a(1)).locked, 30);
        assert_eq!(l.account(a(2)).locked, 45);
        assert_eq!(l.account(gw).locked, 25);
        assert_eq!(l.account(a(9)).available, 900);
        assert!(matches!(
            l.redeem(request, vs[1].clone(), 1_000),
            Err(plexus_ledger::RedeemError::Settled { paid: 45, .. })
        ));
        l.check_invariants().unwrap();
    }
}
