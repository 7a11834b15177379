
/// F7: after a renewal a node's foca table holds its own old identity, Down, at its
/// address; `news` keys the table by address, so that entry overwrites the node's own
/// Alive self-entry, and a receiver that knew the old identity is told the node is dead
/// by the node itself.
#[test]
fn f7_renewed_node_advertises_its_own_death() {
    let mut net = cluster(4, 93);
    let old = net.nodes[&0].local().clone();
    // A peer table saying node 0 is down (an honest peer that saw it falsely die).
    let d = sync_datagram(false, &[wire::SyncItem::Member(foca::Member::down(old.clone()))]);
    feed(&mut net, 0, addr(1), &d[0]);
    let new = net.nodes[&0].local().clone();
    eprintln!("renewed: gen {} -> {}", old.generation, new.generation);
    // Node 0's table, as it would answer.
    let ask = sync_datagram(true, &[]);
    let now = net.now;
    net.node(0).handle_packet(now, addr(3), &ask[0]);
    let mut answer = Vec::new();
    let mut rest = Vec::new();
    while let Some(t) = net.node(0).poll_transmit() {
        if t.destination == addr(3) && t.payload[3] == wire::MessageKind::Sync as u8 { answer.push(t.payload) } else { rest.push(t) }
    }
    for p in &answer {
        let (_, body) = wire::read_header(p).unwrap();
        for item in wire::decode_sync(body).unwrap() {
            if let wire::SyncItem::Member(m) = &item && m.id().addr == addr(0) {
                eprintln!("  entry for node 0's address: gen {} {:?}", m.id().generation, m.state());
            }
        }
    }
    // Node 3 still knows the old identity alive; it hears only this table.
    for p in &answer {
        let now = net.now;
        net.node(3).handle_packet(now, addr(0), p);
    }
    net.drain(3);
    let downs: Vec<_> = net.member_events.get(&3).into_iter().flatten()
        .filter(|e| matches!(e, Event::MemberDown(m) if m.addr == addr(0))).collect();
    eprintln!("node 3 after node 0's own table: sees node 0: {:?}; MemberDown events: {}; resyncs {:?}",
        net.nodes[&3].members().find(|m| m.addr == addr(0)).map(|m| m.generation), downs.len(), net.resyncs.get(&3));
}
