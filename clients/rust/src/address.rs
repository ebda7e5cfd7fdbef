//! Where the daemon listens: a Unix socket or an HTTP/2 (plaintext) TCP address.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use crate::error::{Error, Result};

/// A gtar-logd address.
///
/// Accepted spellings (the gRPC target forms the Python client uses, too):
/// `unix:/path/to.sock`, `unix:///path/to.sock`, `unix:relative.sock`, a bare
/// absolute path `/path/to.sock`, `http://host:port`, and `host:port`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Address {
    /// A Unix domain socket.
    Unix(PathBuf),
    /// A TCP address as an `http://host:port` URI (plaintext HTTP/2).
    Tcp(String),
}

impl Address {
    /// The daemon's default socket: `$XDG_RUNTIME_DIR/gtar-logd/gtar-logd.sock`,
    /// else `/tmp/gtar-logd-$UID/gtar-logd.sock` (what `gtar-logd serve` uses
    /// with no flags).
    pub fn default_socket() -> PathBuf {
        match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
            Some(d) => PathBuf::from(d).join("gtar-logd/gtar-logd.sock"),
            None => {
                // SAFETY: getuid has no preconditions and cannot fail.
                let uid = unsafe { libc::getuid() };
                PathBuf::from(format!("/tmp/gtar-logd-{uid}/gtar-logd.sock"))
            }
        }
    }

    /// The address to use when none is given: `$GTAR_LOGD_ADDRESS`, else
    /// `$GTAR_LOGD_UDS` (the daemon's own variable), else
    /// [`default_socket`](Self::default_socket).
    pub fn from_env() -> Result<Address> {
        if let Some(a) = std::env::var("GTAR_LOGD_ADDRESS")
            .ok()
            .filter(|a| !a.is_empty())
        {
            return a.parse();
        }
        if let Some(p) = std::env::var_os("GTAR_LOGD_UDS").filter(|p| !p.is_empty() && p != "none")
        {
            let p = PathBuf::from(p);
            let p = std::path::absolute(&p).unwrap_or(p);
            return Ok(Address::Unix(p));
        }
        Ok(Address::Unix(Address::default_socket()))
    }
}

impl Address {
    /// The token a TCP request carries (`authorization: Bearer <token>`):
    /// `$GTAR_LOGD_TOKEN`, else the file `$GTAR_LOGD_TOKEN_FILE`, else the
    /// daemon's default token file for the port, `tcp-<PORT>.token` next to
    /// the default socket, when it exists. `None` for a Unix socket (the
    /// kernel tells the daemon who is asking) or when there is no token.
    pub fn token(&self) -> Result<Option<String>> {
        let Address::Tcp(uri) = self else {
            return Ok(None);
        };
        if let Some(t) = std::env::var("GTAR_LOGD_TOKEN")
            .ok()
            .filter(|t| !t.is_empty())
        {
            return Ok(Some(t.trim().to_string()));
        }
        let file = match std::env::var_os("GTAR_LOGD_TOKEN_FILE").filter(|f| !f.is_empty()) {
            Some(f) => PathBuf::from(f),
            None => {
                let Some(port) = uri
                    .rsplit_once(':')
                    .and_then(|(_, p)| p.parse::<u16>().ok())
                else {
                    return Ok(None);
                };
                let sock = Address::default_socket();
                let f = sock
                    .parent()
                    .map_or_else(PathBuf::new, |d| d.join(format!("tcp-{port}.token")));
                if !f.exists() {
                    return Ok(None);
                }
                f
            }
        };
        let t = std::fs::read_to_string(&file).map_err(|e| Error::Address {
            address: self.to_string(),
            why: format!("cannot read the TCP token file {}: {e}", file.display()),
        })?;
        Ok(Some(t.trim().to_string()))
    }
}

impl FromStr for Address {
    type Err = Error;

    fn from_str(s: &str) -> Result<Address> {
        let bad = |why: &str| Error::Address {
            address: s.to_string(),
            why: why.to_string(),
        };
        let s = s.trim();
        if s.is_empty() {
            return Err(bad("empty address"));
        }
        if let Some(rest) = s.strip_prefix("unix:") {
            // unix:///abs, unix://abs (host-less form), unix:/abs, unix:rel
            let path = if let Some(p) = rest.strip_prefix("//") {
                if p.starts_with('/') {
                    p.to_string()
                } else {
                    format!("/{p}")
                }
            } else {
                rest.to_string()
            };
            if path.is_empty() || path == "/" {
                return Err(bad("no socket path after `unix:`"));
            }
            return Ok(Address::Unix(PathBuf::from(path)));
        }
        if s.starts_with('/') {
            return Ok(Address::Unix(PathBuf::from(s)));
        }
        if s.starts_with("https://") {
            return Err(bad(
                "TLS is not supported; the daemon serves plaintext on loopback",
            ));
        }
        let hostport = s.strip_prefix("http://").unwrap_or(s);
        let hostport = hostport.trim_end_matches('/');
        if hostport.contains('/') || hostport.contains("://") {
            return Err(bad(
                "expected `unix:/path`, `http://host:port` or `host:port`",
            ));
        }
        // host:port, with [v6]:port allowed.
        let port = hostport
            .rsplit_once(':')
            .filter(|(h, _)| !h.is_empty())
            .ok_or_else(|| bad("missing port (expected host:port)"))?
            .1;
        port.parse::<u16>()
            .map_err(|_| bad(&format!("port {port:?} is not a number in 0..65535")))?;
        Ok(Address::Tcp(format!("http://{hostport}")))
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Unix(p) => write!(f, "unix:{}", p.display()),
            Address::Tcp(u) => f.write_str(u),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings() {
        let u = |p: &str| Address::Unix(PathBuf::from(p));
        assert_eq!("unix:/a/b.sock".parse::<Address>().unwrap(), u("/a/b.sock"));
        assert_eq!(
            "unix:///a/b.sock".parse::<Address>().unwrap(),
            u("/a/b.sock")
        );
        assert_eq!("unix:rel.sock".parse::<Address>().unwrap(), u("rel.sock"));
        assert_eq!("/a/b.sock".parse::<Address>().unwrap(), u("/a/b.sock"));
        assert_eq!(
            "127.0.0.1:7461".parse::<Address>().unwrap(),
            Address::Tcp("http://127.0.0.1:7461".into())
        );
        assert_eq!(
            "http://localhost:7461/".parse::<Address>().unwrap(),
            Address::Tcp("http://localhost:7461".into())
        );
        assert_eq!(
            "[::1]:7461".parse::<Address>().unwrap(),
            Address::Tcp("http://[::1]:7461".into())
        );
        for bad in [
            "",
            "unix:",
            "localhost",
            "https://x:1",
            "x:notaport",
            "http://x:1/path",
        ] {
            assert!(bad.parse::<Address>().is_err(), "{bad:?} should be refused");
        }
        assert_eq!(u("/x.sock").to_string(), "unix:/x.sock");
    }
}
