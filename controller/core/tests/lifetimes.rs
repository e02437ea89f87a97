//! No state outlives the process that created it: monitors, waiting
//! lookups and published names go when their process exits, and each is
//! bounded per process.

mod harness;

use fractos_core::{prometheus, Stats, Traffic};
use fractos_wire::{ErrorCode, Handle, ProcessMsg, Reply, Rights};
use harness::{handle, Net};

fn mem(net: &mut Net, p: usize, addr: u64, len: u64) -> Handle {
    handle(net.op(p, |op| ProcessMsg::MemoryCreate {
        op,
        addr,
        len,
        rights: Rights::READ,
    }))
}

fn req(net: &mut Net, p: usize, tag: u64) -> Handle {
    handle(net.op(p, |op| ProcessMsg::RequestCreate {
        op,
        tag,
        imms: Vec::new(),
        caps: Vec::new(),
    }))
}

fn publish(net: &mut Net, p: usize, name: &str, cap: Handle) -> Result<Reply, ErrorCode> {
    net.op(p, |op| ProcessMsg::Publish {
        op,
        name: name.as_bytes().to_vec(),
        cap,
    })
}

fn unpublish(net: &mut Net, p: usize, name: &str) -> Result<Reply, ErrorCode> {
    net.op(p, |op| ProcessMsg::Unpublish {
        op,
        name: name.as_bytes().to_vec(),
    })
}

fn lookup(net: &mut Net, p: usize, name: &str) -> Handle {
    handle(net.op(p, |op| ProcessMsg::Lookup {
        op,
        name: name.as_bytes().to_vec(),
        wait_ms: 0,
    }))
}

fn monitor(net: &mut Net, p: usize, cap: Handle, notify: Handle) -> Result<Reply, ErrorCode> {
    net.op(p, |op| ProcessMsg::Monitor { op, cap, notify })
}

fn stats(net: &Net) -> Vec<Stats> {
    net.ctrls.iter().map(|c| c.stats()).collect()
}

#[test]
fn monitors_of_an_exited_watcher_go_at_local_and_remote_owners() {
    let mut net = Net::new(2);
    // A remote owner (node 0) and a local one (node 1) for the watcher.
    let remote = net.attach(0, "remote-owner");
    let local = net.attach(1, "local-owner");
    let rm = mem(&mut net, remote, 0, 100);
    let lm = mem(&mut net, local, 0, 100);
    assert_eq!(publish(&mut net, remote, "rm", rm), Ok(Reply::Done));
    assert_eq!(publish(&mut net, local, "lm", lm), Ok(Reply::Done));
    let baseline = stats(&net);

    let watcher = net.attach(1, "watcher");
    let rw = lookup(&mut net, watcher, "rm");
    let lw = lookup(&mut net, watcher, "lm");
    let notify = req(&mut net, watcher, 7);
    for _ in 0..500 {
        assert_eq!(monitor(&mut net, watcher, rw, notify), Ok(Reply::Done));
        assert_eq!(monitor(&mut net, watcher, lw, notify), Ok(Reply::Done));
    }
    let s = stats(&net);
    assert_eq!((s[0].monitors, s[1].monitors), (500, 500));
    assert_eq!(s[0].monitors_max_per_watcher, 500);
    assert_eq!(s[1].monitors_max_per_watcher, 500);
    assert!(s[0].caps >= baseline[0].caps + 500);
    let text = prometheus::render(&net.ctrls[0], &Traffic::default());
    assert!(text.contains("fractos_monitors{node=\"1\"} 500"), "{text}");
    assert!(
        text.contains("fractos_monitors_max_per_process{node=\"1\"} 500"),
        "{text}"
    );
    net.check();

    net.exit(watcher);
    let s = stats(&net);
    for i in 0..2 {
        assert_eq!(s[i].monitors, 0, "monitors left at node {i}");
        assert_eq!(s[i].monitors_max_per_watcher, 0);
        assert_eq!(s[i].caps, baseline[i].caps, "capability nodes at node {i}");
        assert_eq!(s[i].calls, baseline[i].calls);
    }
    net.check();
    // The owners are unaffected: their objects are still there.
    assert_eq!(s[0].objects, baseline[0].objects);
    assert_eq!(s[1].objects, baseline[1].objects);
}

#[test]
fn monitors_per_process_are_bounded_with_limit_reached() {
    let mut cfgs: Vec<_> = (0..2).map(|i| harness::config(i, 2, 1)).collect();
    for c in &mut cfgs {
        c.limits.max_monitors_per_process = 3;
    }
    let mut net = Net::with_configs(cfgs);
    let owner = net.attach(0, "owner");
    let m = mem(&mut net, owner, 0, 100);
    let m2 = mem(&mut net, owner, 100, 100);
    assert_eq!(publish(&mut net, owner, "m", m), Ok(Reply::Done));
    assert_eq!(publish(&mut net, owner, "m2", m2), Ok(Reply::Done));
    let watcher = net.attach(1, "watcher");
    let other = net.attach(1, "other");
    let w = lookup(&mut net, watcher, "m");
    let w2 = lookup(&mut net, watcher, "m2");
    let o = lookup(&mut net, other, "m");
    let n = req(&mut net, watcher, 1);
    let on = req(&mut net, other, 2);
    for _ in 0..2 {
        assert_eq!(monitor(&mut net, watcher, w, n), Ok(Reply::Done));
    }
    assert_eq!(monitor(&mut net, watcher, w2, n), Ok(Reply::Done));
    assert_eq!(
        monitor(&mut net, watcher, w, n),
        Err(ErrorCode::LimitReached)
    );
    assert_eq!(
        monitor(&mut net, watcher, w2, n),
        Err(ErrorCode::LimitReached)
    );
    // Other processes keep their own budget.
    assert_eq!(monitor(&mut net, other, o, on), Ok(Reply::Done));
    assert_eq!(net.ctrls[0].stats().monitors, 4);
    assert_eq!(net.ctrls[0].stats().monitors_max_per_watcher, 3);
    net.check();
    // A monitor that fired frees its slot.
    assert_eq!(
        net.op(owner, |op| ProcessMsg::Revoke { op, cap: m2 }),
        Ok(Reply::Done)
    );
    assert_eq!(net.invocations(watcher).len(), 1);
    assert_eq!(monitor(&mut net, watcher, w, n), Ok(Reply::Done));
    net.check();
}

/// Names homed on each of the two controllers.
fn names_by_home(net: &mut Net, p: usize, per_home: usize) -> [Vec<String>; 2] {
    let mut out = [Vec::new(), Vec::new()];
    let mut i = 0;
    while out.iter().any(|v| v.len() < per_home) {
        let name = format!("wait-{i}");
        i += 1;
        let before: Vec<usize> = stats(net).iter().map(|s| s.name_waiters).collect();
        let op = net.start(p, |op| ProcessMsg::Lookup {
            op,
            name: name.clone().into_bytes(),
            wait_ms: u32::MAX,
        });
        assert_eq!(net.completion(p, op), None, "the lookup waits");
        let after: Vec<usize> = stats(net).iter().map(|s| s.name_waiters).collect();
        let home = if after[0] > before[0] { 0 } else { 1 };
        assert_eq!(after[home], before[home] + 1);
        if out[home].len() < per_home {
            out[home].push(name);
        }
    }
    out
}

#[test]
fn waiting_lookups_of_an_exited_process_are_cancelled_at_every_home() {
    let mut net = Net::new(2);
    let baseline = stats(&net);
    let waiter = net.attach(1, "waiter");
    let homes = names_by_home(&mut net, waiter, 100);
    let s = stats(&net);
    assert!(s[0].name_waiters >= 100 && s[1].name_waiters >= 100);
    assert!(s[1].calls >= 100, "remote waits are pending calls");
    assert_eq!(s[1].waiting_lookups, s[0].name_waiters + s[1].name_waiters);
    assert_eq!(s[1].waiting_lookups_max, s[1].waiting_lookups);
    assert_eq!(s[1].pending_ops, s[1].waiting_lookups);
    let text = prometheus::render(&net.ctrls[1], &Traffic::default());
    assert!(
        text.contains(&format!(
            "fractos_name_waiters{{node=\"2\"}} {}",
            s[1].name_waiters
        )),
        "{text}"
    );
    net.check();

    net.exit(waiter);
    let s = stats(&net);
    for i in 0..2 {
        assert_eq!(s[i].name_waiters, 0, "waiters left at node {i}");
        assert_eq!(s[i].calls, baseline[i].calls, "calls left at node {i}");
        assert_eq!(s[i].pending_ops, 0);
        assert_eq!(s[i].waiting_lookups, 0);
    }
    net.check();
    // A later publish of a formerly awaited name finds nobody waiting.
    let p = net.attach(0, "publisher");
    let r = req(&mut net, p, 3);
    for name in [&homes[0][0], &homes[1][0]] {
        assert_eq!(publish(&mut net, p, name, r), Ok(Reply::Done));
    }
    assert_eq!(stats(&net)[0].handles, 1);
    net.check();
}

#[test]
fn waiting_lookups_count_against_the_pending_limit() {
    let mut cfgs: Vec<_> = (0..2).map(|i| harness::config(i, 2, 1)).collect();
    cfgs[1].limits.max_pending_per_process = 20;
    let mut net = Net::with_configs(cfgs);
    let waiter = net.attach(1, "waiter");
    let ops: Vec<u64> = (0..25)
        .map(|i| {
            net.start(waiter, |op| ProcessMsg::Lookup {
                op,
                name: format!("n{i}").into_bytes(),
                wait_ms: u32::MAX,
            })
        })
        .collect();
    let refused = ops
        .iter()
        .filter(|op| net.completion(waiter, **op) == Some(Err(ErrorCode::LimitReached)))
        .count();
    assert_eq!(refused, 5);
    let s = stats(&net);
    assert_eq!(s[0].name_waiters + s[1].name_waiters, 20);
    assert_eq!(s[1].pending_ops, 20);
    net.exit(waiter);
    let s = stats(&net);
    assert_eq!(s[0].name_waiters + s[1].name_waiters, 0);
    assert_eq!(s[0].calls + s[1].calls, 0);
    net.check();
}

#[test]
fn a_name_flood_is_bounded_per_process() {
    let mut cfgs: Vec<_> = (0..2).map(|i| harness::config(i, 2, 1)).collect();
    cfgs[0].limits.max_names_per_process = 5;
    let mut net = Net::with_configs(cfgs);
    let flood = net.attach(0, "flood");
    let other = net.attach(0, "other");
    let r = req(&mut net, flood, 1);
    let o = req(&mut net, other, 2);
    for i in 0..5 {
        assert_eq!(
            publish(&mut net, flood, &format!("f{i}"), r),
            Ok(Reply::Done)
        );
    }
    for i in 5..50 {
        assert_eq!(
            publish(&mut net, flood, &format!("f{i}"), r),
            Err(ErrorCode::LimitReached)
        );
    }
    // Republishing a listed name is not a new name (the home refuses it).
    assert_eq!(publish(&mut net, flood, "f0", r), Err(ErrorCode::NameTaken));
    let names_homed: usize = stats(&net).iter().map(|s| s.names).sum();
    assert_eq!(names_homed, 5);
    assert_eq!(stats(&net)[0].published_names_max, 5);
    // Others still publish.
    for i in 0..5 {
        assert_eq!(
            publish(&mut net, other, &format!("o{i}"), o),
            Ok(Reply::Done)
        );
    }
    // Unpublishing frees a slot at once.
    assert_eq!(unpublish(&mut net, flood, "f3"), Ok(Reply::Done));
    assert_eq!(publish(&mut net, flood, "f99", r), Ok(Reply::Done));
    net.check();
    net.exit(flood);
    let names_homed: usize = stats(&net).iter().map(|s| s.names).sum();
    assert_eq!(names_homed, 5, "only the other process's names remain");
    net.check();
}

#[test]
fn unpublish_then_republish_does_not_grow_the_published_list() {
    let mut net = Net::new(2);
    let p = net.attach(0, "p");
    let r = req(&mut net, p, 1);
    for round in 0..5 {
        for i in 0..100 {
            assert_eq!(
                publish(&mut net, p, &format!("r{round}-{i}"), r),
                Ok(Reply::Done)
            );
        }
        assert_eq!(stats(&net)[0].published_names, 100);
        for i in 0..100 {
            assert_eq!(
                unpublish(&mut net, p, &format!("r{round}-{i}")),
                Ok(Reply::Done)
            );
        }
        assert_eq!(stats(&net)[0].published_names, 0, "round {round}");
    }
    // Failed publishes leave nothing behind either.
    let q = net.attach(1, "q");
    let rq = req(&mut net, q, 2);
    assert_eq!(publish(&mut net, q, "taken", rq), Ok(Reply::Done));
    for _ in 0..10 {
        assert_eq!(publish(&mut net, p, "taken", r), Err(ErrorCode::NameTaken));
    }
    assert_eq!(stats(&net)[0].published_names, 0);
    net.check();
}

#[test]
fn losing_the_watchers_controller_drops_its_monitors_and_waits() {
    let mut net = Net::new(2);
    let owner = net.attach(0, "owner");
    let m = mem(&mut net, owner, 0, 100);
    assert_eq!(publish(&mut net, owner, "m", m), Ok(Reply::Done));
    let baseline = stats(&net)[0];
    let watcher = net.attach(1, "watcher");
    let w = lookup(&mut net, watcher, "m");
    let n = req(&mut net, watcher, 1);
    for _ in 0..10 {
        assert_eq!(monitor(&mut net, watcher, w, n), Ok(Reply::Done));
    }
    names_by_home(&mut net, watcher, 5);
    assert!(stats(&net)[0].name_waiters >= 5);
    assert_eq!(stats(&net)[0].monitors, 10);
    net.restart(1, 2);
    let s = stats(&net)[0];
    assert_eq!(s.monitors, 0);
    assert_eq!(s.name_waiters, 0);
    assert_eq!(s.caps, baseline.caps);
    net.check();
}
