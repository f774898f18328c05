//! The gateway's audit book on disk (`audits.json` in its data directory): convictions, doubts
//! and every node's record survive a restart of the gateway, so a convicted node stays
//! excluded and a doubted one doubted, and a node cannot wash its record by waiting for one.
//!
//! The file is JSON ([`Snapshot`]), written whole to a temporary file beside it, synced and
//! renamed over it (a crash mid-write leaves the old file), by the client's saver soon after a
//! verdict changes and at most every [`SAVE_RECORDS_EVERY`] for records alone
//! ([`crate::client::NetworkClient::keep_book`]), and once more when the gateway stops. A file
//! that cannot be read or does not parse stops the gateway with an error naming it: starting
//! with an empty book would silently forgive every node it convicted.

use super::book::{AuditBook, Changes, Snapshot};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

/// How often the saver looks at the book's [`Changes`].
pub const SAVE_CHECK_EVERY: Duration = Duration::from_secs(1);
/// How long changes of records alone (calls, audits passed) may wait to be saved.
pub const SAVE_RECORDS_EVERY: Duration = Duration::from_secs(10);
/// Largest book file read (a full book, every record and near tie, is a few tens of MB).
pub const MAX_FILE_BYTES: u64 = 256 << 20;

#[derive(Debug, thiserror::Error)]
pub enum BookFileError {
    #[error("cannot read the audit book {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the audit book {} is not valid: {message} (it holds this gateway's convictions; \
         repair it, or move it aside to start with an empty book)",
        path.display()
    )]
    Invalid { path: PathBuf, message: String },
    #[error("cannot write the audit book {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("this client already keeps its audit book in {}", path.display())]
    AlreadyKept { path: PathBuf },
}

/// Where a gateway keeps its audit book.
#[derive(Debug)]
pub struct BookFile {
    path: PathBuf,
    /// One write at a time (the saver and the final save at shutdown), and the changes of
    /// the book last written: an older copy that comes later is not written over it.
    written: Mutex<Option<Changes>>,
}

impl BookFile {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            written: Mutex::new(None),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The book the file holds; an empty one when there is no file yet. Removes temporary
    /// files a killed writer left beside it.
    pub fn load(&self) -> Result<AuditBook, BookFileError> {
        self.remove_leftovers();
        let invalid = |message: String| BookFileError::Invalid {
            path: self.path.clone(),
            message,
        };
        let read = |source| BookFileError::Read {
            path: self.path.clone(),
            source,
        };
        let file = match std::fs::File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(AuditBook::default()),
            Err(source) => return Err(read(source)),
        };
        let len = file.metadata().map_err(read)?.len();
        if len > MAX_FILE_BYTES {
            return Err(invalid(format!(
                "{len} bytes, a book is at most {MAX_FILE_BYTES}"
            )));
        }
        let mut bytes = Vec::with_capacity(len as usize);
        std::io::Read::read_to_end(
            &mut std::io::Read::take(file, MAX_FILE_BYTES + 1),
            &mut bytes,
        )
        .map_err(read)?;
        let snapshot: Snapshot =
            serde_json::from_slice(&bytes).map_err(|e| invalid(e.to_string()))?;
        AuditBook::restore(&snapshot).map_err(invalid)
    }

    /// The prefix of this file's temporary files (in its directory).
    fn temp_prefix(&self) -> String {
        let name = self.path.file_name().unwrap_or_default().to_string_lossy();
        format!(".{name}.")
    }

    fn remove_leftovers(&self) {
        let (Some(dir), prefix) = (self.path.parent(), self.temp_prefix()) else {
            return;
        };
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }

    /// Replaces the file with `book` (a copy taken under the book's lock), atomically
    /// (temporary file, sync, rename, sync of the directory), unless a copy with as many
    /// changes was written already (the saver's copy, taken before the final save's, may
    /// come second). Creates the directory if missing.
    pub fn save(&self, book: &AuditBook) -> Result<(), BookFileError> {
        let mut written = self.written.lock().unwrap_or_else(|e| e.into_inner());
        let changes = book.changes();
        if written.is_some_and(|w| w.records >= changes.records && w.verdicts >= changes.verdicts) {
            return Ok(());
        }
        let snapshot = book.snapshot();
        let write = |source| BookFileError::Write {
            path: self.path.clone(),
            source,
        };
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&dir).map_err(write)?;
        let mut tmp = tempfile::Builder::new()
            .prefix(&self.temp_prefix())
            .tempfile_in(&dir)
            .map_err(write)?;
        let json = serde_json::to_vec(&snapshot).map_err(|e| write(std::io::Error::other(e)))?;
        tmp.write_all(&json).map_err(write)?;
        tmp.as_file().sync_all().map_err(write)?;
        tmp.persist(&self.path).map_err(|e| write(e.error))?;
        std::fs::File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(write)?;
        *written = Some(changes);
        Ok(())
    }
}

/// Whether a book that changed from `saved` to `now`, last saved `since` ago, is due for
/// saving: at once for a verdict, after [`SAVE_RECORDS_EVERY`] for records alone.
pub fn due(saved: Changes, now: Changes, since: Duration) -> bool {
    now.verdicts != saved.verdicts || (now.records != saved.records && since >= SAVE_RECORDS_EVERY)
}

#[cfg(test)]
mod tests {
    use super::*;
    use plexus_net::PeerId;
    use plexus_verify::compare::CrossCheck;

    /// A book with something of every kind: records, a conviction, a doubt, near ties.
    fn busy_book() -> (AuditBook, Vec<PeerId>) {
        let p: Vec<PeerId> = (0..4).map(|_| PeerId::random()).collect();
        let mut book = AuditBook::default();
        for i in 0..20 {
            book.on_call(p[0], i % 7 != 0);
            book.on_audit(p[0], true);
        }
        book.on_audit(p[1], false);
        book.convict(p[1]);
        book.on_cross_check(p[2], false, true);
        book.on_cross_check(p[2], false, false);
        book.on_cross_check(p[2], false, true);
        let same = CrossCheck {
            compared: 1,
            ..CrossCheck::default()
        };
        let near = CrossCheck {
            near_ties: 1,
            ..same
        };
        book.on_token_tie(p[3], p[0], &same);
        book.on_token_tie(p[3], p[2], &near);
        (book, p)
    }

    #[test]
    fn a_saved_book_reads_back_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let file = BookFile::new(dir.path().join("gateway/audits.json"));
        // No file yet: an empty book.
        assert_eq!(
            file.load().unwrap().snapshot(),
            AuditBook::default().snapshot()
        );
        let (book, p) = busy_book();
        assert!(book.is_convicted(&p[1]) && book.is_doubted(&p[2]));
        file.save(&book).unwrap();
        let back = file.load().unwrap();
        assert_eq!(back.snapshot(), book.snapshot());
        assert!(back.is_convicted(&p[1]));
        assert_eq!(back.verdicts(), vec![p[1]]);
        assert_eq!(back.doubted(), vec![p[2]]);
        assert_eq!(back.record(&p[0]), book.record(&p[0]));
        assert_eq!(back.band_record(&p[2], false).misses, 2);
        assert_eq!(back.tie_counts(&p[3]), book.tie_counts(&p[3]));
        assert_eq!(back.tie_counts(&p[3]).near_ties, 1);
        // A later copy replaces the file; an older one (the saver's, coming after the final
        // save) does not. No temporary files are left beside it.
        let mut later = book.clone();
        later.convict(p[0]);
        file.save(&later).unwrap();
        file.save(&book).unwrap();
        assert!(file.load().unwrap().is_convicted(&p[0]));
        // A temporary file a killed writer left is removed at the next start.
        std::fs::write(dir.path().join("gateway/.audits.json.left"), b"{").unwrap();
        BookFile::new(dir.path().join("gateway/audits.json"))
            .load()
            .unwrap();
        let names: Vec<_> = std::fs::read_dir(dir.path().join("gateway"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("audits.json")]);
    }

    #[test]
    fn a_damaged_or_foreign_book_is_refused_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audits.json");
        let file = BookFile::new(&path);
        let refused = |bytes: &[u8]| {
            std::fs::write(&path, bytes).unwrap();
            let e = file.load().unwrap_err().to_string();
            assert!(e.contains(&path.display().to_string()), "{e}");
            e
        };
        let (book, _) = busy_book();
        let good = serde_json::to_string(&book.snapshot()).unwrap();
        // Truncated mid-write by something else than the saver.
        refused(&good.as_bytes()[..good.len() / 2]);
        // Another format.
        let mut other = book.snapshot();
        other.format = 2;
        let e = refused(&serde_json::to_vec(&other).unwrap());
        assert!(e.contains("format 2"), "{e}");
        // A peer id that is not one.
        let mut bad = book.snapshot();
        bad.convicted.push("not-a-peer".into());
        let e = refused(&serde_json::to_vec(&bad).unwrap());
        assert!(e.contains("not-a-peer"), "{e}");
        // A peer convicted twice.
        let mut twice = book.snapshot();
        twice.convicted.push(twice.convicted[0].clone());
        let e = refused(&serde_json::to_vec(&twice).unwrap());
        assert!(e.contains("convicted twice"), "{e}");
        // Counts no gateway records: more misses than comparisons (its tail would be 0, a
        // conviction at the next miss), or values that would overflow a sum.
        let mut misses = book.snapshot();
        misses.band[0].record.misses = misses.band[0].record.comparisons + 1;
        refused(&serde_json::to_vec(&misses).unwrap());
        let mut huge = book.snapshot();
        huge.records.values_mut().next().unwrap().calls = u64::MAX;
        refused(&serde_json::to_vec(&huge).unwrap());
        // Near ties of a convicted node (a conviction drops them).
        let mut ties = book.snapshot();
        ties.convicted.push(ties.ties[0].provider.clone());
        let e = refused(&serde_json::to_vec(&ties).unwrap());
        assert!(e.contains("convicted"), "{e}");
    }

    #[test]
    fn verdicts_are_saved_at_once_records_within_ten_seconds() {
        let (mut book, p) = busy_book();
        let saved = book.changes();
        assert!(!due(saved, book.changes(), Duration::from_secs(60)));
        book.on_call(p[0], true);
        assert!(!due(saved, book.changes(), Duration::from_secs(1)));
        assert!(due(saved, book.changes(), SAVE_RECORDS_EVERY));
        let saved = book.changes();
        book.convict(p[0]);
        assert!(due(saved, book.changes(), Duration::ZERO));
        // A doubt that starts or clears is a verdict; a comparison that changes none is not.
        let saved = book.changes();
        book.on_cross_check(p[3], false, false);
        assert_eq!(book.changes().verdicts, saved.verdicts);
        book.on_cross_check(p[3], false, true);
        book.on_cross_check(p[3], false, true);
        assert!(book.is_doubted(&p[3]));
        assert!(due(saved, book.changes(), Duration::ZERO));
    }
}
