//! The committed state of one remote archive: its segments (immutable
//! objects holding the archive's bytes between two commit points) and its
//! central directory, as one small JSON object replaced by a conditional put.
//!
//! Invariants:
//! * Segments are contiguous from offset 0 and end at `end`; each is the
//!   exact bytes of the local file between two commit points, so their
//!   concatenation holds only whole transactions.
//! * Every entry lies inside `[0, end)`: a reader of the manifest never sees
//!   a partial frame, and `segments ++ tail()` is a valid zip64 GTAR.

use serde::{Deserialize, Serialize};

use gtar::{CentralEntry, Entry, Index};

/// The `format` field of manifests this version writes and reads.
pub const FORMAT: &str = "gtar-logd-remote/1";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Segment {
    /// Where the segment's bytes sit in the archive.
    pub offset: u64,
    pub len: u64,
    /// The object's key relative to the archive's directory.
    pub key: String,
}

/// One zip entry (a central-directory record and where its data starts).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RemoteEntry {
    pub name: String,
    pub method: u16,
    pub flags: u16,
    pub crc32: u32,
    pub csize: u64,
    pub usize: u64,
    /// Offset of the local header.
    pub offset: u64,
    /// Offset of the data, when known (saves a read of the local header).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<u64>,
}

impl From<&Entry> for RemoteEntry {
    fn from(e: &Entry) -> RemoteEntry {
        RemoteEntry {
            name: e.cd.name.clone(),
            method: e.cd.method,
            flags: e.cd.flags,
            crc32: e.cd.crc32,
            csize: e.cd.compressed_size,
            usize: e.cd.uncompressed_size,
            offset: e.cd.local_header_offset,
            data: e.data_offset,
        }
    }
}

impl RemoteEntry {
    fn central(&self) -> CentralEntry {
        CentralEntry {
            name: self.name.clone(),
            method: self.method,
            flags: self.flags,
            crc32: self.crc32,
            compressed_size: self.csize,
            uncompressed_size: self.usize,
            local_header_offset: self.offset,
        }
    }

    /// The same entry, as the local index has it (data offset aside).
    pub fn same(&self, e: &Entry) -> bool {
        self.name == e.cd.name
            && self.offset == e.cd.local_header_offset
            && self.crc32 == e.cd.crc32
            && self.csize == e.cd.compressed_size
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Manifest {
    pub format: String,
    /// Chosen when the remote archive is (re)started from offset 0 (first
    /// upload, or the local archive was replaced); segment keys carry it, so
    /// a new generation never overwrites a segment an older manifest lists.
    pub generation: String,
    pub end: u64,
    pub segments: Vec<Segment>,
    pub entries: Vec<RemoteEntry>,
}

impl Manifest {
    pub fn new(generation: String) -> Manifest {
        Manifest {
            format: FORMAT.into(),
            generation,
            end: 0,
            segments: Vec::new(),
            entries: Vec::new(),
        }
    }

    pub fn parse(bytes: &[u8]) -> Result<Manifest, String> {
        let m: Manifest =
            serde_json::from_slice(bytes).map_err(|e| format!("unreadable manifest: {e}"))?;
        m.check()?;
        Ok(m)
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a manifest serializes")
    }

    /// The invariants of the module docs.
    pub fn check(&self) -> Result<(), String> {
        if self.format != FORMAT {
            return Err(format!(
                "manifest format {:?}, this gtar-logd reads {FORMAT:?}",
                self.format
            ));
        }
        let mut at = 0;
        for s in &self.segments {
            if s.offset != at || s.len == 0 {
                return Err(format!(
                    "manifest: segment {} at {} does not follow the previous one (ends at {at})",
                    s.key, s.offset
                ));
            }
            at += s.len;
        }
        if at != self.end {
            return Err(format!(
                "manifest: segments end at {at}, the manifest says {}",
                self.end
            ));
        }
        for e in &self.entries {
            if e.offset.saturating_add(30 + e.csize) > self.end {
                return Err(format!("manifest: entry {} runs past the end", e.name));
            }
        }
        Ok(())
    }

    /// Add a segment of `len` bytes at `end` holding `entries`.
    pub fn push(&mut self, key: String, len: u64, entries: Vec<RemoteEntry>) {
        self.segments.push(Segment {
            offset: self.end,
            len,
            key,
        });
        self.end += len;
        self.entries.extend(entries);
    }

    /// The archive's index, as a reader of the materialized zip sees it.
    pub fn index(&self) -> Index {
        let mut ix = Index::new();
        for e in &self.entries {
            ix.push(Entry {
                cd: e.central(),
                data_offset: e.data,
            });
        }
        ix
    }

    /// Central directory and end records that follow the segments.
    pub fn tail(&self) -> Vec<u8> {
        let cds: Vec<CentralEntry> = self.entries.iter().map(RemoteEntry::central).collect();
        gtar::encode_tail(&cds, self.end)
    }

    /// Size of the materialized archive.
    pub fn size(&self) -> u64 {
        self.end + self.tail().len() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, offset: u64, csize: u64) -> RemoteEntry {
        RemoteEntry {
            name: name.into(),
            method: 0,
            flags: 0,
            crc32: 1,
            csize,
            usize: csize,
            offset,
            data: None,
        }
    }

    #[test]
    fn segments_must_be_contiguous_and_hold_their_entries() {
        let mut m = Manifest::new("g".into());
        m.push("s0".into(), 100, vec![entry("a", 0, 10)]);
        m.push("s1".into(), 50, vec![entry("b", 100, 10)]);
        assert_eq!(m.end, 150);
        let back = Manifest::parse(&m.to_json()).unwrap();
        assert_eq!(back, m);
        let mut gap = m.clone();
        gap.segments[1].offset = 101;
        assert!(gap.check().unwrap_err().contains("does not follow"));
        let mut past = m.clone();
        past.entries.push(entry("c", 140, 10));
        assert!(past.check().unwrap_err().contains("runs past"));
        let mut other = m;
        other.format = "x".into();
        assert!(Manifest::parse(&other.to_json()).is_err());
    }
}
