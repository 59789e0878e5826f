//! Serving one shard: after [`crate::shard::start`] opened it, the accept
//! loop, the mesh receivers, the consumer-group timer and the background
//! work run on its executor until shutdown.

use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::runtime::{self, TaskQueues};
use crate::shard::mesh::MeshMsg;
use crate::shard::{Shard, ShardSpec};

/// Runs one shard until shutdown. Called on the shard's executor.
pub async fn run(spec: ShardSpec, tq: TaskQueues) -> Result<(), String> {
    let ready = spec.ready.clone();
    let started = match crate::shard::start(spec, tq).await {
        Ok(s) => s,
        Err(e) => {
            let _ = ready.send(Err(e.clone()));
            return Err(e);
        }
    };
    let shard = started.shard;
    for (peer, rx) in started.receivers {
        let s = shard.clone();
        runtime::spawn_local_into(mesh_receive_loop(s, peer, rx), tq.data)
            .expect("data queue")
            .detach();
    }
    let s = shard.clone();
    runtime::spawn_local_into(super::connection::accept_loop(s, started.listener), tq.data)
        .expect("data queue")
        .detach();
    let s = shard.clone();
    runtime::spawn_local_into(super::handlers::group_timer(s), tq.data)
        .expect("data queue")
        .detach();
    let s = shard.clone();
    runtime::spawn_local_into(crate::shard::timer::run(s), tq.data)
        .expect("data queue")
        .detach();
    let s = shard.clone();
    runtime::spawn_local_into(s.background(), tq.background)
        .expect("background queue")
        .detach();
    let _ = started.ready.send(Ok(started.recovery_line));
    while !started.shutdown.load(Ordering::Relaxed) {
        runtime::sleep(Duration::from_millis(20)).await;
    }
    shard.stop().await;
    Ok(())
}

async fn mesh_receive_loop(shard: Rc<Shard>, peer: u16, rx: runtime::ConnectedReceiver<MeshMsg>) {
    while let Some(msg) = rx.recv().await {
        match msg {
            MeshMsg::Reply { id, code, body } => shard.mesh.complete(id, code, body),
            MeshMsg::Adopt { fd, buffered } => super::connection::adopt(&shard, fd, buffered),
            MeshMsg::Request {
                from,
                id,
                op,
                queue,
                body,
            } => {
                debug_assert_eq!(from, peer);
                // The synchronous part (a produce's append) runs here, in
                // arrival order; only the wait and the reply are spawned.
                let pending = super::handlers::execute_local(&shard, op, queue, body, true).await;
                let s = shard.clone();
                runtime::spawn_local_into(
                    async move {
                        let reply = pending.resolve().await;
                        let _ = s.mesh.reply(from, id, reply.code as u16, reply.body).await;
                    },
                    shard.tq.data,
                )
                .expect("data queue")
                .detach();
            }
        }
    }
}
