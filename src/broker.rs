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
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl MockBroker {
    /// Starts a one-broker cluster with `topics` created.
    pub fn start(topics: &[(String, i32)]) -> KafkaResult<MockBroker> {
        let (ready_tx, ready_rx) = mpsc::channel::<KafkaResult<String>>();
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
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
                // Serve until told to stop or until the owner is gone.
                let _ = stop_rx.recv();
                drop(cluster);
            })
            .expect("spawn mock broker thread");
        let bootstrap = ready_rx.recv().expect("mock broker thread answers")?;
        Ok(MockBroker {
            bootstrap,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// The `bootstrap.servers` value clients use.
    pub fn bootstrap_servers(&self) -> &str {
        &self.bootstrap
    }
}

impl Drop for MockBroker {
    fn drop(&mut self) {
        self.stop.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
