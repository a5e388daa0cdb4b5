//! One measuring round over one Kafka cluster: every topic and group asked about, in as few
//! requests as the cluster's layout allows.
//!
//! Per round: one ListOffsets (log ends) per partition leader, one OffsetFetch (every group)
//! and one DescribeGroups (every group) per group coordinator. Metadata is read when the cached
//! copy is older than [`METADATA_TTL`], lacks a topic, or a request failed in a way that says
//! the layout moved; FindCoordinator only for groups whose coordinator is not known; log
//! starts (a second ListOffsets) only for partitions that need one and have none younger than
//! [`START_TTL`]. With one broker that is three requests for any number of groups.
//!
//! Versions are fixed at what Kafka 3.0 (the first with multi-group OffsetFetch) and every
//! later release, 4.x included, accept.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use kafka_protocol::error::ParseResponseErrorCode;
use kafka_protocol::messages::describe_groups_request::DescribeGroupsRequest;
use kafka_protocol::messages::find_coordinator_request::FindCoordinatorRequest;
use kafka_protocol::messages::list_offsets_request::{
    ListOffsetsPartition, ListOffsetsRequest, ListOffsetsTopic,
};
use kafka_protocol::messages::metadata_request::{MetadataRequest, MetadataRequestTopic};
use kafka_protocol::messages::offset_fetch_request::{
    OffsetFetchRequest, OffsetFetchRequestGroup, OffsetFetchRequestTopics,
};
use kafka_protocol::messages::{BrokerId, GroupId, TopicName};
use kafka_protocol::protocol::{Request, StrBytes};

use super::answers::{Answers, Why};
use super::wire::{Conn, WireResult};

/// How long partition leaders and broker addresses are trusted without an error.
pub const METADATA_TTL: Duration = Duration::from_secs(30);
/// How long a log-start offset is used before it is read again (it moves only with retention).
pub const START_TTL: Duration = Duration::from_secs(60);

const V_METADATA: i16 = 12;
const V_LIST_OFFSETS: i16 = 7;
const V_FIND_COORDINATOR: i16 = 4;
const V_OFFSET_FETCH: i16 = 8;
const V_DESCRIBE_GROUPS: i16 = 5;

/// ListOffsets timestamps that mean "log end" and "log start".
const LATEST: i64 = -1;
const EARLIEST: i64 = -2;
/// Metadata partition error that still has a leader (a follower is down).
const REPLICA_NOT_AVAILABLE: i16 = 9;
/// The group is not known to its coordinator.
const GROUP_ID_NOT_FOUND: i16 = 69;
/// Errors after which a group's coordinator must be looked up again.
const COORDINATOR_MOVED: [i16; 3] = [14, 15, 16];

fn describe(code: i16) -> String {
    code.err()
        .map(|e| e.to_string())
        .unwrap_or_else(|| format!("error code {code}"))
}

fn str_bytes(s: &str) -> StrBytes {
    StrBytes::from_string(s.to_owned())
}

/// Connections and caches of one cluster; rounds run one at a time.
pub struct ClusterState {
    bootstrap: Vec<String>,
    sent: Arc<AtomicU64>,
    conns: HashMap<String, Conn>,
    brokers: HashMap<i32, String>,
    /// Partition -> leader of each topic, or why the topic cannot be measured.
    metadata: HashMap<String, Result<BTreeMap<i32, i32>, Why>>,
    metadata_at: Option<Instant>,
    coordinators: HashMap<String, i32>,
    starts: HashMap<(String, i32), (Instant, i64)>,
}

impl ClusterState {
    pub fn new(bootstrap: &str, sent: Arc<AtomicU64>) -> Self {
        ClusterState {
            bootstrap: bootstrap
                .split(',')
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect(),
            sent,
            conns: HashMap::new(),
            brokers: HashMap::new(),
            metadata: HashMap::new(),
            metadata_at: None,
            coordinators: HashMap::new(),
            starts: HashMap::new(),
        }
    }

    /// Drop every connection (after a round was cut short, one may be mid-request).
    pub fn reset_connections(&mut self) {
        self.conns.clear();
    }

    async fn call<R: Request>(&mut self, addr: &str, req: &R, v: i16) -> WireResult<R::Response> {
        if !self.conns.contains_key(addr) {
            let conn = Conn::connect(addr, self.sent.clone()).await?;
            self.conns.insert(addr.to_owned(), conn);
        }
        let conn = self.conns.get_mut(addr).expect("just inserted");
        let res = conn.call(req, v).await;
        if res.is_err() {
            self.conns.remove(addr);
        }
        res
    }

    /// Call any broker that answers: known brokers first, then the bootstrap list.
    async fn call_any<R: Request>(&mut self, req: &R, v: i16) -> WireResult<R::Response> {
        let mut addrs: Vec<String> = self.conns.keys().cloned().collect();
        addrs.extend(self.brokers.values().cloned());
        addrs.extend(self.bootstrap.iter().cloned());
        // Each address once: a broker that does not answer costs a timeout per try.
        let mut seen = std::collections::HashSet::new();
        addrs.retain(|a| seen.insert(a.clone()));
        let mut last = "no broker address".to_owned();
        for addr in addrs {
            match self.call(&addr, req, v).await {
                Ok(r) => return Ok(r),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    fn broker(&self, id: i32) -> Result<String, Why> {
        self.brokers
            .get(&id)
            .cloned()
            .ok_or_else(|| format!("broker {id} is not in the metadata"))
    }

    async fn refresh_metadata(&mut self, topics: &BTreeSet<String>) -> WireResult<()> {
        let req = MetadataRequest::default()
            .with_topics(Some(
                topics
                    .iter()
                    .map(|t| {
                        MetadataRequestTopic::default().with_name(Some(TopicName(str_bytes(t))))
                    })
                    .collect(),
            ))
            .with_allow_auto_topic_creation(false);
        let resp = self.call_any(&req, V_METADATA).await?;
        self.brokers = resp
            .brokers
            .iter()
            .map(|b| (b.node_id.0, format!("{}:{}", b.host.as_str(), b.port)))
            .collect();
        self.metadata.clear();
        for t in resp.topics {
            let Some(name) = t.name.as_ref().map(|n| n.0.to_string()) else {
                continue;
            };
            let layout = if t.error_code != 0 {
                Err(format!("topic {name}: {}", describe(t.error_code)))
            } else {
                t.partitions
                    .iter()
                    .map(|p| {
                        let usable = p.error_code == 0 || p.error_code == REPLICA_NOT_AVAILABLE;
                        if usable && p.leader_id.0 >= 0 {
                            Ok((p.partition_index, p.leader_id.0))
                        } else {
                            Err(format!(
                                "partition {name}/{} has no leader ({})",
                                p.partition_index,
                                describe(p.error_code)
                            ))
                        }
                    })
                    .collect::<Result<BTreeMap<_, _>, _>>()
            };
            self.metadata.insert(name, layout);
        }
        self.metadata_at = Some(Instant::now());
        Ok(())
    }

    /// ListOffsets at `timestamp` for `partitions`, one request per leader. Returns the
    /// offsets found and an error per topic that did not fully answer.
    async fn list_offsets(
        &mut self,
        partitions: &[(String, i32)],
        timestamp: i64,
    ) -> (HashMap<(String, i32), i64>, HashMap<String, Why>) {
        let mut found = HashMap::new();
        let mut failed: HashMap<String, Why> = HashMap::new();
        let mut by_leader: BTreeMap<i32, BTreeMap<String, Vec<i32>>> = BTreeMap::new();
        for (topic, p) in partitions {
            match self
                .metadata
                .get(topic)
                .and_then(|m| m.as_ref().ok()?.get(p))
            {
                Some(&leader) => by_leader
                    .entry(leader)
                    .or_default()
                    .entry(topic.clone())
                    .or_default()
                    .push(*p),
                None => {
                    failed.insert(topic.clone(), format!("no leader known for {topic}/{p}"));
                }
            }
        }
        for (leader, topics) in by_leader {
            let req = ListOffsetsRequest::default()
                .with_replica_id(BrokerId(-1))
                .with_topics(
                    topics
                        .iter()
                        .map(|(t, ps)| {
                            ListOffsetsTopic::default()
                                .with_name(TopicName(str_bytes(t)))
                                .with_partitions(
                                    ps.iter()
                                        .map(|&p| {
                                            ListOffsetsPartition::default()
                                                .with_partition_index(p)
                                                .with_current_leader_epoch(-1)
                                                .with_timestamp(timestamp)
                                        })
                                        .collect(),
                                )
                        })
                        .collect(),
                );
            let answer = match self.broker(leader) {
                Ok(addr) => self.call(&addr, &req, V_LIST_OFFSETS).await,
                Err(e) => Err(e),
            };
            match answer {
                Ok(resp) => {
                    for t in resp.topics {
                        let name = t.name.0.to_string();
                        for p in t.partitions {
                            if p.error_code != 0 {
                                failed.insert(
                                    name.clone(),
                                    format!(
                                        "offsets of {name}/{}: {}",
                                        p.partition_index,
                                        describe(p.error_code)
                                    ),
                                );
                                // A leader change, most likely: read the layout again.
                                self.metadata_at = None;
                            } else {
                                found.insert((name.clone(), p.partition_index), p.offset);
                            }
                        }
                    }
                }
                Err(e) => {
                    self.metadata_at = None;
                    for t in topics.keys() {
                        failed.insert(t.clone(), format!("offsets of {t}: {e}"));
                    }
                }
            }
        }
        // Every partition asked for must have answered.
        for (topic, p) in partitions {
            if !found.contains_key(&(topic.clone(), *p)) && !failed.contains_key(topic) {
                failed.insert(topic.clone(), format!("no offset for {topic}/{p}"));
            }
        }
        (found, failed)
    }

    /// Look up the coordinators of `groups` that have none cached; errors per group.
    async fn find_coordinators(&mut self, groups: &[String]) -> HashMap<String, Why> {
        let missing: Vec<&String> = groups
            .iter()
            .filter(|g| !self.coordinators.contains_key(*g))
            .collect();
        let mut failed = HashMap::new();
        if missing.is_empty() {
            return failed;
        }
        let req = FindCoordinatorRequest::default()
            .with_key_type(0)
            .with_coordinator_keys(missing.iter().map(|g| str_bytes(g)).collect());
        match self.call_any(&req, V_FIND_COORDINATOR).await {
            Ok(resp) => {
                for c in resp.coordinators {
                    let group = c.key.to_string();
                    if c.error_code != 0 {
                        failed.insert(
                            group.clone(),
                            format!("coordinator of group {group}: {}", describe(c.error_code)),
                        );
                    } else {
                        self.brokers
                            .entry(c.node_id.0)
                            .or_insert_with(|| format!("{}:{}", c.host.as_str(), c.port));
                        self.coordinators.insert(group, c.node_id.0);
                    }
                }
            }
            Err(e) => {
                for g in missing {
                    failed.insert(g.clone(), format!("finding the coordinator of {g}: {e}"));
                }
            }
        }
        failed
    }

    /// Measure every (topic, group) in `wanted`.
    pub async fn run(&mut self, wanted: &[(String, String)]) -> Answers {
        let mut answers = Answers::default();
        let topics: BTreeSet<String> = wanted.iter().map(|(t, _)| t.clone()).collect();
        let mut topics_of: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (t, g) in wanted {
            topics_of.entry(g.clone()).or_default().insert(t.clone());
        }
        let groups: Vec<String> = topics_of.keys().cloned().collect();

        let stale = self.metadata_at.is_none_or(|t| t.elapsed() > METADATA_TTL)
            || topics.iter().any(|t| !self.metadata.contains_key(t));
        if stale && let Err(e) = self.refresh_metadata(&topics).await {
            let why = format!("metadata: {e}");
            for t in &topics {
                answers.ends.insert(t.clone(), Err(why.clone()));
            }
            for g in &groups {
                answers.committed.insert(g.clone(), Err(why.clone()));
                answers.states.insert(g.clone(), Err(why.clone()));
            }
            return answers;
        }

        // Log ends of every partition of every topic.
        let mut partitions = Vec::new();
        for t in &topics {
            match self.metadata.get(t) {
                Some(Ok(layout)) => partitions.extend(layout.keys().map(|&p| (t.clone(), p))),
                Some(Err(why)) => {
                    answers.ends.insert(t.clone(), Err(why.clone()));
                }
                None => {
                    answers
                        .ends
                        .insert(t.clone(), Err(format!("topic {t} is not in the metadata")));
                }
            }
        }
        let (ends, failed) = self.list_offsets(&partitions, LATEST).await;
        for t in &topics {
            if answers.ends.contains_key(t) {
                continue;
            }
            let result = match failed.get(t) {
                Some(why) => Err(why.clone()),
                None => Ok(ends
                    .iter()
                    .filter(|((topic, _), _)| topic == t)
                    .map(|((_, p), &o)| (*p, o))
                    .collect()),
            };
            answers.ends.insert(t.clone(), result);
        }

        // Committed offsets and states, one request of each kind per coordinator.
        let failed = self.find_coordinators(&groups).await;
        let mut by_coordinator: BTreeMap<i32, Vec<String>> = BTreeMap::new();
        for g in &groups {
            match (failed.get(g), self.coordinators.get(g)) {
                (Some(why), _) => {
                    answers.committed.insert(g.clone(), Err(why.clone()));
                    answers.states.insert(g.clone(), Err(why.clone()));
                }
                (None, Some(&node)) => by_coordinator.entry(node).or_default().push(g.clone()),
                (None, None) => {
                    let why = format!("no coordinator for group {g}");
                    answers.committed.insert(g.clone(), Err(why.clone()));
                    answers.states.insert(g.clone(), Err(why));
                }
            }
        }
        for (node, gs) in by_coordinator {
            self.fetch_groups(node, &gs, &topics_of, &mut answers).await;
        }

        // Log starts where a group's lag needs them.
        let now = Instant::now();
        self.starts
            .retain(|_, (read, _)| now.duration_since(*read) < START_TTL);
        answers.starts = self
            .starts
            .iter()
            .map(|(k, (_, o))| (k.clone(), *o))
            .collect();
        let mut need: BTreeSet<(String, i32)> = BTreeSet::new();
        for (t, g) in wanted {
            need.extend(
                answers
                    .missing_starts(t, g)
                    .into_iter()
                    .map(|p| (t.clone(), p)),
            );
        }
        if !need.is_empty() {
            let need: Vec<(String, i32)> = need.into_iter().collect();
            let (starts, _failed) = self.list_offsets(&need, EARLIEST).await;
            for (k, o) in starts {
                self.starts.insert(k.clone(), (now, o));
                answers.starts.insert(k, o);
            }
        }
        answers
    }

    /// OffsetFetch and DescribeGroups for the groups of one coordinator.
    async fn fetch_groups(
        &mut self,
        node: i32,
        groups: &[String],
        topics_of: &BTreeMap<String, BTreeSet<String>>,
        answers: &mut Answers,
    ) {
        let addr = match self.broker(node) {
            Ok(a) => a,
            Err(why) => {
                for g in groups {
                    self.coordinators.remove(g);
                    answers.committed.insert(g.clone(), Err(why.clone()));
                    answers.states.insert(g.clone(), Err(why.clone()));
                }
                return;
            }
        };
        let req = OffsetFetchRequest::default().with_groups(
            groups
                .iter()
                .map(|g| {
                    let topics = topics_of[g]
                        .iter()
                        .filter_map(|t| {
                            let layout = self.metadata.get(t)?.as_ref().ok()?;
                            Some(
                                OffsetFetchRequestTopics::default()
                                    .with_name(TopicName(str_bytes(t)))
                                    .with_partition_indexes(layout.keys().copied().collect()),
                            )
                        })
                        .collect();
                    OffsetFetchRequestGroup::default()
                        .with_group_id(GroupId(str_bytes(g)))
                        .with_topics(Some(topics))
                })
                .collect(),
        );
        match self.call(&addr, &req, V_OFFSET_FETCH).await {
            Ok(resp) => {
                for group in resp.groups {
                    let g = group.group_id.0.to_string();
                    let result = if group.error_code != 0 {
                        if COORDINATOR_MOVED.contains(&group.error_code) {
                            self.coordinators.remove(&g);
                        }
                        Err(format!(
                            "offsets of group {g}: {}",
                            describe(group.error_code)
                        ))
                    } else {
                        let mut committed = HashMap::new();
                        let mut error = None;
                        for t in group.topics {
                            for p in t.partitions {
                                if p.error_code != 0 {
                                    error = Some(format!(
                                        "offset of group {g} on {}/{}: {}",
                                        t.name.0.as_str(),
                                        p.partition_index,
                                        describe(p.error_code)
                                    ));
                                } else if p.committed_offset >= 0 {
                                    committed.insert(
                                        (t.name.0.to_string(), p.partition_index),
                                        p.committed_offset,
                                    );
                                }
                            }
                        }
                        error.map_or(Ok(committed), Err)
                    };
                    answers.committed.insert(g, result);
                }
            }
            Err(e) => {
                for g in groups {
                    self.coordinators.remove(g);
                    answers
                        .committed
                        .insert(g.clone(), Err(format!("offsets of group {g}: {e}")));
                }
            }
        }
        let req = DescribeGroupsRequest::default()
            .with_groups(groups.iter().map(|g| GroupId(str_bytes(g))).collect());
        match self.call(&addr, &req, V_DESCRIBE_GROUPS).await {
            Ok(resp) => {
                for d in resp.groups {
                    let g = d.group_id.0.to_string();
                    let state = match d.error_code {
                        0 => Ok(Some(d.group_state.to_string())),
                        GROUP_ID_NOT_FOUND => Ok(None),
                        code => {
                            if COORDINATOR_MOVED.contains(&code) {
                                self.coordinators.remove(&g);
                            }
                            Err(format!("describing group {g}: {}", describe(code)))
                        }
                    };
                    answers.states.insert(g, state);
                }
            }
            Err(e) => {
                for g in groups {
                    answers
                        .states
                        .insert(g.clone(), Err(format!("describing group {g}: {e}")));
                }
            }
        }
        // A group the coordinator left out of its answer is unknown, not fine.
        for g in groups {
            answers
                .committed
                .entry(g.clone())
                .or_insert_with(|| Err(format!("group {g} missing from the answer")));
            answers
                .states
                .entry(g.clone())
                .or_insert_with(|| Err(format!("group {g} missing from the answer")));
        }
    }
}
