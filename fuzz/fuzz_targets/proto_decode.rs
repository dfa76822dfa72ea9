//! The protobuf messages of the peer data plane and the control API (tenax-proto
//! `tenax.v1`) decoded from any bytes, as tonic decodes a received message: a message
//! either decodes or gives a `DecodeError`, never a panic, and what decodes encodes and
//! decodes again to the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use tenax_proto::v1::{
    ControlReply, DrainRequest, ExchangeReply, FrameKind, PeerFrame, StateChunk, StateHeader,
    StateRequest, StatusReply,
};

fn round_trip<M: Message + Default + PartialEq + std::fmt::Debug>(data: &[u8]) -> Option<M> {
    let m = M::decode(data).ok()?;
    let again = M::decode(m.encode_to_vec().as_slice()).expect("an encoded message decodes");
    // NaN doubles (PeerFrame.loss_sum) are not equal to themselves: compare the bytes.
    if again != m {
        assert_eq!(again.encode_to_vec(), m.encode_to_vec());
    }
    Some(m)
}

fuzz_target!(|data: &[u8]| {
    if let Some(f) = round_trip::<PeerFrame>(data) {
        if let Ok(kind) = FrameKind::try_from(f.kind) {
            assert_eq!(FrameKind::from_str_name(kind.as_str_name()), Some(kind));
        }
    }
    let _ = round_trip::<ExchangeReply>(data);
    let _ = round_trip::<StateRequest>(data);
    let _ = round_trip::<StateHeader>(data);
    let _ = round_trip::<StateChunk>(data);
    let _ = round_trip::<StatusReply>(data);
    let _ = round_trip::<DrainRequest>(data);
    let _ = round_trip::<ControlReply>(data);
    let _ = PeerFrame::decode_length_delimited(data);
});
