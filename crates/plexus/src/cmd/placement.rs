//! `plexus placement --model ID`: joins the network as a client, listens for announcements,
//! and prints who serves which layers now and the plan placement would choose (from each
//! node's claimed speed checked against what its peers measured, as the nodes plan:
//! `plexus_node::probe`).

use super::net::runtime;
use crate::cli::PlacementArgs;
use plexus_node::client::{ClientConfig, NetworkClient};
use plexus_node::placement::{plan, NodeCapacity};
use plexus_node::probe::{checked_speed, observed_speeds};
use std::time::Duration;

pub fn run(args: PlacementArgs) -> anyhow::Result<()> {
    let key = plexus_core::keys::NodeKey::generate();
    let net = args.net.config(key)?;
    let rt = runtime()?;
    rt.block_on(async move {
        let client = NetworkClient::start(ClientConfig::new(net))?;
        tokio::time::sleep(Duration::from_secs_f64(args.wait.max(0.0))).await;
        let dir = client.directory();
        let wanted = args.model.to_ascii_lowercase();
        let mut offers: Vec<_> = dir
            .iter()
            .flat_map(|(p, a)| a.models.iter().map(move |o| (*p, a, o)))
            .filter(|(_, _, o)| {
                o.model.to_string().starts_with(&wanted) || o.name.to_ascii_lowercase() == wanted
            })
            .collect();
        anyhow::ensure!(
            !offers.is_empty(),
            "no node announces a model matching {:?} (heard from {} peers)",
            args.model,
            dir.len()
        );
        offers.sort_by_key(|(p, _, o)| (o.start, p.to_bytes()));
        let layers = offers[0].2.num_layers as usize;
        println!(
            "model {} ({}), {} layers",
            offers[0].2.model, offers[0].2.name, layers
        );
        println!("serving now:");
        let mut rtts = Vec::new();
        let mut checked = Vec::new();
        let observed = observed_speeds(
            dir.iter().map(|(p, a)| (*p, a.observed.as_slice())),
            offers[0].2.model,
        );
        for (peer, a, o) in &offers {
            let rtt = client.handle().rtt(*peer).await;
            rtts.extend(rtt);
            let seen = observed.get(peer).cloned().unwrap_or_default();
            let claim = f64::from(o.decode_s_per_layer);
            let speed = checked_speed(claim, seen.clone());
            checked.push(speed);
            let measured = match seen.len() {
                0 => "not measured by peers".to_string(),
                n => format!(
                    "measured by {n} peers at {} ms/layer",
                    seen.iter()
                        .map(|(s, _)| format!("{:.3}", s * 1e3))
                        .collect::<Vec<_>>()
                        .join("/")
                ),
            };
            println!(
                "  layers {:>3}..{:<3} {peer}  {:.3} ms/layer decode claimed, {measured}{}, {} sessions, {:.1} GiB free",
                o.start,
                o.end,
                claim * 1e3,
                if speed == claim {
                    String::new()
                } else {
                    format!(" (placement uses {:.3}: the claim is too fast)", speed * 1e3)
                },
                a.sessions,
                a.free_memory as f64 / (1u64 << 30) as f64
            );
        }
        let nodes: Vec<NodeCapacity> = offers
            .iter()
            .zip(&checked)
            .map(|((peer, a, o), speed)| NodeCapacity {
                peer: *peer,
                decode_s_per_layer: *speed,
                max_layers: ((a.free_memory + o.layer_bytes * (o.end - o.start) as u64)
                    / o.layer_bytes.max(1))
                .min(layers as u64) as usize,
            })
            .collect();
        let p = plan(&nodes, layers, args.stages)?;
        let rtt = if rtts.is_empty() {
            0.0
        } else {
            rtts.iter().map(|d| d.as_secs_f64()).sum::<f64>() / rtts.len() as f64
        };
        let stages = p.chains.first().map_or(0, Vec::len);
        println!("plan:\n{p}");
        println!(
            "expected per token: {:.2} ms ({stages} stages x {:.2} ms round trip + compute)",
            (p.seconds_per_token() + stages as f64 * rtt) * 1e3,
            rtt * 1e3
        );
        anyhow::Ok(())
    })
}
