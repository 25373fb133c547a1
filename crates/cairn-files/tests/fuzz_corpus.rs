//! The fuzz targets' corpora (`fuzz/corpus/`) replayed through the bodies those targets run
//! (`fuzz/bodies/files.rs`), on stable, in every test run.

#[path = "../../../fuzz/bodies/files.rs"]
mod bodies;

#[test]
fn partition_table_corpus() {
    cairn_testkit::replay_corpus("partition_table", bodies::partition_table);
}

#[test]
fn ext4_volume_corpus() {
    cairn_testkit::replay_corpus("ext4_volume", bodies::ext4_volume);
}
