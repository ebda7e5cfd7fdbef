//! gRPC handlers for `gtar.logd.v1.Logd`. Thin: they validate, call the
//! catalog / query / writer layers, and stream results; errors become
//! statuses through the one table in [`errors`].

pub mod convert;
pub mod errors;
pub mod frames;
pub mod ingest;

use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::archives::{Archives, Origin};
use crate::proto::v1::{self as pb, logd_server::Logd};
use crate::query;
use errors::{bad, status, Kind};

/// What every handler shares.
pub struct State {
    pub archives: Archives,
    pub shutdown: CancellationToken,
    pub max_tensor_bytes: u64,
    /// Whether Write streams may attach a client's shared memory.
    pub shared_memory: bool,
    /// A Write stream that sends nothing for this long is ended.
    pub stream_idle: std::time::Duration,
    /// What each peer holds (streams, archives, bytes in flight).
    pub quotas: Arc<crate::peer::Quotas>,
    /// Jobs whose ranks write frames together (`OpenArchive.ranks`).
    pub jobs: Arc<crate::assembly::Jobs<crate::assembly::WriterSink>>,
}

#[derive(Clone)]
pub struct Service {
    state: Arc<State>,
}

impl Service {
    pub fn new(state: Arc<State>) -> Service {
        Service { state }
    }
}

type BoxStream<T> = Pin<Box<dyn tokio_stream::Stream<Item = Result<T, Status>> + Send>>;

/// Open an archive for reading off the async threads (local, else remote).
async fn open_read(state: &Arc<State>, name: String) -> Result<gtar::Archive, Status> {
    open_any(state, name).await.map(|(a, _)| a)
}

async fn open_any(state: &Arc<State>, name: String) -> Result<(gtar::Archive, Origin), Status> {
    let st = state.clone();
    blocking(move || st.archives.open_any(&name)).await
}

/// Run `f` on tokio's blocking pool — file I/O, index locks, sorting: nothing
/// that can block runs on an async worker — and map its error through the
/// one table (`errors`); a task that panicked is INTERNAL.
pub(crate) async fn blocking<T, E>(
    f: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, Status>
where
    T: Send + 'static,
    E: Into<Status> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| status(Kind::Internal, e.to_string()))?
        .map_err(Into::into)
}

/// Whether this request's peer may be told where tensor bytes are (see
/// `query::may_locate`): it asked, it is on the Unix socket (TCP carries no
/// identity), and its uid owns the archive file or is root.
fn locate_granted<T>(req: &Request<T>, asked: bool) -> Option<u32> {
    if !asked {
        return None;
    }
    req.extensions()
        .get::<tonic::transport::server::UdsConnectInfo>()
        .and_then(|c| c.peer_cred)
        .map(|c| c.uid())
}

#[tonic::async_trait]
impl Logd for Service {
    type WriteStream = BoxStream<pb::WriteResponse>;
    type GetFrameStream = BoxStream<pb::FrameData>;
    type TensorHistoryStream = BoxStream<pb::FrameData>;

    async fn write(
        &self,
        req: Request<Streaming<pb::WriteRequest>>,
    ) -> Result<Response<Self::WriteStream>, Status> {
        // Peer credentials exist on the Unix socket only; they decide whether
        // the stream may use shared memory (see `shm`).
        let ucred = req
            .extensions()
            .get::<tonic::transport::server::UdsConnectInfo>()
            .and_then(|c| c.peer_cred);
        let peer = crate::peer::Peer::new(ucred, req.remote_addr());
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(ingest::run(
            self.state.clone(),
            req.into_inner(),
            ucred,
            peer,
            tx,
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn list_archives(
        &self,
        req: Request<pb::ListArchivesRequest>,
    ) -> Result<Response<pb::ListArchivesResponse>, Status> {
        let prefix = req.into_inner().prefix;
        let st = self.state.clone();
        let listed = blocking(move || st.archives.list(&prefix)).await?;
        let archives = listed
            .into_iter()
            .map(|l| pb::ArchiveInfo {
                writing: l.writing,
                archive: l.name,
                size_bytes: l.size,
                remote_only: l.remote_only,
            })
            .collect();
        Ok(Response::new(pb::ListArchivesResponse { archives }))
    }

    async fn describe_archive(
        &self,
        req: Request<pb::DescribeArchiveRequest>,
    ) -> Result<Response<pb::DescribeArchiveResponse>, Status> {
        let name = req.into_inner().archive;
        let (a, origin) = open_any(&self.state, name.clone()).await?;
        let n = name.clone();
        let remote_only = matches!(origin, Origin::Remote { .. });
        // The size of the file just opened (its path is already resolved).
        let described = blocking(move || {
            let size = match origin {
                Origin::Local => std::fs::metadata(a.path()).map_or(0, |m| m.len()),
                Origin::Remote { size } => size,
            };
            Ok::<_, Status>(query::describe(&a, &n, size))
        })
        .await?;
        let mut out: pb::DescribeArchiveResponse = described.into();
        if let Some(r) = self.state.archives.replicator() {
            out.replication = Some(convert::replication(
                r.remote().describe(),
                remote_only,
                r.status(&name),
            ));
        }
        Ok(Response::new(out))
    }

    async fn list_frames(
        &self,
        req: Request<pb::ListFramesRequest>,
    ) -> Result<Response<pb::ListFramesResponse>, Status> {
        let r = req.into_inner();
        let name = r.archive.clone();
        let (a, origin) = open_any(&self.state, r.archive).await?;
        // Sorting every frame index of a large archive is CPU work, and the
        // index lock may be held by a writer: off the async workers.
        if !r.states {
            let frames = blocking(move || query::frames(&a, &r.group)).await?;
            return Ok(Response::new(pb::ListFramesResponse {
                frames,
                states: Vec::new(),
            }));
        }
        // Each frame's state: durable below the writer's fsynced end,
        // replicated below the replicator's committed end (both commit
        // boundaries in this file's offsets). Read after the frames, so a
        // frame is never said to be further along than it is.
        let st = self.state.clone();
        let (frames, states) = blocking(move || {
            let frames = query::frames(&a, &r.group)?;
            let last = query::frame_last_offsets(&a, &r.group);
            let remote_only = matches!(origin, Origin::Remote { .. });
            let durable_end = st.archives.durable_end(&name);
            let replicated_end = match st.archives.replicator() {
                None => None,
                Some(_) if remote_only => Some(u64::MAX),
                Some(rep) => rep.status(&name).map(|s| s.replicated),
            };
            let states = frames
                .iter()
                .map(|f| {
                    let at = last.get(f).copied().unwrap_or(0);
                    pb::FrameState {
                        durable: remote_only || durable_end.is_none_or(|d| at < d),
                        replicated: replicated_end.map(|r| at < r),
                    }
                })
                .collect();
            Ok::<_, Status>((frames, states))
        })
        .await?;
        Ok(Response::new(pb::ListFramesResponse { frames, states }))
    }

    async fn get_frame(
        &self,
        req: Request<pb::GetFrameRequest>,
    ) -> Result<Response<Self::GetFrameStream>, Status> {
        let uid = locate_granted(&req, req.get_ref().locate);
        let r = req.into_inner();
        let slice = r
            .slice
            .clone()
            .map(|s| convert::slice("slice", s))
            .transpose()?;
        let batch = r.batch;
        let headers_only = r.headers_only;
        let a = open_read(&self.state, r.archive).await?;
        let (tx, rx) = mpsc::channel(4);
        let plan = blocking(move || -> Result<_, Status> {
            let index = match r.frame {
                Some(pb::get_frame_request::Frame::Index(i)) => {
                    crate::layout::check_index("index", &i)?;
                    i
                }
                Some(pb::get_frame_request::Frame::Position(p)) => {
                    query::at_position(&query::frames(&a, &r.group)?, p)?
                }
                None => query::at_position(&query::frames(&a, &r.group)?, -1)?,
            };
            let tensors = query::frame_tensors(&a, &r.group, &index, &r.names)?;
            if let Some(s) = &slice {
                // Every tensor of the answer, before anything is sent.
                for t in &tensors {
                    crate::slice_read::check(&t.info, s)?;
                }
            }
            let locate = uid.is_some_and(|u| query::may_locate(&a, u));
            Ok((a, vec![(index, tensors)], locate, slice))
        })
        .await?;
        if headers_only {
            // The index says all of it: no tensor bytes are read.
            use pb::frame_data::Msg;
            let (_, frames, _, _) = plan;
            let mut msgs = Vec::new();
            for (frame, tensors) in frames {
                msgs.push(Ok(pb::FrameData {
                    msg: Some(Msg::Frame(frame)),
                }));
                msgs.extend(tensors.into_iter().map(|t| {
                    Ok(pb::FrameData {
                        msg: Some(Msg::Tensor(t.info.into())),
                    })
                }));
            }
            return Ok(Response::new(Box::pin(tokio_stream::iter(msgs))));
        }
        tokio::task::spawn_blocking(move || {
            let (archive, frames, locate, slice) = plan;
            let mut out = frames::FrameSender::new(archive, tx, locate, batch).with_slice(slice);
            for (frame, tensors) in frames {
                if !out.send(frame, tensors) {
                    return;
                }
            }
            out.finish();
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn read_record(
        &self,
        req: Request<pb::ReadRecordRequest>,
    ) -> Result<Response<pb::ReadRecordResponse>, Status> {
        let r = req.into_inner();
        if r.path.is_empty() {
            return Err(bad("path", "is empty"));
        }
        let a = open_read(&self.state, r.archive).await?;
        let piece =
            blocking(move || query::record_range(&a, &r.path, r.offset, r.max_bytes)).await?;
        Ok(Response::new(pb::ReadRecordResponse {
            text: piece.text().unwrap_or_default(),
            data: piece.data,
            size: piece.size,
            offset: piece.offset,
        }))
    }

    async fn tensor_history(
        &self,
        req: Request<pb::TensorHistoryRequest>,
    ) -> Result<Response<Self::TensorHistoryStream>, Status> {
        let uid = locate_granted(&req, req.get_ref().locate);
        let r = req.into_inner();
        if r.name.is_empty() {
            return Err(bad("name", "is empty"));
        }
        let a = open_read(&self.state, r.archive).await?;
        let (history, frames, locate) = {
            let a = a.clone();
            let (g, n) = (r.group.clone(), r.name.clone());
            blocking(move || {
                let locate = uid.is_some_and(|u| query::may_locate(&a, u));
                let h = query::History::new(&a, &g, &n)?;
                let frames = h.frames(&a, r.start, r.stop);
                Ok::<_, query::QueryError>((h, frames, locate))
            })
            .await?
        };
        let (tx, rx) = mpsc::channel(4);
        tokio::task::spawn_blocking(move || {
            let mut out = frames::FrameSender::new(a.clone(), tx, locate, r.batch);
            for f in frames {
                let sent = match history.tensor(&a, &f) {
                    Ok(t) => out.send(f, vec![t]),
                    Err(e) => {
                        out.fail(e.into());
                        return;
                    }
                };
                if !sent {
                    return;
                }
            }
            out.finish();
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn compact(
        &self,
        req: Request<pb::CompactRequest>,
    ) -> Result<Response<pb::CompactResponse>, Status> {
        let r = req.into_inner();
        if r.archive.is_empty() {
            return Err(bad("archive", "is empty"));
        }
        let args = crate::lifecycle::live::LiveCompact {
            group: (!r.group.is_empty()).then_some(r.group),
            policy: convert::keep_policy(r.keep)?,
            dry_run: r.dry_run,
        };
        let st = self.state.clone();
        let done = blocking(move || st.archives.compact(&r.archive, &args)).await?;
        Ok(Response::new(done.into()))
    }

    async fn snapshot(
        &self,
        req: Request<pb::SnapshotRequest>,
    ) -> Result<Response<pb::SnapshotResponse>, Status> {
        let r = req.into_inner();
        if r.archive.is_empty() {
            return Err(bad("archive", "is empty"));
        }
        if r.destination.is_empty() {
            return Err(bad("destination", "is empty"));
        }
        let st = self.state.clone();
        let dest = r.destination.clone();
        let s = blocking(move || st.archives.snapshot(&r.archive, &dest)).await?;
        Ok(Response::new(convert::snapshot_response(r.destination, s)))
    }
}
