//! Reading and interpreting the guest console.

use std::io::{BufRead, BufReader, Read};
use std::sync::mpsc::{Receiver, channel};
use std::thread;

/// The marker `/init` prints after the script: `=== VNVME-GUEST-EXIT-STATUS: <rc> ===`.
const EXIT_MARKER: &str = "=== VNVME-GUEST-EXIT-STATUS: ";
/// What QEMU prints when the host's KVM cannot run the guest.
pub(super) const KVM_ERROR: &str = "KVM internal error";

/// Reads `source` line by line on a thread; the receiver disconnects at end of file.
/// Lines lose their line ending (`\n`, `\r\n`); invalid UTF-8 is replaced.
pub(super) fn spawn_reader(
    source: impl Read + Send + 'static,
) -> std::io::Result<Receiver<String>> {
    let (tx, rx) = channel();
    thread::Builder::new()
        .name("vnvme-vm-console".into())
        .spawn(move || {
            let mut reader = BufReader::new(source);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&buf);
                        if tx
                            .send(line.trim_end_matches(['\n', '\r']).to_owned())
                            .is_err()
                        {
                            break;
                        }
                    }
                }
            }
        })?;
    Ok(rx)
}

/// The script exit status if `line` holds the exit marker.
pub(super) fn exit_status(line: &str) -> Option<i32> {
    let rest = &line[line.find(EXIT_MARKER)? + EXIT_MARKER.len()..];
    let end = rest.find(" ===")?;
    rest[..end].trim().parse().ok()
}

/// The last `lines` lines of `console`.
pub(super) fn tail(console: &str, lines: usize) -> String {
    let all: Vec<&str> = console.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The text between a line `<marker>-BEGIN` and the next line `<marker>-END` (lines are
/// compared after trimming whitespace and carriage returns).
pub(super) fn section<'a>(console: &'a str, marker: &str) -> Option<&'a str> {
    let (begin, end) = (format!("{marker}-BEGIN"), format!("{marker}-END"));
    let mut start = None;
    let mut offset = 0;
    for line in console.split_inclusive('\n') {
        let trimmed = line.trim();
        match start {
            None if trimmed == begin => start = Some(offset + line.len()),
            Some(s) if trimmed == end => return Some(&console[s..offset]),
            _ => {}
        }
        offset += line.len();
    }
    None
}

/// Lines of console kept in errors.
pub(super) const TAIL_LINES: usize = 40;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_exit_marker() {
        assert_eq!(exit_status("=== VNVME-GUEST-EXIT-STATUS: 0 ==="), Some(0));
        assert_eq!(
            exit_status("[  3.1] x=== VNVME-GUEST-EXIT-STATUS: 127 ===\r"),
            Some(127)
        );
        assert_eq!(exit_status("=== VNVME-GUEST-EXIT-STATUS: ==="), None);
        assert_eq!(exit_status("=== VNVME-GUEST BOOTED uptime=1s ==="), None);
    }

    #[test]
    fn tails() {
        assert_eq!(tail("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail("a", 5), "a");
        assert_eq!(tail("", 5), "");
    }

    #[test]
    fn sections() {
        let console = "boot\n@@X-BEGIN\nline 1\nline 2\n@@X-END\n@@Y-BEGIN\n";
        assert_eq!(section(console, "@@X"), Some("line 1\nline 2\n"));
        assert_eq!(section(console, "@@Y"), None);
        assert_eq!(section("@@E-BEGIN\r\n@@E-END\r\n", "@@E"), Some(""));
    }

    #[test]
    fn reader_splits_lines_and_ends() {
        let rx = spawn_reader(&b"one\r\ntwo\nthree"[..]).unwrap();
        let lines: Vec<String> = rx.iter().collect();
        assert_eq!(lines, ["one", "two", "three"]);
    }
}
