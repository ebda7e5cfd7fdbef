//! A client with no daemon to talk to: it must say so within a second, in
//! words that name the address it tried, why it failed, how to start a
//! daemon there and where `gtar-logd serve` listens by default. No daemon is
//! started here.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use gtar_logd_client::{blocking, Address, Client, Error};

/// What an absent daemon must be reported within (issue 17).
const FAIL_FAST: Duration = Duration::from_secs(1);

/// One way of having no daemon: the address, what the message must say
/// (the address as shown, the reason, the command to start a daemon there).
struct Absent {
    address: String,
    shown: String,
    why: &'static str,
    start: String,
}

fn absent_daemons(dir: &Path) -> Vec<Absent> {
    // No socket file at all.
    let missing = dir.join("missing.sock");
    // A socket file left behind by a daemon that is gone (kill -9): bound,
    // then nobody listens.
    let stale = dir.join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).expect("bind a socket"));
    assert!(stale.exists());
    // A loopback port nobody listens on (bound, then closed).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port();
    vec![
        Absent {
            address: format!("unix:{}", missing.display()),
            shown: format!("at unix:{}:", missing.display()),
            why: "no such socket file",
            start: format!("`gtar-logd serve --uds {}`", missing.display()),
        },
        Absent {
            // The bare-path spelling.
            address: stale.display().to_string(),
            shown: format!("at unix:{}:", stale.display()),
            why: "connection refused: the socket file exists but no daemon is listening on it",
            start: format!("`gtar-logd serve --uds {}`", stale.display()),
        },
        Absent {
            address: format!("127.0.0.1:{port}"),
            shown: format!("at http://127.0.0.1:{port}:"),
            why: "connection refused: nothing is listening on that port",
            start: format!("`gtar-logd serve --tcp 127.0.0.1:{port}`"),
        },
    ]
}

/// The message says everything a user needs, once, in words.
fn check_message(e: &Error, case: &Absent, took: Duration) {
    let msg = e.to_string();
    assert!(
        took < FAIL_FAST,
        "connecting to {} took {took:?} to fail (limit {FAIL_FAST:?}): {msg}",
        case.address
    );
    assert!(matches!(e, Error::Connect { .. }), "{msg}");
    let default = format!("unix:{}", Address::default_socket().display());
    for want in [
        case.shown.as_str(),
        case.why,
        case.start.as_str(),
        "Is the daemon running?",
        &default,
        "$XDG_RUNTIME_DIR/gtar-logd/gtar-logd.sock, else /tmp/gtar-logd-$UID/gtar-logd.sock",
    ] {
        assert!(msg.contains(want), "no {want:?} in the message: {msg}");
    }
    // Not tonic's bare "transport error", not a struct dump.
    assert!(!msg.contains("transport error"), "{msg}");
    assert_eq!(format!("{e:?}"), msg, "Debug must print the message");
    assert!(!msg.contains('\n'), "one line: {msg}");
}

#[tokio::test]
async fn an_absent_daemon_is_reported_at_once_naming_the_address_and_defaults() {
    let dir = tempfile::tempdir().unwrap();
    for case in absent_daemons(dir.path()) {
        let t = Instant::now();
        let e = Client::connect(&case.address).await.unwrap_err();
        check_message(&e, &case, t.elapsed());
    }
}

#[test]
fn the_blocking_client_reports_an_absent_daemon_the_same_way() {
    let dir = tempfile::tempdir().unwrap();
    for case in absent_daemons(dir.path()) {
        let t = Instant::now();
        let e = blocking::Client::connect(&case.address).unwrap_err();
        check_message(&e, &case, t.elapsed());
    }
}

/// The example as a user runs it with no daemon and no address: one
/// readable line on stderr pointing at `gtar-logd serve` and the default
/// socket it tried, exit status 1.
#[test]
fn the_example_without_a_daemon_prints_a_sentence_not_a_debug_dump() {
    let exe = support::example_bin("quickstart");
    let runtime = tempfile::tempdir().unwrap();
    let default = runtime.path().join("gtar-logd/gtar-logd.sock");
    let t = Instant::now();
    let out = std::process::Command::new(&exe)
        .env("XDG_RUNTIME_DIR", runtime.path())
        .env_remove("GTAR_LOGD_ADDRESS")
        .env_remove("GTAR_LOGD_UDS")
        .output()
        .expect("run the quickstart example");
    let took = t.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let want_prefix = format!(
        "quickstart: cannot connect to gtar-logd at unix:{}: no such socket file",
        default.display()
    );
    assert!(stderr.starts_with(&want_prefix), "stderr: {stderr}");
    for want in [
        "Start it with `gtar-logd serve`: with no flags it listens on this socket",
        "listening address=",
    ] {
        assert!(stderr.contains(want), "no {want:?} in: {stderr}");
    }
    for dump in ["Connect {", "source:", "tonic::transport"] {
        assert!(!stderr.contains(dump), "a Debug dump ({dump:?}): {stderr}");
    }
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
    // A whole process (runtime start included): generous, the in-process
    // tests above hold the 1 s limit.
    assert!(took < Duration::from_secs(5), "took {took:?}");
}
