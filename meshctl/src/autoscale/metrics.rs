//! The controller's Prometheus metrics (`--metrics-listen`): whether it
//! leads, each service's utilisation as it last saw it, and its decisions.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    pub service: String,
    /// `activate`, `return` or `hook`.
    pub action: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    pub service: String,
}

#[derive(Clone, Default)]
pub struct Metrics {
    pub leading: Gauge,
    /// Thousandths (gauges hold integers).
    pub utilisation_milli: Family<ServiceLabels, Gauge>,
    pub decisions: Family<DecisionLabels, Counter>,
}

impl Metrics {
    pub fn register(&self, r: &mut Registry) {
        r.register("mesh_autoscale_leading", "1 while this controller leads", self.leading.clone());
        r.register(
            "mesh_autoscale_utilisation_milli",
            "(running + queued) / max_running of the active instances, in thousandths",
            self.utilisation_milli.clone(),
        );
        r.register("mesh_autoscale_decisions", "Decisions carried out, by service and action", self.decisions.clone());
    }

    pub fn saw(&self, service: &str, utilisation: f64) {
        let milli = (utilisation * 1000.0).round() as i64;
        self.utilisation_milli.get_or_create(&ServiceLabels { service: service.into() }).set(milli);
    }

    pub fn decided(&self, service: &str, action: &str) {
        self.decisions.get_or_create(&DecisionLabels { service: service.into(), action: action.into() }).inc();
    }
}
