//! A minimal writer for the "newc" cpio format the Linux initramfs unpacker reads.
//!
//! Each entry is a 110-byte ASCII header (`070701` and thirteen 8-digit hex fields), the
//! NUL-terminated name padded so the header plus name end on a 4-byte boundary, and the
//! data padded to 4 bytes. The archive ends with an entry named `TRAILER!!!`.

use std::io::{self, Write};

const MAGIC: &[u8; 6] = b"070701";
const HEADER_LEN: usize = 110;
const TRAILER: &str = "TRAILER!!!";
/// Directory file type bits (`S_IFDIR`).
const S_IFDIR: u32 = 0o040000;
/// Regular file type bits (`S_IFREG`).
const S_IFREG: u32 = 0o100000;
/// Inode numbers start high so they do not meet the ones of an archive we are appended to.
const FIRST_INO: u32 = 0x7000_0000;

/// Writes a newc cpio archive entry by entry; call [`NewcWriter::finish`] at the end.
pub struct NewcWriter<W: Write> {
    out: W,
    next_ino: u32,
}

impl<W: Write> NewcWriter<W> {
    /// Starts an archive written to `out`.
    pub fn new(out: W) -> Self {
        Self {
            out,
            next_ino: FIRST_INO,
        }
    }

    /// Adds a directory; `perm` holds the permission bits (e.g. `0o755`).
    pub fn add_dir(&mut self, name: &str, perm: u32) -> io::Result<()> {
        self.entry(name, S_IFDIR | (perm & 0o7777), 2, &[])
    }

    /// Adds a regular file; `perm` holds the permission bits (e.g. `0o755` for a script).
    pub fn add_file(&mut self, name: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        self.entry(name, S_IFREG | (perm & 0o7777), 1, data)
    }

    /// Writes the trailer and returns the underlying writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.entry(TRAILER, 0, 1, &[])?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn entry(&mut self, name: &str, mode: u32, nlink: u32, data: &[u8]) -> io::Result<()> {
        if name.is_empty() || name.contains('\0') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "bad cpio entry name",
            ));
        }
        let file_size = u32::try_from(data.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "cpio entry over 4 GiB"))?;
        let ino = if name == TRAILER { 0 } else { self.next_ino };
        self.next_ino += 1;
        let name_size = name.len() as u32 + 1;
        // ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor, rdevmajor,
        // rdevminor, namesize, check
        let fields = [
            ino, mode, 0, 0, nlink, 0, file_size, 0, 0, 0, 0, name_size, 0,
        ];
        let mut header = Vec::with_capacity(HEADER_LEN + name.len() + 4);
        header.extend_from_slice(MAGIC);
        for field in fields {
            header.extend_from_slice(format!("{field:08x}").as_bytes());
        }
        header.extend_from_slice(name.as_bytes());
        header.push(0);
        header.resize(header.len().next_multiple_of(4), 0);
        self.out.write_all(&header)?;
        self.out.write_all(data)?;
        self.out
            .write_all(&[0; 3][..data.len().next_multiple_of(4) - data.len()])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One parsed entry: name, mode, nlink, data.
    type Entry = (String, u32, u32, Vec<u8>);

    fn field(header: &[u8], index: usize) -> u32 {
        let start = 6 + 8 * index;
        let text = std::str::from_utf8(&header[start..start + 8]).unwrap();
        u32::from_str_radix(text, 16).unwrap()
    }

    /// An independent reader, strict about magic and alignment.
    fn parse(mut archive: &[u8]) -> Vec<Entry> {
        let total = archive.len();
        let mut entries = Vec::new();
        loop {
            assert_eq!((total - archive.len()) % 4, 0, "entry not 4-byte aligned");
            assert_eq!(&archive[..6], MAGIC);
            let header = &archive[..HEADER_LEN];
            let (mode, nlink, size, name_size) = (
                field(header, 1),
                field(header, 4),
                field(header, 6),
                field(header, 11),
            );
            let name_end = HEADER_LEN + name_size as usize;
            assert_eq!(archive[name_end - 1], 0, "name not NUL-terminated");
            let name = std::str::from_utf8(&archive[HEADER_LEN..name_end - 1])
                .unwrap()
                .to_owned();
            let data_start = name_end.next_multiple_of(4);
            let data_end = data_start + size as usize;
            let data = archive[data_start..data_end].to_vec();
            archive = &archive[data_end.next_multiple_of(4)..];
            if name == TRAILER {
                assert!(archive.is_empty(), "bytes after the trailer");
                return entries;
            }
            entries.push((name, mode, nlink, data));
        }
    }

    #[test]
    fn round_trip() {
        let mut w = NewcWriter::new(Vec::new());
        w.add_dir("h", 0o755).unwrap();
        w.add_file("h/script", 0o644, b"echo hi\n").unwrap();
        w.add_file("h/tool.sh", 0o755, b"#!/bin/sh\nexit 0\n")
            .unwrap();
        w.add_file("h/empty", 0o600, b"").unwrap();
        let archive = w.finish().unwrap();
        assert_eq!(archive.len() % 4, 0);

        let entries = parse(&archive);
        let summary: Vec<(&str, u32, u32, &[u8])> = entries
            .iter()
            .map(|(n, m, l, d)| (n.as_str(), *m, *l, d.as_slice()))
            .collect();
        assert_eq!(
            summary,
            [
                ("h", 0o040755, 2, &b""[..]),
                ("h/script", 0o100644, 1, b"echo hi\n"),
                ("h/tool.sh", 0o100755, 1, b"#!/bin/sh\nexit 0\n"),
                ("h/empty", 0o100600, 1, b""),
            ]
        );
    }

    #[test]
    fn header_layout() {
        let mut w = NewcWriter::new(Vec::new());
        w.add_file("a", 0o644, b"xyz").unwrap();
        let archive = w.finish().unwrap();
        // 110-byte header + "a\0" = 112, already aligned; data "xyz" + 1 pad byte.
        assert_eq!(&archive[..14], b"07070170000000");
        assert_eq!(&archive[14..22], b"000081a4"); // mode 0o100644
        assert_eq!(&archive[110..112], b"a\0");
        assert_eq!(&archive[112..116], b"xyz\0");
        assert_eq!(&archive[116..122], MAGIC);
        assert!(archive.ends_with(b"TRAILER!!!\0\0\0\0"));
    }

    #[test]
    fn rejects_bad_names() {
        let mut w = NewcWriter::new(Vec::new());
        assert!(w.add_file("", 0o644, b"").is_err());
        assert!(w.add_file("a\0b", 0o644, b"").is_err());
    }
}
