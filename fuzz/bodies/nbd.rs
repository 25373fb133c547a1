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

/// The NBD server against arbitrary client bytes: the negotiation, then whatever requests
/// follow, served from an export of 1 MiB. Any error is fine; a panic, a hang or an unbounded
/// allocation is not.
pub fn nbd_server(data: &[u8]) {
    use std::sync::{Arc, Mutex};

    struct Zeros;
    impl cairn_nbd::server::ExportSource for Zeros {
        fn size(&self) -> u64 {
            1 << 20
        }
        fn read_at(&self, _: u64, buf: &mut [u8]) -> Result<(), String> {
            buf.fill(0);
            Ok(())
        }
    }

    /// A connection whose client sent `data` and then went away.
    struct Fake(Arc<Mutex<std::io::Cursor<Vec<u8>>>>);
    impl std::io::Read for Fake {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let mut input = self.0.lock().unwrap_or_else(|p| p.into_inner());
            std::io::Read::read(&mut *input, buf)
        }
    }
    impl std::io::Write for Fake {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    impl cairn_nbd::server::Stream for Fake {
        fn try_clone_stream(&self) -> std::io::Result<Self> {
            Ok(Fake(Arc::clone(&self.0)))
        }
        fn shut(&self) {}
        fn set_timeouts(
            &self,
            _: Option<std::time::Duration>,
            _: Option<std::time::Duration>,
        ) -> std::io::Result<()> {
            Ok(())
        }
    }

    let _ = cairn_nbd::server_proto::parse_option_header(data);
    let _ = cairn_nbd::server_proto::parse_info_request(data);
    if let Ok(r) = cairn_nbd::server_proto::parse_request(data) {
        let _ = cairn_nbd::server_proto::check_read(&r, 1 << 20);
    }
    let stream = Fake(Arc::new(Mutex::new(std::io::Cursor::new(data.to_vec()))));
    let server = cairn_nbd::server::Server::new("os", Arc::new(Zeros));
    let _ = server.serve_connection(stream);
}
