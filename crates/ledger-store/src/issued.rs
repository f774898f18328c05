//! The vouchers a gateway has signed for requests it has not settled yet: the latest per
//! (request, provider), written before the voucher leaves the gateway.
//!
//! ```text
//! stream window ─▶ sign cumulative voucher ─▶ record_vouchers (one transaction) ─▶ deliver
//! settle ─▶ forget_vouchers(request)
//! gateway restarts with the escrow still open ─▶ issued_vouchers(request) ─▶ settle paying
//!   each provider exactly its latest voucher, the rest back to the client
//! ```
//!
//! A provider can only hold a voucher the gateway recorded first, so a gateway killed at any
//! point settles for every voucher out there: nothing promised is lost, nothing is paid twice
//! (the ledger's settle pays at most the voucher's amount, counting what was redeemed).

use crate::store::{to_i64, Store};
use plexus_ledger::{RequestId, SignedVoucher};
use sqlx::Row;

impl Store {
    /// Records `vouchers` (each replaces the recorded one of its request and provider when its
    /// nonce is higher; a lower or equal nonce changes nothing), in one transaction.
    pub async fn record_vouchers(&self, vouchers: &[SignedVoucher]) -> Result<(), sqlx::Error> {
        if vouchers.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        for v in vouchers {
            let text =
                serde_json::to_string(v).map_err(|e| sqlx::Error::Encode(Box::new(e) as Box<_>))?;
            sqlx::query(
                "INSERT INTO plexus_issued_vouchers (request, provider, nonce, voucher) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT (request, provider) DO UPDATE \
                 SET nonce = excluded.nonce, voucher = excluded.voucher \
                 WHERE plexus_issued_vouchers.nonce < excluded.nonce",
            )
            .bind(v.voucher.request.to_string())
            .bind(v.voucher.provider.to_string())
            .bind(to_i64(v.voucher.nonce))
            .bind(text)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await
    }

    /// The latest recorded voucher of each provider of `request`, by provider.
    pub async fn issued_vouchers(
        &self,
        request: RequestId,
    ) -> Result<Vec<SignedVoucher>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT voucher FROM plexus_issued_vouchers WHERE request = $1 ORDER BY provider",
        )
        .bind(request.to_string())
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let text: String = r.try_get(0)?;
                serde_json::from_str(&text).map_err(|e| sqlx::Error::Decode(Box::new(e)))
            })
            .collect()
    }

    /// Drops the recorded vouchers of a settled `request`.
    pub async fn forget_vouchers(&self, request: RequestId) -> Result<(), sqlx::Error> {
        sqlx::query("DELETE FROM plexus_issued_vouchers WHERE request = $1")
            .bind(request.to_string())
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}
