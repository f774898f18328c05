//! Frames of the stage protocol on a libp2p stream: a 4-byte little-endian length, then the
//! postcard body of a [`Request`] or [`Response`] (see `plexus_core::wire`).
//!
//! A frame longer than [`plexus_core::wire::MAX_FRAME_BYTES`] is refused before its body is
//! read, and a frame of the right size that does not decode is refused after: both are handed
//! up as `Err(DecodeError)`, so the node can answer `BadRequest` and count the offence (an
//! oversized frame strikes the peer out at once). Bytes in
//! both directions are counted for the bytes-per-token metrics.

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;
use plexus_core::wire::{
    decode_request, decode_response, encode, frame_len, DecodeError, Request, Response,
};
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Bytes reserved for a frame body before its bytes arrive.
const INITIAL_BUFFER: usize = 64 * 1024;

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

/// Reads one frame. `Ok(Err(TooLarge))` when the prefix announces more than the limit (the
/// body is left unread).
async fn read_frame<T: AsyncRead + Unpin + Send>(
    io: &mut T,
    counters: &WireCounters,
) -> io::Result<Result<Vec<u8>, DecodeError>> {
    let mut prefix = [0u8; 4];
    io.read_exact(&mut prefix).await?;
    let len = match frame_len(prefix) {
        Ok(len) => len,
        Err(e) => {
            counters.rejected.fetch_add(1, Ordering::Relaxed);
            return Ok(Err(e));
        }
    };
    // Grow with the bytes that actually arrive: a peer that announces 32 MiB and then stalls
    // costs a small buffer, not the announced size.
    let mut body = Vec::with_capacity(len.min(INITIAL_BUFFER));
    io.take(len as u64).read_to_end(&mut body).await?;
    if body.len() != len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("frame ended after {} of {len} bytes", body.len()),
        ));
    }
    counters
        .received
        .fetch_add(4 + len as u64, Ordering::Relaxed);
    Ok(Ok(body))
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
        // An oversized frame is handed up as a decode error too, not as an I/O error: libp2p
        // reports nothing for a request whose reading failed, so the sender would never be
        // struck.
        let req = read_frame(io, &self.counters)
            .await?
            .and_then(|body| decode_request(&body));
        if let Err(DecodeError::Malformed(_) | DecodeError::Trailing(_) | DecodeError::Invalid(_)) =
            &req
        {
            self.counters.rejected.fetch_add(1, Ordering::Relaxed);
        }
        Ok(req)
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Response>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_frame(io, &self.counters)
            .await?
            .and_then(|body| decode_response(&body))
            .map_err(|e| {
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
        let body = encode(&req).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        write_frame(io, &body, &self.counters).await
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
        let body = encode(&resp).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        write_frame(io, &body, &self.counters).await
    }
}
