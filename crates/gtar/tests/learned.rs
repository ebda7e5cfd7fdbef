//! What a reader learns about committed entries — small entries' bytes and
//! where each entry's data starts — is read from the file once and then
//! served from memory, for every handle on the same index, never for an
//! index cloned (it may describe another file), and never for large entries.

use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use gtar::{Archive, ArchiveWriter, Compression, Entry, OpenMode, ReadAt};

/// A file that counts the bytes read from it.
#[derive(Debug)]
struct Counting {
    file: File,
    read: AtomicU64,
}

impl ReadAt for Counting {
    fn pread(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let n = self.file.pread(buf, offset)?;
        self.read.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

fn entry(a: &Archive, name: &str) -> Entry {
    a.index().get(name).cloned().unwrap()
}

#[test]
fn small_entries_and_data_offsets_are_read_once_per_index() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.zip");
    let big = vec![7u8; 100 << 10];
    {
        let (mut w, _) = ArchiveWriter::open(&path, OpenMode::Create).unwrap();
        let mut t = w.begin().unwrap();
        t.add("run/t/frames/0/weight.f32.uni", &big, Compression::Stored)
            .unwrap();
        t.add(
            "run/gtar_logd/frames/0/manifest.json",
            b"{\"tensors\":[]}",
            Compression::Stored,
        )
        .unwrap();
        t.commit().unwrap();
        w.close().unwrap();
    }
    // From the central directory: the data offsets are not known yet.
    let index = Archive::open(&path).unwrap().index().clone();
    let src = Arc::new(Counting {
        file: File::open(&path).unwrap(),
        read: AtomicU64::new(0),
    });
    let a = Archive::from_source(path.clone(), src.clone(), index);
    let read = || src.read.load(Ordering::Relaxed);
    let manifest = entry(&a, "run/gtar_logd/frames/0/manifest.json");
    let tensor = entry(&a, "run/t/frames/0/weight.f32.uni");
    assert!(manifest.data_offset.is_none() && tensor.data_offset.is_none());

    let first = a.read_small(&manifest).unwrap();
    assert_eq!(&first[..], b"{\"tensors\":[]}");
    let after_first = read();
    assert!(after_first > 0);
    // Again, and through a clone of the archive (the catalog hands out
    // clones): nothing more is read.
    assert_eq!(a.read_small(&manifest).unwrap(), first);
    assert_eq!(a.clone().read_small(&manifest).unwrap(), first);
    assert_eq!(read(), after_first);

    // The tensor's data offset: its local header is read once.
    let at = a.data_offset(&tensor).unwrap();
    let after_offset = read();
    assert!(after_offset > after_first);
    assert_eq!(a.data_offset(&tensor).unwrap(), at);
    assert_eq!(read(), after_offset);

    // A large entry is not kept: read each time.
    let b1 = a.read_small(&tensor).unwrap();
    assert_eq!(&b1[..], &big[..]);
    let after_big = read();
    a.read_small(&tensor).unwrap();
    assert_eq!(read() - after_big, big.len() as u64);

    // A clone of the index learns afresh.
    let cloned = Archive::from_source(path.clone(), src.clone(), a.index().clone());
    let before = read();
    assert_eq!(cloned.read_small(&manifest).unwrap(), first);
    assert!(read() > before);
}
