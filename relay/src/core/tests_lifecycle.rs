//! Device lifecycle in the relay core: coarse last-seen writes, the stale
//! annotation of fetched lists, `Retired`, and removal by a newer list.

use super::*;

/// `Hello` + `Auth` of `d` at `at`: the actions of the `Auth`.
fn auth_at(core: &RelayCore<MemoryStore>, d: &Device, at: u64) -> (Session, Vec<Action>) {
    let mut s = core.new_session(at);
    let c =
        challenge_of(&core.handle(&mut s, req(1, Request::Hello { device: d.id }), at, [5; 32]));
    let actions = core.handle(
        &mut s,
        req(
            2,
            Request::Auth {
                signature: d.sign_challenge(&c),
            },
        ),
        at,
        [0; 32],
    );
    (s, actions)
}

fn stale_config(stale_after_ms: u64) -> CoreConfig {
    CoreConfig {
        stale_after_ms,
        ..default_config()
    }
}

fn retired(actions: &[Action]) -> Option<u64> {
    actions.iter().find_map(|a| match a {
        Action::Send(Outbound::Frame(ServerFrame::Retired { last_seen_ms })) => Some(*last_seen_ms),
        _ => None,
    })
}

#[test]
fn last_seen_is_written_coarsely_and_a_stale_device_is_told_it_was_retired() {
    // Stale after 10 s: last-seen is written at most every 1.25 s.
    let core = core_with(stale_config(10_000));
    let alice = Device::new(1, 1);
    register(&core, &alice, [1; 32]);
    let seen = |c: &RelayCore<MemoryStore>| c.store().device_last_seen(&alice.id).unwrap();
    assert_eq!(seen(&core), Some(NOW));
    let (_, a) = auth_at(&core, &alice, NOW + 1_000);
    assert_eq!(retired(&a), None);
    assert_eq!(seen(&core), Some(NOW), "written within the granularity");
    let (_, a) = auth_at(&core, &alice, NOW + 2_000);
    assert_eq!(retired(&a), None);
    assert_eq!(seen(&core), Some(NOW + 2_000));
    // Away for the stale period: authenticated, then told.
    let (s, a) = auth_at(&core, &alice, NOW + 12_000);
    assert!(s.device().is_some());
    assert!(matches!(
        frame(&a),
        ServerFrame::Response {
            response: Response::Authenticated(_),
            ..
        }
    ));
    assert_eq!(retired(&a), Some(NOW + 2_000));
    assert_eq!(seen(&core), Some(NOW + 12_000), "the lease is fresh again");
    let (_, a) = auth_at(&core, &alice, NOW + 13_000);
    assert_eq!(retired(&a), None);
}

#[test]
fn fetched_leases_annotate_the_signed_list_with_stale_devices() {
    let core = core_with(stale_config(10_000));
    let (a1, a2) = (Device::new(1, 1), Device::new(2, 1));
    let mut s1 = register(&core, &a1, [1; 32]);
    register(&core, &a2, [2; 32]);
    let user = a1.user_key();
    let list = a1.list_of(1, vec![a1.entry_for(&user), a2.entry_for(&user)]);
    core.handle(
        &mut s1,
        req(3, Request::PublishDeviceList { list: list.clone() }),
        NOW,
        [0; 32],
    );
    // a1 comes back after the stale period; a2 does not.
    let (mut s1, _) = auth_at(&core, &a1, NOW + 20_000);
    let a = core.handle(
        &mut s1,
        req(4, Request::FetchDeviceLeases { user }),
        NOW + 20_000,
        [0; 32],
    );
    match frame(&a) {
        ServerFrame::Response {
            response: Response::DeviceLeases { list: got, leases },
            ..
        } => {
            assert_eq!(got, list, "the signed list as stored");
            assert_eq!(leases.len(), 2);
            assert_eq!(leases[0].device, a1.id);
            assert!(!leases[0].stale);
            assert_eq!(leases[0].last_seen_ms, NOW + 20_000);
            assert_eq!(leases[1].device, a2.id);
            assert!(leases[1].stale);
            assert_eq!(leases[1].last_seen_ms, NOW);
        }
        other => panic!("{other:?}"),
    }
    core.refresh_leases(NOW + 20_000);
    assert_eq!(Metrics::get(&core.metrics().devices_stale), 1);
}

/// Attack: a device its user removed tries to keep reading: it
/// authenticates, registers again with its valid certificate, and peers
/// fetch its prekeys. All are refused with `DeviceRemoved`, and its inbox
/// (with what was queued for it) is gone.
#[test]
fn a_newer_list_dropping_a_device_frees_its_inbox_and_refuses_it() {
    let core = core_with(default_config());
    let (a1, a2, bob) = (Device::new(1, 1), Device::new(2, 1), Device::new(3, 3));
    let mut s1 = register(&core, &a1, [1; 32]);
    register(&core, &a2, [2; 32]);
    let mut sb = register(&core, &bob, [3; 32]);
    let user = a1.user_key();
    let v1 = a1.list_of(1, vec![a1.entry_for(&user), a2.entry_for(&user)]);
    core.handle(
        &mut s1,
        req(3, Request::PublishDeviceList { list: v1 }),
        NOW,
        [0; 32],
    );
    let queued = envelope(&bob, &a2, 1, 100);
    core.store()
        .commit(&[NewEnvelope {
            recipient: a2.id,
            sender: bob.id,
            message_id: queued.header.message_id,
            conversation: queued.header.conversation_id,
            sender_seq: 1,
            bytes: queued.to_bytes().unwrap(),
            expires_at_ms: NOW + 1_000_000,
        }])
        .unwrap();
    assert_eq!(core.store().inbox_state(&a2.id).unwrap().depth, 1);

    let v2 = a1.list_of(2, vec![a1.entry_for(&user)]);
    let a = core.handle(
        &mut s1,
        req(4, Request::PublishDeviceList { list: v2 }),
        NOW,
        [0; 32],
    );
    assert!(matches!(
        frame(&a),
        ServerFrame::Response {
            response: Response::DeviceListPublished { version: 2 },
            ..
        }
    ));
    assert_eq!(
        core.store().inbox_state(&a2.id).unwrap(),
        Default::default()
    );
    assert_eq!(core.store().total_depth().unwrap(), 0);
    assert_eq!(Metrics::get(&core.metrics().devices_removed_total), 1);
    // The connection layer is told to cut the removed device's session.
    assert!(a.contains(&Action::Evict(a2.id)), "{a:?}");

    let (s, a) = auth_at(&core, &a2, NOW + 1);
    assert_eq!(error_code(&a), ErrorCode::DeviceRemoved);
    assert!(s.device().is_none());
    let mut s = core.new_session(NOW);
    let c = challenge_of(&core.handle(
        &mut s,
        req(1, Request::Hello { device: a2.id }),
        NOW,
        [7; 32],
    ));
    let a = core.handle(
        &mut s,
        req(
            2,
            Request::Register {
                registration: a2.registration(),
                signature: a2.sign_challenge(&c),
            },
        ),
        NOW,
        [0; 32],
    );
    assert_eq!(error_code(&a), ErrorCode::DeviceRemoved);
    let a = core.handle(
        &mut sb,
        req(5, Request::FetchPrekeys { device: a2.id }),
        NOW,
        [0; 32],
    );
    assert_eq!(error_code(&a), ErrorCode::DeviceRemoved);
    // a1 is untouched.
    let (s, _) = auth_at(&core, &a1, NOW + 2);
    assert_eq!(s.device(), Some(a1.id));
}
