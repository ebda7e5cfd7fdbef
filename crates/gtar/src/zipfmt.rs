//! The zip records we read and write, byte for byte (PKWARE APPNOTE 6.3).
//!
//! Hand-written rather than taken from the `zip` crate because we need what no
//! zip library offers together: a zip64 end record on *every* archive (libgetar
//! appends only when miniz's `mz_zip_is_zip64` sees the zip64 end-of-central-
//! directory locator and record), a private extra field that marks frame
//! commits, local headers patched in place after streaming an entry, duplicate
//! names kept in central-directory order (keras_gtar rewrites paths, and the
//! `zip` crate rejects duplicates), and recovery of archives with no central
//! directory. The `zip` crate is still used in tests as an independent reader.
//!
//! Invariants of what we write:
//! * every local header carries a zip64 extended-information field with both
//!   sizes (its 32-bit size fields are 0xFFFFFFFF), so an entry of any size
//!   never needs a data descriptor and sizes can be patched in place;
//! * every local header we write carries the [`COMMIT_TAG`] extra field;
//! * a local header may carry an [`ALIGN_EXTRA_ID`] padding field so that the
//!   entry's data starts on a block boundary (direct I/O, see `writer`); the
//!   central directory never repeats it, and readers find data through the
//!   local header's own lengths, as APPNOTE requires;
//! * central-directory entries use zip64 fields only where a value needs them,
//!   as miniz does, and the archive always ends with zip64 EOCD + locator + EOCD.

pub const LOCAL_SIG: u32 = 0x0403_4b50;
pub const CENTRAL_SIG: u32 = 0x0201_4b50;
pub const EOCD_SIG: u32 = 0x0605_4b50;
pub const ZIP64_EOCD_SIG: u32 = 0x0606_4b50;
pub const ZIP64_LOCATOR_SIG: u32 = 0x0706_4b50;
pub const DESCRIPTOR_SIG: u32 = 0x0807_4b50;

pub const LOCAL_HEADER_LEN: usize = 30;
pub const CENTRAL_HEADER_LEN: usize = 46;
pub const EOCD_LEN: usize = 22;
pub const ZIP64_EOCD_LEN: usize = 56;
pub const ZIP64_LOCATOR_LEN: usize = 20;

pub const ZIP64_EXTRA_ID: u16 = 0x0001;
/// Private extra field (`gL`) that marks entries written by gtar-logd as part
/// of a frame transaction; other zip readers skip unknown extra fields.
pub const COMMIT_TAG: u16 = 0x4c67;
/// Payload: version u8, flags u8, txn u64, entry number u32, then (version
/// 2) the CRC-32 of the entry's name: zip's own CRC covers the data only,
/// and a recovery scan takes names from local headers, so without it one
/// damaged name byte would file an entry's intact bytes under another record.
pub const COMMIT_PAYLOAD_LEN: usize = 18;
pub const COMMIT_VERSION: u8 = 2;
/// Version 1 (archives written before the name CRC): no name CRC.
const COMMIT_PAYLOAD_LEN_V1: usize = 14;
/// Set on the last entry of a transaction once all of its entries are written.
pub const FLAG_TXN_END: u8 = 1;

/// Extra-field ID of alignment padding: Android's `zipalign` field (u16
/// alignment, then zero bytes). Zip readers skip extra fields they do not know.
pub const ALIGN_EXTRA_ID: u16 = 0xd935;
/// The shortest padding field: ID, length, alignment.
const ALIGN_EXTRA_MIN: usize = 6;

pub const METHOD_STORED: u16 = 0;
pub const METHOD_DEFLATE: u16 = 8;

/// General purpose flag bits.
pub const GP_DATA_DESCRIPTOR: u16 = 1 << 3;
pub const GP_UTF8: u16 = 1 << 11;
pub const GP_ENCRYPTED: u16 = 1;

/// Version 4.5: zip64.
const VERSION_ZIP64: u16 = 45;
/// Fixed 1980-01-01 00:00 DOS timestamp: archives are reproducible and the
/// time of a frame is not what a trajectory is indexed by.
const DOS_DATE: u16 = (1 << 5) | 1;
const DOS_TIME: u16 = 0;

fn put16(b: &mut Vec<u8>, v: u16) {
    b.extend_from_slice(&v.to_le_bytes());
}
fn put32(b: &mut Vec<u8>, v: u32) {
    b.extend_from_slice(&v.to_le_bytes());
}
fn put64(b: &mut Vec<u8>, v: u64) {
    b.extend_from_slice(&v.to_le_bytes());
}

pub fn rd16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
pub fn rd32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}
pub fn rd64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// The commit marker carried in our local headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommitMark {
    pub txn: u64,
    pub entry: u32,
    pub end: bool,
}

/// Everything needed to write a local header.
#[derive(Debug, Clone)]
pub struct LocalHeader<'a> {
    pub name: &'a str,
    pub method: u16,
    pub crc32: u32,
    pub compressed_size: u64,
    pub uncompressed_size: u64,
    pub mark: CommitMark,
    /// Bytes of alignment padding field: 0, or at least 6 (see [`align_pad`]).
    pub pad: u16,
}

/// The `pad` that makes the data of a local header for `name` written at
/// `at` start at a multiple of `align` (a power of two, at most 4096).
pub fn align_pad(at: u64, name: &str, align: u64) -> u16 {
    debug_assert!(align.is_power_of_two() && align <= 4096);
    let data_at = at + LocalHeader::encoded_len(name, 0) as u64;
    let mut pad = (align - data_at % align) % align;
    if pad != 0 && pad < ALIGN_EXTRA_MIN as u64 {
        pad += align;
    }
    pad as u16
}

impl LocalHeader<'_> {
    /// Length of the encoded header (constant for a given name and padding).
    pub fn encoded_len(name: &str, pad: u16) -> usize {
        LOCAL_HEADER_LEN + name.len() + 4 + 16 + 4 + COMMIT_PAYLOAD_LEN + pad as usize
    }

    pub fn encode(&self) -> Vec<u8> {
        debug_assert!(self.pad == 0 || self.pad as usize >= ALIGN_EXTRA_MIN);
        let mut b = Vec::with_capacity(Self::encoded_len(self.name, self.pad));
        put32(&mut b, LOCAL_SIG);
        put16(&mut b, VERSION_ZIP64);
        put16(&mut b, GP_UTF8);
        put16(&mut b, self.method);
        put16(&mut b, DOS_TIME);
        put16(&mut b, DOS_DATE);
        put32(&mut b, self.crc32);
        put32(&mut b, u32::MAX);
        put32(&mut b, u32::MAX);
        put16(&mut b, self.name.len() as u16);
        put16(
            &mut b,
            (4 + 16 + 4 + COMMIT_PAYLOAD_LEN + self.pad as usize) as u16,
        );
        b.extend_from_slice(self.name.as_bytes());
        put16(&mut b, ZIP64_EXTRA_ID);
        put16(&mut b, 16);
        put64(&mut b, self.uncompressed_size);
        put64(&mut b, self.compressed_size);
        put16(&mut b, COMMIT_TAG);
        put16(&mut b, COMMIT_PAYLOAD_LEN as u16);
        b.push(COMMIT_VERSION);
        b.push(if self.mark.end { FLAG_TXN_END } else { 0 });
        put64(&mut b, self.mark.txn);
        put32(&mut b, self.mark.entry);
        put32(&mut b, crc32fast::hash(self.name.as_bytes()));
        if self.pad != 0 {
            put16(&mut b, ALIGN_EXTRA_ID);
            put16(&mut b, self.pad - 4);
            put16(&mut b, 4096);
            b.resize(b.len() + self.pad as usize - ALIGN_EXTRA_MIN, 0);
        }
        debug_assert_eq!(b.len(), Self::encoded_len(self.name, self.pad));
        b
    }
}

/// A central-directory entry as we keep it in memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CentralEntry {
    pub name: String,
    pub method: u16,
    pub flags: u16,
    pub crc32: u32,
    pub compressed_size: u64,
    pub uncompressed_size: u64,
    pub local_header_offset: u64,
}

impl CentralEntry {
    /// Append the encoded central-directory header to `b`.
    pub fn encode_into(&self, b: &mut Vec<u8>) {
        let big_u = self.uncompressed_size >= u32::MAX as u64;
        let big_c = self.compressed_size >= u32::MAX as u64;
        let big_o = self.local_header_offset >= u32::MAX as u64;
        // The zip64 field holds, in this order, only the values that overflow.
        let mut extra = Vec::new();
        if big_u || big_c || big_o {
            let n = 8 * (big_u as u16 + big_c as u16 + big_o as u16);
            put16(&mut extra, ZIP64_EXTRA_ID);
            put16(&mut extra, n);
            if big_u {
                put64(&mut extra, self.uncompressed_size);
            }
            if big_c {
                put64(&mut extra, self.compressed_size);
            }
            if big_o {
                put64(&mut extra, self.local_header_offset);
            }
        }
        let clamp = |v: u64, big: bool| if big { u32::MAX } else { v as u32 };
        put32(b, CENTRAL_SIG);
        put16(b, VERSION_ZIP64); // made by
        put16(b, VERSION_ZIP64); // needed
                                 // A data descriptor on a foreign entry stays where it is; keep its flag.
        put16(b, self.flags);
        put16(b, self.method);
        put16(b, DOS_TIME);
        put16(b, DOS_DATE);
        put32(b, self.crc32);
        put32(b, clamp(self.compressed_size, big_c));
        put32(b, clamp(self.uncompressed_size, big_u));
        put16(b, self.name.len() as u16);
        put16(b, extra.len() as u16);
        put16(b, 0); // comment
        put16(b, 0); // disk
        put16(b, 0); // internal attrs
        put32(b, 0); // external attrs
        put32(b, clamp(self.local_header_offset, big_o));
        b.extend_from_slice(self.name.as_bytes());
        b.extend_from_slice(&extra);
    }
}

/// Encode the full tail: central directory, zip64 EOCD, locator, EOCD.
pub fn encode_tail(entries: &[CentralEntry], cd_offset: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(entries.len() * 96 + 128);
    for e in entries {
        e.encode_into(&mut b);
    }
    let cd_size = b.len() as u64;
    let zip64_eocd_offset = cd_offset + cd_size;
    let n = entries.len() as u64;
    put32(&mut b, ZIP64_EOCD_SIG);
    put64(&mut b, (ZIP64_EOCD_LEN - 12) as u64);
    put16(&mut b, VERSION_ZIP64);
    put16(&mut b, VERSION_ZIP64);
    put32(&mut b, 0); // this disk
    put32(&mut b, 0); // disk with cd
    put64(&mut b, n);
    put64(&mut b, n);
    put64(&mut b, cd_size);
    put64(&mut b, cd_offset);
    put32(&mut b, ZIP64_LOCATOR_SIG);
    put32(&mut b, 0);
    put64(&mut b, zip64_eocd_offset);
    put32(&mut b, 1); // total disks
    put32(&mut b, EOCD_SIG);
    put16(&mut b, 0);
    put16(&mut b, 0);
    put16(&mut b, n.min(0xFFFF) as u16);
    put16(&mut b, n.min(0xFFFF) as u16);
    put32(&mut b, cd_size.min(u32::MAX as u64) as u32);
    put32(&mut b, cd_offset.min(u32::MAX as u64) as u32);
    put16(&mut b, 0);
    b
}

/// What an extra-field block says that we care about.
#[derive(Debug, Default, Clone, Copy)]
pub struct Extra {
    pub zip64: Option<[Option<u64>; 3]>,
    pub mark: Option<CommitMark>,
    /// CRC-32 of the entry's name, from a version 2 commit tag.
    pub name_crc: Option<u32>,
}

/// Parse an extra-field block. `want` says which 32-bit fields were
/// 0xFFFFFFFF (uncompressed, compressed, offset), hence present in the zip64
/// field; for local headers both sizes are present whenever the field is.
pub fn parse_extra(extra: &[u8], want: [bool; 3]) -> Result<Extra, &'static str> {
    let mut out = Extra::default();
    let mut at = 0;
    while at + 4 <= extra.len() {
        let id = rd16(extra, at);
        let len = rd16(extra, at + 2) as usize;
        let body = extra
            .get(at + 4..at + 4 + len)
            .ok_or("extra field runs past its block")?;
        if id == ZIP64_EXTRA_ID {
            let mut vals = [None; 3];
            let mut p = 0;
            for (i, w) in want.iter().enumerate() {
                if *w {
                    if p + 8 > body.len() {
                        return Err("zip64 extra field too short");
                    }
                    vals[i] = Some(rd64(body, p));
                    p += 8;
                }
            }
            out.zip64 = Some(vals);
        } else if id == COMMIT_TAG
            && ((len == COMMIT_PAYLOAD_LEN && body[0] == COMMIT_VERSION)
                || (len == COMMIT_PAYLOAD_LEN_V1 && body[0] == 1))
        {
            out.mark = Some(CommitMark {
                end: body[1] & FLAG_TXN_END != 0,
                txn: rd64(body, 2),
                entry: rd32(body, 10),
            });
            out.name_crc = (len == COMMIT_PAYLOAD_LEN).then(|| rd32(body, 14));
        }
        at += 4 + len;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_header_round_trips_its_mark() {
        let h = LocalHeader {
            name: "frames/1/x.f32.uni",
            method: METHOD_STORED,
            crc32: 7,
            compressed_size: 5 << 32,
            uncompressed_size: 5 << 32,
            mark: CommitMark {
                txn: 9,
                entry: 3,
                end: true,
            },
            pad: 0,
        };
        let b = h.encode();
        assert_eq!(b.len(), LocalHeader::encoded_len(h.name, 0));
        let nlen = rd16(&b, 26) as usize;
        let elen = rd16(&b, 28) as usize;
        let ex = parse_extra(&b[30 + nlen..30 + nlen + elen], [true, true, false]).unwrap();
        assert_eq!(ex.mark, Some(h.mark));
        assert_eq!(ex.zip64.unwrap()[0], Some(5 << 32));
        assert_eq!(ex.name_crc, Some(crc32fast::hash(h.name.as_bytes())));
    }

    #[test]
    fn a_version_1_mark_still_reads_without_a_name_crc() {
        let mut e = Vec::new();
        put16(&mut e, COMMIT_TAG);
        put16(&mut e, COMMIT_PAYLOAD_LEN_V1 as u16);
        e.extend_from_slice(&[1, FLAG_TXN_END]);
        put64(&mut e, 9);
        put32(&mut e, 3);
        let ex = parse_extra(&e, [false; 3]).unwrap();
        let want = CommitMark {
            txn: 9,
            entry: 3,
            end: true,
        };
        assert_eq!((ex.mark, ex.name_crc), (Some(want), None));
    }

    #[test]
    fn padding_puts_data_on_a_block_boundary_and_keeps_the_mark() {
        for at in [0u64, 1, 4090, 4096, 12345, (5 << 32) + 77] {
            for name in ["a", "frames/10/model/weights.f32.uni", &"n".repeat(4000)] {
                let pad = align_pad(at, name, 4096);
                assert!(pad == 0 || pad as usize >= ALIGN_EXTRA_MIN, "{pad}");
                let h = LocalHeader {
                    name,
                    method: METHOD_STORED,
                    crc32: 1,
                    compressed_size: 3,
                    uncompressed_size: 3,
                    mark: CommitMark {
                        txn: at,
                        entry: 0,
                        end: false,
                    },
                    pad,
                };
                let b = h.encode();
                assert_eq!(
                    (at + b.len() as u64) % 4096,
                    0,
                    "at {at} name {}",
                    name.len()
                );
                let nlen = rd16(&b, 26) as usize;
                let elen = rd16(&b, 28) as usize;
                assert_eq!(30 + nlen + elen, b.len());
                let ex = parse_extra(&b[30 + nlen..], [true, true, false]).unwrap();
                assert_eq!(ex.mark, Some(h.mark));
                assert_eq!(ex.zip64.unwrap()[1], Some(3));
            }
        }
    }

    #[test]
    fn truncated_extra_is_an_error_not_a_panic() {
        assert!(parse_extra(&[1, 0, 16, 0, 1, 2], [true, true, false]).is_err());
        assert!(parse_extra(&[1, 0, 4, 0, 1, 2, 3, 4], [true, true, false]).is_err());
    }
}
