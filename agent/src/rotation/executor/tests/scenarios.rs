//! The rotation scenarios, in paused time.

use super::*;

#[tokio::test(start_paused = true)]
async fn issues_installs_removes_and_restarts_without_reissue() {
    let (tmp, config, fake, node) = setup(vec![entry("web"), entry("db")]);
    let run = start(&fake, &config, &node);
    until(&run.cache, "both issued", all_issued(2)).await;
    assert_eq!(run.cache.current().svids.len(), 2);
    let volume = Volume::new(&config.volume_dir);
    for id in ["web", "db"] {
        let disk = volume.load(id).expect("load").expect("installed");
        assert!(
            fake.with(|s| s.good_leaves.contains(&disk.chain[0])),
            "{id}: the issued leaf"
        );
    }
    assert!(run.cache.status().all_attempted);

    // The holder drops `db`: its folder goes, `web` stays.
    fake.with(|s| s.entries.retain(|e| e.id != "db"));
    run.send(Command::SyncNow).await;
    until(&run.cache, "db removed", all_issued(1)).await;
    assert!(!volume.entry_path("db").exists());
    assert!(volume.entry_path("web").exists());
    let signed = fake.with(|s| s.signed);
    run.stop().await;

    // Restart with the holder down: the SVID on disk is served at once, not re-issued.
    fake.with(|s| s.down = true);
    let run = start(&fake, &config, &node);
    until(&run.cache, "served from disk", all_issued(1)).await;
    assert_eq!(run.cache.current().svids.len(), 1);
    fake.with(|s| s.down = false);
    run.send(Command::SyncNow).await;
    until(&run.cache, "connected", |s| s.ca_connected).await;
    assert_eq!(fake.with(|s| s.signed), signed, "nothing re-issued");
    assert!(run.installs.lock().expect("lock").installs.is_empty());
    run.stop().await;
    drop(tmp);
}

/// A new owner gets a new key at once; a hook in the holder's entry is stripped and shown in
/// the status, never run.
#[tokio::test(start_paused = true)]
async fn a_new_owner_gets_a_new_key_and_a_holder_hook_is_stripped() {
    let (tmp, config, fake, node) = setup(vec![entry("web")]);
    let run = start(&fake, &config, &node);
    until(&run.cache, "issued", all_issued(1)).await;
    let first = run.cache.status().identities[0].serial.clone();
    assert!(run.cache.status().warnings.is_empty());
    let volume = Volume::new(&config.volume_dir);
    let first_key = volume.load("web").expect("load").expect("installed").key;

    let planted = tmp.path().join("planted");
    let (uid, gid) = crate::sys::current_owner();
    fake.with(|s| {
        let web = &mut s.entries[0];
        web.owner = Some(meshcert_protocol::Owner { uid, gid });
        web.hook = Some(meshcert_protocol::Hook {
            pid_file: None,
            signal: None,
            command: vec!["touch".into(), planted.display().to_string()],
            timeout: None,
        });
    });
    run.send(Command::SyncNow).await;
    until(&run.cache, "a new key for the new owner", |s| {
        s.identities.len() == 1
            && s.identities[0].state == CertState::Issued
            && s.identities[0].serial != first
    })
    .await;
    let status = run.cache.status();
    assert_eq!(status.warnings.len(), 1, "{:?}", status.warnings);
    assert!(status.warnings[0].contains("web"), "{:?}", status.warnings);
    let disk = volume.load("web").expect("load").expect("installed");
    assert_ne!(
        disk.key.pkcs8_der(),
        first_key.pkcs8_der(),
        "a new key on disk"
    );
    run.stop().await;
    assert!(!planted.exists(), "the holder's hook ran");
}

/// A sync or signing task that panics is a failed call, retried with backoff.
#[tokio::test(start_paused = true)]
async fn a_panicking_task_is_a_failed_call_and_is_retried() {
    let (_tmp, config, fake, node) = setup(vec![entry("web")]);
    // The first sync panics, then (after the retried sync) the first signing call.
    fake.with(|s| s.panics = 2);
    let run = start(&fake, &config, &node);
    until(&run.cache, "issued after the failures", all_issued(1)).await;
    assert_eq!(fake.with(|s| s.panics), 0, "both panics happened");
    assert!(fake.with(|s| s.syncs) >= 2, "the sync was retried");
    run.stop().await;
}

#[tokio::test(start_paused = true)]
async fn refusals_back_off_and_are_reported() {
    let (_tmp, config, fake, node) = setup(vec![entry("web"), entry("other")]);
    fake.with(|s| s.refuse.insert("other".into()));
    let run = start(&fake, &config, &node);
    until(&run.cache, "refusal counted twice", |s| {
        s.identities
            .iter()
            .any(|i| &*i.entry_id == "other" && i.state == CertState::Failed && i.attempts >= 2)
    })
    .await;
    let status = run.cache.status();
    let other = status
        .identities
        .iter()
        .find(|i| &*i.entry_id == "other")
        .expect("other");
    assert!(
        other
            .last_error
            .as_deref()
            .unwrap_or("")
            .contains("not_assigned")
    );
    assert!(!volume_has(&config, "other"));
    assert_eq!(run.cache.current().svids.len(), 1, "only web is served");
    assert_eq!(
        status.ca_unreachable_since, None,
        "a refusal is not an outage"
    );
    assert_eq!(fake.with(|s| s.probes), 0);
    run.stop().await;
}

/// The holder goes down while short-lived SVIDs expire: nothing is backed off, the expiries
/// are listed, the agent probes no more often than every PROBE_MIN, and the first answer
/// sends every due entry at once.
#[tokio::test(start_paused = true)]
async fn an_outage_backs_nothing_off_and_ends_at_the_first_probe() {
    use crate::reachability::PROBE_MIN;
    let (_tmp, config, fake, node) = setup(vec![entry("web"), entry("db")]);
    fake.with(|s| s.ttl = Duration::from_secs(2));
    let run = start(&fake, &config, &node);
    until(&run.cache, "both issued", all_issued(2)).await;
    let before: Vec<_> = run
        .cache
        .status()
        .identities
        .iter()
        .map(|i| i.serial.clone())
        .collect();

    fake.with(|s| s.down = true);
    let down_at = tokio::time::Instant::now();
    until(&run.cache, "both expired during the outage", |s| {
        s.ca_unreachable_since.is_some() && s.expired_while_unreachable.len() == 2
    })
    .await;
    // Two more probe periods of paused time: the agent waits for the holder, no backoff.
    tokio::time::sleep(PROBE_MIN * 2).await;
    let status = run.cache.status();
    assert!(!status.ca_connected);
    assert!(
        run.cache.current().svids.is_empty(),
        "expired SVIDs are not served"
    );
    let state = config
        .volume_dir
        .join("web")
        .join(crate::volume::STATE_FILE);
    let text = std::fs::read_to_string(&state).expect("the state file");
    assert!(text.starts_with("EXPIRED "), "{text}");
    assert!(config.volume_dir.join("web").join("svid.pem").exists());
    for i in status.identities.iter() {
        assert_eq!(i.attempts, 0, "{} was backed off: {i:?}", i.entry_id);
        assert!(i.not_after.is_none());
    }
    let probes = fake.with(|s| s.probes);
    let elapsed = down_at.elapsed();
    let bound = (elapsed.as_secs_f64() / PROBE_MIN.as_secs_f64()).ceil() as u32 + 1;
    assert!(
        (1..=bound).contains(&probes),
        "{probes} probes in {elapsed:?}"
    );

    fake.with(|s| s.down = false);
    until(&run.cache, "both issued again after the outage", |s| {
        all_issued(2)(s)
            && s.ca_unreachable_since.is_none()
            && s.expired_while_unreachable.is_empty()
            && s.identities
                .iter()
                .zip(&before)
                .all(|(i, b)| i.serial != *b)
    })
    .await;
    assert!(!state.exists(), "a fresh SVID clears the expired state");
    run.stop().await;
}

/// A holder that answers `unavailable` to a whole signing call cannot serve: an outage
/// (probed, nothing backed off), not a refusal of the entries.
#[tokio::test(start_paused = true)]
async fn a_holder_answering_unavailable_is_an_outage_not_a_refusal() {
    let (_tmp, config, fake, node) = setup(vec![entry("web")]);
    fake.with(|s| s.unavailable = true);
    let run = start(&fake, &config, &node);
    until(&run.cache, "an outage seen", |s| {
        s.ca_unreachable_since.is_some()
            && s.identities.iter().any(|i| {
                i.state == CertState::Failed
                    && i.attempts == 0
                    && i.last_error
                        .as_deref()
                        .is_some_and(|e| e.contains("waiting for the CA holder"))
            })
    })
    .await;
    fake.with(|s| s.unavailable = false);
    until(&run.cache, "issued once the holder serves", |s| {
        all_issued(1)(s) && s.ca_unreachable_since.is_none()
    })
    .await;
    assert!(
        fake.with(|s| s.probes) >= 1,
        "the return was seen by a probe"
    );
    run.stop().await;
}

/// An agent whose SVIDs are all healthy sends nothing but its normal sync while the holder is
/// down.
#[tokio::test(start_paused = true)]
async fn an_idle_agent_does_not_probe_a_holder_that_is_down() {
    use crate::reachability::PROBE_MAX;
    let (_tmp, config, fake, node) = setup(vec![entry("web")]);
    let run = start(&fake, &config, &node);
    until(&run.cache, "issued", all_issued(1)).await;
    fake.with(|s| s.down = true);
    run.send(Command::SyncNow).await;
    until(&run.cache, "the holder seen down", |s| {
        s.ca_unreachable_since.is_some()
    })
    .await;
    let syncs = fake.with(|s| s.syncs);
    let waited = PROBE_MAX + Duration::from_secs(1);
    assert!(waited < config.sync_interval);
    tokio::time::sleep(waited).await;
    assert_eq!(fake.with(|s| s.probes), 0, "no probe while nothing is due");
    assert_eq!(fake.with(|s| s.syncs), syncs, "no sync before syncInterval");
    let now = fake
        .clock
        .now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("now")
        .as_secs();
    assert!(run.cache.status().is_ready(now));
    run.stop().await;
}

#[tokio::test(start_paused = true)]
async fn short_lived_svids_rotate_and_deleted_files_come_back() {
    let (_tmp, config, fake, node) = setup(vec![entry("web")]);
    fake.with(|s| s.ttl = Duration::from_secs(2));
    let run = start(&fake, &config, &node);
    until(&run.cache, "issued", all_issued(1)).await;
    let first = run.cache.status().identities[0].serial.clone();
    until(&run.cache, "rotated", |s| {
        s.identities.first().and_then(|i| i.serial.clone()) != first
            && s.identities.iter().all(|i| i.state == CertState::Issued)
    })
    .await;
    // Deleted by someone else: restored at the next periodic check.
    let link = config.volume_dir.join("web").join("svid.pem");
    std::fs::remove_file(&link).expect("rm");
    tokio::time::sleep(VOLUME_CHECK_EVERY + Duration::from_secs(1)).await;
    assert!(link.exists(), "svid.pem was not restored");
    run.stop().await;
}

#[tokio::test(start_paused = true)]
async fn finished_tasks_are_freed_as_rotations_go_on() {
    let mut web = entry("web");
    // A hook adds one more task per install.
    web.hook = Some(meshcert_protocol::Hook {
        pid_file: None,
        signal: None,
        command: vec!["true".into()],
        timeout: Some(Duration::from_secs(5)),
    });
    let (_tmp, mut config, fake, node) = setup(vec![]);
    config.entries = vec![web];
    fake.with(|s| {
        s.ttl = Duration::from_secs(2);
        s.enforcement = Enforcement::Disabled;
        s.local_refusal = local_decision(Enforcement::Disabled);
    });
    let run = start(&fake, &config, &node);
    // Seven rotations and as many hooks and syncs: each started a task.
    tokio::time::timeout(Duration::from_secs(600), async {
        while fake.with(|s| s.local_requests) < 7 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("rotations go on");
    let held = run.stop().await;
    assert!(held <= 3, "{held} tasks still held after 7 signatures");
}

#[tokio::test(start_paused = true)]
async fn gateways_get_a_second_svid_to_the_shared_root() {
    let mut gw = entry("gw");
    gw.gateway = true;
    let (_tmp, config, fake, node) = setup(vec![gw, entry("web")]);
    let run = start(&fake, &config, &node);
    until(&run.cache, "both issued", all_issued(2)).await;
    let snapshot = run.cache.current();
    let hints: Vec<&str> = snapshot.svids.iter().map(|s| s.hint.as_str()).collect();
    assert_eq!(hints, ["gw", GATEWAY_HINT, "web"]);
    let gateway = &snapshot.svids[1];
    svid::check(
        &gateway.chain(),
        &PrivateKey::from_pkcs8(gateway.key_pkcs8.to_vec()).expect("key"),
        std::slice::from_ref(&fake.shared.root),
        &gateway.spiffe_id,
        fake.clock.now(),
    )
    .expect("the second SVID chains to the shared root");
    let volume = Volume::new(&config.volume_dir);
    let disk = volume.load("gw").expect("load").expect("present");
    assert_eq!(disk.gateway_chain.as_ref(), Some(&gateway.chain()));
    let web = volume.load("web").expect("load").expect("present");
    assert!(web.gateway_chain.is_none());
    run.stop().await;
}

#[tokio::test(start_paused = true)]
async fn local_entries_follow_the_holders_enforcement_mode() {
    let (_tmp, mut config, fake, node) = setup(vec![entry("web")]);
    let mut tool = entry("tool");
    tool.nodes = vec![];
    config.entries = vec![tool];
    let mode = |m: Enforcement| {
        fake.with(|s| {
            s.enforcement = m;
            s.local_refusal = local_decision(m);
        });
    };
    mode(Enforcement::Disabled);
    let run = start(&fake, &config, &node);
    until(&run.cache, "web and the local entry issued", all_issued(2)).await;
    assert!(volume_has(&config, "tool"));

    // ENABLED: the local SVID stops being served at once, and the holder's refusal shows.
    mode(Enforcement::Enabled);
    run.send(Command::SyncNow).await;
    until(&run.cache, "the local entry refused", |s| {
        s.identities.iter().any(|i| {
            &*i.entry_id == "tool"
                && i.state == CertState::Failed
                && i.last_error
                    .as_deref()
                    .is_some_and(|e| e.contains("policy_denied"))
        })
    })
    .await;
    assert!(!volume_has(&config, "tool"));
    let served: Vec<String> = run
        .cache
        .current()
        .svids
        .iter()
        .map(|s| s.hint.clone())
        .collect();
    assert_eq!(served, ["web"]);
    // Not asked again while the mode stays (the backoff would have retried by now).
    let asked = fake.with(|s| s.local_requests);
    for _ in 0..3 {
        run.send(Command::SyncNow).await;
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    assert_eq!(fake.with(|s| s.local_requests), asked);

    // DISABLED again: asked for at once and served.
    mode(Enforcement::Disabled);
    run.send(Command::SyncNow).await;
    until(&run.cache, "the local entry issued again", all_issued(2)).await;
    assert!(volume_has(&config, "tool"));
    run.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_replaced_mesh_root_has_every_svid_issued_again() {
    let (_tmp, config, fake, node) = setup(vec![entry("web")]);
    let run = start(&fake, &config, &node);
    until(&run.cache, "issued", all_issued(1)).await;
    let first = run.cache.status().identities[0].serial.clone();

    fake.with(|s| s.rotated = true);
    run.send(Command::SyncNow).await;
    until(&run.cache, "issued again under the new root", |s| {
        s.bundle_version == 2
            && s.identities
                .first()
                .is_some_and(|i| i.serial != first && i.state == CertState::Issued)
    })
    .await;
    let disk = Volume::new(&config.volume_dir)
        .load("web")
        .expect("load")
        .expect("installed");
    svid::check(
        &disk.chain,
        &disk.key,
        std::slice::from_ref(&fake.rotated_ca.root),
        &SpiffeId::new(&format!("spiffe://{TD}/web")).expect("id"),
        fake.clock.now(),
    )
    .expect("the SVID on disk verifies against the new root");
    run.stop().await;
}

/// An SVID that does not chain to the bundle is never written; every install writes a leaf
/// the holder issued from a CA in the bundle.
#[tokio::test(start_paused = true)]
async fn every_install_follows_a_passing_check() {
    let (_tmp, config, fake, node) = setup(vec![entry("web"), entry("forged")]);
    fake.with(|s| s.forge.insert("forged".into()));
    let run = start(&fake, &config, &node);
    until(&run.cache, "the forged SVID refused twice", |s| {
        s.identities.iter().any(|i| {
            &*i.entry_id == "forged"
                && i.attempts >= 2
                && i.last_error
                    .as_deref()
                    .is_some_and(|e| e.contains("does not check out"))
        }) && s
            .identities
            .iter()
            .any(|i| &*i.entry_id == "web" && i.state == CertState::Issued)
    })
    .await;
    let installs = std::mem::take(&mut run.installs.lock().expect("lock").installs);
    assert!(!installs.is_empty());
    for (dir, leaf) in &installs {
        assert_ne!(dir, "forged", "an SVID that failed its check was written");
        assert!(
            fake.with(|s| s.good_leaves.contains(leaf)),
            "{dir}: a leaf not issued"
        );
    }
    assert!(!volume_has(&config, "forged"));
    run.stop().await;
}

/// A write that fails keeps the previous SVID served (and on disk); the next retry installs.
#[tokio::test(start_paused = true)]
async fn a_failed_write_keeps_the_old_svid_served() {
    let (_tmp, config, fake, node) = setup(vec![entry("web")]);
    fake.with(|s| s.ttl = Duration::from_secs(100));
    let run = start(&fake, &config, &node);
    until(&run.cache, "issued", all_issued(1)).await;
    let first = run.cache.current().svids[0].leaf.clone();
    run.installs.lock().expect("lock").fail_writes = true;
    until(&run.cache, "a rotation failed to write", |s| {
        s.identities.iter().any(|i| {
            i.state == CertState::Failed
                && i.last_error
                    .as_deref()
                    .is_some_and(|e| e.contains("cannot install"))
        })
    })
    .await;
    let served = run.cache.current();
    assert_eq!(served.svids.len(), 1, "the old SVID is still served");
    assert_eq!(served.svids[0].leaf, first);
    let disk = Volume::new(&config.volume_dir)
        .load("web")
        .expect("load")
        .expect("on disk");
    assert_eq!(disk.chain[0], first, "the old SVID is still on disk");

    run.installs.lock().expect("lock").fail_writes = false;
    until(&run.cache, "rotated once writes work", |s| {
        all_issued(1)(s) && s.identities[0].attempts == 0
    })
    .await;
    assert_ne!(run.cache.current().svids[0].leaf, first);
    run.stop().await;
}

/// READY goes to systemd once, after every identity was attempted; later changes only update
/// the status line.
#[tokio::test(start_paused = true)]
async fn ready_is_sent_once() {
    let (_tmp, config, fake, node) = setup(vec![entry("web"), entry("db")]);
    fake.with(|s| s.ttl = Duration::from_secs(4));
    let run = start(&fake, &config, &node);
    until(&run.cache, "both issued", all_issued(2)).await;
    // Rotations, a removed entry, a reload.
    tokio::time::sleep(Duration::from_secs(10)).await;
    fake.with(|s| s.entries.retain(|e| e.id != "db"));
    run.send(Command::SyncNow).await;
    until(&run.cache, "db removed", all_issued(1)).await;
    run.send(Command::Reload(Box::new(config.clone()))).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let notified = run.notified.lock().expect("lock").clone();
    let ready: Vec<&Notify> = notified
        .iter()
        .filter(|n| matches!(n, Notify::Ready(_)))
        .collect();
    assert_eq!(
        ready,
        [&Notify::Ready("2/2 SVIDs issued".into())],
        "{notified:?}"
    );
    assert!(matches!(
        notified.first(),
        Some(Notify::Status(_)) | Some(Notify::Ready(_))
    ));
    assert!(
        notified.contains(&Notify::Status("1/1 SVIDs issued".into())),
        "{notified:?}"
    );
    run.stop().await;
}
