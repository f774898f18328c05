//! Stake for a run whose spec asks one (`stake.min`): the run's ledger (the operator's, the
//! same `--ledger` for every worker), who holds enough on it, and slashing a worker an audit
//! convicted.
//!
//! ```text
//! start ─▶ this worker's own account must hold stake.min staked, else it does not start
//! every REFRESH ─▶ catch up with the ledger's journal ─▶ every account's stake still
//!                  slashable (staked + unbonding), into Shared's StakeGate (plain data: the
//!                  round loop and the message handler read it without waiting on the database)
//! a contribution, a status ─▶ from a worker under stake.min: refused / not waited for, not
//!                  a voter (as if convicted, until it stakes)
//! an audit convicts W in round r ─▶ Op::Slash { W, everything slashable, challenger: this
//!                  worker, request: slash_request(run, r, W) } ─▶ the first honest auditor to
//!                  record it takes the challenger's share; the ledger refuses the others
//!                  (one slash per offender and request)
//! ```
//!
//! A worker's account is the Ethereum address of its node key, which its peer id carries
//! (secp256k1 keys are short enough to be inlined in the id), so a status is enough to tell.
//! Workers read the ledger at slightly different moments, so one may still refuse a
//! contribution another accepted; the round's sync fetches it again from the holder, by then
//! with a fresher view (a worker stakes before it starts, seconds before its first
//! contribution). Stake counts while it is slashable: unbonding stake stays slashable for the
//! ledger's unbonding period (7 days by default), so unbonding mid-run changes nothing here
//! (and cannot make honest workers' sets differ); what leaves the count is a claim after that
//! period, or a slash (of a worker already refused as convicted).
//!
//! Trust: `--ledger` is a database URL, and whoever holds a writable one can record any
//! operation. Give workers you do not run a read-only URL (SQLite `?mode=ro`, a read-only
//! PostgreSQL role): they check stakes, and their slashes fail (said on their terminal); the
//! operator's own workers, with a writable URL, record the slashes their audits find.

use super::lock;
use super::shared::{worker_name, Shared};
use anyhow::{bail, Context as _};
use plexus_core::Digest;
use plexus_ledger::{Address, Amount, Config, Op, OpError, RequestId, SlashError};
use plexus_ledger_store::{Store, StoreError};
use plexus_train::audit::slash_request;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

/// Writes of one slash tried again after losing a race with another writer.
const SLASH_ATTEMPTS: u64 = 4;

/// How often a worker catches up with the ledger.
pub const REFRESH: Duration = Duration::from_millis(500);

/// The ledger account of a worker id (peer id bytes): the address of the key its id inlines.
pub fn worker_account(worker: &[u8]) -> Option<Address> {
    plexus_ledger::address_of_peer(worker)
}

/// Who holds the run's stake (staked or unbonding: still slashable), as last read from the
/// ledger.
#[derive(Debug, Clone)]
pub struct StakeGate {
    pub min: Amount,
    staked: HashMap<Address, Amount>,
}

impl StakeGate {
    pub fn new(min: Amount) -> Self {
        Self {
            min,
            staked: HashMap::new(),
        }
    }

    /// Replaces the view with a fresh reading of the ledger.
    pub fn update(&mut self, staked: HashMap<Address, Amount>) {
        self.staked = staked;
    }

    /// What `worker` has staked (0 for an id without an account).
    pub fn staked(&self, worker: &[u8]) -> Amount {
        worker_account(worker).map_or(0, |a| self.staked.get(&a).copied().unwrap_or(0))
    }

    /// Whether `worker`'s contributions count.
    pub fn holds(&self, worker: &[u8]) -> bool {
        self.staked(worker) >= self.min
    }

    /// Why `worker`'s contribution does not count, if it does not.
    pub fn refusal(&self, worker: &[u8]) -> Option<String> {
        if self.holds(worker) {
            return None;
        }
        Some(match worker_account(worker) {
            Some(a) => format!(
                "not staked: its account {a} holds {} slashable stake on the run's ledger, the run asks {}",
                self.staked(worker),
                self.min
            ),
            None => "not staked: its id names no ledger account (not a secp256k1 key)".into(),
        })
    }
}

/// The run's ledger as this worker uses it.
pub struct RunLedger {
    store: tokio::sync::Mutex<Store>,
    url: String,
    me: Address,
    min: Amount,
}

/// What became of a slash this worker brought.
#[derive(Debug, PartialEq, Eq)]
pub enum Slashed {
    /// Recorded: `amount` taken, this worker the challenger.
    Taken(Amount),
    /// Another auditor recorded this verdict first.
    AlreadyDone,
    /// The worker has nothing slashable left.
    Nothing,
}

impl RunLedger {
    /// Opens the ledger at `url` and checks that this worker (`me`) holds `min` staked.
    pub async fn open(url: &str, me: Address, min: Amount) -> anyhow::Result<Self> {
        let store = Store::open(url, Config::default()).await.with_context(|| {
            format!(
                "cannot open the ledger {}",
                super::super::ledger::redact(url)
            )
        })?;
        let staked = store.ledger().account(me).staked;
        if staked < min {
            bail!(
                "this run asks every worker to hold {min} staked on its ledger; this worker's account {me} holds {staked} (stake with `plexus wallet stake AMOUNT --ledger URL --data-dir DIR`)"
            );
        }
        Ok(Self {
            store: tokio::sync::Mutex::new(store),
            url: url.to_owned(),
            me,
            min,
        })
    }

    pub fn min(&self) -> Amount {
        self.min
    }

    /// What `account` has staked now.
    pub async fn staked(&self, account: Address) -> Amount {
        self.store.lock().await.ledger().account(account).staked
    }

    /// Catches up with the journal; the staked amounts of every account when anything changed
    /// (or `force`).
    pub async fn read(&self, force: bool) -> Option<HashMap<Address, Amount>> {
        let mut store = self.store.lock().await;
        let changed = match store.catch_up().await {
            Ok(n) => n > 0,
            Err(e) => {
                eprintln!(
                    "warning: cannot read the run's ledger {}: {e}",
                    super::super::ledger::redact(&self.url)
                );
                false
            }
        };
        (changed || force).then(|| {
            let l = store.ledger();
            l.accounts()
                .into_iter()
                .map(|a| {
                    let v = l.account(a);
                    (a, v.staked.saturating_add(v.unbonding))
                })
                .filter(|(_, s)| *s > 0)
                .collect()
        })
    }

    /// Keeps `shared`'s gate current, every [`REFRESH`], until the runtime stops.
    pub async fn keep_current(self: std::sync::Arc<Self>, shared: std::sync::Arc<Mutex<Shared>>) {
        loop {
            tokio::time::sleep(REFRESH).await;
            if let Some(staked) = self.read(false).await {
                if let Some(gate) = lock(&shared).stake.as_mut() {
                    gate.update(staked);
                }
            }
        }
    }

    /// Slashes `worker`, convicted by this worker's audit of `round` of `run`: everything
    /// slashable, under the verdict's request id, this worker the challenger.
    pub async fn slash(&self, run: Digest, round: u64, worker: &[u8]) -> anyhow::Result<Slashed> {
        let offender = worker_account(worker)
            .with_context(|| format!("{} names no ledger account", worker_name(worker)))?;
        let request = RequestId(slash_request(run, round, worker));
        let mut store = self.store.lock().await;
        let mut attempt = 0;
        loop {
            let _ = store.catch_up().await;
            let v = store.ledger().account(offender);
            let amount = v
                .staked
                .saturating_add(v.unbonding)
                .saturating_add(v.locked);
            // With nothing left, still asked for 1: the ledger then says whether another
            // auditor's slash of this verdict took it.
            let op = Op::Slash {
                offender,
                amount: amount.max(1),
                challenger: self.me,
                request: Some(request),
            };
            return match store.execute(op, plexus_gateway::accounts::now_ms()).await {
                Ok(_) => Ok(Slashed::Taken(amount)),
                Err(StoreError::Refused(OpError::Slash(SlashError::AlreadySlashed { .. }))) => {
                    Ok(Slashed::AlreadyDone)
                }
                Err(StoreError::Refused(OpError::Slash(SlashError::NothingToSlash { .. }))) => {
                    Ok(Slashed::Nothing)
                }
                // Other workers write the same ledger: a write that lost a race is tried
                // again on the caught-up state.
                Err(StoreError::Db(_) | StoreError::Reload(_)) if attempt < SLASH_ATTEMPTS => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(50 * attempt)).await;
                    continue;
                }
                Err(e) => Err(e.into()),
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use plexus_core::keys::NodeKey;

    #[test]
    fn a_worker_id_names_the_account_of_its_key_and_the_gate_counts_its_stake() {
        let key = NodeKey::generate();
        let worker = key.peer_id().to_bytes();
        let account = plexus_ledger::address_of(&key.public()).unwrap();
        assert_eq!(worker_account(&worker), Some(account));
        assert_eq!(worker_account(&worker[..worker.len() - 1]), None);
        assert_eq!(worker_account(b""), None);
        // A sha256-multihash id (code 0x12) names no key.
        let hashed = [&[0x12u8, 32][..], &[7u8; 32]].concat();
        assert_eq!(worker_account(&hashed), None);

        let mut gate = StakeGate::new(1_000);
        assert!(gate.refusal(&worker).unwrap().contains("holds 0 slashable"));
        gate.update([(account, 999)].into());
        assert!(!gate.holds(&worker));
        gate.update([(account, 1_000)].into());
        assert!(gate.holds(&worker));
        assert_eq!(gate.refusal(&worker), None);
        assert!(gate.refusal(&hashed).unwrap().contains("no ledger account"));
    }
}
