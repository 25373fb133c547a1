//! Instant restore: `cairn-agent serve-nbd` exports a point's disk read-only over NBD from an
//! encrypted vault, fetching blocks as clients read them. Checked with qemu's and libnbd's own
//! clients: the export is the disk at each point (`qemu-img compare`), the first bytes come
//! before anything else is fetched, a client that leaves mid-read does not stop the server, a
//! damaged chunk fails the reads of its block (named in the server's log), and bad arguments
//! are clear errors.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use support::{agent, ok, pack_files, tool};

/// A running `serve-nbd`, stopped (SIGTERM) when dropped.
struct Served {
    child: Child,
    socket: PathBuf,
    started: Instant,
    /// What it printed on its first line.
    line: String,
}

impl Served {
    fn start(vault: &str, point: &str, socket: &Path) -> Served {
        Served::start_with(vault, point, socket, &[])
    }

    fn start_with(vault: &str, point: &str, socket: &Path, extra: &[&str]) -> Served {
        let started = Instant::now();
        let mut child = Command::new(env!("CARGO_BIN_EXE_cairn-agent"))
            .env("CAIRN_PASSPHRASE", "running VM tests")
            .args(["serve-nbd", "--vault", vault, "--vm", "web", "--point", point, "--disk", "os"])
            .arg("--socket")
            .arg(socket)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        assert!(line.starts_with("serving disk os"), "{line}");
        Served { child, socket: socket.to_owned(), started, line }
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///os?socket={}", self.socket.display())
    }

    /// Stops it; returns what it wrote on stderr.
    fn stop(mut self) -> String {
        rustix::process::kill_process(
            rustix::process::Pid::from_raw(self.child.id() as i32).unwrap(),
            rustix::process::Signal::TERM,
        )
        .unwrap();
        let mut err = String::new();
        self.child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
        assert!(self.child.wait().unwrap().success(), "{err}");
        assert!(!self.socket.exists(), "the socket is removed");
        err
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The numbers in serve-nbd's last words: (chunks fetched, reads from the cache).
fn served_counts(log: &str) -> (u64, u64) {
    let line = log.lines().find(|l| l.starts_with("served ")).expect(log);
    let number = |before: &str| -> u64 {
        let head = &line[..line.find(before).expect(line)];
        head.rsplit(' ').find(|w| !w.is_empty()).unwrap().parse().unwrap()
    };
    (number(" chunks fetched"), number(" reads from the cache"))
}

#[test]
fn the_blocks_a_guest_reads_first_are_noted_and_fetched_before_the_next_boot_asks() {
    let dir = tempfile::tempdir().unwrap();
    let s = |n: &str| dir.path().join(n).to_str().unwrap().to_owned();
    let (vault, disk) = (s("vault"), s("disk.raw"));
    ok(agent(&["init", "--vault", &vault]));
    ok(agent(&["sample", "create", &disk, "--size", "64M", "--seed", "5"]));
    ok(agent(&["backup", "--vault", &vault, "--vm", "web", "--disk", &format!("os={disk}")]));
    let image = std::fs::read(&disk).unwrap();
    // Another VM shares the vault: an export of web never needs its pack index.
    let other = s("other.raw");
    ok(agent(&["sample", "create", &other, "--size", "8M", "--seed", "6"]));
    ok(agent(&["backup", "--vault", &vault, "--vm", "db", "--disk", &format!("os={other}")]));
    // A "boot": three scattered reads, out of order (no read-ahead), as a guest's would be.
    let boot = |served: &Served| {
        let mut client = cairn_nbd::Client::connect_unix(&served.socket, "os", &[]).unwrap();
        for at in [40u64 << 20, 1 << 20, (2 << 20) + 4096] {
            let mut got = vec![0u8; 4096];
            client.read(at, &mut got).unwrap();
            assert!(got == image[at as usize..at as usize + 4096]);
        }
    };

    let served =
        Served::start_with(&vault, "latest", &dir.path().join("a.sock"), &["--record-reads"]);
    boot(&served);
    let log = served.stop();
    assert!(log.contains("the 3 blocks clients read first"), "{log}");
    assert!(log.contains("pack indexes loaded: 1 (only this point's and its VM's)"), "{log}");
    let (first_fetched, first_hits) = served_counts(&log);
    assert_eq!(first_hits, 0, "{log}");
    let listed = ok(agent(&["points", "--json", "--vault", &vault, "--vm", "web"]));
    let noted = &listed["points"][0]["state"]["boot_reads"];
    assert_eq!(noted["blocks"], 3, "{listed}");

    // The next export fetches them before anyone asks; the boot then finds them cached.
    let mut served = Served::start(&vault, "latest", &dir.path().join("b.sock"));
    let (lines, said) = std::sync::mpsc::channel();
    let stderr = served.child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = lines.send(line);
        }
    });
    let mut log = String::new();
    loop {
        let line = said.recv_timeout(std::time::Duration::from_secs(60)).expect("no prefetch");
        log.push_str(&line);
        log.push('\n');
        if line.starts_with("prefetched") {
            assert!(line.starts_with("prefetched 3 blocks"), "{line}");
            break;
        }
    }
    boot(&served);
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(served.child.id() as i32).unwrap(),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    assert!(served.child.wait().unwrap().success());
    while let Ok(line) = said.recv_timeout(std::time::Duration::from_secs(10)) {
        log.push_str(&line);
        log.push('\n');
    }
    let (fetched, hits) = served_counts(&log);
    assert_eq!(fetched, first_fetched, "the same blocks, fetched once: {log}");
    // (A block of zeros is never fetched nor cached: the sample disk has some.)
    assert!(fetched > 0, "{log}");
    assert_eq!(hits, fetched, "every block of the boot came from the cache: {log}");

    // --no-prefetch: nothing fetched before the reads.
    let served =
        Served::start_with(&vault, "latest", &dir.path().join("c.sock"), &["--no-prefetch"]);
    let log = served.stop();
    assert_eq!(served_counts(&log).0, 0, "{log}");
}

#[test]
fn a_point_is_served_over_nbd_as_it_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let s = |n: &str| dir.path().join(n).to_str().unwrap().to_owned();
    let (vault, disk) = (s("vault"), s("disk.raw"));
    ok(agent(&["init", "--vault", &vault]));
    ok(agent(&["sample", "create", &disk, "--size", "64M", "--seed", "5"]));
    let backup = || {
        let p = ok(agent(&[
            "backup",
            "--json",
            "--vault",
            &vault,
            "--vm",
            "web",
            "--disk",
            &format!("os={disk}"),
        ]));
        p["point"].as_str().unwrap().to_owned()
    };
    let p1 = backup();
    std::fs::copy(&disk, s("at-p1.raw")).unwrap();
    ok(agent(&["sample", "mutate", &disk, "--fraction", "0.01"]));
    ok(agent(&["sample", "mutate", &disk, "--range", "8M:3M", "--seed", "9"]));
    let p2 = backup();

    // The newest point, served: the first bytes come at once, and the export is the disk.
    let served = Served::start(&vault, "latest", &dir.path().join("p2.sock"));
    assert!(served.line.contains(&p2), "{}", served.line);
    let mut client = cairn_nbd::Client::connect_unix(&served.socket, "os", &[]).unwrap();
    let mut first = vec![0u8; 4096];
    client.read(0, &mut first).unwrap();
    let first_byte = served.started.elapsed();
    assert!(first == std::fs::read(&disk).unwrap()[..4096]);
    eprintln!("first 4 KiB served {:.3} s after serve-nbd started", first_byte.as_secs_f64());
    let size = tool("nbdinfo", &["--size", &served.uri()]);
    assert_eq!(size.trim(), (64u64 << 20).to_string());
    let compared = Instant::now();
    tool("qemu-img", &["compare", "-f", "raw", "-F", "raw", &disk, &served.uri()]);
    eprintln!(
        "qemu-img compare of 64 MiB over the export: {:.2} s",
        compared.elapsed().as_secs_f64()
    );

    // A client that asks for data and leaves before reading the reply; another that talks
    // nonsense: the server serves on.
    let mut rude = std::os::unix::net::UnixStream::connect(&served.socket).unwrap();
    let mut hello = [0u8; 18];
    rude.read_exact(&mut hello).unwrap();
    rude.write_all(&[0xff; 40]).unwrap();
    drop(rude);
    drop(client);
    tool("nbdcopy", &[&served.uri(), &s("copied.raw")]);
    tool("cmp", &[&disk, &s("copied.raw")]);
    let log = served.stop();
    assert!(log.contains("chunks fetched"), "{log}");

    // The first point, by id: the disk as it was then.
    let served = Served::start(&vault, &p1, &dir.path().join("p1.sock"));
    tool("qemu-img", &["compare", "-f", "raw", "-F", "raw", &s("at-p1.raw"), &served.uri()]);
    served.stop();

    // On a loopback port, the export's name carries a random part that only the URI gives:
    // a client that does not know it (the default name, a list) gets nothing.
    let mut tcp = Command::new(env!("CARGO_BIN_EXE_cairn-agent"))
        .env("CAIRN_PASSPHRASE", "running VM tests")
        .args(["serve-nbd", "--vault", &vault, "--vm", "web", "--disk", "os", "--listen"])
        .arg("127.0.0.1:0")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(tcp.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let uri = line.split(" on ").nth(1).and_then(|r| r.split(';').next()).unwrap().to_owned();
    assert!(uri.starts_with("nbd://127.0.0.1:") && uri.contains("/os-"), "{line}");
    tool("qemu-img", &["compare", "-f", "raw", "-F", "raw", &disk, &uri]);
    let (addr, _) = uri.trim_start_matches("nbd://").split_once('/').unwrap();
    let guessed = Command::new("nbdinfo").arg(format!("nbd://{addr}/os")).output().unwrap();
    assert!(!guessed.status.success(), "the disk's name alone does not reach the export");
    let listed =
        Command::new("nbdinfo").args(["--list", &format!("nbd://{addr}")]).output().unwrap();
    assert!(!String::from_utf8_lossy(&listed.stdout).contains("/os-"), "the list names nothing");
    let _ = tcp.kill();
    let _ = tcp.wait();

    // Over TLS (NBD's STARTTLS), as an export on an address other hosts reach must be: qemu's
    // client, trusting the test CA, reads the whole disk; a client without TLS is told so.
    let (ca, cert, key) = cairn_testkit::tls_certificates(dir.path());
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let creds = dir.path().join("creds");
    std::fs::create_dir(&creds).unwrap();
    std::fs::copy(&ca, creds.join("ca-cert.pem")).unwrap();
    let mut tls = Command::new(env!("CARGO_BIN_EXE_cairn-agent"))
        .env("CAIRN_PASSPHRASE", "running VM tests")
        .args(["serve-nbd", "--vault", &vault, "--vm", "web", "--disk", "os", "--listen"])
        .arg("127.0.0.1:0")
        .arg("--tls-cert")
        .arg(&cert)
        .arg("--tls-key")
        .arg(&key)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(tls.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let uri = line.split(" on ").nth(1).and_then(|r| r.split(';').next()).unwrap().to_owned();
    assert!(uri.starts_with("nbds://127.0.0.1:"), "{line}");
    let (addr, name) = uri.trim_start_matches("nbds://").split_once('/').unwrap();
    let (host, port) = addr.split_once(':').unwrap();
    let copy = s("over-tls.raw");
    tool(
        "qemu-img",
        &[
            "convert",
            "--object",
            &format!("tls-creds-x509,id=tls0,endpoint=client,dir={}", creds.display()),
            "--image-opts",
            &format!(
                "driver=nbd,server.type=inet,server.host={host},server.port={port},\
                 export={name},tls-creds=tls0"
            ),
            "-O",
            "raw",
            &copy,
        ],
    );
    assert!(std::fs::read(&copy).unwrap() == std::fs::read(&disk).unwrap(), "the disk over TLS");
    let plain = Command::new("qemu-img").args(["info", &format!("nbd://{addr}/{name}")]).output();
    let said = String::from_utf8_lossy(&plain.unwrap().stderr).into_owned();
    assert!(said.contains("TLS only"), "{said}");
    let _ = tls.kill();
    let _ = tls.wait();

    // A damaged pack: the reads of its blocks fail with EIO, the server names the block and
    // serves the rest.
    let packs = pack_files(&dir.path().join("vault"));
    let biggest = packs.iter().max_by_key(|p| p.metadata().unwrap().len()).unwrap();
    let mut bytes = std::fs::read(biggest).unwrap();
    let middle = bytes.len() / 2;
    for b in &mut bytes[middle..middle + 64] {
        *b ^= 0x5a;
    }
    std::fs::write(biggest, bytes).unwrap();
    let served = Served::start(&vault, &p2, &dir.path().join("bad.sock"));
    let out = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw", &disk, &served.uri()])
        .output()
        .unwrap();
    assert!(!out.status.success(), "a damaged chunk cannot compare equal");
    let mut client = cairn_nbd::Client::connect_unix(&served.socket, "os", &[]).unwrap();
    let mut hole = vec![0u8; 4096];
    client.read(0, &mut hole).unwrap();
    drop(client);
    let log = served.stop();
    assert!(log.contains("NBD read failed") && log.contains("disk os"), "{log}");

    // Bad arguments: each refused, saying what is wrong.
    let refused = |extra: &[&str], says: &str| {
        let mut args = vec!["serve-nbd", "--vault", &vault, "--vm", "web"];
        args.extend_from_slice(extra);
        let out = agent(&args);
        let e = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success() && e.contains(says), "{extra:?}: {e}");
    };
    let (x, y, taken) = (s("x.sock"), s("y.sock"), s("taken.sock"));
    let missing_point = "20200101T000000.000Z-00000000";
    refused(&["--point", missing_point, "--disk", "os", "--socket", &x], missing_point);
    refused(&["--disk", "os", "--listen", "0.0.0.0:10809"], "--tls-cert");
    refused(&["--disk", "os", "--listen", "0.0.0.0:10809", "--tls-cert", &x], "--tls-key");
    // A key others may read is refused, before the vault is opened.
    let open_key = s("open.key");
    std::fs::copy(&key, &open_key).unwrap();
    std::fs::set_permissions(&open_key, std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .unwrap();
    let (cert, open_key) = (cert.to_str().unwrap(), open_key.as_str());
    let tls = ["--tls-cert", cert, "--tls-key", open_key];
    refused(&[&["--disk", "os", "--listen", "0.0.0.0:10809"][..], &tls].concat(), "chmod 600");
    refused(&["--disk", "data", "--socket", &y], "no disk data");
    std::fs::write(&taken, b"").unwrap();
    refused(&["--disk", "os", "--socket", &taken], "already");
}

/// The same from vaults in object storage (S3 and Azure Blob emulators): the first bytes come
/// before anything else is read, and the export is the disk.
#[test]
fn a_point_in_object_storage_is_served_over_nbd() {
    for (backend, vault) in cairn_testkit::object_store_urls() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("disk.raw").to_str().unwrap().to_owned();
        ok(agent(&["init", "--vault", &vault]));
        ok(agent(&["sample", "create", &disk, "--size", "32M", "--seed", "6"]));
        ok(agent(&[
            "backup",
            "--json",
            "--vault",
            &vault,
            "--vm",
            "web",
            "--disk",
            &format!("os={disk}"),
        ]));
        let served = Served::start(&vault, "latest", &dir.path().join("s.sock"));
        let mut client = cairn_nbd::Client::connect_unix(&served.socket, "os", &[]).unwrap();
        let mut first = vec![0u8; 4096];
        client.read(0, &mut first).unwrap();
        let first_byte = served.started.elapsed();
        drop(client);
        assert!(first == std::fs::read(&disk).unwrap()[..4096]);
        let compared = Instant::now();
        tool("qemu-img", &["compare", "-f", "raw", "-F", "raw", &disk, &served.uri()]);
        eprintln!(
            "{backend}: first 4 KiB {:.3} s after serve-nbd started; compare of 32 MiB {:.2} s",
            first_byte.as_secs_f64(),
            compared.elapsed().as_secs_f64()
        );
        served.stop();
    }
}
