//! A blocking client for code without an async runtime (e.g. a training loop).
//!
//! [`Client`] owns a small multi-thread tokio runtime (one worker), so the
//! write stream keeps moving bytes and reading acks while the caller computes
//! between calls. Do not use it from inside an async runtime: blocking there
//! panics; use the async [`crate::Client`] instead.

use std::sync::Arc;

use tokio::runtime::Runtime;

use crate::address::Address;
use crate::client::{ArchiveDescription, ArchiveInfo, Frame, FrameQuery, FrameSel};
use crate::error::Result;
use crate::writer::{Ack, NewFrame, OpenOptions, Opened};
use crate::TensorData;

fn runtime() -> Result<Arc<Runtime>> {
    Ok(Arc::new(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("gtar-logd-client")
            .enable_all()
            .build()?,
    ))
}

/// Blocking twin of [`crate::Client`]. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Client {
    rt: Arc<Runtime>,
    inner: crate::Client,
}

impl Client {
    /// Connect to `address` (empty = [`Address::from_env`]).
    pub fn connect(address: &str) -> Result<Client> {
        let rt = runtime()?;
        let inner = rt.block_on(crate::Client::connect(address))?;
        Ok(Client { rt, inner })
    }

    /// Connect to the default address ([`Address::from_env`]).
    pub fn connect_default() -> Result<Client> {
        Client::connect("")
    }

    /// The address this client is connected to.
    pub fn address(&self) -> &Address {
        self.inner.address()
    }

    /// The async client inside.
    pub fn as_async(&self) -> &crate::Client {
        &self.inner
    }

    /// Open a write stream; see [`crate::Client::writer`].
    pub fn writer(&self, archive: &str, options: OpenOptions) -> Result<FrameWriter> {
        let inner = self.rt.block_on(self.inner.writer(archive, options))?;
        Ok(FrameWriter {
            rt: self.rt.clone(),
            inner: Some(inner),
        })
    }

    /// See [`crate::Client::list_archives`].
    pub fn list_archives(&self, prefix: &str) -> Result<Vec<ArchiveInfo>> {
        self.rt.block_on(self.inner.list_archives(prefix))
    }

    /// See [`crate::Client::describe`].
    pub fn describe(&self, archive: &str) -> Result<ArchiveDescription> {
        self.rt.block_on(self.inner.describe(archive))
    }

    /// See [`crate::Client::compact`].
    pub fn compact(
        &self,
        archive: &str,
        group: &str,
        keep: crate::KeepPolicy,
        dry_run: bool,
    ) -> Result<crate::Compacted> {
        self.rt
            .block_on(self.inner.compact(archive, group, keep, dry_run))
    }

    /// See [`crate::Client::snapshot`].
    pub fn snapshot(&self, archive: &str, destination: &str) -> Result<crate::Snapshot> {
        self.rt.block_on(self.inner.snapshot(archive, destination))
    }

    /// See [`crate::Client::list_frames`].
    pub fn list_frames(&self, archive: &str, group: &str) -> Result<Vec<String>> {
        self.rt.block_on(self.inner.list_frames(archive, group))
    }

    /// See [`crate::Client::get_frame`].
    pub fn get_frame(&self, archive: &str, frame: impl Into<FrameSel>) -> Result<Frame> {
        self.rt.block_on(self.inner.get_frame(archive, frame))
    }

    /// See [`crate::Client::query_frame`].
    pub fn query_frame(&self, archive: &str, q: &FrameQuery) -> Result<Frame> {
        self.rt.block_on(self.inner.query_frame(archive, q))
    }

    /// See [`crate::Client::read_slice`].
    pub fn read_slice(
        &self,
        archive: &str,
        frame: impl Into<FrameSel>,
        group: &str,
        name: &str,
        slice: crate::Slice,
    ) -> Result<crate::DynArray> {
        self.rt
            .block_on(self.inner.read_slice(archive, frame, group, name, slice))
    }

    /// See [`crate::Client::read_record`].
    pub fn read_record(&self, archive: &str, path: &str) -> Result<Vec<u8>> {
        self.rt.block_on(self.inner.read_record(archive, path))
    }

    /// See [`crate::Client::tensor_history`].
    pub fn tensor_history(
        &self,
        archive: &str,
        group: &str,
        name: &str,
        start: i64,
        stop: Option<i64>,
    ) -> Result<Vec<Frame>> {
        self.rt
            .block_on(self.inner.tensor_history(archive, group, name, start, stop))
    }
}

/// Blocking twin of [`crate::FrameWriter`]. Dropping it ends the stream
/// without waiting; call [`close`](Self::close) to wait until all is durable.
pub struct FrameWriter {
    rt: Arc<Runtime>,
    inner: Option<crate::FrameWriter>,
}

impl std::fmt::Debug for FrameWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("FrameWriter").field(&self.inner).finish()
    }
}

impl FrameWriter {
    fn w(&mut self) -> &mut crate::FrameWriter {
        self.inner.as_mut().expect("present until close")
    }

    /// What the daemon said on open.
    pub fn opened(&self) -> &Opened {
        self.inner.as_ref().expect("present until close").opened()
    }

    /// See [`crate::FrameWriter::write`].
    pub fn write(&mut self, frame: NewFrame<'_>) -> Result<FrameHandle> {
        let rt = self.rt.clone();
        let h = rt.block_on(self.w().write(frame))?;
        Ok(FrameHandle { rt, inner: h })
    }

    /// See [`crate::FrameWriter::write_frame`].
    pub fn write_frame<'t, I, G, N, T>(
        &mut self,
        index: impl Into<String>,
        tensors: I,
    ) -> Result<FrameHandle>
    where
        I: IntoIterator<Item = (G, N, T)>,
        G: Into<String>,
        N: Into<String>,
        T: Into<TensorData<'t>>,
    {
        let rt = self.rt.clone();
        let h = rt.block_on(self.w().write_frame(index, tensors))?;
        Ok(FrameHandle { rt, inner: h })
    }

    /// See [`crate::FrameWriter::record`].
    pub fn record(
        &mut self,
        path: impl Into<String>,
        data: impl Into<Vec<u8>>,
    ) -> Result<FrameHandle> {
        let rt = self.rt.clone();
        let h = rt.block_on(self.w().record(path, data))?;
        Ok(FrameHandle { rt, inner: h })
    }

    /// See [`crate::FrameWriter::scalar`].
    pub fn scalar(
        &mut self,
        group: impl Into<String>,
        name: impl Into<String>,
        index: impl Into<String>,
        value: f64,
    ) -> Result<FrameHandle> {
        let rt = self.rt.clone();
        let h = rt.block_on(self.w().scalar(group, name, index, value))?;
        Ok(FrameHandle { rt, inner: h })
    }

    /// See [`crate::FrameWriter::wait_received`].
    pub fn wait_received(&mut self) -> Result<()> {
        let rt = self.rt.clone();
        rt.block_on(self.w().wait_received())
    }

    /// See [`crate::FrameWriter::wait_durable`].
    pub fn wait_durable(&mut self) -> Result<()> {
        let rt = self.rt.clone();
        rt.block_on(self.w().wait_durable())
    }

    /// See [`crate::FrameWriter::close`].
    pub fn close(mut self) -> Result<()> {
        let w = self.inner.take().expect("present until close");
        self.rt.block_on(w.close())
    }
}

impl Drop for FrameWriter {
    fn drop(&mut self) {
        // Drop the async writer inside the runtime's context (its stream and
        // background task belong there).
        if let Some(w) = self.inner.take() {
            let _guard = self.rt.enter();
            drop(w);
        }
    }
}

/// Blocking twin of [`crate::FrameHandle`].
pub struct FrameHandle {
    rt: Arc<Runtime>,
    inner: crate::FrameHandle,
}

impl std::fmt::Debug for FrameHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameHandle")
            .field("index", &self.inner.index())
            .field("seq", &self.inner.seq())
            .finish()
    }
}

impl FrameHandle {
    /// The frame index.
    pub fn index(&self) -> &str {
        self.inner.index()
    }

    /// Block until the frame is visible to queries.
    pub fn received(&mut self) -> Result<Ack> {
        let rt = self.rt.clone();
        rt.block_on(self.inner.received())
    }

    /// Block until the frame is durable.
    pub fn durable(self) -> Result<Ack> {
        self.rt.block_on(self.inner.durable())
    }
}
