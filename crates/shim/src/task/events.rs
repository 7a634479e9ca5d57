//! Task events for containerd, forwarded over its ttrpc address (`TTRPC_ADDRESS`, set by
//! containerd in the shim's environment) by one task, in the order they were published.

use std::time::{Duration, SystemTime};

use containerd_shim_protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskPaused, TaskResumed,
    TaskStart,
};
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim_protos::protobuf::{MessageField, MessageFull};
use containerd_shim_protos::shim::event::Envelope;
use containerd_shim_protos::shim::events::ForwardRequest;
use containerd_shim_protos::shim_async::{Client, EventsClient};
use containerd_shim_protos::topics;
use slog::{debug, warn};
use tokio::sync::mpsc;

/// How long containerd may take to take one event.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);

/// A task event and its topic.
#[derive(Debug)]
pub enum Event {
    /// A container was created.
    Create(TaskCreate),
    /// A container's init started.
    Start(TaskStart),
    /// A process exited.
    Exit(TaskExit),
    /// A container was deleted.
    Delete(TaskDelete),
    /// An exec process was added.
    ExecAdded(TaskExecAdded),
    /// An exec process started.
    ExecStarted(TaskExecStarted),
    /// A container (the VM) was paused.
    Paused(TaskPaused),
    /// A container (the VM) was resumed.
    Resumed(TaskResumed),
}

impl Event {
    fn topic(&self) -> &'static str {
        match self {
            Event::Create(_) => topics::TASK_CREATE_EVENT_TOPIC,
            Event::Start(_) => topics::TASK_START_EVENT_TOPIC,
            Event::Exit(_) => topics::TASK_EXIT_EVENT_TOPIC,
            Event::Delete(_) => topics::TASK_DELETE_EVENT_TOPIC,
            Event::ExecAdded(_) => topics::TASK_EXEC_ADDED_EVENT_TOPIC,
            Event::ExecStarted(_) => topics::TASK_EXEC_STARTED_EVENT_TOPIC,
            Event::Paused(_) => topics::TASK_PAUSED_EVENT_TOPIC,
            Event::Resumed(_) => topics::TASK_RESUMED_EVENT_TOPIC,
        }
    }

    fn any(&self) -> Result<Any, containerd_shim_protos::protobuf::Error> {
        match self {
            Event::Create(e) => pack(e),
            Event::Start(e) => pack(e),
            Event::Exit(e) => pack(e),
            Event::Delete(e) => pack(e),
            Event::ExecAdded(e) => pack(e),
            Event::ExecStarted(e) => pack(e),
            Event::Paused(e) => pack(e),
            Event::Resumed(e) => pack(e),
        }
    }
}

/// containerd's type URLs are the messages' full names (`containerd.events.TaskExit`).
fn pack<M: MessageFull>(m: &M) -> Result<Any, containerd_shim_protos::protobuf::Error> {
    Ok(Any {
        type_url: M::descriptor().full_name().to_string(),
        value: m.write_to_bytes()?,
        ..Default::default()
    })
}

/// A protobuf timestamp of `t`.
pub fn timestamp(t: SystemTime) -> MessageField<Timestamp> {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    MessageField::some(Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
        ..Default::default()
    })
}

/// Where events are published; cloning shares the forwarding task.
#[derive(Debug, Clone)]
pub struct Publisher {
    tx: mpsc::UnboundedSender<Event>,
}

impl Publisher {
    /// Starts the forwarding task for namespace `namespace` to containerd's ttrpc `address`
    /// (`None`: no containerd to tell; events are logged and dropped).
    pub fn start(log: &slog::Logger, namespace: &str, address: Option<String>) -> Publisher {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(forward(log.clone(), namespace.to_string(), address, rx));
        Publisher { tx }
    }

    /// Queues `event`.
    pub fn publish(&self, event: Event) {
        let _ = self.tx.send(event);
    }
}

async fn forward(
    log: slog::Logger,
    namespace: String,
    address: Option<String>,
    mut rx: mpsc::UnboundedReceiver<Event>,
) {
    let mut client: Option<EventsClient> = None;
    while let Some(event) = rx.recv().await {
        let topic = event.topic();
        let Some(address) = &address else {
            debug!(log, "event (no containerd ttrpc address)"; "topic" => topic);
            continue;
        };
        let any = match event.any() {
            Ok(a) => a,
            Err(e) => {
                warn!(log, "encoding an event"; "topic" => topic, "error" => e.to_string());
                continue;
            }
        };
        let req = ForwardRequest {
            envelope: MessageField::some(Envelope {
                timestamp: timestamp(SystemTime::now()),
                namespace: namespace.clone(),
                topic: topic.to_string(),
                event: MessageField::some(any),
                ..Default::default()
            }),
            ..Default::default()
        };
        // One reconnection per event: containerd may have restarted.
        for attempt in 0..2 {
            if client.is_none() {
                match Client::connect(&unix_address(address)).await {
                    Ok(c) => client = Some(EventsClient::new(c)),
                    Err(e) => {
                        warn!(log, "connecting to containerd for events"; "address" => address,
                            "error" => e.to_string());
                        continue;
                    }
                }
            }
            let ctx = containerd_shim_protos::ttrpc::context::with_timeout(
                FORWARD_TIMEOUT.as_nanos() as i64,
            );
            match client.as_ref().expect("connected").forward(ctx, &req).await {
                Ok(_) => {
                    debug!(log, "event published"; "topic" => topic);
                    break;
                }
                Err(e) => {
                    client = None;
                    if attempt == 1 {
                        warn!(log, "publishing an event"; "topic" => topic, "error" => e.to_string());
                    }
                }
            }
        }
    }
}

/// ttrpc addresses are `unix://PATH`; containerd passes a bare path.
pub fn unix_address(address: &str) -> String {
    if address.contains("://") {
        address.to_string()
    } else {
        format!("unix://{address}")
    }
}
