//! `hush group` end to end: three users on a real relay, real `hush`
//! processes, 127.0.0.1.
//!
//! - Two members write to a group in turns and concurrently while the third
//!   member runs no command at all; afterwards every member's `hush history
//!   NAME --json` lists the same messages in the same order, and the author
//!   sees delivered/read per member.
//! - A member removed from the group receives nothing sent after the
//!   removal, while the remaining member does.
//! - Names: a bare name that is both a contact's and a group's is refused
//!   (never guessed), `#NAME` picks the group; a new group or contact may
//!   not take a name that is already used.
//! - A hostile member's group name cannot drive the victim's terminal.
//! - The relay (logging at trace) stores and logs no group name, new name
//!   or text, and not the group id (which would tell it who is in the
//!   group), through create, add, rename and remove, while it does hold
//!   the streams' pseudonyms; `listen --json`
//!   prints group messages with the group in `conversation` and the sender
//!   in `from`, under the new name after a rename; a member who leaves is
//!   no longer listed by the others.

// Helpers outside #[test] functions assert too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use hush_tests::RelayProcess;
use hush_tests::cli::{CliOutput, Hush, of_type, pair, texts};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// `history NAME --json` of a group: the message objects.
async fn group_history(h: &Hush, name: &str) -> Vec<Value> {
    h.history(name, 1000).await.unwrap()
}

fn ids(messages: &[Value]) -> Vec<String> {
    messages
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect()
}

fn position(texts: &[String], t: &str) -> usize {
    texts
        .iter()
        .position(|x| x == t)
        .unwrap_or_else(|| panic!("{t:?} missing from {texts:?}"))
}

async fn send(h: &Hush, to: &str, text: &str) {
    let out = h.run_ok(&["send", to, text]).await.unwrap();
    assert!(out.stdout.starts_with("stored "), "send: {}", out.stdout);
}

fn failed_with(out: &CliOutput, code: i32, needle: &str) {
    assert_eq!(
        out.code(),
        Some(code),
        "exit status; stdout {} stderr {}",
        out.stdout,
        out.stderr
    );
    assert!(
        out.stderr.contains(needle),
        "stderr should name {needle:?}: {}",
        out.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_see_one_order_and_a_removed_member_sees_nothing_after_removal() {
    let relay = RelayProcess::spawn_temp(&[]).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (alice, bob) = pair(&relay, dir.path()).await.unwrap();
    let carol = Hush::new(dir.path(), "carol").unwrap();
    carol.init(&relay, "carol").await.unwrap();
    let carol_code = carol.code().await.unwrap();
    alice.add_contact("carol", &carol_code).await.unwrap();
    bob.add_contact("carol", &carol_code).await.unwrap();
    carol
        .add_contact("alice", &alice.code().await.unwrap())
        .await
        .unwrap();
    carol
        .add_contact("bob", &bob.code().await.unwrap())
        .await
        .unwrap();

    // From here on carol runs nothing until the end: offline through it all.
    alice
        .run_ok(&["group", "create", "team", "bob", "carol"])
        .await
        .unwrap();
    send(&alice, "team", "a1").await;
    send(&alice, "#team", "a2").await;

    // bob learns of the group and reads what alice wrote so far.
    let got = bob.sync_messages().await.unwrap();
    assert_eq!(texts(&got), ["a1", "a2"], "bob's sync: {got:?}");
    for m in &got {
        assert_eq!(m["conversation"], "team");
        assert_eq!(m["group"], true);
        assert_eq!(m["from"], "alice");
        assert_eq!(m["outgoing"], false);
    }
    let list = bob.run_ok(&["group", "list", "--json"]).await.unwrap();
    let groups = of_type(&list.json_lines(), "group");
    assert_eq!(groups.len(), 1, "bob's groups: {groups:?}");
    assert_eq!(groups[0]["name"], "team");
    assert_eq!(groups[0]["active"], true);
    assert_eq!(groups[0]["members"].as_array().unwrap().len(), 3);

    // Now both write without reading each other first: b1 and a3 are
    // concurrent, and so are b2 and a4.
    send(&bob, "team", "b1").await;
    send(&alice, "team", "a3").await;
    send(&bob, "team", "b2").await;
    send(&alice, "team", "a4").await;

    // Everyone catches up, carol for the first time.
    alice.run_ok(&["sync"]).await.unwrap();
    bob.run_ok(&["sync"]).await.unwrap();
    let carol_got = carol.sync_messages().await.unwrap();
    let mut carol_texts = texts(&carol_got);
    carol_texts.sort();
    assert_eq!(
        carol_texts,
        ["a1", "a2", "a3", "a4", "b1", "b2"],
        "carol receives every message once"
    );

    let a = group_history(&alice, "team").await;
    let b = group_history(&bob, "team").await;
    let c = group_history(&carol, "team").await;
    assert_eq!(a.len(), 6, "alice's history: {:?}", texts(&a));
    assert_eq!(ids(&a), ids(&b), "alice and bob show the same order");
    assert_eq!(ids(&a), ids(&c), "alice and carol show the same order");
    let order = texts(&a);
    // Each sender's own order, and what bob had read before writing b1.
    for (x, y) in [
        ("a1", "a2"),
        ("a2", "a3"),
        ("a3", "a4"),
        ("b1", "b2"),
        ("a2", "b1"),
    ] {
        assert!(
            position(&order, x) < position(&order, y),
            "{x} before {y}: {order:?}"
        );
    }
    for m in &c {
        let from = if m["text"].as_str().unwrap().starts_with('a') {
            "alice"
        } else {
            "bob"
        };
        assert_eq!(m["from"], from, "carol sees the author: {m}");
    }

    // The author sees per-member states: carol's and bob's devices stored
    // every message (their receipts reach alice with her next sync).
    alice.run_ok(&["sync"]).await.unwrap();
    let a = group_history(&alice, "team").await;
    for m in a.iter().filter(|m| m["outgoing"] == true) {
        let members = m["members"].as_array().expect("members on own messages");
        let mut names: Vec<&str> = members
            .iter()
            .map(|x| x["name"].as_str().unwrap())
            .collect();
        names.sort_unstable();
        assert_eq!(names, ["bob", "carol"], "{m}");
        for x in members {
            assert!(
                x["state"] == "delivered" || x["state"] == "read",
                "every member's device stored {}: {m}",
                m["text"]
            );
        }
    }
    assert!(
        a.iter()
            .filter(|m| m["outgoing"] == false)
            .all(|m| m.get("members").is_none()),
        "members only on own messages"
    );

    // alice removes bob; what she sends afterwards reaches carol, not bob.
    alice
        .run_ok(&["group", "remove", "team", "bob"])
        .await
        .unwrap();
    send(&alice, "team", "after the removal").await;
    let carol_got = carol.sync_messages().await.unwrap();
    assert_eq!(texts(&carol_got), ["after the removal"]);
    let bob_got = bob.sync_messages().await.unwrap();
    assert!(
        !texts(&bob_got).iter().any(|t| t == "after the removal"),
        "bob was removed: {bob_got:?}"
    );
    let b = group_history(&bob, "team").await;
    assert_eq!(texts(&b).len(), 6, "bob keeps what he had, nothing more");
    let list = bob.run_ok(&["group", "list", "--json"]).await.unwrap();
    let groups = of_type(&list.json_lines(), "group");
    assert_eq!(groups[0]["active"], false, "bob is no longer a member");
    let c = group_history(&carol, "team").await;
    assert_eq!(
        texts(&c).last().map(String::as_str),
        Some("after the removal")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_and_contact_names_never_collide_silently() {
    let relay = RelayProcess::spawn_temp(&[]).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (alice, bob) = pair(&relay, dir.path()).await.unwrap();

    // A group may not take a contact's name, nor start with `#`.
    let out = alice.run(&["group", "create", "bob", "bob"]).await.unwrap();
    failed_with(&out, 1, "already the name of a contact or a group");
    let out = alice.run(&["group", "create", "#x", "bob"]).await.unwrap();
    failed_with(&out, 1, "must not start with `#`");
    let out = alice
        .run(&["group", "create", "x", "nobody"])
        .await
        .unwrap();
    failed_with(&out, 1, "unknown contact \"nobody\"");

    // On bob's side "alice" is a contact; alice names her group "alice".
    alice
        .run_ok(&["group", "create", "alice", "bob"])
        .await
        .unwrap();
    send(&alice, "#alice", "in the group").await;
    send(&alice, "bob", "one to one").await;
    let got = bob.sync_messages().await.unwrap();
    let mut got = texts(&got);
    got.sort();
    assert_eq!(got, ["in the group", "one to one"]);

    // A bare "alice" is now both: refused, never guessed.
    let out = bob.run(&["send", "alice", "which one?"]).await.unwrap();
    failed_with(&out, 1, "is both a contact and a group");
    let out = bob.run(&["history", "alice", "--json"]).await.unwrap();
    failed_with(&out, 1, "write `#alice` for the group");
    // `#alice` is the group.
    send(&bob, "#alice", "to the group").await;
    let group = bob.history("#alice", 10).await.unwrap();
    assert_eq!(texts(&group), ["in the group", "to the group"]);
    assert!(group.iter().all(|m| m["group"] == true));

    // A new contact may not take a group's name either.
    let out = alice
        .run(&["contact", "add", "alice", &bob.code().await.unwrap()])
        .await
        .unwrap();
    failed_with(&out, 1, "already the name of a contact or a group");
    // Unknown groups are named as groups.
    let out = bob.run(&["send", "#nope", "x"]).await.unwrap();
    failed_with(&out, 1, "unknown group \"nope\"");
}

/// A hostile member's client (the engine driven directly, as any modified
/// client could) names a group with terminal escape sequences and a line
/// break that forges a message line. The victim's `hush` prints the name
/// with those characters replaced: no escape byte reaches the terminal and
/// no forged line appears.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_name_from_a_hostile_member_cannot_drive_the_terminal() {
    use hush_cli::driver::{Discard, Driver, cli_engine_config, os_seed};
    use hush_cli::home::Home;
    use hush_client::{Command, Engine, Reply, Storage};

    let relay = RelayProcess::spawn_temp(&[]).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (mallory, bob) = pair(&relay, dir.path()).await.unwrap();
    let bob_user = {
        let code = bob.code().await.unwrap();
        hush_client::ContactCode::parse(&code).unwrap().user
    };

    // mallory's own client, not the CLI's checks.
    let evil = "team\u{1b}[2J\u{1b}[1;1H\nbob: forged line\u{7}";
    let group = {
        let home = Home::resolve(Some(mallory.home().to_path_buf())).unwrap();
        let storage = home.open_existing().unwrap();
        let cfg = cli_engine_config();
        let engine = Engine::load(
            storage.load_state().unwrap(),
            os_seed().unwrap(),
            cfg.clone(),
        )
        .unwrap();
        let target = home.load_relay(engine.relay()).unwrap();
        let mut d = Driver::new(engine, storage, cfg, target);
        let reply = d
            .command(
                Command::CreateGroup {
                    name: evil.into(),
                    members: vec![bob_user],
                },
                &mut Discard,
            )
            .await
            .unwrap();
        let Some(Reply::Group(id)) = reply else {
            panic!("no group: {reply:?}");
        };
        d.shutdown().await;
        id
    };
    send(
        &mallory,
        &format!("#{}", group.to_hex()),
        "hello from the group",
    )
    .await;

    for args in [
        &["sync"][..],
        &["group", "list"][..],
        &["group", "list", "--json"][..],
        &["history", &format!("#{}", group.to_hex())][..],
    ] {
        let out = bob.run_ok(args).await.unwrap();
        for (what, text) in [("stdout", &out.stdout), ("stderr", &out.stderr)] {
            assert!(
                !text.contains('\u{1b}') && !text.contains('\u{7}'),
                "hush {args:?} {what} holds a control character: {text:?}"
            );
            assert!(
                !text.lines().any(|l| l.starts_with("bob: forged line")),
                "hush {args:?} {what} holds a forged line: {text:?}"
            );
        }
    }
    let list = bob.run_ok(&["group", "list"]).await.unwrap();
    assert!(
        list.stdout.contains("#team\u{fffd}[2J"),
        "the name is shown, defused: {:?}",
        list.stdout
    );
}

/// A group brings in its members as contacts, under the names its creator
/// uses for them. mallory adds carol under the name "bob" and puts her in a
/// group with the victim, who knows the real bob as "bob": the victim now
/// has two contacts called "bob". `hush send bob …` is refused rather than
/// handed to whichever comes first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_brought_in_under_a_contacts_name_is_never_guessed() {
    let relay = RelayProcess::spawn_temp(&[]).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (victim, bob) = pair(&relay, dir.path()).await.unwrap();
    let mallory = Hush::new(dir.path(), "mallory").unwrap();
    mallory.init(&relay, "mallory").await.unwrap();
    let carol = Hush::new(dir.path(), "carol").unwrap();
    carol.init(&relay, "carol").await.unwrap();
    // pair() named them "alice" and "bob": the victim knows bob as "bob".
    victim
        .add_contact("mallory", &mallory.code().await.unwrap())
        .await
        .unwrap();
    mallory
        .add_contact("victim", &victim.code().await.unwrap())
        .await
        .unwrap();
    mallory
        .add_contact("bob", &carol.code().await.unwrap())
        .await
        .unwrap();
    mallory
        .run_ok(&["group", "create", "party", "bob", "victim"])
        .await
        .unwrap();
    victim.run_ok(&["sync"]).await.unwrap();

    let list = victim.run_ok(&["contact", "list", "--json"]).await.unwrap();
    let bobs = of_type(&list.json_lines(), "contact")
        .into_iter()
        .filter(|c| c["name"] == "bob")
        .count();
    assert_eq!(
        bobs, 2,
        "the group brought carol in as \"bob\": {}",
        list.stdout
    );

    let out = victim.run(&["send", "bob", "for bob only"]).await.unwrap();
    failed_with(&out, 1, "several contacts are called \"bob\"");
    let out = victim
        .run(&["group", "create", "mine", "bob"])
        .await
        .unwrap();
    failed_with(&out, 1, "several contacts are called \"bob\"");
    // Nothing reached either of them.
    assert!(bob.sync_messages().await.unwrap().is_empty());
    assert!(carol.sync_messages().await.unwrap().is_empty());
}

fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files_under(&path, out);
        } else {
            out.push(path);
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// A marker as raw bytes, as hex, and as a Debug-printed byte list.
fn encodings(marker: &str) -> Vec<Vec<u8>> {
    let b = marker.as_bytes();
    vec![
        b.to_vec(),
        hex::encode(b).into_bytes(),
        format!("{:?}", &b[..12]).into_bytes(),
    ]
}

/// A group id as raw bytes, as lower and upper case hex, and as a
/// Debug-printed byte list.
fn id_encodings(id: &[u8; 16]) -> Vec<Vec<u8>> {
    vec![
        id.to_vec(),
        hex::encode(id).into_bytes(),
        hex::encode_upper(id).into_bytes(),
        format!("{:?}", &id[..]).into_bytes(),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_sees_no_group_name_change_or_text_and_listen_names_the_group() {
    let mut relay = RelayProcess::spawn_temp_with_env(&[], &[("RUST_LOG", "trace")])
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (alice, bob) = pair(&relay, dir.path()).await.unwrap();
    let carol = Hush::new(dir.path(), "carol").unwrap();
    carol.init(&relay, "carol").await.unwrap();
    alice
        .add_contact("carol", &carol.code().await.unwrap())
        .await
        .unwrap();
    let tag = format!("{:08x}", std::process::id() ^ 0x5eed_1234);
    let name = format!("grpname{tag}");
    let renamed = format!("renamed{tag}");
    let text1 = format!("grouptext-one-{tag}");
    let text2 = format!("grouptext-two-{tag}");

    let mut listen = bob.spawn(&["listen", "--json"]).unwrap();
    alice
        .run_ok(&["group", "create", &name, "bob"])
        .await
        .unwrap();
    send(&alice, &name, &text1).await;
    listen
        .wait_for(
            Duration::from_secs(30),
            "bob's listen shows the group message",
            |l| {
                of_type(l, "message")
                    .iter()
                    .any(|m| m["text"] == text1.as_str())
            },
        )
        .await
        .unwrap();
    alice
        .run_ok(&["group", "add", &name, "carol"])
        .await
        .unwrap();
    alice
        .run_ok(&["group", "rename", &name, &renamed])
        .await
        .unwrap();
    alice
        .run_ok(&["group", "remove", &renamed, "carol"])
        .await
        .unwrap();
    send(&alice, &renamed, &text2).await;
    listen
        .wait_for(
            Duration::from_secs(30),
            "bob's listen shows the second message",
            |l| {
                of_type(l, "message")
                    .iter()
                    .any(|m| m["text"] == text2.as_str())
            },
        )
        .await
        .unwrap();
    let (_, stderr) = listen.stop().await.unwrap();
    let got = of_type(&listen.json(), "message");
    let m1 = got.iter().find(|m| m["text"] == text1.as_str()).unwrap();
    let m2 = got.iter().find(|m| m["text"] == text2.as_str()).unwrap();
    for (m, conv) in [(m1, &name), (m2, &renamed)] {
        assert_eq!(m["conversation"], conv.as_str(), "{m} ({stderr})");
        assert_eq!(m["from"], "alice", "{m}");
        assert_eq!(m["group"], true, "{m}");
    }
    let list = bob.run_ok(&["group", "list", "--json"]).await.unwrap();
    let groups = of_type(&list.json_lines(), "group");
    assert_eq!(groups.len(), 1, "{groups:?}");
    assert_eq!(groups[0]["name"], renamed.as_str());
    let group_id: [u8; 16] = hex::decode(groups[0]["id"].as_str().unwrap())
        .unwrap()
        .try_into()
        .unwrap();
    let device = |status: serde_json::Value| -> [u8; 16] {
        hex::decode(status["device"].as_str().unwrap())
            .unwrap()
            .try_into()
            .unwrap()
    };
    let alice_device = device(alice.status().await.unwrap());
    let bob_device = device(bob.status().await.unwrap());
    // What alice's envelopes to bob carry instead of the group id.
    let stream = hush_crypto::group_stream_id(&group_id, &alice_device, &bob_device).unwrap();
    assert_eq!(groups[0]["members"].as_array().unwrap().len(), 2);
    // bob leaves: he is no longer a member; alice learns it with her sync.
    bob.run_ok(&["group", "leave", &renamed]).await.unwrap();
    let list = bob.run_ok(&["group", "list", "--json"]).await.unwrap();
    assert_eq!(of_type(&list.json_lines(), "group")[0]["active"], false);
    alice.run_ok(&["sync"]).await.unwrap();
    let list = alice.run_ok(&["group", "list", "--json"]).await.unwrap();
    let groups = of_type(&list.json_lines(), "group");
    assert_eq!(groups[0]["active"], true);
    assert_eq!(
        groups[0]["members"].as_array().unwrap().len(),
        1,
        "alice is alone after bob left: {groups:?}"
    );

    // A clean stop flushes the relay's files and log; then neither any
    // file in its data directory nor its output holds a marker.
    relay.terminate().await.unwrap();
    let mut files = Vec::new();
    files_under(relay.data_dir(), &mut files);
    assert!(!files.is_empty());
    let mut blobs: Vec<(String, Vec<u8>)> = files
        .iter()
        .map(|f| (f.display().to_string(), std::fs::read(f).unwrap()))
        .collect();
    let log = relay.log_bytes().unwrap();
    assert!(!log.is_empty(), "the relay logged at trace");
    blobs.push(("relay output".into(), log));
    // The relay holds the streams' clear ids (the check below reads what
    // it stores), never the group id: not raw, not as hex, not printed.
    for enc in id_encodings(&group_id) {
        for (what, bytes) in &blobs {
            assert!(
                !contains(bytes, &enc),
                "{what} holds the group id ({})",
                String::from_utf8_lossy(&enc)
            );
        }
    }
    let seen = |enc: &[u8]| blobs.iter().any(|(_, bytes)| contains(bytes, enc));
    assert!(
        seen(&stream) || seen(hex::encode(stream).as_bytes()),
        "the relay's files and log hold alice's stream to bob"
    );
    for marker in [&name, &renamed, &text1, &text2] {
        for enc in encodings(marker) {
            for (what, bytes) in &blobs {
                assert!(
                    !contains(bytes, &enc),
                    "{what} holds {marker:?} ({})",
                    String::from_utf8_lossy(&enc)
                );
            }
        }
    }
}
