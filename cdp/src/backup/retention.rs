//! Retention: which points to delete for a max-count / max-age policy.
//!
//! Rules, per disk:
//! - keep the newest `max_count` points that are not older than `max_age`;
//! - always keep the newest point: the next incremental of its chain
//!   inherits its unchanged chunks from it;
//! - full-kept rule: a full point stays while a kept incremental descends
//!   from it. (Every index lists all its chunks, so data never depends on
//!   another point; this rule keeps the chain's base as users expect.)
//!
//! Deleting a point removes only its index; [`Repository::gc`] then frees
//! chunks no remaining point uses.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use crate::backup::index::{BackupIndex, Kind};
use crate::backup::repo::{RepoError, Repository};

/// A retention policy (`None` = no limit).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Policy {
    /// Keep at most this many points per disk.
    pub max_count: Option<usize>,
    /// Drop points older than this.
    pub max_age: Option<Duration>,
}

/// Ids to keep and to remove.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct PrunePlan {
    /// Kept point ids.
    pub keep: Vec<String>,
    /// Removed point ids.
    pub remove: Vec<String>,
}

/// Computes the plan for `points` at time `now_ms`.
pub fn plan(points: &[BackupIndex], policy: Policy, now_ms: u64) -> PrunePlan {
    let mut by_disk: BTreeMap<&str, Vec<&BackupIndex>> = BTreeMap::new();
    for p in points {
        by_disk.entry(&p.disk).or_default().push(p);
    }
    let by_id: HashMap<&str, &BackupIndex> = points.iter().map(|p| (p.id.as_str(), p)).collect();
    let mut keep = HashSet::new();
    for list in by_disk.values_mut() {
        list.sort_by(|a, b| b.created_ms.cmp(&a.created_ms).then(b.id.cmp(&a.id)));
        for (rank, p) in list.iter().enumerate() {
            let young = policy.max_age.is_none_or(|age| {
                now_ms.saturating_sub(p.created_ms)
                    <= u64::try_from(age.as_millis()).unwrap_or(u64::MAX)
            });
            let within = policy.max_count.is_none_or(|n| rank < n);
            if rank == 0 || (young && within) {
                keep.insert(p.id.as_str());
            }
        }
    }
    // Full-kept rule: walk each kept incremental up to its full.
    let kept: Vec<&str> = keep.iter().copied().collect();
    for id in kept {
        let mut cur = by_id.get(id).copied();
        let mut hops = 0;
        while let Some(p) = cur {
            if p.kind == Kind::Full || hops > points.len() {
                keep.insert(p.id.as_str());
                break;
            }
            cur = p.parent.as_deref().and_then(|pid| by_id.get(pid).copied());
            hops += 1;
        }
    }
    let mut out = PrunePlan::default();
    for p in points {
        if keep.contains(p.id.as_str()) {
            out.keep.push(p.id.clone());
        } else {
            out.remove.push(p.id.clone());
        }
    }
    out
}

/// Applies `policy` to the repository (exclusive lock); run
/// [`Repository::gc`] afterwards to free space.
pub fn prune(repo: &Repository, policy: Policy, now_ms: u64) -> Result<PrunePlan, RepoError> {
    let _lock = repo.lock_exclusive()?;
    let points = repo.points()?;
    let plan = plan(&points, policy, now_ms);
    for id in &plan.remove {
        repo.remove_point(id)?;
    }
    Ok(plan)
}
