//! Direct and managed mounts through the kernel (FUSE, loop devices, ext4): root only; the tests
//! say so and return when they cannot run.

use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt as _;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use r3map_core::{Backend, Memory, SharedBackend};
use r3map_mount::{Hooks, ManagedOptions, Mount, MountOptions};
use r3map_net::client::Address;
use r3map_net::{
    ClientOptions, ClientSecurity, Export, RemoteBackend, Server, ServerConfig, ServerHandle, ServerSecurity,
};

fn can_mount() -> bool {
    let ok = r3map_fuse::can_mount();
    if !ok {
        eprintln!("skipped: needs root and /dev/fuse");
    }
    ok
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..len).map(|_| rng.u8(..)).collect()
}

fn contents(b: &dyn Backend) -> Vec<u8> {
    let mut v = vec![0u8; usize::try_from(b.size()).unwrap()];
    b.read_at(&mut v, 0).unwrap();
    v
}

/// Reads, writes and mmap writes through the mount, mirrored into `model`.
fn exercise(mount: &Mount, model: &mut [u8]) {
    // read(2) of everything.
    assert!(fs::read(mount.path()).unwrap() == model, "read(2) differs from the backend");
    // pwrite(2) at odd places.
    let f = mount.open_file().unwrap();
    for (i, (off, len)) in
        [(0usize, 10usize), (4095, 2), (100_000, 70_000), (model.len() - 3, 3)].into_iter().enumerate()
    {
        let data = pattern(100 + i as u64, len);
        f.write_all_at(&data, off as u64).unwrap();
        model[off..off + len].copy_from_slice(&data);
    }
    f.sync_all().unwrap();
    // Writes through a mapping.
    let mut map = mount.map().unwrap();
    map[5000..5100].fill(0x42);
    model[5000..5100].fill(0x42);
    let last = model.len() - 1;
    map[last] = 7;
    model[last] = 7;
    map.flush().unwrap();
    assert!(map[..] == model[..], "the mapping differs from the model");
    drop(map);
    let mut back = vec![0u8; model.len()];
    f.read_exact_at(&mut back, 0).unwrap();
    assert!(back == model, "pread differs after mmap writes");
}

#[test]
fn direct_mount_of_memory() {
    if !can_mount() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut model = pattern(1, 3 << 20 | 77);
    let remote = Arc::new(Memory::from_bytes(&model));
    let mount =
        Mount::direct(remote.clone(), dir.path(), &MountOptions::default(), Hooks::default()).unwrap();
    assert_eq!(mount.size(), model.len() as u64);
    exercise(&mount, &mut model);
    mount.sync().unwrap();
    assert!(contents(&*remote) == model);
    mount.close().unwrap();
}

#[test]
fn managed_mount_of_memory_pulls_pushes_and_calls_its_hooks() {
    if !can_mount() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut model = pattern(2, 5 << 20 | 123);
    let remote = Arc::new(Memory::from_bytes(&model));
    let local = Arc::new(Memory::new(remote.size()));
    let syncs = Arc::new(AtomicU64::new(0));
    let local_chunks = Arc::new(AtomicU64::new(0));
    let hooks = Hooks {
        before_sync: Some({
            let syncs = Arc::clone(&syncs);
            Box::new(move || {
                syncs.fetch_add(1, Ordering::SeqCst);
                Ok(())
            })
        }),
        before_close: None,
        on_chunk_local: Some({
            let n = Arc::clone(&local_chunks);
            Arc::new(move |_| {
                n.fetch_add(1, Ordering::SeqCst);
            })
        }),
    };
    let options = ManagedOptions { chunk_size: 64 * 1024, ..ManagedOptions::default() };
    let mount =
        Mount::managed(remote.clone(), local, dir.path(), &MountOptions::default(), options, hooks).unwrap();
    exercise(&mount, &mut model);
    mount.sync().unwrap();
    assert_eq!(syncs.load(Ordering::SeqCst), 1);
    assert!(contents(&*remote) == model, "sync must push every write");
    mount.wait_pulled().unwrap();
    let chunks = mount.synced().unwrap().geometry().chunks();
    assert_eq!(local_chunks.load(Ordering::SeqCst), chunks, "each chunk becomes local once");
    mount.close().unwrap();
    assert!(contents(&*remote) == model);
}

#[test]
fn managed_mount_of_a_network_remote() {
    if !can_mount() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut model = pattern(3, 4 << 20);
    let served = Arc::new(Memory::from_bytes(&model));
    let config = ServerConfig::new(Export::new("default", served.clone()), ServerSecurity::Plaintext);
    let server =
        ServerHandle::start_tcp(Server::new(config).unwrap(), "127.0.0.1:0".parse().unwrap()).unwrap();
    let address = Address::Tcp { host: "127.0.0.1".into(), port: server.local_addr().unwrap().port() };
    let remote: SharedBackend = Arc::new(
        RemoteBackend::connect(address.clone(), ClientOptions::new(ClientSecurity::Plaintext)).unwrap(),
    );
    let local = Arc::new(Memory::new(remote.size()));
    let mount = Mount::managed(
        remote,
        local,
        dir.path(),
        &MountOptions::default(),
        ManagedOptions::default(),
        Hooks::default(),
    )
    .unwrap();
    exercise(&mount, &mut model);
    mount.close().unwrap();
    assert!(contents(&*served) == model, "close must push every write to the server");

    // A direct mount of the same remote sees it all.
    let remote: SharedBackend =
        Arc::new(RemoteBackend::connect(address, ClientOptions::new(ClientSecurity::Plaintext)).unwrap());
    let mount = Mount::direct(remote, dir.path(), &MountOptions::default(), Hooks::default()).unwrap();
    assert!(fs::read(mount.path()).unwrap() == model);
    mount.close().unwrap();
}

#[test]
fn loop_devices_are_block_devices_of_the_backend() {
    if !can_mount() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut model = pattern(4, 8 << 20);
    let remote = Arc::new(Memory::from_bytes(&model));
    let local = Arc::new(Memory::new(remote.size()));
    let options = MountOptions { loop_device: true, ..MountOptions::default() };
    let mount = Mount::managed(
        remote.clone(),
        local,
        dir.path(),
        &options,
        ManagedOptions::default(),
        Hooks::default(),
    )
    .unwrap();
    let dev = mount.device().unwrap();
    assert!(dev.to_string_lossy().starts_with("/dev/loop"), "{}", dev.display());
    let backing = loop_backing_file(&dev).expect("the loop device is bound");
    assert_eq!(
        Path::new(&backing),
        mount.file_path().canonicalize().unwrap(),
        "the loop device serves the mount"
    );
    let f = OpenOptions::new().read(true).write(true).open(&dev).unwrap();
    let mut back = vec![0u8; model.len()];
    f.read_exact_at(&mut back, 0).unwrap();
    assert!(back == model, "the block device reads the backend");
    let data = pattern(5, 1 << 20);
    f.write_all_at(&data, 3 << 20).unwrap();
    model[3 << 20..4 << 20].copy_from_slice(&data);
    f.sync_all().unwrap();
    drop(f);
    mount.close().unwrap();
    assert!(contents(&*remote) == model);
    // Other tests attach loop devices too, and may get this one as soon as it is free: what
    // counts is that it no longer serves our file. The kernel finishes a detach when the last
    // opener (udev probing a new device, say) closes it, so give it time.
    let deadline = Instant::now() + Duration::from_secs(60);
    while loop_backing_file(&dev).is_some_and(|b| b == backing) {
        assert!(Instant::now() < deadline, "{} is still attached to {backing}", dev.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The file a loop device is bound to, from sysfs; `None` when it is bound to nothing.
fn loop_backing_file(dev: &Path) -> Option<String> {
    let name = dev.file_name()?.to_str()?;
    let backing = fs::read_to_string(format!("/sys/block/{name}/loop/backing_file")).ok()?;
    Some(backing.trim_end_matches('\n').to_owned())
}

fn have(tool: &str) -> bool {
    Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().is_ok_and(|o| o.status.success())
}

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(out.status.success(), "{cmd} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Unmounts a filesystem on drop, whatever happened.
struct Mounted<'a>(&'a Path);

impl Drop for Mounted<'_> {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0).status();
    }
}

#[test]
fn ext4_on_a_managed_mount_survives_a_remount_from_the_remote_alone() {
    if !can_mount() {
        return;
    }
    if !have("mkfs.ext4") {
        eprintln!("skipped: needs mkfs.ext4 (e2fsprogs)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let fuse_dir = dir.path().join("fuse");
    let fs_dir = dir.path().join("fs");
    fs::create_dir_all(&fuse_dir).unwrap();
    fs::create_dir_all(&fs_dir).unwrap();
    let remote = Arc::new(Memory::new(64 << 20));
    let options = MountOptions { loop_device: true, ..MountOptions::default() };
    let files: Vec<(String, Vec<u8>)> = (0..20)
        .map(|i| (format!("file-{i}"), pattern(10 + i, 1000 + 7919 * usize::try_from(i).unwrap())))
        .collect();

    // A managed mount with a fresh cache: everything it reads comes from the remote.
    let open = || {
        let local = Arc::new(Memory::new(remote.size()));
        Mount::managed(
            remote.clone(),
            local,
            &fuse_dir,
            &options,
            ManagedOptions::default(),
            Hooks::default(),
        )
        .unwrap()
    };
    {
        let mount = open();
        let dev = mount.device().unwrap().to_string_lossy().into_owned();
        run("mkfs.ext4", &["-q", "-F", &dev]);
        run("mount", &["-t", "ext4", &dev, &fs_dir.to_string_lossy()]);
        {
            let _guard = Mounted(&fs_dir);
            for (name, data) in &files {
                fs::write(fs_dir.join(name), data).unwrap();
            }
        }
        mount.close().unwrap();
    }

    // Remounted with a fresh cache: the files come from the remote alone.
    let mount = open();
    let dev = mount.device().unwrap().to_string_lossy().into_owned();
    run("mount", &["-t", "ext4", &dev, &fs_dir.to_string_lossy()]);
    {
        let _guard = Mounted(&fs_dir);
        for (name, data) in &files {
            assert!(&fs::read(fs_dir.join(name)).unwrap() == data, "{name} differs after the remount");
        }
    }
    mount.close().unwrap();
}
