//! Quickstart: append a few frames of a small "model" to an archive through
//! gtar-logd, wait until they are durable, then read the last frame back and
//! check it.
//!
//! ```text
//! gtar-logd serve                        # in another terminal
//! cargo run -p gtar-logd-client --example quickstart -- [ADDRESS] [ARCHIVE]
//! ```
//!
//! ADDRESS is `unix:/path/to.sock` or `host:port` (empty or absent: the
//! daemon's default socket); ARCHIVE is relative to the daemon's data
//! directory (default `quickstart.zip`).
//!
//! It appends (`OpenOptions::append()`): an existing archive keeps every
//! frame, record and group it has, and each run adds three frames numbered
//! after the last one of the group `quickstart`.

use std::process::ExitCode;

use gtar_logd_client::half::f16;
use gtar_logd_client::ndarray::{Array1, Array2};
use gtar_logd_client::{Client, FrameQuery, FrameSel, NewFrame, OpenOptions};

/// The group everything of this example goes under.
const GROUP: &str = "quickstart";

/// Frames each run appends.
const FRAMES: u64 = 3;

/// The "model" at a given epoch: a dense layer and an f16 embedding table.
fn model(epoch: u64) -> (Array2<f32>, Array1<f32>, Array2<f16>) {
    let e = epoch as f32;
    let weight = Array2::from_shape_fn((4, 3), |(i, j)| (i * 3 + j) as f32 * 0.1 + e);
    let bias = Array1::from_elem(3, -e);
    let table = Array2::from_shape_fn((2, 4), |(i, j)| f16::from_f32((i * 4 + j) as f32 / 8.0 + e));
    (weight, bias, table)
}

type BoxError = Box<dyn std::error::Error>;

async fn run(address: &str, archive: &str) -> Result<(), BoxError> {
    let client = Client::connect(address).await?;
    println!("connected to {}", client.address());

    // Append: a missing archive is created, an existing one keeps everything.
    let mut writer = client
        .writer(archive, OpenOptions::append().group(GROUP))
        .await?;
    // Number the new frames after the group's last numbered frame.
    let first = if writer.opened().existing_frames == 0 {
        0
    } else {
        let existing = client.list_frames(archive, GROUP).await?;
        existing
            .iter()
            .filter_map(|f| f.parse::<u64>().ok())
            .max()
            .map_or(0, |last| last + 1)
    };
    println!(
        "{archive}: {} frame(s) in group {GROUP:?} already; appending frames {first}..{}",
        writer.opened().existing_frames,
        first + FRAMES - 1
    );

    // A constant record (not a frame): the model's description.
    writer
        .record(
            "model.json",
            br#"{"layers": ["dense", "embedding"]}"#.to_vec(),
        )
        .await?;
    for epoch in first..first + FRAMES {
        let (weight, bias, table) = model(epoch);
        let frame = NewFrame::new(epoch.to_string())
            .tensor("dense", "weight", &weight)
            .tensor("dense", "bias", &bias)
            .tensor("embedding", "table", &table)
            .scalar("metrics", "loss", 1.0 / (epoch + 1) as f64);
        // `write` returns once the frame is handed over; the training loop
        // would go on here while the daemon writes.
        let mut handle = writer.write(frame).await?;
        let ack = handle.received().await?;
        println!("frame {} received ({} bytes)", ack.index, ack.bytes);
    }
    writer.wait_durable().await?;
    println!(
        "{} frames durable (fsynced), and the model.json record",
        writer.frames()
    );
    writer.close().await?;

    // Read the last frame back.
    let frames = client.list_frames(archive, GROUP).await?;
    println!("frames in group {GROUP:?}: {frames:?}");
    let last = client
        .query_frame(archive, &FrameQuery::new(FrameSel::LAST).group(GROUP))
        .await?;
    println!("last frame {}:", last.index);
    for t in &last.tensors {
        println!(
            "  {} ({} {:?})\n{}",
            t.path,
            t.array.dtype(),
            t.array.shape(),
            t.array
        );
    }

    // Check it is what was written.
    let want_index = (first + FRAMES - 1).to_string();
    if last.index != want_index {
        return Err(format!(
            "the last frame is {:?}, expected {want_index:?}",
            last.index
        )
        .into());
    }
    let (weight, bias, table) = model(first + FRAMES - 1);
    let get = |g: &str, n: &str| {
        last.get(&format!("{GROUP}/{g}"), n)
            .map(|t| t.array.clone())
            .ok_or_else(|| format!("{GROUP}/{g}/{n} missing from the last frame"))
    };
    let ok = get("dense", "weight")?.as_array::<f32>() == Some(&weight.into_dyn())
        && get("dense", "bias")?.as_array::<f32>() == Some(&bias.into_dyn())
        && get("embedding", "table")?.as_array::<f16>() == Some(&table.into_dyn());
    if !ok {
        return Err("the last frame read back differs from what was written".into());
    }
    let model_json = client
        .read_record(archive, &format!("{GROUP}/model.json"))
        .await?;
    println!("model.json: {}", String::from_utf8_lossy(&model_json));
    println!("quickstart OK");
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let address = args.next().unwrap_or_default();
    let archive = args.next().unwrap_or_else(|| "quickstart.zip".into());
    match run(&address, &archive).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Display, not Debug: a sentence that says what to do.
            eprintln!("quickstart: {e}");
            ExitCode::FAILURE
        }
    }
}
