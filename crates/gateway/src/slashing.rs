//! Audit verdicts applied to the ledger: a node convicted by the audits of a request
//! (`plexus_node::audit`) loses everything slashable (stake, unbonding stake, and the earnings
//! still locked in their challenge window) through the ledger's slash entry point, which pays
//! the challenger its share and refunds the request's client its share.
//!
//! ```text
//! generation ─▶ Usage { convictions: [offender, challenger, colluders] }
//!   settle ─▶ for each offender (and colluder): Op::Slash { amount: staked + unbonding +
//!             locked, challenger, request } ─▶ then Op::Settle (the offender's work unpaid)
//! ```

use plexus_ledger::{Address, Amount, Op, RequestId};
use plexus_ledger_store::Store;
use plexus_node::audit::Conviction;

/// Everything of `account` a slash can reach.
pub fn slashable(store: &Store, account: Address) -> Amount {
    let v = store.ledger().account(account);
    v.staked
        .saturating_add(v.unbonding)
        .saturating_add(v.locked)
}

/// Slashes the offenders of `convictions` (and their colluders) for `request`; returns the
/// amounts taken. A node with nothing slashable is logged and skipped.
pub async fn apply(
    store: &mut Store,
    request: RequestId,
    convictions: &[Conviction],
    now: plexus_ledger::Timestamp,
) -> Vec<(Address, Amount)> {
    let mut taken = Vec::new();
    for c in convictions {
        for offender in std::iter::once(c.offender).chain(c.colluders.iter().copied()) {
            let amount = slashable(store, offender);
            if amount == 0 {
                tracing::warn!(%offender, %request, "convicted by audit but has nothing to slash");
                continue;
            }
            let op = Op::Slash {
                offender,
                amount,
                challenger: c.challenger,
                request: Some(request),
            };
            match store.execute(op, now).await {
                Ok(_) => {
                    tracing::warn!(%offender, amount, challenger = %c.challenger, %request, "slashed by audit verdict");
                    taken.push((offender, amount));
                }
                Err(e) => tracing::error!(%offender, %request, error = %e, "slash failed"),
            }
        }
    }
    taken
}

/// Keeps `client`'s view of the stakes of the nodes it knows (what their audit probability is
/// computed from) in step with the ledger, every `every`. Runs until the runtime stops.
pub async fn keep_stakes(
    accounts: std::sync::Arc<crate::accounts::Accounts>,
    client: plexus_node::client::NetworkClient,
    every: std::time::Duration,
) {
    loop {
        let dir = client.directory();
        let known: Vec<Address> = dir
            .iter()
            .filter_map(|(p, _)| plexus_node::audit::account_of(&dir, p))
            .collect();
        let stakes = accounts
            .with_store(|s| {
                known
                    .iter()
                    .map(|a| (*a, s.ledger().account(*a).staked))
                    .collect::<std::collections::HashMap<_, _>>()
            })
            .await;
        client.set_stakes(stakes);
        tokio::time::sleep(every).await;
    }
}
