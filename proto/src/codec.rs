//! The protobuf codec of every tunnel RPC: tonic-prost's, with small
//! starting buffers.
//!
//! tonic allocates an encode and a decode buffer for every stream when it
//! opens, 8 KiB each by default: 32 KiB per proxied connection across edge
//! and agent before a byte moves. These start at 1 KiB and grow with the
//! messages (`BytesMut` reclaims and doubles), so an idle connection stays
//! small and a bulk one reaches its frame size after its first frames.

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstDecoder, ProstEncoder};

/// First size of a stream's encode and decode buffers.
const BUFFER_SIZE: usize = 1024;
/// tonic's default: the encoder hands h2 a batch once this much is queued.
const YIELD_THRESHOLD: usize = 32 * 1024;

/// See the module documentation.
#[derive(Debug, Clone)]
pub struct TunnelCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for TunnelCodec<T, U> {
    fn default() -> Self {
        TunnelCodec(PhantomData)
    }
}

impl<T, U> Codec for TunnelCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(BufferSettings::new(BUFFER_SIZE, YIELD_THRESHOLD))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(BufferSettings::new(BUFFER_SIZE, YIELD_THRESHOLD))
    }
}
