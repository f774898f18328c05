//! The engine's arithmetic identity: a digest of this crate's sources (`src/**`, `Cargo.toml`),
//! the workspace's `Cargo.lock` (the versions of candle and every other dependency), the
//! target architecture and the compiler flags, exported as `PLEXUS_ARITHMETIC_ID`
//! ([`plexus_model::ARITHMETIC_ID`]). Nodes announce it in
//! their build version, and auditors compare answers bit for bit only between nodes announcing
//! the same one: two builds of one package version whose kernels differ must not be held to
//! each other's bits. Line endings are normalised so a checkout's settings do not change it.

use std::path::{Path, PathBuf};

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// 64-bit FNV-1a: an identity against accidental equality, not an adversary (a node can
/// announce any version it likes; the audits are what check it).
fn fnv(hash: &mut u64, bytes: &[u8]) {
    for b in bytes {
        *hash ^= u64::from(*b);
        *hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
}

fn main() {
    println!("cargo:rerun-if-changed=src");
    println!("cargo:rerun-if-changed=Cargo.toml");
    println!("cargo:rerun-if-changed=../../Cargo.lock");
    println!("cargo:rerun-if-env-changed=CARGO_ENCODED_RUSTFLAGS");
    let mut list = Vec::new();
    files(Path::new("src"), &mut list);
    list.push(PathBuf::from("Cargo.toml"));
    if Path::new("../../Cargo.lock").exists() {
        list.push(PathBuf::from("../../Cargo.lock"));
    }
    list.sort();
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    for path in &list {
        let text = std::fs::read(path).unwrap_or_default();
        let text: Vec<u8> = text.into_iter().filter(|b| *b != b'\r').collect();
        fnv(
            &mut hash,
            path.to_string_lossy().replace('\\', "/").as_bytes(),
        );
        fnv(&mut hash, &(text.len() as u64).to_le_bytes());
        fnv(&mut hash, &text);
    }
    for var in ["CARGO_CFG_TARGET_ARCH", "CARGO_ENCODED_RUSTFLAGS"] {
        fnv(&mut hash, var.as_bytes());
        fnv(&mut hash, std::env::var(var).unwrap_or_default().as_bytes());
    }
    println!("cargo:rustc-env=PLEXUS_ARITHMETIC_ID={:012x}", hash >> 16);
}
