//! A reproducible newc cpio writer (the initramfs format the kernel
//! unpacks), over the `cpio` crate.
//!
//! Every entry is owned by root, carries one fixed mtime (0 or
//! `SOURCE_DATE_EPOCH`) and gets inode numbers in write order, so the same
//! calls give byte-identical archives. [`CpioTree`] adds sorting: entries
//! are collected first and written in path order with their parent
//! directories, whatever order the caller added them in.

use std::collections::BTreeMap;
use std::io::Write;

/// Why writing an archive failed.
#[derive(Debug, thiserror::Error)]
pub enum CpioError {
    #[error("Entry {name} is over 4 GiB")]
    TooLarge { name: String },
    #[error("Cannot write cpio entry {name}")]
    WriteEntry {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot write the cpio trailer")]
    WriteTrailer(#[source] std::io::Error),
}

/// Writes newc entries in call order; the caller must write a directory
/// before what it holds.
pub struct CpioWriter {
    out: Vec<u8>,
    ino: u32,
    mtime: u32,
}

impl Default for CpioWriter {
    fn default() -> Self {
        CpioWriter::new(0)
    }
}

impl CpioWriter {
    /// A writer stamping every entry with `mtime` (seconds since the epoch).
    pub fn new(mtime: u32) -> CpioWriter {
        CpioWriter {
            out: Vec::new(),
            ino: 1,
            mtime,
        }
    }

    fn entry(&mut self, name: &str, mode: u32) -> cpio::newc::Builder {
        self.ino += 1;
        cpio::newc::Builder::new(name)
            .ino(self.ino)
            .mode(mode)
            .uid(0)
            .gid(0)
            .nlink(1)
            .mtime(self.mtime)
    }

    /// A directory with mode 0755.
    pub fn dir(&mut self, name: &str) -> Result<(), CpioError> {
        let builder = self.entry(name, 0o040_755).nlink(2);
        self.write(name, builder, &[])
    }

    /// A character device node (mode 0600).
    pub fn char_device(&mut self, name: &str, major: u32, minor: u32) -> Result<(), CpioError> {
        let builder = self
            .entry(name, 0o020_600)
            .rdev_major(major)
            .rdev_minor(minor);
        self.write(name, builder, &[])
    }

    /// A regular file with permission bits `perm` (e.g. 0o755).
    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> Result<(), CpioError> {
        let builder = self.entry(name, 0o100_000 | (perm & 0o7777));
        self.write(name, builder, data)
    }

    /// A symbolic link to `target`.
    pub fn symlink(&mut self, name: &str, target: &str) -> Result<(), CpioError> {
        let builder = self.entry(name, 0o120_777);
        self.write(name, builder, target.as_bytes())
    }

    fn write(
        &mut self,
        name: &str,
        builder: cpio::newc::Builder,
        data: &[u8],
    ) -> Result<(), CpioError> {
        let size =
            u32::try_from(data.len()).map_err(|_| CpioError::TooLarge { name: name.into() })?;
        let write_err = |source| CpioError::WriteEntry {
            name: name.into(),
            source,
        };
        let out = std::mem::take(&mut self.out);
        let mut writer = builder.write(out, size);
        writer.write_all(data).map_err(write_err)?;
        self.out = writer.finish().map_err(write_err)?;
        Ok(())
    }

    /// Appends the trailer and returns the archive.
    pub fn finish(self) -> Result<Vec<u8>, CpioError> {
        cpio::newc::trailer(self.out).map_err(CpioError::WriteTrailer)
    }
}

/// One entry of a [`CpioTree`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Dir,
    File { perm: u32, data: Vec<u8> },
    Symlink(String),
    CharDevice { major: u32, minor: u32 },
}

/// A file tree collected in any order and written sorted by path, each
/// missing parent directory added: the archive depends only on the tree's
/// content, never on the order a builder happened to walk its inputs.
#[derive(Debug, Default)]
pub struct CpioTree {
    nodes: BTreeMap<String, Node>,
}

impl CpioTree {
    pub fn new() -> CpioTree {
        CpioTree::default()
    }

    /// Adds (or replaces) the entry at `path` (relative, `/`-separated;
    /// leading `/` is ignored) and creates its parent directories.
    pub fn insert(&mut self, path: &str, node: Node) {
        let path = path.trim_start_matches('/').trim_end_matches('/');
        let mut parent = path;
        while let Some((dir, _)) = parent.rsplit_once('/') {
            self.nodes.entry(dir.to_owned()).or_insert(Node::Dir);
            parent = dir;
        }
        self.nodes.insert(path.to_owned(), node);
    }

    pub fn dir(&mut self, path: &str) {
        self.insert(path, Node::Dir);
    }

    pub fn file(&mut self, path: &str, perm: u32, data: Vec<u8>) {
        self.insert(path, Node::File { perm, data });
    }

    pub fn symlink(&mut self, path: &str, target: &str) {
        self.insert(path, Node::Symlink(target.into()));
    }

    pub fn contains(&self, path: &str) -> bool {
        self.nodes.contains_key(path.trim_start_matches('/'))
    }

    /// Sum of the regular files' sizes.
    pub fn content_bytes(&self) -> u64 {
        self.nodes
            .values()
            .map(|n| match n {
                Node::File { data, .. } => data.len() as u64,
                _ => 0,
            })
            .sum()
    }

    /// Writes the archive: entries in byte order of their paths, so a
    /// directory always precedes its content.
    pub fn write(&self, mtime: u32) -> Result<Vec<u8>, CpioError> {
        let mut w = CpioWriter::new(mtime);
        for (path, node) in &self.nodes {
            match node {
                Node::Dir => w.dir(path)?,
                Node::File { perm, data } => w.file(path, *perm, data)?,
                Node::Symlink(target) => w.symlink(path, target)?,
                Node::CharDevice { major, minor } => w.char_device(path, *major, *minor)?,
            }
        }
        w.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(mut bytes: &[u8]) -> Vec<(String, u32, u32, u64)> {
        let mut out = Vec::new();
        loop {
            let reader = cpio::newc::Reader::new(bytes).unwrap();
            if reader.entry().is_trailer() {
                return out;
            }
            let e = reader.entry();
            out.push((e.name().to_owned(), e.mode(), e.uid(), e.mtime().into()));
            bytes = reader.finish().unwrap();
        }
    }

    #[test]
    fn archive_is_reproducible_and_parses() {
        let build = || {
            let mut w = CpioWriter::default();
            w.dir("keel").unwrap();
            w.file("keel/test.sh", 0o755, b"echo hi\n").unwrap();
            w.finish().unwrap()
        };
        let a = build();
        assert_eq!(a, build());
        let reader = cpio::newc::Reader::new(&a[..]).unwrap();
        assert_eq!(reader.entry().name(), "keel");
        let rest = reader.finish().unwrap();
        let reader = cpio::newc::Reader::new(rest).unwrap();
        assert_eq!(reader.entry().name(), "keel/test.sh");
        assert_eq!(reader.entry().mode(), 0o100_755);
        assert_eq!(reader.entry().file_size(), 8);
    }

    #[test]
    fn tree_sorts_adds_parents_and_ignores_insertion_order() {
        let mut a = CpioTree::new();
        a.file("/usr/bin/x", 0o755, b"x".to_vec());
        a.symlink("bin", "usr/bin");
        a.file("etc/a-b", 0o644, b"1".to_vec());
        a.file("etc/a/b", 0o644, b"2".to_vec());
        let mut b = CpioTree::new();
        b.file("etc/a/b", 0o644, b"2".to_vec());
        b.file("etc/a-b", 0o644, b"1".to_vec());
        b.symlink("bin", "usr/bin");
        b.file("usr/bin/x", 0o755, b"x".to_vec());
        let bytes = a.write(1_700_000_000).unwrap();
        assert_eq!(bytes, b.write(1_700_000_000).unwrap());
        let names: Vec<_> = entries(&bytes).into_iter().map(|e| e.0).collect();
        assert_eq!(
            names,
            [
                "bin",
                "etc",
                "etc/a",
                "etc/a-b",
                "etc/a/b",
                "usr",
                "usr/bin",
                "usr/bin/x"
            ]
        );
        for (name, mode, uid, mtime) in entries(&bytes) {
            assert_eq!(uid, 0, "{name}");
            assert_eq!(mtime, 1_700_000_000, "{name}");
            if name == "bin" {
                assert_eq!(mode, 0o120_777);
            }
        }
        assert_eq!(a.content_bytes(), 3);
    }

    #[test]
    fn mtime_changes_the_bytes() {
        let mut t = CpioTree::new();
        t.file("a", 0o644, b"a".to_vec());
        assert_ne!(t.write(0).unwrap(), t.write(1).unwrap());
    }
}
