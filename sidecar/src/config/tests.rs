use super::*;

const MINIMAL: &str = r#"
    plaintext = true
    [listen]
    outbound = "127.0.0.1:7100"
    inbound = "127.0.0.1:7101"
    [etcd]
    endpoints = ["http://127.0.0.1:2379"]
"#;

#[test]
fn minimal_config_gets_defaults() {
    let cfg = SidecarConfig::parse(MINIMAL).unwrap();
    cfg.validate().unwrap();
    assert_eq!(cfg.routing.policy, Policy::LeastLoaded);
    assert_eq!(cfg.outlier.consecutive_failures, 5);
    assert_eq!(cfg.etcd.lease_ttl, Duration::from_secs(5));
    assert_eq!(cfg.http2, daemon::grpc::Http2::default());
    assert_eq!(cfg.http2.stream_window, 16 << 10);
}

#[test]
fn http2_settings_are_read_and_checked() {
    let text = format!("{MINIMAL}\n[http2]\nstream_window = 65536\nkeep_alive_interval = \"30s\"\n");
    let cfg = SidecarConfig::parse(&text).unwrap();
    cfg.validate().unwrap();
    assert_eq!((cfg.http2.stream_window, cfg.http2.keep_alive_interval), (65536, Duration::from_secs(30)));
    assert_eq!(cfg.http2.connection_window, daemon::grpc::Http2::default().connection_window);
    let tiny = format!("{MINIMAL}\n[http2]\nstream_window = 100\n");
    let err = SidecarConfig::parse(&tiny).unwrap().validate().unwrap_err().to_string();
    assert!(err.starts_with("http2.stream_window: must be in [1024,"), "{err}");
    let typo = format!("{MINIMAL}\n[http2]\nstream_windw = 65536\n");
    let err = SidecarConfig::parse(&typo).unwrap_err().to_string();
    assert!(err.contains("stream_windw"), "{err}");
}

#[test]
fn unknown_keys_and_bad_values_name_the_key() {
    let typo = format!("{MINIMAL}\n[routing]\nattempt_timeot = \"1s\"\n");
    let err = SidecarConfig::parse(&typo).unwrap_err().to_string();
    assert!(err.contains("attempt_timeot"), "{err}");
    let bad = format!("{MINIMAL}\n[routing]\nattempt_timeout = \"soon\"\n");
    let err = SidecarConfig::parse(&bad).unwrap_err().to_string();
    assert!(err.contains("attempt_timeout") && err.contains("soon"), "{err}");
    let zero = format!("{MINIMAL}\n[outlier]\nconsecutive_failures = 0\n");
    let err = SidecarConfig::parse(&zero).unwrap().validate().unwrap_err().to_string();
    assert!(err.starts_with("outlier.consecutive_failures"), "{err}");
}

#[test]
fn tls_or_explicit_plaintext_is_required() {
    let no_tls = MINIMAL.replace("plaintext = true", "");
    let err = SidecarConfig::parse(&no_tls).unwrap().validate().unwrap_err().to_string();
    assert!(err.starts_with("tls: missing"), "{err}");
    let bad_key = format!("{MINIMAL}\n[[api_keys]]\ntenant = \"a\"\nsha256 = \"abc\"\n");
    let err = SidecarConfig::parse(&bad_key).unwrap().validate().unwrap_err().to_string();
    assert!(err.starts_with("api_keys[0].sha256"), "{err}");
}

#[test]
fn durations_are_written_as_humantime() {
    let parse = |v: &str| {
        let text = format!("{MINIMAL}\n[routing]\nattempt_timeout = \"{v}\"\n");
        SidecarConfig::parse(&text).map(|c| c.routing.attempt_timeout).ok()
    };
    assert_eq!(parse("250ms"), Some(Duration::from_millis(250)));
    assert_eq!(parse("2s"), Some(Duration::from_secs(2)));
    assert_eq!(parse("1m 30s"), Some(Duration::from_secs(90)));
    assert_eq!(parse("2"), None);
}

#[test]
fn numbers_that_would_overflow_later_are_refused_naming_the_key() {
    let refused = |section: &str, line: &str| {
        let text = format!("{MINIMAL}\n{section}\n{line}\n");
        SidecarConfig::parse(&text).unwrap().validate().unwrap_err().to_string()
    };
    let err = refused("[routing]", "attempt_timeout = \"5000000000000000000s\"");
    assert!(err.starts_with("routing.attempt_timeout: must be at most 604800s"), "{err}");
    let err = refused("[tenants.acme]", "requests_per_sec = 1e-300\ntokens_per_min = 100.0");
    assert!(err.starts_with("tenants.acme.requests_per_sec: must be a number in"), "{err}");
    let err = refused("[outlier]", "success_rate_margin = nan");
    assert!(err.starts_with("outlier.success_rate_margin"), "{err}");
    let err = refused(
        "[[services]]",
        "name = \"chat\"\nmax_concurrency = 1000000000000\nmax_queue = 1\nmax_queue_wait = \"1s\"",
    );
    assert!(err.starts_with("services[0].max_concurrency: must be at most 1000000"), "{err}");
}

#[test]
fn cache_aware_routing_is_named_in_kebab_case_and_its_index_is_bounded() {
    let cfg = SidecarConfig::parse(&format!("{MINIMAL}\n[routing]\npolicy = \"cache-aware\"\n")).unwrap();
    cfg.validate().unwrap();
    assert_eq!((cfg.routing.policy, cfg.routing.prefix_index_blocks), (Policy::CacheAware, 1_000_000));
    let huge = format!("{MINIMAL}\n[routing]\nprefix_index_blocks = 1000000000\n");
    let err = SidecarConfig::parse(&huge).unwrap().validate().unwrap_err().to_string();
    assert_eq!(err, "routing.prefix_index_blocks: must be in [1000, 100000000]");
}

#[test]
fn overflow_rules_default_to_low_and_normal_and_name_the_key_at_fault() {
    let rule =
        |extra: &str| format!("{MINIMAL}\n[[routing.overflow]]\nservice = \"chat\"\nto = \"chat-small\"\n{extra}");
    let cfg = SidecarConfig::parse(&rule("")).unwrap();
    cfg.validate().unwrap();
    let r = &cfg.routing.overflow[0];
    assert_eq!((r.service.as_str(), r.to.as_str()), ("chat", "chat-small"));
    assert_eq!(r.priorities, [Degradable::Low, Degradable::Normal]);
    assert!(r.tenants_never.is_empty());
    let refused = |text: String| SidecarConfig::parse(&text).unwrap().validate().unwrap_err().to_string();
    let err = refused(rule("priorities = [\"low\", \"high\"]"));
    assert!(err.starts_with("routing.overflow[0].priorities: high-priority calls are never degraded"), "{err}");
    let err = refused(rule("").replace("chat-small", "chat"));
    assert!(err.starts_with("routing.overflow[0].to: must name a service other"), "{err}");
    let err = refused(format!("{}\n[[routing.overflow]]\nservice = \"chat\"\nto = \"chat-tiny\"\n", rule("")));
    assert!(err.starts_with("routing.overflow[1].service: \"chat\" already has an overflow rule"), "{err}");
    let err = refused(rule("").replace("to = \"chat-small\"", "to = \"\""));
    assert!(err.starts_with("routing.overflow[0].service: service and to must both"), "{err}");
    let err = SidecarConfig::parse(&rule("priorities = [\"urgent\"]")).unwrap_err().to_string();
    assert!(err.contains("urgent"), "{err}");
    let err = SidecarConfig::parse(&rule("tenant_never = [\"a\"]")).unwrap_err().to_string();
    assert!(err.contains("tenant_never"), "{err}");
}

#[test]
fn a_config_without_version_is_1_0_and_this_binary_reads_1_0() {
    assert_eq!(SidecarConfig::parse(MINIMAL).unwrap().version, ConfigVersion { major: 1, minor: 0 });
    assert_eq!(CONFIG_VERSION.to_string(), "1.0");
    let cfg = SidecarConfig::parse(&format!("version = \"1.0\"\n{MINIMAL}")).unwrap();
    assert_eq!(cfg.version, CONFIG_VERSION);
    let err = SidecarConfig::parse(&format!("version = \"1\"\n{MINIMAL}")).unwrap_err().to_string();
    assert!(err.contains("version must be \"MAJOR.MINOR\""), "{err}");
}

#[test]
fn unknown_keys_in_a_config_of_this_version_or_older_are_refused_naming_every_key() {
    let text = format!(
        "version = \"1.0\"\n{MINIMAL}\n[routing]\nnew_knob = 1\n\
         [[services]]\nname = \"chat\"\nmax_concurrency = 1\nmax_queue = 1\nmax_queue_wait = \"1s\"\nshiny = true\n"
    );
    let err = SidecarConfig::parse(&text).unwrap_err().to_string();
    assert_eq!(err, "routing.new_knob, services[0].shiny: unknown key (config version 1.0, this binary reads 1.0)");
    let unversioned = format!("{MINIMAL}\n[node]\naddress = \"127.0.0.1:1\"\nwieght = 2\n");
    let err = SidecarConfig::parse(&unversioned).unwrap_err().to_string();
    assert_eq!(err, "node.wieght: unknown key (config version 1.0, this binary reads 1.0)");
}

#[test]
fn unknown_keys_in_a_config_of_a_newer_minor_version_are_ignored_with_one_warning() {
    let text = format!(
        "version = \"1.1\"\ntop_knob = \"x\"\n{MINIMAL}\n[routing]\nattempt_timeout = \"2s\"\nnew_knob = 1\n\
         [tenants.acme]\nrequests_per_sec = 1.0\ntokens_per_min = 10.0\nburst = 3\n"
    );
    let (cfg, warning) = SidecarConfig::parse_quietly(&text).unwrap();
    cfg.validate().unwrap();
    assert_eq!(cfg.version, ConfigVersion { major: 1, minor: 1 });
    assert_eq!(cfg.routing.attempt_timeout, Duration::from_secs(2), "known keys are still read");
    assert_eq!(
        warning.as_deref(),
        Some(
            "ignoring keys unknown to this version (config version 1.1, this binary reads 1.0): \
             routing.new_knob, tenants.acme.burst, top_knob"
        )
    );
    let (_, quiet) = SidecarConfig::parse_quietly(&format!("version = \"1.1\"\n{MINIMAL}")).unwrap();
    assert_eq!(quiet, None);
    let bad = format!("version = \"1.1\"\n{MINIMAL}\n[routing]\nattempt_timeout = \"soon\"\n");
    let err = SidecarConfig::parse(&bad).unwrap_err().to_string();
    assert!(
        err.contains("attempt_timeout") && err.contains("soon"),
        "a newer version does not excuse bad values: {err}"
    );
}

#[test]
fn a_config_of_another_major_version_is_refused() {
    let err = SidecarConfig::parse(&format!("version = \"2.0\"\n{MINIMAL}\n[routing]\nnew_knob = 1\n"))
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("version: config version 2.0 is not read by this binary, which reads 1.0"), "{err}");
    let err = SidecarConfig::parse(&format!("version = \"0.1\"\n{MINIMAL}")).unwrap_err().to_string();
    assert!(err.starts_with("version: config version 0.1 is not read"), "{err}");
}
