//! A tiny HTTP/1.1 server on loopback for fetch tests: fixed routes, one connection at a time,
//! `Connection: close`, and a log of every requested path (so a test can assert that nothing
//! was requested at all). Shared by the unit tests in `src/fetch/tests.rs` and `tests/fetch.rs`.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

pub enum Body {
    Bytes(Vec<u8>),
    File(PathBuf),
}

pub struct Route {
    pub status: u16,
    pub content_type: String,
    pub body: Body,
}

impl Route {
    pub fn ok(content_type: &str, body: impl Into<Vec<u8>>) -> Route {
        Route {
            status: 200,
            content_type: content_type.into(),
            body: Body::Bytes(body.into()),
        }
    }

    pub fn file(path: PathBuf) -> Route {
        Route {
            status: 200,
            content_type: "application/octet-stream".into(),
            body: Body::File(path),
        }
    }
}

pub struct Server {
    /// `http://127.0.0.1:PORT`, no trailing slash.
    pub url: String,
    log: Arc<Mutex<Vec<String>>>,
}

impl Server {
    /// Serves `routes` (path -> response); other paths get 404.
    pub fn start(routes: Vec<(&str, Route)>) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let routes: HashMap<String, Route> =
            routes.into_iter().map(|(p, r)| (p.to_owned(), r)).collect();
        let log = Arc::new(Mutex::new(Vec::new()));
        let log2 = log.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let _ = serve(stream, &routes, &log2);
            }
        });
        Server { url, log }
    }

    /// Paths requested so far, in order.
    pub fn requests(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
}

fn serve(
    stream: TcpStream,
    routes: &HashMap<String, Route>,
    log: &Mutex<Vec<String>>,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let path = line.split_whitespace().nth(1).unwrap_or("").to_owned();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" || h == "\n" {
            break;
        }
    }
    log.lock().unwrap().push(path.clone());
    let mut out = stream;
    let Some(route) = routes.get(&path) else {
        let body = b"not found";
        write!(
            out,
            "HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )?;
        return out.write_all(body);
    };
    let len = match &route.body {
        Body::Bytes(b) => b.len() as u64,
        Body::File(p) => std::fs::metadata(p)?.len(),
    };
    write!(
        out,
        "HTTP/1.1 {} X\r\nContent-Type: {}\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n",
        route.status, route.content_type
    )?;
    match &route.body {
        Body::Bytes(b) => out.write_all(b)?,
        Body::File(p) => {
            std::io::copy(&mut std::fs::File::open(p)?, &mut out)?;
        }
    }
    out.flush()
}

/// A loopback URL where nothing listens (connections are refused at once).
pub fn closed_port_url() -> String {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", l.local_addr().expect("addr"));
    drop(l);
    url
}
