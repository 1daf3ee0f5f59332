//! The shard file format: a fixed 1,024-byte header (as llm.c's `.bin` shards), then the tokens.
//!
//! Header, little-endian: magic `GMOETOKS` (8 bytes), version u32, token width u32 (2: u16 tokens,
//! when the vocabulary fits in 65,536 ids; else 4: u32), vocabulary size u32, end-of-text id u32,
//! token count u64, the SHA-256 of the shard's `tokenizer.json` (32 bytes), then zeros. The
//! header's size keeps the tokens aligned inside a memory map.

use anyhow::{bail, Result};

/// Bytes before the first token.
pub const HEADER_BYTES: usize = 1024;
/// The first 8 bytes of every shard.
pub const MAGIC: [u8; 8] = *b"GMOETOKS";
/// The format version this crate writes and reads.
pub const VERSION: u32 = 1;

/// What a shard's header says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// Bytes per token: 2 or 4.
    pub token_width: u32,
    pub vocab_size: u32,
    pub eot_id: u32,
    pub token_count: u64,
    /// SHA-256 of the tokenizer.json the tokens came from.
    pub tokenizer_sha256: [u8; 32],
}

/// Bytes per token for a vocabulary of `vocab_size` ids: 2 when every id fits in a u16.
pub fn token_width(vocab_size: usize) -> u32 {
    if vocab_size <= 1 << 16 {
        2
    } else {
        4
    }
}

impl Header {
    /// The 1,024 header bytes.
    pub fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut b = [0u8; HEADER_BYTES];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&self.token_width.to_le_bytes());
        b[16..20].copy_from_slice(&self.vocab_size.to_le_bytes());
        b[20..24].copy_from_slice(&self.eot_id.to_le_bytes());
        b[24..32].copy_from_slice(&self.token_count.to_le_bytes());
        b[32..64].copy_from_slice(&self.tokenizer_sha256);
        b
    }

    /// Parses the first bytes of the file `name`; errors say what is wrong and where.
    pub fn decode(bytes: &[u8], name: &str) -> Result<Self> {
        if bytes.len() < HEADER_BYTES {
            bail!("shard {name} is truncated: {} bytes, shorter than its {HEADER_BYTES}-byte header", bytes.len());
        }
        if bytes[0..8] != MAGIC {
            bail!(
                "shard {name} is not a gumbel-moe token shard: bytes 0..8 are {:?}, expected the magic {:?}",
                String::from_utf8_lossy(&bytes[0..8]),
                String::from_utf8_lossy(&MAGIC)
            );
        }
        let u32_at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().expect("4 bytes"));
        let version = u32_at(8);
        if version != VERSION {
            bail!("shard {name} has format version {version} (byte offset 8); this build reads version {VERSION}");
        }
        let h = Header {
            token_width: u32_at(12),
            vocab_size: u32_at(16),
            eot_id: u32_at(20),
            token_count: u64::from_le_bytes(bytes[24..32].try_into().expect("8 bytes")),
            tokenizer_sha256: bytes[32..64].try_into().expect("32 bytes"),
        };
        if h.token_width != token_width(h.vocab_size as usize) {
            bail!(
                "shard {name} has token width {} (byte offset 12) for a vocabulary of {}; expected {}",
                h.token_width,
                h.vocab_size,
                token_width(h.vocab_size as usize)
            );
        }
        if h.eot_id >= h.vocab_size {
            bail!(
                "shard {name}: end-of-text id {} (byte offset 20) is not below its vocabulary size {}",
                h.eot_id,
                h.vocab_size
            );
        }
        Ok(h)
    }

    /// The file size the header promises.
    pub fn file_bytes(&self) -> u64 {
        HEADER_BYTES as u64 + self.token_count * u64::from(self.token_width)
    }
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of `bytes`.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_widths_follow_the_vocabulary() {
        let h = Header { token_width: 2, vocab_size: 300, eot_id: 0, token_count: 7, tokenizer_sha256: [9; 32] };
        assert_eq!(Header::decode(&h.encode(), "x").unwrap(), h);
        assert_eq!((token_width(65_536), token_width(65_537)), (2, 4));
        assert_eq!(h.file_bytes(), 1024 + 14);
        assert_eq!(hex(&[0, 255, 16]), "00ff10");
    }
}
