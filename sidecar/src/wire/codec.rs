//! The codec of the sidecar's `Generation` client and server: prost for
//! requests and `ListModels`, bytes in and bytes out for [`Relayed`] token
//! messages.
//!
//! tonic's prost codec allocates an 8 KiB buffer per stream for each
//! direction it encodes or decodes; a sidecar holds two per stream (the
//! caller's replies it encodes, the instance's it decodes), 16 KiB of a
//! stream's cost, for messages of tens of bytes. These buffers start at
//! [`BUFFER`] and grow only for a larger message.

use std::marker::PhantomData;

use bytes::{Buf, BufMut};
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

use super::Relayed;

/// A stream's encode and decode buffers start at this size: room for a
/// burst of token messages (tens of bytes each, the last one with usage).
/// A larger message grows the buffer to fit.
pub const BUFFER: usize = 512;

/// When this much is encoded and more messages are ready (a backlog), it
/// goes out as one chunk, so a backlog does not grow a stream's buffer past
/// this (tonic's default is 32 KiB).
pub const YIELD_THRESHOLD: usize = 4 << 10;

fn settings() -> BufferSettings {
    BufferSettings::new(BUFFER, YIELD_THRESHOLD)
}

/// A message the sidecar's codec writes and reads.
pub trait WireMessage: Sized + Send + 'static {
    fn encode_to(self, dst: &mut EncodeBuf<'_>);
    fn decode_from(src: &mut DecodeBuf<'_>) -> Result<Self, prost::DecodeError>;
}

impl<M: prost::Message + Default + 'static> WireMessage for M {
    fn encode_to(self, dst: &mut EncodeBuf<'_>) {
        // `EncodeBuf` grows as needed, so encoding cannot run out of room.
        self.encode(dst).expect("an EncodeBuf grows to fit");
    }

    fn decode_from(src: &mut DecodeBuf<'_>) -> Result<Self, prost::DecodeError> {
        M::decode(src)
    }
}

impl WireMessage for Relayed {
    fn encode_to(self, dst: &mut EncodeBuf<'_>) {
        dst.put_slice(self.encoded());
    }

    /// Takes the message's bytes from the stream's buffer without copying.
    fn decode_from(src: &mut DecodeBuf<'_>) -> Result<Self, prost::DecodeError> {
        Relayed::decode(src.copy_to_bytes(src.remaining()))
    }
}

/// `T` out, `U` in (the generated client and server pick them).
pub struct WireCodec<T, U>(PhantomData<fn() -> (T, U)>);

impl<T, U> Default for WireCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T: WireMessage, U: WireMessage> Codec for WireCodec<T, U> {
    type Encode = T;
    type Decode = U;
    type Encoder = WireEncoder<T>;
    type Decoder = WireDecoder<U>;

    fn encoder(&mut self) -> WireEncoder<T> {
        WireEncoder(PhantomData)
    }

    fn decoder(&mut self) -> WireDecoder<U> {
        WireDecoder(PhantomData)
    }
}

pub struct WireEncoder<T>(PhantomData<fn(T)>);

impl<T: WireMessage> Encoder for WireEncoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, item: T, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.encode_to(dst);
        Ok(())
    }

    fn buffer_settings(&self) -> BufferSettings {
        settings()
    }
}

pub struct WireDecoder<U>(PhantomData<fn() -> U>);

impl<U: WireMessage> Decoder for WireDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode_from(src).map(Some).map_err(|e| Status::internal(format!("malformed message: {e}")))
    }

    fn buffer_settings(&self) -> BufferSettings {
        settings()
    }
}
