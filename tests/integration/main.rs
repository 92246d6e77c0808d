//! Integration tests against the real services: Kafka protocol (librdkafka's mock cluster over
//! TCP), Redis and LanceDB in temp dirs. One binary, so the heavy dependencies link once.

mod backpressure;
mod common;
mod crash;
mod exactly_once;
mod faults;
mod history;
mod rebalance;
mod tls;
mod worker;
