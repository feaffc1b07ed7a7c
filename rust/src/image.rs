//! What a VM disk image's header says: its format, the size of the guest disk, and every other
//! file it names (a backing file, an external data file, vmdk extents, a vhd/vhdx parent).
//!
//! Images are untrusted input (a guest can write anything into a raw disk, including a qcow2
//! header naming `/etc/shadow` as its backing file), so every offset and length read from a
//! header is checked against the bounds the format allows and against the bytes that exist
//! before anything is read or allocated: a malformed header is an `InvalidArgument`
//! (InvalidConfigError) that says which field is wrong, never a panic or a huge allocation.
//! No read is larger than `MAX_READ`.
//!
//! Formats: qcow2 (v2, v3), vmdk (sparse extent with embedded descriptor, and text
//! descriptor files), vhd (dynamic and differencing by the footer copy at the start, fixed by
//! the footer at the end), vhdx, raw (anything else); gzip, xz and zstd wrappers are recognised
//! by their magic, and the start of what they hold is inspected too (decompressed, at most
//! `HEAD_BYTES`).

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::Path;

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use crate::error::{CoreError, CoreResult, IoContext};

/// The start of an image that a stream's inspection looks at: enough for every header a
/// valid image of these formats has (a qcow2 header lies in its first cluster, at most 2 MiB;
/// qemu puts a vhdx's metadata region at 2-3 MiB).
pub const HEAD_BYTES: usize = 4 << 20;

/// No single read from an image is larger than this.
const MAX_READ: usize = 4 << 20;

/// qemu reads at most this much of a vmdk descriptor (embedded or a file of its own).
const MAX_DESCRIPTOR: u64 = (1 << 20) - 1;

/// What a header says. `format` is one of qcow2, vmdk, vhd, vhdx, raw.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    pub format: &'static str,
    /// Bytes of the guest disk; None when the header does not tell (a raw stream's head).
    pub virtual_size: Option<u64>,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
    pub data_file: Option<String>,
    /// The image cannot be read without a file its header does not name (a qcow2 with the
    /// external data file bit set but no name; a vhdx that has a parent but no locator).
    pub needs_other_file: bool,
    pub encrypted: bool,
    pub encryption: Option<&'static str>,
    pub compression_type: Option<&'static str>,
    pub cluster_size: Option<u64>,
    pub version: Option<u32>,
    pub wrapper: Option<&'static str>,
    pub dirty: bool,
    pub corrupt: bool,
    /// vmdk createType, vhd/vhdx disk type ("fixed", "dynamic", "differencing").
    pub subformat: Option<String>,
    /// Files a vmdk descriptor file names as its extents (external: the data lives there).
    pub extents: Vec<String>,
    /// qcow2 incompatible feature bits by name ("dirty", "external-data-file", "bit 9", ...).
    pub features: Vec<String>,
}

fn bad(what: impl Into<String>) -> CoreError {
    CoreError::InvalidArgument(what.into())
}

/// The bytes being inspected: a file (read with pread, nothing kept) or the start of a stream.
enum Input<'a> {
    File { file: File, len: u64, name: String },
    Head { data: &'a [u8], len: Option<u64>, name: String },
}

impl Input<'_> {
    fn name(&self) -> &str {
        match self {
            Input::File { name, .. } | Input::Head { name, .. } => name,
        }
    }

    /// The image's whole length, when known.
    fn len(&self) -> Option<u64> {
        match self {
            Input::File { len, .. } => Some(*len),
            Input::Head { len, .. } => *len,
        }
    }

    /// Bytes that can be read from offset 0.
    fn available(&self) -> u64 {
        match self {
            Input::File { len, .. } => *len,
            Input::Head { data, .. } => data.len() as u64,
        }
    }

    /// Exactly `length` bytes at `offset`, or a message saying that `what` lies outside the
    /// image (a truncated file, or a field pointing past its end).
    fn read(&self, offset: u64, length: u64, what: &str) -> CoreResult<Vec<u8>> {
        match self.try_read(offset, length, what)? {
            Some(data) => Ok(data),
            None => Err(self.outside(offset, length, what)),
        }
    }

    fn outside(&self, offset: u64, length: u64, what: &str) -> CoreError {
        match self {
            Input::File { len, name, .. } => bad(format!(
                "{name}: {what} (bytes {offset}..{}) lies past the end of the image ({len} bytes): \
                 the image is truncated or its header is damaged",
                offset.saturating_add(length)
            )),
            Input::Head { data, name, .. } => bad(format!(
                "{name}: {what} (bytes {offset}..{}) lies past the {} bytes of the image's start \
                 that were inspected: the image is truncated or its header is damaged",
                offset.saturating_add(length),
                data.len()
            )),
        }
    }

    /// Like `read`, but `None` when the bytes are not there (past the end, or past a head).
    fn try_read(&self, offset: u64, length: u64, what: &str) -> CoreResult<Option<Vec<u8>>> {
        if length > MAX_READ as u64 {
            return Err(bad(format!(
                "{}: {what} claims {length} bytes, more than any image header holds",
                self.name()
            )));
        }
        let Some(end) = offset.checked_add(length) else {
            return Err(bad(format!("{}: {what} at offset {offset} is past any possible file end", self.name())));
        };
        if end > self.available() {
            return Ok(None);
        }
        // In bounds: `length` <= MAX_READ, so the casts below cannot truncate.
        let length = length as usize;
        match self {
            Input::Head { data, .. } => {
                let start = offset as usize;
                Ok(data.get(start..start + length).map(<[u8]>::to_vec))
            }
            Input::File { file, name, .. } => {
                let mut buffer = vec![0u8; length];
                match file.read_exact_at(&mut buffer, offset) {
                    Ok(()) => Ok(Some(buffer)),
                    // Shrunk since it was measured.
                    Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => Ok(None),
                    Err(err) => Err(CoreError::io(format!("reading {what} of {name}"), err)),
                }
            }
        }
    }

    /// Up to `length` bytes at `offset` (fewer at the end of what is available).
    fn read_upto(&self, offset: u64, length: u64, what: &str) -> CoreResult<Vec<u8>> {
        let length = length.min(self.available().saturating_sub(offset));
        self.read(offset, length, what)
    }
}

fn be16(b: &[u8], at: usize) -> u16 {
    b.get(at..at + 2).map_or(0, |s| u16::from_be_bytes([s[0], s[1]]))
}
fn be32(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4).map_or(0, |s| u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}
fn be64(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8).map_or(0, |s| {
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        u64::from_be_bytes(a)
    })
}
fn le16(b: &[u8], at: usize) -> u16 {
    b.get(at..at + 2).map_or(0, |s| u16::from_le_bytes([s[0], s[1]]))
}
fn le32(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4).map_or(0, |s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}
fn le64(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8).map_or(0, |s| {
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        u64::from_le_bytes(a)
    })
}

/// Header text as qemu-img prints it: up to the first NUL, invalid UTF-8 replaced.
fn text(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

fn utf16(bytes: &[u8], big_endian: bool) -> String {
    let units: Vec<u16> = bytes
        .chunks_exact(2)
        .map(|c| if big_endian { u16::from_be_bytes([c[0], c[1]]) } else { u16::from_le_bytes([c[0], c[1]]) })
        .take_while(|u| *u != 0)
        .collect();
    String::from_utf16_lossy(&units)
}

/// Inspect the file at `path`. A FIFO or socket is refused without blocking on it.
pub fn inspect_path(path: &Path) -> CoreResult<ImageInfo> {
    let name = path.display().to_string();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .context(|| format!("opening {name}"))?;
    let meta = file.metadata().context(|| format!("stat of {name}"))?;
    let kind = meta.file_type();
    let len = if kind.is_file() {
        meta.len()
    } else if kind.is_block_device() {
        let mut handle = &file;
        io::Seek::seek(&mut handle, io::SeekFrom::End(0)).context(|| format!("measuring {name}"))?
    } else if kind.is_dir() {
        return Err(CoreError::io(format!("inspecting {name}"), io::Error::from_raw_os_error(libc::EISDIR)));
    } else {
        return Err(bad(format!("{name} is not a regular file or block device; give the path of a disk image")));
    };
    inspect(&Input::File { file, len, name })
}

/// Inspect the start of an image (`head`); `size` is the whole image's length when known.
pub fn inspect_head(head: &[u8], size: Option<u64>, name: &str) -> CoreResult<ImageInfo> {
    if let Some(size) = size {
        if (head.len() as u64) > size {
            return Err(bad(format!("{name}: {} bytes given as the start of a {size}-byte image", head.len())));
        }
    }
    inspect(&Input::Head { data: head, len: size, name: name.to_string() })
}

fn inspect(input: &Input<'_>) -> CoreResult<ImageInfo> {
    inspect_within(input, true)
}

/// `unwrap`: look inside a compressed wrapper (only one level: a wrapper inside a wrapper is
/// refused, and a gzip quine cannot recurse).
fn inspect_within(input: &Input<'_>, unwrap: bool) -> CoreResult<ImageInfo> {
    // qemu probes a format from the first 2 KiB (a vmdk descriptor's "version=" may follow
    // comment lines anywhere in them).
    let magic = input.read_upto(0, 2048, "the header")?;
    if magic.starts_with(b"QFI\xfb") {
        return qcow2(input);
    }
    if magic.starts_with(b"KDMV") {
        return vmdk_sparse(input);
    }
    if magic.starts_with(b"vhdxfile") {
        return vhdx(input);
    }
    if magic.starts_with(b"conectix") {
        return vhd(input, &magic);
    }
    if let Some(wrapper) = wrapper_of(&magic) {
        if !unwrap {
            return Err(bad(format!("{}: a {wrapper} stream inside a compressed wrapper", input.name())));
        }
        return wrapped(input, wrapper);
    }
    if is_vmdk_descriptor(&magic) {
        return vmdk_descriptor(input);
    }
    // A fixed VHD has its footer only at the end (qemu probes such a file as raw).
    if let Some(len) = input.len() {
        if len >= 512 {
            if let Some(footer) = input.try_read(len - 512, 512, "the vhd footer")? {
                if footer.starts_with(b"conectix") {
                    return vhd(input, &footer);
                }
            }
        }
    }
    Ok(ImageInfo { format: "raw", virtual_size: input.len(), ..ImageInfo::default() })
}

// --- qcow2 -------------------------------------------------------------------------------

const QCOW2_EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const QCOW2_EXT_DATA_FILE: u32 = 0x4441_5441;
const QCOW2_INCOMPAT_NAMES: [&str; 5] = ["dirty", "corrupt", "external-data-file", "compression-type", "extended-l2"];

fn qcow2(input: &Input<'_>) -> CoreResult<ImageInfo> {
    let name = input.name().to_string();
    let header = input.read(0, 72, "the qcow2 header")?;
    let version = be32(&header, 4);
    if !(2..=3).contains(&version) {
        return Err(bad(format!("{name}: qcow2 version {version} is not 2 or 3")));
    }
    let cluster_bits = be32(&header, 20);
    if !(9..=21).contains(&cluster_bits) {
        return Err(bad(format!("{name}: qcow2 cluster_bits {cluster_bits} is outside 9..21")));
    }
    let cluster_size = 1u64 << cluster_bits;
    let (encrypted, encryption) = match be32(&header, 32) {
        0 => (false, None),
        1 => (true, Some("aes")),
        2 => (true, Some("luks")),
        other => return Err(bad(format!("{name}: qcow2 encryption method {other} is unknown"))),
    };
    let mut info = ImageInfo {
        format: "qcow2",
        virtual_size: Some(be64(&header, 24)),
        cluster_size: Some(cluster_size),
        version: Some(version),
        encrypted,
        encryption,
        compression_type: Some("zlib"),
        ..ImageInfo::default()
    };
    let mut extensions_at = 72u64;
    if version == 3 {
        let v3 = input.read(0, 104, "the qcow2 v3 header")?;
        let incompatible = be64(&v3, 72);
        let header_length = u64::from(be32(&v3, 100));
        if header_length < 104 || header_length > cluster_size {
            return Err(bad(format!(
                "{name}: qcow2 header_length {header_length} is outside 104..{cluster_size} (the first cluster)"
            )));
        }
        let full = input.read(0, header_length, "the qcow2 v3 header")?;
        let type_byte = full.get(104).copied().unwrap_or(0);
        if incompatible & 8 != 0 {
            info.compression_type = Some(match type_byte {
                0 => "zlib",
                1 => "zstd",
                other => return Err(bad(format!("{name}: qcow2 compression type {other} is unknown"))),
            });
        } else if type_byte != 0 {
            return Err(bad(format!(
                "{name}: qcow2 compression_type {type_byte} is set but the compression-type feature bit is not"
            )));
        }
        info.dirty = incompatible & 1 != 0;
        info.corrupt = incompatible & 2 != 0;
        info.needs_other_file = incompatible & 4 != 0;
        info.features = (0..64)
            .filter(|bit| incompatible & (1u64 << bit) != 0)
            .map(|bit| QCOW2_INCOMPAT_NAMES.get(bit).map_or_else(|| format!("bit {bit}"), |n| (*n).to_string()))
            .collect();
        extensions_at = header_length;
    }

    let backing_offset = be64(&header, 8);
    let backing_size = u64::from(be32(&header, 16));
    // As qemu: the extensions end where the backing file name starts, else at the cluster's end.
    let extensions_end = if backing_offset != 0 { backing_offset } else { cluster_size };
    if backing_offset != 0 {
        if backing_offset > cluster_size || backing_offset < extensions_at {
            return Err(bad(format!(
                "{name}: qcow2 backing file name offset {backing_offset} is outside the header \
                 area {extensions_at}..{cluster_size} of the first cluster"
            )));
        }
        if backing_size > 1023 || backing_size > cluster_size - backing_offset {
            return Err(bad(format!(
                "{name}: qcow2 backing file name of {backing_size} bytes at offset {backing_offset} \
                 is longer than 1023 bytes or runs past the first cluster"
            )));
        }
        // As qemu reads it: a C string, ending at a NUL if there is one.
        let backing = text(&input.read(backing_offset, backing_size, "the qcow2 backing file name")?);
        info.backing_file = (!backing.is_empty()).then_some(backing);
    }

    let mut at = extensions_at;
    while at < extensions_end {
        if extensions_end - at < 8 {
            return Err(bad(format!("{name}: qcow2 header extension at {at} is cut short by byte {extensions_end}")));
        }
        let ext = input.read(at, 8, "a qcow2 header extension")?;
        let (kind, length) = (be32(&ext, 0), u64::from(be32(&ext, 4)));
        if kind == 0 {
            break;
        }
        let data_at = at + 8;
        if length > extensions_end - data_at {
            return Err(bad(format!(
                "{name}: qcow2 header extension 0x{kind:08x} at byte {at} claims {length} bytes, \
                 past the end of the header area (byte {extensions_end})"
            )));
        }
        match kind {
            QCOW2_EXT_BACKING_FORMAT => {
                info.backing_format = Some(text(&input.read(data_at, length, "the qcow2 backing format")?));
            }
            QCOW2_EXT_DATA_FILE => {
                let data_file = text(&input.read(data_at, length, "the qcow2 data file name")?);
                info.data_file = (!data_file.is_empty()).then_some(data_file);
            }
            _ => {}
        }
        // Extensions are padded to 8 bytes; `length` < 2 MiB, so no overflow.
        at = data_at + length.div_ceil(8) * 8;
    }
    if info.data_file.is_some() {
        info.needs_other_file = false;
    }
    Ok(info)
}

// --- vmdk --------------------------------------------------------------------------------

const VMDK_GD_AT_END: u64 = u64::MAX;

/// qemu's probe of a vmdk descriptor: comment and blank lines, then `version=1|2|3`.
fn is_vmdk_descriptor(start: &[u8]) -> bool {
    let mut p = start;
    while !p.is_empty() {
        if p[0] == b'#' {
            match p.iter().position(|b| *b == b'\n') {
                Some(n) => p = &p[n + 1..],
                None => return false,
            }
            continue;
        }
        if p[0] == b' ' || p[0] == b'\r' || p[0] == b'\n' {
            let rest = p.iter().position(|b| *b != b' ').map_or(&p[p.len()..], |n| &p[n..]);
            let rest = rest.strip_prefix(b"\r").unwrap_or(rest);
            match rest.strip_prefix(b"\n") {
                Some(next) => p = next,
                None => return false,
            }
            continue;
        }
        return [b"version=1", b"version=2", b"version=3"]
            .iter()
            .any(|v| p.starts_with(*v) && (p[9..].starts_with(b"\n") || p[9..].starts_with(b"\r\n")));
    }
    false
}

#[derive(Default)]
struct Descriptor {
    create_type: Option<String>,
    parent_hint: Option<String>,
    /// (sectors, file name) per extent line.
    extents: Vec<(u64, String)>,
}

fn unquote(value: &str) -> &str {
    let value = value.trim();
    value.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(value)
}

fn parse_descriptor(bytes: &[u8], name: &str) -> CoreResult<Descriptor> {
    let mut out = Descriptor::default();
    for line in text(bytes).lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let first = line.split_whitespace().next().unwrap_or("");
        if matches!(first, "RW" | "RDONLY" | "NOACCESS") {
            // RW <sectors> <type> ["file name" [offset]]
            let rest = line[first.len()..].trim_start();
            let (sectors, rest) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
            let sectors: u64 =
                sectors.parse().map_err(|_| bad(format!("{name}: vmdk extent line {line:?} has no sector count")))?;
            let rest = rest.trim_start();
            let (kind, rest) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
            let file = rest.trim_start().strip_prefix('"').and_then(|r| r.split_once('"')).map(|(f, _)| f.to_string());
            match (kind, file) {
                ("ZERO", _) => out.extents.push((sectors, String::new())),
                (_, Some(file)) => out.extents.push((sectors, file)),
                (_, None) => return Err(bad(format!("{name}: vmdk extent line {line:?} names no file"))),
            }
            continue;
        }
        if let Some((key, value)) = line.split_once('=') {
            match key.trim() {
                "createType" => out.create_type = Some(unquote(value).to_string()),
                "parentFileNameHint" => out.parent_hint = Some(unquote(value).to_string()),
                _ => {}
            }
        }
    }
    Ok(out)
}

fn vmdk_sparse(input: &Input<'_>) -> CoreResult<ImageInfo> {
    let name = input.name().to_string();
    let mut header = input.read(0, 512, "the vmdk sparse extent header")?;
    if le64(&header, 56) == VMDK_GD_AT_END {
        // A stream-optimized extent written in one pass keeps its real header in a footer,
        // one sector before the end-of-stream marker.
        if let Some(len) = input.len().filter(|len| *len >= 1536) {
            if let Some(footer) = input.try_read(len - 1024, 512, "the vmdk footer")? {
                if footer.starts_with(b"KDMV") {
                    header = footer;
                }
            }
        }
    }
    let version = le32(&header, 4);
    let capacity = le64(&header, 12);
    let grain = le64(&header, 20);
    let virtual_size = capacity
        .checked_mul(512)
        .ok_or_else(|| bad(format!("{name}: vmdk capacity of {capacity} sectors is not a possible size")))?;
    let cluster_size = grain
        .checked_mul(512)
        .filter(|size| *size > 0 && *size <= 1 << 30)
        .ok_or_else(|| bad(format!("{name}: vmdk grain size of {grain} sectors is not a possible size")))?;
    let mut info = ImageInfo {
        format: "vmdk",
        virtual_size: Some(virtual_size),
        cluster_size: Some(cluster_size),
        version: Some(version),
        dirty: header.get(72).is_some_and(|b| *b != 0),
        compression_type: (le16(&header, 77) == 1).then_some("deflate"),
        ..ImageInfo::default()
    };
    let (desc_sectors_at, desc_sectors) = (le64(&header, 28), le64(&header, 36));
    if desc_sectors_at != 0 && desc_sectors != 0 {
        let (Some(at), Some(length)) = (desc_sectors_at.checked_mul(512), desc_sectors.checked_mul(512)) else {
            return Err(bad(format!("{name}: vmdk descriptor position is not a possible offset")));
        };
        if length > MAX_DESCRIPTOR + 1 {
            return Err(bad(format!("{name}: vmdk embedded descriptor of {length} bytes is larger than 1 MiB")));
        }
        let descriptor = parse_descriptor(&input.read(at, length, "the vmdk embedded descriptor")?, &name)?;
        info.subformat = descriptor.create_type;
        info.backing_file = descriptor.parent_hint;
        // The extents of an embedded descriptor are this file itself.
    }
    Ok(info)
}

fn vmdk_descriptor(input: &Input<'_>) -> CoreResult<ImageInfo> {
    let name = input.name().to_string();
    let bytes = input.read_upto(0, MAX_DESCRIPTOR, "the vmdk descriptor")?;
    let descriptor = parse_descriptor(&bytes, &name)?;
    let mut sectors = 0u64;
    for (count, _) in &descriptor.extents {
        sectors = sectors
            .checked_add(*count)
            .ok_or_else(|| bad(format!("{name}: vmdk extents add up to more sectors than any disk has")))?;
    }
    let virtual_size = sectors
        .checked_mul(512)
        .ok_or_else(|| bad(format!("{name}: vmdk extents add up to more bytes than any disk has")))?;
    let extents: Vec<String> = descriptor.extents.into_iter().map(|(_, file)| file).filter(|f| !f.is_empty()).collect();
    Ok(ImageInfo {
        format: "vmdk",
        virtual_size: Some(virtual_size),
        subformat: descriptor.create_type,
        backing_file: descriptor.parent_hint,
        needs_other_file: !extents.is_empty(),
        extents,
        ..ImageInfo::default()
    })
}

// --- vhd ---------------------------------------------------------------------------------

/// 65535 cylinders x 16 heads x 255 sectors: the largest CHS geometry.
const VHD_MAX_GEOMETRY: u64 = 65535 * 16 * 255;

fn vhd(input: &Input<'_>, footer: &[u8]) -> CoreResult<ImageInfo> {
    let name = input.name().to_string();
    if footer.len() < 512 {
        return Err(input.outside(0, 512, "the vhd footer"));
    }
    let disk_type = be32(footer, 60);
    let subformat = match disk_type {
        2 => "fixed",
        3 => "dynamic",
        4 => "differencing",
        other => return Err(bad(format!("{name}: vhd disk type {other} is not fixed, dynamic or differencing"))),
    };
    let current_size = be64(footer, 48);
    let chs = u64::from(be16(footer, 56)) * u64::from(footer[58]) * u64::from(footer[59]);
    // qemu's rule: Virtual PC (and old qemu) size a disk by its geometry; Hyper-V, qemu's
    // "qem2", disk2vhd, XenServer and XenConverter by current_size; the largest geometry
    // means a disk too large for CHS.
    let creator = &footer[28..32];
    let by_size = [&b"win "[..], b"qem2", b"d2v ", b"CTXS"].contains(&creator) || creator.starts_with(b"tap\0");
    let virtual_size = if by_size || chs == VHD_MAX_GEOMETRY { current_size } else { chs * 512 };
    let mut info = ImageInfo {
        format: "vhd",
        virtual_size: Some(virtual_size),
        version: Some(be32(footer, 12) >> 16),
        subformat: Some(subformat.to_string()),
        ..ImageInfo::default()
    };
    if disk_type == 2 {
        return Ok(info);
    }
    let header_at = be64(footer, 16);
    let header = input.read(header_at, 1024, "the vhd dynamic disk header")?;
    if !header.starts_with(b"cxsparse") {
        return Err(bad(format!("{name}: no vhd dynamic disk header (cxsparse) at byte {header_at}")));
    }
    info.cluster_size = Some(u64::from(be32(&header, 32)));
    if disk_type == 4 {
        let mut parent = utf16(&header[64..576], true);
        if parent.is_empty() {
            parent = vhd_parent_locator(input, &header)?.unwrap_or_default();
        }
        info.needs_other_file = parent.is_empty();
        info.backing_file = (!parent.is_empty()).then_some(parent);
    }
    Ok(info)
}

/// The first parent locator that names the parent (relative, then absolute Windows path, then
/// a Mac file URL).
fn vhd_parent_locator(input: &Input<'_>, header: &[u8]) -> CoreResult<Option<String>> {
    for wanted in [&b"W2ru"[..], b"W2ku", b"MacX"] {
        for entry in header[576..768].chunks_exact(24) {
            if &entry[0..4] != wanted {
                continue;
            }
            let length = u64::from(be32(entry, 8));
            let data = input.read(be64(entry, 16), length.min(64 << 10), "a vhd parent locator")?;
            let name = if wanted == b"MacX" { text(&data) } else { utf16(&data, false) };
            if !name.is_empty() {
                return Ok(Some(name));
            }
        }
    }
    Ok(None)
}

// --- vhdx --------------------------------------------------------------------------------

/// A GUID as VHDX stores it: the first three fields little-endian, the rest as written.
fn guid(text: &str) -> [u8; 16] {
    let hex: Vec<u8> =
        text.bytes().filter(u8::is_ascii_hexdigit).map(|c| (c as char).to_digit(16).map_or(0, |d| d as u8)).collect();
    let mut raw = [0u8; 16];
    for (i, pair) in hex.chunks_exact(2).take(16).enumerate() {
        raw[i] = pair[0] << 4 | pair[1];
    }
    let mut out = raw;
    out[0..4].copy_from_slice(&[raw[3], raw[2], raw[1], raw[0]]);
    out[4..6].copy_from_slice(&[raw[5], raw[4]]);
    out[6..8].copy_from_slice(&[raw[7], raw[6]]);
    out
}

const VHDX_METADATA_REGION: &str = "8B7CA206-4790-4B9A-B8FE-575F050F886E";
const VHDX_FILE_PARAMETERS: &str = "CAA16737-FA36-4D43-B3B6-33F0AA44E76B";
const VHDX_VIRTUAL_DISK_SIZE: &str = "2FA54224-CD1B-4876-B211-5DBED83BF4B8";
const VHDX_PARENT_LOCATOR: &str = "A8D35F2D-B30B-454D-ABF7-D3D84834AB0C";

fn vhdx(input: &Input<'_>) -> CoreResult<ImageInfo> {
    let name = input.name().to_string();
    let mut info = ImageInfo { format: "vhdx", ..ImageInfo::default() };
    // The current header is the valid one with the higher sequence number; a log GUID that is
    // not zero means a log to replay, i.e. the image was not closed cleanly.
    let mut best: Option<(u64, Vec<u8>)> = None;
    for at in [64u64 << 10, 128 << 10] {
        if let Some(header) = input.try_read(at, 80, "a vhdx header")? {
            if header.starts_with(b"head") && best.as_ref().is_none_or(|(seq, _)| le64(&header, 8) > *seq) {
                best = Some((le64(&header, 8), header));
            }
        }
    }
    let Some((_, header)) = best else {
        if input.available() < (128 << 10) + 80 {
            return Err(input.outside(64 << 10, (64 << 10) + 80, "the vhdx headers"));
        }
        return Err(bad(format!("{name}: no vhdx header at 64 KiB or 128 KiB")));
    };
    info.version = Some(u32::from(le16(&header, 66)));
    info.dirty = header[48..64].iter().any(|b| *b != 0);

    let mut region = None;
    for at in [192u64 << 10, 256 << 10] {
        if let Some(table) = input.try_read(at, 64 << 10, "the vhdx region table")? {
            if table.starts_with(b"regi") {
                region = Some(table);
                break;
            }
        }
    }
    let Some(table) = region else {
        if input.available() < 256 << 10 {
            return Err(input.outside(192 << 10, 64 << 10, "the vhdx region table"));
        }
        return Err(bad(format!("{name}: no vhdx region table at 192 KiB or 256 KiB")));
    };
    let count = le32(&table, 8) as usize;
    if count > 2047 {
        return Err(bad(format!("{name}: vhdx region table claims {count} entries, more than 2047")));
    }
    let metadata_guid = guid(VHDX_METADATA_REGION);
    let metadata = table[16..]
        .chunks_exact(32)
        .take(count)
        .find(|entry| entry[..16] == metadata_guid)
        .map(|entry| (le64(entry, 16), u64::from(le32(entry, 24))));
    let Some((meta_at, meta_len)) = metadata else {
        return Err(bad(format!("{name}: the vhdx region table has no metadata region")));
    };
    if meta_len < 64 << 10 {
        return Err(bad(format!("{name}: vhdx metadata region of {meta_len} bytes is smaller than its table")));
    }
    let meta_table = input.read(meta_at, 64 << 10, "the vhdx metadata table")?;
    if !meta_table.starts_with(b"metadata") {
        return Err(bad(format!("{name}: no vhdx metadata table at byte {meta_at}")));
    }
    let entries = usize::from(le16(&meta_table, 10));
    if entries > 2047 {
        return Err(bad(format!("{name}: vhdx metadata table claims {entries} entries, more than 2047")));
    }
    let item = |id: &str| -> CoreResult<Option<Vec<u8>>> {
        let wanted = guid(id);
        let Some(entry) = meta_table[32..].chunks_exact(32).take(entries).find(|e| e[..16] == wanted) else {
            return Ok(None);
        };
        let (offset, length) = (u64::from(le32(entry, 16)), u64::from(le32(entry, 20)));
        if offset.saturating_add(length) > meta_len || length > 1 << 20 {
            return Err(bad(format!(
                "{name}: vhdx metadata item {id} (bytes {offset}..{}) lies outside its region of {meta_len} bytes",
                offset.saturating_add(length)
            )));
        }
        input.read(meta_at + offset, length, "a vhdx metadata item").map(Some)
    };
    let parameters = item(VHDX_FILE_PARAMETERS)?
        .filter(|p| p.len() >= 8)
        .ok_or_else(|| bad(format!("{name}: the vhdx metadata has no file parameters")))?;
    let size = item(VHDX_VIRTUAL_DISK_SIZE)?
        .filter(|p| p.len() >= 8)
        .ok_or_else(|| bad(format!("{name}: the vhdx metadata has no virtual disk size")))?;
    info.virtual_size = Some(le64(&size, 0));
    info.cluster_size = Some(u64::from(le32(&parameters, 0)));
    let flags = le32(&parameters, 4);
    let has_parent = flags & 2 != 0;
    info.subformat = Some(
        if has_parent {
            "differencing"
        } else if flags & 1 != 0 {
            "fixed"
        } else {
            "dynamic"
        }
        .to_string(),
    );
    if has_parent {
        let parent = match item(VHDX_PARENT_LOCATOR)? {
            Some(locator) => vhdx_parent(&locator, &name)?,
            None => None,
        };
        info.needs_other_file = parent.is_none();
        info.backing_file = parent;
    }
    Ok(info)
}

/// The parent's path from a vhdx parent locator: relative_path, else the absolute or volume
/// path (the keys and values are UTF-16LE, at offsets from the locator's start).
fn vhdx_parent(locator: &[u8], name: &str) -> CoreResult<Option<String>> {
    if locator.len() < 20 {
        return Err(bad(format!("{name}: vhdx parent locator of {} bytes is too short", locator.len())));
    }
    let count = usize::from(le16(locator, 18));
    let mut found: Vec<(String, String)> = Vec::new();
    for index in 0..count {
        let at = 20 + index * 12;
        let Some(entry) = locator.get(at..at + 12) else {
            return Err(bad(format!("{name}: vhdx parent locator entry {index} lies past its end")));
        };
        let field = |offset: usize, length: usize| -> CoreResult<String> {
            let bytes = offset
                .checked_add(length)
                .and_then(|end| locator.get(offset..end))
                .ok_or_else(|| bad(format!("{name}: vhdx parent locator entry {index} points past the locator")))?;
            Ok(utf16(bytes, false))
        };
        let key = field(le32(entry, 0) as usize, usize::from(le16(entry, 8)))?;
        let value = field(le32(entry, 4) as usize, usize::from(le16(entry, 10)))?;
        found.push((key, value));
    }
    for wanted in ["relative_path", "absolute_win32_path", "volume_path"] {
        if let Some((_, value)) = found.iter().find(|(key, value)| key == wanted && !value.is_empty()) {
            return Ok(Some(value.clone()));
        }
    }
    Ok(None)
}

// --- compressed wrappers -------------------------------------------------------------------

fn wrapper_of(start: &[u8]) -> Option<&'static str> {
    if start.starts_with(&[0x1f, 0x8b]) {
        Some("gzip")
    } else if start.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        Some("xz")
    } else if start.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Some("zstd")
    } else {
        None
    }
}

/// Compressed bytes read at most to decompress a wrapper's head: a stream that yields nothing
/// (empty gzip members, zstd skippable frames) is not read to its end.
const MAX_COMPRESSED_READ: u64 = 64 << 20;

/// The compressed bytes of the input, as a reader that never reads past what is available.
struct InputReader<'a, 'b> {
    input: &'b Input<'a>,
    position: u64,
}

impl Read for InputReader<'_, '_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let end = self.input.available().min(MAX_COMPRESSED_READ);
        let left = end.saturating_sub(self.position);
        let want = (buf.len() as u64).min(left).min(1 << 20);
        if want == 0 {
            return Ok(0);
        }
        let data = self
            .input
            .read(self.position, want, "the compressed image")
            .map_err(|err| io::Error::other(err.to_string()))?;
        buf[..data.len()].copy_from_slice(&data);
        self.position += data.len() as u64;
        Ok(data.len())
    }
}

/// Decompress at most `HEAD_BYTES` from the start of what the wrapper holds. A stream that
/// is damaged or cut short yields what decompressed before that.
fn decompress_head(input: &Input<'_>, wrapper: &str) -> (Vec<u8>, bool) {
    let reader = InputReader { input, position: 0 };
    let mut out = Vec::new();
    let limit = HEAD_BYTES as u64 + 1;
    let result = match wrapper {
        "gzip" => flate2::read::MultiGzDecoder::new(reader).take(limit).read_to_end(&mut out),
        "xz" => match xz_head(reader, &mut out) {
            Ok(()) => Ok(out.len()),
            Err(err) => Err(err),
        },
        _ => match ruzstd::decoding::StreamingDecoder::new(reader) {
            Ok(decoder) => decoder.take(limit).read_to_end(&mut out),
            Err(err) => Err(io::Error::other(err.to_string())),
        },
    };
    let complete = result.is_ok() && (out.len() as u64) < limit;
    out.truncate(HEAD_BYTES);
    (out, complete)
}

/// xz through lzma-rs into a sink that stops (with an error) once `HEAD_BYTES` arrived.
fn xz_head(reader: InputReader<'_, '_>, out: &mut Vec<u8>) -> io::Result<()> {
    struct Capped<'v>(&'v mut Vec<u8>);
    impl io::Write for Capped<'_> {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let room = (HEAD_BYTES + 1).saturating_sub(self.0.len());
            if room == 0 {
                return Err(io::Error::other("head is full"));
            }
            let n = buf.len().min(room);
            self.0.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let mut buffered = io::BufReader::new(reader);
    lzma_rs::xz_decompress(&mut buffered, &mut Capped(out)).map_err(|err| io::Error::other(format!("{err:?}")))
}

fn wrapped(input: &Input<'_>, wrapper: &'static str) -> CoreResult<ImageInfo> {
    let (head, complete) = decompress_head(input, wrapper);
    let name = format!("{} (inside its {wrapper} wrapper)", input.name());
    let size = complete.then_some(head.len() as u64);
    let nested = head.get(..8).and_then(wrapper_of).is_some();
    let inner = match inspect_within(&Input::Head { data: &head, len: size, name }, false) {
        Ok(inner) => inner,
        // What is inside could not be read (cut short, or not an image): raw, size unknown.
        Err(CoreError::InvalidArgument(_)) if !complete && !nested => {
            ImageInfo { format: "raw", ..ImageInfo::default() }
        }
        Err(err) => return Err(err),
    };
    Ok(ImageInfo { wrapper: Some(wrapper), ..inner })
}

// --- Python ------------------------------------------------------------------------------

fn to_dict<'py>(py: Python<'py>, info: &ImageInfo) -> PyResult<Bound<'py, PyDict>> {
    let dict = PyDict::new(py);
    dict.set_item("format", info.format)?;
    dict.set_item("virtual_size", info.virtual_size)?;
    dict.set_item("backing_file", &info.backing_file)?;
    dict.set_item("backing_format", &info.backing_format)?;
    dict.set_item("data_file", &info.data_file)?;
    dict.set_item("needs_other_file", info.needs_other_file)?;
    dict.set_item("encrypted", info.encrypted)?;
    dict.set_item("encryption", info.encryption)?;
    dict.set_item("compression_type", info.compression_type)?;
    dict.set_item("cluster_size", info.cluster_size)?;
    dict.set_item("version", info.version)?;
    dict.set_item("wrapper", info.wrapper)?;
    dict.set_item("dirty", info.dirty)?;
    dict.set_item("corrupt", info.corrupt)?;
    dict.set_item("subformat", &info.subformat)?;
    dict.set_item("extents", PyList::new(py, &info.extents)?)?;
    dict.set_item("features", PyList::new(py, &info.features)?)?;
    Ok(dict)
}

/// What the header of the image file at `path` says, as a dict (see `vmstore.images`).
#[pyfunction]
pub fn inspect_image_path(py: Python<'_>, path: std::path::PathBuf) -> PyResult<Bound<'_, PyDict>> {
    let info = py.detach(|| inspect_path(&path))?;
    to_dict(py, &info)
}

/// What the start of an image (`head`, the first bytes of a stream) says; `size` is the whole
/// image's length when known.
#[pyfunction]
#[pyo3(signature = (head, *, size = None, name = "<stream>".to_string()))]
pub fn inspect_image_bytes<'py>(
    py: Python<'py>,
    head: &[u8],
    size: Option<u64>,
    name: String,
) -> PyResult<Bound<'py, PyDict>> {
    let info = py.detach(|| inspect_head(head, size, &name))?;
    to_dict(py, &info)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qcow2_header(version: u32, cluster_bits: u32) -> Vec<u8> {
        let mut h = vec![0u8; 1 << cluster_bits];
        h[0..4].copy_from_slice(b"QFI\xfb");
        h[4..8].copy_from_slice(&version.to_be_bytes());
        h[20..24].copy_from_slice(&cluster_bits.to_be_bytes());
        h[24..32].copy_from_slice(&(1u64 << 30).to_be_bytes());
        if version == 3 {
            h[100..104].copy_from_slice(&112u32.to_be_bytes());
        }
        h
    }

    fn head(data: &[u8]) -> CoreResult<ImageInfo> {
        inspect_head(data, Some(data.len() as u64), "test")
    }

    #[test]
    fn reads_a_qcow2_backing_file_and_data_file() {
        let mut h = qcow2_header(3, 16);
        // data file extension at 112, then the end marker, then the backing name.
        h[112..116].copy_from_slice(&QCOW2_EXT_DATA_FILE.to_be_bytes());
        h[116..120].copy_from_slice(&5u32.to_be_bytes());
        h[120..125].copy_from_slice(b"d.raw");
        h[8..16].copy_from_slice(&200u64.to_be_bytes());
        h[16..20].copy_from_slice(&8u32.to_be_bytes());
        h[200..208].copy_from_slice(b"base.img");
        h[72..80].copy_from_slice(&4u64.to_be_bytes());
        let info = head(&h).expect("valid");
        assert_eq!(info.backing_file.as_deref(), Some("base.img"));
        assert_eq!(info.data_file.as_deref(), Some("d.raw"));
        assert_eq!(info.features, vec!["external-data-file".to_string()]);
        assert!(!info.needs_other_file);
        assert_eq!(info.virtual_size, Some(1 << 30));
    }

    #[test]
    fn refuses_qcow2_fields_out_of_bounds() {
        for (at, value) in [(8usize, 1u64 << 40), (8, 70_000)] {
            let mut h = qcow2_header(2, 16);
            h[at..at + 8].copy_from_slice(&value.to_be_bytes());
            h[16..20].copy_from_slice(&8u32.to_be_bytes());
            assert!(matches!(head(&h), Err(CoreError::InvalidArgument(_))), "offset {value}");
        }
        let mut h = qcow2_header(2, 16);
        h[72..76].copy_from_slice(&QCOW2_EXT_DATA_FILE.to_be_bytes());
        h[76..80].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(head(&h), Err(CoreError::InvalidArgument(_))));
        let mut h = qcow2_header(3, 16);
        h[100..104].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(head(&h), Err(CoreError::InvalidArgument(_))));
        let h = qcow2_header(3, 30);
        assert!(matches!(head(&h[..200]), Err(CoreError::InvalidArgument(_))));
    }

    #[test]
    fn truncated_headers_are_errors_not_panics() {
        let h = qcow2_header(3, 16);
        for cut in [4, 71, 72, 103, 111] {
            assert!(matches!(head(&h[..cut]), Err(CoreError::InvalidArgument(_))), "cut at {cut}");
        }
        let mut vmdk = vec![0u8; 40];
        vmdk[0..4].copy_from_slice(b"KDMV");
        assert!(head(&vmdk).is_err());
        assert!(head(b"vhdxfile").is_err());
        assert!(head(b"conectix").is_err());
    }

    #[test]
    fn anything_else_is_raw() {
        let info = head(&[7u8; 4096]).expect("raw");
        assert_eq!((info.format, info.virtual_size), ("raw", Some(4096)));
        let info = inspect_head(&[7u8; 4096], None, "s").expect("raw");
        assert_eq!(info.virtual_size, None);
    }

    #[test]
    fn probes_vmdk_descriptors_as_qemu_does() {
        assert!(is_vmdk_descriptor(b"# Disk DescriptorFile\nversion=1\n"));
        assert!(is_vmdk_descriptor(b"\n  \nversion=3\r\n"));
        assert!(!is_vmdk_descriptor(b"hello\nversion=1\n"));
        assert!(!is_vmdk_descriptor(b"# only a comment"));
        let text = b"# Disk DescriptorFile\nversion=1\ncreateType=\"monolithicFlat\"\n\
                     parentFileNameHint=\"/etc/base.vmdk\"\nRW 2048 FLAT \"/etc/shadow\" 0\nRW 10 ZERO\n";
        let info = head(text).expect("descriptor");
        assert_eq!(info.format, "vmdk");
        assert_eq!(info.virtual_size, Some(2058 * 512));
        assert_eq!(info.extents, vec!["/etc/shadow".to_string()]);
        assert_eq!(info.backing_file.as_deref(), Some("/etc/base.vmdk"));
        assert!(info.needs_other_file);
    }

    #[test]
    fn vhdx_parent_locator_is_read() {
        // key/value pairs in UTF-16LE after a 20-byte header and one 12-byte entry.
        let key: Vec<u8> = "relative_path".encode_utf16().flat_map(u16::to_le_bytes).collect();
        let value: Vec<u8> = "..\\base.vhdx".encode_utf16().flat_map(u16::to_le_bytes).collect();
        let mut locator = vec![0u8; 32];
        locator[18..20].copy_from_slice(&1u16.to_le_bytes());
        locator[20..24].copy_from_slice(&32u32.to_le_bytes());
        locator[24..28].copy_from_slice(&(32 + key.len() as u32).to_le_bytes());
        locator[28..30].copy_from_slice(&(key.len() as u16).to_le_bytes());
        locator[30..32].copy_from_slice(&(value.len() as u16).to_le_bytes());
        locator.extend_from_slice(&key);
        locator.extend_from_slice(&value);
        assert_eq!(vhdx_parent(&locator, "t").expect("parsed").as_deref(), Some("..\\base.vhdx"));
        locator[24..28].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(vhdx_parent(&locator, "t").is_err());
    }

    #[test]
    fn a_wrapper_inside_a_wrapper_is_refused() {
        use std::io::Write;
        let mut inner = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        inner.write_all(&qcow2_header(3, 16)).expect("in memory");
        let inner = inner.finish().expect("in memory");
        let info = head(&inner).expect("one level is inspected");
        assert_eq!((info.format, info.wrapper), ("qcow2", Some("gzip")));
        let mut outer = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        outer.write_all(&inner).expect("in memory");
        let outer = outer.finish().expect("in memory");
        assert!(matches!(head(&outer), Err(CoreError::InvalidArgument(_))));
    }

    #[test]
    fn guid_layout_matches_the_spec() {
        assert_eq!(
            guid(VHDX_METADATA_REGION),
            [0x06, 0xA2, 0x7C, 0x8B, 0x90, 0x47, 0x9A, 0x4B, 0xB8, 0xFE, 0x57, 0x5F, 0x05, 0x0F, 0x88, 0x6E]
        );
    }

    #[test]
    fn mutated_headers_never_panic() {
        let mut seeds = vec![qcow2_header(3, 12), qcow2_header(2, 12)];
        let mut vmdk = vec![0u8; 4096];
        vmdk[0..4].copy_from_slice(b"KDMV");
        vmdk[28..36].copy_from_slice(&1u64.to_le_bytes());
        vmdk[36..44].copy_from_slice(&2u64.to_le_bytes());
        seeds.push(vmdk);
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for seed in &seeds {
            for _ in 0..2000 {
                let mut data = seed.clone();
                for _ in 0..(next() % 8 + 1) {
                    let at = (next() % 128) as usize;
                    data[at] = next() as u8;
                }
                let cut = (next() as usize) % (data.len() + 1);
                let _ = head(&data[..cut]);
                let _ = inspect_head(&data, None, "t");
            }
        }
    }
}
