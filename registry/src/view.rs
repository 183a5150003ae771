//! A watcher's picture of the registry, and the difference between two.

use std::collections::BTreeMap;
use std::time::SystemTime;

use crate::InstanceRecord;

/// Every known instance, by (service, instance id).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct View {
    pub instances: BTreeMap<(String, String), InstanceRecord>,
    /// Whether the last contact with etcd succeeded. When false the view is
    /// the last one seen (static stability), not an empty one.
    pub etcd_reachable: bool,
    /// When the view last matched etcd.
    pub synced_at: Option<SystemTime>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    Up(InstanceRecord),
    Down { service: String, instance_id: String },
}

impl View {
    /// Instances of one service.
    pub fn service<'a>(&'a self, service: &'a str) -> impl Iterator<Item = &'a InstanceRecord> + 'a {
        self.instances.iter().filter(move |((s, _), _)| s == service).map(|(_, r)| r)
    }

    pub fn services(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.instances.keys().map(|(s, _)| s.as_str()).collect();
        names.dedup();
        names
    }

    /// What changed from `old` to `self`: new or updated records, and gone ones.
    pub fn diff(&self, old: &View) -> Vec<Change> {
        let mut changes: Vec<Change> = self
            .instances
            .iter()
            .filter(|(k, r)| old.instances.get(*k) != Some(*r))
            .map(|(_, r)| Change::Up(r.clone()))
            .collect();
        changes.extend(
            old.instances
                .keys()
                .filter(|k| !self.instances.contains_key(*k))
                .map(|(s, i)| Change::Down { service: s.clone(), instance_id: i.clone() }),
        );
        changes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(records: &[InstanceRecord]) -> View {
        View {
            instances: records.iter().map(|r| ((r.service.clone(), r.instance_id.clone()), r.clone())).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn diff_lists_new_changed_and_gone_instances() {
        let a = InstanceRecord::new("chat", "a", "h:1");
        let b = InstanceRecord::new("chat", "b", "h:2");
        let mut b2 = b.clone();
        b2.weight = 3;
        let c = InstanceRecord::new("code", "c", "h:3");
        let old = view(&[a.clone(), b]);
        let new = view(&[b2.clone(), c.clone()]);
        let changes = new.diff(&old);
        assert_eq!(changes.len(), 3);
        assert!(changes.contains(&Change::Up(b2)));
        assert!(changes.contains(&Change::Up(c)));
        assert!(changes.contains(&Change::Down { service: "chat".into(), instance_id: "a".into() }));
        assert_eq!(new.service("chat").count(), 1);
        assert_eq!(new.services(), vec!["chat", "code"]);
    }
}
