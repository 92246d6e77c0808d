//! ragar: a streaming worker that renders items to each user's visual preference.
//!
//! One event's path, module by module:
//!
//! 1. [`ingest`]: the Kafka consumer group hands out messages in partition order and stores an
//!    offset only once everything before it is done ([`offsets`]).
//! 2. [`event`]: each payload is decoded and validated against `ragar.event.v1`; anything that
//!    fails goes to the dead-letter topic with its reason ([`publish`]).
//! 3. [`history`]: items and interactions are written to LanceDB (durable, deduplicated by event
//!    id) and to the users' hot windows in Redis; a display reads the user's history.
//! 4. [`preference`]: the history is weighed by similarity to the displayed item
//!    (retrieval-weighted preference extraction) into a preference vector.
//! 5. [`generate`]: display requests are batched; the [`model`] generator renders candidates and
//!    the ranker scores them; the best one is published ([`publish`]) and the display acknowledged.
//!
//! [`worker`] wires these together; [`config`] loads the settings; [`telemetry`] exports metrics,
//! health and logs; [`broker`] runs an in-process Kafka for trying it all out, [`produce`] sends
//! event files to Kafka, and [`demo`] streams simulated users through it all.
//!
//! Offline, [`data`] builds the EmojiStyle evaluation set and simulates its users, [`train`]
//! trains the models behind the [`model`] traits on it, and [`eval`] measures them.

pub mod broker;
pub mod config;
pub mod data;
#[cfg(feature = "lance")]
pub mod demo;
pub mod eval;
pub mod event;
#[cfg(feature = "lance")]
pub mod generate;
pub mod history;
pub mod ingest;
pub mod model;
pub mod offsets;
pub mod preference;
pub mod produce;
pub mod publish;
pub mod telemetry;
pub mod train;
#[cfg(feature = "lance")]
pub mod worker;
