//! A `plexus gateway` child process for tests: killed on drop, its URL read from the first
//! line it prints (`listening on URL`) within a bounded wait, the rest of its stdout drained
//! so it never blocks on a full pipe.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// Kills the server if the test ends before stopping it.
pub struct Server(pub Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `cmd` (stdout piped, stderr inherited) and returns it with the URL of its first
/// line; panics if that line does not come within two minutes.
pub fn start(mut cmd: Command) -> (Server, String) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start plexus");
    let stdout = child.stdout.take().unwrap();
    let server = Server(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        let _ = tx.send(lines.next());
        for _ in lines {}
    });
    let line = rx
        .recv_timeout(Duration::from_secs(120))
        .expect("the gateway did not print its address in time")
        .expect("the gateway closed stdout")
        .unwrap();
    let url = line
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_owned();
    (server, url)
}
