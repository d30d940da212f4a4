//! The bytes on the wire: a change of a field number or type must fail here.

use prost::Message;
use r3map_grpc::proto::{migration, mount};

#[test]
fn read_at_args_encode_as_the_original() {
    // Field 1 (Length), varint: tag 0x08; field 2 (Off), varint: tag 0x10.
    let args = mount::ReadAtArgs { length: 300, off: 5 };
    assert_eq!(args.encode_to_vec(), [0x08, 0xAC, 0x02, 0x10, 0x05]);
    let args = migration::ReadAtArgs { length: 1, off: 1 << 40 };
    assert_eq!(args.encode_to_vec(), [0x08, 0x01, 0x10, 0x80, 0x80, 0x80, 0x80, 0x80, 0x20]);
    // Negative int32 and int64 are ten-byte varints in proto3.
    let args = mount::ReadAtArgs { length: -1, off: 0 };
    assert_eq!(args.encode_to_vec(), [0x08, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]);
}

#[test]
fn the_other_messages_encode_as_the_original() {
    // ReadAtReply: N field 1 varint, P field 2 length-delimited (tag 0x12).
    let reply = mount::ReadAtReply { n: 2, p: vec![0xAA, 0xBB].into() };
    assert_eq!(reply.encode_to_vec(), [0x08, 0x02, 0x12, 0x02, 0xAA, 0xBB]);
    // WriteAtArgs: Off field 1 varint, P field 2 bytes.
    let args = mount::WriteAtArgs { off: 7, p: vec![1].into() };
    assert_eq!(args.encode_to_vec(), [0x08, 0x07, 0x12, 0x01, 0x01]);
    // WriteAtReply: Length field 1 varint.
    assert_eq!(mount::WriteAtReply { length: 1 }.encode_to_vec(), [0x08, 0x01]);
    // SyncReply of the Seeder: DirtyOffsets field 1, repeated int64, packed (tag 0x0A).
    let reply = migration::SyncReply { dirty_offsets: vec![0, 4096] };
    assert_eq!(reply.encode_to_vec(), [0x0A, 0x03, 0x00, 0x80, 0x20]);
    // The unpacked form an old encoder may send decodes too.
    let unpacked = migration::SyncReply::decode(&[0x08, 0x00, 0x08, 0x80, 0x20][..]).unwrap();
    assert_eq!(unpacked.dirty_offsets, vec![0, 4096]);
    for empty in [mount::SyncArgs {}.encode_to_vec(), migration::CloseReply {}.encode_to_vec()] {
        assert!(empty.is_empty());
    }
}

#[test]
fn service_and_method_paths_are_the_originals() {
    use r3map_grpc::proto::migration::seeder_server::SERVICE_NAME as SEEDER;
    use r3map_grpc::proto::mount::backend_server::SERVICE_NAME as BACKEND;
    assert_eq!(BACKEND, "com.pojtinger.felicitas.r3map.mount.v1.Backend");
    assert_eq!(SEEDER, "com.pojtinger.felicitas.r3map.migration.v1.Seeder");
    let mount = include_str!("../../src/generated/com.pojtinger.felicitas.r3map.mount.v1.rs");
    for method in ["ReadAt", "WriteAt", "Sync"] {
        assert!(mount.contains(&format!("\"/{BACKEND}/{method}\"")), "{method}");
    }
    let migration = include_str!("../../src/generated/com.pojtinger.felicitas.r3map.migration.v1.rs");
    for method in ["ReadAt", "Track", "Sync", "Close"] {
        assert!(migration.contains(&format!("\"/{SEEDER}/{method}\"")), "{method}");
    }
}
