//! What every networked subcommand shares: the data directory and node key, `NetConfig` from
//! flags, the tokio runtime, and the shutdown signal.

use crate::cli::{NatArgs, NetArgs};
use anyhow::Context as _;
use plexus_core::keys::NodeKey;
use plexus_net::{Multiaddr, NetConfig};
use std::path::PathBuf;

/// `$PLEXUS_DATA_DIR`, else `$XDG_DATA_HOME/plexus`, else `~/.local/share/plexus`.
pub fn default_data_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("PLEXUS_DATA_DIR") {
        return d.into();
    }
    if let Some(d) = std::env::var_os("XDG_DATA_HOME") {
        return PathBuf::from(d).join("plexus");
    }
    std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".local/share/plexus"))
        .unwrap_or_else(|| PathBuf::from(".plexus"))
}

pub(crate) fn parse_addrs(addrs: &[String], what: &str) -> anyhow::Result<Vec<Multiaddr>> {
    addrs
        .iter()
        .map(|a| {
            a.parse::<Multiaddr>()
                .with_context(|| format!("{what} {a:?} is not a multiaddr"))
        })
        .collect()
}

impl NetArgs {
    /// `--data-dir`, or the default data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.data_dir.clone().unwrap_or_else(default_data_dir)
    }

    /// The node key from the data directory (created on first start).
    pub fn key(&self) -> anyhow::Result<NodeKey> {
        let path = self.data_dir().join("node.key");
        NodeKey::load_or_create(&path)
            .with_context(|| format!("cannot load the node key {}", path.display()))
    }

    pub fn config(&self, key: NodeKey) -> anyhow::Result<NetConfig> {
        let mut config = NetConfig::new(key)
            .with_bootstrap(parse_addrs(&self.bootstrap, "--bootstrap")?)
            .with_mdns(self.mdns);
        if !self.listen.is_empty() {
            config = config.with_listen(parse_addrs(&self.listen, "--listen")?);
        }
        Ok(config)
    }
}

impl NatArgs {
    /// Adds the relay server (`--relay`) and the relays to listen through to `config`.
    pub fn apply(&self, config: NetConfig) -> anyhow::Result<NetConfig> {
        let via = parse_addrs(&self.relay_via, "--relay-via")?;
        let limits = self.relay.then(|| plexus_net::RelayLimits {
            max_reservations: self.relay_max_reservations,
            max_circuits: self.relay_max_circuits,
            max_circuits_per_peer: self.relay_max_circuits_per_peer,
            max_circuit_duration: std::time::Duration::from_secs(self.relay_circuit_secs),
            max_circuit_bytes: self.relay_circuit_mib.saturating_mul(1 << 20),
        });
        if let Some(l) = &limits {
            if l.max_reservations == 0 || l.max_circuits == 0 || l.max_circuits_per_peer == 0 {
                anyhow::bail!("--relay-max-reservations, --relay-max-circuits and --relay-max-circuits-per-peer must be at least 1");
            }
            if l.max_circuit_duration.is_zero() || l.max_circuit_bytes == 0 {
                anyhow::bail!("--relay-circuit-secs and --relay-circuit-mib must be at least 1");
            }
        }
        // Refused here with the flag's name rather than at network start.
        plexus_net::nat::NatPolicy::new(&via, 0, std::time::Duration::ZERO)
            .map_err(|e| anyhow::anyhow!("--relay-via: {e}"))?;
        Ok(config.with_relay(limits).with_relay_via(via))
    }
}

pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// Resolves on Ctrl-C or SIGTERM. The handlers are registered when this is called, not when
/// the future is first polled: call it before printing how to reach or stop the process, so a
/// signal sent right after (a script reading the address, then sending Ctrl-C) stops it
/// cleanly instead of killing it. Needs the runtime's context.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, Signal, SignalKind};
        async fn next(s: std::io::Result<Signal>) {
            match s {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        }
        let interrupt = next(signal(SignalKind::interrupt()));
        let terminate = next(signal(SignalKind::terminate()));
        async move {
            tokio::select! {
                _ = interrupt => {}
                _ = terminate => {}
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Resolves when process `pid` no longer exists.
pub async fn parent_gone(pid: Option<u32>) {
    let Some(pid) = pid else {
        return std::future::pending().await;
    };
    let path = PathBuf::from(format!("/proc/{pid}"));
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        if !path.exists() {
            return;
        }
    }
}

/// Resolves when stdin reaches end of file, if `watch` (a parent closes our stdin to stop us).
pub async fn stdin_closed(watch: bool) {
    if !watch {
        return std::future::pending().await;
    }
    use tokio::io::AsyncReadExt as _;
    let mut stdin = tokio::io::stdin();
    let mut buf = [0u8; 64];
    while let Ok(n) = stdin.read(&mut buf).await {
        if n == 0 {
            break;
        }
    }
}
