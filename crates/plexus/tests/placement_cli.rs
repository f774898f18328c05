//! `plexus placement` against two real nodes: it lists who serves which layers and prints a
//! plan that covers the model.
#![allow(unused_crate_dependencies, clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

fn model() -> PathBuf {
    plexus_testkit::real_model()
}

struct Node(Child, String);

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn node(span: &str, dir: &Path) -> Node {
    let mut child = Command::new(env!("CARGO_BIN_EXE_plexus"))
        .args([
            "node",
            "--threads",
            "1",
            "--span",
            span,
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--model",
        ])
        .arg(model())
        .arg("--data-dir")
        .arg(dir)
        .env("PLEXUS_CACHE_DIR", dir.join("cache"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr = loop {
        let line = lines.next().unwrap().unwrap();
        if let Some(a) = line.strip_prefix("listening on ") {
            break a.to_owned();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    Node(child, addr)
}

#[test]
fn placement_lists_the_nodes_and_plans_a_cover() {
    let dir = tempfile::tempdir().unwrap();
    let a = node("0..12", &dir.path().join("a"));
    let b = node("12..30", &dir.path().join("b"));
    let out = Command::new(env!("CARGO_BIN_EXE_plexus"))
        .args([
            "placement",
            "--model",
            "SmolLM2-135M-Instruct.Q4_1",
            "--wait",
            "2",
            "--stages",
            "2",
        ])
        .args(["--bootstrap", &a.1, "--bootstrap", &b.1])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success());
    assert!(text.contains("30 layers"), "{text}");
    assert!(
        text.contains("layers   0..12") && text.contains("layers  12..30"),
        "{text}"
    );
    assert!(
        text.contains("plan:") && text.contains("chain 0:"),
        "{text}"
    );
    // Nodes on fixed spans do not probe each other: each claim is shown unmeasured.
    assert_eq!(
        text.matches("ms/layer decode claimed, not measured by peers")
            .count(),
        2,
        "{text}"
    );
    // The plan: two contiguous spans covering 0..30 (where the cut falls depends on the
    // speeds the nodes measured).
    let plan: Vec<(usize, usize)> = text
        .split("chain 0:")
        .nth(1)
        .unwrap()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("layers"))
        .map(|l| {
            let span = l.split_whitespace().next().unwrap();
            let (a, b) = span.split_once("..").unwrap();
            (a.parse().unwrap(), b.parse().unwrap())
        })
        .collect();
    assert_eq!(plan.len(), 2, "{text}");
    assert_eq!(
        (plan[0].0, plan[0].1, plan[1].1),
        (0, plan[1].0, 30),
        "{text}"
    );
    assert!(text.contains("expected per token"), "{text}");

    // An unknown model is a clear error.
    let out = Command::new(env!("CARGO_BIN_EXE_plexus"))
        .args([
            "placement",
            "--model",
            "nope",
            "--wait",
            "1",
            "--bootstrap",
            &a.1,
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no node announces"));
}
