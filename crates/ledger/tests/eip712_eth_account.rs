//! EIP-712 cross-check against an independent implementation: Python's `eth-account`
//! (`encode_typed_data` + `Account.recover_message` / `Account.sign_message`). For several
//! vouchers, the digest bytes must be identical, `eth-account` must recover the payer from our
//! signature, and we must recover the payer from its signature.
//!
//! Python comes from `PLEXUS_PYTHON` (default `python3`) and needs `eth-account`
//! (`pip install -r scripts/requirements-ci.txt`; `.ci/run` sets up a venv with it). A missing
//! package is a failure, not a skip.
#![allow(unused_crate_dependencies, clippy::unwrap_used)]

use k256::ecdsa::SigningKey;
use plexus_ledger::voucher::{Sig, SignedVoucher};
use plexus_ledger::{Address, RequestId, Voucher};
use std::io::Write;
use std::process::{Command, Stdio};

const SCRIPT: &str = r#"
import json, sys
from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_utils import keccak

out = []
for c in json.load(sys.stdin):
    data = {
        "types": {
            "EIP712Domain": [
                {"name": "name", "type": "string"},
                {"name": "version", "type": "string"},
                {"name": "chainId", "type": "uint256"},
            ],
            "Voucher": [
                {"name": "payer", "type": "address"},
                {"name": "provider", "type": "address"},
                {"name": "requestId", "type": "bytes32"},
                {"name": "cumulativeAmount", "type": "uint256"},
                {"name": "nonce", "type": "uint64"},
                {"name": "expiry", "type": "uint64"},
            ],
        },
        "primaryType": "Voucher",
        "domain": {"name": "Plexus", "version": "1", "chainId": c["chainId"]},
        "message": {
            "payer": c["payer"],
            "provider": c["provider"],
            "requestId": bytes.fromhex(c["requestId"]),
            "cumulativeAmount": c["cumulativeAmount"],
            "nonce": c["nonce"],
            "expiry": c["expiry"],
        },
    }
    msg = encode_typed_data(full_message=data)
    digest = keccak(b"\x19" + msg.version + msg.header + msg.body)
    recovered = Account.recover_message(msg, signature=bytes.fromhex(c["signature"]))
    signed = Account.sign_message(msg, private_key=bytes.fromhex(c["key"]))
    out.append({
        "digest": digest.hex(),
        "recovered": recovered,
        "signature": bytes(signed.signature).hex(),
    })
print(json.dumps(out))
"#;

#[test]
fn digests_and_signatures_match_eth_account() {
    let python = std::env::var("PLEXUS_PYTHON").unwrap_or_else(|_| "python3".into());
    let cases: Vec<(u8, Voucher, u64)> = vec![
        (
            1,
            Voucher {
                payer: Address::ZERO,
                provider: Address::repeat_byte(0x11),
                request: RequestId([0; 32]),
                cumulative: 0,
                nonce: 0,
                expiry: 0,
            },
            1,
        ),
        (
            7,
            Voucher {
                payer: Address::ZERO,
                provider: Address::repeat_byte(0xab),
                request: RequestId::from_label("chatcmpl-123"),
                cumulative: 1_234_567,
                nonce: 42,
                expiry: 1_900_000_000,
            },
            31_337,
        ),
        (
            200,
            Voucher {
                payer: Address::ZERO,
                provider: Address::repeat_byte(0xff),
                request: RequestId([0xff; 32]),
                cumulative: i64::MAX as u64,
                nonce: u64::MAX,
                expiry: u64::MAX,
            },
            u64::MAX,
        ),
    ];
    let mut input = Vec::new();
    let mut ours = Vec::new();
    for (k, mut v, chain) in cases {
        let key = SigningKey::from_slice(&[k; 32]).unwrap();
        v.payer = Address::from_private_key(&key);
        let signed = v.sign(chain, &key);
        input.push(serde_json::json!({
            "key": hex::encode([k; 32]),
            "chainId": chain,
            "payer": v.payer.to_string(),
            "provider": v.provider.to_string(),
            "requestId": hex::encode(v.request.0),
            "cumulativeAmount": v.cumulative,
            "nonce": v.nonce,
            "expiry": v.expiry,
            "signature": hex::encode(&signed.signature.0),
        }));
        ours.push((v, chain, signed));
    }
    let mut child = Command::new(&python)
        .args(["-c", SCRIPT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {python} ({e}); set PLEXUS_PYTHON"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(serde_json::to_string(&input).unwrap().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "eth-account check failed (is `eth-account` installed for {python}? \
         pip install -r scripts/requirements-ci.txt):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let theirs: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(theirs.len(), ours.len());
    for ((v, chain, signed), t) in ours.iter().zip(&theirs) {
        assert_eq!(
            t["digest"].as_str().unwrap().trim_start_matches("0x"),
            hex::encode(v.digest(*chain)),
            "same digest bytes"
        );
        assert_eq!(
            t["recovered"].as_str().unwrap(),
            v.payer.to_string(),
            "eth-account recovers the payer from our signature"
        );
        let sig = hex::decode(t["signature"].as_str().unwrap().trim_start_matches("0x")).unwrap();
        let theirs = SignedVoucher {
            voucher: *v,
            chain_id: *chain,
            signature: Sig(sig.clone()),
        };
        assert_eq!(
            theirs.signer().unwrap(),
            v.payer,
            "we recover eth-account's signer"
        );
        // Both sides use RFC 6979 deterministic nonces: the very same signature bytes.
        assert_eq!(sig, signed.signature.0);
    }
}

const RECEIPT_SCRIPT: &str = r#"
import json, sys
from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_utils import keccak

out = []
for c in json.load(sys.stdin):
    fields = [("session", "bytes16"), ("model", "bytes32"), ("start", "uint32"),
              ("end", "uint32"), ("position", "uint32"), ("positions", "uint32"),
              ("price", "uint64"), ("input", "bytes32"), ("output", "bytes32"),
              ("commitment", "bytes32")]
    message = {}
    for name, ty in fields:
        v = c[name]
        message[name] = bytes.fromhex(v) if ty.startswith("bytes") else v
    data = {
        "types": {
            "EIP712Domain": [
                {"name": "name", "type": "string"},
                {"name": "version", "type": "string"},
                {"name": "chainId", "type": "uint256"},
            ],
            "StageReceipt": [{"name": n, "type": t} for n, t in fields],
        },
        "primaryType": "StageReceipt",
        "domain": {"name": "Plexus", "version": "1", "chainId": c["chainId"]},
        "message": message,
    }
    msg = encode_typed_data(full_message=data)
    digest = keccak(b"\x19" + msg.version + msg.header + msg.body)
    recovered = Account.recover_message(msg, signature=bytes.fromhex(c["signature"]))
    out.append({"digest": digest.hex(), "recovered": recovered})
print(json.dumps(out))
"#;

/// Stage receipts (`plexus_ledger::receipt`): the same digest bytes as eth-account's
/// `encode_typed_data`, and eth-account recovers the provider from our signature.
#[test]
fn receipt_digests_and_signatures_match_eth_account() {
    use plexus_core::receipt::Receipt;
    use plexus_core::wire::SessionId;
    use plexus_core::Digest;
    let python = std::env::var("PLEXUS_PYTHON").unwrap_or_else(|_| "python3".into());
    let cases = [
        (3u8, 31_337u64, 0u32, 1u32, 0u32, 1u32, 0u64, [0u8; 32]),
        (9, 1, 10, 20, 4_000, 1, 1_000_000_000, [0x5a; 32]),
        (
            200,
            u64::MAX,
            0,
            u32::MAX,
            u32::MAX,
            u32::MAX,
            u64::MAX,
            [0xff; 32],
        ),
    ];
    let mut input = Vec::new();
    let mut ours = Vec::new();
    for (k, chain, start, end, position, positions, price, commitment) in cases {
        let key = SigningKey::from_slice(&[k; 32]).unwrap();
        let mut r = Receipt {
            session: SessionId([k; 16]),
            model: Digest::of(&[k]),
            start,
            end,
            position,
            positions,
            price,
            input: Digest::of(b"input"),
            output: Digest::of(b"output"),
            commitment,
            signature: Vec::new(),
        };
        plexus_ledger::receipt::sign(&mut r, chain, &key);
        input.push(serde_json::json!({
            "chainId": chain,
            "session": hex::encode(r.session.0),
            "model": hex::encode(r.model.0),
            "start": start, "end": end, "position": position, "positions": positions,
            "price": price,
            "input": hex::encode(r.input.0),
            "output": hex::encode(r.output.0),
            "commitment": hex::encode(commitment),
            "signature": hex::encode(&r.signature),
        }));
        ours.push((r, chain, Address::from_private_key(&key)));
    }
    let mut child = Command::new(&python)
        .args(["-c", RECEIPT_SCRIPT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {python} ({e}); set PLEXUS_PYTHON"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(serde_json::to_string(&input).unwrap().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "eth-account check failed (pip install -r scripts/requirements-ci.txt):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let theirs: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(theirs.len(), ours.len());
    for ((r, chain, signer), t) in ours.iter().zip(&theirs) {
        assert_eq!(
            t["digest"].as_str().unwrap().trim_start_matches("0x"),
            hex::encode(plexus_ledger::receipt::digest(r, *chain)),
        );
        assert_eq!(t["recovered"].as_str().unwrap(), signer.to_string());
        assert_eq!(plexus_ledger::receipt::signer(r, *chain).unwrap(), *signer);
    }
}
