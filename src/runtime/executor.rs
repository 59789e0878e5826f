//! Starting one pinned glommio executor per shard, with the task queues the
//! broker runs in: a latency-sensitive data queue and a low-share
//! background queue.

use glommio::{Latency, LocalExecutorBuilder, Placement, Shares, TaskQueueHandle};
use std::time::Duration;

/// How to build one shard's executor.
#[derive(Clone, Debug)]
pub struct ExecutorSpec {
    pub name: String,
    /// CPU to pin to; `None` leaves the thread unpinned.
    pub cpu: Option<usize>,
    pub spin_before_park: Duration,
    pub preempt_timer: Duration,
    pub io_memory_bytes: usize,
    pub ring_depth: usize,
}

/// The task queues of one executor.
#[derive(Clone, Copy, Debug)]
pub struct TaskQueues {
    /// Requests, appends, flushes: latency matters, short preempt timer.
    pub data: TaskQueueHandle,
    /// Retention, checkpoints, stats: low shares, tolerant of delay.
    pub background: TaskQueueHandle,
}

impl ExecutorSpec {
    /// Starts the executor on its own thread and runs `f` in it.
    pub fn spawn<F, Fut, T>(self, f: F) -> std::io::Result<std::thread::JoinHandle<T>>
    where
        F: FnOnce(TaskQueues) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = T> + 'static,
        T: Send + 'static,
    {
        let placement = match self.cpu {
            Some(cpu) => Placement::Fixed(cpu),
            None => Placement::Unbound,
        };
        let preempt = self.preempt_timer;
        let builder = LocalExecutorBuilder::new(placement)
            .name(&self.name)
            .spin_before_park(self.spin_before_park)
            .preempt_timer(preempt)
            .io_memory(self.io_memory_bytes)
            .ring_depth(self.ring_depth);
        std::thread::Builder::new()
            .name(self.name.clone())
            .spawn(move || {
                let ex = builder.make().unwrap_or_else(|e| {
                    eprintln!("error: cannot start the io_uring executor: {e}. KeelMQ needs Linux 5.8+ with io_uring enabled (check /proc/sys/kernel/io_uring_disabled) and RLIMIT_MEMLOCK of at least 512 KiB");
                    std::process::exit(2);
                });
                ex.run(async move {
                    let data = glommio::executor().create_task_queue(
                        Shares::Static(1000),
                        Latency::Matters(preempt),
                        "data",
                    );
                    let background = glommio::executor().create_task_queue(
                        Shares::Static(100),
                        Latency::NotImportant,
                        "background",
                    );
                    let queues = TaskQueues { data, background };
                    glommio::spawn_local_into(f(queues), data)
                        .expect("data task queue exists")
                        .await
                })
            })
    }
}

/// The process's RLIMIT_MEMLOCK soft limit in bytes (`None`: unlimited).
pub fn memlock_limit_bytes() -> Option<u64> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut r) };
    if rc != 0 || r.rlim_cur == libc::RLIM_INFINITY {
        return None;
    }
    Some(r.rlim_cur)
}
