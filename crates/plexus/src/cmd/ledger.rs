//! What the ledger-using subcommands share: `--ledger URL` resolution, amounts on the command
//! line, `plexus keys` (API keys mapped to ledger accounts) and `plexus status` (accounts,
//! stakes, escrow and earnings on a ledger).

use anyhow::Context as _;
use clap::{Args, Subcommand};
use plexus_ledger::types::UNITS_PER_PLX;
use plexus_ledger::{Address, Amount, Config};
use plexus_ledger_store::Store;
use std::path::{Path, PathBuf};

/// `--ledger URL`: where accounts live.
#[derive(Args, Debug, Clone)]
pub struct LedgerArgs {
    /// The ledger: sqlite://PATH (created on first start) or postgres://USER:PASS@HOST/DB;
    /// `none` runs without accounts (every request free). Default: sqlite://DATA_DIR/ledger.db.
    /// With a ledger, completions need a per-account key (`Authorization: Bearer KEY`, from
    /// `plexus keys create`) and are charged to its account.
    #[arg(long, value_name = "URL", global = true)]
    pub ledger: Option<String>,
}

impl LedgerArgs {
    /// The ledger URL (`None` for `--ledger none`), defaulting to a SQLite file in `data_dir`.
    pub fn url(&self, data_dir: &Path) -> anyhow::Result<Option<String>> {
        match self.ledger.as_deref() {
            Some("none") => Ok(None),
            Some(u)
                if u.starts_with("sqlite://")
                    || u.starts_with("postgres://")
                    || u.starts_with("postgresql://") =>
            {
                Ok(Some(u.to_owned()))
            }
            Some(u) => {
                anyhow::bail!("--ledger {u:?}: expected sqlite://PATH, postgres://... or none")
            }
            None => Ok(Some(format!(
                "sqlite://{}",
                data_dir.join("ledger.db").display()
            ))),
        }
    }
}

/// The rules a new ledger is created with (`plexus up`, `plexus gateway`). A ledger keeps the
/// rules it was created with; asking an existing one for other rules is refused.
#[derive(Args, Debug, Clone, Default)]
pub struct LedgerRulesArgs {
    /// How long providers' earnings stay locked (challengeable) before they are claimable, in
    /// seconds, for a ledger created by this run (default 86400: 24 h). Short windows are for
    /// tests and demos.
    #[arg(long, value_name = "SECONDS")]
    pub challenge_window: Option<u64>,
}

impl LedgerRulesArgs {
    /// The rules for a new ledger: the defaults with the flags applied (the unbonding period
    /// stays longer than the window).
    pub fn config(&self) -> anyhow::Result<Config> {
        let mut c = Config::default();
        if let Some(s) = self.challenge_window {
            let ms = s
                .checked_mul(1000)
                .filter(|ms| *ms <= i64::MAX as u64 / 4)
                .with_context(|| format!("--challenge-window {s}: too long"))?;
            c.challenge_window_ms = ms;
            c.unbonding_period_ms = c.unbonding_period_ms.max(ms.saturating_mul(2).max(1));
        }
        c.validate()?;
        Ok(c)
    }

    /// Refuses an existing ledger whose rules differ from the flags given.
    pub fn check(&self, stored: &Config) -> anyhow::Result<()> {
        if let Some(s) = self.challenge_window {
            let have = stored.challenge_window_ms;
            if have != s.saturating_mul(1000) {
                anyhow::bail!(
                    "--challenge-window {s}: this ledger was created with a challenge window of                      {} s, and a ledger keeps the rules it was created with (use a new ledger,                      or drop the flag)",
                    have as f64 / 1000.0
                );
            }
        }
        Ok(())
    }
}

/// Refuses a static `--api-key` together with a ledger: both would read the same
/// `Authorization: Bearer` header, so a client could not present both. With a ledger the
/// per-account keys authenticate (and pay); the static key is for a gateway without one.
pub fn check_auth(accounts_on: bool, api_key: Option<&str>) -> anyhow::Result<()> {
    if accounts_on && api_key.is_some_and(|k| !k.is_empty()) {
        anyhow::bail!(
            "--api-key (or PLEXUS_API_KEY) is a static key for a gateway without a ledger; \
             with a ledger, clients use per-account keys (`plexus keys create`). \
             Pass --ledger none to use --api-key, or drop --api-key"
        );
    }
    Ok(())
}

/// Parses an amount: a whole number of ledger units (micro-PLX), or `N PLX` / `NPLX` (whole or
/// decimal PLX, at most 6 decimals).
pub fn parse_amount(s: &str) -> Result<Amount, String> {
    let t = s.trim();
    let bad = || format!("{s:?} is not an amount (micro-PLX units, or e.g. `100PLX`, `0.5PLX`)");
    let amount = if let Some(plx) = t
        .strip_suffix("PLX")
        .or_else(|| t.strip_suffix("plx"))
        .map(str::trim)
    {
        let (whole, frac) = plx.split_once('.').unwrap_or((plx, ""));
        if frac.len() > 6 || (whole.is_empty() && frac.is_empty()) {
            return Err(bad());
        }
        let whole: u128 = if whole.is_empty() {
            0
        } else {
            whole.parse().map_err(|_| bad())?
        };
        let frac_units: u128 = if frac.is_empty() {
            0
        } else {
            frac.parse::<u128>().map_err(|_| bad())? * 10u128.pow(6 - frac.len() as u32)
        };
        whole * u128::from(UNITS_PER_PLX) + frac_units
    } else {
        t.parse::<u128>().map_err(|_| bad())?
    };
    if amount > u128::from(plexus_ledger::types::MAX_AMOUNT) {
        return Err(format!("{s:?} is larger than the largest ledger amount"));
    }
    Ok(amount as Amount)
}

/// `plexus keys`.
#[derive(Subcommand, Debug)]
pub enum KeysCommand {
    /// Create an API key mapped to a ledger account; prints `API key: KEY` (shown once, stored
    /// hashed) and `account: ADDRESS`.
    Create(KeysCreateArgs),
    /// List API keys (their hashes, accounts and labels).
    List(KeysListArgs),
}

#[derive(Args, Debug)]
pub struct KeysCreateArgs {
    #[command(flatten)]
    pub ledger: LedgerArgs,
    /// Directory of the default SQLite ledger. Default: $PLEXUS_DATA_DIR, else
    /// $XDG_DATA_HOME/plexus, else ~/.local/share/plexus.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Map the key to this existing account (0x... address) instead of a new one.
    #[arg(long)]
    pub account: Option<String>,
    /// A label to recognise the key by.
    #[arg(long, default_value = "")]
    pub label: String,
    /// Fund the account from the faucet (local ledgers) with this amount.
    #[arg(long, value_parser = parse_amount, default_value = "0")]
    pub faucet: Amount,
}

#[derive(Args, Debug)]
pub struct KeysListArgs {
    #[command(flatten)]
    pub ledger: LedgerArgs,
    /// Directory of the default SQLite ledger.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
}

async fn open(ledger: &LedgerArgs, data_dir: &Option<PathBuf>) -> anyhow::Result<Store> {
    let dir = data_dir
        .clone()
        .unwrap_or_else(super::net::default_data_dir);
    let url = ledger
        .url(&dir)?
        .context("`--ledger none` has no accounts to create keys in")?;
    Store::open(&url, Config::default())
        .await
        .with_context(|| format!("cannot open the ledger {}", redact(&url)))
}

/// A URL for messages, password hidden.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => match url[s + 3..at].split_once(':') {
            Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
            None => url.to_owned(),
        },
        _ => url.to_owned(),
    }
}

pub fn keys(cmd: KeysCommand) -> anyhow::Result<()> {
    let rt = super::net::runtime()?;
    rt.block_on(async {
        match cmd {
            KeysCommand::Create(a) => {
                let mut store = open(&a.ledger, &a.data_dir).await?;
                let account = a
                    .account
                    .as_deref()
                    .map(|s| {
                        s.parse::<Address>()
                            .with_context(|| format!("--account {s:?} is not a 0x address"))
                    })
                    .transpose()?;
                let (key, account) =
                    plexus_gateway::accounts::create_key(&mut store, account, &a.label, a.faucet)
                        .await?;
                println!("API key: {key}");
                println!("account: {account}");
                if a.faucet > 0 {
                    println!("funded: {} micro-PLX", a.faucet);
                }
                store.close().await;
            }
            KeysCommand::List(a) => {
                let store = open(&a.ledger, &a.data_dir).await?;
                for k in store.api_keys().await? {
                    let v = store.ledger().account(k.account);
                    println!(
                        "{}  {}  available {}  escrow {}  spent {}  {}",
                        &k.key_hash[..16],
                        k.account,
                        v.available,
                        v.escrow,
                        v.spent,
                        k.label
                    );
                }
                store.close().await;
            }
        }
        anyhow::Ok(())
    })
}

/// `plexus status`.
#[derive(Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    pub ledger: LedgerArgs,
    /// Data directory: its default SQLite ledger, and its node key (whose account is marked
    /// `this node`). For `plexus up`'s ledger: `~/.cache/plexus/up` (or $PLEXUS_CACHE_DIR/up).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// One JSON object: `{"accounts": [{"account", "available", "staked", "unbonding",
    /// "locked", "claimable", "escrow", "spent", "earnings", "this_node",
    /// "audit_probability"}], "supply", "audit": {"node_price", "collusion",
    /// "cross_build_factor"}}`.
    #[arg(long)]
    pub json: bool,
    /// The node price the audit probability column assumes (micro-PLX per 1000 positions per
    /// layer; `plexus up`'s default).
    #[arg(long, default_value_t = 10)]
    pub node_price: u64,
    /// The collusion share the audit probability assumes, in [0, 1).
    #[arg(long, default_value_t = 0.1)]
    pub collusion: f64,
}

/// Prints every account of the ledger with its buckets (micro-PLX): `locked` are earnings
/// inside their challenge window, `claimable` the part of them whose window has passed.
pub fn status(a: StatusArgs) -> anyhow::Result<()> {
    if !(0.0..1.0).contains(&a.collusion) {
        anyhow::bail!("--collusion {}: expected a share in [0, 1)", a.collusion);
    }
    // The Proof-of-Sampling audit probability a gateway uses for a node of this stake.
    let p =
        |staked: u64| plexus_verify::draw::network_probability(a.node_price, staked, a.collusion);
    let rt = super::net::runtime()?;
    rt.block_on(async {
        let store = open(&a.ledger, &a.data_dir).await?;
        let dir = a
            .data_dir
            .clone()
            .unwrap_or_else(super::net::default_data_dir);
        // Only read an existing key: status never creates one.
        let me = std::fs::read_to_string(dir.join("node.key"))
            .ok()
            .and_then(|_| plexus_core::keys::NodeKey::load_or_create(&dir.join("node.key")).ok())
            .and_then(|k| plexus_ledger::address_of(&k.public()));
        let now = plexus_gateway::accounts::now_ms();
        let ledger = store.ledger();
        let mut rows = Vec::new();
        let mut accounts = ledger.accounts();
        // This node's account even when it holds nothing (a new node, or a slashed one).
        if let Some(me) = me.filter(|m| !accounts.contains(m)) {
            accounts.push(me);
        }
        for account in accounts {
            let v = ledger.account(account);
            let (mut claimable, mut earnings) = (0u64, 0usize);
            for (_, e) in ledger.earnings(account) {
                earnings += 1;
                if e.unlock_at <= now && e.challenger.is_none() {
                    claimable += e.amount;
                }
            }
            rows.push((account, v, claimable, earnings, Some(account) == me));
        }
        if a.json {
            let accounts: Vec<serde_json::Value> = rows
                .iter()
                .map(|(account, v, claimable, earnings, mine)| {
                    serde_json::json!({
                        "account": account.to_string(),
                        "available": v.available,
                        "staked": v.staked,
                        "unbonding": v.unbonding,
                        "locked": v.locked,
                        "claimable": claimable,
                        "escrow": v.escrow,
                        "spent": v.spent,
                        "earnings": earnings,
                        "this_node": mine,
                        "audit_probability": p(v.staked),
                    })
                })
                .collect();
            println!(
                "{}",
                serde_json::json!({
                    "accounts": accounts,
                    "supply": ledger.issued(),
                    "audit": {
                        "node_price": a.node_price,
                        "collusion": a.collusion,
                        "cross_build_factor": plexus_verify::draw::CROSS_BUILD_AUDIT_FACTOR,
                    },
                })
            );
        } else {
            println!(
                "{:<42} {:>14} {:>12} {:>12} {:>12} {:>12} {:>10} {:>12} {:>7}",
                "account",
                "available",
                "staked",
                "unbonding",
                "locked",
                "claimable",
                "escrow",
                "spent",
                "audit p"
            );
            for (account, v, claimable, _, mine) in &rows {
                println!(
                    "{:<42} {:>14} {:>12} {:>12} {:>12} {:>12} {:>10} {:>12} {:>7.4}{}",
                    account.to_string(),
                    v.available,
                    v.staked,
                    v.unbonding,
                    v.locked,
                    claimable,
                    v.escrow,
                    v.spent,
                    p(v.staked),
                    if *mine { "  (this node)" } else { "" }
                );
            }
            println!(
                "amounts in micro-PLX; supply {}; audit p: Proof-of-Sampling probability for a \
                 node of that stake at price {} with collusion share {} (x{}, at most 1, for a \
                 node whose build no other node of its span announces)",
                ledger.issued(),
                a.node_price,
                a.collusion,
                plexus_verify::draw::CROSS_BUILD_AUDIT_FACTOR
            );
        }
        store.close().await;
        anyhow::Ok(())
    })
}

/// Opens the gateway's accounts on `--ledger` (`None` for `--ledger none`). The gateway's node
/// key is its account: it opens escrows and is paid for the tokens it serves.
pub async fn open_accounts(
    args: &LedgerArgs,
    rules: &LedgerRulesArgs,
    data_dir: &Path,
    key: &plexus_core::keys::NodeKey,
    price: Option<Amount>,
) -> anyhow::Result<Option<std::sync::Arc<plexus_gateway::accounts::Accounts>>> {
    let Some(url) = args.url(data_dir)? else {
        check_ledger_flags(
            false,
            &[
                ("--challenge-window", rules.challenge_window.is_some()),
                ("--price", price.is_some()),
            ],
        )?;
        return Ok(None);
    };
    let price = price.unwrap_or(DEFAULT_PRICE);
    let me = plexus_ledger::address_of(&key.public()).context("the node key is not secp256k1")?;
    let signer =
        plexus_ledger::receipt::signing_key(key).context("the node key is not secp256k1")?;
    let accounts = plexus_gateway::accounts::Accounts::open(&url, rules.config()?, me, me, price)
        .await
        .with_context(|| format!("cannot open the ledger {}", redact(&url)))?
        .with_signer(signer)?;
    rules.check(&accounts.config().await)?;
    Ok(Some(std::sync::Arc::new(accounts)))
}

/// Price per completion token when `--price` is not given (micro-PLX).
pub const DEFAULT_PRICE: Amount = 1;

/// Refuses, by name, every given flag that only means something on a ledger when there is
/// none (`--ledger none`): a flag accepted and ignored would let the user believe it acted.
pub fn check_ledger_flags(has_ledger: bool, flags: &[(&str, bool)]) -> anyhow::Result<()> {
    let given: Vec<&str> = flags
        .iter()
        .filter(|(_, on)| *on)
        .map(|(name, _)| *name)
        .collect();
    if has_ledger || given.is_empty() {
        return Ok(());
    }
    anyhow::bail!(
        "{} only mean{} something on a ledger (balances, stakes, charges); `--ledger none` has \
         none. Drop {} or use a ledger",
        given.join(", "),
        if given.len() == 1 { "s" } else { "" },
        if given.len() == 1 { "it" } else { "them" }
    )
}

/// The dev API key of `plexus up`: kept in `DIR/dev-api-key` (mode 0600) and reused while the
/// ledger knows it; created (and funded with `faucet`) on first start.
pub async fn dev_key(
    accounts: &plexus_gateway::accounts::Accounts,
    dir: &Path,
    faucet: Amount,
) -> anyhow::Result<String> {
    let path = dir.join("dev-api-key");
    if let Ok(text) = std::fs::read_to_string(&path) {
        let key = text.trim().to_owned();
        if accounts_knows(accounts, &key).await {
            return Ok(key);
        }
    }
    let (key, _) = accounts
        .create_key(None, "plexus up dev key", faucet)
        .await?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    use std::io::Write as _;
    let mut file = options
        .open(&path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    writeln!(file, "{key}")?;
    Ok(key)
}

async fn accounts_knows(accounts: &plexus_gateway::accounts::Accounts, key: &str) -> bool {
    accounts.account_for_key(key).await.ok().flatten().is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_parse_in_units_or_plx() {
        assert_eq!(parse_amount("1500"), Ok(1500));
        assert_eq!(parse_amount("100PLX"), Ok(100_000_000));
        assert_eq!(parse_amount("0.5 PLX"), Ok(500_000));
        assert_eq!(parse_amount(".000001PLX"), Ok(1));
        assert!(parse_amount("0.0000001PLX").is_err());
        assert!(parse_amount("-3").is_err());
        assert!(parse_amount("lots").is_err());
        assert!(parse_amount("99999999999999999999").is_err());
    }

    #[test]
    fn ledger_urls_resolve() {
        let a = |s: Option<&str>| LedgerArgs {
            ledger: s.map(str::to_owned),
        };
        let d = Path::new("/data");
        assert_eq!(a(None).url(d).unwrap().unwrap(), "sqlite:///data/ledger.db");
        assert_eq!(a(Some("none")).url(d).unwrap(), None);
        assert!(a(Some("mysql://x")).url(d).is_err());
        assert_eq!(redact("postgres://u:secret@h/db"), "postgres://u:***@h/db");
    }

    #[test]
    fn a_static_key_only_without_a_ledger() {
        assert!(check_auth(false, Some("k")).is_ok());
        assert!(check_auth(true, None).is_ok());
        assert!(check_auth(true, Some("")).is_ok());
        let e = check_auth(true, Some("k")).unwrap_err().to_string();
        assert!(
            e.contains("--api-key") && e.contains("--ledger none"),
            "{e}"
        );
    }
}
