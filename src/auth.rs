//! The TCP token: TCP carries no identity (any local user can connect to a
//! loopback port), so a daemon that listens on TCP writes a random token to
//! a file only its user can read, and answers TCP requests only when they
//! carry `authorization: Bearer <token>` — Jupyter's scheme.
//!
//! Invariants:
//! * The token file is created 0600 (never wider, not even for a moment: it
//!   is written to a fresh 0600 file that is then renamed into place) in a
//!   directory owned by the daemon's user and closed to others (0700); a
//!   directory someone else owns is refused, not used.
//! * Every request on a TCP listener is checked ([`RequireToken`] wraps the
//!   whole router: Logd, health and reflection alike); the Unix socket is
//!   not (its peer is known from the kernel). Without a token configured
//!   (`--tcp-allow-anonymous`), the layer lets everything through.
//! * The comparison takes the same time whatever the bytes (`subtle`).
//! * The default file is named after the port (`tcp-<PORT>.token`) in the
//!   default socket's directory, so several daemons of one user don't
//!   overwrite each other's token and a client finds it from the address.

use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::codegen::http;

/// The token a TCP request must present, and the file that holds it.
#[derive(Debug)]
pub struct Token {
    secret: String,
    file: PathBuf,
}

impl Token {
    /// The file the token is in (named in UNAUTHENTICATED answers).
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// Whether an `authorization` header value is `Bearer <this token>`.
    pub fn accepts(&self, header: Option<&[u8]>) -> bool {
        use subtle::ConstantTimeEq;
        let Some(h) = header else { return false };
        let Some(given) = h.strip_prefix(b"Bearer ") else {
            return false;
        };
        given.ct_eq(self.secret.as_bytes()).into()
    }
}

/// `tcp-<port>.token` next to the default socket: `$XDG_RUNTIME_DIR/gtar-logd/`,
/// else `/tmp/gtar-logd-$UID/` (the clients compute the same name).
pub fn default_token_file(port: u16) -> PathBuf {
    let sock = crate::listen::default_uds();
    let dir = sock.parent().unwrap_or(Path::new("/tmp"));
    dir.join(format!("tcp-{port}.token"))
}

/// Make `dir` (and its parents) exist, with `dir` owned by us and closed
/// to others. A directory owned by another user is an error: whoever owns
/// it could swap the token file.
fn private_dir(dir: &Path) -> io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let md = std::fs::symlink_metadata(dir)?;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if !md.is_dir() || md.uid() != me {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} is not a directory owned by uid {me}; refusing to put the TCP token there \
                 (give --token-file)",
                dir.display()
            ),
        ));
    }
    if md.mode() & 0o077 != 0 {
        // Ours: close it (the socket's directory is 0700 when we create it).
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// A fresh random token (32 bytes from the OS, hex).
fn random_secret() -> io::Result<String> {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).map_err(|e| io::Error::other(format!("random token: {e}")))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// Create a new token and write it to `file` (mode 0600, replacing an old
/// one); see the module docs.
pub fn create(file: &Path) -> io::Result<Token> {
    let secret = random_secret()?;
    let dir = file.parent().filter(|d| !d.as_os_str().is_empty());
    if let Some(d) = dir {
        private_dir(d).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", d.display())))?;
    }
    let tmp = file.with_extension(format!("tmp{}", std::process::id()));
    let write = || -> io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(secret.as_bytes())?;
        f.write_all(b"\n")?;
        f.sync_all()?;
        std::fs::rename(&tmp, file)
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(io::Error::new(
            e.kind(),
            format!("cannot write the TCP token file {}: {e}", file.display()),
        ));
    }
    Ok(Token {
        secret,
        file: file.to_path_buf(),
    })
}

/// Tower layer for a TCP listener's router (module docs).
#[derive(Clone)]
pub struct RequireTokenLayer(pub Option<Arc<Token>>);

impl<S> tower::Layer<S> for RequireTokenLayer {
    type Service = RequireToken<S>;
    fn layer(&self, inner: S) -> RequireToken<S> {
        RequireToken {
            inner,
            token: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RequireToken<S> {
    inner: S,
    token: Option<Arc<Token>>,
}

impl<S, B> tower::Service<http::Request<B>> for RequireToken<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if let Some(t) = &self.token {
            let header = req
                .headers()
                .get(http::header::AUTHORIZATION)
                .map(|v| v.as_bytes());
            if !t.accepts(header) {
                let msg = format!(
                    "TCP needs `authorization: Bearer <token>`; the token is in {} \
                     (readable by the daemon's user only; the gtar-logd clients read it \
                     themselves). The Unix socket needs no token.",
                    t.file().display()
                );
                let resp = tonic::Status::unauthenticated(msg).into_http();
                return Box::pin(async move { Ok(resp) });
            }
        }
        Box::pin(self.inner.call(req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_file_is_private_and_checked() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("sub/tcp-1.token");
        let t = create(&f).unwrap();
        let md = std::fs::metadata(&f).unwrap();
        assert_eq!(md.mode() & 0o777, 0o600);
        let dmd = std::fs::metadata(f.parent().unwrap()).unwrap();
        assert_eq!(dmd.mode() & 0o777, 0o700);
        let secret = std::fs::read_to_string(&f).unwrap();
        let secret = secret.trim();
        assert_eq!(secret.len(), 64);
        assert!(t.accepts(Some(format!("Bearer {secret}").as_bytes())));
        assert!(!t.accepts(Some(secret.as_bytes())));
        assert!(!t.accepts(Some(b"Bearer ")));
        assert!(!t.accepts(None));
        // A second daemon on the same file gets a different token.
        let t2 = create(&f).unwrap();
        assert!(!t2.accepts(Some(format!("Bearer {secret}").as_bytes())));
    }

    #[test]
    fn a_directory_of_another_user_is_refused() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root to make a directory owned by someone else");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let other = d.path().join("other");
        std::fs::create_dir(&other).unwrap();
        std::os::unix::fs::chown(&other, Some(65534), None).unwrap();
        let e = create(&other.join("t.token")).unwrap_err();
        assert!(e.to_string().contains("not a directory owned by"), "{e}");
    }
}
