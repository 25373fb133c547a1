//! Fuzz bodies for cairn-nbd's decoders, shared by the fuzz targets and the stable corpus
//! replay.

/// The NBD client against arbitrary server bytes: the negotiation, then a read and a block
/// status over whatever follows. Any error is fine; a panic or an unbounded allocation is not.
pub fn nbd_client(data: &[u8]) {
    let contexts = ["base:allocation".to_string(), "qemu:dirty-bitmap:b".to_string()];
    let reader = std::io::Cursor::new(data);
    let Ok(mut client) =
        cairn_nbd::Client::handshake(reader, std::io::sink(), "fuzz".into(), "", &contexts)
    else {
        return;
    };
    let size = client.export().size;
    let mut buf = vec![0u8; 4096.min(size as usize)];
    let _ = client.read(0, &mut buf);
    let _ = client.block_status("base:allocation", 0, size);
    let _ = client.block_status("qemu:dirty-bitmap:b", 0, size);
}

/// `qemu-img info --output=json` as Cairn reads it: never panics on any bytes.
pub fn qemu_img_info(data: &[u8]) {
    if let Ok(info) = cairn_nbd::qemu::parse_info(data) {
        for b in &info.bitmaps {
            let _ = (b.enabled(), b.in_use());
        }
    }
}

/// qcow2 headers: parsing the first bytes of an image never panics, and a backing file name it
/// accepts is at most 1023 bytes (qemu's limit).
pub fn qcow2_header(data: &[u8]) {
    if let Ok(header) = cairn_nbd::qcow2::parse_header(data)
        && let Some(name) = &header.backing_file
    {
        assert!(name.len() <= 1023, "a backing file name of {} bytes", name.len());
    }
}
