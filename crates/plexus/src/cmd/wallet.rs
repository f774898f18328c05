//! `plexus wallet`: this node's account on a ledger (the Ethereum address of the node key in
//! `--data-dir`): its address, balance by bucket, faucet funds (local ledgers), deposits,
//! stake, unbond, claim, withdraw, its history of journal entries, and the payers' vouchers
//! its node kept (`DATA_DIR/vouchers.jsonl`): list, export one, redeem.
//!
//! The ledger is the operator's (a local SQLite file or a PostgreSQL URL this command can
//! open): operations are executed on it directly, each one journaled like the gateway's.
//! Amounts are micro-PLX, or `N PLX`.

use super::ledger::{parse_amount, LedgerArgs};
use anyhow::Context as _;
use clap::{Args, Subcommand};
use plexus_ledger::{Address, Amount, Bucket, Config, Op, RequestId, SignedVoucher};
use plexus_ledger_store::Store;
use plexus_node::vouchers::VoucherLog;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct WalletArgs {
    #[command(subcommand)]
    pub command: WalletCommand,
    #[command(flatten)]
    pub ledger: LedgerArgs,
    /// Data directory holding the node key (its account) and the default SQLite ledger.
    /// Default: $PLEXUS_DATA_DIR, else $XDG_DATA_HOME/plexus, else ~/.local/share/plexus.
    #[arg(long, global = true)]
    pub data_dir: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum WalletCommand {
    /// Print the account's address.
    Address,
    /// Funds by bucket: available, staked, unbonding, locked (and claimable), escrow, spent.
    Balance,
    /// Fund the account from the faucet (local ledgers only; at most the faucet limit).
    Faucet {
        #[arg(value_parser = parse_amount)]
        amount: Amount,
    },
    /// Bond available funds as stake (slashable).
    Stake {
        #[arg(value_parser = parse_amount)]
        amount: Amount,
    },
    /// Start unbonding stake (claimable after the unbonding period, slashable until then).
    Unbond {
        #[arg(value_parser = parse_amount)]
        amount: Amount,
    },
    /// Make matured earnings and unbonded stake available.
    Claim,
    /// Take available funds out of the ledger.
    Withdraw {
        #[arg(value_parser = parse_amount)]
        amount: Amount,
    },
    /// Journal entries that moved this account's funds, oldest first.
    History,
    /// Record funds arriving from outside the ledger (an operator's top-up or a bridge) in
    /// this account, or in `--to`'s.
    Deposit {
        #[arg(value_parser = parse_amount)]
        amount: Amount,
        /// The account credited (0x address; default: this node's).
        #[arg(long)]
        to: Option<String>,
    },
    /// The latest voucher per request that payers sent this node, and where each stands on
    /// the ledger (paid by settlement, redeemed, redeemable).
    Vouchers {
        /// One JSON object per line: the voucher, its EIP-712 digest and its status.
        #[arg(long)]
        json: bool,
    },
    /// Print the kept voucher of REQUEST (64 hex digits) as JSON (the signed EIP-712 voucher,
    /// ready for `plexus wallet redeem --file` or an EVM contract).
    Voucher { request: String },
    /// Redeem vouchers on the ledger: REQUEST's kept voucher, a voucher file (`--file`), or
    /// every kept voucher whose escrow is still open.
    Redeem {
        request: Option<String>,
        #[arg(long, conflicts_with = "request")]
        file: Option<PathBuf>,
    },
}

fn touches(b: &Bucket, me: Address) -> bool {
    matches!(b, Bucket::Available(a) | Bucket::Staked(a) | Bucket::Unbonding(a) | Bucket::Locked(a) if *a == me)
}

pub fn run(a: WalletArgs) -> anyhow::Result<()> {
    let dir = a
        .data_dir
        .clone()
        .unwrap_or_else(super::net::default_data_dir);
    let key_path = dir.join("node.key");
    let key = plexus_core::keys::NodeKey::load_or_create(&key_path)
        .with_context(|| format!("cannot load the node key {}", key_path.display()))?;
    let me = plexus_ledger::address_of(&key.public()).context("the node key is not secp256k1")?;
    if let WalletCommand::Address = a.command {
        println!("{me}");
        return Ok(());
    }
    let voucher_file = super::node::voucher_file(&Some(dir.clone()));
    let url = a
        .ledger
        .url(&dir)?
        .context("`--ledger none` has no accounts")?;
    let rt = super::net::runtime()?;
    rt.block_on(async {
        let mut store = Store::open(&url, Config::default())
            .await
            .with_context(|| format!("cannot open the ledger {}", super::ledger::redact(&url)))?;
        let now = plexus_gateway::accounts::now_ms();
        let op = match a.command {
            WalletCommand::Address => None,
            WalletCommand::Balance => {
                print_balance(&store, me, now);
                None
            }
            WalletCommand::History => {
                for e in store.journal().await? {
                    let mine: Vec<_> = e
                        .postings
                        .iter()
                        .filter(|p| touches(&p.from, me) || touches(&p.to, me))
                        .collect();
                    if mine.is_empty() {
                        continue;
                    }
                    for p in mine {
                        println!(
                            "#{:<6} {:>14} {:<12} {} -> {}  {}",
                            e.seq,
                            e.time,
                            e.op.kind(),
                            p.from,
                            p.to,
                            p.amount
                        );
                    }
                }
                None
            }
            WalletCommand::Faucet { amount } => Some(Op::Faucet {
                account: me,
                amount,
            }),
            WalletCommand::Stake { amount } => Some(Op::Stake {
                account: me,
                amount,
            }),
            WalletCommand::Unbond { amount } => Some(Op::Unbond {
                account: me,
                amount,
            }),
            WalletCommand::Claim => Some(Op::Claim { account: me }),
            WalletCommand::Withdraw { amount } => Some(Op::Withdraw {
                account: me,
                amount,
            }),
            WalletCommand::Deposit { amount, to } => Some(Op::Deposit {
                account: to
                    .as_deref()
                    .map(|t| {
                        t.parse::<Address>()
                            .with_context(|| format!("--to {t:?} is not a 0x address"))
                    })
                    .transpose()?
                    .unwrap_or(me),
                amount,
            }),
            WalletCommand::Vouchers { json } => {
                let log = open_vouchers(&voucher_file, me, &store, now)?;
                list_vouchers(&store, &log, me, now, json);
                None
            }
            WalletCommand::Voucher { ref request } => {
                let log = open_vouchers(&voucher_file, me, &store, now)?;
                let id = parse_request(request)?;
                let v = log.book().latest(&id).with_context(|| {
                    format!("no voucher for request {id} in {}", voucher_file.display())
                })?;
                println!("{}", serde_json::to_string_pretty(v)?);
                None
            }
            WalletCommand::Redeem { request, file } => {
                let log = open_vouchers(&voucher_file, me, &store, now)?;
                let chosen: Vec<SignedVoucher> = match (request, file) {
                    (Some(r), _) => {
                        let id = parse_request(&r)?;
                        vec![log.book().latest(&id).cloned().with_context(|| {
                            format!("no voucher for request {id} in {}", voucher_file.display())
                        })?]
                    }
                    (None, Some(f)) => {
                        let text = std::fs::read_to_string(&f)
                            .with_context(|| format!("cannot read {}", f.display()))?;
                        vec![serde_json::from_str(&text).with_context(|| {
                            format!("{} is not a signed voucher's JSON", f.display())
                        })?]
                    }
                    (None, None) => log
                        .book()
                        .iter()
                        .filter(|v| status(&store, v, me) == Status::Redeemable)
                        .cloned()
                        .collect(),
                };
                let explicit = chosen.len() == 1;
                let mut refused = 0;
                for v in chosen {
                    let request = v.voucher.request;
                    let op = Op::Redeem {
                        request,
                        voucher: v,
                    };
                    match store.execute(op, now).await {
                        Ok(Some(e)) => println!("redeemed {request}: journal entry #{}", e.seq),
                        Ok(None) => println!("redeemed {request}: nothing to do"),
                        Err(e) => {
                            refused += 1;
                            println!("refused {request}: {e}");
                        }
                    }
                }
                print_balance(&store, me, now);
                if explicit && refused > 0 {
                    store.close().await;
                    anyhow::bail!("the voucher was refused");
                }
                None
            }
        };
        if let Some(op) = op {
            let kind = op.kind();
            let result = store.execute(op, now).await;
            match result {
                Ok(Some(e)) => println!("{kind}: journal entry #{} {}", e.seq, e.hash),
                Ok(None) => println!("{kind}: nothing to do"),
                Err(e) => {
                    store.close().await;
                    anyhow::bail!("{kind} refused: {e}");
                }
            }
            print_balance(&store, me, now);
        }
        store.close().await;
        anyhow::Ok(())
    })
}

fn print_balance(store: &Store, me: Address, now: plexus_ledger::Timestamp) {
    let l = store.ledger();
    let v = l.account(me);
    let claimable: Amount = l
        .earnings(me)
        .filter(|(_, e)| e.unlock_at <= now && e.challenger.is_none())
        .map(|(_, e)| e.amount)
        .sum::<Amount>()
        + l.tranches(me)
            .filter(|t| t.release_at <= now)
            .map(|t| t.amount)
            .sum::<Amount>();
    println!("account    {me}");
    println!("available  {}", v.available);
    println!("staked     {}", v.staked);
    println!("unbonding  {}", v.unbonding);
    println!("locked     {}", v.locked);
    println!("claimable  {claimable}");
    println!("escrow     {}", v.escrow);
    println!("spent      {}", v.spent);
    println!("(micro-PLX)");
}

fn parse_request(text: &str) -> anyhow::Result<RequestId> {
    text.parse::<RequestId>()
        .map_err(|e| anyhow::anyhow!("{e} (a request id is 64 hex digits)"))
}

fn open_vouchers(
    path: &std::path::Path,
    me: Address,
    store: &Store,
    now: plexus_ledger::Timestamp,
) -> anyhow::Result<VoucherLog> {
    Ok(VoucherLog::open(
        path,
        me,
        store.ledger().config().chain_id,
        now,
    )?)
}

/// Where a kept voucher stands on the ledger.
#[derive(Debug, PartialEq, Eq)]
enum Status {
    /// The request settled; its settlement paid this account this much.
    Settled(Amount),
    /// Its escrow is open and this voucher (or a later one) is redeemed.
    Redeemed,
    /// Its escrow is open and the voucher adds to what is redeemed.
    Redeemable,
    /// This ledger has no such request.
    Unknown,
}

fn status(store: &Store, v: &SignedVoucher, me: Address) -> Status {
    let l = store.ledger();
    let r = v.voucher.request;
    if let Some(s) = l.settlement(&r) {
        return Status::Settled(
            s.payouts
                .iter()
                .find(|p| p.provider == me)
                .map_or(0, |p| p.amount),
        );
    }
    match l.escrow(&r) {
        None => Status::Unknown,
        Some(e) => match e.redeemed.get(&me) {
            Some((amount, _)) if *amount >= v.voucher.cumulative => Status::Redeemed,
            _ => Status::Redeemable,
        },
    }
}

fn list_vouchers(
    store: &Store,
    log: &VoucherLog,
    me: Address,
    now: plexus_ledger::Timestamp,
    json: bool,
) {
    let chain = store.ledger().config().chain_id;
    for v in log.book().iter() {
        let st = status(store, v, me);
        let text = match st {
            Status::Settled(paid) => format!("paid by settlement: {paid}"),
            Status::Redeemed => "redeemed".into(),
            Status::Redeemable => "redeemable".into(),
            Status::Unknown => "unknown request on this ledger".into(),
        };
        if json {
            println!(
                "{}",
                serde_json::json!({
                    "voucher": v,
                    "digest": format!("0x{}", hex::encode(v.voucher.digest(chain))),
                    "status": text,
                    "paid": match st { Status::Settled(p) => Some(p), _ => None },
                })
            );
        } else {
            println!(
                "{}  payer {}  cumulative {:>12}  nonce {}  {}",
                v.voucher.request, v.voucher.payer, v.voucher.cumulative, v.voucher.nonce, text
            );
        }
    }
    if !json {
        println!(
            "{} vouchers, {} micro-PLX in all (as of {} ms)",
            log.book().len(),
            log.book().total(),
            now
        );
    }
}
