//! Administration: topics, message lookup, stats, group offsets.

use bytes::BytesMut;

use super::conn::Connection;
use super::{decode_batch, ClientError, Message, MessageId};
use crate::protocol::*;

/// An admin client over one connection.
pub struct Admin {
    conn: Connection,
}

impl Admin {
    /// Connects to the broker at `addr`.
    pub fn connect(addr: &str) -> Result<Admin, ClientError> {
        Ok(Admin {
            conn: Connection::connect(addr)?,
        })
    }

    /// The broker's handshake (version, shards, limits, operations).
    pub fn handshake(&self) -> &HandshakeResponse {
        self.conn.handshake()
    }

    /// Creates a topic; `durability: None` takes the broker default.
    pub fn create_topic(
        &mut self,
        name: &str,
        queues: u32,
        durability: Option<Durability>,
    ) -> Result<TopicInfo, ClientError> {
        let mut b = BytesMut::new();
        CreateTopicRequest {
            name: name.to_owned(),
            queues,
            durability,
        }
        .encode(&mut b);
        Ok(TopicInfo::decode(self.conn.call(Op::CreateTopic, &b)?)?)
    }

    /// Creates a consumer group; `settings` is a JSON object of group
    /// settings (`mode`, `delivery`, `orderly`, `attempts_max`, `backoff`,
    /// `invisible_ms`, `subscriptions`, ...; absent fields take defaults).
    /// Returns the group as the broker describes it.
    pub fn create_group(
        &mut self,
        name: &str,
        settings: &serde_json::Value,
    ) -> Result<serde_json::Value, ClientError> {
        let mut b = BytesMut::new();
        CreateGroupRequest {
            name: name.to_owned(),
            settings_json: settings.to_string(),
        }
        .encode(&mut b);
        json_body(self.conn.call(Op::CreateGroup, &b)?)
    }

    /// Deletes a consumer group (its dead-letter topic stays).
    pub fn delete_group(&mut self, name: &str) -> Result<(), ClientError> {
        let mut b = BytesMut::new();
        GroupRequest {
            name: name.to_owned(),
        }
        .encode(&mut b);
        self.conn.call(Op::DeleteGroup, &b)?;
        Ok(())
    }

    /// Every consumer group (a JSON array).
    pub fn list_groups(&mut self) -> Result<serde_json::Value, ClientError> {
        json_body(self.conn.call(Op::ListGroups, &[])?)
    }

    /// A group's settings and per-queue state (JSON).
    pub fn describe_group(&mut self, name: &str) -> Result<serde_json::Value, ClientError> {
        let mut b = BytesMut::new();
        GroupRequest {
            name: name.to_owned(),
        }
        .encode(&mut b);
        json_body(self.conn.call(Op::DescribeGroup, &b)?)
    }

    /// Moves a group's position in one queue (by queue id) to `offset`,
    /// as an operator: in message delivery the queue's window restarts
    /// there (leases out become stale); in queue delivery only while no
    /// member holds the queue; in broadcast for `instance`.
    pub fn reset_group_offset(
        &mut self,
        group: &str,
        queue_id: u32,
        instance: &str,
        offset: u64,
    ) -> Result<(), ClientError> {
        let mut b = BytesMut::new();
        GroupCommitRequest {
            group: group.to_owned(),
            queue_id,
            member: 0,
            epoch: 0,
            instance: instance.to_owned(),
            offset,
        }
        .encode(&mut b);
        self.conn.call(Op::GroupCommit, &b)?;
        Ok(())
    }

    /// Every topic.
    pub fn list_topics(&mut self) -> Result<Vec<TopicInfo>, ClientError> {
        Ok(self.metadata(&[])?.topics)
    }

    /// Metadata of the named topics (all when empty).
    pub fn metadata(&mut self, topics: &[String]) -> Result<MetadataResponse, ClientError> {
        let mut b = BytesMut::new();
        MetadataRequest {
            topics: topics.to_vec(),
        }
        .encode(&mut b);
        Ok(MetadataResponse::decode(self.conn.call(Op::Metadata, &b)?)?)
    }

    /// A topic with each queue's earliest and latest offsets.
    pub fn describe_topic(&mut self, name: &str) -> Result<DescribeTopicResponse, ClientError> {
        let mut b = BytesMut::new();
        TopicRequest {
            name: name.to_owned(),
        }
        .encode(&mut b);
        Ok(DescribeTopicResponse::decode(
            self.conn.call(Op::DescribeTopic, &b)?,
        )?)
    }

    /// Deletes a topic.
    pub fn delete_topic(&mut self, name: &str) -> Result<(), ClientError> {
        let mut b = BytesMut::new();
        TopicRequest {
            name: name.to_owned(),
        }
        .encode(&mut b);
        self.conn.call(Op::DeleteTopic, &b)?;
        Ok(())
    }

    /// Looks a message up by id.
    pub fn get_message(&mut self, id: MessageId) -> Result<Message, ClientError> {
        let mut b = BytesMut::new();
        encode_message_id(&mut b, &id);
        let resp = GetMessageResponse::decode(self.conn.call(Op::GetMessage, &b)?)?;
        let all = decode_batch(
            &resp.topic.as_str().into(),
            resp.queue,
            id.shard.0,
            &resp.batch,
            0,
        )?;
        all.into_iter()
            .nth(resp.index as usize)
            .ok_or_else(|| ClientError::Protocol("message index outside its batch".into()))
    }

    /// Cancels a scheduled message that is not due yet, so it is never
    /// delivered. A message that is not pending (unknown, delivered
    /// already, or cancelled) is a `message_not_found` error.
    pub fn cancel_message(&mut self, id: MessageId) -> Result<(), ClientError> {
        let mut b = BytesMut::new();
        encode_message_id(&mut b, &id);
        self.conn.call(Op::CancelMessage, &b)?;
        Ok(())
    }

    /// The broker's stats document.
    pub fn stats(&mut self) -> Result<serde_json::Value, ClientError> {
        let body = self.conn.call(Op::Stats, &[])?;
        serde_json::from_slice(&body).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    /// Offsets of a queue: earliest, latest, or first at/after a time.
    pub fn list_offset(
        &mut self,
        topic: &str,
        queue: u32,
        spec: OffsetSpec,
    ) -> Result<u64, ClientError> {
        let mut b = BytesMut::new();
        ListOffsetsRequest {
            topic: topic.to_owned(),
            queue,
            spec,
        }
        .encode(&mut b);
        Ok(decode_u64(self.conn.call(Op::ListOffsets, &b)?)?)
    }

    /// Commits a consumer group's next offset for a queue.
    pub fn commit_offset(
        &mut self,
        group: &str,
        topic: &str,
        queue: u32,
        offset: u64,
    ) -> Result<(), ClientError> {
        let mut b = BytesMut::new();
        GroupOffsetRequest {
            group: group.to_owned(),
            topic: topic.to_owned(),
            queue,
            offset: Some(offset),
        }
        .encode(&mut b);
        self.conn.call(Op::CommitOffset, &b)?;
        Ok(())
    }

    /// A consumer group's committed offset for a queue, if any.
    pub fn fetch_offset(
        &mut self,
        group: &str,
        topic: &str,
        queue: u32,
    ) -> Result<Option<u64>, ClientError> {
        let mut b = BytesMut::new();
        GroupOffsetRequest {
            group: group.to_owned(),
            topic: topic.to_owned(),
            queue,
            offset: None,
        }
        .encode(&mut b);
        Ok(decode_opt_u64(self.conn.call(Op::FetchOffset, &b)?)?)
    }
}

fn json_body(b: bytes::Bytes) -> Result<serde_json::Value, ClientError> {
    serde_json::from_slice(&b).map_err(|e| ClientError::Protocol(format!("JSON reply: {e}")))
}
