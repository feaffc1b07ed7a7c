//! Which filesystem a path lives on (statfs), so the NFS backend can tell a real NFS
//! mount from a local directory standing in for one.

use std::io;
use std::path::Path;

use crate::sys;

/// statfs(2) magic numbers (linux/magic.h and the filesystems' own headers): the name and
/// whether the filesystem can be shared between hosts (network and cluster filesystems).
const KNOWN: &[(i64, &str, bool)] = &[
    (0x6969, "nfs", true),
    (0xFF53_4D42, "cifs", true),
    (0xFE53_4D42, "smb2", true),
    (0x517B, "smb", true),
    (0x0102_1997, "v9fs", true),
    (0x00C3_6400, "cephfs", true),
    (0x0BD0_0BD0, "lustre", true),
    (0x4750_4653, "gpfs", true),
    (0x5346_414F, "afs", true),
    (0x6B41_4653, "afs", true),
    (0x7461_636F, "ocfs2", true),
    (0x0116_1970, "gfs2", true),
    (0x1983_0326, "beegfs", true),
    // GlusterFS, sshfs, s3fs, ceph-fuse, ...: the subtype comes from /proc/self/mountinfo.
    (0x6573_5546, "fuse", true),
    (0xEF53, "ext4", false),
    (0x5846_5342, "xfs", false),
    (0x9123_683E, "btrfs", false),
    (0x0102_1994, "tmpfs", false),
    (0x8584_58F6, "ramfs", false),
    (0x794C_7630, "overlayfs", false),
    (0x2FC1_2FC1, "zfs", false),
    (0xF2F5_2010, "f2fs", false),
];

const FUSE_MAGIC: i64 = 0x6573_5546;

/// (can the filesystem be shared between hosts, its type name). The name is "nfs" for
/// every NFS version, "fuse.<subtype>" for a FUSE filesystem whose mount names one (e.g.
/// "fuse.glusterfs"), "unknown(0x...)" for a magic number not in the table.
pub fn filesystem_type(path: &Path) -> io::Result<(bool, String)> {
    let magic = sys::filesystem_magic(path)?;
    let (shared, name) = KNOWN
        .iter()
        .find(|(m, _, _)| *m == magic)
        .map(|(_, name, shared)| (*shared, (*name).to_string()))
        .unwrap_or((false, format!("unknown(0x{magic:x})")));
    if magic == FUSE_MAGIC {
        if let Some(fstype) = std::fs::read_to_string("/proc/self/mountinfo").ok().and_then(|t| mount_fstype(&t, path))
        {
            if fstype.starts_with("fuse") {
                return Ok((shared, fstype));
            }
        }
    }
    Ok((shared, name))
}

/// The fstype of the mount that holds `path` (the longest mount point that is a prefix of
/// it) in the text of /proc/self/mountinfo.
pub(crate) fn mount_fstype(mountinfo: &str, path: &Path) -> Option<String> {
    let mut best: Option<(usize, String)> = None;
    for line in mountinfo.lines() {
        // "36 35 98:0 /root /mnt/point rw,noatime master:1 - fuse.glusterfs host:/vol rw,..."
        let Some((left, right)) = line.split_once(" - ") else { continue };
        let (Some(mount_point), Some(fstype)) = (left.split(' ').nth(4), right.split(' ').next()) else {
            continue;
        };
        let mount_point = unescape(mount_point);
        if path.starts_with(Path::new(&mount_point)) && best.as_ref().is_none_or(|(len, _)| mount_point.len() >= *len) {
            best = Some((mount_point.len(), fstype.to_string()));
        }
    }
    best.map(|(_, fstype)| fstype)
}

/// mountinfo writes space, tab, newline and backslash in paths as \ooo octal escapes.
pub(crate) fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal =
            bytes.get(i + 1..i + 4).filter(|d| bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(digits) => {
                out.push(digits.iter().fold(0u8, |acc, d| acc.wrapping_mul(8).wrapping_add(d - b'0')));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
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
    fn fuse_subtype_comes_from_the_longest_matching_mount() {
        let mountinfo = "22 1 8:1 / / rw - ext4 /dev/sda1 rw\n\
            40 22 0:50 / /mnt/gluster\\040vol rw - fuse.glusterfs srv:/vol rw\n\
            41 40 0:51 / /mnt/gluster\\040vol/inner rw - fuse.sshfs u@h:/ rw\n";
        assert_eq!(mount_fstype(mountinfo, Path::new("/mnt/gluster vol/a/disk")).as_deref(), Some("fuse.glusterfs"));
        assert_eq!(mount_fstype(mountinfo, Path::new("/mnt/gluster vol/inner/x")).as_deref(), Some("fuse.sshfs"));
        assert_eq!(mount_fstype(mountinfo, Path::new("/mnt/glusterx")).as_deref(), Some("ext4"));
    }

    #[test]
    fn missing_path_is_an_error() {
        assert!(filesystem_type(Path::new("/no/such/dir/here")).is_err());
    }
}
