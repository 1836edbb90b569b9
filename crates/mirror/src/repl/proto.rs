//! Replication wire protocol.
//!
//! ## Handshake (the primary connects to the secondary)
//!
//! ```text
//! S -> C  "PVMIRROR" | u32 version | 32-byte server nonce
//! C -> S  u32 len | Hello (JSON) | 32-byte client nonce
//!         | HMAC-SHA256(secret, "pv-mirror client" | server nonce | client nonce | Hello)
//! S -> C  u32 len | Welcome (JSON) | u32 bitmap length | bitmap bytes
//!         | HMAC-SHA256(secret, "pv-mirror server" | client nonce | server nonce | Welcome | bitmap)
//! C -> S  u32 len | Plan (JSON)
//! ```
//!
//! The secondary checks the client's MAC before it looks at anything else
//! and closes the connection silently when it is wrong; the primary checks
//! the server's MAC, so neither side talks to a stranger. The Hello carries
//! the primary's epoch: a secondary that has seen a higher epoch refuses.
//!
//! ## Frames
//!
//! Every frame has a 32-byte big-endian header followed by `len` payload
//! bytes:
//!
//! ```text
//! u32 magic "PVR1" | u16 kind | u16 flags | u64 id | u64 offset | u32 len | u32 aux
//! ```
//!
//! The secondary answers each request with a `REPLY` frame carrying the same
//! id, the status (0 or an errno) in `aux`, and a payload (a hash for
//! `VERIFY`, an error message otherwise).
//!
//! ## Streamed writes (version 2)
//!
//! A large write is forwarded while its data is still arriving from the NBD
//! client: one `WRITE` frame per chunk, in order, the non-final ones with
//! [`F_PART`]. The secondary writes every frame concurrently (without sync
//! for a `PART`), but a frame that makes data durable — `DURABLE` without
//! `PART`, `FLUSH`, `RESYNC_DONE` — first waits until every `PART` frame
//! received before it is written: the final chunk's sync covers the whole
//! write. `PART` with `DURABLE` means "the final chunk will be durable":
//! the secondary starts writing the chunk back to disk at once, so that the
//! final sync has less left to do. Every chunk is answered.

use crate::genid::GenIds;
use crate::replica::Decision;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// Greeting magic.
pub const GREETING: &[u8; 8] = b"PVMIRROR";
/// Protocol version. 2 added [`F_PART`] (streamed writes); 3 made
/// [`K_VERIFY`] hash a byte range instead of a whole region. Both sides of
/// a link must speak the same version.
pub const VERSION: u32 = 3;
/// Frame magic, "PVR1".
pub const FRAME_MAGIC: u32 = 0x5056_5231;
/// Largest handshake message accepted.
pub const MAX_HANDSHAKE: u32 = 64 << 10;
/// Largest frame payload accepted (64 MiB).
pub const MAX_FRAME_PAYLOAD: u32 = 64 << 20;

/// Write data at offset.
pub const K_WRITE: u16 = 1;
/// Make `[offset, offset+len)` read as zeroes (no payload; `len` is the
/// range length).
pub const K_ZERO: u16 = 2;
/// Make everything written so far durable.
pub const K_FLUSH: u16 = 3;
/// Resync finished: payload is the source's current generation (u64).
pub const K_RESYNC_DONE: u16 = 5;
/// Return the SHA-256 of `[offset, offset+len)` (at most
/// [`MAX_VERIFY_LEN`] bytes, within the volume; no payload).
pub const K_VERIFY: u16 = 6;
/// Largest range one [`K_VERIFY`] hashes: a region larger than this is
/// verified in pieces, so that no reply waits for a whole large region.
pub const MAX_VERIFY_LEN: u32 = 8 << 20;
/// Liveness probe.
pub const K_PING: u16 = 7;
/// Reply to a request.
pub const K_REPLY: u16 = 0x80;

/// Flag: the write must be durable before the reply.
pub const F_DURABLE: u16 = 1;
/// Flag: the write is resync traffic.
pub const F_RESYNC: u16 = 2;
/// Flag (`WRITE` only): a non-final chunk of a streamed write, written
/// without sync. A later frame that makes data durable (the final chunk,
/// without `PART` and with `DURABLE` when the write must be durable) waits
/// until every earlier `PART` frame is written, so its sync covers them.
pub const F_PART: u16 = 4;
/// Every flag this version knows; a request with another flag is refused.
pub const F_KNOWN: u16 = F_DURABLE | F_RESYNC | F_PART;

/// A frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    /// Frame kind.
    pub kind: u16,
    /// Flags.
    pub flags: u16,
    /// Request id (echoed in the reply).
    pub id: u64,
    /// Byte offset.
    pub offset: u64,
    /// Payload length (the range's length for `ZERO` and `VERIFY`, which
    /// carry no payload).
    pub len: u32,
    /// Status in replies.
    pub aux: u32,
}

impl Frame {
    /// Header size.
    pub const LEN: usize = 32;

    /// Encodes the header.
    pub fn encode(&self) -> [u8; 32] {
        let mut b = [0u8; 32];
        b[0..4].copy_from_slice(&FRAME_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.kind.to_be_bytes());
        b[6..8].copy_from_slice(&self.flags.to_be_bytes());
        b[8..16].copy_from_slice(&self.id.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.len.to_be_bytes());
        b[28..32].copy_from_slice(&self.aux.to_be_bytes());
        b
    }

    /// Decodes a header; `None` on a bad magic.
    pub fn decode(b: &[u8; 32]) -> Option<Frame> {
        if b[0..4] != FRAME_MAGIC.to_be_bytes() {
            return None;
        }
        Some(Frame {
            kind: u16::from_be_bytes([b[4], b[5]]),
            flags: u16::from_be_bytes([b[6], b[7]]),
            id: u64::from_be_bytes(b[8..16].try_into().ok()?),
            offset: u64::from_be_bytes(b[16..24].try_into().ok()?),
            len: u32::from_be_bytes(b[24..28].try_into().ok()?),
            aux: u32::from_be_bytes(b[28..32].try_into().ok()?),
        })
    }

    /// True if the frame carries `len` payload bytes (`ZERO` and `VERIFY`
    /// use `len` as a range length instead).
    pub fn has_payload(&self) -> bool {
        self.kind != K_ZERO && self.kind != K_VERIFY
    }
}

/// The primary's introduction.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hello {
    /// Volume identifier.
    pub volume_id: String,
    /// Volume size.
    pub size: u64,
    /// Region size.
    pub region_size: u64,
    /// The primary's epoch.
    pub epoch: u64,
}

/// The secondary's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Welcome {
    /// Whether the secondary accepts this primary.
    pub accepted: bool,
    /// Why not, when it does not.
    pub error: Option<String>,
    /// The secondary's generation identifiers.
    pub gen: GenIds,
    /// The secondary's epoch.
    pub epoch: u64,
    /// The secondary's consistency.
    pub consistent: bool,
    /// The secondary's pending split-brain decision.
    pub decision: Option<Decision>,
    /// When the secondary's data was last written (seconds since the Unix
    /// epoch; absent from older peers), shown when the pair split.
    #[serde(default)]
    pub last_write_unix: Option<u64>,
}

/// What the primary will do, sent after it compared generations.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    /// Proceed with a resync (possibly empty) and replication.
    pub proceed: bool,
    /// Why not.
    pub reason: Option<String>,
    /// The secondary becomes inconsistent until `RESYNC_DONE`.
    pub resync: bool,
}

type HmacSha256 = Hmac<Sha256>;

/// Computes the handshake MAC.
pub fn mac(secret: &[u8], label: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut m = HmacSha256::new_from_slice(secret).expect("HMAC takes any key length");
    m.update(label);
    for p in parts {
        m.update(&(p.len() as u64).to_be_bytes());
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

/// Checks a handshake MAC in constant time.
pub fn mac_ok(secret: &[u8], label: &[u8], parts: &[&[u8]], tag: &[u8]) -> bool {
    let mut m = HmacSha256::new_from_slice(secret).expect("HMAC takes any key length");
    m.update(label);
    for p in parts {
        m.update(&(p.len() as u64).to_be_bytes());
        m.update(p);
    }
    m.verify_slice(tag).is_ok()
}

/// MAC label of the client's message.
pub const LABEL_CLIENT: &[u8] = b"pv-mirror client";
/// MAC label of the server's message.
pub const LABEL_SERVER: &[u8] = b"pv-mirror server";

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// Any 32 bytes decode without a panic; a header decodes back to
        /// exactly what was encoded.
        #[test]
        fn any_header_decodes_or_is_refused(
            b: [u8; 32], kind: u16, flags: u16, id: u64, offset: u64, len: u32, aux: u32,
        ) {
            if let Some(f) = Frame::decode(&b) {
                proptest::prop_assert_eq!(f.encode(), b);
            }
            let f = Frame { kind, flags, id, offset, len, aux };
            let back = Frame::decode(&f.encode()).unwrap();
            proptest::prop_assert_eq!(back.encode(), f.encode());
        }
    }

    #[test]
    fn frame_roundtrip() {
        let f = Frame {
            kind: K_WRITE,
            flags: F_DURABLE,
            id: 9,
            offset: 1 << 40,
            len: 4096,
            aux: 0,
        };
        assert_eq!(Frame::decode(&f.encode()), Some(f));
        let mut b = f.encode();
        b[3] ^= 0xff;
        assert_eq!(Frame::decode(&b), None);
    }

    #[test]
    fn mac_checks() {
        let t = mac(b"secret", LABEL_CLIENT, &[b"a", b"bc"]);
        assert!(mac_ok(b"secret", LABEL_CLIENT, &[b"a", b"bc"], &t));
        assert!(!mac_ok(b"secreT", LABEL_CLIENT, &[b"a", b"bc"], &t));
        assert!(!mac_ok(b"secret", LABEL_SERVER, &[b"a", b"bc"], &t));
        // Part boundaries are bound into the MAC.
        assert!(!mac_ok(b"secret", LABEL_CLIENT, &[b"ab", b"c"], &t));
        assert!(!mac_ok(b"secret", LABEL_CLIENT, &[b"a", b"bc"], &t[..31]));
    }
}
