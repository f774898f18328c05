//! Placement: which contiguous span of layers each node should serve.
//!
//! Given nodes (speed: seconds per layer per token; memory: how many layers fit) and a model
//! of `L` layers, the plan builds chains of `k` stages (`k` asked for, or the fewest nodes
//! whose memory holds the model) and, inside each chain, picks spans that make the slowest
//! stage as fast as possible (the least bottleneck `T` with `sum_i min(cap_i, T / s_i) >= L`).
//! With more nodes than one chain needs, the rest form more chains (round-robin over nodes
//! sorted by speed, so chains come out alike) and leftovers replicate the slowest stage of the
//! first chain. Pure and deterministic: the same inputs give the same plan on every node, so
//! nodes rebalance to the same answer when peers join or leave.

use plexus_net::PeerId;
use std::fmt;

/// What placement knows of a node.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeCapacity {
    pub peer: PeerId,
    /// Seconds per layer per decoded token.
    pub decode_s_per_layer: f64,
    /// Layers that fit in its free memory.
    pub max_layers: usize,
}

/// One node's span in the plan.
#[derive(Clone, Debug, PartialEq)]
pub struct Assignment {
    pub peer: PeerId,
    pub start: usize,
    pub end: usize,
    /// Expected compute seconds per decoded token for the span.
    pub seconds: f64,
}

/// A full placement.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub num_layers: usize,
    pub chains: Vec<Vec<Assignment>>,
    /// Extra copies of busy spans (not part of a complete chain).
    pub replicas: Vec<Assignment>,
}

/// Why no plan exists.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlacementError {
    #[error("no nodes")]
    NoNodes,
    #[error("the nodes' memory holds {fits} of {needed} layers")]
    NotEnoughMemory { fits: usize, needed: usize },
}

impl Plan {
    /// The assignment of `peer`, if any.
    pub fn assignment(&self, peer: &PeerId) -> Option<&Assignment> {
        self.chains
            .iter()
            .flatten()
            .chain(&self.replicas)
            .find(|a| &a.peer == peer)
    }

    /// Expected compute seconds per token through the slowest chain (network time not
    /// included).
    pub fn seconds_per_token(&self) -> f64 {
        self.chains
            .iter()
            .map(|c| c.iter().map(|a| a.seconds).sum::<f64>())
            .fold(0.0, f64::max)
    }

    /// The slowest single stage: what bounds pipelined throughput.
    pub fn bottleneck(&self) -> f64 {
        self.chains
            .iter()
            .flatten()
            .map(|a| a.seconds)
            .fold(0.0, f64::max)
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, chain) in self.chains.iter().enumerate() {
            writeln!(f, "chain {i}:")?;
            for a in chain {
                writeln!(
                    f,
                    "  layers {:>3}..{:<3} {}  {:.2} ms/token",
                    a.start,
                    a.end,
                    a.peer,
                    a.seconds * 1e3
                )?;
            }
        }
        for a in &self.replicas {
            writeln!(
                f,
                "replica layers {:>3}..{:<3} {}  {:.2} ms/token",
                a.start,
                a.end,
                a.peer,
                a.seconds * 1e3
            )?;
        }
        write!(
            f,
            "expected compute: {:.2} ms/token (slowest stage {:.2} ms)",
            self.seconds_per_token() * 1e3,
            self.bottleneck() * 1e3
        )
    }
}

/// Computes a plan for `num_layers` layers; `stages` fixes the chain length.
pub fn plan(
    nodes: &[NodeCapacity],
    num_layers: usize,
    stages: Option<usize>,
) -> Result<Plan, PlacementError> {
    let mut nodes: Vec<NodeCapacity> = nodes.iter().filter(|n| n.max_layers > 0).cloned().collect();
    if nodes.is_empty() || num_layers == 0 {
        return Err(PlacementError::NoNodes);
    }
    nodes.sort_by(|a, b| {
        a.decode_s_per_layer
            .total_cmp(&b.decode_s_per_layer)
            .then_with(|| a.peer.to_bytes().cmp(&b.peer.to_bytes()))
    });
    let total: usize = nodes.iter().map(|n| n.max_layers).sum();
    if total < num_layers {
        return Err(PlacementError::NotEnoughMemory {
            fits: total,
            needed: num_layers,
        });
    }
    let fewest = {
        let mut caps: Vec<usize> = nodes.iter().map(|n| n.max_layers).collect();
        caps.sort_unstable_by(|a, b| b.cmp(a));
        let mut sum = 0;
        caps.iter()
            .position(|c| {
                sum += c;
                sum >= num_layers
            })
            .map_or(nodes.len(), |i| i + 1)
    };
    let mut k = stages
        .unwrap_or(fewest)
        .clamp(fewest, nodes.len())
        .min(num_layers);
    loop {
        let r = nodes.len() / k;
        let groups: Vec<Vec<&NodeCapacity>> = (0..r)
            .map(|j| (0..k).map(|i| &nodes[i * r + j]).collect())
            .collect();
        let chains: Option<Vec<Vec<Assignment>>> =
            groups.iter().map(|g| balance(g, num_layers)).collect();
        match chains {
            Some(chains) => {
                let replicas = replicate(&chains, &nodes[r * k..]);
                return Ok(Plan {
                    num_layers,
                    chains,
                    replicas,
                });
            }
            // Round-robin groups can miss memory a single chain of all nodes has.
            None if k < nodes.len().min(num_layers) => k += 1,
            None => {
                return Err(PlacementError::NotEnoughMemory {
                    fits: total,
                    needed: num_layers,
                })
            }
        }
    }
}

/// Hands the plan's `spans` to interchangeable nodes (equal speed and memory; `nodes` with the
/// span each serves now) moving as few layers as possible: a node keeps its span when the plan
/// has it; then, largest overlap first, a node takes a span sharing layers with the one it
/// serves (after a death the survivors widen their spans rather than swap ends); the others
/// take the remaining spans in order. Nodes and spans are sorted (by peer id, by start) and
/// ties broken on them, so every node computes the same answer. Without this, a plan over equal
/// nodes (whose order is by peer id) would shuffle spans among nodes that already cover the
/// model. Cost: O(n * d log(n * d)) for n nodes and d distinct spans.
pub fn keep_spans(
    spans: &[(usize, usize)],
    nodes: &[(PeerId, (usize, usize))],
) -> Vec<(PeerId, (usize, usize))> {
    let mut nodes: Vec<(PeerId, (usize, usize))> = nodes.to_vec();
    nodes.sort_by_key(|(p, _)| p.to_bytes());
    // Distinct spans with how many of each the plan still hands out.
    let mut left: Vec<((usize, usize), usize)> = Vec::new();
    let mut sorted = spans.to_vec();
    sorted.sort_unstable();
    for s in sorted {
        match left.last_mut() {
            Some((last, n)) if *last == s => *n += 1,
            _ => left.push((s, 1)),
        }
    }
    let mut out: Vec<Option<(usize, usize)>> = vec![None; nodes.len()];
    let take = |left: &mut Vec<((usize, usize), usize)>, j: usize| {
        left[j].1 -= 1;
        left[j].0
    };
    for (i, (_, current)) in nodes.iter().enumerate() {
        if let Some(j) = left.iter().position(|(s, n)| s == current && *n > 0) {
            out[i] = Some(take(&mut left, j));
        }
    }
    let overlap = |a: (usize, usize), b: (usize, usize)| a.1.min(b.1).saturating_sub(a.0.max(b.0));
    let mut pairs: Vec<(usize, usize, usize)> = Vec::new(); // (overlap, node, span)
    for (i, (_, current)) in nodes.iter().enumerate() {
        if out[i].is_some() {
            continue;
        }
        for (j, (s, _)) in left.iter().enumerate() {
            let o = overlap(*current, *s);
            if o > 0 {
                pairs.push((o, i, j));
            }
        }
    }
    pairs.sort_unstable_by_key(|&(o, i, j)| (std::cmp::Reverse(o), i, j));
    for (_, i, j) in pairs {
        if out[i].is_none() && left[j].1 > 0 {
            out[i] = Some(take(&mut left, j));
        }
    }
    let mut rest = left
        .into_iter()
        .flat_map(|(s, n)| std::iter::repeat_n(s, n));
    for slot in out.iter_mut().filter(|s| s.is_none()) {
        *slot = rest.next();
    }
    nodes
        .into_iter()
        .zip(out)
        .filter_map(|((p, _), s)| s.map(|s| (p, s)))
        .collect()
}

/// Whether `spans` (`start..end` each) together serve every layer `0..layers`.
pub fn covers(spans: &[(usize, usize)], layers: usize) -> bool {
    let mut sorted = spans.to_vec();
    sorted.sort_unstable();
    let mut reach = 0;
    for (start, end) in sorted {
        if start > reach {
            break;
        }
        reach = reach.max(end);
    }
    reach >= layers
}

/// Spans for one chain that minimise its slowest stage, or `None` if its memory is short.
fn balance(nodes: &[&NodeCapacity], layers: usize) -> Option<Vec<Assignment>> {
    let lens_for = |t: f64| -> Vec<usize> {
        nodes
            .iter()
            .map(|n| {
                let by_time = if n.decode_s_per_layer > 0.0 {
                    ((t / n.decode_s_per_layer) + 1e-9).floor() as usize
                } else {
                    layers
                };
                by_time.min(n.max_layers).max(1)
            })
            .collect()
    };
    // Candidate bottlenecks: m layers on node i.
    let mut candidates: Vec<f64> = nodes
        .iter()
        .flat_map(|n| (1..=layers.min(n.max_layers)).map(move |m| m as f64 * n.decode_s_per_layer))
        .collect();
    candidates.sort_by(f64::total_cmp);
    let t = *candidates
        .iter()
        .find(|&&t| lens_for(t).iter().sum::<usize>() >= layers)?;
    let mut lens = lens_for(t);
    // Trim the excess from the stages that take longest.
    while lens.iter().sum::<usize>() > layers {
        let i = (0..lens.len()).filter(|&i| lens[i] > 1).max_by(|&a, &b| {
            (lens[a] as f64 * nodes[a].decode_s_per_layer)
                .total_cmp(&(lens[b] as f64 * nodes[b].decode_s_per_layer))
                .then(a.cmp(&b))
        })?;
        lens[i] -= 1;
    }
    let mut start = 0;
    Some(
        nodes
            .iter()
            .zip(lens)
            .map(|(n, len)| {
                let a = Assignment {
                    peer: n.peer,
                    start,
                    end: start + len,
                    seconds: len as f64 * n.decode_s_per_layer,
                };
                start += len;
                a
            })
            .collect(),
    )
}

/// Leftover nodes copy the slowest stages of the first chain they can hold.
fn replicate(chains: &[Vec<Assignment>], spare: &[NodeCapacity]) -> Vec<Assignment> {
    let Some(first) = chains.first() else {
        return Vec::new();
    };
    let mut by_cost: Vec<&Assignment> = first.iter().collect();
    by_cost.sort_by(|a, b| b.seconds.total_cmp(&a.seconds).then(a.start.cmp(&b.start)));
    spare
        .iter()
        .enumerate()
        .filter_map(|(i, n)| {
            let fitting: Vec<&&Assignment> = by_cost
                .iter()
                .filter(|a| a.end - a.start <= n.max_layers)
                .collect();
            let a = fitting.get(i % fitting.len().max(1))?;
            Some(Assignment {
                peer: n.peer,
                start: a.start,
                end: a.end,
                seconds: (a.end - a.start) as f64 * n.decode_s_per_layer,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn node(s: f64, cap: usize) -> NodeCapacity {
        NodeCapacity {
            peer: PeerId::random(),
            decode_s_per_layer: s,
            max_layers: cap,
        }
    }

    #[test]
    fn equal_nodes_split_evenly() {
        let nodes = vec![node(1e-3, 30), node(1e-3, 30), node(1e-3, 30)];
        let p = plan(&nodes, 30, Some(3)).unwrap();
        assert_eq!(p.chains.len(), 1);
        let lens: Vec<usize> = p.chains[0].iter().map(|a| a.end - a.start).collect();
        assert_eq!(lens, vec![10, 10, 10]);
        // Without a stage count the fewest stages win; the others become chains of their own.
        let p = plan(&nodes, 30, None).unwrap();
        assert_eq!(p.chains.len(), 3);
        assert!(p.chains.iter().all(|c| c.len() == 1));
    }

    #[test]
    fn faster_nodes_take_more_layers_and_memory_caps_hold() {
        let nodes = vec![node(1e-3, 30), node(2e-3, 30), node(1e-3, 8)];
        let p = plan(&nodes, 30, Some(3)).unwrap();
        let chain = &p.chains[0];
        for a in chain {
            let n = nodes.iter().find(|n| n.peer == a.peer).unwrap();
            assert!(a.end - a.start <= n.max_layers);
        }
        assert!((p.bottleneck() - 0.015).abs() < 1e-9, "{p}");
    }

    #[test]
    fn spare_nodes_replicate_the_slowest_stage() {
        let nodes = vec![node(1e-3, 20), node(1e-3, 20), node(1e-3, 20)];
        let p = plan(&nodes, 30, Some(2)).unwrap();
        assert_eq!(p.chains.len(), 1);
        assert_eq!(p.replicas.len(), 1);
        let r = &p.replicas[0];
        assert!(p.chains[0]
            .iter()
            .any(|a| a.start == r.start && a.end == r.end));
    }

    #[test]
    fn equal_nodes_keep_their_spans_and_survivors_split_the_lost_one() {
        // Peer ids decide the order nodes are considered in: try many.
        for _ in 0..32 {
            survivors_widen_their_spans(PeerId::random(), PeerId::random(), PeerId::random());
        }
    }

    fn survivors_widen_their_spans(a: PeerId, b: PeerId, c: PeerId) {
        let spans = [(0, 10), (10, 20), (20, 30)];
        let now = [(c, (0, 10)), (a, (10, 20)), (b, (20, 30))];
        let mut kept = keep_spans(&spans, &now);
        kept.sort_by_key(|(_, s)| *s);
        assert_eq!(kept, vec![(c, (0, 10)), (a, (10, 20)), (b, (20, 30))]);
        // `a` died: the plan over two nodes has new spans; both move, the same way everywhere,
        // each widening the span it holds (c keeps 0..10 inside 0..15, b 20..30 inside 15..30)
        // whatever the peer ids.
        let two = [(0, 15), (15, 30)];
        let x = keep_spans(&two, &[(c, (0, 10)), (b, (20, 30))]);
        let y = keep_spans(&two, &[(b, (20, 30)), (c, (0, 10))]);
        assert_eq!(x, y);
        let mut got = x;
        got.sort_by_key(|(_, s)| *s);
        assert_eq!(got, vec![(c, (0, 15)), (b, (15, 30))]);
        // The killed node came back on its old span: the survivors shrink back onto theirs.
        let mut back = keep_spans(&spans, &[(c, (0, 15)), (b, (15, 30)), (a, (10, 20))]);
        back.sort_by_key(|(_, s)| *s);
        assert_eq!(back, vec![(c, (0, 10)), (a, (10, 20)), (b, (20, 30))]);
    }

    #[test]
    fn coverage_needs_every_layer() {
        assert!(covers(&[(0, 10), (10, 20), (20, 30)], 30));
        assert!(covers(&[(20, 30), (0, 15), (10, 20)], 30));
        assert!(!covers(&[(0, 10), (20, 30)], 30));
        assert!(!covers(&[(0, 10), (10, 29)], 30));
        assert!(!covers(&[(1, 30)], 30));
        assert!(!covers(&[], 30));
    }

    #[test]
    fn too_little_memory_is_an_error() {
        let nodes = vec![node(1e-3, 10), node(1e-3, 10)];
        assert_eq!(
            plan(&nodes, 30, None),
            Err(PlacementError::NotEnoughMemory {
                fits: 20,
                needed: 30
            })
        );
    }

    proptest! {
        #[test]
        fn plans_cover_every_layer_within_memory(
            specs in proptest::collection::vec((1u32..50, 1usize..40), 1..8),
            layers in 1usize..40,
            stages in proptest::option::of(1usize..6),
        ) {
            let nodes: Vec<NodeCapacity> =
                specs.iter().map(|&(ms, cap)| node(ms as f64 * 1e-4, cap)).collect();
            match plan(&nodes, layers, stages) {
                Ok(p) => {
                    let mut used = std::collections::HashSet::new();
                    for chain in &p.chains {
                        prop_assert_eq!(chain.first().unwrap().start, 0);
                        prop_assert_eq!(chain.last().unwrap().end, layers);
                        for w in chain.windows(2) {
                            prop_assert_eq!(w[0].end, w[1].start);
                        }
                        for a in chain {
                            let n = nodes.iter().find(|n| n.peer == a.peer).unwrap();
                            prop_assert!(a.start < a.end && a.end - a.start <= n.max_layers);
                            prop_assert!(used.insert(a.peer));
                        }
                    }
                    for a in &p.replicas {
                        prop_assert!(used.insert(a.peer));
                    }
                }
                Err(PlacementError::NotEnoughMemory { .. }) => {
                    let total: usize = nodes.iter().map(|n| n.max_layers).sum();
                    prop_assert!(total < layers || nodes.len() > layers);
                }
                Err(e) => prop_assert!(false, "{e}"),
            }
        }

        /// Every node gets at most one span, exactly the plan's spans are handed out (all of
        /// them when there are enough nodes), a node whose span is in the plan keeps it, and
        /// the answer does not depend on the order nodes are listed in.
        #[test]
        fn keep_spans_hands_out_the_plan(
            plan_spans in proptest::collection::vec((0usize..20, 1usize..10), 1..6),
            held in proptest::collection::vec((0usize..20, 1usize..10), 1..6),
            rotate in 0usize..6,
        ) {
            let spans: Vec<(usize, usize)> = plan_spans.iter().map(|&(s, l)| (s, s + l)).collect();
            let nodes: Vec<(PeerId, (usize, usize))> =
                held.iter().map(|&(s, l)| (PeerId::random(), (s, s + l))).collect();
            let got = keep_spans(&spans, &nodes);
            let mut rotated = nodes.clone();
            rotated.rotate_left(rotate % nodes.len());
            prop_assert_eq!(&keep_spans(&spans, &rotated), &got);
            prop_assert_eq!(got.len(), spans.len().min(nodes.len()));
            let mut given: Vec<(usize, usize)> = got.iter().map(|(_, s)| *s).collect();
            given.sort_unstable();
            let mut want = spans.clone();
            want.sort_unstable();
            let mut unused = want.clone();
            for s in &given {
                let at = unused.iter().position(|u| u == s);
                prop_assert!(at.is_some(), "{:?} handed out beyond the plan", s);
                unused.remove(at.unwrap());
            }
            let mut peers: Vec<PeerId> = got.iter().map(|(p, _)| *p).collect();
            peers.sort_by_key(|p| p.to_bytes());
            peers.dedup();
            prop_assert_eq!(peers.len(), got.len());
            // Keeping is never lost: as many nodes keep their span as the plan allows.
            let kept = got.iter().filter(|(p, s)| nodes.iter().any(|(q, c)| q == p && c == s)).count();
            let mut could = 0;
            let mut pool = want;
            for (_, c) in &nodes {
                if let Some(at) = pool.iter().position(|s| s == c) {
                    pool.remove(at);
                    could += 1;
                }
            }
            prop_assert_eq!(kept, could);
        }
    }
}
