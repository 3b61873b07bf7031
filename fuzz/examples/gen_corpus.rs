//! Writes the seed corpus, a few valid inputs per target, into `fuzz/corpus/<target>/`.
//! Run it again when a format changes: `cd fuzz && cargo run --example gen_corpus`.

use std::fs;
use std::path::Path;

use mbank_core::chunk;
use mbank_core::index::{DiskIndex, MemoryIndex, MemoryRun};
use mbank_core::{ChunkId, MachineName, VersionId};
use mbank_fuzz::handshake;
use mbank_nbd::proto::{
    self, CMD_FLAG_FUA, CMD_FLAG_REQ_ONE, ClientFlags, ClientOption, Command, InfoRequest,
    MetaContextRequest, Request,
};
use mbank_remote::wire;
use mbank_station::session::{DirtyMap, encode_dirty};

fn save(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    fs::create_dir_all(&dir).expect("make the corpus directory");
    fs::write(dir.join(name), bytes).expect("write a seed");
}

fn plain(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i / 7) as u8 ^ seed).collect()
}

fn nbd() {
    let flags = ClientFlags {
        fixed_newstyle: true,
        no_zeroes: true,
    }
    .encode();
    for (name, mode, export) in [("go", 0, "fuzz"), ("go-meta", 3, ""), ("go-wrong", 1, "x")] {
        save("nbd_options", name, &handshake(mode, export));
    }
    let mut list = flags.to_vec();
    list.extend(ClientOption::List.encode());
    list.extend(
        ClientOption::Info(InfoRequest {
            export: "fuzz".into(),
            requests: vec![proto::INFO_NAME, proto::INFO_DESCRIPTION],
        })
        .encode(),
    );
    list.extend(
        ClientOption::ListMetaContext(MetaContextRequest {
            export: "fuzz".into(),
            queries: vec!["base:".into()],
        })
        .encode(),
    );
    list.extend(ClientOption::StartTls.encode());
    list.extend(ClientOption::Abort.encode());
    save("nbd_options", "list-info-abort", &list);
    let mut old = flags.to_vec();
    old.extend(ClientOption::ExportName("fuzz".into()).encode());
    save("nbd_options", "export-name", &old);

    let req = |command, flags, offset, len| {
        Request {
            flags,
            command,
            handle: offset ^ 0x55,
            offset,
            len,
        }
        .encode()
    };
    let mut rw = vec![3u8]; // structured replies, base:allocation
    rw.extend(req(Command::Write, CMD_FLAG_FUA, 4096, 512));
    rw.extend(plain(512, 1));
    rw.extend(req(Command::Read, 0, 0, 8192));
    rw.extend(req(Command::BlockStatus, CMD_FLAG_REQ_ONE, 0, 65536));
    rw.extend(req(Command::WriteZeroes, 0, 0, 4096));
    rw.extend(req(Command::Trim, 0, 8192, 4096));
    rw.extend(req(Command::Cache, 0, 0, 4096));
    rw.extend(req(Command::Flush, 0, 0, 0));
    rw.extend(req(Command::Disc, 0, 0, 0));
    save("nbd_requests", "structured", &rw);
    let mut simple = vec![0u8];
    simple.extend(req(Command::Write, 0, 1 << 20, 16)); // past the end
    simple.extend(plain(16, 2));
    simple.extend(req(Command::Read, 0, 100, 300));
    simple.extend(req(Command::Unknown(99), 0, 0, 0));
    save("nbd_requests", "simple", &simple);
    let mut ro = vec![4u8];
    ro.extend(req(Command::Write, 0, 0, 8));
    ro.extend(plain(8, 3));
    ro.extend(req(Command::Read, 0, 0, 8));
    save("nbd_requests", "read-only", &ro);
}

fn chunks() -> Vec<chunk::EncodedChunk> {
    let raw = chunk::encode(&(0..=255u8).collect::<Vec<_>>(), 3);
    let zstd = chunk::encode(&plain(8192, 9), 3);
    assert_eq!(zstd.codec, mbank_core::Codec::Zstd);
    for (name, c) in [("raw", &raw), ("zstd", &zstd)] {
        let mut input = c.id.as_bytes().to_vec();
        input.extend_from_slice(&c.bytes);
        save("chunk_decode", name, &input);
    }
    vec![raw, zstd]
}

fn disk_index() -> DiskIndex {
    let mut ix = DiskIndex::zeroed(3 * 65536 + 100, 65536);
    ix.chunks[0] = Some(ChunkId::of(b"zero"));
    ix.chunks[2] = Some(ChunkId::of(b"two"));
    ix
}

fn memory_index() -> MemoryIndex {
    MemoryIndex {
        total_len: 70000,
        runs: vec![
            MemoryRun {
                id: Some(ChunkId::of(b"a")),
                len: 65536,
            },
            MemoryRun {
                id: None,
                len: 4464,
            },
        ],
    }
}

fn indexes() {
    save("index_decode", "disk", &disk_index().to_bytes());
    save("index_decode", "memory", &memory_index().to_bytes());
    // Without its trailer: the target appends a valid one.
    let d = disk_index().to_bytes();
    save("index_decode", "disk-body", &d[..d.len() - 32]);
}

fn dirty() {
    // chunk size 64 KiB (4 KiB << 4), disk of 40 blocks of 4 KiB: 3 chunks.
    let mut map = DirtyMap::clean(40 * 4096, 65536);
    map.masks[0] = map.full_mask(0);
    map.masks[2] = 0b101;
    let mut input = vec![4u8];
    input.extend_from_slice(&40u32.to_le_bytes());
    input.extend_from_slice(&encode_dirty(&map));
    save("dirty_map", "v2-partial", &input);
    let mut clean = vec![0u8];
    clean.extend_from_slice(&1u32.to_le_bytes());
    clean.extend_from_slice(&encode_dirty(&DirtyMap::clean(4096, 4096)));
    save("dirty_map", "v2-clean", &clean);
}

fn bodies(encoded: &[chunk::EncodedChunk]) {
    let batch = wire::batch_body(encoded.iter().map(|c| (&c.id, &c.bytes[..])));
    save("batch_upload", "two-chunks", &batch);
    let mut get = vec![3u8];
    get.extend(wire::chunks_answer(encoded.iter().map(|c| &c.bytes[..])));
    save("batch_get", "two-of-three", &get);

    let ix = disk_index();
    let info = mbank_catalog::VersionInfo {
        id: "00112233445566778899aabbccddeeff"
            .parse::<VersionId>()
            .expect("a version id"),
        machine: "ann/desk".parse::<MachineName>().expect("a machine name"),
        parent: None,
        created_ms: 1_795_000_000_000,
        disk_size: ix.disk_size,
        chunk_size: ix.chunk_size,
        stats: Default::default(),
        config: Some("{\"format\":1}".into()),
        streams: vec!["memory".into()],
    };
    let mem = memory_index().to_bytes();
    let header = wire::CommitHeader {
        info,
        expected_head: None,
        index_len: ix.to_bytes().len() as u64,
        streams: vec![("memory".into(), mem.len() as u64)],
    };
    save(
        "commit_body",
        "disk-and-memory",
        &wire::commit_body(&header, &ix.to_bytes(), &[mem]),
    );
}

fn main() {
    nbd();
    let encoded = chunks();
    indexes();
    dirty();
    bodies(&encoded);
}
