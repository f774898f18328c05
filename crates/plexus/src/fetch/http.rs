//! HTTP for fetching: one `ureq` agent with short connect timeouts and the system's CA bundle,
//! a small-text GET for index pages, and a streaming GET that writes, hashes and counts bytes in
//! one pass (so a 100 MB file is read once and never held in memory).

use anyhow::Context as _;
use indicatif::ProgressBar;
use sha2::{Digest as _, Sha256};
use std::io::Write;
use std::time::Duration;
use ureq::tls::{PemItem, RootCerts, TlsConfig};
use ureq::ResponseExt as _;

/// Resolving and connecting give up after this long, so an unreachable source (a firewall that
/// drops packets, not only a refused port or a missing DNS name) falls through to the next one
/// in seconds.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Time from sending a request to its response headers.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);
/// A download that delivers nothing for this long is abandoned. There is deliberately no limit
/// on the whole body: a slow but live link may need minutes for 100 MB.
const STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Index pages are small; this bounds what a misbehaving server can make us buffer.
const MAX_PAGE_BYTES: u64 = 32 << 20;

/// CA bundles of the common Linux distributions, macOS and the BSDs, tried in order after
/// `$SSL_CERT_FILE`.
const CA_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
    "/usr/local/share/certs/ca-root-nss.crt",
];

/// The agent every fetch uses.
pub fn agent() -> ureq::Agent {
    let tls = TlsConfig::builder().root_certs(root_certs()).build();
    ureq::Agent::config_builder()
        .timeout_resolve(Some(CONNECT_TIMEOUT))
        .timeout_connect(Some(CONNECT_TIMEOUT))
        .timeout_recv_response(Some(RESPONSE_TIMEOUT))
        .timeout_per_read(Some(STALL_TIMEOUT))
        .user_agent(concat!("plexus/", env!("CARGO_PKG_VERSION")))
        .tls_config(tls)
        .build()
        .new_agent()
}

/// Trust what the machine trusts, like curl and pip do: a company or sandbox proxy that
/// re-signs TLS puts its CA in the system bundle, and Mozilla's list (ureq's default) would
/// reject it. Without a readable bundle, fall back to Mozilla's list.
fn root_certs() -> RootCerts {
    let from_env = std::env::var_os("SSL_CERT_FILE").map(std::path::PathBuf::from);
    let candidates = from_env
        .into_iter()
        .chain(CA_BUNDLES.iter().map(std::path::PathBuf::from));
    for path in candidates {
        let Ok(pem) = std::fs::read(&path) else {
            continue;
        };
        let certs: Vec<_> = ureq::tls::parse_pem(&pem)
            .filter_map(|item| match item {
                Ok(PemItem::Certificate(c)) => Some(c),
                _ => None,
            })
            .collect();
        if !certs.is_empty() {
            tracing::debug!(
                "trusting {} CA certificates from {}",
                certs.len(),
                path.display()
            );
            return RootCerts::new_with_certs(&certs);
        }
    }
    RootCerts::WebPki
}

/// A small text response: its body, media type and the URL it finally came from (after
/// redirects; relative links in it resolve against that).
pub struct Page {
    pub body: String,
    pub content_type: String,
    pub url: String,
}

/// GETs a page of at most `MAX_PAGE_BYTES`.
pub fn get_page(agent: &ureq::Agent, url: &str, accept: &str) -> anyhow::Result<Page> {
    let mut resp = agent
        .get(url)
        .header("Accept", accept)
        .call()
        .with_context(|| format!("GET {url} failed"))?;
    let final_url = resp.get_uri().to_string();
    let content_type = resp.body().mime_type().unwrap_or("").to_ascii_lowercase();
    let body = resp
        .body_mut()
        .with_config()
        .limit(MAX_PAGE_BYTES)
        .read_to_string()
        .with_context(|| format!("reading the response from {url} failed"))?;
    Ok(Page {
        body,
        content_type,
        url: final_url,
    })
}

/// What a streamed download produced.
pub struct Streamed {
    pub len: u64,
    pub sha256: String,
}

/// GETs `url` into `out`, hashing as it goes. `bar` gets the length once the headers arrive
/// (when the server sends one) and every chunk's progress.
pub fn download(
    agent: &ureq::Agent,
    url: &str,
    out: &mut impl Write,
    bar: &ProgressBar,
) -> anyhow::Result<Streamed> {
    let resp = agent
        .get(url)
        .call()
        .with_context(|| format!("GET {url} failed"))?;
    if let Some(n) = resp.body().content_length() {
        bar.set_length(n);
    }
    let mut reader = resp.into_body().into_reader();
    copy_hashing(&mut reader, out, bar).with_context(|| format!("downloading {url} failed"))
}

/// Copies `src` to `out` in 256 KiB chunks, hashing and reporting progress.
pub fn copy_hashing(
    src: &mut impl std::io::Read,
    out: &mut impl Write,
    bar: &ProgressBar,
) -> anyhow::Result<Streamed> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 << 10];
    let mut len = 0u64;
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(anyhow::Error::new(e).context("read failed")),
        };
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).context("write failed")?;
        len += n as u64;
        bar.set_position(len);
    }
    out.flush().context("write failed")?;
    Ok(Streamed {
        len,
        sha256: hex::encode(hasher.finalize()),
    })
}
