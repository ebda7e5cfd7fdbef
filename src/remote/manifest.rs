//! The committed state of one remote archive: its segments (immutable
//! objects holding the archive's bytes between two commit points) and its
//! central directory.
//!
//! Stored form (format 2): `@manifest.json` is small — the generation, the
//! end, and a list of *packs*: immutable objects `@pack/…`, each holding the
//! segments and entries of one range of the archive. A commit uploads its
//! segment and one level-0 pack with just that segment's entries, then
//! replaces the manifest (conditional put) with the pack appended; when
//! [`FANOUT`] packs of one level end the list, they are merged into one pack
//! of the next level (a log-structured merge), so the manifest lists at most
//! `(FANOUT - 1)` packs per level and every entry is rewritten at most
//! `log_FANOUT(frames)` times: the bytes a commit uploads are proportional
//! to its frame (amortized; a merge commit writes the merged range once),
//! never to the archive. Format 1 (`gtar-logd-remote/1`, everything inline
//! in the manifest) is still read; the first commit onto it stores its
//! contents as one base pack.
//!
//! Invariants:
//! * Segments are contiguous from offset 0 and end at `end`; each is the
//!   exact bytes of the local file between two commit points, so their
//!   concatenation holds only whole transactions.
//! * Every entry lies inside `[0, end)`: a reader of the manifest never sees
//!   a partial frame, and `segments ++ tail()` is a valid zip64 GTAR.
//! * Packs are immutable and uploaded before the manifest that lists them;
//!   their keys are never reused (a nonce), so a pack a manifest lists always
//!   has the content that manifest was committed with. The packs a manifest
//!   lists cover its segments and entries exactly, in order.

use serde::{Deserialize, Serialize};

use gtar::{CentralEntry, Entry, Index};

/// The `format` field of manifests this version writes.
pub const FORMAT: &str = "gtar-logd-remote/2";
/// The format of the first version (everything inline), still read.
pub const FORMAT_V1: &str = "gtar-logd-remote/1";
/// Directory of an archive's packs.
pub const PACKS: &str = "@pack";
/// Packs of one level merged into one of the next level.
pub const FANOUT: usize = 8;
/// The level of a pack made from a format-1 manifest's contents: above any
/// merge, so it is never rewritten.
const BASE_LEVEL: u32 = u32::MAX;

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

/// One pack the manifest lists: its key (relative to the archive's
/// directory), its level, and how many segments and entries it holds (the
/// next ones in order).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PackRef {
    #[serde(rename = "k")]
    pub key: String,
    #[serde(rename = "l")]
    pub level: u32,
    #[serde(rename = "s")]
    pub segments: usize,
    #[serde(rename = "e")]
    pub entries: usize,
}

/// The body of a pack object.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Pack {
    pub segments: Vec<Segment>,
    pub entries: Vec<RemoteEntry>,
}

impl Pack {
    pub fn parse(bytes: &[u8]) -> Result<Pack, String> {
        serde_json::from_slice(bytes).map_err(|e| format!("unreadable pack: {e}"))
    }

    fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a pack serializes")
    }
}

/// `@manifest.json` as stored.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Stored {
    pub format: String,
    /// Chosen when the remote archive is (re)started from offset 0 (first
    /// upload, or the local archive was replaced); segment and pack keys
    /// carry it, so a new generation never overwrites an older one's objects.
    pub generation: String,
    pub end: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub packs: Vec<PackRef>,
    /// Format 1 only: the contents inline.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub segments: Vec<Segment>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub entries: Vec<RemoteEntry>,
}

impl Stored {
    pub fn parse(bytes: &[u8]) -> Result<Stored, String> {
        let s: Stored =
            serde_json::from_slice(bytes).map_err(|e| format!("unreadable manifest: {e}"))?;
        match s.format.as_str() {
            FORMAT if s.segments.is_empty() && s.entries.is_empty() => Ok(s),
            FORMAT_V1 if s.packs.is_empty() => Ok(s),
            FORMAT | FORMAT_V1 => Err(format!(
                "manifest format {:?} with packs and inline contents",
                s.format
            )),
            f => Err(format!(
                "manifest format {f:?}, this gtar-logd reads {FORMAT:?} and {FORMAT_V1:?}"
            )),
        }
    }
}

/// The committed state, assembled (what readers and the replicator use).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub generation: String,
    pub end: u64,
    pub segments: Vec<Segment>,
    pub entries: Vec<RemoteEntry>,
    /// How it is stored; empty while the contents come from a format-1
    /// manifest (stored as a base pack by the next commit).
    pub packs: Vec<PackRef>,
}

/// What one commit uploads, in order: the packs, then the manifest (with a
/// conditional put).
#[derive(Debug, Default)]
pub struct Commit {
    /// (key relative to the archive's directory, body).
    pub packs: Vec<(String, Vec<u8>)>,
    pub manifest: Vec<u8>,
    /// Packs an earlier manifest listed and this one no longer does (merged):
    /// deleted once readers of the earlier manifest are unlikely to need them.
    pub retired: Vec<String>,
}

impl Commit {
    /// Bytes of metadata this commit uploads (packs and the manifest).
    pub fn bytes(&self) -> usize {
        self.manifest.len() + self.packs.iter().map(|p| p.1.len()).sum::<usize>()
    }
}

impl Manifest {
    pub fn new(generation: String) -> Manifest {
        Manifest {
            generation,
            end: 0,
            segments: Vec::new(),
            entries: Vec::new(),
            packs: Vec::new(),
        }
    }

    /// The manifest `stored` lists, given the bodies of its packs in order.
    pub fn assemble(stored: Stored, packs: &[&Pack]) -> Result<Manifest, String> {
        let mut m = Manifest {
            generation: stored.generation,
            end: stored.end,
            segments: stored.segments,
            entries: stored.entries,
            packs: stored.packs,
        };
        if packs.len() != m.packs.len() {
            return Err(format!(
                "manifest lists {} packs, {} given",
                m.packs.len(),
                packs.len()
            ));
        }
        for (r, p) in m.packs.iter().zip(packs) {
            if p.segments.len() != r.segments || p.entries.len() != r.entries {
                return Err(format!(
                    "pack {} holds {} segments and {} entries, the manifest says {} and {}",
                    r.key,
                    p.segments.len(),
                    p.entries.len(),
                    r.segments,
                    r.entries
                ));
            }
            m.segments.extend(p.segments.iter().cloned());
            m.entries.extend(p.entries.iter().cloned());
        }
        m.check()?;
        Ok(m)
    }

    /// The stored manifest (format 2), as JSON.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(&Stored {
            format: FORMAT.into(),
            generation: self.generation.clone(),
            end: self.end,
            packs: self.packs.clone(),
            segments: Vec::new(),
            entries: Vec::new(),
        })
        .expect("a manifest serializes")
    }

    /// The invariants of the module docs.
    pub fn check(&self) -> Result<(), String> {
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

    /// Segments and entries the packs hold.
    fn packed(&self) -> (usize, usize) {
        self.packs
            .iter()
            .fold((0, 0), |(s, e), p| (s + p.segments, e + p.entries))
    }

    /// A new pack of `level` holding segments `s0..` and entries `e0..`.
    fn pack(&self, level: u32, s0: usize, e0: usize, nonce: &str) -> (PackRef, Vec<u8>) {
        let body = Pack {
            segments: self.segments[s0..].to_vec(),
            entries: self.entries[e0..].to_vec(),
        };
        let lv = if level == BASE_LEVEL {
            "base".to_string()
        } else {
            level.to_string()
        };
        let r = PackRef {
            key: format!("{PACKS}/{}-{:020}-{lv}-{nonce}", self.generation, self.end),
            level,
            segments: body.segments.len(),
            entries: body.entries.len(),
        };
        (r, body.to_json())
    }

    /// Add a segment of `len` bytes at `end` holding `entries`; returns the
    /// objects to upload to commit it. `nonce` makes this commit's pack keys
    /// unique (never the key of a pack written before, by any daemon).
    pub fn push(
        &mut self,
        key: String,
        len: u64,
        entries: Vec<RemoteEntry>,
        nonce: &str,
    ) -> Commit {
        let mut made: Vec<(PackRef, Vec<u8>)> = Vec::new();
        let mut retired = Vec::new();
        let (s0, e0) = self.packed();
        if s0 < self.segments.len() || e0 < self.entries.len() {
            // Format-1 contents: stored as one base pack, never merged.
            let p = self.pack(BASE_LEVEL, s0, e0, nonce);
            self.packs.push(p.0.clone());
            made.push(p);
        }
        let (s0, e0) = (self.segments.len(), self.entries.len());
        self.segments.push(Segment {
            offset: self.end,
            len,
            key,
        });
        self.end += len;
        self.entries.extend(entries);
        let p = self.pack(0, s0, e0, nonce);
        self.packs.push(p.0.clone());
        made.push(p);
        loop {
            let n = self.packs.len();
            if n < FANOUT {
                break;
            }
            let level = self.packs[n - 1].level;
            if level == BASE_LEVEL || self.packs[n - FANOUT..].iter().any(|p| p.level != level) {
                break;
            }
            for old in self.packs.split_off(n - FANOUT) {
                match made.iter().position(|m| m.0.key == old.key) {
                    Some(i) => {
                        made.remove(i); // never uploaded
                    }
                    None => retired.push(old.key),
                }
            }
            let (s0, e0) = self.packed();
            let p = self.pack(level + 1, s0, e0, nonce);
            self.packs.push(p.0.clone());
            made.push(p);
        }
        Commit {
            packs: made.into_iter().map(|(r, b)| (r.key, b)).collect(),
            manifest: self.to_json(),
            retired,
        }
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
    use std::collections::HashMap;

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

    /// Read `m` back as a reader does: the stored manifest, then its packs
    /// from `objects` (every pack ever uploaded).
    fn reread(m: &Manifest, objects: &HashMap<String, Vec<u8>>) -> Manifest {
        let stored = Stored::parse(&m.to_json()).unwrap();
        let packs: Vec<Pack> = stored
            .packs
            .iter()
            .map(|r| Pack::parse(&objects[&r.key]).unwrap())
            .collect();
        Manifest::assemble(stored, &packs.iter().collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn segments_must_be_contiguous_and_hold_their_entries() {
        let mut m = Manifest::new("g".into());
        let mut objects = HashMap::new();
        objects.extend(m.push("s0".into(), 100, vec![entry("a", 0, 10)], "n").packs);
        objects.extend(
            m.push("s1".into(), 50, vec![entry("b", 100, 10)], "n")
                .packs,
        );
        assert_eq!(m.end, 150);
        assert_eq!(reread(&m, &objects), m);
        let mut gap = m.clone();
        gap.segments[1].offset = 101;
        assert!(gap.check().unwrap_err().contains("does not follow"));
        let mut past = m.clone();
        past.entries.push(entry("c", 140, 10));
        assert!(past.check().unwrap_err().contains("runs past"));
        let mut other = Stored::parse(&m.to_json()).unwrap();
        other.format = "x".into();
        assert!(Stored::parse(&serde_json::to_vec(&other).unwrap()).is_err());
    }

    /// A pack the manifest lists with other counts than it holds is refused.
    #[test]
    fn a_pack_that_does_not_match_its_reference_is_refused() {
        let mut m = Manifest::new("g".into());
        let c = m.push("s0".into(), 100, vec![entry("a", 0, 10)], "n");
        let stored = Stored::parse(&c.manifest).unwrap();
        let empty = Pack::default();
        let err = Manifest::assemble(stored, &[&empty]).unwrap_err();
        assert!(err.contains("the manifest says"), "{err}");
    }

    /// Format 1 (everything inline) is read, and the first commit onto it
    /// stores its contents as a base pack.
    #[test]
    fn format_1_is_read_and_continued() {
        let v1 = serde_json::json!({
            "format": FORMAT_V1, "generation": "g", "end": 100,
            "segments": [{"offset": 0, "len": 100, "key": "@seg/g-0"}],
            "entries": [{"name": "a", "method": 0, "flags": 0, "crc32": 1, "csize": 10,
                         "usize": 10, "offset": 0}],
        });
        let stored = Stored::parse(&serde_json::to_vec(&v1).unwrap()).unwrap();
        let mut m = Manifest::assemble(stored, &[]).unwrap();
        assert_eq!((m.end, m.entries.len(), m.packs.len()), (100, 1, 0));
        let c = m.push("s1".into(), 50, vec![entry("b", 100, 10)], "n");
        assert_eq!(c.packs.len(), 2, "a base pack and the commit's");
        let objects: HashMap<_, _> = c.packs.into_iter().collect();
        let back = reread(&m, &objects);
        assert_eq!(back.entries.len(), 2);
        assert_eq!(back, m);
    }

    /// The metadata a commit uploads grows with the frame, not with the
    /// archive: at 10,000 frames a commit uploads (amortized) a few times
    /// what it uploads at 10 (format 1 uploaded the whole directory, ~1000×).
    /// Merged packs stay readable and every state reads back whole.
    #[test]
    fn commit_cost_is_proportional_to_the_frame_not_the_archive() {
        let mut m = Manifest::new("18c0ffee00001".into());
        let mut objects = HashMap::new();
        let mut bytes = Vec::new();
        let frame = |k: u64| -> Vec<RemoteEntry> {
            (0..4)
                .map(|t| {
                    entry(
                        &format!("frame/{k}/model/w{t}.f32.uni"),
                        k * 1000 + t * 200,
                        100,
                    )
                })
                .collect()
        };
        for k in 0..10_000u64 {
            let c = m.push(
                format!("@seg/g-{:020}", k * 1000),
                1000,
                frame(k),
                &format!("{k:x}"),
            );
            bytes.push(c.bytes());
            for r in &c.retired {
                assert!(
                    objects.contains_key(r),
                    "a retired pack was uploaded before"
                );
            }
            objects.extend(c.packs);
            if k % 997 == 0 || k == 9_999 {
                assert_eq!(reread(&m, &objects), m, "after {k} frames");
            }
            assert!(
                m.packs.len() <= (FANOUT - 1) * 6 + 1,
                "{} packs",
                m.packs.len()
            );
        }
        let mean = |r: std::ops::Range<usize>| {
            bytes[r.clone()].iter().sum::<usize>() as f64 / r.len() as f64
        };
        let at10 = mean(0..10);
        let at10k = mean(10_000 - 4096..10_000);
        let v1_at10k = serde_json::to_vec(&m.entries).unwrap().len() as f64;
        println!(
            "metadata bytes per commit: {at10:.0} at 10 frames, {at10k:.0} at 10,000 \
             (format 1: {v1_at10k:.0}); ratio {:.2}",
            at10k / at10
        );
        assert!(at10k < 8.0 * at10, "{at10k} vs {at10}");
    }
}
