//! Accepting the `:authority` that gRPC clients send over a Unix socket.
//!
//! grpc-go (so grpcurl 1.8), grpc-java and some gRPC C-core versions send the
//! socket's path as the HTTP/2 `:authority` of a request on a Unix socket.
//! The h2 crate under tonic checks it as a URI authority, finds a `/`, and
//! resets the stream with `PROTOCOL_ERROR` before any of our code sees the
//! request (hyperium/h2#487, open since 2020; h2 has no switch for it). An
//! authority means nothing on a Unix socket, so on those connections only,
//! this reader sits between the socket and h2 and replaces an `:authority`
//! that is not a valid URI authority with `localhost`, as grpc-go's own newer
//! versions send.
//!
//! How, and the invariants it keeps:
//! * It looks at the connection's first header block. If its `:authority` is
//!   valid (our clients, grpcio, tonic), every byte it read is handed to h2
//!   unchanged and from then on it reads straight into h2's buffer: no copy,
//!   no parsing, for the life of the connection. Only a connection whose
//!   first request needs the repair is rewritten, and then every header
//!   block of it is.
//! * Rewriting decodes each header block (HEADERS and its CONTINUATIONs)
//!   with an HPACK decoder that follows the client's dynamic table, and
//!   encodes it again with an encoder whose table is the one h2 decodes
//!   with: the two tables never have to agree, so whatever the client
//!   indexes, h2 sees the same fields but the repaired authority.
//! * Every other frame passes through byte for byte; frame boundaries are
//!   followed only to find header blocks.
//! * A connection that does not open with the HTTP/2 client preface is
//!   passed through untouched: h2 refuses it itself, with its own error.
//! * A header block that cannot be decoded ends the connection with an
//!   error, as h2 itself treats it (COMPRESSION_ERROR is a connection error).
//!
//! The frame layout is hand-parsed (nine bytes of RFC 9113 §4.1): h2 keeps its
//! codec private, and the HPACK coding itself comes from `loona-hpack`.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// Frames we write stay within the size every HTTP/2 peer must accept
/// (SETTINGS_MAX_FRAME_SIZE's minimum), whatever the server advertised.
const OUT_FRAME_MAX: usize = 16_384;
/// h2's SETTINGS_HEADER_TABLE_SIZE (its default, which tonic keeps): the
/// most a client may ask our decoder to hold, and what h2 decodes ours with.
const TABLE_SIZE: usize = 4096;
/// A header block larger than this ends the connection (h2's own header
/// list limit is 16 KiB; HPACK can only shrink a list, never grow it 16×).
const BLOCK_MAX: usize = 256 << 10;

/// The authority put in place of one that is not valid.
const REPLACEMENT: &[u8] = b"localhost";

/// A Unix-socket connection as h2 should see it; see the module docs.
pub struct FixAuthority<S> {
    inner: S,
    mode: Mode,
    /// Bytes read from `inner` and not yet looked at.
    input: Vec<u8>,
    /// Bytes ready for h2, handed out from `out_at` on.
    out: Vec<u8>,
    out_at: usize,
    /// Where the reader is in the frame stream (`Inspect` and `Rewrite`).
    at: At,
    /// The header block being gathered: its first frame's header and
    /// priority bytes, the fragments so far, and (while inspecting) its
    /// frames exactly as they came.
    block: Option<Block>,
    hpack: Option<Box<Hpack>>,
}

enum Mode {
    /// Until the first header block is complete.
    Inspect,
    /// The first request needed the repair: every header block is rewritten.
    Rewrite,
    /// Nothing to do: bytes go straight through.
    Raw,
}

#[derive(Clone, Copy)]
enum At {
    Preface,
    FrameStart,
    /// Inside a passed-through frame's payload, this much of it left.
    Payload(usize),
}

struct Block {
    stream: [u8; 4],
    flags: u8,
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
    raw: Vec<u8>,
}

struct Hpack {
    decoder: loona_hpack::Decoder<'static>,
    encoder: loona_hpack::Encoder<'static>,
}

impl<S> FixAuthority<S> {
    pub fn new(inner: S) -> FixAuthority<S> {
        FixAuthority {
            inner,
            mode: Mode::Inspect,
            input: Vec::new(),
            out: Vec::new(),
            out_at: 0,
            at: At::Preface,
            block: None,
            hpack: None,
        }
    }

    /// Moves what can be decided from `input` to `out`; returns when the
    /// rest needs more bytes.
    fn process(&mut self) -> io::Result<()> {
        loop {
            if matches!(self.mode, Mode::Raw) {
                self.out.append(&mut self.input);
                return Ok(());
            }
            match self.at {
                At::Preface => {
                    let n = self.input.len().min(PREFACE.len());
                    if self.input[..n] != PREFACE[..n] {
                        self.mode = Mode::Raw;
                        continue;
                    }
                    if n < PREFACE.len() {
                        return Ok(());
                    }
                    self.out.extend(self.input.drain(..PREFACE.len()));
                    self.at = At::FrameStart;
                }
                At::Payload(0) => self.at = At::FrameStart,
                At::Payload(left) => {
                    if self.input.is_empty() {
                        return Ok(());
                    }
                    let n = left.min(self.input.len());
                    self.out.extend(self.input.drain(..n));
                    self.at = At::Payload(left - n);
                }
                At::FrameStart => {
                    if self.input.len() < FRAME_HEADER {
                        return Ok(());
                    }
                    let head: [u8; FRAME_HEADER] = self.input[..FRAME_HEADER].try_into().unwrap();
                    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
                    let kind = head[3];
                    let in_block = self.block.is_some();
                    if kind != HEADERS && kind != CONTINUATION && !in_block {
                        self.out.extend(self.input.drain(..FRAME_HEADER));
                        self.at = At::Payload(len);
                    } else {
                        if self.input.len() < FRAME_HEADER + len {
                            if len > BLOCK_MAX {
                                return Err(bad("an HTTP/2 header frame over 256 KiB"));
                            }
                            return Ok(());
                        }
                        let frame: Vec<u8> = self.input.drain(..FRAME_HEADER + len).collect();
                        self.header_frame(&frame)?;
                    }
                }
            }
        }
    }

    /// Takes one HEADERS or CONTINUATION frame (header and payload).
    fn header_frame(&mut self, frame: &[u8]) -> io::Result<()> {
        let (kind, flags) = (frame[3], frame[4]);
        let stream: [u8; 4] = frame[5..9].try_into().unwrap();
        let payload = &frame[FRAME_HEADER..];
        match (&mut self.block, kind) {
            (None, HEADERS) => {
                let (priority, fragment) = headers_payload(flags, payload)?;
                self.block = Some(Block {
                    stream,
                    flags,
                    priority,
                    fragment: fragment.to_vec(),
                    raw: frame.to_vec(),
                });
            }
            (Some(b), CONTINUATION) if b.stream == stream => {
                if b.fragment.len() + payload.len() > BLOCK_MAX {
                    return Err(bad("an HTTP/2 header block over 256 KiB"));
                }
                b.fragment.extend_from_slice(payload);
                b.raw.extend_from_slice(frame);
            }
            // A CONTINUATION out of place, or a frame inside a header block:
            // h2 would end the connection for either.
            _ => return Err(bad("an HTTP/2 header block out of sequence")),
        }
        if flags & END_HEADERS != 0 {
            let block = self.block.take().expect("just gathered");
            self.finish_block(block)?;
        }
        Ok(())
    }

    fn finish_block(&mut self, block: Block) -> io::Result<()> {
        let hpack = self.hpack.get_or_insert_with(|| {
            let mut decoder = loona_hpack::Decoder::new();
            decoder.set_max_allowed_table_size(TABLE_SIZE);
            Box::new(Hpack {
                decoder,
                encoder: loona_hpack::Encoder::new(),
            })
        });
        // loona-hpack (as hpack-rs, which it forks) can panic on hostile
        // input (hpack-rs#11): a panic here is that client's bad block.
        let fields = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            hpack.decoder.decode(&block.fragment)
        }))
        .map_err(|_| bad("an HTTP/2 header block that cannot be decoded"))?
        .map_err(|e| {
            bad(&format!(
                "an HTTP/2 header block that cannot be decoded: {e:?}"
            ))
        })?;
        let mut repaired = false;
        let fields: Vec<(Vec<u8>, Vec<u8>)> = fields
            .into_iter()
            .map(|(name, value)| {
                if name == b":authority" && !valid_authority(&value) {
                    repaired = true;
                    (name, REPLACEMENT.to_vec())
                } else {
                    (name, value)
                }
            })
            .collect();
        if matches!(self.mode, Mode::Inspect) {
            if !repaired {
                // h2 decodes the client's own bytes, so its table follows
                // the client's from here on without us.
                self.out.extend_from_slice(&block.raw);
                self.mode = Mode::Raw;
                self.hpack = None;
                return Ok(());
            }
            tracing::debug!(
                "a client sent a socket path as the HTTP/2 :authority; reading it as localhost"
            );
            self.mode = Mode::Rewrite;
        }
        let encoded = hpack
            .encoder
            .encode(fields.iter().map(|(n, v)| (&n[..], &v[..])));
        self.write_block(&block, &encoded);
        Ok(())
    }

    /// Writes `encoded` as a HEADERS frame and as many CONTINUATIONs as it
    /// takes, keeping END_STREAM and the priority of the original.
    fn write_block(&mut self, block: &Block, encoded: &[u8]) {
        let priority: &[u8] = block.priority.as_ref().map_or(&[], |p| &p[..]);
        let first_room = OUT_FRAME_MAX - priority.len();
        let (first, mut rest) = encoded.split_at(encoded.len().min(first_room));
        let mut flags = block.flags & (END_STREAM | PRIORITY);
        if rest.is_empty() {
            flags |= END_HEADERS;
        }
        self.frame(HEADERS, flags, block.stream, &[priority, first]);
        while !rest.is_empty() {
            let (chunk, tail) = rest.split_at(rest.len().min(OUT_FRAME_MAX));
            rest = tail;
            let flags = if rest.is_empty() { END_HEADERS } else { 0 };
            self.frame(CONTINUATION, flags, block.stream, &[chunk]);
        }
    }

    fn frame(&mut self, kind: u8, flags: u8, stream: [u8; 4], parts: &[&[u8]]) {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        self.out.extend_from_slice(&(len as u32).to_be_bytes()[1..]);
        self.out.extend_from_slice(&[kind, flags]);
        self.out.extend_from_slice(&stream);
        for p in parts {
            self.out.extend_from_slice(p);
        }
    }

    /// Hands out what is ready; true if anything was.
    fn drain_out(&mut self, buf: &mut ReadBuf<'_>) -> bool {
        if self.out_at == self.out.len() {
            return false;
        }
        let n = buf.remaining().min(self.out.len() - self.out_at);
        buf.put_slice(&self.out[self.out_at..self.out_at + n]);
        self.out_at += n;
        if self.out_at == self.out.len() {
            self.out.clear();
            self.out_at = 0;
        }
        true
    }
}

/// The priority bytes and header block fragment of a HEADERS payload.
fn headers_payload(flags: u8, payload: &[u8]) -> io::Result<(Option<[u8; 5]>, &[u8])> {
    let mut p = payload;
    let mut pad = 0;
    if flags & PADDED != 0 {
        let (&n, rest) = p
            .split_first()
            .ok_or_else(|| bad("a malformed HTTP/2 HEADERS frame"))?;
        pad = n as usize;
        p = rest;
    }
    let mut priority = None;
    if flags & PRIORITY != 0 {
        if p.len() < 5 {
            return Err(bad("a malformed HTTP/2 HEADERS frame"));
        }
        priority = Some(p[..5].try_into().unwrap());
        p = &p[5..];
    }
    if pad > p.len() {
        return Err(bad("a malformed HTTP/2 HEADERS frame"));
    }
    Ok((priority, &p[..p.len() - pad]))
}

/// As h2 checks it (an `http::uri::Authority`).
fn valid_authority(value: &[u8]) -> bool {
    tonic::codegen::http::uri::Authority::try_from(value).is_ok()
}

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("client sent {what}"))
}

impl<S: AsyncRead + Unpin> AsyncRead for FixAuthority<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.drain_out(buf) {
                return Poll::Ready(Ok(()));
            }
            if matches!(this.mode, Mode::Raw) {
                return Pin::new(&mut this.inner).poll_read(cx, buf);
            }
            this.process()?;
            if this.out_at < this.out.len() {
                continue;
            }
            // Need more bytes from the client.
            let mut chunk = [0u8; 16 << 10];
            let mut rb = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut rb))?;
            if rb.filled().is_empty() {
                // End of stream: whatever is left goes to h2 as it came.
                this.out.append(&mut this.input);
                if let Some(b) = this.block.take() {
                    this.out.extend_from_slice(&b.raw);
                }
                this.mode = Mode::Raw;
                this.drain_out(buf);
                return Poll::Ready(Ok(()));
            }
            this.input.extend_from_slice(rb.filled());
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FixAuthority<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<S: Connected> Connected for FixAuthority<S> {
    type ConnectInfo = S::ConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        f.extend_from_slice(&[kind, flags]);
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn request(authority: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
        [
            (&b":method"[..], &b"POST"[..]),
            (b":scheme", b"http"),
            (b":path", b"/gtar.logd.v1.Logd/ListArchives"),
            (b":authority", authority),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
        ]
        .iter()
        .map(|(n, v)| (n.to_vec(), v.to_vec()))
        .collect()
    }

    fn encode(enc: &mut loona_hpack::Encoder<'static>, fields: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
        enc.encode(fields.iter().map(|(n, v)| (&n[..], &v[..])))
    }

    /// Reads everything through the fixer, `chunk` bytes per read of the
    /// underlying stream, and decodes the header blocks h2 would see.
    async fn through(input: Vec<u8>, chunk: usize) -> (Vec<u8>, Vec<Vec<(Vec<u8>, Vec<u8>)>>) {
        let (mut client, server) = tokio::io::duplex(chunk);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for c in input.chunks(chunk) {
                client.write_all(c).await.unwrap();
            }
        });
        let mut fixed = FixAuthority::new(server);
        let mut out = Vec::new();
        fixed.read_to_end(&mut out).await.unwrap();
        writer.await.unwrap();
        // Decode as h2 would: its own table, fed the bytes we hand out.
        let mut dec = loona_hpack::Decoder::new();
        let mut blocks = Vec::new();
        // Not HTTP/2: nothing to decode.
        let mut p = if out.starts_with(PREFACE) {
            PREFACE.len()
        } else {
            out.len()
        };
        let mut pending: Vec<u8> = Vec::new();
        while p < out.len() {
            let len = u32::from_be_bytes([0, out[p], out[p + 1], out[p + 2]]) as usize;
            let (kind, flags) = (out[p + 3], out[p + 4]);
            let payload = &out[p + 9..p + 9 + len];
            if kind == HEADERS || kind == CONTINUATION {
                let frag = if kind == HEADERS {
                    headers_payload(flags, payload).unwrap().1
                } else {
                    payload
                };
                pending.extend_from_slice(frag);
                if flags & END_HEADERS != 0 {
                    blocks.push(dec.decode(&pending).unwrap());
                    pending.clear();
                }
            }
            p += 9 + len;
        }
        (out, blocks)
    }

    #[tokio::test]
    async fn a_socket_path_authority_becomes_localhost_in_every_request() {
        let mut enc = loona_hpack::Encoder::new();
        let mut input = PREFACE.to_vec();
        input.extend(frame(0x4, 0, 0, &[])); // SETTINGS
        let path = b"/tmp/x/gtar-logd.sock";
        for stream in [1u32, 3, 5] {
            let block = encode(&mut enc, &request(path));
            // The second request's block split over a CONTINUATION, the
            // third padded with a priority.
            match stream {
                3 => {
                    let (a, b) = block.split_at(block.len() / 2);
                    input.extend(frame(HEADERS, 0, stream, a));
                    input.extend(frame(CONTINUATION, END_HEADERS, stream, b));
                }
                5 => {
                    let mut p = vec![3u8, 0, 0, 0, 1, 16];
                    p.extend_from_slice(&block);
                    p.extend_from_slice(&[0; 3]);
                    input.extend(frame(HEADERS, END_HEADERS | PADDED | PRIORITY, stream, &p));
                }
                _ => input.extend(frame(HEADERS, END_HEADERS, stream, &block)),
            }
            input.extend(frame(0x0, END_STREAM, stream, &[0, 0, 0, 0, 2, 8, 1]));
        }
        for chunk in [1, 7, 4096] {
            let (_, blocks) = through(input.clone(), chunk).await;
            assert_eq!(blocks.len(), 3, "chunk {chunk}");
            for b in blocks {
                assert_eq!(b, request(b"localhost"), "chunk {chunk}");
            }
        }
    }

    #[tokio::test]
    async fn a_valid_authority_passes_byte_for_byte() {
        let mut enc = loona_hpack::Encoder::new();
        let mut input = PREFACE.to_vec();
        input.extend(frame(0x4, 0, 0, &[]));
        for stream in [1u32, 3] {
            let block = encode(&mut enc, &request(b"localhost:50051"));
            input.extend(frame(HEADERS, END_HEADERS, stream, &block));
            input.extend(frame(0x0, END_STREAM, stream, &vec![7; 70_000][..]));
        }
        for chunk in [1, 5000] {
            let (out, blocks) = through(input.clone(), chunk).await;
            assert_eq!(out, input);
            assert_eq!(blocks.len(), 2);
        }
    }

    #[tokio::test]
    async fn not_http2_passes_untouched() {
        let input = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
        assert_eq!(through(input.clone(), 3).await.0, input);
    }

    #[tokio::test]
    async fn an_undecodable_block_is_an_error_not_a_panic() {
        // An index far past both tables; an integer that never ends.
        let junks: [&[u8]; 2] = [
            &[0xff, 0xff, 0xff, 0xff, 0x0f],
            &[
                0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            ],
        ];
        for junk in junks {
            let mut input = PREFACE.to_vec();
            input.extend(frame(HEADERS, END_HEADERS, 1, junk));
            let (mut client, server) = tokio::io::duplex(1 << 16);
            use tokio::io::AsyncWriteExt;
            client.write_all(&input).await.unwrap();
            drop(client);
            let mut out = Vec::new();
            let err = FixAuthority::new(server)
                .read_to_end(&mut out)
                .await
                .unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        }
    }
}
