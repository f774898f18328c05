//! The identity of the node code that turns a stage call into engine calls, exported as
//! `PLEXUS_NODE_COMPUTE_ID` and announced beside the engine's own (`plexus_model::ARITHMETIC_ID`,
//! which covers the model crate): the engine thread (`src/engine.rs`: chunking, batching, the
//! declared prompt that picks attention kernels, sampling), its output gathering
//! (`src/gather.rs`), and the wire forms it decodes activations and sampling parameters from
//! (`plexus-core`'s `wire.rs`, `sampling.rs`). Two nodes of one package version whose code there
//! differs may compute different bits for the same call, so they must not be held to each
//! other's bits: auditors compare exactly only within one announced identity, and within the
//! published band across identities. sha256 of each file's path, length and text (line endings
//! normalised).

use sha2::{Digest, Sha256};

const FILES: [&str; 4] = [
    "src/engine.rs",
    "src/gather.rs",
    "../core/src/wire.rs",
    "../core/src/sampling.rs",
];

fn main() {
    let mut hash = Sha256::new();
    for path in FILES {
        println!("cargo:rerun-if-changed={path}");
        let text: Vec<u8> = std::fs::read(path)
            .unwrap_or_else(|e| panic!("{path}: {e}"))
            .into_iter()
            .filter(|b| *b != b'\r')
            .collect();
        hash.update(path.as_bytes());
        hash.update((text.len() as u64).to_le_bytes());
        hash.update(&text);
    }
    let digest = hash.finalize();
    let hex: String = digest[..4].iter().map(|b| format!("{b:02x}")).collect();
    println!("cargo:rustc-env=PLEXUS_NODE_COMPUTE_ID={hex}");
}
