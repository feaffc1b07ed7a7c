//! Frames: the per-part transform of an encoded upload (zstd, then AES-256-GCM-SIV) and its
//! inverse on download. docs/FORMAT.md is the specification; this file implements it.
//!
//! One part of the image becomes one self-delimiting frame: a fixed 48-byte header, then the
//! payload (the part's bytes, zstd-compressed when that makes them smaller, then encrypted
//! when a key is given). Frames are independent, so a ranged parallel download decodes them
//! in any order and a resume restarts at any frame; a server without ranges is decoded as one
//! stream, header after header.
//!
//! Encryption: a random 32-byte salt per upload; HKDF-SHA256(key, salt) gives the upload's
//! frame key and a key-check value (recorded, so a wrong key is refused before any byte is
//! written). The nonce is the header's 4-byte prefix (0 as vmstore writes it) and the frame
//! index; the AAD is the salt and the whole frame header (format version, flags with the
//! last-frame flag, index, plain offset, plain length, payload length), so frames cannot be
//! reordered, moved between objects or dropped from the end without failing to decrypt.
//! AES-GCM-SIV (RFC 8452) rather than AES-GCM: a resumed or retried upload encrypts a frame
//! again under the same key and nonce, which GCM-SIV makes deterministic (the same part gives
//! the same stored bytes, which servers that refuse to replace a part with other bytes need)
//! and safe even if the source changed meanwhile (it reveals only whether the two were equal).

use aes_gcm_siv::aead::{AeadInPlace, KeyInit};
use aes_gcm_siv::{Aes256GcmSiv, Key, Nonce, Tag};
use crc_fast::{CrcAlgorithm, Digest as CrcDigest};
use hkdf::Hkdf;
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use sha2::Sha256;

use crate::buffer::with_bytes;
use crate::error::{ChecksumMismatchError, InvalidConfigError, PermissionDeniedError};

pub const MAGIC: [u8; 4] = *b"VMSF";
pub const VERSION: u8 = 1;
pub const HEADER_LEN: usize = 48;
pub const SALT_LEN: usize = 32;
pub const KEY_LEN: usize = 32;
pub const TAG_LEN: usize = 16;
pub const FLAG_ZSTD: u8 = 0x01;
pub const FLAG_AEAD: u8 = 0x02;
pub const FLAG_LAST: u8 = 0x04;
const KNOWN_FLAGS: u8 = FLAG_ZSTD | FLAG_AEAD | FLAG_LAST;
const INFO_FRAME_KEY: &[u8] = b"vmstore/v1/frame-key";
const INFO_KEY_CHECK: &[u8] = b"vmstore/v1/key-check";
/// zstd's default level: the best ratio per CPU-second on disk images in docs/BENCHMARKS.md.
pub const DEFAULT_LEVEL: i32 = 3;

/// Why a frame could not be decoded.
#[derive(Debug, PartialEq, Eq)]
pub enum FrameError {
    /// Not a frame, or not the frame expected at this place: damaged or rearranged bytes.
    Corrupt(String),
    /// The frame did not authenticate: tampered, reordered, from another object, or truncated.
    Tampered(String),
    /// Bad parameters (key length, salt length, compression level).
    Config(String),
}

impl From<FrameError> for PyErr {
    fn from(err: FrameError) -> PyErr {
        match err {
            FrameError::Corrupt(msg) | FrameError::Tampered(msg) => ChecksumMismatchError::new_err(msg),
            FrameError::Config(msg) => InvalidConfigError::new_err(msg),
        }
    }
}

/// The fixed header in front of every frame's payload (big-endian integers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub flags: u8,
    pub nonce_prefix: [u8; 4],
    pub index: u64,
    pub plain_offset: u64,
    pub plain_len: u64,
    pub payload_len: u64,
}

impl Header {
    pub fn to_bytes(self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0..4].copy_from_slice(&MAGIC);
        out[4] = VERSION;
        out[5] = self.flags;
        // 6..8 reserved, zero
        out[8..12].copy_from_slice(&self.nonce_prefix);
        // 12..16 reserved, zero
        out[16..24].copy_from_slice(&self.index.to_be_bytes());
        out[24..32].copy_from_slice(&self.plain_offset.to_be_bytes());
        out[32..40].copy_from_slice(&self.plain_len.to_be_bytes());
        out[40..48].copy_from_slice(&self.payload_len.to_be_bytes());
        out
    }

    pub fn parse(bytes: &[u8]) -> Result<Header, FrameError> {
        if bytes.len() < HEADER_LEN {
            return Err(FrameError::Corrupt(format!("a frame header is {HEADER_LEN} bytes, got {}", bytes.len())));
        }
        if bytes[0..4] != MAGIC {
            return Err(FrameError::Corrupt("not a vmstore frame (bad magic)".into()));
        }
        if bytes[4] != VERSION {
            return Err(FrameError::Corrupt(format!("frame format version {} is not supported", bytes[4])));
        }
        let flags = bytes[5];
        if flags & !KNOWN_FLAGS != 0 || bytes[6..8] != [0, 0] || bytes[12..16] != [0, 0, 0, 0] {
            return Err(FrameError::Corrupt("frame header has unknown flags or nonzero reserved bytes".into()));
        }
        let u64_at = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[at..at + 8]);
            u64::from_be_bytes(b)
        };
        let mut nonce_prefix = [0u8; 4];
        nonce_prefix.copy_from_slice(&bytes[8..12]);
        Ok(Header {
            flags,
            nonce_prefix,
            index: u64_at(16),
            plain_offset: u64_at(24),
            plain_len: u64_at(32),
            payload_len: u64_at(40),
        })
    }

    pub fn last(&self) -> bool {
        self.flags & FLAG_LAST != 0
    }
}

/// The upload's frame key and key-check value, from the user's key and the upload's salt.
pub fn derive(key: &[u8], salt: &[u8]) -> Result<([u8; 32], [u8; 32]), FrameError> {
    if key.len() != KEY_LEN {
        return Err(FrameError::Config(format!("an encryption key is {KEY_LEN} bytes, not {}", key.len())));
    }
    if salt.len() != SALT_LEN {
        return Err(FrameError::Config(format!("an upload salt is {SALT_LEN} bytes, not {}", salt.len())));
    }
    let hk = Hkdf::<Sha256>::new(Some(salt), key);
    let (mut frame_key, mut check) = ([0u8; 32], [0u8; 32]);
    hk.expand(INFO_FRAME_KEY, &mut frame_key).map_err(|_| FrameError::Config("HKDF expand".into()))?;
    hk.expand(INFO_KEY_CHECK, &mut check).map_err(|_| FrameError::Config("HKDF expand".into()))?;
    Ok((frame_key, check))
}

fn nonce_for(prefix: [u8; 4], index: u64) -> [u8; 12] {
    let mut nonce = [0u8; 12];
    nonce[..4].copy_from_slice(&prefix);
    nonce[4..].copy_from_slice(&index.to_be_bytes());
    nonce
}

fn aad_for(salt: &[u8; SALT_LEN], header: &[u8; HEADER_LEN]) -> [u8; SALT_LEN + HEADER_LEN] {
    let mut aad = [0u8; SALT_LEN + HEADER_LEN];
    aad[..SALT_LEN].copy_from_slice(salt);
    aad[SALT_LEN..].copy_from_slice(header);
    aad
}

pub fn crc64nvme(data: &[u8]) -> u64 {
    let mut digest = CrcDigest::new(CrcAlgorithm::Crc64Nvme);
    digest.update(data);
    digest.finalize()
}

thread_local! {
    /// One zstd context per thread and level, reused frame after frame (a context costs a few
    /// MiB of tables to set up).
    static COMPRESSOR: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { std::cell::RefCell::new(None) };
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

fn with_compressor<R>(
    level: i32,
    f: impl FnOnce(&mut zstd::bulk::Compressor<'static>) -> std::io::Result<R>,
) -> std::io::Result<R> {
    COMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if !matches!(&*slot, Some((l, _)) if *l == level) {
            *slot = Some((level, zstd::bulk::Compressor::new(level)?));
        }
        match slot.as_mut() {
            Some((_, compressor)) => f(compressor),
            None => Err(std::io::Error::other("no zstd context")),
        }
    })
}

fn with_decompressor<R>(
    f: impl FnOnce(&mut zstd::bulk::Decompressor<'static>) -> std::io::Result<R>,
) -> std::io::Result<R> {
    DECOMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(zstd::bulk::Decompressor::new()?);
        }
        match slot.as_mut() {
            Some(decompressor) => f(decompressor),
            None => Err(std::io::Error::other("no zstd context")),
        }
    })
}

/// Where a frame belongs: what the reader expects to find in its header.
#[derive(Debug, Clone, Copy)]
pub struct Place {
    pub index: u64,
    pub plain_offset: u64,
    pub plain_len: u64,
    pub last: bool,
}

/// The transform of one upload (or download): compression and/or encryption parameters.
pub struct Codec {
    level: Option<i32>,
    cipher: Option<(Aes256GcmSiv, [u8; SALT_LEN])>,
    nonce_prefix: [u8; 4],
}

impl Codec {
    pub fn new(level: Option<i32>, key: Option<(&[u8], &[u8])>, nonce_prefix: [u8; 4]) -> Result<Codec, FrameError> {
        if let Some(level) = level {
            if !zstd::compression_level_range().contains(&level) {
                return Err(FrameError::Config(format!("zstd level {level} is out of range")));
            }
        }
        let cipher = match key {
            Some((key, salt)) => {
                let (frame_key, _) = derive(key, salt)?;
                let mut s = [0u8; SALT_LEN];
                s.copy_from_slice(salt);
                Some((Aes256GcmSiv::new(Key::<Aes256GcmSiv>::from_slice(&frame_key)), s))
            }
            None => None,
        };
        Ok(Codec { level, cipher, nonce_prefix })
    }

    /// One part's bytes as a whole frame (header + payload).
    pub fn encode(&self, plain: &[u8], place: Place) -> Result<Vec<u8>, FrameError> {
        let mut flags = if place.last { FLAG_LAST } else { 0 };
        let tag_len = if self.cipher.is_some() { TAG_LEN } else { 0 };
        // One buffer for the whole frame: the header's room, then the payload written (or
        // compressed) straight into place, encrypted in place, then the tag.
        // Room for the header, then at most the plain length of compressed bytes: a part that
        // does not shrink is stored raw (zstd gives up when the room runs out).
        let mut frame: Vec<u8> = Vec::with_capacity(HEADER_LEN + plain.len() + tag_len);
        frame.resize(HEADER_LEN, 0);
        if let Some(level) = self.level {
            let mut cursor = std::io::Cursor::new(frame);
            cursor.set_position(HEADER_LEN as u64);
            let packed = with_compressor(level, |compressor| compressor.compress_to_buffer(plain, &mut cursor));
            frame = cursor.into_inner();
            match packed {
                Ok(n) if n < plain.len() => flags |= FLAG_ZSTD,
                // Incompressible (already compressed or encrypted data): stored as is.
                _ => frame.truncate(HEADER_LEN),
            }
        }
        if flags & FLAG_ZSTD == 0 {
            frame.extend_from_slice(plain);
        }
        if self.cipher.is_some() {
            flags |= FLAG_AEAD;
        }
        let header = Header {
            flags,
            nonce_prefix: if self.cipher.is_some() { self.nonce_prefix } else { [0; 4] },
            index: place.index,
            plain_offset: place.plain_offset,
            plain_len: place.plain_len,
            payload_len: (frame.len() - HEADER_LEN + tag_len) as u64,
        };
        let head = header.to_bytes();
        frame[..HEADER_LEN].copy_from_slice(&head);
        if let Some((cipher, salt)) = &self.cipher {
            let nonce = nonce_for(header.nonce_prefix, place.index);
            let tag = cipher
                .encrypt_in_place_detached(Nonce::from_slice(&nonce), &aad_for(salt, &head), &mut frame[HEADER_LEN..])
                .map_err(|_| FrameError::Config("AES-GCM-SIV encryption failed (part too large)".into()))?;
            frame.extend_from_slice(tag.as_slice());
        }
        Ok(frame)
    }

    /// A whole frame back to the part's plain bytes, checked against where it must belong.
    pub fn decode(&self, frame: &[u8], place: Place) -> Result<Vec<u8>, FrameError> {
        let header = Header::parse(frame)?;
        let head: [u8; HEADER_LEN] = header.to_bytes();
        let where_ = format!("frame {}", place.index);
        if header.index != place.index
            || header.plain_offset != place.plain_offset
            || header.plain_len != place.plain_len
            || header.last() != place.last
        {
            return Err(FrameError::Tampered(format!(
                "{where_} is not the frame recorded at that place (index {}, offset {}, length {}, last {}): \
                 the stored object was altered or rearranged",
                header.index,
                header.plain_offset,
                header.plain_len,
                header.last()
            )));
        }
        if (frame.len() - HEADER_LEN) as u64 != header.payload_len {
            return Err(FrameError::Corrupt(format!(
                "{where_} holds {} payload bytes, its header says {}",
                frame.len() - HEADER_LEN,
                header.payload_len
            )));
        }
        let encrypted = header.flags & FLAG_AEAD != 0;
        if encrypted != self.cipher.is_some() {
            return Err(FrameError::Tampered(format!(
                "{where_} is {}encrypted, the object's record says {}",
                if encrypted { "" } else { "not " },
                if self.cipher.is_some() { "encrypted" } else { "not encrypted" }
            )));
        }
        if header.flags & FLAG_ZSTD != 0 && self.level.is_none() {
            return Err(FrameError::Tampered(format!("{where_} is compressed, the record says not")));
        }
        let decrypted: Option<Vec<u8>> = match &self.cipher {
            Some((cipher, salt)) => {
                let body = &frame[HEADER_LEN..];
                if body.len() < TAG_LEN {
                    return Err(FrameError::Corrupt(format!("{where_} is too short to hold its tag")));
                }
                let split = body.len() - TAG_LEN;
                let tag = Tag::clone_from_slice(&body[split..]);
                let mut buf = body[..split].to_vec();
                let nonce = nonce_for(header.nonce_prefix, header.index);
                cipher
                    .decrypt_in_place_detached(Nonce::from_slice(&nonce), &aad_for(salt, &head), &mut buf, &tag)
                    .map_err(|_| {
                        FrameError::Tampered(format!(
                            "{where_} failed authentication: the stored bytes were altered, or belong to \
                             another object or another place"
                        ))
                    })?;
                Some(buf)
            }
            None => None,
        };
        let plain = if header.flags & FLAG_ZSTD != 0 {
            let capacity = usize::try_from(header.plain_len)
                .map_err(|_| FrameError::Corrupt(format!("{where_}: plain length too large")))?;
            let payload = decrypted.as_deref().unwrap_or(&frame[HEADER_LEN..]);
            let mut out = Vec::with_capacity(capacity);
            let got = with_decompressor(|d| d.decompress_to_buffer(payload, &mut out))
                .map_err(|err| FrameError::Corrupt(format!("{where_} does not decompress: {err}")))?;
            out.truncate(got);
            out
        } else {
            match decrypted {
                Some(buf) => buf,
                None => frame[HEADER_LEN..].to_vec(),
            }
        };
        if plain.len() as u64 != header.plain_len {
            return Err(FrameError::Corrupt(format!(
                "{where_} decoded to {} bytes, its header says {}",
                plain.len(),
                header.plain_len
            )));
        }
        Ok(plain)
    }
}

/// The encoder/decoder of one transfer, from Python.
#[pyclass(module = "vmstore._native", frozen, name = "FrameCodec")]
pub struct PyFrameCodec {
    codec: Codec,
}

/// What `FrameCodec.encode` made of one part.
#[pyclass(module = "vmstore._native", frozen, get_all)]
pub struct EncodedFrame {
    /// The whole frame (header + payload), as stored.
    data: Py<PyBytes>,
    /// CRC-64/NVME of `data` (S3's per-part checksum of what is stored).
    crc64nvme: u64,
}

#[pymethods]
impl PyFrameCodec {
    /// ``compression``: None or "zstd" (``level``, default 3). ``key`` and ``salt``: 32 bytes
    /// each, or both None. ``nonce_prefix``: the header's 4 nonce bytes (default 0; decode
    /// takes them from each frame's header).
    #[new]
    #[pyo3(signature = (*, compression = None, level = DEFAULT_LEVEL, key = None, salt = None, nonce_prefix = None))]
    fn new(
        compression: Option<&str>,
        level: i32,
        key: Option<&[u8]>,
        salt: Option<&[u8]>,
        nonce_prefix: Option<&[u8]>,
    ) -> PyResult<Self> {
        let level = match compression {
            None => None,
            Some("zstd") => Some(level),
            Some(other) => {
                return Err(InvalidConfigError::new_err(format!(
                    "compression {other:?} is not supported (only \"zstd\")"
                )))
            }
        };
        let key = match (key, salt) {
            (Some(k), Some(s)) => Some((k, s)),
            (None, None) => None,
            _ => return Err(InvalidConfigError::new_err("an encryption key needs its upload salt")),
        };
        let mut prefix = [0u8; 4];
        if let Some(p) = nonce_prefix {
            if p.len() != 4 {
                return Err(InvalidConfigError::new_err("nonce_prefix is 4 bytes"));
            }
            prefix.copy_from_slice(p);
        }
        Ok(PyFrameCodec { codec: Codec::new(level, key, prefix)? })
    }

    /// One part as a stored frame, with the GIL released.
    fn encode(
        &self,
        py: Python<'_>,
        data: &Bound<'_, PyAny>,
        index: u64,
        plain_offset: u64,
        last: bool,
    ) -> PyResult<EncodedFrame> {
        let codec = &self.codec;
        let frame = with_bytes(py, data, |plain| {
            let place = Place { index, plain_offset, plain_len: plain.len() as u64, last };
            codec.encode(plain, place).map(|frame| {
                let crc = crc64nvme(&frame);
                (frame, crc)
            })
        })?;
        let (frame, crc) = frame?;
        Ok(EncodedFrame { data: PyBytes::new(py, &frame).unbind(), crc64nvme: crc })
    }

    /// A stored frame back to its plain bytes, with the GIL released. Raises
    /// ChecksumMismatchError for a frame that is damaged, altered or out of place.
    fn decode<'py>(
        &self,
        py: Python<'py>,
        frame: &Bound<'py, PyAny>,
        index: u64,
        plain_offset: u64,
        plain_length: u64,
        last: bool,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let codec = &self.codec;
        let place = Place { index, plain_offset, plain_len: plain_length, last };
        let plain = with_bytes(py, frame, |bytes| codec.decode(bytes, place))??;
        Ok(PyBytes::new(py, &plain))
    }
}

/// The key-check value recorded for an upload: HKDF-SHA256(key, salt, "vmstore/v1/key-check").
#[pyfunction]
pub fn frame_key_check<'py>(py: Python<'py>, key: &[u8], salt: &[u8]) -> PyResult<Bound<'py, PyBytes>> {
    let (_, check) = derive(key, salt)?;
    Ok(PyBytes::new(py, &check))
}

/// Raise PermissionDeniedError unless ``key`` is the one the record's key check was made with.
#[pyfunction]
pub fn check_frame_key(key: &[u8], salt: &[u8], expected: &[u8]) -> PyResult<()> {
    let (_, check) = derive(key, salt)?;
    // Not secret-dependent timing that matters (the check value is public), but compare fully.
    let same = check.len() == expected.len() && check.iter().zip(expected).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0;
    if same {
        Ok(())
    } else {
        Err(PermissionDeniedError::new_err(
            "the encryption key is not the one this object was encrypted with; nothing was written",
        ))
    }
}

/// ``(flags, index, plain_offset, plain_length, payload_length)`` of a frame header (the first
/// 48 bytes of a frame); ChecksumMismatchError if they are not one.
#[pyfunction]
pub fn parse_frame_header(head: &[u8]) -> PyResult<(u8, u64, u64, u64, u64)> {
    let h = Header::parse(head)?;
    Ok((h.flags, h.index, h.plain_offset, h.plain_len, h.payload_len))
}

/// CRC-64/NVME of A||B from crc(A), crc(B) and len(B) (S3's FULL_OBJECT checksum of frames).
#[pyfunction]
pub fn crc64nvme_combine(crc_a: u64, crc_b: u64, len_b: u64) -> u64 {
    crate::crc64::combine(crc_a, crc_b, len_b)
}

/// CRC-64/NVME of a bytes-like object, with the GIL released for large ones.
#[pyfunction]
#[pyo3(name = "crc64nvme")]
pub fn py_crc64nvme(py: Python<'_>, data: &Bound<'_, PyAny>) -> PyResult<u64> {
    with_bytes(py, data, crc64nvme)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyFrameCodec>()?;
    m.add_class::<EncodedFrame>()?;
    m.add_function(wrap_pyfunction!(frame_key_check, m)?)?;
    m.add_function(wrap_pyfunction!(check_frame_key, m)?)?;
    m.add_function(wrap_pyfunction!(parse_frame_header, m)?)?;
    m.add_function(wrap_pyfunction!(crc64nvme_combine, m)?)?;
    m.add_function(wrap_pyfunction!(py_crc64nvme, m)?)?;
    m.add("FRAME_HEADER_SIZE", HEADER_LEN)?;
    m.add("FRAME_TAG_SIZE", TAG_LEN)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: [u8; 32] = [7u8; 32];
    const SALT: [u8; 32] = [9u8; 32];

    fn sample(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i % 7) as u8).collect()
    }

    fn codec(zstd: bool, enc: bool) -> Codec {
        Codec::new(zstd.then_some(3), enc.then_some((&KEY[..], &SALT[..])), [1, 2, 3, 4]).expect("codec")
    }

    fn place(index: u64, offset: u64, len: usize, last: bool) -> Place {
        Place { index, plain_offset: offset, plain_len: len as u64, last }
    }

    #[test]
    fn round_trips_every_scheme() {
        let data = sample(100_000);
        for (z, e) in [(true, false), (false, true), (true, true), (false, false)] {
            let c = codec(z, e);
            let frame = c.encode(&data, place(3, 1000, data.len(), false)).expect("encode");
            if z {
                assert!(frame.len() < data.len() / 4, "compressible data shrinks");
            }
            assert_eq!(c.decode(&frame, place(3, 1000, data.len(), false)).expect("decode"), data);
        }
    }

    #[test]
    fn stored_bytes_never_contain_the_plaintext() {
        let mut data = vec![0u8; 4096];
        data[100..116].copy_from_slice(b"SECRET-MARKER-42");
        let frame = codec(false, true).encode(&data, place(0, 0, data.len(), true)).expect("encode");
        assert!(!frame.windows(16).any(|w| w == b"SECRET-MARKER-42"));
    }

    #[test]
    fn incompressible_parts_are_stored_raw() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let data: Vec<u8> = (0..4096)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 24) as u8
            })
            .collect();
        let frame = codec(true, false).encode(&data, place(0, 0, data.len(), true)).expect("encode");
        let header = Header::parse(&frame).expect("header");
        assert_eq!(header.flags & FLAG_ZSTD, 0);
        assert_eq!(frame.len(), HEADER_LEN + data.len());
    }

    #[test]
    fn nonces_differ_per_frame_and_per_upload() {
        // Same plaintext at two indexes, and under two salts: all ciphertexts differ.
        let data = sample(1024);
        let a = codec(false, true);
        let f0 = a.encode(&data, place(0, 0, 1024, false)).expect("f0");
        let f1 = a.encode(&data, place(1, 0, 1024, false)).expect("f1");
        assert_ne!(f0[HEADER_LEN..], f1[HEADER_LEN..]);
        let other = Codec::new(None, Some((&KEY[..], &[8u8; 32][..])), [1, 2, 3, 4]).expect("codec");
        let g0 = other.encode(&data, place(0, 0, 1024, false)).expect("g0");
        assert_ne!(f0[HEADER_LEN..], g0[HEADER_LEN..]);
        assert_eq!(nonce_for([1, 2, 3, 4], 5)[4..], 5u64.to_be_bytes());
        assert_ne!(nonce_for([1, 2, 3, 4], 5), nonce_for([1, 2, 3, 4], 6));
    }

    #[test]
    fn swapped_or_reordered_frames_fail() {
        let c = codec(true, true);
        let a = c.encode(&sample(1000), place(0, 0, 1000, false)).expect("a");
        let b = c.encode(&sample(1000), place(1, 1000, 1000, true)).expect("b");
        // b read where a belongs (same lengths): the header check refuses it...
        assert!(matches!(c.decode(&b, place(0, 0, 1000, false)), Err(FrameError::Tampered(_))));
        // ...and so does authentication when the header is rewritten to claim a's place.
        let mut forged = b.clone();
        forged[..HEADER_LEN].copy_from_slice(&a[..HEADER_LEN]);
        forged[40..48].copy_from_slice(&((b.len() - HEADER_LEN) as u64).to_be_bytes());
        assert!(matches!(c.decode(&forged, place(0, 0, 1000, false)), Err(FrameError::Tampered(_))));
    }

    #[test]
    fn truncation_is_detected_by_the_last_flag() {
        let c = codec(false, true);
        let first = c.encode(&sample(500), place(0, 0, 500, false)).expect("first");
        // An object cut after its first frame: the reader expects that frame to be the last.
        assert!(c.decode(&first, place(0, 0, 500, true)).is_err());
        // Setting the flag in the header breaks authentication.
        let mut forged = first.clone();
        forged[5] |= FLAG_LAST;
        assert!(matches!(c.decode(&forged, place(0, 0, 500, true)), Err(FrameError::Tampered(_))));
    }

    #[test]
    fn frames_of_another_object_fail() {
        let a = codec(false, true);
        let b = Codec::new(None, Some((&KEY[..], &[1u8; 32][..])), [1, 2, 3, 4]).expect("codec");
        let frame = a.encode(&sample(300), place(0, 0, 300, true)).expect("frame");
        assert!(matches!(b.decode(&frame, place(0, 0, 300, true)), Err(FrameError::Tampered(_))));
    }

    #[test]
    fn a_flipped_byte_fails() {
        let c = codec(true, true);
        let frame = c.encode(&sample(5000), place(2, 10, 5000, true)).expect("frame");
        for at in [0, 5, 20, HEADER_LEN, frame.len() - 1] {
            let mut bad = frame.clone();
            bad[at] ^= 0x40;
            assert!(c.decode(&bad, place(2, 10, 5000, true)).is_err(), "flip at {at}");
        }
    }

    #[test]
    fn key_check_depends_on_key_and_salt() {
        let (_, a) = derive(&KEY, &SALT).expect("a");
        let (_, b) = derive(&[6u8; 32], &SALT).expect("b");
        let (_, c) = derive(&KEY, &[1u8; 32]).expect("c");
        assert_ne!(a, b);
        assert_ne!(a, c);
        assert!(derive(&KEY[..31], &SALT).is_err());
    }

    #[test]
    fn empty_part_is_a_frame() {
        let c = codec(true, true);
        let frame = c.encode(&[], place(0, 0, 0, true)).expect("frame");
        assert_eq!(frame.len(), HEADER_LEN + TAG_LEN);
        assert_eq!(c.decode(&frame, place(0, 0, 0, true)).expect("decode"), Vec::<u8>::new());
    }
}
