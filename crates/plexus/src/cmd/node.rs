//! `plexus node`: serve a span of a model's layers until Ctrl-C / SIGTERM.
//!
//! Prints `peer <id>` and one `listening on <multiaddr>` line per address on stdout (scripts
//! and `plexus up` read them), everything else goes to the log on stderr.

use super::net::{parent_gone, runtime, shutdown_signal, stdin_closed};
use crate::cli::NodeArgs;
use anyhow::Context as _;
use plexus_model::LayerSpan;
use plexus_node::engine::EngineConfig;
use plexus_node::{AutoPlacement, Node, NodeConfig};
use std::io::Write;
use std::time::Duration;

pub fn run(args: NodeArgs) -> anyhow::Result<()> {
    super::model_path(Some(&args.model))?;
    let auto = args.span.as_deref() == Some("auto");
    if args.follow_placement && (auto || args.span.is_none()) {
        anyhow::bail!(
            "--follow-placement needs --span a..b (`--span auto` follows placement already)"
        );
    }
    if args.stages.is_some() && !auto && !args.follow_placement {
        anyhow::bail!("--stages needs --span auto or --follow-placement");
    }
    let span = args
        .span
        .as_deref()
        .filter(|_| !auto)
        .map(|s| s.parse::<LayerSpan>().map_err(anyhow::Error::msg))
        .transpose()
        .context("bad --span (start..end or auto)")?;
    let key = args.net.key()?;
    let net = args.nat.apply(args.net.config(key.clone())?)?;
    let mut config = NodeConfig::new(args.model.clone(), key);
    config.span = span;
    config.net = net;
    config.engine = EngineConfig {
        max_sessions: args.max_sessions,
        session_ttl: Duration::from_secs(args.session_ttl),
        queue: args.queue,
        kv_budget: args
            .kv_budget_mib
            .map_or_else(plexus_node::measure::default_kv_budget, |m| m << 20),
        step_positions: args.step_positions.max(1),
        max_call_positions: args.max_call_positions.max(1),
        kv_evict_idle_after: plexus_node::engine::KV_EVICT_IDLE_AFTER,
        cheat: args.cheat,
        arithmetic: args.arithmetic,
    };
    config.cache_dir = super::cache_dir();
    config.price = args.price;
    config.vouchers = Some(voucher_file(&args.net.data_dir));
    if let Some(s) = args.claim_decode_s_per_layer {
        let max = f64::from(plexus_core::announce::limits::MAX_SECONDS_PER_LAYER);
        anyhow::ensure!(
            s > 0.0 && s <= max,
            "--claim-decode-s-per-layer {s} is not a speed an announcement may carry (0 < s <= {max})"
        );
    }
    config.claim_decode_s_per_layer = args.claim_decode_s_per_layer;
    config.checks = !args.no_checks;
    config.trust_verdicts = args
        .trust_verdicts
        .iter()
        .map(|p| {
            p.parse()
                .with_context(|| format!("--trust-verdicts {p:?} is not a peer id"))
        })
        .collect::<anyhow::Result<_>>()?;
    config.auto = (auto || args.follow_placement).then(|| AutoPlacement {
        stages: args.stages,
        equal_speeds: args.plan_equal_speeds,
        ..AutoPlacement::default()
    });
    let rt = runtime()?;
    rt.block_on(async move {
        let node = Node::start(config)
            .await
            .with_context(|| format!("cannot start a node for {}", args.model.display()))?;
        // Ctrl-C is caught from here on, before the addresses are printed.
        let shutdown = shutdown_signal();
        let mut out = std::io::stdout().lock();
        writeln!(out, "peer {}", node.peer_id())?;
        writeln!(
            out,
            "serving layers {} of {} ({})",
            node.served().stage.span(),
            node.served().name,
            node.served().model
        )?;
        for a in node.listen_addrs() {
            writeln!(out, "listening on {a}")?;
        }
        out.flush()?;
        drop(out);
        let stop = async {
            tokio::select! {
                _ = shutdown => {}
                _ = parent_gone(args.parent_pid) => {}
                _ = stdin_closed(args.parent_pid.is_some()) => {}
            }
        };
        node.run(stop).await?;
        anyhow::Ok(())
    })
}

/// The file a node keeps its payers' vouchers in (`plexus wallet vouchers` reads it).
pub fn voucher_file(data_dir: &Option<std::path::PathBuf>) -> std::path::PathBuf {
    data_dir
        .clone()
        .unwrap_or_else(super::net::default_data_dir)
        .join("vouchers.jsonl")
}
