//! `plexus bench settle`: settlements per second on a ledger, the way the gateway settles a
//! request: hold its escrow (one transaction), sign one EIP-712 voucher per provider, settle
//! (one transaction: providers into locked earnings, the gateway's fee, the refund). With
//! `--redeem` each provider also redeems its voucher before the settlement (one transaction
//! each), the path of a provider that redeems while the escrow is open.
//!
//! Requests run one after another, as the gateway's single ledger writer runs them. At the
//! end the stored ledger is re-read and checked (hash chain, re-executed journal, balances).

use anyhow::Context as _;
use clap::Args;
use plexus_ledger::{Address, Config, Op, Payout, RequestId, Voucher};
use plexus_ledger_store::Store;
use std::time::Instant;

#[derive(Args, Debug)]
pub struct BenchSettleArgs {
    /// The ledger: sqlite://PATH or postgres://... (a new or a benchmark-only ledger: the
    /// run adds its accounts and requests to it).
    #[arg(long, value_name = "URL")]
    pub ledger: String,
    /// Requests to settle.
    #[arg(long, default_value_t = 1000)]
    pub requests: u64,
    /// Providers paid per request (one voucher each).
    #[arg(long, default_value_t = 3)]
    pub providers: u8,
    /// Providers redeem their vouchers before the settlement.
    #[arg(long)]
    pub redeem: bool,
    /// Print one JSON object instead of a line.
    #[arg(long)]
    pub json: bool,
}

const HELD: u64 = 10_000;
const EACH: u64 = 1_000;

pub fn run(a: BenchSettleArgs) -> anyhow::Result<()> {
    anyhow::ensure!(a.requests > 0, "--requests must be at least 1");
    anyhow::ensure!(
        (1..=9).contains(&a.providers),
        "--providers must be 1 to 9 (each is paid {EACH} of a {HELD} hold)"
    );
    let rt = super::net::runtime()?;
    rt.block_on(async {
        let mut store = Store::open(&a.ledger, Config::default())
            .await
            .with_context(|| {
                format!(
                    "cannot open the ledger {}",
                    super::ledger::redact(&a.ledger)
                )
            })?;
        let chain_id = store.ledger().config().chain_id;
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| anyhow::anyhow!("random: {e}"))?;
        let gateway_key =
            k256::ecdsa::SigningKey::from_slice(&seed).context("a random gateway key")?;
        let gateway = Address::from_private_key(&gateway_key);
        let client = Address::from_slice(&seed[..20]);
        let providers: Vec<Address> = (0..a.providers)
            .map(|i| Address::repeat_byte(0x10 + i))
            .collect();
        let now = plexus_gateway::accounts::now_ms();
        let need = a.requests.saturating_mul(HELD);
        let faucet_max = store.ledger().config().faucet_max;
        let mut funded = 0;
        while funded < need {
            let amount = (need - funded).min(faucet_max);
            store
                .execute(
                    Op::Faucet {
                        account: client,
                        amount,
                    },
                    now,
                )
                .await
                .context("funding the benchmark's client")?;
            funded += amount;
        }
        let entries_before = store.ledger().next_seq();
        let started = Instant::now();
        for i in 0..a.requests {
            let mut id = seed;
            id[..8].copy_from_slice(&i.to_le_bytes());
            let request = RequestId(id);
            let now = plexus_gateway::accounts::now_ms();
            let open = Op::OpenEscrow {
                request,
                client,
                gateway,
                amount: HELD,
            };
            store.execute(open, now).await.context("hold")?;
            let vouchers: Vec<_> = providers
                .iter()
                .map(|p| {
                    Voucher {
                        payer: gateway,
                        provider: *p,
                        request,
                        cumulative: EACH,
                        nonce: 1,
                        expiry: now / 1000 + plexus_gateway::accounts::VOUCHER_TTL_S,
                    }
                    .sign(chain_id, &gateway_key)
                })
                .collect();
            if a.redeem {
                for v in vouchers {
                    store
                        .execute(
                            Op::Redeem {
                                request,
                                voucher: v,
                            },
                            now,
                        )
                        .await
                        .context("redeem")?;
                }
            }
            let mut payouts: Vec<Payout> = providers
                .iter()
                .map(|p| Payout {
                    provider: *p,
                    amount: EACH,
                })
                .collect();
            payouts.push(Payout {
                provider: gateway,
                amount: 500,
            });
            store
                .execute(Op::Settle { request, payouts }, now)
                .await
                .context("settle")?;
        }
        let secs = started.elapsed().as_secs_f64();
        let entries = store.ledger().next_seq() - entries_before;
        store
            .verify()
            .await
            .context("the ledger does not check out")?;
        let backend = format!("{:?}", store.backend()).to_lowercase();
        store.close().await;
        let rate = a.requests as f64 / secs;
        if a.json {
            println!(
                "{}",
                serde_json::json!({
                    "backend": backend,
                    "requests": a.requests,
                    "providers": a.providers,
                    "redeem": a.redeem,
                    "seconds": secs,
                    "settlements_per_s": rate,
                    "journal_entries": entries,
                })
            );
        } else {
            println!(
                "{backend}: {} requests (hold + {} vouchers{} + settle) in {secs:.2} s: \
                 {rate:.0} settlements/s, {entries} journal entries; ledger verified",
                a.requests,
                a.providers,
                if a.redeem { " redeemed" } else { " signed" },
            );
        }
        anyhow::Ok(())
    })
}
