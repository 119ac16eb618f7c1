//! Append-only line files (`experiments.csv`, `history.jsonl`) and atomic
//! file replacement, with the fsync discipline the store relies on.
//!
//! A line is appended with one `write` of the whole line and fsynced before
//! the caller goes on; a crash can therefore leave at most one torn line,
//! the last, which [`cut_torn_tail`] removes at start-up.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Suffix of the temporary files of [`write_atomically`].
pub const TMP_SUFFIX: &str = ".tmp";

/// A failed file operation.
#[derive(Debug, thiserror::Error)]
#[error("{action} {path}: {source}")]
pub struct IoError {
    /// What was being done.
    pub action: &'static str,
    /// The file.
    pub path: PathBuf,
    /// The cause.
    pub source: io::Error,
}

/// Wraps an `io::Error` with what was being done to which file.
pub fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> IoError + 'a {
    move |source| IoError {
        action,
        path: path.to_owned(),
        source,
    }
}

/// Reads `path` (empty if it does not exist), cutting a last line that has
/// no newline (a crash mid-append), and returns the remaining bytes.
pub fn cut_torn_tail(path: &Path) -> Result<Vec<u8>, IoError> {
    let mut file = match OpenOptions::new().read(true).write(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err("opening", path)(e)),
    };
    let mut text = Vec::new();
    file.read_to_end(&mut text)
        .map_err(io_err("reading", path))?;
    if !text.is_empty() && !text.ends_with(b"\n") {
        let keep = text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        tracing::warn!(
            path = %path.display(),
            cut_bytes = text.len() - keep,
            torn = %String::from_utf8_lossy(&text[keep..]),
            "log ends with a torn line (a crash mid-write); cutting it"
        );
        file.set_len(keep as u64)
            .map_err(io_err("truncating", path))?;
        file.sync_all().map_err(io_err("syncing", path))?;
        text.truncate(keep);
    }
    Ok(text)
}

/// Appends `lines` (complete lines, newline-terminated) with one write, then
/// fsyncs. When the file is empty, `header` goes first, in the same write.
/// When the write or the fsync fails, the file is cut back to its old length.
/// The directory is fsynced when the file was created.
pub fn append(path: &Path, header: Option<&[u8]>, lines: &[u8]) -> Result<(), IoError> {
    debug_assert!(lines.ends_with(b"\n"));
    let existed = path.exists();
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io_err("opening", path))?;
    let before = file
        .seek(SeekFrom::End(0))
        .map_err(io_err("seeking", path))?;
    let mut buf = Vec::with_capacity(lines.len() + header.map_or(0, <[u8]>::len));
    if let (0, Some(h)) = (before, header) {
        buf.extend_from_slice(h);
    }
    buf.extend_from_slice(lines);
    let written = file
        .write_all(&buf)
        .map_err(io_err("appending to", path))
        .and_then(|()| file.sync_data().map_err(io_err("syncing", path)));
    if written.is_err() {
        // A partial line (disk full, file-size limit) would glue itself to
        // the next one: cut it now rather than at the next start.
        if let Err(error) = file.set_len(before).and_then(|()| file.sync_data()) {
            tracing::warn!(path = %path.display(), %error, "cannot cut a partial line; it is cut at the next start");
        }
    }
    written?;
    if !existed {
        sync_dir(path)?;
    }
    Ok(())
}

/// Writes `bytes` to `path` so that a crash leaves either the old file or the
/// new one: temporary file, fsync, rename, fsync of the directory.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), IoError> {
    let tmp = PathBuf::from(format!("{}{TMP_SUFFIX}", path.display()));
    let result = (|| {
        let mut file = File::create(&tmp).map_err(io_err("creating", &tmp))?;
        file.write_all(bytes).map_err(io_err("writing", &tmp))?;
        file.sync_all().map_err(io_err("syncing", &tmp))?;
        fs::rename(&tmp, path).map_err(io_err("renaming", &tmp))?;
        sync_dir(path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn sync_dir(path: &Path) -> Result<(), IoError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("syncing", dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torn_tails_are_cut_and_appends_carry_the_header_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.csv");
        assert_eq!(cut_torn_tail(&path).unwrap(), b"");
        append(&path, Some(b"h\n"), b"a\n").unwrap();
        append(&path, Some(b"h\n"), b"b\nc\n").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"h\na\nb\nc\n");
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"d,par").unwrap();
        assert_eq!(cut_torn_tail(&path).unwrap(), b"h\na\nb\nc\n");
        assert_eq!(fs::read(&path).unwrap(), b"h\na\nb\nc\n");
        write_atomically(&path, b"new\n").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"new\n");
        assert!(!dir.path().join("log.csv.tmp").exists());
    }
}
