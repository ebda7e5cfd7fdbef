//! The local journal of multipart uploads in progress, so a restart can
//! abort what a `kill -9` left on the server (object_store can abort an
//! upload by id but not list them, and S3 servers differ in
//! ListMultipartUploads; the journal works with any).
//!
//! Invariants:
//! * `<archive>.gtar-uploads` (next to the archive, one JSON line per
//!   upload: its key and id) lists every multipart upload of the archive's
//!   replicator that may be incomplete: an id is appended and fdatasynced
//!   before the upload's first part is sent, and removed only once the
//!   upload is completed or aborted.
//! * When the replicator starts it aborts every upload the journal lists;
//!   so an incomplete upload outlives a crash only until the next start.
//!   A node lost with its disk takes the journal along: for that a bucket
//!   lifecycle rule (AbortIncompleteMultipartUpload) is the cleanup.
//! * A torn last line (a crash mid-append) is skipped: its upload never
//!   sent a part.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Pending {
    pub key: String,
    pub id: String,
}

#[derive(Debug, Clone)]
pub struct Journal {
    path: PathBuf,
}

impl Journal {
    /// The journal of the archive at `archive`.
    pub fn of(archive: &Path) -> Journal {
        let mut p = archive.as_os_str().to_owned();
        p.push(".gtar-uploads");
        Journal { path: p.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The uploads listed (none when there is no journal).
    pub fn read(&self) -> std::io::Result<Vec<Pending>> {
        match std::fs::read(&self.path) {
            Ok(b) => Ok(b
                .split(|c| *c == b'\n')
                .filter_map(|l| serde_json::from_slice(l).ok())
                .collect()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    /// List `p`, durably, before any part of it is sent.
    pub fn add(&self, p: &Pending) -> std::io::Result<()> {
        let created = !self.path.exists();
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        let mut line = serde_json::to_vec(p).expect("serializes");
        line.push(b'\n');
        f.write_all(&line)?;
        f.sync_data()?;
        if created {
            if let Some(dir) = self.path.parent() {
                std::fs::File::open(dir)?.sync_all()?;
            }
        }
        Ok(())
    }

    /// Stop listing the upload `id` (completed or aborted). Not synced: an
    /// entry that comes back after a power loss is only aborted once more.
    pub fn remove(&self, id: &str) -> std::io::Result<()> {
        let keep: Vec<Pending> = self.read()?.into_iter().filter(|p| p.id != id).collect();
        if keep.is_empty() {
            return match std::fs::remove_file(&self.path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            };
        }
        let mut tmp = self.path.as_os_str().to_owned();
        tmp.push(".tmp");
        let mut body = Vec::new();
        for p in &keep {
            body.extend(serde_json::to_vec(p).expect("serializes"));
            body.push(b'\n');
        }
        std::fs::write(&tmp, body)?;
        std::fs::rename(&tmp, &self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_read_remove_and_a_torn_line() {
        let dir = std::env::temp_dir().join(format!("gtar-journal-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let j = Journal::of(&dir.join("a.zip"));
        assert_eq!(j.read().unwrap(), vec![]);
        let p = |id: &str| Pending {
            key: "r/a.zip/@seg/x".into(),
            id: id.into(),
        };
        j.add(&p("1")).unwrap();
        j.add(&p("2")).unwrap();
        std::fs::OpenOptions::new()
            .append(true)
            .open(j.path())
            .unwrap()
            .write_all(b"{\"key\":\"r/a")
            .unwrap();
        assert_eq!(j.read().unwrap(), vec![p("1"), p("2")]);
        j.remove("1").unwrap();
        assert_eq!(j.read().unwrap(), vec![p("2")]);
        j.remove("2").unwrap();
        assert!(!j.path().exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
