//! The portable node binary on every matmul kernel this CPU supports: a
//! forced kernel serves the real model correctly and is reported in the
//! metrics (the proxy for a host older than the build machine); a kernel
//! the CPU lacks is refused by name at start.

use std::process::Stdio;

use mesh_tests::{NodeProcess, bin_dir, chat_request, free_port, generate, model_path, scrape};

/// The kernels this CPU can run, by the node's flag names.
fn supported() -> Vec<&'static str> {
    let mut kernels = vec!["scalar"];
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx2") && has!("fma") && has!("f16c") {
            kernels.push("avx2");
        }
        if has!("avx512f") && has!("avx512bw") && has!("avx512vnni") && has!("f16c") {
            kernels.push("avx512");
        }
    }
    kernels
}

#[tokio::test(flavor = "multi_thread")]
async fn every_supported_kernel_serves_the_model_and_says_so() {
    for kernel in supported() {
        let metrics = format!("127.0.0.1:{}", free_port());
        let node = NodeProcess::start_model(&["--kernel", kernel, "--metrics-listen", &metrics]).await;
        let mut client = node.client().await;
        let answer = generate(&mut client, chat_request("What is the capital of France? Answer in one sentence.", 16))
            .await
            .unwrap_or_else(|e| panic!("{kernel}: {e}"));
        assert!(answer.text.contains("Paris"), "{kernel}: {:?}", answer.text);
        let scraped = scrape(&metrics).await;
        assert_eq!(scraped.get(&format!("mesh_node_kernel_info{{kernel=\"{kernel}\"}}")), Some(&1.0), "{kernel}");
    }
}

#[tokio::test]
async fn a_kernel_the_cpu_lacks_is_refused_by_name() {
    let lacking: Vec<&str> = ["avx512", "avx2"].into_iter().filter(|k| !supported().contains(k)).collect();
    for kernel in lacking {
        let out = tokio::process::Command::new(bin_dir().join("mesh-node"))
            .args(["--listen", "127.0.0.1:0", "--kernel", kernel, "--model"])
            .arg(model_path())
            .stderr(Stdio::piped())
            .output()
            .await
            .expect("running mesh-node");
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{kernel}: started on a CPU without it");
        assert!(log.contains(&format!("--kernel {kernel} is not supported by this CPU")), "{kernel}: {log}");
    }
    let out = tokio::process::Command::new(bin_dir().join("mesh-node"))
        .args(["--kernel", "sse9"])
        .stderr(Stdio::piped())
        .output()
        .await
        .expect("running mesh-node");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--kernel"));
}
