//! Packs and the chunk map: what a backup may deduplicate against, and what it may not.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use cairn_format::{Consistency, Digest, Name, PointId, PointManifest, encode_chunk};
use cairn_vault::{Durability, PointWriter, Stored, Vault};
use object_store::memory::InMemory;

async fn vault() -> (Vault, Arc<InMemory>) {
    let store = Arc::new(InMemory::new());
    let v =
        Vault::create_in(store.clone(), "memory://test", Durability::OnAck, 4096).await.unwrap();
    (v, store)
}

fn vm() -> Name {
    "vm".parse().unwrap()
}

fn chunk(n: u8) -> (Digest, Bytes) {
    let plain = vec![n; 4096];
    (Digest::of(&plain), encode_chunk(&plain, Some(1)).unwrap().into())
}

fn manifest(w: &PointWriter, vm: &Name) -> PointManifest {
    let now = jiff::Timestamp::now();
    PointManifest {
        format: cairn_format::MANIFEST_FORMAT,
        point: w.point().clone(),
        vm: vm.clone(),
        started_at: w.started_at(),
        captured_at: w.started_at(),
        finished_at: now,
        consistency: Consistency::None,
        disks: BTreeMap::new(),
        evidence: Vec::new(),
        writer: "test".into(),
        machine: None,
        origin: None,
    }
}

/// One backup that stores `chunks` through one pack writer and commits; what each store did.
async fn commit(v: &Vault, chunks: &[(Digest, Bytes)]) -> Vec<Stored> {
    commit_as(v, &vm(), jiff::Timestamp::now(), chunks).await.1
}

/// `commit` for VM `vm`, started at `at`; the point's id too.
async fn commit_as(
    v: &Vault,
    vm: &Name,
    at: jiff::Timestamp,
    chunks: &[(Digest, Bytes)],
) -> (PointId, Vec<Stored>) {
    let w = v.begin_point(vm, at).await.unwrap();
    let mut packs = w.pack_writer();
    let mut stored = Vec::new();
    for (id, frame) in chunks {
        stored.push(packs.store(id, frame.clone()).await.unwrap());
    }
    packs.finish().await.unwrap();
    let m = manifest(&w, vm);
    let point = w.point().clone();
    w.commit(&m).await.unwrap();
    (point, stored)
}

#[tokio::test]
async fn a_committed_chunk_is_present_to_the_next_backup_and_readable() {
    let (v, _) = vault().await;
    let (id, frame) = chunk(1);
    assert!(matches!(commit(&v, &[(id, frame.clone())]).await[..], [Stored::Written(_)]));
    assert_eq!(commit(&v, &[(id, frame)]).await, vec![Stored::Present]);
    assert_eq!(v.read_chunk(&id).await.unwrap(), vec![1u8; 4096]);

    // Another process opening the vault finds it through the pack index.
    let again =
        Vault::open_store(v.store().clone(), "memory://test", Durability::OnAck).await.unwrap();
    assert_eq!(again.read_chunk(&id).await.unwrap(), vec![1u8; 4096]);
}

#[tokio::test]
async fn chunks_of_an_abandoned_backup_are_adopted_by_the_next_one_not_stored_again() {
    let (v, _) = vault().await;
    let (id, frame) = chunk(2);
    let w = v.begin_point(&vm(), jiff::Timestamp::now()).await.unwrap();
    let mut packs = w.pack_writer();
    packs.store(&id, frame.clone()).await.unwrap();
    packs.finish().await.unwrap();
    w.abandon().await;

    // Its pack exists, no pack index names it: no reader locates the chunk...
    assert!(v.locate_chunk(&id).await.unwrap().is_none(), "not located without a commit");
    // ...but the next backup of the VM checks the pack and adopts it instead of storing the
    // chunk again, and its own pack index then names that pack.
    assert_eq!(commit(&v, &[(id, frame)]).await, vec![Stored::Present]);
    assert!(v.locate_chunk(&id).await.unwrap().is_some());
    assert_eq!(v.read_chunk(&id).await.unwrap(), vec![2u8; 4096]);
    let fresh = Vault::open_store(v.store().clone(), "memory://test", Durability::OnAck).await;
    assert_eq!(fresh.unwrap().read_chunk(&id).await.unwrap(), vec![2u8; 4096]);
}

#[tokio::test]
async fn two_disks_of_one_backup_store_a_chunk_once() {
    let (v, _) = vault().await;
    let (id, frame) = chunk(3);
    let w = v.begin_point(&vm(), jiff::Timestamp::now()).await.unwrap();
    let mut a = w.pack_writer();
    let mut b = w.pack_writer();
    assert!(matches!(a.store(&id, frame.clone()).await.unwrap(), Stored::Written(_)));
    assert_eq!(b.store(&id, frame).await.unwrap(), Stored::Present);
    a.finish().await.unwrap();
    b.finish().await.unwrap();
    let m = manifest(&w, &vm());
    w.commit(&m).await.unwrap();
}

#[tokio::test]
async fn a_point_with_an_unfinished_pack_writer_cannot_commit() {
    let (v, _) = vault().await;
    let (id, frame) = chunk(4);
    let w = v.begin_point(&vm(), jiff::Timestamp::now()).await.unwrap();
    let mut packs = w.pack_writer();
    packs.store(&id, frame).await.unwrap();
    drop(packs);
    let m = manifest(&w, &vm());
    let err = w.commit(&m).await.unwrap_err();
    assert!(matches!(err, cairn_vault::Error::Unfinished { writers: 1 }), "{err}");
    assert!(v.list_points(None).await.unwrap().points.is_empty());
}

#[tokio::test]
async fn a_damaged_pack_index_is_reported_and_its_chunks_are_stored_again() {
    let (v, store) = vault().await;
    let (id, frame) = chunk(5);
    commit(&v, &[(id, frame.clone())]).await;

    // Damage the one pack index.
    use futures::TryStreamExt;
    use object_store::{ObjectStore, ObjectStoreExt};
    let index: Vec<_> =
        store.list(Some(&"pack-index".into())).map_ok(|m| m.location).try_collect().await.unwrap();
    assert_eq!(index.len(), 1);
    let mut bytes = store.get(&index[0]).await.unwrap().bytes().await.unwrap().to_vec();
    bytes[20] ^= 1;
    store.put(&index[0], bytes.into()).await.unwrap();

    let reopened =
        Vault::open_store(store.clone(), "memory://test", Durability::OnAck).await.unwrap();
    let report = reopened.verify(&Default::default(), &|_| {}).await.unwrap();
    assert!(!report.is_clean());
    assert_eq!(report.unreadable_pack_indexes.len(), 1, "{report:?}");
    assert!(report.unreadable_pack_indexes[0].1.contains("CRC"), "{report:?}");
    let err = reopened.read_chunk(&id).await.unwrap_err();
    assert!(err.to_string().contains("verify"), "{err}");
    // Reported once, then moved aside: what remains is a vault with one missing chunk.
    assert!(store.head(&index[0]).await.is_err());
    let report = reopened.verify(&Default::default(), &|_| {}).await.unwrap();
    assert!(report.unreadable_pack_indexes.is_empty(), "{report:?}");

    assert!(matches!(commit(&reopened, &[(id, frame)]).await[..], [Stored::Written(_)]));
    assert_eq!(reopened.read_chunk(&id).await.unwrap(), vec![5u8; 4096]);
    let fresh = Vault::open_store(store.clone(), "memory://test", Durability::OnAck).await.unwrap();
    assert_eq!(fresh.read_chunk(&id).await.unwrap(), vec![5u8; 4096]);
}

#[tokio::test]
async fn a_reader_of_one_point_loads_its_pack_indexes_first_and_the_rest_on_a_miss() {
    let (v, store) = vault().await;
    let (a, b, c): (Name, Name, Name) =
        ("a".parse().unwrap(), "b".parse().unwrap(), "c".parse().unwrap());
    let t = |s: i64| jiff::Timestamp::from_second(1_800_000_000 + s).unwrap();
    let shared = chunk(1);
    commit_as(&v, &a, t(0), &[shared.clone(), chunk(2)]).await;
    let (first_b, _) = commit_as(&v, &b, t(1), &[chunk(3), shared.clone()]).await;
    let (second_b, _) = commit_as(&v, &b, t(2), &[chunk(3), chunk(4)]).await;
    commit_as(&v, &b, t(3), &[chunk(6)]).await;
    commit_as(&v, &c, t(4), &[chunk(5)]).await;
    assert_ne!(first_b, second_b);
    assert_eq!(v.pack_indexes_loaded(), (5, true), "the backups' own handle holds every index");

    let open = || Vault::open_store(store.clone(), "memory://test", Durability::OnAck);
    let reader = open().await.unwrap();
    reader.focus_on_point(&b, &second_b);
    // The point's own chunk: its own pack index only.
    assert_eq!(reader.read_chunk(&chunk(4).0).await.unwrap(), vec![4u8; 4096]);
    assert_eq!(reader.pack_indexes_loaded(), (1, false));
    // One an earlier point of the VM stored: the VM's earlier points' indexes (not later ones).
    assert_eq!(reader.read_chunk(&chunk(3).0).await.unwrap(), vec![3u8; 4096]);
    assert_eq!(reader.pack_indexes_loaded(), (2, false));
    assert!(reader.locate_chunk(&chunk(6).0).await.unwrap().is_some());
    assert_eq!(reader.pack_indexes_loaded(), (5, true), "a miss loads the whole map");
    // One deduplicated against another VM: found by the whole map.
    assert_eq!(reader.read_chunk(&shared.0).await.unwrap(), vec![1u8; 4096]);

    // A chunk of another VM, asked for first, loads every stage and then the whole map.
    let reader = open().await.unwrap();
    reader.focus_on_point(&b, &second_b);
    assert_eq!(reader.read_chunk(&chunk(5).0).await.unwrap(), vec![5u8; 4096]);
    assert_eq!(reader.pack_indexes_loaded(), (5, true));
    assert!(reader.locate_chunk(&chunk(9).0).await.unwrap().is_none());

    // A focused map honours quarantine: a bad copy is not placed, whichever stage names it.
    v.quarantine_chunk(&chunk(4).0, "test").await.unwrap();
    let reader = open().await.unwrap();
    reader.focus_on_point(&b, &second_b);
    assert!(reader.locate_chunk(&chunk(4).0).await.unwrap().is_none());
    assert!(matches!(
        reader.read_chunk(&chunk(4).0).await,
        Err(cairn_vault::Error::ChunkMissing { .. })
    ));
}

#[tokio::test]
async fn a_focused_reader_that_finds_its_copy_damaged_reads_the_copy_the_whole_map_places() {
    let (v, store) = vault().await;
    let (a, b): (Name, Name) = ("a".parse().unwrap(), "b".parse().unwrap());
    let t = |s: i64| jiff::Timestamp::from_second(1_800_000_000 + s).unwrap();
    let open = || Vault::open_store(store.clone(), "memory://test", Durability::OnAck);
    let shared = chunk(7);
    // Two hosts store the same chunk at once: two copies, one in each VM's pack index.
    let other_host = open().await.unwrap();
    let w = other_host.begin_point(&b, t(1)).await.unwrap();
    commit_as(&v, &a, t(0), std::slice::from_ref(&shared)).await;
    let mut packs = w.pack_writer();
    assert!(matches!(packs.store(&shared.0, shared.1.clone()).await.unwrap(), Stored::Written(_)));
    for n in 20..60 {
        let (id, frame) = chunk(n);
        packs.store(&id, frame).await.unwrap();
    }
    packs.finish().await.unwrap();
    let point_b = w.point().clone();
    let m = manifest(&w, &b);
    w.commit(&m).await.unwrap();
    let whole_place = open().await.unwrap().locate_chunk(&shared.0).await.unwrap().unwrap();
    let b_place = other_host.locate_chunk(&shared.0).await.unwrap().unwrap();
    assert_ne!(whole_place.pack, b_place.pack, "two copies");

    // The copy in b's pack rots; the whole map places the chunk in a's.
    use object_store::ObjectStoreExt;
    let path = object_store::path::Path::from(format!(
        "packs/{}/{}",
        &b_place.pack.to_hex()[..2],
        b_place.pack.to_hex()
    ));
    let mut bytes = store.get(&path).await.unwrap().bytes().await.unwrap().to_vec();
    bytes[b_place.offset as usize + 8] ^= 0xff;
    store.put(&path, bytes.into()).await.unwrap();

    let reader = open().await.unwrap();
    reader.focus_on_point(&b, &point_b);
    assert_eq!(reader.read_chunk(&chunk(30).0).await.unwrap(), vec![30u8; 4096]);
    assert_eq!(reader.pack_indexes_loaded(), (1, false), "b's own index first");
    assert_eq!(reader.read_chunk(&shared.0).await.unwrap(), vec![7u8; 4096]);
    assert!(reader.pack_indexes_loaded().1, "the whole map was loaded to find the good copy");

    // Many lookups at once through one focused handle, in buffered streams: all answered.
    use futures::StreamExt;
    let reader = open().await.unwrap();
    reader.focus_on_point(&b, &point_b);
    let ids: Vec<Digest> = (20..60).map(|n| chunk(n).0).chain([shared.0, chunk(99).0]).collect();
    let read: Vec<_> =
        futures::stream::iter(&ids).map(|id| reader.locate_chunk(id)).buffered(8).collect().await;
    let found = read.into_iter().map(|r| r.unwrap().is_some()).filter(|f| *f).count();
    assert_eq!(found, 41, "every stored chunk found, the unknown one not");
}
