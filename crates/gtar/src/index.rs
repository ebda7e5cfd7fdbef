//! The in-memory index of an archive: entries in archive order, the last
//! entry of each name, and record types → frames → entry.
//!
//! Invariant: when a name occurs more than once, the entry that comes later in
//! the archive wins, as in libgetar (`ZipArchive::fillPathMap` overwrites its
//! map in central-directory order).

use std::collections::{BTreeMap, HashMap};

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
#[derive(Debug, Default, Clone)]
pub struct Index {
    entries: Vec<Entry>,
    by_name: HashMap<String, usize>,
    records: BTreeMap<RecordType, BTreeMap<FrameIndex, usize>>,
}

impl Index {
    pub fn new() -> Index {
        Index::default()
    }

    /// Add an entry that comes after every entry already indexed.
    pub fn push(&mut self, e: Entry) {
        let i = self.entries.len();
        let rp = RecordPath::parse(e.name());
        self.by_name.insert(e.cd.name.clone(), i);
        self.records
            .entry(rp.rtype)
            .or_default()
            .insert(FrameIndex(rp.index), i);
        self.entries.push(e);
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
