//! Fuzz bodies for cairn-qemu's decoders, shared by the fuzz targets and the stable corpus
//! replay.

use std::io::Write;
use std::time::Duration;

/// What QEMU's monitor sends, line by line: every line decoded, `query-block` answers parsed.
pub fn qmp_message(data: &[u8]) {
    let mut reader = std::io::Cursor::new(data);
    while let Ok(Some(line)) = cairn_qemu::wire::read_line(&mut reader, 4096) {
        if let Ok(cairn_qemu::wire::Message::Return { value, .. }) = cairn_qemu::wire::decode(&line)
            && let Ok(disks) = cairn_qemu::vm::parse_block(&value)
        {
            let _ = cairn_qemu::vm::describe(&disks);
            for d in &disks {
                let _ = (d.drive_owner(), d.is("disk0"), d.persistent_bitmaps());
            }
        }
    }
}

/// A guest agent (written by the guest) answering with arbitrary bytes: the sync, then each
/// command Cairn sends. Any error is fine; a panic, a hang or an unbounded read is not.
pub fn guest_agent(data: &[u8]) {
    let Ok((ours, theirs)) = std::os::unix::net::UnixStream::pair() else { return };
    let mut theirs = theirs;
    if theirs.write_all(data).is_err() {
        return;
    }
    let _ = theirs.shutdown(std::net::Shutdown::Write);
    let socket = std::path::Path::new("fuzz");
    // The sync id is random, so the bytes rarely match it: the rest is reached through
    // `over` failing at different depths, which is what the guest controls.
    if let Ok(mut agent) = cairn_qemu::GuestAgent::over(ours, socket, Duration::from_millis(50)) {
        let _ = agent.ping();
        let _ = agent.freeze(Duration::from_millis(50));
        let _ = agent.frozen();
        let _ = agent.thaw(Duration::from_millis(50));
        let _ = agent.version();
        let _ = agent.read_file("/run/cairn-hook-freeze.json", 4096);
    }
}

/// A report of the guest's Cairn hook (written by the guest): decoded, and turned into the
/// evidence and the verdict the host would give.
pub fn guest_hook_report(data: &[u8]) {
    if let Ok(Some(report)) = cairn_qemu::hook::decode(data) {
        let _ = cairn_qemu::hook::stop_reason(&report);
        for s in report.pre.iter().chain(&report.post) {
            let _ = cairn_qemu::hook::script_evidence("pre", s);
        }
    }
}
