//! The server against real NBD clients over a unix socket in a temp dir: nbdinfo,
//! qemu-io, qemu-img, nbdcopy and fio. A missing tool fails the test (never skips it).

mod common;

use std::process::Command;
use std::sync::Arc;

use common::*;
use mbank_nbd::{MemDevice, ServerOptions};

const MIB: u64 = 1024 * 1024;

#[test]
fn nbdinfo_reports_size_flags_and_allocation_map() {
    require("nbdinfo", "libnbd-bin");
    let dev = Arc::new(MemDevice::new(64 * MIB));
    dev.write_at(MIB, &pattern(256 * 1024, 1)).expect("seed");
    dev.write_at(10 * MIB, &vec![0u8; MemDevice::BLOCK])
        .expect("seed");
    let server = TestServer::start(dev);

    let json: serde_json::Value = serde_json::from_str(&run(Command::new("nbdinfo")
        .arg("--json")
        .arg(server.uri())))
    .expect("nbdinfo --json");
    let export = &json["exports"][0];
    assert_eq!(json["protocol"], "newstyle-fixed");
    assert_eq!(json["structured"], true);
    assert_eq!(export["export-name"], "disk");
    assert_eq!(export["export-size"], 64 * MIB);
    assert_eq!(export["is_read_only"], false);
    assert_eq!(export["can_multi_conn"], true);
    for flag in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_cache",
        "can_df",
    ] {
        assert_eq!(export[flag], true, "{flag}");
    }
    assert_eq!(export["can_fast_zero"], false);
    assert_eq!(export["contexts"], serde_json::json!(["base:allocation"]));

    // --map reads base:allocation: hole, data, hole, zero (allocated), hole.
    let map = run(Command::new("nbdinfo").arg("--map").arg(server.uri()));
    let rows: Vec<(u64, u64, u32)> = map
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (
                f[0].parse().expect("offset"),
                f[1].parse().expect("length"),
                f[2].parse().expect("type"),
            )
        })
        .collect();
    let block = MemDevice::BLOCK as u64;
    assert_eq!(
        rows,
        vec![
            (0, MIB, 3),
            (MIB, 256 * 1024, 0),
            (MIB + 256 * 1024, 9 * MIB - 256 * 1024, 3),
            (10 * MIB, block, 2),
            (10 * MIB + block, 54 * MIB - block, 3),
        ],
        "map:\n{map}"
    );
    assert!(map.contains("hole,zero") && map.contains("data"), "{map}");

    // A device that is not safe for multi-conn does not advertise it; read-only shows.
    let dev = Arc::new(
        MemDevice::new(MIB)
            .with_multi_conn(false)
            .with_read_only(true),
    );
    let server2 = TestServer::start_with(dev, ServerOptions::with_export_name("ro"));
    let json: serde_json::Value = serde_json::from_str(&run(Command::new("nbdinfo")
        .arg("--json")
        .arg(server2.uri())))
    .expect("nbdinfo --json");
    assert_eq!(json["exports"][0]["can_multi_conn"], false);
    assert_eq!(json["exports"][0]["is_read_only"], true);
    // And the default (empty) export name reaches the export too.
    let size = run(Command::new("nbdinfo")
        .arg("--size")
        .arg(format!("nbd+unix:///?socket={}", server2.socket.display())));
    assert_eq!(size.trim(), MIB.to_string());
    server2.stop();
    server.stop();
}

#[test]
fn qemu_io_writes_and_reads_back_patterns() {
    require("qemu-io", "qemu-utils");
    let dev = Arc::new(MemDevice::new(16 * MIB));
    let server = TestServer::start(dev.clone());
    let cmds = [
        "write -P 0xab 0 1M",
        "write -P 0xcd 1M 512k",
        // FUA write, zeroes without and with a hole, discard, flush.
        "write -f -P 0x11 4M 64k",
        "write -z 2M 128k",
        "write -z -u 3M 128k",
        "discard 5M 1M",
        "flush",
        "read -P 0xab 0 1M",
        "read -P 0xcd 1M 512k",
        "read -P 0x11 4M 64k",
        "read -P 0 2M 128k",
        "read -P 0 3M 128k",
        // Unaligned and at the very end.
        "write -P 0x5a 16777215 1",
        "read -P 0x5a 16777215 1",
        "aio_write -P 0x77 8M 64k",
        "aio_write -P 0x78 9M 64k",
        "aio_flush",
        "read -P 0x77 8M 64k",
        "read -P 0x78 9M 64k",
    ];
    let mut cmd = Command::new("qemu-io");
    cmd.arg("-f").arg("raw");
    for c in cmds {
        cmd.arg("-c").arg(c);
    }
    cmd.arg(server.uri());
    let out = run(&mut cmd);
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert!(!out.contains("error"), "{out}");

    // The device holds exactly what qemu-io wrote.
    let content = dev.to_vec();
    assert!(content[..MIB as usize].iter().all(|&b| b == 0xab));
    assert!(
        content[MIB as usize..(MIB + 512 * 1024) as usize]
            .iter()
            .all(|&b| b == 0xcd)
    );
    assert_eq!(content[16 * MIB as usize - 1], 0x5a);
    assert!(dev.fua_write_count() >= 1, "FUA did not reach the device");
    assert!(dev.flush_count() >= 1, "flush did not reach the device");
    let stats = server.stats();
    assert!(
        stats.bytes_written >= MIB + 512 * 1024 + 64 * 1024,
        "{stats:?}"
    );
    assert_eq!(stats.connections_failed, 0, "{stats:?}");
    server.stop();
}

#[test]
fn qemu_img_convert_and_compare_both_ways() {
    require("qemu-img", "qemu-utils");
    let dev = Arc::new(MemDevice::new(32 * MIB));
    let server = TestServer::start(dev.clone());
    let dir = tempfile::tempdir().expect("tempdir");

    // A sparse source image: data islands, holes between them.
    let src = dir.path().join("src.img");
    {
        let f = std::fs::File::create(&src).expect("create");
        f.set_len(32 * MIB).expect("size");
        use std::os::unix::fs::FileExt;
        for (i, at) in [0u64, 3 * MIB + 4096, 17 * MIB, 32 * MIB - 65536]
            .into_iter()
            .enumerate()
        {
            f.write_all_at(&pattern(65536, i as u64), at)
                .expect("write");
        }
    }
    let src_s = src.display().to_string();
    run(Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw", &src_s])
        .arg(server.uri()));
    run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw", &src_s])
        .arg(server.uri()));
    assert_eq!(dev.to_vec(), std::fs::read(&src).expect("read"));

    // From the export to a new qcow2 and raw file.
    let raw = dir.path().join("back.img");
    let qcow = dir.path().join("back.qcow2");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(server.uri())
        .arg(&raw));
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(server.uri())
        .arg(&qcow));
    assert_eq!(
        std::fs::read(&raw).expect("read"),
        std::fs::read(&src).expect("read")
    );
    run(Command::new("qemu-img")
        .args(["compare", "-f", "qcow2", "-F", "raw"])
        .arg(&qcow)
        .arg(server.uri()));

    // A one-byte difference is found.
    dev.write_at(20 * MIB + 7, b"!").expect("poke");
    let out = run_output(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw", &src_s])
            .arg(server.uri()),
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "compare should report a difference"
    );
    server.stop();
}

#[test]
fn nbdcopy_round_trip() {
    require("nbdcopy", "libnbd-bin");
    let dev = Arc::new(MemDevice::new(48 * MIB));
    let server = TestServer::start(dev.clone());
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src.img");
    let mut data = vec![0u8; 48 * MIB as usize];
    for (i, at) in [0usize, 5 * MIB as usize + 512, 40 * MIB as usize]
        .into_iter()
        .enumerate()
    {
        let p = pattern(3 * MIB as usize, 100 + i as u64);
        data[at..at + p.len()].copy_from_slice(&p);
    }
    std::fs::write(&src, &data).expect("write");

    // nbdcopy uses several connections (multi-conn is advertised) and many requests
    // in flight on each.
    run(Command::new("nbdcopy")
        .arg("--flush")
        .arg(&src)
        .arg(server.uri()));
    assert!(dev.to_vec() == data, "export differs after nbdcopy in");
    assert!(dev.flush_count() >= 1);
    let dst = dir.path().join("dst.img");
    std::fs::File::create(&dst).expect("create");
    run(Command::new("nbdcopy").arg(server.uri()).arg(&dst));
    assert!(std::fs::read(&dst).expect("read") == data, "copy differs");
    // NBD to NBD: the export onto itself at another server.
    let dev2 = Arc::new(MemDevice::new(48 * MIB));
    let server2 = TestServer::start(dev2.clone());
    run(Command::new("nbdcopy").arg(server.uri()).arg(server2.uri()));
    assert!(dev2.to_vec() == data, "NBD to NBD copy differs");
    // Holes stay holes: the copy skipped the zero ranges.
    assert!(!dev2.is_allocated(20 * MIB));
    let stats = server.stats();
    assert!(stats.connections_accepted >= 3, "{stats:?}");
    assert_eq!(stats.connections_failed, 0, "{stats:?}");
    server2.stop();
    server.stop();
}

#[test]
fn fio_random_writes_verify() {
    require("fio", "fio");
    let dev = Arc::new(MemDevice::new(32 * MIB));
    let server = TestServer::start(dev);
    // fio writes state files into its working directory: keep them in the temp dir.
    let out = run(Command::new("fio")
        .current_dir(server.dir.path())
        .arg("--name=nbd-verify")
        .arg("--ioengine=nbd")
        .arg(format!("--uri={}", server.uri()))
        .args([
            "--rw=randwrite",
            "--bs=4k",
            "--size=8m",
            "--iodepth=32",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_state_save=0",
            "--randrepeat=1",
            "--output-format=terse",
        ]));
    // Terse output, field 5 is the error count of the job ("0" when fine).
    let fields: Vec<&str> = out.lines().last().unwrap_or("").split(';').collect();
    assert_eq!(fields.get(4), Some(&"0"), "fio reported errors:\n{out}");
    let stats = server.stats();
    assert!(stats.bytes_written >= 8 * MIB, "{stats:?}");
    assert!(
        stats.bytes_read >= 8 * MIB,
        "verify did not read back: {stats:?}"
    );
    server.stop();
}
