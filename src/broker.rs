//! `ragar broker`: an in-process Kafka (librdkafka's mock cluster) for trying the worker and for tests.
//!
//! Real clients reach it over TCP with the real Kafka protocol; it keeps messages in memory only
//! (each partition its newest 5 MiB / 100k messages, a librdkafka limit). It is a development aid:
//! production points `kafka.brokers` at Apache Kafka.

use std::sync::mpsc;
use std::thread::JoinHandle;

use rdkafka::error::KafkaResult;
use rdkafka::mocking::MockCluster;

/// The topics the worker uses by default, with their partition counts.
pub fn default_topics(partitions: i32) -> Vec<(String, i32)> {
    [
        "ragar.items",
        "ragar.events",
        "ragar.images",
        "ragar.events.dlq",
    ]
    .iter()
    .map(|t| (t.to_string(), partitions))
    .collect()
}

/// A running mock cluster. The cluster lives on its own thread (it is not `Send`); dropping this
/// stops it.
pub struct MockBroker {
    bootstrap: String,
    commands: Option<mpsc::Sender<Command>>,
    thread: Option<JoinHandle<()>>,
}

/// What the cluster's thread is asked to do; each command is answered on its channel.
enum Command {
    /// Take the broker down (connections dropped, new ones refused) or bring it back.
    Reachable(bool, mpsc::Sender<KafkaResult<()>>),
}

impl MockBroker {
    /// Starts a one-broker cluster with `topics` created.
    pub fn start(topics: &[(String, i32)]) -> KafkaResult<MockBroker> {
        let (ready_tx, ready_rx) = mpsc::channel::<KafkaResult<String>>();
        let (command_tx, command_rx) = mpsc::channel::<Command>();
        let topics = topics.to_vec();
        let thread = std::thread::Builder::new()
            .name("mock-kafka".into())
            .spawn(move || {
                let cluster = match MockCluster::new(1) {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                for (topic, partitions) in &topics {
                    if let Err(e) = cluster.create_topic(topic, *partitions, 1) {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                }
                let _ = ready_tx.send(Ok(cluster.bootstrap_servers()));
                // Serve until the owner is gone.
                while let Ok(command) = command_rx.recv() {
                    match command {
                        Command::Reachable(up, reply) => {
                            let result = if up {
                                cluster.broker_up(BROKER_ID)
                            } else {
                                cluster.broker_down(BROKER_ID)
                            };
                            let _ = reply.send(result);
                        }
                    }
                }
                drop(cluster);
            })
            .expect("spawn mock broker thread");
        let bootstrap = ready_rx.recv().expect("mock broker thread answers")?;
        Ok(MockBroker {
            bootstrap,
            commands: Some(command_tx),
            thread: Some(thread),
        })
    }

    /// The `bootstrap.servers` value clients use.
    pub fn bootstrap_servers(&self) -> &str {
        &self.bootstrap
    }

    /// Makes the broker unreachable (its connections dropped, new ones refused), or reachable again.
    pub fn set_reachable(&self, up: bool) -> KafkaResult<()> {
        let (reply_tx, reply_rx) = mpsc::channel();
        self.commands
            .as_ref()
            .expect("running")
            .send(Command::Reachable(up, reply_tx))
            .expect("mock broker thread runs");
        reply_rx.recv().expect("mock broker thread answers")
    }
}

/// The id of the one broker of the cluster (librdkafka numbers mock brokers from 1).
const BROKER_ID: i32 = 1;

impl Drop for MockBroker {
    fn drop(&mut self) {
        self.commands.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
