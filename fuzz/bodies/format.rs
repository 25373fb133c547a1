//! Fuzz bodies for cairn-format's decoders, shared by the fuzz targets and the stable corpus
//! replay.

use cairn_format::index::{IndexPage, IndexRoot};
use cairn_format::pack::{
    PACK_HEADER_LEN, decode_pack_index, decode_pack_table, encode_pack_index, pack_trailer,
};
use cairn_format::patch::{Patch, encode_patch};
use cairn_format::{
    DamageRecord, Digest, InflightMarker, Name, PointId, PointManifest, VaultConfig,
};

/// Chunk frames: decoding never panics, and what decodes re-encodes to something that decodes
/// to the same plaintext.
pub fn chunk_frame(data: &[u8]) {
    if let Ok(frame) = cairn_format::decode_chunk(data) {
        let again = cairn_format::encode_chunk(&frame.plaintext, Some(1)).expect("re-encode");
        let back = cairn_format::decode_chunk(&again).expect("re-decode");
        assert_eq!(back.plaintext, frame.plaintext);
    }
}

/// Index pages: decoding never panics, and decode(encode(decode(x))) == decode(x).
pub fn index_page(data: &[u8]) {
    if let Ok(page) = IndexPage::decode(data) {
        let again = IndexPage::decode(&page.encode()).expect("a page it wrote must decode");
        assert_eq!(again, page);
        assert_eq!(page.entries().count() as u64, page.block_count());
    }
}

/// Index roots: decoding never panics, and decode(encode(decode(x))) == decode(x).
pub fn index_root(data: &[u8]) {
    if let Ok(root) = IndexRoot::decode(data) {
        let again = IndexRoot::decode(&root.encode()).expect("a root it wrote must decode");
        assert_eq!(again, root);
    }
}

/// Recovery-point manifests: decoding never panics, and a decoded manifest round-trips.
pub fn manifest(data: &[u8]) {
    if let Ok(m) = PointManifest::decode(data) {
        assert_eq!(PointManifest::decode(&m.encode()).expect("round trip"), m);
    }
}

/// In-flight markers and damage records: decoding never panics, and what decodes round-trips.
pub fn markers(data: &[u8]) {
    if let Ok(m) = InflightMarker::decode(data) {
        assert_eq!(InflightMarker::decode(&m.encode()).expect("round trip"), m);
    }
    if let Ok(d) = DamageRecord::decode(data) {
        assert_eq!(DamageRecord::decode(&d.encode()).expect("round trip"), d);
    }
}

/// Names, point ids and digests parsed from vault paths: parsing never panics and round-trips.
pub fn names(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Ok(n) = s.parse::<Name>() {
        assert_eq!(n.as_str(), s);
    }
    if let Ok(p) = s.parse::<PointId>() {
        assert_eq!(p.as_str(), s);
    }
    if let Ok(d) = s.parse::<Digest>() {
        assert_eq!(d.to_hex(), s);
    }
}

/// Pack indexes: decoding never panics, and decode(encode(decode(x))) == decode(x).
pub fn pack_index(data: &[u8]) {
    if let Ok(packs) = decode_pack_index(data) {
        let bytes = encode_pack_index(&packs);
        assert_eq!(bytes, data, "an accepted index must be the bytes it would write");
        assert_eq!(decode_pack_index(&bytes).expect("its own bytes decode"), packs);
    }
}

/// Pack tables: decoding never panics, and every entry it accepts lies inside the pack.
pub fn pack_table(data: &[u8]) {
    if let Ok(entries) = decode_pack_table(data) {
        let trailer = pack_trailer(&entries);
        assert!(data.ends_with(&trailer), "an accepted table must be the one it would write");
        let frames_end = (data.len() - trailer.len()) as u64;
        for e in &entries {
            assert!(u64::from(e.offset) >= PACK_HEADER_LEN as u64);
            assert!(u64::from(e.offset) + u64::from(e.len) <= frames_end);
        }
    }
}

/// Patch chunks: decoding and applying never panic, and a patch that decodes is in canonical
/// form (re-encoding the block it rebuilds gives back the same bytes).
pub fn patch(data: &[u8]) {
    if let Ok(patch) = Patch::decode(data) {
        let base = vec![0u8; patch.block_len() as usize];
        let block = patch.apply(&base).expect("a decoded patch applies to a base of its length");
        assert_eq!(encode_patch(&block, patch.piece_size(), patch.mask()), data);
        assert!(patch.apply(&base[1..]).is_err());
    }
}

/// Vault configs: decoding never panics, and a decoded config round-trips.
pub fn vault_config(data: &[u8]) {
    if let Ok(c) = VaultConfig::decode(data) {
        assert_eq!(VaultConfig::decode(&c.encode()).expect("round trip"), c);
    }
}

/// The key the encryption targets use: any fixed key reaches every branch after the tag.
fn test_crypto() -> cairn_format::Crypto {
    cairn_format::Crypto::from_master(&cairn_format::MasterKey::from_bytes([0x42; 32]))
}

/// Encrypted chunk frames: `data` is a 32-byte chunk id then a frame. Decoding under the test
/// key never panics; what decodes is the id's content, re-encodes and decodes again.
pub fn encrypted_frame(data: &[u8]) {
    let crypto = test_crypto();
    let Some((id, frame)) = data.split_first_chunk::<32>() else { return };
    let id = Digest(*id);
    let _ = cairn_format::check_chunk(frame);
    let _ = cairn_format::ChunkFrame::open_in(&crypto, frame, &id);
    if let Ok(decoded) = cairn_format::ChunkFrame::decode_in(&crypto, frame, &id) {
        let again =
            cairn_format::encode_chunk_in(&crypto, &id, &decoded.plaintext, Some(1), [7; 24])
                .expect("re-encode");
        let back = cairn_format::ChunkFrame::decode_in(&crypto, &again, &id).expect("re-decode");
        assert_eq!(back.plaintext, decoded.plaintext);
    }
}

/// Sealed objects and sealed pack tables: opening under the test key never panics, and what
/// opens seals again to something that opens to the same bytes.
pub fn sealed_object(data: &[u8]) {
    let crypto = test_crypto();
    if let Ok(plain) = crypto.open("object", "points/vm/p.json", data) {
        let again = crypto.seal("points/vm/p.json", plain.clone(), [9; 24]);
        assert_eq!(crypto.open("object", "points/vm/p.json", &again).expect("re-open"), plain);
    }
    let _ = cairn_format::pack::decode_pack_table_in(&crypto, "packs/00/p", data);
}

/// Key slots: decoding never panics, and a decoded slot that asks for little work is tried
/// with a wrong secret without panicking (costly Argon2id slots are only decoded: the decoder's
/// ceilings are what protects an unlock).
pub fn key_slot(data: &[u8]) {
    use cairn_format::keyslot::{Kdf, KeySlot};
    if let Ok(slot) = KeySlot::decode(data) {
        let cheap = match &slot.kdf {
            Kdf::HmacSha256 { .. } => true,
            Kdf::Argon2id { memory_kib, iterations, .. } => *memory_kib <= 256 && *iterations <= 2,
        };
        if cheap {
            let _ = slot.open(&[1u8; 32], "vault");
        }
        let again = KeySlot::decode(&slot.encode()).expect("a slot it wrote must decode");
        assert_eq!(again, slot);
    }
}

/// Point notes, collector plans and fate records: decoding never panics, what decodes
/// round-trips, and folding a decoded note never panics either.
pub fn lifecycle(data: &[u8]) {
    use cairn_format::{Fate, GcPlan, PointNote, PointState};
    if let Ok(n) = PointNote::decode(data) {
        let mut state = PointState::default();
        state.apply(&n).expect("a note that decodes applies");
        assert_eq!(PointNote::decode(&n.encode()).expect("round trip"), n);
    }
    if let Ok(p) = GcPlan::decode(data) {
        assert_eq!(GcPlan::decode(&p.encode()).expect("round trip"), p);
    }
    if let Ok(f) = Fate::decode(data) {
        assert_eq!(Fate::decode(&f.encode()).expect("round trip"), f);
    }
}
