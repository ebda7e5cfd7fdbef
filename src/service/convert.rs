//! The wire ↔ domain conversions, all in one place: the protobuf types stop
//! here and in `server.rs`; everything below the service speaks the daemon's
//! own types (`layout::DType`, `query::Description`, `query::TensorMeta`, …).

use crate::assembly::{Abort, Ack, FrameDone, RankSpec, Slice};
use crate::error::BadField;
use crate::layout::DType;
use crate::proto::v1 as pb;
use crate::query::{Description, Location, RecordTypeSummary, TensorMeta};

/// A wire dtype, named by `field` when it is unknown or unset.
pub fn dtype(field: &str, wire: i32) -> Result<DType, BadField> {
    let d = match pb::DType::try_from(wire) {
        Ok(pb::DType::Float32) => DType::F32,
        Ok(pb::DType::Float64) => DType::F64,
        Ok(pb::DType::Int32) => DType::I32,
        Ok(pb::DType::Int64) => DType::I64,
        Ok(pb::DType::Uint8) => DType::U8,
        Ok(pb::DType::Uint32) => DType::U32,
        Ok(pb::DType::Uint64) => DType::U64,
        Ok(pb::DType::Float16) => DType::F16,
        Ok(pb::DType::Bfloat16) => DType::BF16,
        Ok(pb::DType::Int8) => DType::I8,
        Ok(pb::DType::Int16) => DType::I16,
        Ok(pb::DType::Uint16) => DType::U16,
        Ok(pb::DType::Bool) => DType::Bool,
        Ok(pb::DType::DtypeUnspecified) | Err(_) => {
            return Err(BadField::new(
                field,
                format!("{field}: unknown dtype {wire} (FLOAT32 = 1 … BOOL = 13)"),
            ))
        }
    };
    Ok(d)
}

pub fn wire_dtype(d: DType) -> pb::DType {
    match d {
        DType::F32 => pb::DType::Float32,
        DType::F64 => pb::DType::Float64,
        DType::I32 => pb::DType::Int32,
        DType::I64 => pb::DType::Int64,
        DType::U8 => pb::DType::Uint8,
        DType::U32 => pb::DType::Uint32,
        DType::U64 => pb::DType::Uint64,
        DType::F16 => pb::DType::Float16,
        DType::BF16 => pb::DType::Bfloat16,
        DType::I8 => pb::DType::Int8,
        DType::I16 => pb::DType::Int16,
        DType::U16 => pb::DType::Uint16,
        DType::Bool => pb::DType::Bool,
    }
}

/// A wire box (`TensorSlice`), named by `field` when malformed.
pub fn slice(field: &str, wire: pb::TensorSlice) -> Result<Slice, BadField> {
    if wire.offsets.len() != wire.shape.len() {
        return Err(BadField::new(
            field,
            format!(
                "{field}: {} offsets for {} dimensions; give one offset per dimension",
                wire.offsets.len(),
                wire.shape.len()
            ),
        ));
    }
    Ok(Slice {
        offsets: wire.offsets,
        shape: wire.shape,
    })
}

pub fn wire_slice(s: &Slice) -> pb::TensorSlice {
    pb::TensorSlice {
        offsets: s.offsets.clone(),
        shape: s.shape.clone(),
    }
}

/// A stream's place in a job (`OpenArchive.ranks`).
pub fn rank_spec(wire: pb::RankSpec) -> RankSpec {
    RankSpec {
        job: wire.job,
        rank: wire.rank,
        world: wire.world_size,
    }
}

fn frame_ack(d: FrameDone) -> pb::FrameAck {
    pb::FrameAck {
        index: d.index,
        seq: d.seq,
        bytes: d.bytes,
    }
}

/// A domain ack as the Write stream's answer.
pub fn ack(a: Ack) -> pb::WriteResponse {
    use pb::write_response::Msg;
    let msg = match a {
        Ack::Received(d) => Msg::Received(frame_ack(d)),
        Ack::Durable(d) => Msg::Durable(frame_ack(d)),
        Ack::Replicated(d) => Msg::Replicated(frame_ack(d)),
        Ack::Aborted {
            seq,
            abort:
                Abort {
                    index,
                    reason,
                    missing,
                    bad_input,
                },
        } => Msg::Aborted(pb::FrameAborted {
            index,
            seq,
            reason,
            missing_ranks: missing,
            bad_input,
        }),
    };
    pb::WriteResponse { msg: Some(msg) }
}

impl From<TensorMeta> for pb::TensorInfo {
    fn from(t: TensorMeta) -> pb::TensorInfo {
        pb::TensorInfo {
            path: t.path,
            group: t.group,
            name: t.name,
            dtype: wire_dtype(t.dtype) as i32,
            shape: t.shape,
            size_bytes: t.size_bytes,
            location: None,
            slice: None,
            crc32: t.crc32,
        }
    }
}

impl From<Location> for pb::EntryLocation {
    fn from(l: Location) -> pb::EntryLocation {
        pb::EntryLocation {
            file: l.file,
            offset: l.offset,
            length: l.length,
            crc32: l.crc32,
            device: l.device,
            inode: l.inode,
        }
    }
}

impl From<RecordTypeSummary> for pb::RecordTypeInfo {
    fn from(r: RecordTypeSummary) -> pb::RecordTypeInfo {
        pb::RecordTypeInfo {
            group: r.group,
            name: r.name,
            behavior: r.behavior.into(),
            format: r.format.into(),
            resolution: r.resolution.into(),
            frame_count: r.frame_count,
            first_frame: r.first_frame,
            last_frame: r.last_frame,
            path: r.path,
        }
    }
}

impl From<Description> for pb::DescribeArchiveResponse {
    fn from(d: Description) -> pb::DescribeArchiveResponse {
        pb::DescribeArchiveResponse {
            archive: d.archive,
            size_bytes: d.size_bytes,
            groups: d.groups,
            records: d.records.into_iter().map(Into::into).collect(),
            frame_count: d.frame_count,
            first_frame: d.first_frame,
            last_frame: d.last_frame,
            recovered: d.recovered,
            replication: None,
        }
    }
}

/// A wire keep policy (`CompactRequest.keep`).
pub fn keep_policy(wire: Option<pb::KeepPolicy>) -> Result<gtar::Policy, BadField> {
    let k = wire.unwrap_or_default();
    let count = |field: &str, v: Option<u64>| match v {
        Some(0) => Err(BadField::new(
            field,
            format!("{field}: must be at least 1 (or unset)"),
        )),
        v => Ok(v),
    };
    let policy = gtar::Policy {
        keep_last: count("keep.last", k.last)?.map(|n| n as usize),
        keep_every: count("keep.every", k.every)?,
        keep_best: match k.best.as_str() {
            "" => None,
            s => Some(
                s.parse::<gtar::Best>()
                    .map_err(|e| BadField::new("keep.best", format!("keep.best: {e}")))?,
            ),
        },
        keep_newer_than: count("keep.newer_than_seconds", k.newer_than_seconds)?
            .map(std::time::Duration::from_secs),
        drop_best: k.drop_best,
    };
    if policy.is_empty() {
        return Err(BadField::new(
            "keep",
            "keep: no keep policy (set at least one of last, every, best, newer_than_seconds); \
             compacting would drop every frame but the newest",
        ));
    }
    Ok(policy)
}

impl From<crate::lifecycle::live::LiveOutcome> for pb::CompactResponse {
    fn from(o: crate::lifecycle::live::LiveOutcome) -> Self {
        pb::CompactResponse {
            bytes_reclaimed: o.reclaimed(),
            kept: o.kept,
            dropped: o.dropped,
            old_size_bytes: o.old_len,
            new_size_bytes: o.new_len,
            written: o.written,
        }
    }
}

/// A live snapshot's answer: the copy's name and what it holds.
pub fn snapshot_response(
    destination: String,
    s: crate::lifecycle::live::Snapped,
) -> pb::SnapshotResponse {
    pb::SnapshotResponse {
        destination,
        size_bytes: s.bytes,
        frame_count: s.frames as u64,
        reflinked_bytes: s.reflinked,
    }
}

/// An archive's replication state. `remote`: where it is replicated.
pub fn replication(
    remote: String,
    remote_only: bool,
    st: Option<crate::remote::replicate::Status>,
) -> pb::Replication {
    let st = st.unwrap_or_default();
    pb::Replication {
        remote,
        remote_only,
        durable_bytes: st.durable,
        replicated_bytes: st.replicated,
        lagging: st.lagging,
        error: st.error.unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_dtype_crosses_the_edge_and_back() {
        for d in DType::ALL {
            assert_eq!(dtype("tensor.dtype", wire_dtype(d) as i32), Ok(d));
        }
        let e = dtype("tensor.dtype", 0).unwrap_err();
        assert!(
            e.to_string().starts_with("tensor.dtype: unknown dtype 0"),
            "{e}"
        );
        assert!(dtype("tensor.dtype", 99).is_err());
    }
}
