//! `plexus wallet`: this node's account on a ledger (the Ethereum address of the node key in
//! `--data-dir`): its address, balance by bucket, faucet funds (local ledgers), stake, unbond,
//! claim, withdraw and its history of journal entries.
//!
//! The ledger is the operator's (a local SQLite file or a PostgreSQL URL this command can
//! open): operations are executed on it directly, each one journaled like the gateway's.
//! Amounts are micro-PLX, or `N PLX`.

use super::ledger::{parse_amount, LedgerArgs};
use anyhow::Context as _;
use clap::{Args, Subcommand};
use plexus_ledger::{Address, Amount, Bucket, Config, Op};
use plexus_ledger_store::Store;
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
