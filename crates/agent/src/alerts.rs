//! Alerts: conditions the administrator must act on, each with the action it
//! needs (SPEC A1, V6, V7). Raising an alert that is already active updates
//! it; conditions that resolve themselves clear their alert.

use crate::error::Result;
use crate::{now, Agent};
use pairvisor_store::AlertRecord;

/// Severity of an alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// Needs action now (a VM is down).
    Critical,
    /// Needs attention.
    Warning,
}

impl Agent {
    /// Raises (or refreshes) an alert.
    pub(crate) fn raise_alert(
        &self,
        kind: &str,
        subject: &str,
        severity: Severity,
        message: String,
        action: &str,
    ) {
        let id = format!("{kind}:{subject}");
        let t = now();
        let r = self.store().write(|tx| {
            let prev = tx.get::<AlertRecord>(&id)?;
            let rec = AlertRecord {
                id: id.clone(),
                kind: kind.to_string(),
                severity: match severity {
                    Severity::Critical => "critical".into(),
                    Severity::Warning => "warning".into(),
                },
                subject: subject.to_string(),
                message: message.clone(),
                action: action.to_string(),
                raised_at: prev.as_ref().map(|p| p.raised_at).unwrap_or(t),
                updated_at: t,
                count: prev.map(|p| p.count + 1).unwrap_or(1),
            };
            tx.put(&rec)
        });
        if let Err(e) = r {
            tracing::error!("cannot record alert {id}: {e}");
        } else {
            tracing::warn!(alert = %id, "{message}");
        }
    }

    /// Clears an alert if it is active.
    pub(crate) fn clear_alert(&self, kind: &str, subject: &str) {
        let id = format!("{kind}:{subject}");
        let _ = self
            .store()
            .write(|tx| tx.delete::<AlertRecord>(&id).map(|_| ()));
    }

    /// Clears every alert about `subject`.
    pub(crate) fn clear_alerts_about(&self, subject: &str) {
        let _ = self.store().write(|tx| {
            for a in tx.list::<AlertRecord>()? {
                if a.subject == subject {
                    tx.delete::<AlertRecord>(&a.id)?;
                }
            }
            Ok::<_, pairvisor_store::StoreError>(())
        });
    }

    /// Active alerts, critical first, newest first.
    pub fn list_alerts(&self) -> Result<Vec<AlertRecord>> {
        let mut v: Vec<AlertRecord> = self.store().list()?;
        v.sort_by(|a, b| {
            (a.severity != "critical")
                .cmp(&(b.severity != "critical"))
                .then(b.updated_at.cmp(&a.updated_at))
        });
        Ok(v)
    }

    /// Acknowledges (removes) an alert.
    pub fn acknowledge_alert(&self, id: &str) -> Result<()> {
        let existed = self.store().write(|tx| tx.delete::<AlertRecord>(id))?;
        if existed {
            Ok(())
        } else {
            Err(crate::AgentError::NotFound {
                kind: "alert",
                name: id.to_string(),
            })
        }
    }
}
