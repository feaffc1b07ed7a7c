//! Block-aligned buffers for O_DIRECT reads (the upload pass) and writes (downloads).

/// O_DIRECT wants buffers, offsets and lengths aligned to the device's logical block size;
/// 4096 serves every disk (512-byte sectors included).
pub const ALIGN: usize = 4096;

/// A part buffer whose bytes start at a 4096-aligned address, with room to read whole blocks.
pub struct AlignedBuf {
    pub vec: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    pub fn new(mut vec: Vec<u8>, len: usize) -> Self {
        let room = len.next_multiple_of(ALIGN) + ALIGN;
        if vec.len() < room {
            // Only growth is zero-filled: a reused buffer is overwritten by the read anyway.
            vec.resize(room, 0);
        }
        let start = vec.as_ptr().align_offset(ALIGN);
        // align_offset may give up (usize::MAX); then the buffer is used unaligned and the
        // reads fall back to the page cache.
        let start = if start < ALIGN { start } else { 0 };
        AlignedBuf { vec, start, len }
    }

    pub fn aligned(&self) -> bool {
        (self.vec.as_ptr() as usize + self.start).is_multiple_of(ALIGN)
    }

    pub fn bytes(&self) -> &[u8] {
        &self.vec[self.start..self.start + self.len]
    }

    /// The part's bytes and the slack after them up to the next block boundary.
    pub fn window(&mut self) -> &mut [u8] {
        let rounded = self.len.next_multiple_of(ALIGN);
        &mut self.vec[self.start..self.start + rounded]
    }

    /// The first `len` bytes, writable (for filling a bounce buffer).
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.vec[self.start..self.start + self.len]
    }
}
