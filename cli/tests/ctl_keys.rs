//! Client platforms' keys and the protected control plane, as a user drives
//! them with `dmfabric ctl` and `dmfabric keygen`: keys made, rotated,
//! exported and retired, never printed; and etcd over TLS with client
//! certificates and a user per role (Debian's etcd and the openssl command,
//! started by the test: it skips with one line where they are missing,
//! and fails under DMFABRIC_REQUIRE_PRIVILEGED=1, as CI runs it).

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Stdio};

use dmfabric_control::keys::KeyFile;
use dmfabric_control::model::Change;
use dmfabric_control::store::{self, Store};
use dmfabric_testkit::etcd::{start_or_skip, EtcdProcess};
use dmfabric_testkit::TestDir;

mod common;
use common::BIN;

/// `dmfabric args`: (success, stdout, stderr).
fn dmfabric(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN).args(args).stdin(Stdio::null()).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `dmfabric ctl --store spec args`, which must succeed: its stdout.
fn ctl(spec: &str, args: &[&str]) -> String {
    let mut all = vec!["ctl", "--store", spec];
    all.extend_from_slice(args);
    let (ok, out, err) = dmfabric(&all);
    assert!(ok, "ctl {args:?}: {out}{err}");
    out
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().mode() & 0o7777
}

#[test]
fn keys_are_made_rotated_exported_and_never_printed() {
    let dir = TestDir::new("ctl-keys-redb");
    let spec = dir.join("store/control.redb").to_str().unwrap().to_string();
    let out = ctl(&spec, &["add", "client", "--id", "3", "--mac", "02:00:00:00:00:03"]);
    assert!(out.contains("made key 1 of client platform 3"), "{out}");
    assert_eq!((mode(Path::new(&spec)), mode(&dir.join("store"))), (0o600, 0o700));
    let s = store::open(&spec).unwrap();
    let first = s.client_keys(3).unwrap().expect("key 1 made with the client");
    assert_eq!((first.ids(), first.send), (vec![1], 1));
    let secret = first.keys[0].secret.to_hex();

    // Never printed.
    for args in [&["ls"][..], &["ls", "--json"], &["show", "client", "3"], &["show", "client", "3", "--json"]] {
        let out = ctl(&spec, args);
        assert!(!out.contains(&secret), "ctl {args:?} printed a secret");
    }

    let out = ctl(&spec, &["client", "rekey", "3", "--wait-ms", "10"]);
    assert!(out.contains("added key 2") && out.contains("now sending with key 2"), "{out}");
    let rekeyed = s.client_keys(3).unwrap().unwrap();
    assert_eq!((rekeyed.ids(), rekeyed.send), (vec![1, 2], 2));
    assert_eq!(rekeyed.keys[0].secret.to_hex(), secret, "the old key stays until retired");

    let file = dir.join("client3.toml");
    let f = file.to_str().unwrap();
    ctl(&spec, &["client", "export-key", "3", "--out", f]);
    assert_eq!(mode(&file), 0o600);
    let loaded = KeyFile::load(&file).unwrap();
    assert_eq!((loaded.client, loaded.send, loaded.keys.len()), (3, 2, 2));
    assert_eq!(loaded.ring().unwrap().sending().id, 2);
    let (ok, _, err) = dmfabric(&["ctl", "--store", &spec, "client", "export-key", "3", "--out", f]);
    assert!(!ok && err.contains("exists") && err.contains("--force"), "{err}");

    let out = ctl(&spec, &["client", "retire-keys", "3"]);
    assert!(out.contains("retired keys other than 2"), "{out}");
    assert_eq!(s.client_keys(3).unwrap().unwrap().ids(), vec![2]);

    let (ok, _, err) = dmfabric(&["ctl", "--store", &spec, "client", "rekey", "9"]);
    assert!(!ok && err.contains("client platform 9 does not exist"), "{err}");
    ctl(&spec, &["rm", "client", "3"]);
    assert_eq!(s.client_keys(3).unwrap(), None, "its keys went with it");

    // Config mode: a key file without a store.
    let k4 = dir.join("client4.toml");
    let (ok, out, err) = dmfabric(&["keygen", "--client", "4", "--out", k4.to_str().unwrap()]);
    assert!(ok, "{out}{err}");
    assert_eq!(mode(&k4), 0o600);
    let made = KeyFile::load(&k4).unwrap();
    assert_eq!((made.client, made.send), (4, 1));
    let (ok, _, err) = dmfabric(&["keygen", "--client", "4", "--out", k4.to_str().unwrap()]);
    assert!(!ok && err.contains("--force"), "no overwrite without --force: {err}");
    assert_eq!(KeyFile::load(&k4).unwrap(), made);
    let (ok, _, _) = dmfabric(&["keygen", "--client", "4", "--out", k4.to_str().unwrap(), "--force"]);
    assert!(ok);
    assert_ne!(KeyFile::load(&k4).unwrap(), made, "a fresh key");
}

/// A store of etcd user `user`, which must connect.
fn store_as(etcd: &EtcdProcess, user: &str) -> Box<dyn Store> {
    store::open(&etcd.spec(user)).unwrap_or_else(|e| panic!("{user}: {e}"))
}

fn denied(r: Result<impl std::fmt::Debug, dmfabric_control::store::StoreError>) -> bool {
    match r {
        Ok(v) => panic!("allowed: {v:?}"),
        Err(e) => e.to_string().contains("permission denied"),
    }
}

#[test]
fn etcd_over_tls_gives_each_host_what_it_serves_and_no_more() {
    let users = ["dmfabric-admin", "dmfabric-server-1", "dmfabric-server-2", "dmfabric-client-3", "dmfabric-client-4"];
    let Some(etcd) =
        start_or_skip("etcd_over_tls_gives_each_host_what_it_serves_and_no_more", || EtcdProcess::start_tls(&users))
    else {
        return;
    };
    let ca = etcd.tls.as_ref().unwrap().ca.display().to_string();

    // Plain http and a connection without a client certificate are refused.
    let plain = format!("etcd://{}", etcd.endpoint);
    assert!(store::open(&plain).is_err(), "plain http");
    let (ok, _, err) = dmfabric(&["ctl", "--store", &plain, "ls"]);
    assert!(!ok && err.contains("warning") && err.contains("without authentication"), "{err}");
    let no_cert = match store::open(&format!("etcds://{}?ca={ca}", etcd.endpoint)) {
        Ok(_) => panic!("connected without a client certificate"),
        Err(e) => e.to_string(),
    };
    assert!(no_cert.contains("over TLS"), "{no_cert}");

    let admin = etcd.spec("dmfabric-admin");
    for (id, mac) in [("1", "02:00:00:00:00:11"), ("2", "02:00:00:00:00:12")] {
        ctl(&admin, &["add", "server", "--id", id, "--mac", mac, "--role", "io"]);
    }
    for (id, mac) in [("3", "02:00:00:00:00:03"), ("4", "02:00:00:00:00:04")] {
        ctl(&admin, &["add", "client", "--id", id, "--mac", mac]);
    }
    ctl(&admin, &["add", "vm", "--id", "30", "--client", "3"]);
    ctl(&admin, &["add", "vm", "--id", "40", "--client", "4"]);
    let device = |id: &str, server: &str, vm: &str| {
        ctl(
            &admin,
            &["add", "device", "--id", id, "--kind", "regfile", "--server", server, "--vm", vm, "--pio", "0x500:0x10"],
        )
    };
    device("1", "1", "30");
    device("2", "2", "40");

    let out = ctl(&admin, &["etcd-auth"]);
    assert!(out.contains("role dmfabric-server-1: ") && out.contains("+read /dmfabric/keys/client/3"), "{out}");
    assert!(out.contains("authentication is on"), "{out}");
    let again = ctl(&admin, &["etcd-auth"]);
    assert!(!again.contains("added user") && !again.contains("role "), "idempotent: {again}");

    // The admin commits (and each commit keeps the grants current).
    let out = ctl(&admin, &["add", "vm", "--id", "31", "--client", "3"]);
    assert!(out.contains("added VM 31"), "{out}");

    // Server 1 serves client platform 3 (device 1 of VM 30): it reads the
    // records and client 3's keys, not client 4's, and writes no record.
    let s1 = store_as(&etcd, "dmfabric-server-1");
    assert_eq!(s1.load().unwrap().vms.len(), 3);
    assert_eq!(s1.client_keys(3).unwrap().unwrap().ids(), vec![1]);
    assert!(denied(s1.client_keys(4)), "server 1 reads client 4's keys");
    assert!(denied(s1.commit(&[Change::RemoveDevice(2)])), "a server writes records");
    s1.cluster_key().unwrap();

    // A client platform reads its own keys, not another's.
    let c3 = store_as(&etcd, "dmfabric-client-3");
    assert_eq!(c3.client_keys(3).unwrap().unwrap().send, 1);
    assert!(denied(c3.client_keys(4)), "client 3 reads client 4's keys");
    // A device's state moves between servers (sealed); clients cannot take it.
    s1.put_state("device/2", b"registers").unwrap();
    assert!(denied(c3.take_state("device/2")), "a client takes a device's state");
    let s2 = store_as(&etcd, "dmfabric-server-2");
    assert_eq!(s2.take_state("device/2").unwrap().as_deref(), Some(&b"registers"[..]));

    // A rekey through ctl is seen by the server user.
    let out = ctl(&admin, &["client", "rekey", "3", "--wait-ms", "50"]);
    assert!(out.contains("now sending with key 2"), "{out}");
    let seen = s1.client_keys(3).unwrap().unwrap();
    assert_eq!((seen.ids(), seen.send), (vec![1, 2], 2));

    // Placement moves key access: device 2 (VM 40 of client 4) to server 1.
    let out = ctl(&admin, &["device", "move", "2", "--to", "1"]);
    assert!(out.contains("dmfabric-server-1: +read /dmfabric/keys/client/4"), "{out}");
    assert!(out.contains("dmfabric-server-2: -read /dmfabric/keys/client/4"), "{out}");
    assert!(out.contains("hosts reload with their new grants"), "watchers see the grant: {out}");
    assert_eq!(s1.client_keys(4).unwrap().unwrap().client, 4);
    assert!(denied(s2.client_keys(4)), "server 2 still reads client 4's keys");
}

/// With etcd's authentication on, a server's and a client platform's
/// users may watch what they follow (the revision key, and the states in
/// transit they take): both are pushed each commit and each state put
/// for them, and neither falls back to polling.
#[test]
fn with_etcd_auth_each_host_is_pushed_what_it_follows() {
    use dmfabric_control::watch::{Follow, Watch};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};
    let users = ["dmfabric-admin", "dmfabric-server-1", "dmfabric-client-3"];
    let Some(etcd) =
        start_or_skip("with_etcd_auth_each_host_is_pushed_what_it_follows", || EtcdProcess::start_tls(&users))
    else {
        return;
    };
    let admin = etcd.spec("dmfabric-admin");
    ctl(&admin, &["add", "server", "--id", "1", "--mac", "02:00:00:00:00:11", "--role", "io"]);
    ctl(&admin, &["add", "client", "--id", "3", "--mac", "02:00:00:00:00:03"]);
    ctl(&admin, &["add", "vm", "--id", "30", "--client", "3"]);
    let device = |id: &str| {
        let args = ["add", "device", "--id", id, "--kind", "regfile", "--server", "1", "--vm", "30", "--pio"];
        let pio = format!("0x{:x}:0x10", 0x500 + 0x10 * id.parse::<u32>().unwrap());
        ctl(&admin, &[&args[..], &[pio.as_str()]].concat())
    };
    device("1");
    ctl(&admin, &["etcd-auth"]);
    // Never polls: whatever the watches see, etcd pushed.
    let never = Duration::from_secs(3600);
    let follow = |user: &str, states: &'static str| {
        let w = Watch::start_with(store_as(&etcd, user), Follow::new(user, never).with_states(states), |_| None)
            .unwrap_or_else(|e| panic!("{user}: {e}"));
        let pokes = Arc::new(AtomicU64::new(0));
        let p = pokes.clone();
        w.on_poke(Box::new(move || {
            p.fetch_add(1, Ordering::SeqCst);
        }));
        (w, pokes)
    };
    let (server, server_pokes) = follow("dmfabric-server-1", "device/");
    let (client, client_pokes) = follow("dmfabric-client-3", "vm/");
    let within = |done: &dyn Fn() -> bool| {
        let end = Instant::now() + Duration::from_secs(20);
        while !done() && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(5));
        }
        done()
    };
    let before = server.routes().revision();
    device("2");
    for (who, w) in [("server", &server), ("client", &client)] {
        assert!(within(&|| w.routes().revision() > before), "{who} pushed the commit");
    }
    // Settled (a grant sync may bump the revision once more): then a
    // state put pokes without a new revision.
    std::thread::sleep(Duration::from_millis(300));
    let revisions = (server.routes().revision(), client.routes().revision());
    let (s, c) = (server_pokes.load(Ordering::SeqCst), client_pokes.load(Ordering::SeqCst));
    store_as(&etcd, "dmfabric-server-1").put_state("device/1", b"registers").unwrap();
    assert!(within(&|| server_pokes.load(Ordering::SeqCst) > s), "the server pushed a device state");
    store_as(&etcd, "dmfabric-client-3").put_state("vm/30", b"memory").unwrap();
    assert!(within(&|| client_pokes.load(Ordering::SeqCst) > c), "the client pushed a VM state");
    assert_eq!((server.routes().revision(), client.routes().revision()), revisions, "states are not revisions");
    assert!(server.pushed() && client.pushed(), "no watch was refused");
    assert_eq!(server.health().errors.load(Ordering::Relaxed) + client.health().errors.load(Ordering::Relaxed), 0);
}
