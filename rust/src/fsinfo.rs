//! Which filesystem a path lives on (statfs), so the NFS backend can tell a real NFS
//! mount from a local directory standing in for one.

use std::ffi::CString;
use std::io;
use std::path::Path;

const KNOWN: &[(i64, &str, bool)] = &[
    (0x6969, "nfs", true),
    (0xFF53_4D42, "cifs", true),
    (0xFE53_4D42, "smb2", true),
    (0x0102_1997, "v9fs", true),
    (0x6573_5546, "fuse", false),
    (0xEF53, "ext4", false),
    (0x5846_5342, "xfs", false),
    (0x9123_683E, "btrfs", false),
    (0x0102_1994, "tmpfs", false),
    (0x794C_7630, "overlayfs", false),
    (0x2FC1_2FC1, "zfs", false),
];

/// (is it a network filesystem, its type name).
pub fn filesystem_type(path: &Path) -> io::Result<(bool, String)> {
    let c_path = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: c_path is a valid NUL-terminated string and stat a writable statfs.
    let rc = unsafe { libc::statfs(c_path.as_ptr(), &mut stat) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    #[allow(clippy::unnecessary_cast)]
    let magic = stat.f_type as i64;
    Ok(KNOWN
        .iter()
        .find(|(m, _, _)| *m == magic)
        .map(|(_, name, network)| (*network, (*name).to_string()))
        .unwrap_or((false, format!("unknown(0x{magic:x})"))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_dir_is_not_nfs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (network, name) = filesystem_type(dir.path()).expect("statfs");
        assert!(!network, "{name}");
    }

    #[test]
    fn missing_path_is_an_error() {
        assert!(filesystem_type(Path::new("/no/such/dir/here")).is_err());
    }
}
