//! Frame codec throughput: encoding DATA frames of the largest payload, and decoding a stream
//! of them as it arrives in websocket messages (several frames per message).

use bytes::{Bytes, BytesMut};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use securetunnel_agent::protocol::{FrameCodec, FrameReader, MAX_PAYLOAD, Message};
use tokio_util::codec::Encoder;

fn codec(c: &mut Criterion) {
    let payload = Bytes::from(vec![0x5a; MAX_PAYLOAD]);
    let msg = Message::data(7, "SSH", 3, payload);
    let mut g = c.benchmark_group("codec");
    g.throughput(Throughput::Bytes(MAX_PAYLOAD as u64));
    let mut out = BytesMut::with_capacity(2 * MAX_PAYLOAD);
    g.bench_function("encode 64512-byte DATA", |b| {
        b.iter(|| {
            out.clear();
            FrameCodec.encode(&msg, &mut out).unwrap();
            std::hint::black_box(&out);
        })
    });

    // 32 frames cut into 131076-byte websocket messages, as the service may send them.
    let mut wire = BytesMut::new();
    for _ in 0..32 {
        FrameCodec.encode(&msg, &mut wire).unwrap();
    }
    let wire = wire.freeze();
    let messages: Vec<Bytes> = wire.chunks(131_076).map(|c| wire.slice_ref(c)).collect();
    g.throughput(Throughput::Bytes(32 * MAX_PAYLOAD as u64));
    g.bench_function("decode 32 frames from websocket messages", |b| {
        b.iter(|| {
            let mut reader = FrameReader::new(FrameCodec);
            let mut n = 0;
            for m in &messages {
                reader.push(m.clone());
                while let Some(frame) = reader.next_frame().unwrap() {
                    n += frame.payload.len();
                }
            }
            assert_eq!(n, 32 * MAX_PAYLOAD);
        })
    });
    g.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
