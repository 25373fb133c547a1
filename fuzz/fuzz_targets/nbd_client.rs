//! The NBD client against arbitrary server bytes: the negotiation, then a read and a block
//! status over whatever follows. Any error is fine; a panic or an unbounded allocation is not.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
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
});
