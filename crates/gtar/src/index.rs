//! The in-memory index of an archive: entries in archive order, the last
//! entry of each name, and record types → frames → entry.
//!
//! Invariants:
//! * When a name occurs more than once, the entry that comes later in the
//!   archive wins, as in libgetar (`ZipArchive::fillPathMap` overwrites its
//!   map in central-directory order).
//! * A frame is replaced as a whole ([`Index::push_txn`]): a transaction that
//!   holds a frame marker — a discrete record in group `{P/}`[`FRAME_MARKER_GROUP`]
//!   at index `F` — supersedes every discrete entry at `F` under group `P`
//!   from earlier transactions (except those under a deeper prefix `Q` that
//!   has frame markers of its own: another stream's group). Superseded
//!   entries leave the index, so the central directory written from it does
//!   not list them: libgetar and every reader see exactly the new frame, and
//!   the old bytes stay in the file as dead space. Recovery (`scan`) builds
//!   its result through the same method, so a crash cannot bring them back.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::path::{index_cmp, Behavior, FrameIndex, RecordPath, RecordType};
use crate::zipfmt::*;

/// One zip entry and where its data lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub cd: CentralEntry,
    /// Offset of the (possibly compressed) data, when known without reading
    /// the local header again (entries we wrote or scanned).
    pub data_offset: Option<u64>,
}

impl Entry {
    pub fn name(&self) -> &str {
        &self.cd.name
    }
    pub fn size(&self) -> u64 {
        self.cd.uncompressed_size
    }
}

/// Records and frames of one archive.
#[derive(Debug, Default)]
pub struct Index {
    entries: Vec<Entry>,
    by_name: HashMap<String, usize>,
    records: BTreeMap<RecordType, BTreeMap<FrameIndex, usize>>,
    /// Prefixes `P` with frame markers (`{P/}gtar_logd` groups), any index.
    markers: BTreeSet<String>,
    /// What reads learned about the entries (not carried over by `clone`).
    learned: Learned,
}

/// A cloned index starts knowing nothing: it may come to describe another
/// file (a compaction's output), where the same offsets hold other entries.
impl Clone for Index {
    fn clone(&self) -> Index {
        Index {
            entries: self.entries.clone(),
            by_name: self.by_name.clone(),
            records: self.records.clone(),
            markers: self.markers.clone(),
            learned: Learned::default(),
        }
    }
}

/// Entries at most this large are kept in memory once read
/// ([`crate::Archive::read_small`]).
pub const SMALL_ENTRY_MAX: u64 = 64 << 10;
/// The bytes kept per archive at most; when full, they start over.
const SMALL_BUDGET: usize = 4 << 20;
/// Data offsets kept per archive at most; when full, they start over.
const OFFSETS_MAX: usize = 1 << 20;

/// What reading an archive taught about its committed entries: the bytes
/// of small ones (manifests, shapes) and where each one's data starts (an
/// index read from a central directory knows only the local header's
/// offset, and the data follows a header of variable length). Keyed by
/// local header offset (and CRC-32 for bytes): a committed entry never
/// changes in place — the file is append-only and only uncommitted bytes
/// are ever cut off — so what was learned stays right for the life of the
/// file this index describes. A tensor history, which visits every frame's
/// manifest and tensor, then touches the file (or the object store) only
/// for the tensors' bytes from the second time on.
///
/// Clones share what is learned (an [`Index`]'s clone does not: see there).
#[derive(Clone, Default)]
pub struct Learned(std::sync::Arc<std::sync::Mutex<LearnedMaps>>);

#[derive(Default)]
struct LearnedMaps {
    small_bytes: usize,
    small: HashMap<(u64, u32), std::sync::Arc<[u8]>>,
    data_offsets: HashMap<u64, u64>,
}

impl std::fmt::Debug for Learned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Learned")
    }
}

impl Learned {
    fn lock(&self) -> std::sync::MutexGuard<'_, LearnedMaps> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `e`'s bytes, if kept.
    pub fn bytes(&self, e: &Entry) -> Option<std::sync::Arc<[u8]>> {
        let key = (e.cd.local_header_offset, e.cd.crc32);
        self.lock().small.get(&key).cloned()
    }

    /// Keep `bytes` (already checked against `e`'s CRC) if `e` is small.
    pub fn keep_bytes(&self, e: &Entry, bytes: std::sync::Arc<[u8]>) {
        if e.size() > SMALL_ENTRY_MAX {
            return;
        }
        let mut m = self.lock();
        if m.small_bytes + bytes.len() > SMALL_BUDGET {
            m.small.clear();
            m.small_bytes = 0;
        }
        m.small_bytes += bytes.len();
        let key = (e.cd.local_header_offset, e.cd.crc32);
        if let Some(old) = m.small.insert(key, bytes) {
            m.small_bytes -= old.len();
        }
    }

    /// Where `e`'s data starts, if known.
    pub fn data_offset(&self, e: &Entry) -> Option<u64> {
        e.data_offset.or_else(|| {
            self.lock()
                .data_offsets
                .get(&e.cd.local_header_offset)
                .copied()
        })
    }

    /// Remember where `e`'s data starts (read from its local header).
    pub fn keep_data_offset(&self, e: &Entry, at: u64) {
        let mut m = self.lock();
        if m.data_offsets.len() >= OFFSETS_MAX {
            m.data_offsets.clear();
        }
        m.data_offsets.insert(e.cd.local_header_offset, at);
    }
}

/// Group name (the last component) of the record that marks a frame written
/// as a whole (gtar-logd's manifest); see the module docs for the rule.
/// Named here, not in the daemon, because recovery applies the rule too.
pub const FRAME_MARKER_GROUP: &str = "gtar_logd";

/// The prefix `P` a frame-marker group `{P/}gtar_logd` marks.
fn marker_prefix(group: &str) -> Option<&str> {
    if group == FRAME_MARKER_GROUP {
        return Some("");
    }
    group.strip_suffix(FRAME_MARKER_GROUP)?.strip_suffix('/')
}

impl Index {
    pub fn new() -> Index {
        Index::default()
    }

    /// What reads learned about the entries (see [`Learned`]).
    pub fn learned(&self) -> &Learned {
        &self.learned
    }

    /// Add an entry that comes after every entry already indexed.
    pub fn push(&mut self, e: Entry) {
        let i = self.entries.len();
        let rp = RecordPath::parse(e.name());
        if rp.rtype.behavior == Behavior::Discrete {
            if let Some(p) = marker_prefix(&rp.rtype.group) {
                if !self.markers.contains(p) {
                    self.markers.insert(p.to_string());
                }
            }
        }
        self.by_name.insert(e.cd.name.clone(), i);
        self.records
            .entry(rp.rtype)
            .or_default()
            .insert(FrameIndex(rp.index), i);
        self.entries.push(e);
    }

    /// Add the entries of one committed transaction, which come after every
    /// entry already indexed, replacing the frames it marks (module docs).
    /// Returns how many earlier entries were superseded.
    pub fn push_txn(&mut self, txn: Vec<Entry>) -> usize {
        let mut replaced: Vec<(String, String)> = Vec::new();
        for e in &txn {
            let rp = RecordPath::parse(e.name());
            if rp.rtype.behavior != Behavior::Discrete {
                continue;
            }
            if let Some(p) = marker_prefix(&rp.rtype.group) {
                // Only when the frame exists already: a new frame (the usual
                // case) costs one lookup, not a pass over the archive.
                if self.records_at(Some(p), &rp.index).next().is_some() {
                    replaced.push((p.to_string(), rp.index));
                }
            }
        }
        let mut gone = 0;
        if !replaced.is_empty() {
            let mut markers = self.markers.clone();
            for e in &txn {
                let rp = RecordPath::parse(e.name());
                if let Some(p) = marker_prefix(&rp.rtype.group) {
                    markers.insert(p.to_string());
                }
            }
            let old = std::mem::take(&mut self.entries);
            let n = old.len();
            self.by_name.clear();
            self.records.clear();
            self.markers.clear();
            for e in old {
                if !superseded(&e, &replaced, &markers) {
                    self.push(e);
                }
            }
            gone = n - self.entries.len();
        }
        for e in txn {
            self.push(e);
        }
        gone
    }

    /// Every entry in archive order, duplicates included.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// Number of distinct names.
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entry that a read of `name` returns (the last one written).
    pub fn get(&self, name: &str) -> Option<&Entry> {
        self.by_name.get(name).map(|&i| &self.entries[i])
    }

    /// Record types in libgetar's order.
    pub fn record_types(&self) -> impl Iterator<Item = &RecordType> {
        self.records.keys()
    }

    /// Frame indices of a record type, in GETAR order.
    pub fn frames(&self, rt: &RecordType) -> Vec<&str> {
        self.records
            .get(rt)
            .map(|m| m.keys().map(|k| k.0.as_str()).collect())
            .unwrap_or_default()
    }

    /// Number of frames of a record type.
    pub fn frame_count(&self, rt: &RecordType) -> usize {
        self.records.get(rt).map_or(0, |m| m.len())
    }

    /// The entry of record type `rt` at `index`.
    pub fn record(&self, rt: &RecordType, index: &str) -> Option<&Entry> {
        self.records
            .get(rt)
            .and_then(|m| m.get(&FrameIndex(index.to_string())))
            .map(|&i| &self.entries[i])
    }

    /// Union of the frame indices of every discrete record whose group is
    /// `prefix` or lies under it (`None`: the whole archive), in GETAR order.
    pub fn frames_under(&self, prefix: Option<&str>) -> Vec<String> {
        let mut all: Vec<&str> = Vec::new();
        for (rt, frames) in &self.records {
            if rt.behavior == Behavior::Discrete && group_under(&rt.group, prefix) {
                all.extend(frames.keys().map(|k| k.0.as_str()));
            }
        }
        all.sort_by(|a, b| index_cmp(a, b));
        all.dedup();
        all.into_iter().map(str::to_string).collect()
    }

    /// Discrete record types at frame `index` under `prefix`.
    pub fn records_at<'a>(
        &'a self,
        prefix: Option<&'a str>,
        index: &'a str,
    ) -> impl Iterator<Item = (&'a RecordType, &'a Entry)> + 'a {
        let key = FrameIndex(index.to_string());
        self.records.iter().filter_map(move |(rt, frames)| {
            if rt.behavior != Behavior::Discrete || !group_under(&rt.group, prefix) {
                return None;
            }
            frames.get(&key).map(|&i| (rt, &self.entries[i]))
        })
    }
}

/// Is `e` part of a frame in `replaced` ((prefix, index) pairs)? Not when it
/// lies under a deeper prefix with frame markers of its own.
fn superseded(e: &Entry, replaced: &[(String, String)], markers: &BTreeSet<String>) -> bool {
    let rp = RecordPath::parse(e.name());
    if rp.rtype.behavior != Behavior::Discrete {
        return false;
    }
    let g = &rp.rtype.group;
    replaced.iter().any(|(p, i)| {
        *i == rp.index
            && group_under(g, Some(p))
            && !markers
                .iter()
                .any(|q| q.len() > p.len() && group_under(q, Some(p)) && group_under(g, Some(q)))
    })
}

/// Is `group` equal to `prefix` or below it?
pub fn group_under(group: &str, prefix: Option<&str>) -> bool {
    match prefix {
        None | Some("") => true,
        Some(p) => {
            group == p
                || (group.len() > p.len()
                    && group.starts_with(p)
                    && group.as_bytes()[p.len()] == b'/')
        }
    }
}

/// Parse `count` central headers; every entry must lie before `cd_offset`.
pub fn parse_central_directory(
    cd: &[u8],
    count: u64,
    cd_offset: u64,
) -> Result<Vec<Entry>, String> {
    let mut out = Vec::with_capacity(count as usize);
    let mut at = 0usize;
    for k in 0..count {
        let h = cd
            .get(at..at + CENTRAL_HEADER_LEN)
            .ok_or_else(|| format!("central directory ends at entry {k}"))?;
        if rd32(h, 0) != CENTRAL_SIG {
            return Err(format!("central directory entry {k} has a bad signature"));
        }
        let flags = rd16(h, 8);
        if flags & GP_ENCRYPTED != 0 {
            return Err(format!("central directory entry {k} is encrypted"));
        }
        let method = rd16(h, 10);
        let crc32 = rd32(h, 16);
        let c32 = rd32(h, 20);
        let u32_ = rd32(h, 24);
        let nlen = rd16(h, 28) as usize;
        let elen = rd16(h, 30) as usize;
        let clen = rd16(h, 32) as usize;
        let o32 = rd32(h, 42);
        let var = cd
            .get(at + CENTRAL_HEADER_LEN..at + CENTRAL_HEADER_LEN + nlen + elen + clen)
            .ok_or_else(|| format!("central directory entry {k} runs past the directory"))?;
        let name = std::str::from_utf8(&var[..nlen])
            .map_err(|_| format!("central directory entry {k} has a non-UTF-8 name"))?
            .to_string();
        let want = [u32_ == u32::MAX, c32 == u32::MAX, o32 == u32::MAX];
        let extra =
            parse_extra(&var[nlen..nlen + elen], want).map_err(|e| format!("{name}: {e}"))?;
        let z = extra.zip64.unwrap_or([None; 3]);
        let pick = |small: u32, big: Option<u64>, w: bool| -> Result<u64, String> {
            match (w, big) {
                (true, Some(v)) => Ok(v),
                (true, None) => Err(format!("{name}: zip64 value missing")),
                (false, _) => Ok(small as u64),
            }
        };
        let uncompressed_size = pick(u32_, z[0], want[0])?;
        let compressed_size = pick(c32, z[1], want[1])?;
        let local_header_offset = pick(o32, z[2], want[2])?;
        if method == METHOD_STORED && compressed_size != uncompressed_size {
            return Err(format!("{name}: stored entry with differing sizes"));
        }
        if local_header_offset
            .checked_add(LOCAL_HEADER_LEN as u64 + compressed_size)
            .is_none_or(|end| end > cd_offset)
        {
            return Err(format!(
                "{name}: entry data runs into the central directory"
            ));
        }
        out.push(Entry {
            cd: CentralEntry {
                name,
                method,
                flags,
                crc32,
                compressed_size,
                uncompressed_size,
                local_header_offset,
            },
            data_offset: None,
        });
        at += CENTRAL_HEADER_LEN + nlen + elen + clen;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::zipfmt::CentralEntry;

    fn entry(name: &str, off: u64) -> Entry {
        Entry {
            cd: CentralEntry {
                name: name.into(),
                method: 0,
                flags: 0,
                crc32: 0,
                compressed_size: 0,
                uncompressed_size: 0,
                local_header_offset: off,
            },
            data_offset: None,
        }
    }

    #[test]
    fn last_write_wins_and_frames_are_ordered() {
        let mut ix = Index::new();
        ix.push(entry("g/shape.u32.uni", 0));
        ix.push(entry("g/frames/10/w.f32.uni", 1));
        ix.push(entry("g/frames/9/w.f32.uni", 2));
        ix.push(entry("g/shape.u32.uni", 3));
        ix.push(entry("h/frames/2/w.f32.uni", 4));
        assert_eq!(ix.get("g/shape.u32.uni").unwrap().cd.local_header_offset, 3);
        assert_eq!(ix.len(), 4);
        assert_eq!(ix.entries().len(), 5);
        assert_eq!(ix.frames_under(Some("g")), vec!["9", "10"]);
        assert_eq!(ix.frames_under(None), vec!["2", "9", "10"]);
        assert!(ix.frames_under(Some("gg")).is_empty());
        assert_eq!(ix.records_at(None, "2").count(), 1);
    }

    #[test]
    fn a_marked_frame_replaces_the_old_one_as_a_whole() {
        let mut ix = Index::new();
        let txn = |names: &[&str], off: u64| -> Vec<Entry> {
            names.iter().map(|n| entry(n, off)).collect()
        };
        ix.push_txn(txn(
            &[
                "r/k/a/frames/5/w.f32.uni",
                "r/k/b/frames/5/v.f32.uni",
                "r/gtar_logd/frames/5/manifest.json",
            ],
            0,
        ));
        // Another group of the same archive, same index: not ours to replace.
        ix.push_txn(txn(
            &[
                "r/s/x/frames/5/w.f32.uni",
                "r/s/gtar_logd/frames/5/manifest.json",
            ],
            1,
        ));
        ix.push_txn(txn(
            &[
                "r/k/a/frames/6/w.f32.uni",
                "r/gtar_logd/frames/6/manifest.json",
            ],
            2,
        ));
        let gone = ix.push_txn(txn(
            &[
                "r/k/a/frames/5/w.f32.uni",
                "r/gtar_logd/frames/5/manifest.json",
            ],
            3,
        ));
        assert_eq!(gone, 3);
        let names: Vec<&str> = ix.entries().iter().map(|e| e.name()).collect();
        assert_eq!(
            names,
            [
                "r/s/x/frames/5/w.f32.uni",
                "r/s/gtar_logd/frames/5/manifest.json",
                "r/k/a/frames/6/w.f32.uni",
                "r/gtar_logd/frames/6/manifest.json",
                "r/k/a/frames/5/w.f32.uni",
                "r/gtar_logd/frames/5/manifest.json",
            ]
        );
        assert_eq!(ix.records_at(Some("r/k"), "5").count(), 1);
        assert_eq!(
            ix.get("r/k/a/frames/5/w.f32.uni")
                .unwrap()
                .cd
                .local_header_offset,
            3
        );
        // Without a marker (libgetar's own appends) the old rule stays:
        // the later entry of a name wins, the others stay.
        ix.push_txn(txn(&["r/k/b/frames/6/v.f32.uni"], 4));
        ix.push_txn(txn(&["r/k/a/frames/6/w.f32.uni"], 5));
        assert_eq!(ix.records_at(Some("r/k"), "6").count(), 2);
    }

    #[test]
    fn lookups_find_indices_whose_getar_and_byte_orders_differ() {
        // "10" sorts after "9" in GETAR order but before it bytewise; a map
        // keyed in GETAR order must not be searched in byte order.
        let mut ix = Index::new();
        for (k, f) in ["9", "10", "100", "a", "1"].iter().enumerate() {
            ix.push(entry(&format!("g/frames/{f}/w.f32.uni"), k as u64));
        }
        let rt = RecordPath::parse("g/frames/1/w.f32.uni").rtype;
        for (k, f) in ["9", "10", "100", "a", "1"].iter().enumerate() {
            let e = ix.record(&rt, f).unwrap_or_else(|| panic!("frame {f}"));
            assert_eq!(e.cd.local_header_offset, k as u64);
            assert_eq!(ix.records_at(Some("g"), f).count(), 1, "frame {f}");
        }
        assert!(ix.record(&rt, "11").is_none());
    }
}
