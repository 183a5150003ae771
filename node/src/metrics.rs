//! The node's Prometheus metrics (prefix `mesh_node_`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use telemetry::metrics::{Registry, code_name, count_histogram, latency_histogram};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub model: String,
    /// gRPC status code name: OK, INVALID_ARGUMENT, RESOURCE_EXHAUSTED, ...
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ComputeLabels {
    /// The CPU matmul kernel (avx512, avx2, scalar), "device" or "none".
    pub kernel: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeviceLabels {
    /// `cpu` or `cuda:N`, as `--device` says it.
    pub device: String,
}

#[derive(Clone)]
pub struct NodeMetrics {
    /// The model label of `requests`.
    pub model: String,
    pub requests: Family<RequestLabels, Counter>,
    pub time_to_first_token: Histogram,
    pub inter_token: Histogram,
    pub batch_size: Histogram,
    pub generated_tokens: Counter,
    /// Forward steps that failed or panicked, retries included.
    pub engine_step_failures: Counter,
    /// Requests the listener's identity rule refused (`--tls-allow-peer`).
    pub refused_requests: Counter,
    pub running: Gauge,
    pub queued: Gauge,
    pub kv_tokens_free: Gauge,
    pub max_running: Gauge,
    pub max_queued: Gauge,
    /// Prompt tokens served from the prefix cache, and computed.
    pub prefix_hit_tokens: Counter,
    pub prefix_miss_tokens: Counter,
    pub prefix_blocks: Gauge,
    pub prefix_evicted_blocks: Counter,
    /// 1 for the kernel in use.
    pub kernel_info: Family<ComputeLabels, Gauge>,
    /// 1 for the device the model runs on (`set_device`).
    pub device_info: Family<DeviceLabels, Gauge>,
}

impl NodeMetrics {
    /// `compute` names what runs the linear layers (see `LoadedModel::compute`).
    pub fn new(model: &str, compute: &str) -> Self {
        let info = Family::<ComputeLabels, Gauge>::default();
        info.get_or_create(&ComputeLabels { kernel: compute.to_string() }).set(1);
        Self {
            model: model.to_string(),
            requests: Family::default(),
            time_to_first_token: latency_histogram(),
            inter_token: latency_histogram(),
            batch_size: count_histogram(),
            generated_tokens: Counter::default(),
            engine_step_failures: Counter::default(),
            refused_requests: Counter::default(),
            running: Gauge::default(),
            queued: Gauge::default(),
            kv_tokens_free: Gauge::default(),
            max_running: Gauge::default(),
            max_queued: Gauge::default(),
            prefix_hit_tokens: Counter::default(),
            prefix_miss_tokens: Counter::default(),
            prefix_blocks: Gauge::default(),
            prefix_evicted_blocks: Counter::default(),
            kernel_info: info,
            device_info: Family::default(),
        }
    }

    /// Marks `device` (`cpu`, `cuda:N`) as the one the model runs on.
    pub fn set_device(&self, device: &str) {
        self.device_info.get_or_create(&DeviceLabels { device: device.to_string() }).set(1);
    }

    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("mesh_node");
        r.register("requests", "Generate calls by model and final status code", self.requests.clone());
        r.register(
            "time_to_first_token_seconds",
            "From admission to the first sampled token",
            self.time_to_first_token.clone(),
        );
        r.register("inter_token_seconds", "Between two tokens of one stream", self.inter_token.clone());
        r.register("batch_size", "Sequences fed per forward step", self.batch_size.clone());
        r.register("generated_tokens", "Tokens sampled", self.generated_tokens.clone());
        r.register(
            "engine_step_failures",
            "Forward steps that failed or panicked (a failed batch is retried one sequence at a time)",
            self.engine_step_failures.clone(),
        );
        r.register(
            "refused_requests",
            "Calls refused before any service: the caller's identity is not one --tls-allow-peer names",
            self.refused_requests.clone(),
        );
        r.register("running_sequences", "Sequences in the running batch", self.running.clone());
        r.register("queued_requests", "Admitted requests waiting for a batch slot", self.queued.clone());
        r.register("kv_tokens_free", "KV-cache tokens not committed to a request", self.kv_tokens_free.clone());
        r.register("max_running", "Configured limit of sequences in the batch", self.max_running.clone());
        r.register("max_queued", "Configured limit of waiting requests", self.max_queued.clone());
        r.register(
            "prefix_cache_hit_tokens",
            "Prompt tokens whose keys and values came from the prefix cache",
            self.prefix_hit_tokens.clone(),
        );
        r.register("prefix_cache_miss_tokens", "Prompt tokens computed (not cached)", self.prefix_miss_tokens.clone());
        r.register("prefix_cache_blocks", "Blocks in the prefix cache", self.prefix_blocks.clone());
        r.register(
            "prefix_cache_evicted_blocks",
            "Idle cached blocks evicted to make room for a request",
            self.prefix_evicted_blocks.clone(),
        );
        r.register("kernel_info", "What runs the linear layers: label kernel, value 1", self.kernel_info.clone());
        r.register(
            "device_info",
            "Where the model runs: label device (cpu, cuda:N), value 1",
            self.device_info.clone(),
        );
    }

    /// Admission of a `prompt`-token request that found `hit` of them cached
    /// and evicted `evicted` blocks.
    pub fn prefix_counted(&self, hit: usize, prompt: usize, evicted: usize) {
        self.prefix_hit_tokens.inc_by(hit as u64);
        self.prefix_miss_tokens.inc_by((prompt - hit) as u64);
        self.prefix_evicted_blocks.inc_by(evicted as u64);
    }

    pub fn count(&self, code: tonic::Code) {
        let labels = RequestLabels { model: self.model.clone(), code: code_name(code) };
        self.requests.get_or_create(&labels).inc();
    }
}
