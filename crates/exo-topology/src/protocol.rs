//! The wire protocols of cluster membership beyond libp2p's own: the protocol version carried in
//! identify, the profile exchange and the bandwidth probe.

use std::io;
use std::time::{Duration, Instant};

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;
use libp2p::request_response::Codec;

/// The cluster protocol version, sent as identify's `protocol_version`. Nodes whose major
/// versions differ refuse each other (and say so in their diagnostics). Major 2: the shard
/// service's ring of links and deliveries, which nodes of major 1 do not speak.
pub const PROTOCOL_VERSION: &str = "/exo/2.0.0";

/// The profile exchange: each side sends its [`crate::NodeProfile`] and gets the other's back.
pub(crate) const PROFILE_PROTOCOL: StreamProtocol = StreamProtocol::new("/exo/profile/1.0.0");
/// The bandwidth probe (see [`ProbeCodec`]).
pub(crate) const PROBE_PROTOCOL: StreamProtocol = StreamProtocol::new("/exo/probe/1.0.0");
/// A cluster key rotation (see [`RekeyRequest`]).
pub(crate) const REKEY_PROTOCOL: StreamProtocol = StreamProtocol::new("/exo/rekey/1.0.0");

/// A member hands the cluster's next key to another (inside the connection the current key
/// and Noise protect), leaving out the nodes it revokes.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct RekeyRequest {
    /// The new key, 64 hexadecimal digits.
    pub(crate) key: String,
    /// The nodes left out: they keep the old key, which opens nothing any more.
    pub(crate) revoked: Vec<crate::NodeId>,
}

impl std::fmt::Display for RekeyRequest {
    // Never the key itself.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "a new cluster key, revoking {} node(s)",
            self.revoked.len()
        )
    }
}

/// Whether a node took the new key.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct RekeyReply {
    pub(crate) accepted: bool,
    pub(crate) message: String,
}

/// Whether a peer announcing `theirs` can work with a node running `ours`: same protocol family
/// and the same major version.
pub(crate) fn compatible(ours: &str, theirs: &str) -> bool {
    fn major(v: &str) -> Option<&str> {
        let rest = v.strip_prefix("/exo/")?;
        rest.split('.').next().filter(|m| !m.is_empty())
    }
    matches!((major(ours), major(theirs)), (Some(a), Some(b)) if a == b)
}

/// The largest transfer a probe may announce; anything bigger is refused unread.
pub(crate) const MAX_PROBE_BYTES: u64 = 64 << 20;

/// A bandwidth probe request.
///
/// A probe is two exchanges. `Ask` is answered at once: [`ProbeResponse::Go`] if the receiver
/// is taking part in no other probe, else [`ProbeResponse::Busy`]. After `Go`, `Data` carries
/// the payload, which the receiver times from the first byte to the last (so neither the round
/// trip nor any queueing counts) and answers with [`ProbeResponse::Measured`]. A node takes part
/// in one probe at a time, so two probes never share (and never halve) a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ProbeRequest {
    /// May I send?
    Ask,
    /// The payload: `bytes` bytes; `elapsed` is filled in by the reading side.
    Data {
        bytes: u64,
        elapsed: Option<Duration>,
    },
}

/// A bandwidth probe response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ProbeResponse {
    /// Send now.
    Go,
    /// Taking part in another probe; ask again later.
    Busy,
    /// The payload took `micros` microseconds to arrive, first byte to last.
    Measured { bytes: u64, micros: u64 },
}

/// Reads and writes [`ProbeRequest`] and [`ProbeResponse`]: a tag byte, then little-endian
/// numbers, then (for `Data`) the payload.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ProbeCodec;

const TAG_ASK: u8 = 1;
const TAG_DATA: u8 = 2;
const TAG_GO: u8 = 3;
const TAG_MEASURED: u8 = 4;
const TAG_BUSY: u8 = 5;
const CHUNK: usize = 64 << 10;

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

async fn read_u64<T: AsyncRead + Unpin>(io: &mut T) -> io::Result<u64> {
    let mut buf = [0u8; 8];
    io.read_exact(&mut buf).await?;
    Ok(u64::from_le_bytes(buf))
}

impl Codec for ProbeCodec {
    type Protocol = StreamProtocol;
    type Request = ProbeRequest;
    type Response = ProbeResponse;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<ProbeRequest>
    where
        T: AsyncRead + Unpin + Send,
    {
        let mut tag = [0u8; 1];
        io.read_exact(&mut tag).await?;
        match tag[0] {
            TAG_ASK => Ok(ProbeRequest::Ask),
            TAG_DATA => {
                let bytes = read_u64(io).await?;
                if bytes > MAX_PROBE_BYTES {
                    return Err(invalid(format!(
                        "probe of {bytes} bytes exceeds the limit of {MAX_PROBE_BYTES}"
                    )));
                }
                // The clock starts when the header has arrived: the payload follows it
                // immediately, so what is timed is the payload's transfer alone.
                let start = Instant::now();
                let mut buf = vec![0u8; CHUNK];
                let mut left = bytes;
                while left > 0 {
                    let want = left.min(CHUNK as u64) as usize;
                    let n = io.read(&mut buf[..want]).await?;
                    if n == 0 {
                        return Err(io::ErrorKind::UnexpectedEof.into());
                    }
                    left -= n as u64;
                }
                Ok(ProbeRequest::Data {
                    bytes,
                    elapsed: Some(start.elapsed()),
                })
            }
            other => Err(invalid(format!("unknown probe request tag {other}"))),
        }
    }

    async fn read_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<ProbeResponse>
    where
        T: AsyncRead + Unpin + Send,
    {
        let mut tag = [0u8; 1];
        io.read_exact(&mut tag).await?;
        match tag[0] {
            TAG_GO => Ok(ProbeResponse::Go),
            TAG_BUSY => Ok(ProbeResponse::Busy),
            TAG_MEASURED => {
                let bytes = read_u64(io).await?;
                let micros = read_u64(io).await?;
                Ok(ProbeResponse::Measured { bytes, micros })
            }
            other => Err(invalid(format!("unknown probe response tag {other}"))),
        }
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        request: ProbeRequest,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        match request {
            ProbeRequest::Ask => io.write_all(&[TAG_ASK]).await?,
            ProbeRequest::Data { bytes, .. } => {
                let mut header = [0u8; 9];
                header[0] = TAG_DATA;
                header[1..].copy_from_slice(&bytes.to_le_bytes());
                io.write_all(&header).await?;
                // The payload's content does not matter: the link encrypts it anyway.
                let chunk = vec![0x5a_u8; CHUNK];
                let mut left = bytes;
                while left > 0 {
                    let n = left.min(CHUNK as u64) as usize;
                    io.write_all(&chunk[..n]).await?;
                    left -= n as u64;
                }
            }
        }
        io.close().await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        response: ProbeResponse,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        match response {
            ProbeResponse::Go => io.write_all(&[TAG_GO]).await?,
            ProbeResponse::Busy => io.write_all(&[TAG_BUSY]).await?,
            ProbeResponse::Measured { bytes, micros } => {
                let mut buf = [0u8; 17];
                buf[0] = TAG_MEASURED;
                buf[1..9].copy_from_slice(&bytes.to_le_bytes());
                buf[9..].copy_from_slice(&micros.to_le_bytes());
                io.write_all(&buf).await?;
            }
        }
        io.close().await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    #[test]
    fn versions_are_compatible_within_a_major_version() {
        assert!(compatible("/exo/1.0.0", "/exo/1.4.2"));
        assert!(!compatible("/exo/1.0.0", "/exo/2.0.0"));
        assert!(!compatible("/exo/1.0.0", "/ipfs/0.1.0"));
        assert!(!compatible("/exo/1.0.0", ""));
    }

    #[test]
    fn probe_messages_round_trip_and_the_payload_is_timed() {
        futures::executor::block_on(async {
            let mut codec = ProbeCodec;
            let p = PROBE_PROTOCOL;
            for request in [
                ProbeRequest::Ask,
                ProbeRequest::Data {
                    bytes: 300_000,
                    elapsed: None,
                },
            ] {
                let mut wire = Vec::new();
                codec
                    .write_request(&p, &mut wire, request.clone())
                    .await
                    .unwrap();
                let read = codec.read_request(&p, &mut &wire[..]).await.unwrap();
                match (request, read) {
                    (ProbeRequest::Ask, ProbeRequest::Ask) => {}
                    (
                        ProbeRequest::Data { bytes, .. },
                        ProbeRequest::Data {
                            bytes: got,
                            elapsed: Some(_),
                        },
                    ) => {
                        assert_eq!(got, bytes);
                        assert_eq!(wire.len() as u64, 9 + bytes);
                    }
                    other => panic!("{other:?}"),
                }
            }
            for response in [
                ProbeResponse::Go,
                ProbeResponse::Busy,
                ProbeResponse::Measured {
                    bytes: 7,
                    micros: 9,
                },
            ] {
                let mut wire = Vec::new();
                codec
                    .write_response(&p, &mut wire, response.clone())
                    .await
                    .unwrap();
                let read = codec.read_response(&p, &mut &wire[..]).await.unwrap();
                assert_eq!(read, response);
            }
            // A truncated payload and an oversized one are errors, not hangs or allocations.
            let mut wire = Vec::new();
            codec
                .write_request(
                    &p,
                    &mut wire,
                    ProbeRequest::Data {
                        bytes: 1000,
                        elapsed: None,
                    },
                )
                .await
                .unwrap();
            assert!(codec.read_request(&p, &mut &wire[..500]).await.is_err());
            let mut huge = vec![TAG_DATA];
            huge.extend_from_slice(&u64::MAX.to_le_bytes());
            assert!(codec.read_request(&p, &mut &huge[..]).await.is_err());
        });
    }
}
