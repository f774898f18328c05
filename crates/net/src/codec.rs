//! Frames of the stage protocol on a libp2p stream: a 4-byte little-endian length, then the
//! postcard body of a [`Request`] or [`Response`] (see `plexus_core::wire`).
//!
//! A frame longer than [`MAX_FRAME_BYTES`] is refused before it is read (the stream fails and
//! the peer is disconnected). A frame of the right size that does not decode is handed up as
//! `Err(DecodeError)`, so the node can answer `BadRequest` and count the offence. Bytes in
//! both directions are counted for the bytes-per-token metrics.

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;
use plexus_core::wire::{
    decode_request, decode_response, encode, DecodeError, Request, Response, MAX_FRAME_BYTES,
};
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Bytes sent and received on stage streams (frame bodies plus prefixes).
#[derive(Debug, Default)]
pub struct WireCounters {
    pub sent: AtomicU64,
    pub received: AtomicU64,
    /// Frames refused as oversized or undecodable.
    pub rejected: AtomicU64,
}

/// The request-response codec of [`plexus_core::wire::STAGE_PROTOCOL`].
#[derive(Clone, Default)]
pub struct StageCodec {
    pub counters: Arc<WireCounters>,
}

async fn read_frame<T: AsyncRead + Unpin + Send>(
    io: &mut T,
    counters: &WireCounters,
) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME_BYTES {
        counters.rejected.fetch_add(1, Ordering::Relaxed);
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            DecodeError::TooLarge(len),
        ));
    }
    let mut body = vec![0u8; len];
    io.read_exact(&mut body).await?;
    counters
        .received
        .fetch_add(4 + len as u64, Ordering::Relaxed);
    Ok(body)
}

async fn write_frame<T: AsyncWrite + Unpin + Send>(
    io: &mut T,
    body: &[u8],
    counters: &WireCounters,
) -> io::Result<()> {
    io.write_all(&(body.len() as u32).to_le_bytes()).await?;
    io.write_all(body).await?;
    io.close().await?;
    counters
        .sent
        .fetch_add(4 + body.len() as u64, Ordering::Relaxed);
    Ok(())
}

impl libp2p::request_response::Codec for StageCodec {
    type Protocol = StreamProtocol;
    type Request = Result<Request, DecodeError>;
    type Response = Response;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Self::Request>
    where
        T: AsyncRead + Unpin + Send,
    {
        let body = read_frame(io, &self.counters).await?;
        let req = decode_request(&body);
        if req.is_err() {
            self.counters.rejected.fetch_add(1, Ordering::Relaxed);
        }
        Ok(req)
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Response>
    where
        T: AsyncRead + Unpin + Send,
    {
        let body = read_frame(io, &self.counters).await?;
        decode_response(&body).map_err(|e| {
            self.counters.rejected.fetch_add(1, Ordering::Relaxed);
            io::Error::new(io::ErrorKind::InvalidData, e)
        })
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Self::Request,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        let req = req.map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        write_frame(io, &encode(&req), &self.counters).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        resp: Response,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, &encode(&resp), &self.counters).await
    }
}
