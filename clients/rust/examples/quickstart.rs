//! Quickstart: write a few frames of a small "model" to gtar-logd, wait until
//! they are durable, then read the last frame back and print it.
//!
//! ```text
//! gtar-logd serve &                      # in another terminal
//! cargo run -p gtar-logd-client --example quickstart -- [ADDRESS] [ARCHIVE]
//! ```
//!
//! ADDRESS is `unix:/path/to.sock` or `host:port` (default: the daemon's
//! default socket); ARCHIVE is relative to the daemon's data directory
//! (default `quickstart.zip`).

use gtar_logd_client::half::f16;
use gtar_logd_client::ndarray::{Array1, Array2};
use gtar_logd_client::{Client, FrameQuery, FrameSel, NewFrame, OpenOptions};

/// The "model" at a given epoch: a dense layer and an f16 embedding table.
fn model(epoch: usize) -> (Array2<f32>, Array1<f32>, Array2<f16>) {
    let e = epoch as f32;
    let weight = Array2::from_shape_fn((4, 3), |(i, j)| (i * 3 + j) as f32 * 0.1 + e);
    let bias = Array1::from_elem(3, -e);
    let table = Array2::from_shape_fn((2, 4), |(i, j)| f16::from_f32((i * 4 + j) as f32 / 8.0 + e));
    (weight, bias, table)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let address = args.next().unwrap_or_default();
    let archive = args.next().unwrap_or_else(|| "quickstart.zip".into());
    const EPOCHS: usize = 3;

    let client = Client::connect(&address).await?;
    println!("connected to {}", client.address());

    // One write stream; everything goes under the group "quickstart".
    let mut writer = client
        .writer(&archive, OpenOptions::create().group("quickstart"))
        .await?;
    writer
        .record(
            "model.json",
            br#"{"layers": ["dense", "embedding"]}"#.to_vec(),
        )
        .await?;
    for epoch in 0..EPOCHS {
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
    println!("{} commits durable", writer.commits());
    writer.close().await?;

    // Read the last frame back.
    let frames = client.list_frames(&archive, "quickstart").await?;
    println!("frames: {frames:?}");
    let last = client
        .query_frame(
            &archive,
            &FrameQuery::new(FrameSel::LAST).group("quickstart"),
        )
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
    let (weight, bias, table) = model(EPOCHS - 1);
    let get = |g: &str, n: &str| {
        last.get(&format!("quickstart/{g}"), n)
            .map(|t| t.array.clone())
            .ok_or_else(|| format!("quickstart/{g}/{n} missing from the last frame"))
    };
    let ok = get("dense", "weight")?.as_array::<f32>() == Some(&weight.into_dyn())
        && get("dense", "bias")?.as_array::<f32>() == Some(&bias.into_dyn())
        && get("embedding", "table")?.as_array::<f16>() == Some(&table.into_dyn());
    if !ok {
        return Err("the last frame read back differs from what was written".into());
    }
    let model_json = client
        .read_record(&archive, "quickstart/model.json")
        .await?;
    println!("model.json: {}", String::from_utf8_lossy(&model_json));
    println!("quickstart OK");
    Ok(())
}
