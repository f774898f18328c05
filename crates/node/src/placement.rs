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
//!
//! Reputation: convicted nodes are left out before planning (by the caller), and a spare goes
//! first beside each stage whose node the trusted gateways doubt ([`plan_doubting`]), so
//! routing, which prefers reputable nodes, has a reputable one to prefer there. Doubts never
//! change the chains: a doubted node keeps its stage (a doubt is not proof), so nodes that
//! trust different gateways, and see different doubts, still agree on who serves every layer;
//! doubts only move spares.

use plexus_net::PeerId;
use std::collections::HashSet;
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

    /// Every span the plan hands out (`start..end`): the chains' stages, then the replicas.
    pub fn spans(&self) -> Vec<(usize, usize)> {
        self.chains
            .iter()
            .flatten()
            .chain(&self.replicas)
            .map(|a| (a.start, a.end))
            .collect()
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
    plan_doubting(nodes, num_layers, stages, &HashSet::new())
}

/// [`plan`], with spares going first beside the stages of `doubted` nodes (module docs).
pub fn plan_doubting(
    nodes: &[NodeCapacity],
    num_layers: usize,
    stages: Option<usize>,
    doubted: &HashSet<PeerId>,
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
                let replicas = replicate(&chains, &nodes[r * k..], doubted);
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

/// With interchangeable nodes ([`keep_spans`] hands a plan's spans to whoever holds them) the
/// peers of a plan are only labels, and a doubt belongs to the span a doubted node holds: the
/// chain peers of `plan` whose span a `doubted` node holds now (`current`), to plan again with
/// [`plan_doubting`], so a spare goes beside that span. Whether other nodes hold it too does
/// not count, or the spare that moved beside the doubted node would undo the doubt and move
/// back: the plan is the same before and after the spare moves.
pub fn doubts_by_span(
    plan: &Plan,
    current: &[(PeerId, (usize, usize))],
    doubted: &HashSet<PeerId>,
) -> HashSet<PeerId> {
    let held: HashSet<(usize, usize)> = current
        .iter()
        .filter(|(peer, _)| doubted.contains(peer))
        .map(|(_, span)| *span)
        .collect();
    plan.chains
        .iter()
        .flatten()
        .filter(|a| held.contains(&(a.start, a.end)))
        .map(|a| a.peer)
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

/// Leftover nodes copy the slowest stages of the first chain they can hold, in turn. Then each
/// span that only doubted nodes serve (in the chains and those copies; the costliest first)
/// takes one spare that is not itself doubted and can hold it, from the copies least needed:
/// the last spares first (they copy the cheapest stages), never the trusted copy of a doubted
/// node's span. A doubt whose span has a trusted copy already changes nothing.
fn replicate(
    chains: &[Vec<Assignment>],
    spare: &[NodeCapacity],
    doubted: &HashSet<PeerId>,
) -> Vec<Assignment> {
    let Some(first) = chains.first() else {
        return Vec::new();
    };
    let span = |a: &Assignment| (a.start, a.end);
    let costliest = |a: &&Assignment, b: &&Assignment| {
        b.seconds
            .total_cmp(&a.seconds)
            .then(a.start.cmp(&b.start))
            .then(a.end.cmp(&b.end))
    };
    let mut by_cost: Vec<&Assignment> = first.iter().collect();
    by_cost.sort_by(costliest);
    let copy = |n: &NodeCapacity, (start, end): (usize, usize)| Assignment {
        peer: n.peer,
        start,
        end,
        seconds: (end - start) as f64 * n.decode_s_per_layer,
    };
    let mut out: Vec<(&NodeCapacity, Assignment)> = spare
        .iter()
        .enumerate()
        .filter_map(|(turn, n)| {
            let fitting: Vec<&&Assignment> = by_cost
                .iter()
                .filter(|a| a.end - a.start <= n.max_layers)
                .collect();
            let a = fitting.get(turn % fitting.len().max(1))?;
            Some((n, copy(n, span(a))))
        })
        .collect();
    if !doubted.is_empty() {
        let doubted_spans: HashSet<(usize, usize)> = chains
            .iter()
            .flatten()
            .filter(|a| doubted.contains(&a.peer))
            .map(span)
            .collect();
        let served_well: HashSet<(usize, usize)> = chains
            .iter()
            .flatten()
            .chain(out.iter().map(|(_, a)| a))
            .filter(|a| !doubted.contains(&a.peer))
            .map(span)
            .collect();
        let mut suspects: Vec<&Assignment> = chains
            .iter()
            .flatten()
            .filter(|a| doubted.contains(&a.peer) && !served_well.contains(&span(a)))
            .collect();
        suspects.sort_by(costliest);
        let mut seen = HashSet::new();
        suspects.retain(|a| seen.insert(span(a)));
        let mut moved = vec![false; out.len()];
        for s in suspects {
            let pick = (0..out.len()).rev().find(|&j| {
                let (n, a) = &out[j];
                !moved[j]
                    && !doubted.contains(&n.peer)
                    && s.end - s.start <= n.max_layers
                    && !doubted_spans.contains(&span(a))
            });
            if let Some(j) = pick {
                out[j].1 = copy(out[j].0, span(s));
                moved[j] = true;
            }
        }
    }
    out.into_iter().map(|(_, a)| a).collect()
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
    fn a_spare_goes_beside_the_doubted_stage_and_the_chain_stays() {
        // Three stages and two spares: without doubts the spares copy the two costliest stages.
        let nodes = vec![
            node(1e-3, 30),
            node(1e-3, 30),
            node(1e-3, 30),
            node(2e-3, 30),
            node(2e-3, 30),
        ];
        let clear = plan(&nodes, 30, Some(3)).unwrap();
        assert_eq!((clear.chains.len(), clear.replicas.len()), (1, 2));
        for stage in 0..3 {
            let doubted_node = clear.chains[0][stage].clone();
            let p =
                plan_doubting(&nodes, 30, Some(3), &HashSet::from([doubted_node.peer])).unwrap();
            assert_eq!(p.chains, clear.chains, "doubts never change the chains");
            let span = (doubted_node.start, doubted_node.end);
            let beside: Vec<&Assignment> = p
                .replicas
                .iter()
                .filter(|r| (r.start, r.end) == span)
                .collect();
            assert!(!beside.is_empty(), "stage {stage}: {p}");
            assert!(beside.iter().all(|r| r.peer != doubted_node.peer));
        }
        // The spares copy 0..10 and 10..20. A doubt on 10..20, which has its trusted copy
        // already, changes nothing; one on 20..30 takes the spare of the cheaper copy (10..20),
        // and the costliest stage keeps its own.
        let spans = |p: &Plan| -> Vec<(usize, usize)> {
            p.replicas.iter().map(|r| (r.start, r.end)).collect()
        };
        assert_eq!(spans(&clear), vec![(0, 10), (10, 20)]);
        let p = plan_doubting(
            &nodes,
            30,
            Some(3),
            &HashSet::from([clear.chains[0][1].peer]),
        );
        assert_eq!(p.unwrap(), clear);
        let p = plan_doubting(
            &nodes,
            30,
            Some(3),
            &HashSet::from([clear.chains[0][2].peer]),
        );
        assert_eq!(spans(&p.unwrap()), vec![(0, 10), (20, 30)]);
        // A doubted spare is not what goes beside a doubted stage: the other spare is, even
        // when it copies the costliest stage.
        let (stage, spare) = (clear.chains[0][2].clone(), clear.replicas[1].peer);
        let p = plan_doubting(&nodes, 30, Some(3), &HashSet::from([stage.peer, spare])).unwrap();
        let beside: Vec<PeerId> = p
            .replicas
            .iter()
            .filter(|r| (r.start, r.end) == (stage.start, stage.end))
            .map(|r| r.peer)
            .collect();
        assert_eq!(beside, vec![clear.replicas[0].peer], "{p}");
    }

    #[test]
    fn interchangeable_nodes_put_a_spare_beside_the_span_a_doubted_node_holds() {
        // Equal nodes: the plan's labels need not be who holds what. Whoever the plan names,
        // the span held by the doubted node alone gets the spare's copy.
        for _ in 0..16 {
            let nodes: Vec<NodeCapacity> = (0..3).map(|_| node(1e-3, 30)).collect();
            let clear = plan(&nodes, 30, Some(2)).unwrap();
            let spans = clear.spans();
            assert_eq!(spans, vec![(0, 15), (15, 30), (0, 15)]);
            // Held the other way round from the plan's labels: node 2 alone on 15..30.
            let current = vec![
                (nodes[0].peer, (0, 15)),
                (nodes[1].peer, (0, 15)),
                (nodes[2].peer, (15, 30)),
            ];
            let doubted = HashSet::from([nodes[2].peer]);
            let hand_out = |current: &[(PeerId, (usize, usize))]| {
                let mapped = doubts_by_span(&clear, current, &doubted);
                let p = plan_doubting(&nodes, 30, Some(2), &mapped).unwrap();
                let spans = p.spans();
                let mut handed = keep_spans(&spans, current);
                handed.sort_by_key(|(p, _)| p.to_bytes());
                handed
            };
            let handed = hand_out(&current);
            let on = |span| handed.iter().filter(|(_, s)| *s == span).count();
            assert_eq!((on((0, 15)), on((15, 30))), (1, 2), "{handed:?}");
            assert!(
                handed.contains(&(nodes[2].peer, (15, 30))),
                "the doubted node stays"
            );
            // Once the spare has moved, the plan keeps it there (no flapping).
            assert_eq!(hand_out(&handed), handed);
            // Cleared: the spare goes back to copying the costliest stage.
            let cleared = keep_spans(&[(0, 15), (15, 30), (0, 15)], &handed);
            let on = |span| cleared.iter().filter(|(_, s)| *s == span).count();
            assert_eq!((on((0, 15)), on((15, 30))), (2, 1), "{cleared:?}");
        }
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

        /// Doubts never change the chains (only spares move), and every stage of a doubted node
        /// that no trusted node serves gets a trusted spare beside it while trusted spares that
        /// can hold it remain.
        #[test]
        fn doubts_only_move_spares(
            specs in proptest::collection::vec((1u32..50, 1usize..40, any::<bool>()), 1..9),
            layers in 1usize..40,
            stages in proptest::option::of(1usize..6),
        ) {
            let nodes: Vec<NodeCapacity> =
                specs.iter().map(|&(ms, cap, _)| node(ms as f64 * 1e-4, cap)).collect();
            let doubted: HashSet<PeerId> = nodes
                .iter()
                .zip(&specs)
                .filter(|(_, s)| s.2)
                .map(|(n, _)| n.peer)
                .collect();
            let (Ok(clear), Ok(p)) = (
                plan(&nodes, layers, stages),
                plan_doubting(&nodes, layers, stages, &doubted),
            ) else {
                return Ok(());
            };
            prop_assert_eq!(&p.chains, &clear.chains);
            // The same spares copy stages (one more may, when a doubted stage of another chain
            // is one it holds), each once, and no chain node.
            let chained: HashSet<PeerId> = p.chains.iter().flatten().map(|a| a.peer).collect();
            let copying: Vec<PeerId> = p.replicas.iter().map(|a| a.peer).collect();
            let copying_set: HashSet<PeerId> = copying.iter().copied().collect();
            prop_assert_eq!(copying.len(), copying_set.len());
            prop_assert!(copying_set.is_disjoint(&chained));
            prop_assert!(clear.replicas.iter().all(|a| copying_set.contains(&a.peer)));
            // A doubt whose span already has a trusted copy changes nothing.
            let trusted_in_clear: HashSet<(usize, usize)> = clear
                .chains
                .iter()
                .flatten()
                .chain(&clear.replicas)
                .filter(|a| !doubted.contains(&a.peer))
                .map(|a| (a.start, a.end))
                .collect();
            if clear
                .chains
                .iter()
                .flatten()
                .filter(|a| doubted.contains(&a.peer))
                .all(|a| trusted_in_clear.contains(&(a.start, a.end)))
            {
                prop_assert_eq!(&p, &clear);
            }
            let span = |a: &Assignment| (a.start, a.end);
            let trusted_spans: HashSet<(usize, usize)> = p
                .chains
                .iter()
                .flatten()
                .chain(&p.replicas)
                .filter(|a| !doubted.contains(&a.peer))
                .map(span)
                .collect();
            for a in p.chains.iter().flatten().filter(|a| doubted.contains(&a.peer)) {
                if trusted_spans.contains(&span(a)) {
                    continue;
                }
                // Left alone only when every trusted spare is too small or beside another
                // doubted stage.
                for r in p.replicas.iter().filter(|r| !doubted.contains(&r.peer)) {
                    let n = nodes.iter().find(|n| n.peer == r.peer).unwrap();
                    let beside_doubt = p.chains.iter().flatten().any(|c| {
                        doubted.contains(&c.peer) && span(c) == span(r)
                    });
                    prop_assert!(
                        a.end - a.start > n.max_layers || beside_doubt,
                        "{:?} left alone while {} copies {:?}", span(a), r.peer, span(r)
                    );
                }
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
