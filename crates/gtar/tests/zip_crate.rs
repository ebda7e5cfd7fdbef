//! An independent zip reader (the `zip` crate) opens what `src/gtar` writes:
//! every entry, stored and deflated, streamed or whole, with the right bytes,
//! and sees the archive as zip64 (the end records libgetar needs to append).

use std::io::Read;

use gtar::{ArchiveWriter, Compression, OpenMode};

#[test]
fn the_zip_crate_reads_our_archives() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.zip");
    let mut want = Vec::new();
    {
        let (mut w, _) = ArchiveWriter::open(&path, OpenMode::Create).unwrap();
        // Large entries then get a padding extra field and O_DIRECT writes.
        w.enable_direct_io();
        for f in 0..5u32 {
            let mut t = w.begin().unwrap();
            let a: Vec<u8> = (0..1000u32).flat_map(|i| (i * f).to_le_bytes()).collect();
            let name = format!("g/frames/{f}/x.u32.uni");
            t.add(&name, &a, Compression::Stored).unwrap();
            want.push((name, a.clone()));
            let name = format!("g/frames/{f}/y.u32.uni");
            t.add(&name, &a, Compression::Deflate(6)).unwrap();
            want.push((name, a.clone()));
            let name = format!("g/frames/{f}/z.u8.uni");
            let mut e = t.start_entry(&name, 300).unwrap();
            for _ in 0..3 {
                e.write(&[f as u8; 100]).unwrap();
            }
            e.finish().unwrap();
            want.push((name, vec![f as u8; 300]));
            // Large enough for direct I/O, with a partial last block.
            let big: Vec<u8> = (0..(3 << 20) + 5u32).map(|i| (i * 7 + f) as u8).collect();
            let name = format!("g/frames/{f}/big.u8.uni");
            let mut e = t.start_entry(&name, big.len() as u64).unwrap();
            for piece in big.chunks(1 << 20) {
                e.write(piece).unwrap();
            }
            e.finish().unwrap();
            want.push((name, big));
            t.commit().unwrap();
            w.sync().unwrap();
        }
        w.close().unwrap();
    }
    let bytes = std::fs::read(&path).unwrap();
    // zip64 end-of-central-directory record and locator precede the EOCD.
    let n = bytes.len();
    assert_eq!(&bytes[n - 22..n - 18], &[0x50, 0x4b, 0x05, 0x06]);
    assert_eq!(&bytes[n - 42..n - 38], &[0x50, 0x4b, 0x06, 0x07]);
    let mut z = zip::ZipArchive::new(std::fs::File::open(&path).unwrap()).unwrap();
    assert_eq!(z.len(), want.len());
    for (name, data) in &want {
        let mut f = z.by_name(name).unwrap();
        let mut got = Vec::new();
        f.read_to_end(&mut got).unwrap();
        assert_eq!(&got, data, "{name}");
    }
}
