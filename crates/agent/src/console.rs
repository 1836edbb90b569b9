//! A VM's serial console log: QEMU appends everything the guest prints to
//! `console.log` (its chardev log file, opened `O_APPEND`). A guest printing
//! as fast as it can must not fill the PM's disk, and a viewer following the
//! log must not make the daemon read it whole four times a second: the log
//! is capped and rotated, and read by seeking to the bytes wanted.
//!
//! QEMU keeps its file open, so rotation copies the log to `console.log.1`
//! and truncates it in place (QEMU's next append lands at the new end). The
//! bytes printed in the instant between the copy and the truncation are
//! lost; a console log is a diagnostic, and the cap is what keeps the PM up.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// The rotated generation's name.
fn previous(log: &Path) -> PathBuf {
    let mut p = log.as_os_str().to_owned();
    p.push(".1");
    PathBuf::from(p)
}

/// Rotates `log` when it holds more than `cap` bytes: its content becomes
/// `console.log.1` (replacing the older one) and the log starts empty. At
/// most about 2 × `cap` bytes per VM stay on disk. `Ok(true)` if rotated.
pub fn rotate_if_over(log: &Path, cap: u64) -> std::io::Result<bool> {
    let len = match std::fs::metadata(log) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if len <= cap {
        return Ok(false);
    }
    let prev = previous(log);
    let mut tmp = prev.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut src = std::fs::File::open(log)?;
    let mut dst = std::fs::File::create(&tmp)?;
    // Only the newest `cap` bytes are kept in the older generation.
    let from = len.saturating_sub(cap);
    src.seek(SeekFrom::Start(from))?;
    std::io::copy(&mut (&mut src).take(cap), &mut dst)?;
    dst.flush()?;
    std::fs::rename(&tmp, &prev)?;
    std::fs::OpenOptions::new()
        .write(true)
        .open(log)?
        .set_len(0)?;
    Ok(true)
}

/// Reads `[start, end)` of `path` by seeking (missing file: empty).
fn read_range(path: &Path, start: u64, end: u64) -> std::io::Result<Vec<u8>> {
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    f.seek(SeekFrom::Start(start))?;
    let mut buf = Vec::with_capacity(end.saturating_sub(start) as usize);
    f.take(end.saturating_sub(start)).read_to_end(&mut buf)?;
    Ok(buf)
}

fn len_of(path: &Path) -> std::io::Result<u64> {
    match std::fs::metadata(path) {
        Ok(m) => Ok(m.len()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e),
    }
}

/// Reads the log: from offset `from` of the current file (following; a
/// smaller file than `from` was rotated or restarted, so it is read from
/// its start), or the last `max_bytes` (continuing into the rotated
/// generation when the current file is shorter). Never more than
/// `max_bytes`. Returns the bytes and the offset where they end.
pub fn read(log: &Path, from: Option<u64>, max_bytes: u64) -> std::io::Result<(Vec<u8>, u64)> {
    let max = max_bytes.max(1);
    let len = len_of(log)?;
    match from {
        Some(off) => {
            let start = if off <= len { off } else { 0 };
            let end = len.min(start.saturating_add(max));
            Ok((read_range(log, start, end)?, end))
        }
        None => {
            let start = len.saturating_sub(max);
            let mut out = Vec::new();
            let want_prev = max - (len - start);
            if want_prev > 0 {
                let prev = previous(log);
                let plen = len_of(&prev)?;
                out = read_range(&prev, plen.saturating_sub(want_prev), plen)?;
            }
            out.extend(read_range(log, start, len)?);
            Ok((out, len))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_caps_the_log_and_reads_seek() {
        let t = tempfile::tempdir().unwrap();
        let log = t.path().join("console.log");
        // O_APPEND like QEMU's chardev log file.
        let mut w = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        w.write_all(&[b'a'; 900]).unwrap();
        assert!(!rotate_if_over(&log, 1000).unwrap());
        w.write_all(&[b'b'; 300]).unwrap();
        assert!(rotate_if_over(&log, 1000).unwrap());
        assert_eq!(std::fs::metadata(&log).unwrap().len(), 0);
        let prev = std::fs::read(previous(&log)).unwrap();
        assert_eq!(prev.len(), 1000, "only the newest cap bytes are kept");
        assert!(prev.ends_with(&[b'b'; 300]));
        // The writer's next append lands at the start of the emptied file.
        w.write_all(b"new line\n").unwrap();
        assert_eq!(std::fs::read(&log).unwrap(), b"new line\n");
        // A tail continues into the older generation.
        let (tail, end) = read(&log, None, 12).unwrap();
        assert_eq!(tail, b"bbbnew line\n");
        assert_eq!(end, 9);
        // Following from an offset past the end (rotated): from the start.
        let (d, end) = read(&log, Some(500), 4).unwrap();
        assert_eq!((d.as_slice(), end), (&b"new "[..], 4));
        let (d, end) = read(&log, Some(4), 100).unwrap();
        assert_eq!((d.as_slice(), end), (&b"line\n"[..], 9));
        let (d, end) = read(&t.path().join("missing"), None, 10).unwrap();
        assert!(d.is_empty() && end == 0);
    }
}
